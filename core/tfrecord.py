"""TFRecord's masked CRC32C, shared by the Beam writers and the evaluation's reader."""

from __future__ import annotations

import google_crc32c

_MASK_DELTA = 0xa282ead8


def masked_crc32c(data: bytes) -> int:
  """The masked CRC32C TFRecord framing stores beside a length and a record."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xffffffff

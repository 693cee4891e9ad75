"""Byte-reproducible gzipped JSON-lines files, written whole or not at all."""

from __future__ import annotations

import gzip
import io
from typing import Iterable

from core import workdir as workdir_lib


def write_gz(path: str, lines: Iterable[str]) -> None:
  """Writes `lines` (no newlines inside) to a gzip file with `atomic_write`.

  The gzip header carries no name or time, so the same lines give the same bytes.
  """
  buffer = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=buffer,
                     mtime=0) as f:
    for line in lines:
      f.write(line.encode("utf-8"))
      f.write(b"\n")
  workdir_lib.atomic_write(path, buffer.getvalue())

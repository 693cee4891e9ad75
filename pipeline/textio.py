"""Atomic, byte-reproducible writing of gzipped JSON-lines files."""

from __future__ import annotations

import gzip
import os
from typing import Iterable


def write_gz(path: str, lines: Iterable[str]) -> None:
  """Writes `lines` (no newlines inside) to a gzip file: temp file, then rename.

  The gzip header carries no name or time, so the same lines give the same bytes.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as raw, gzip.GzipFile(
      filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as f:
    for line in lines:
      f.write(line.encode("utf-8"))
      f.write(b"\n")
  os.replace(tmp, path)

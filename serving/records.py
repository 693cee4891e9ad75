"""Reads the days of W/data into numpy columns, for export and evaluation.

Files are read in the order given, records in file order, so the examples of a
day come out in time order. Columns are the dense form of models/features.py;
multi-valued columns of different batches are padded to one width.
"""

from __future__ import annotations

import datetime
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import features as features_lib  # noqa: E402

_BATCH = 4096


def concat_padded(parts: Sequence[np.ndarray]) -> np.ndarray:
  """Concatenates batches along rows, padding 2-D columns to the widest ("" or 0)."""
  if parts[0].ndim == 1:
    return np.concatenate(parts)
  width = max(p.shape[1] for p in parts)
  fill = b"" if parts[0].dtype == object else 0
  return np.concatenate([np.pad(p, [(0, 0), (0, width - p.shape[1])],
                                constant_values=fill) for p in parts])


def empty_column(name: str) -> np.ndarray:
  """A column of no rows with the feature's dtype and rank."""
  dtype, multi, _ = features_lib.FEATURES[name]
  numpy_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
  return np.zeros((0, 0) if multi else (0,), numpy_dtype)


def read_columns(files: Sequence[str], names: Sequence[str],
                 max_history: int = features_lib.MAX_HISTORY) -> dict[str, np.ndarray]:
  """The `names` features of every record of `files`, as numpy columns.

  Raises:
    ValueError: a file cannot be read or parsed (naming it and the record reached).
  """
  columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
  for path in files:
    offset = 0
    try:
      records = tf.data.TFRecordDataset(path, compression_type="GZIP",
                                        buffer_size=1 << 20).batch(_BATCH)
      for batch in records:
        parsed = features_lib.parse_examples(batch, names, max_history=max_history)
        for name in names:
          columns[name].append(parsed[name].numpy())
        offset += int(batch.shape[0])
    except tf.errors.OpError as e:
      raise ValueError(f"{path}: unreadable at or after record {offset}: "
                       f"{e.message}") from e
  return {name: concat_padded(parts) if parts else empty_column(name)
          for name, parts in columns.items()}


def data_days(workdir: str) -> list[datetime.date]:
  """The days with a W/data/YYYY-MM-DD directory, ascending."""
  root = os.path.join(workdir, "data")
  if not tf.io.gfile.isdir(root):
    return []
  days = []
  for name in tf.io.gfile.listdir(root):
    try:
      days.append(datetime.date.fromisoformat(name.rstrip("/")))
    except ValueError:
      continue
  return sorted(days)

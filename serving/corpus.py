"""What an export reads from W/data, as numpy columns: the corpus and query features.

Files are read in the order given, records in file order, so the examples of a
day come out in time order. Columns are the dense form of models/features.py;
multi-valued columns of different batches are padded to one width. Evaluation
reads a day's events with the same `read_columns`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from models import data
from models import features as features_lib

CORPUS_PATTERN = data.CORPUS_PATTERN
# Held-out queries for the recall check, drawn evenly from the first this many events.
NUM_RECALL_QUERIES = 1000
_QUERY_POOL = 50_000
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


def read_corpus(pattern: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """All corpus records matching `pattern`, in file-name then record order.

  Returns:
    (item ids as bytes [n], the CANDIDATE_FEATURES in dense form).

  Raises:
    FileNotFoundError: nothing matches `pattern`, or the files hold no record.
    ValueError: an unreadable file, an empty item_id or a repeated one (naming the
      file and record number).
  """
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no corpus files match {pattern}")
  parts = []
  first_seen: dict[bytes, str] = {}
  for path in files:
    columns = read_columns([path], features_lib.CANDIDATE_FEATURES)
    for i, item in enumerate(columns["item_id"].tolist()):
      where = f"{path}: record {i}"
      if not item:
        raise ValueError(f"{where}: empty item_id")
      if item in first_seen:
        raise ValueError(f"{where}: item_id {item[:256]!r} repeats {first_seen[item]}")
      first_seen[item] = where
    parts.append(columns)
  if not first_seen:
    raise FileNotFoundError(f"{pattern}: corpus files hold no record")
  corpus = {name: concat_padded([p[name] for p in parts])
            for name in features_lib.CANDIDATE_FEATURES}
  return corpus["item_id"], corpus


def read_queries(files: Sequence[str], max_history: int,
                 num: int = NUM_RECALL_QUERIES) -> dict[str, np.ndarray]:
  """Query features of `num` events spread evenly over the day's first _QUERY_POOL."""
  if not files:
    return {}
  pool = data.serialized_examples(files).take(_QUERY_POOL).batch(_QUERY_POOL)
  try:
    serialized = next(iter(pool), None)
  except tf.errors.OpError as e:
    raise ValueError(f"{files}: unreadable examples: {e.message}") from e
  if serialized is None:
    return {}
  parsed = features_lib.parse_examples(serialized, features_lib.QUERY_FEATURES,
                                       max_history=max_history)
  total = int(serialized.shape[0])
  rows = np.unique(np.linspace(0, total - 1, min(num, total)).astype(np.int64))
  return {name: value.numpy()[rows] for name, value in parsed.items()}


def queries_from_corpus(item_ids: np.ndarray, num: int = 64) -> dict[str, np.ndarray]:
  """Stand-in requests "user on item X, nothing else known" when a day has no events."""
  seeds = item_ids[np.linspace(0, len(item_ids) - 1, min(num, len(item_ids))).astype(int)]
  size = len(seeds)
  return {
      "user_id": np.full(size, b"", object),
      "seed_item_id": seeds,
      "history_item_ids": np.full((size, 1), b"", object),
      "device": np.full(size, b"", object),
      "country": np.full(size, b"", object),
      "timestamp": np.zeros(size, np.int64),
  }

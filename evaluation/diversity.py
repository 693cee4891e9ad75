"""Intra-list diversity of retrieved lists: what DPP re-ranking (retrieve_diverse) buys.

One implementation for the daily evaluation (evaluation/evaluator.py, behind
EvaluationSettings.diversity_theta) and bench/dpp_curve.py. A day's lists are rows
of corpus positions of one export, [lists, k], -1 where a slot is empty (a list
padded with ""). Figures, means over the lists:

  pairwise_distance  mean over each list's ordered pairs of 1 - cos(v_i, v_j), v the
                     export's item embeddings (0: all alike, 1: orthogonal; a list
                     of fewer than two items counts 0);
  channels, topics   distinct item_channel_id / item_topics per list, from the corpus
                     files of the export's day, `corpus_pattern` (an empty id
                     counts as none);
  coverage           distinct items over all the lists / corpus size;
  list_length        items per list (a DPP row can stop early).

A day without lists has every figure None.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Mapping, Optional

import numpy as np

from core import workdir as workdir_lib
from serving import corpus as corpus_lib

FIGURES = ("pairwise_distance", "channels", "topics", "coverage", "list_length")
# Lists per chunk of the pairwise computation: bounds its [chunk, k, d] memory.
_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class CorpusItems:
  """What the figures need of each item, in the export's corpus order.

  Attributes:
    ids: item ids (bytes) [n].
    units: L2-normalised item embeddings [n, d] (a zero embedding stays zero).
    channels: channel number [n], -1 for none.
    topics: topic numbers [n, T], -1 pads.
  """
  ids: np.ndarray
  units: np.ndarray
  channels: np.ndarray
  topics: np.ndarray

  @classmethod
  def of(cls, item_ids: np.ndarray, item_embeddings: np.ndarray, pattern: str
         ) -> "CorpusItems":
    """An export's corpus (its `item_ids`, `item_embeddings`) with the channels and
    topics of the corpus files `pattern` it embedded (`corpus_pattern`).

    Raises:
      FileNotFoundError: nothing matches `pattern` (serving.corpus.read_corpus).
      ValueError: an export item the files do not hold (naming it and `pattern`),
        or a bad corpus file.
    """
    ids, columns = corpus_lib.read_corpus(pattern)
    row = {item: j for j, item in enumerate(ids.tolist())}
    at = []
    for item in np.asarray(item_ids).tolist():
      if item not in row:
        raise ValueError(f"{pattern}: no corpus record of the export's item {item!r}")
      at.append(row[item])
    at = np.asarray(at, np.int64)
    embeddings = np.asarray(item_embeddings, np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return cls(ids=np.asarray(item_ids, object),
               units=embeddings / np.where(norms > 0, norms, 1.0),
               channels=_numbered(np.asarray(columns["item_channel_id"], object)[at]),
               topics=_numbered(np.asarray(columns["item_topics"], object)[at]))

  def rows_of(self, lists: np.ndarray) -> np.ndarray:
    """Corpus positions [B, k] of item ids [B, k] (-1 for "" and unknown ids)."""
    lists = np.asarray(lists, object)
    position = {item: j for j, item in enumerate(self.ids.tolist())}
    return np.array([position.get(item, -1) for item in lists.ravel().tolist()],
                    np.int64).reshape(lists.shape)

  def figures(self, rows: np.ndarray) -> dict[str, Optional[float]]:
    """The figures (module docstring) of the lists `rows` [B, k], -1 for empty slots."""
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 2 or len(rows) == 0:
      return {name: None for name in FIGURES}
    filled = rows >= 0
    at = np.maximum(rows, 0)
    distance = np.concatenate([
        _pairwise_distance(self.units, at[s:s + _CHUNK], filled[s:s + _CHUNK])
        for s in range(0, len(rows), _CHUNK)])
    channels = np.where(filled, self.channels[at], -1)
    topics = np.where(filled[:, :, None], self.topics[at], -1).reshape(len(rows), -1)
    return {"pairwise_distance": float(np.mean(distance)),
            "channels": float(np.mean(_distinct(channels))),
            "topics": float(np.mean(_distinct(topics))),
            "coverage": len(np.unique(rows[filled])) / len(self.ids),
            "list_length": float(np.mean(filled.sum(axis=1)))}


def corpus_pattern(workdir: str, metadata: Mapping[str, Any]) -> str:
  """The corpus files an export (its `metadata`) embedded: W/data/<its day>/corpus-*
  of `workdir`, as the daily job writes them. Not the metadata's glob, which names
  the workdir the export was made in: a copied or moved workdir reads its own."""
  day = datetime.date.fromisoformat(metadata["day"])
  return os.path.join(workdir_lib.Workdir(workdir).data_dir(day), corpus_lib.CORPUS_PATTERN)


def _numbered(values: np.ndarray) -> np.ndarray:
  """Ids (bytes, any shape) as numbers, equal ids equal numbers; b"" as -1."""
  names, numbers = np.unique(values.astype(bytes), return_inverse=True)
  numbers = numbers.reshape(values.shape).astype(np.int64)
  return np.where(names[numbers] == b"", -1, numbers) if len(names) else numbers


def _distinct(values: np.ndarray) -> np.ndarray:
  """Distinct values >= 0 in each row of an int matrix [B, W]."""
  if values.shape[1] == 0:
    return np.zeros(len(values), np.int64)
  ordered = np.sort(values, axis=1)
  first = np.concatenate([np.ones((len(values), 1), bool),
                          ordered[:, 1:] != ordered[:, :-1]], axis=1)
  return np.sum(first & (ordered >= 0), axis=1)


def _pairwise_distance(units: np.ndarray, at: np.ndarray, filled: np.ndarray
                       ) -> np.ndarray:
  """Mean 1 - cos over each row's ordered pairs of filled slots (0 below two items)."""
  vectors = np.where(filled[:, :, None], units[at], 0.0)
  gram = np.einsum("bid,bjd->bij", vectors, vectors)
  off_diagonal = gram.sum(axis=(1, 2)) - np.einsum("bii->b", gram)
  count = filled.sum(axis=1)
  pairs = count * (count - 1)
  return np.where(pairs > 0, (pairs - off_diagonal) / np.maximum(pairs, 1), 0.0)

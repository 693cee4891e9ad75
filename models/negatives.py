"""Mixed negative sampling (Yang et al. 2020): uniform samples from the corpus.

The in-batch softmax only ever contrasts a positive with items that are popular
enough to be in the batch, so items of the long tail are rarely pushed down. With
`ModelConfig.uniform_negatives` = N > 0, every training step adds N candidates
drawn uniformly, with replacement, from the day's corpus (W/data/D/corpus-*,
every item cataloged up to D) to the batch's B columns. Each column keeps its own
logQ: an in-batch column its estimator's log p, a sampled column
log(N / corpus size), its expected count per step.

The corpus lives in `UniformNegatives`' variables (their shapes change with the
corpus, and the first corpus creates them); it is not part of the model's
checkpoint: the trainer loads the day's corpus at the start of every day
(`TwoTowerModel.load_negative_corpus`), on every worker. Draws
are stateless, seeded by (seed, global step), so a resumed day draws exactly the
negatives it would have drawn.
"""

from __future__ import annotations

import datetime
import os
from typing import Mapping

import numpy as np
import tensorflow as tf

from core import workdir as workdir_lib
from models import data
from models import features

CORPUS_PATTERN = data.CORPUS_PATTERN
_READ_BATCH = 1 << 16


def read_corpus(workdir: str, day: datetime.date) -> dict[str, tf.Tensor]:
  """Day D's corpus (W/data/D/corpus-*.tfrecord.gz): CANDIDATE_FEATURES, dense form.

  Raises:
    FileNotFoundError: no corpus file, or no record in them.
    ValueError: an unreadable file (naming the directory).
  """
  directory = workdir_lib.Workdir(workdir).data_dir(day)
  files = sorted(tf.io.gfile.glob(os.path.join(directory, CORPUS_PATTERN)))
  if not files:
    raise FileNotFoundError(f"{directory}: no {CORPUS_PATTERN} to draw negatives from")
  try:
    parts = list(tf.data.TFRecordDataset(files, compression_type="GZIP",
                                         buffer_size=1 << 20).batch(_READ_BATCH))
    if not parts:
      raise FileNotFoundError(f"{directory}: the corpus files hold no record")
    return features.parse_examples(tf.concat(parts, 0), features.CANDIDATE_FEATURES)
  except tf.errors.OpError as e:
    raise ValueError(f"{directory}: unreadable corpus: {e.message}") from e


class UniformNegatives:
  """A corpus held in variables, and N candidates drawn from it per step.

  A plain object, not a Keras layer or tf.Module, so that the model that holds
  it does not track (checkpoint, export) the corpus.

  Attributes:
    num_samples: N, candidates per draw.
    seed: the first half of every draw's stateless seed (the step is the second).
    corpus: name -> variable of CANDIDATE_FEATURES, [n] or [n, width].
  """

  def __init__(self, num_samples: int, seed: int = 0):
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    self.num_samples = num_samples
    self.seed = seed
    # Created by the first set_corpus: a model is built in a strategy's scope,
    # where a multi-worker strategy would make them distributed variables, whose
    # initial value it broadcasts, which collectives cannot do for strings.
    # Every worker loads the same corpus itself.
    self.corpus: dict[str, tf.Variable] = {}

  def set_corpus(self, candidates: Mapping[str, np.ndarray | tf.Tensor]) -> None:
    """Holds `candidates` (CANDIDATE_FEATURES, dense form, n >= 1 rows) from now on.

    Raises:
      ValueError: a missing feature, columns of different lengths, no row, or an
        empty or repeated item id (the draw would no longer be uniform over items).
    """
    missing = sorted(set(features.CANDIDATE_FEATURES) - set(candidates))
    if missing:
      raise ValueError(f"negative corpus without {missing}")
    values = {name: tf.convert_to_tensor(candidates[name], features.FEATURES[name][0])
              for name in features.CANDIDATE_FEATURES}
    rows = {name: int(value.shape[0]) for name, value in values.items()}
    size = rows["item_id"]
    if size == 0 or len(set(rows.values())) != 1:
      raise ValueError(f"negative corpus needs n >= 1 rows in every feature, got {rows}")
    ids = values["item_id"]
    if bool(tf.reduce_any(ids == "")) or int(tf.size(tf.unique(ids).y)) != size:
      raise ValueError("negative corpus: item ids must be non-empty and distinct")
    for name, value in values.items():
      if name in self.corpus:
        self.corpus[name].assign(value)
      else:
        self.corpus[name] = tf.Variable(value, trainable=False,
                                        shape=tf.TensorShape([None] * value.shape.rank),
                                        name=f"negatives_{name}")

  def sample(self, step: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """N candidates drawn at global `step`, and the sampling probability of each.

    Returns:
      (CANDIDATE_FEATURES [N] or [N, width], probability float32 [N] = N / n, the
      expected number of times each corpus item is drawn per step).

    Raises:
      InvalidArgumentError: no corpus was set.
    """
    if not self.corpus:
      raise tf.errors.InvalidArgumentError(
          None, None, "uniform negatives need a corpus: call the model's "
          "load_negative_corpus(workdir, day) or set_negative_corpus(...) first")
    size = tf.shape(self.corpus["item_id"], out_type=tf.int64)[0]
    seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
    rows = tf.random.stateless_uniform([self.num_samples], seed, minval=0, maxval=size,
                                       dtype=tf.int64)
    drawn = {name: tf.gather(value, rows) for name, value in self.corpus.items()}
    probability = tf.fill([self.num_samples],
                          self.num_samples / tf.cast(size, tf.float32))
    return drawn, probability

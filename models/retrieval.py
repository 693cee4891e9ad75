"""The two-tower retrieval model and its logQ-corrected in-batch softmax loss.

Loss (Yi et al. 2019, eq. 3 with the correction of section 4): for a batch of B
(query, candidate) pairs with unit embeddings u_i, v_j, estimator probabilities
p_j (the chance that item j appears in a batch) and rewards r_i,

  s_ij = <u_i, v_j> / temperature - log p_j       (every logit, positive included)
  L = -(1/B) sum_i r_i log softmax_j(s_ij)[i]

where a column j != i with the same item id as row i is an accidental hit and is
masked out of row i's softmax. With `uniform_negatives` = N (models/negatives.py),
training adds N columns j = B+1..B+N drawn uniformly from the corpus of n items,
each with its own q_j = N / n in place of p_j; a drawn item equal to row i's
positive is masked like any accidental hit. Without a correction ("none") no
column is corrected, drawn ones included. `tfrs.tasks.Retrieval` (0.7.7) applies the
temperature first and then subtracts log p (clipped to [1e-6, 1]), which is this
order; tests/test_models.py pins it against a hand computation. The task sums
over the batch; we divide by the global batch size, as tf.distribute expects.

Under several replicas (models/distribute.py) the batch is the global one: each
replica gathers the candidates and ids of every replica, updates the estimator
with the global ids (each replica's copy the same way) and scores its own
queries against all B candidates, its own first so that its positives stay on
the diagonal; the loss of its rows divided by B sums over the replicas to the
loss of one process on the whole batch.

With `count_multiplicity` an estimator returns an expected count per batch, which
may exceed 1, and TFRS's clip would make every count above 1 equal to 1. We pass
p / max(1, max_j p_j) instead: subtracting the same log(max p) from every logit
of a row leaves its softmax unchanged, and no p exceeds 1 any more, so a count of
4 gets a logit log 4 below a count of 1. (Only a p below 1e-6 * max p would now
meet TFRS's lower clip.)

With `distill_weight` w > 0 and a teacher passed to `compute_loss`, the loss adds
w times the distillation term of models/distill.py over the same rows and
columns (the uniform negatives included; or the first `distill_candidates`
columns): a temperature-softened cross-entropy between the teacher's and the
student's logQ-corrected in-batch softmaxes. It runs on one replica only.

With `transition_reverse_weight` w > 0 the loss adds w times the reversed-pair
term of models/transition.py on the transition tables (one replica only).

With `pair_memory_successors` > 0 the model also has a pair memory
(models/memory.py): its exports rank by <u, v> / temperature + bonus, where the
bonus is `pair_memory_weight` x the (anchor, item) pair's log-count relative to
the anchor's most counted partner's. The towers train without it.
"""

from __future__ import annotations

import datetime
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

import estimators
from models import data as data_lib
from models import distill
from models import distribute
from models import features as features_lib
from models import layers
from models import memory as memory_lib
from models import negatives
from models import transition
from models.config import ESTIMATOR_FIELDS, ModelConfig
from models.towers import CandidateTower, QueryTower


REVERSE_REPLICAS_UNSUPPORTED = (
    "transition_reverse_weight > 0 trains on one replica only: the reversed pairs' "
    "softmax would need the seeds of the whole global batch")


def make_frequency_estimator(config: ModelConfig) -> Optional[tf.keras.layers.Layer]:
  """The estimator for `config.correction`, or None for "none".

  Any kind of estimators.ESTIMATORS: "streaming" is the paper's hashed
  estimator; "exact" the per-id oracle (by default its long-run count method).
  Each gets those of estimator_buckets / _hashes / _alpha that it takes (as
  num_buckets / num_hashes / alpha), and `estimator_options`. With
  {"count_multiplicity": true} in `estimator_options`, `max_probability`
  defaults to the batch size, so expected counts above 1 are not clipped.
  """
  if config.correction == "none":
    return None
  takes = estimators.arguments(config.correction)
  options = {argument: getattr(config, field)
             for argument, field in ESTIMATOR_FIELDS.items() if argument in takes}
  options.update(config.estimator_options)
  if options.get("count_multiplicity"):
    # An expected count per batch is at most the batch size: let it show.
    options.setdefault("max_probability", float(config.batch_size))
  return estimators.make_estimator(config.correction, name="frequency_estimator",
                                   **options)


def in_batch_recall(query_embeddings: tf.Tensor, candidate_embeddings: tf.Tensor,
                    candidate_ids: tf.Tensor, k: int) -> tf.Tensor:
  """Fraction of rows whose positive ranks in the top k of the batch's candidates.

  Ranks by the raw score <u, v> (what serving ranks by, no correction); other
  columns with the positive's item id are not counted as competitors. Candidate
  i is query i's positive; candidates past the queries' (e.g. the rest of a
  global batch) compete too.
  """
  scores = tf.linalg.matmul(query_embeddings, candidate_embeddings, transpose_b=True)
  positive = tf.linalg.diag_part(scores)[:, tf.newaxis]
  index = tf.unique(candidate_ids).idx
  rows = tf.shape(query_embeddings)[0]
  same_item = tf.equal(index[:rows, tf.newaxis], index[tf.newaxis, :])
  beaten_by = tf.logical_and(scores > positive, tf.logical_not(same_item))
  rank = tf.reduce_sum(tf.cast(beaten_by, tf.int32), axis=1)
  return tf.reduce_mean(tf.cast(rank < k, tf.float32))


class TwoTowerModel(tfrs.Model):
  """Query and candidate towers trained with a logQ-corrected in-batch softmax.

  Attributes:
    config: the ModelConfig it was built from.
    query_tower: QueryTower, raw QUERY_FEATURES dict -> unit embeddings [B, d].
    candidate_tower: CandidateTower, raw CANDIDATE_FEATURES dict -> [B, d].
    estimator: the item-frequency estimator layer, or None for correction "none".
    task: the tfrs.tasks.Retrieval loss.
    negatives: negatives.UniformNegatives, the corpus the uniform negatives are
      drawn from, or None when `uniform_negatives` is 0. Not tracked: the
      trainer loads each day's corpus (`load_negative_corpus`).
  """

  def __init__(self, config: ModelConfig, **kwargs):
    super().__init__(**kwargs)
    self.config = config
    item_embedding = layers.HashedEmbedding(config.item_buckets, config.id_embedding_dim,
                                            seed=config.seed, name="item_id_embedding")
    self.query_tower = QueryTower(config, item_embedding, name="query_tower")
    self.candidate_tower = CandidateTower(config, item_embedding, name="candidate_tower")
    self.estimator = make_frequency_estimator(config)
    self.task = tfrs.tasks.Retrieval(temperature=config.temperature,
                                     remove_accidental_hits=True)
    self.memory = (memory_lib.PairMemory(config.pair_memory_successors,
                                         config.pair_memory_weight, name="pair_memory")
                   if config.pair_memory_successors else None)
    # Untracked (see UniformNegatives): the corpus is not part of a checkpoint.
    self.negatives = (negatives.UniformNegatives(config.uniform_negatives, config.seed)
                      if config.uniform_negatives else None)

  def call(self, features: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (query embeddings, candidate embeddings), each [B, d]."""
    return self.query_tower(features), self.candidate_tower(features)

  def score(self, query_embeddings: tf.Tensor,
            candidate_embeddings: tf.Tensor) -> tf.Tensor:
    """Serving scores <u, v> / temperature, [num_queries, num_candidates]."""
    return tf.linalg.matmul(query_embeddings, candidate_embeddings,
                            transpose_b=True) / self.config.temperature

  def load_negative_corpus(self, workdir: str, day: datetime.date) -> None:
    """Draws the uniform negatives from day D's corpus from now on; a no-op without them.

    The trainer calls it when it starts (or resumes) training a day.

    Raises:
      FileNotFoundError, ValueError: see negatives.read_corpus.
    """
    if self.negatives is not None:
      self.negatives.set_corpus(negatives.read_corpus(workdir, day))

  def absorb_day(self, workdir: str, day: datetime.date) -> bool:
    """Counts day D's pairs into the pair memory, once (PairMemory.absorb); False
    without a memory or when D was counted already. The trainer calls it before
    training a day.

    Raises:
      FileNotFoundError: no W/data/D.
      tf.errors.OpError: an example file that cannot be read or parsed.
    """
    if self.memory is None or day.toordinal() <= int(self.memory.absorbed_day.numpy()):
      return False
    names = ("seed_item_id", "item_id", "history_item_ids")
    seeds, items = [], []
    for batch in data_lib.serialized_examples(data_lib.example_files(workdir, day)).batch(
        8192):
      parsed = features_lib.parse_examples(batch, names, max_history=1)
      seeds.append(memory_lib.anchor_ids(parsed["seed_item_id"],
                                         parsed["history_item_ids"]).numpy())
      items.append(parsed["item_id"].numpy())
    return self.memory.absorb(np.concatenate(seeds or [np.zeros(0, object)]),
                              np.concatenate(items or [np.zeros(0, object)]), day)

  def set_negative_corpus(self, candidates: Mapping[str, Any]) -> None:
    """Draws the uniform negatives from `candidates` (UniformNegatives.set_corpus)."""
    if self.negatives is None:
      raise ValueError("set_negative_corpus: the config has uniform_negatives = 0")
    self.negatives.set_corpus(candidates)

  def _step(self, step: Optional[tf.Tensor]) -> tf.Tensor:
    """The global step: `step`, else the optimizer's iterations."""
    if step is None:
      if self.optimizer is None:
        raise ValueError("training with a frequency estimator or uniform negatives "
                         "needs the global step: pass step= or compile the model "
                         "with an optimizer")
      step = self.optimizer.iterations
    return tf.cast(step, tf.int64)

  def sampling_probability(self, item_ids: tf.Tensor, step: Optional[tf.Tensor],
                           training: bool) -> Optional[tf.Tensor]:
    """p of each candidate: updates the estimator at `step` when training."""
    if self.estimator is None:
      return None
    if training:
      return self.estimator(item_ids, self._step(step))
    return self.estimator.estimate(item_ids)

  @staticmethod
  def _below_one(p: Optional[tf.Tensor]) -> Optional[tf.Tensor]:
    """p / max(1, max p): the same row softmax, and nothing for TFRS to clip at 1."""
    if p is None:
      return None
    return p / tf.maximum(tf.reduce_max(p), 1.0)

  def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False,
                   step: Optional[tf.Tensor] = None,
                   teacher: Optional[distill.Teacher] = None) -> tf.Tensor:
    """The corrected, reward-weighted in-batch softmax loss (module docstring).

    Args:
      features: a parsed batch with query and candidate features; "reward" is the
        sample weight (1.0 when absent).
      training: update the estimator (else read it only), and add the uniform
        negatives if the config has them.
      step: global step for the estimator and the negatives' draw; defaults to
        the optimizer's iterations.
      teacher: adds `distill_weight` x the distillation term (models/distill.py)
        when the weight is > 0; not called otherwise.

    Returns:
      Scalar loss: this replica's rows' sum divided by the global batch's rows,
      so that the replicas' losses (and gradients) sum to the global batch's.

    Raises:
      ValueError: distillation under several replicas (distill.REPLICAS_UNSUPPORTED).
    """
    query_embeddings, candidate_embeddings = self(features, training=training)
    item_ids = features["item_id"]
    rows = tf.shape(query_embeddings)[0]
    shared = distribute.GlobalBatch.of(rows)
    distilling = teacher is not None and self.config.distill_weight > 0
    # The teacher scores the same columns as the student: the batch's candidates,
    # then the uniform negatives.
    columns = ({name: features[name] for name in features_lib.CANDIDATE_FEATURES}
               if distilling else None)
    if shared is None:
      probability = self.sampling_probability(item_ids, step, training)
    elif distilling:
      raise ValueError(distill.REPLICAS_UNSUPPORTED)
    else:
      # Every replica updates its copy of the estimator with the same global ids
      # at the same step (so the copies stay equal), then scores its queries
      # against the global batch's candidates, its own first.
      global_ids = shared.gather_strings(item_ids)
      probability = self.sampling_probability(global_ids, step, training)
      if probability is not None:
        probability = shared.own_first(probability)
      item_ids = shared.own_first(global_ids)
      candidate_embeddings = shared.own_first(shared.gather(candidate_embeddings))
      rows = shared.rows
    if training and self.negatives is not None:
      drawn, drawn_probability = self.negatives.sample(self._step(step))
      candidate_embeddings = tf.concat(
          [candidate_embeddings, self.candidate_tower(drawn, training=training)], 0)
      item_ids = tf.concat([item_ids, drawn["item_id"]], 0)
      if probability is not None:
        probability = tf.concat([probability, drawn_probability], 0)
      if distilling:
        columns = features_lib.concat_padded(columns, drawn, axis=0)
    # Accidental hits compare ids B x C times: small ints are 4x faster than strings.
    item_index = tf.unique(item_ids).idx
    reward = features.get("reward")
    if reward is None:
      reward = tf.ones_like(query_embeddings[:, 0])
    probability = self._below_one(probability)
    loss_sum = self.task(
        query_embeddings, candidate_embeddings,
        sample_weight=reward,
        candidate_sampling_probability=probability,
        candidate_ids=item_index,
        compute_metrics=False, compute_batch_metrics=False)
    if self.config.transition_reverse_weight > 0:
      if shared is not None:
        raise ValueError(REVERSE_REPLICAS_UNSUPPORTED)
      loss_sum += self.config.transition_reverse_weight * self._reverse_transition_sum(
          features, reward)
    if distilling:
      loss_sum += self.config.distill_weight * self._distillation_sum(
          features, teacher, query_embeddings, candidate_embeddings, columns,
          item_index, probability)
    return loss_sum / tf.cast(rows, loss_sum.dtype)

  def _reverse_transition_sum(self, features: Mapping[str, tf.Tensor],
                              reward: tf.Tensor) -> tf.Tensor:
    """The reversed-pair term of models/transition.py, summed over the rows."""
    seed_ids = features["seed_item_id"]
    probability = (None if self.estimator is None
                   else self._below_one(self.estimator.estimate(seed_ids)))
    return transition.reverse_transition_loss(
        self.query_tower.seed_transition(features["item_id"]),
        self.candidate_tower.item_transition(seed_ids), seed_ids,
        self.config.temperature, reward, probability)

  def _distillation_sum(self, features: Mapping[str, tf.Tensor],
                        teacher: distill.Teacher, query_embeddings: tf.Tensor,
                        candidate_embeddings: tf.Tensor,
                        columns: Mapping[str, tf.Tensor], item_index: tf.Tensor,
                        probability: Optional[tf.Tensor]) -> tf.Tensor:
    """The distillation term summed over the rows, on the first
    `distill_candidates` columns (all of them when 0)."""
    keep = self.config.distill_candidates or None  # slicing [:None] keeps all
    queries = {name: features[name] for name in features_lib.QUERY_FEATURES
               if name in features}
    return tf.reduce_sum(distill.distillation_loss(
        self.score(query_embeddings, candidate_embeddings[:keep]),
        teacher.score_pairs(queries, {name: value[:keep]
                                      for name, value in columns.items()}),
        item_index[:tf.shape(query_embeddings)[0]], item_index[:keep],
        self.config.distill_temperature,
        None if probability is None else probability[:keep]))

"""Tests of models/distill.py: the distillation term, in the model and the trainer."""

import datetime
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from core.workdir import Workdir
from models import config as config_lib
from models import distill
from models import features
from models import ranker as ranker_lib
from models import trainer as trainer_lib
from models.retrieval import TwoTowerModel
from test_models import _softmax_loss
from test_models import batch
from test_models import TINY
from test_trainer import partner
from test_trainer import PLANTED_ITEMS
from test_trainer import planted_examples
from trainer_testlib import REPO
from trainer_testlib import TINY as TRAINER_TINY
from trainer_testlib import write_day

DAY = datetime.date(2024, 3, 1)
ITEMS = [f"i{i}" for i in range(PLANTED_ITEMS)]


def teacher_choice(item: int) -> int:
  """The planted teacher's favourite candidate for seed `item`: not its partner."""
  return (item + 2) % PLANTED_ITEMS


def planted_teacher(strength: float = 5.0) -> distill.ItemAffinityTeacher:
  affinity = np.zeros([PLANTED_ITEMS, PLANTED_ITEMS], np.float32)
  affinity[np.arange(PLANTED_ITEMS), teacher_choice(np.arange(PLANTED_ITEMS))] = strength
  return distill.ItemAffinityTeacher(ITEMS, affinity)


class Untouchable:
  """A teacher that must not be called (distill_weight = 0 costs nothing)."""

  def score_pairs(self, query_features, candidate_features):
    raise AssertionError("the teacher was called")


def _log_softmax(x: np.ndarray) -> np.ndarray:
  top = np.max(x, axis=1, keepdims=True)
  return x - top - np.log(np.sum(np.exp(x - top), axis=1, keepdims=True))


def _soft_cross_entropy(student, teacher, hits, temperature, log_p, reward=None,
                        scale=True, correct_teacher=True):
  """-(T^2 / B) sum_i r_i sum_j q_ij log s_ij in float64 (models/distill.py)."""
  student = np.where(hits, -np.inf, student / temperature - log_p)
  teacher = teacher / temperature - (log_p if correct_teacher else 0.0)
  targets = np.exp(_log_softmax(np.where(hits, -np.inf, teacher)))
  rows = -np.sum(targets * np.where(hits, 0.0, _log_softmax(student)), axis=1)
  if reward is not None:
    rows = rows * reward
  return float(np.mean(rows) * (temperature ** 2 if scale else 1.0))


@pytest.mark.parametrize("keep", [0, 3])
def test_distillation_matches_hand_computation(keep):
  """Both sides softened by T then logQ-corrected, hits masked, T^2, unweighted;
  with distill_candidates = 3, on the first 3 columns only."""
  weight, temperature = 0.7, 2.0
  config = TINY.replace(correction="streaming", distill_weight=weight,
                        distill_temperature=temperature, distill_candidates=keep)
  model = TwoTowerModel(config)
  warm_up = [["a", "b", "c"], ["a", "e"], ["a", "b"], ["a"], ["a", "b", "e"]]
  for step, ids in enumerate(warm_up, start=1):
    model.estimator(tf.constant(ids), tf.constant(step, tf.int64))
  ids = ["a", "b", "a", "c", "d"]  # "a" twice: an accidental hit in rows 0 and 2
  seeds = ["b", "c", "c", "a", "e"]
  reward = np.array([1.0, 0.5, 2.0, 0.0, 1.5])
  inputs = batch([{"user_id": f"u{i}", "item_id": item, "seed_item_id": seed,
                   "item_topics": [f"t{i % 2}"], "reward": r,
                   "timestamp": 1_700_000_000 + i}
                  for i, (item, seed, r) in enumerate(zip(ids, seeds, reward))])
  items = ["a", "b", "c", "d", "e"]
  table = np.random.default_rng(3).normal(0.0, 2.0, [5, 5])
  teacher = distill.ItemAffinityTeacher(items, table)
  u, v = (x.numpy().astype(np.float64) for x in model(inputs))
  p = model.estimator.estimate(tf.constant(ids)).numpy().astype(np.float64)
  assert len(set(np.round(p, 6))) >= 3, "a correction that is not informative"

  got = float(model.compute_loss(inputs, teacher=teacher))

  log_p = np.log(p)[None, :]
  hits = (np.array(ids)[:, None] == np.array(ids)[None, :]) & ~np.eye(5, dtype=bool)
  student = u @ v.T / config.temperature
  scores = table[[items.index(s) for s in seeds]][:, [items.index(i) for i in ids]]
  true_label = _softmax_loss(np.where(hits, -np.inf, student - log_p), reward)
  if keep:
    student, scores, hits, log_p = (x[:, :keep] for x in (student, scores, hits, log_p))
  distilled = _soft_cross_entropy(student, scores, hits, temperature, log_p)
  want = true_label + weight * distilled
  assert got == pytest.approx(want, rel=1e-5)
  # The test tells apart the choices it pins.
  mistakes = {
      "student not corrected": _soft_cross_entropy(student, scores, hits, temperature,
                                                   0.0 * log_p, correct_teacher=False),
      "teacher not corrected": _soft_cross_entropy(student, scores, hits, temperature,
                                                   log_p, correct_teacher=False),
      "corrected before the temperature": _soft_cross_entropy(
          student - log_p, scores - log_p, hits, temperature, 0.0 * log_p),
      "no T^2": _soft_cross_entropy(student, scores, hits, temperature, log_p,
                                    scale=False),
      "accidental hit kept": _soft_cross_entropy(student, scores, hits & False,
                                                 temperature, log_p),
      "reward-weighted": _soft_cross_entropy(student, scores, hits, temperature, log_p,
                                             reward=reward),
  }
  for name, wrong in mistakes.items():
    assert abs(true_label + weight * wrong - want) > 1e-3 * want, name


def test_weight_zero_is_the_true_label_loss_and_never_calls_the_teacher():
  inputs = batch([{"user_id": f"u{i}", "item_id": f"i{i % 3}", "seed_item_id": "i1"}
                  for i in range(4)])
  model = TwoTowerModel(TINY.replace(correction="none"))
  plain = float(model.compute_loss(inputs))
  assert float(model.compute_loss(inputs, teacher=Untouchable())) == plain
  # Weight > 0 without a teacher: the model's loss is the true-label one too.
  model.config = model.config.replace(distill_weight=1.0)
  assert float(model.compute_loss(inputs)) == plain
  assert float(model.compute_loss(inputs, teacher=planted_teacher())) != plain


def test_gradients_reach_the_student_and_not_the_teacher():
  inputs = batch([{"user_id": f"u{i}", "item_id": f"i{i}", "seed_item_id": f"i{i + 1}"}
                  for i in range(6)])
  teacher = planted_teacher()
  gradients = {}
  for weight in (0.0, 1.0):
    model = TwoTowerModel(TINY.replace(correction="none", distill_weight=weight))
    model(inputs)
    with tf.GradientTape(persistent=True) as tape:
      loss = model.compute_loss(inputs, teacher=teacher)
    gradients[weight] = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(
        loss, model.trainable_variables) if g is not None]
    assert tape.gradient(loss, teacher.trainable_variables) == [None]
  assert len(gradients[1.0]) == len(gradients[0.0]) > 0
  assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(gradients[0.0], gradients[1.0]))


def teacher_ranks(model) -> tuple[np.ndarray, np.ndarray]:
  """By the student's <u, v>, for each item's query: the rank of the teacher's
  choice among the items but the partner, and the partner's among all items."""
  queries = batch([{"seed_item_id": f"i{i}", "history_item_ids": [f"i{i}"],
                    "item_id": f"i{i}", "item_channel_id": f"c{i}",
                    "item_topics": [f"t{i // 2}"], "item_topic_weights": [1.0]}
                   for i in range(PLANTED_ITEMS)])
  query, candidate = model(queries)
  scores = tf.linalg.matmul(query, candidate, transpose_b=True).numpy()
  chosen = scores[np.arange(PLANTED_ITEMS), teacher_choice(np.arange(PLANTED_ITEMS))]
  partners = scores[np.arange(PLANTED_ITEMS), partner(np.arange(PLANTED_ITEMS))]
  others = np.arange(PLANTED_ITEMS)[None, :] != partner(np.arange(PLANTED_ITEMS))[:, None]
  return (np.sum((scores > chosen[:, None]) & others, axis=1),
          np.sum(scores > partners[:, None], axis=1))


def test_a_planted_teacher_moves_the_student_towards_its_choice(tmp_path):
  """One day of the planted partner world, distilled or not from a teacher that
  prefers another item than the label's: wide, relative margins only.

  Without distillation the teacher's choice ranks about 15th of the 39 items
  other than the partner (it is just another item); with it, about 0th, while
  the partner stays near the top of all 40.
  """
  examples = planted_examples(DAY, 1600, seed=1)
  teacher = planted_teacher()
  before = teacher.affinity.numpy().copy()
  ranks = {}
  for weight in (0.0, 1.0):
    workdir = str(tmp_path / f"w{weight}")
    write_day(workdir, DAY, examples)
    trainer = trainer_lib.Trainer(workdir, TRAINER_TINY.replace(distill_weight=weight),
                                  teacher=teacher)
    trainer.train_day(DAY)
    ranks[weight] = teacher_ranks(trainer.model)
  choice_plain, partner_plain = ranks[0.0]
  choice_distilled, partner_distilled = ranks[1.0]
  assert choice_plain.mean() > 5, "the planted teacher's choice is learned without it"
  assert choice_distilled.mean() < 0.25 * choice_plain.mean()
  # The labels still count: the partner stays near the top.
  assert partner_distilled.mean() < 0.25 * choice_plain.mean()
  # The teacher was neither trained nor checkpointed with the student.
  np.testing.assert_array_equal(teacher.affinity.numpy(), before)
  saved = tf.train.list_variables(Workdir(workdir).checkpoints_dir)
  assert saved and not any("affinity" in name for name, _ in saved)


def test_training_with_a_weight_needs_a_teacher(tmp_path):
  with pytest.raises(ValueError, match="distill_weight = 0.5 needs a ranking teacher"):
    trainer_lib.Trainer(str(tmp_path), TRAINER_TINY.replace(distill_weight=0.5))
  # At weight 0 a teacher is ignored.
  trainer = trainer_lib.Trainer(str(tmp_path), TRAINER_TINY, teacher=Untouchable())
  assert trainer.teacher is None


def test_several_replicas_are_refused_in_one_line(tmp_path):
  """Two logical CPUs in a fresh process: the trainer and the model refuse."""
  script = textwrap.dedent(f"""
      import sys
      sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests")!r}]
      import core
      import tensorflow as tf
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      from models import distill, features
      from models import trainer as trainer_lib
      from models.retrieval import TwoTowerModel
      from test_distill import planted_teacher, TRAINER_TINY
      strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      config = TRAINER_TINY.replace(distill_weight=1.0, correction="none")
      for attempt in ("trainer", "model"):
        try:
          if attempt == "trainer":
            trainer_lib.Trainer({str(tmp_path)!r}, config, strategy=strategy,
                                teacher=planted_teacher())
          else:
            with strategy.scope():
              model = TwoTowerModel(config)
            inputs = features.default_batch()
            strategy.run(lambda b: model.compute_loss(b, teacher=planted_teacher()),
                         args=(inputs,))
          print(attempt, "accepted")
        except ValueError as e:
          print(attempt, "refused:", e)
      """)
  process = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                           text=True, check=False, env={**os.environ,
                                                        "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert process.returncode == 0, process.stderr[-3000:]
  lines = process.stdout.splitlines()
  assert lines == [f"{attempt} refused: {distill.REPLICAS_UNSUPPORTED}"
                   for attempt in ("trainer", "model")], process.stdout


def test_candidate_columns_concatenate_rows_of_any_width():
  first = {"item_id": tf.constant(["a", "b"]),
           "item_topics": tf.constant([["x"], ["y"]]),
           "item_topic_weights": tf.constant([[1.0], [2.0]])}
  second = {"item_id": tf.constant(["c"]), "item_topics": tf.constant([["z", "w"]]),
            "item_topic_weights": tf.constant([[3.0, 4.0]])}
  out = features.concat_padded(first, second, axis=0)
  assert out["item_id"].numpy().tolist() == [b"a", b"b", b"c"]
  assert out["item_topics"].numpy().tolist() == [[b"x", b""], [b"y", b""], [b"z", b"w"]]
  np.testing.assert_array_equal(out["item_topic_weights"], [[1, 0], [2, 0], [3, 4]])


class Recording:
  """A teacher that records what it is asked to score, and scores 0."""

  def __init__(self):
    self.candidates = []

  def score_pairs(self, query_features, candidate_features):
    self.candidates.append({name: value.numpy() for name, value in
                            candidate_features.items()})
    return tf.zeros([tf.shape(query_features["seed_item_id"])[0],
                     tf.shape(candidate_features["item_id"])[0]])


def test_the_teacher_scores_the_uniform_negatives_too():
  config = TINY.replace(correction="none", uniform_negatives=3, distill_weight=1.0)
  model = TwoTowerModel(config)
  inputs = batch([{"user_id": f"u{i}", "item_id": f"i{i}", "item_topics": ["t"]}
                  for i in range(4)])
  model.set_negative_corpus(features.parse_examples(tf.constant([
      features.to_example({"item_id": f"n{i}", "item_topics": ["x", "y", "z"]})
      .SerializeToString() for i in range(5)]), features.CANDIDATE_FEATURES))
  step = tf.constant(7, tf.int64)
  drawn, _ = model.negatives.sample(step)
  teacher = Recording()
  model.compute_loss(inputs, training=True, step=step, teacher=teacher)
  (seen,) = teacher.candidates
  assert seen["item_id"].tolist() == (
      [b"i0", b"i1", b"i2", b"i3"] + drawn["item_id"].numpy().tolist())
  assert seen["item_topics"].tolist() == [[b"t", b"", b""]] * 4 + [[b"x", b"y", b"z"]] * 3


def test_an_old_config_loads_without_distillation_and_may_start_it(tmp_path):
  path = str(tmp_path / "config.json")
  values = TINY.to_dict()
  del values["distill_weight"], values["distill_temperature"], values["distill_candidates"]
  with open(path, "w") as f:
    json.dump(values, f)
  loaded = config_lib.read_config(path)
  assert (loaded.distill_weight, loaded.distill_temperature,
          loaded.distill_candidates) == (0.0, 1.0, 0)
  assert loaded == TINY
  # Run-time fields: distillation may start on a workdir that trained without it.
  assert TINY.incompatibilities(TINY.replace(
      distill_weight=0.5, distill_temperature=2.0, distill_candidates=64)) == []
  with pytest.raises(ValueError, match="distill_weight must be >= 0"):
    TINY.replace(distill_weight=-0.1)
  with pytest.raises(ValueError, match="distill_temperature must be > 0"):
    TINY.replace(distill_temperature=0.0)
  with pytest.raises(ValueError, match="distill_candidates must be >= 0"):
    TINY.replace(distill_candidates=-1)


def test_train_cli_without_a_teacher_fails_in_one_line(tmp_path):
  workdir = str(tmp_path / "w")
  write_day(workdir, DAY, planted_examples(DAY, 64, seed=1))
  process = subprocess.run(
      [sys.executable, "-m", "models.train", f"--workdir={workdir}", f"--date={DAY}",
       "--distill_weight=0.5"], cwd=REPO, capture_output=True, text=True, check=False,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert process.returncode == 2, process.stderr[-2000:]
  message = process.stderr.strip().splitlines()[-1]
  assert "ranker" in message and "config.json: missing" in message, message


def test_the_ranking_teacher_is_a_teacher():
  """models/ranker.py's Ranker plugs in as it is (issue 16's teacher)."""
  ranker = ranker_lib.build(ranker_lib.RankerConfig.like(TINY))
  assert isinstance(ranker, distill.Teacher)
  inputs = batch([{"user_id": f"u{i}", "item_id": f"i{i}", "seed_item_id": f"i{i + 1}",
                   "history_item_ids": [f"i{i + 1}", "i9"]} for i in range(4)])
  model = TwoTowerModel(TINY.replace(correction="none", distill_weight=1.0))
  plain = float(model.compute_loss(inputs))
  with tf.GradientTape() as tape:
    loss = model.compute_loss(inputs, teacher=ranker)
  assert np.isfinite(float(loss)) and float(loss) > plain
  assert all(g is None for g in tape.gradient(loss, ranker.trainable_variables))

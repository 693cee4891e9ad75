"""Tests of the transition embeddings (ModelConfig.transition_embeddings) and of
their reversed-pair loss (transition_reverse_weight, models/transition.py).

The seed's and the candidate's own tables must be plain linear paths into their
towers' outputs, serve what they train (an export loaded in a fresh process
gives the in-memory embeddings), and a workdir whose config predates the field
must keep the towers its checkpoints hold (tests/test_query_tower.py).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models import features
from models.config import ModelConfig
from models import transition
from models.retrieval import TwoTowerModel
from serving import servable
import test_query_tower as query_lib

CONFIG = query_lib.CONFIG.replace(transition_embeddings=True)

def _built(config: ModelConfig) -> TwoTowerModel:
  model = TwoTowerModel(config)
  model(features.default_batch())
  return model


def _zero_projections(model: TwoTowerModel) -> None:
  for tower in (model.query_tower, model.candidate_tower):
    for weight in tower.mlp.projection.weights:
      weight.assign(tf.zeros_like(weight))


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("encoder,scale", [("mean", 1.0), ("attention", 1.0),
                                           ("mean", 3.0)])
def test_transition_tables_are_linear_paths_around_the_mlps(encoder, scale):
  model = _built(CONFIG.replace(query_encoder=encoder, transition_scale=scale))
  _zero_projections(model)
  query, candidate = model.query_tower, model.candidate_tower
  rows = [{"user_id": "u", "seed_item_id": "s1", "history_item_ids": ["a", "b"]},
          {"user_id": "v", "seed_item_id": "s2", "device": "tv"}]
  seeds = tf.constant(["s1", "s2"])
  want = (query.item_embedding(seeds).numpy() @ query.seed_residual.kernel.numpy()
          + scale * query.seed_transition(seeds).numpy())
  np.testing.assert_allclose(query_lib.query(model, rows), _unit(want), atol=1e-6)
  items = query_lib.parsed([{"item_id": "i1", "item_channel_id": "c"},
                            {"item_id": "i2", "item_topics": ["t"]}])
  np.testing.assert_allclose(candidate(items).numpy(),
                             _unit(scale * candidate.item_transition(items["item_id"]).numpy()),
                             atol=1e-6)
  # An absent seed has no transition vector: the residual alone remains.
  absent = query.seed_transition(tf.constant([""])).numpy()
  np.testing.assert_array_equal(absent, np.zeros_like(absent))


def test_off_means_the_towers_have_no_transition_variables():
  names = [v.name for v in _built(CONFIG.replace(transition_embeddings=False)).variables]
  assert not [n for n in names if "transition" in n], names
  names = [v.name for v in _built(CONFIG).variables]
  assert len([n for n in names if "transition" in n]) == 2, names


def test_the_transition_towers_serve_what_they_train(tmp_path):
  model = _built(CONFIG)
  rows = [{"user_id": "u1", "seed_item_id": "i1", "timestamp": 1_700_000_000,
           "history_item_ids": ["i3", "i2"]},
          {"user_id": "u2", "history_item_ids": ["i2"]},  # no seed: i2 leads
          {"user_id": "u3", "seed_item_id": "i9"}]
  trained = model.query_tower(query_lib.parsed(rows), training=True).numpy()
  corpus = query_lib.parsed([{"item_id": "i1"}, {"item_id": "i2"}])
  servable.ExactRetriever(
      model.query_tower, model.candidate_tower, tf.constant(["i1", "i2"]),
      model.candidate_tower(corpus), CONFIG.temperature, k=1,
      max_history=CONFIG.max_history).save(str(tmp_path / "export"))
  (tmp_path / "requests.json").write_text(json.dumps([query_lib.request(rows)]))
  subprocess.run([sys.executable, "-c", query_lib._SERVE,  # pylint: disable=protected-access
                  str(tmp_path / "export"),
                  str(tmp_path / "requests.json"), str(tmp_path / "out.json")],
                 check=True, env=dict(os.environ), timeout=600)
  served = np.array(json.loads((tmp_path / "out.json").read_text())[0])
  np.testing.assert_allclose(served, trained, atol=1e-5)
  # Without the seed's table the queries would differ: the path is in the export.
  model.query_tower.seed_transition.embedding.embeddings.assign(
      tf.zeros_like(model.query_tower.seed_transition.embedding.embeddings))
  without = model.query_tower(query_lib.parsed(rows), training=True).numpy()
  assert np.abs(served - without).max() > 1e-3


SEEDS = [b"x", b"y", b"", b"x", b"z"]  # row 2 has no seed; rows 0 and 3 share one


def _reverse_by_hand(rows: np.ndarray, columns: np.ndarray, seeds: list[bytes],
                     temperature: float, reward: np.ndarray, p=None,
                     mask_hits: bool = True, mask_absent: bool = True) -> float:
  with np.errstate(invalid="ignore"):  # an absent seed's all-zero row, masked below
    logits = _unit(rows) @ _unit(columns).T / temperature
  if p is not None:
    logits = logits - np.log(p)[None, :]
  total = 0.0
  for i, seed in enumerate(seeds):
    if not seed:
      continue
    keep = [j for j, other in enumerate(seeds)
            if j == i or not ((mask_hits and other == seed)
                              or (mask_absent and not other))]
    row = logits[i, keep]
    total -= reward[i] * (logits[i, i] - np.log(np.exp(row).sum()))
  return total


def test_reverse_term_matches_a_hand_computation():
  rng = np.random.default_rng(3)
  rows, columns = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  reward = np.array([1.0, 0.5, 1.0, 2.0, 1.0])
  p = np.array([0.1, 0.2, 0.3, 0.1, 0.5])
  for probability in (None, p):
    got = float(transition.reverse_transition_loss(
        tf.constant(rows, tf.float32), tf.constant(columns, tf.float32),
        tf.constant(SEEDS), 0.2, tf.constant(reward, tf.float32),
        None if probability is None else tf.constant(probability, tf.float32)))
    want = _reverse_by_hand(rows, columns, SEEDS, 0.2, reward, probability)
    assert got == pytest.approx(want, rel=1e-5)
    # The check can fail: each masking, and the correction, changes the value.
    for wrong in (_reverse_by_hand(rows, columns, SEEDS, 0.2, reward, probability,
                                   mask_hits=False),
                  _reverse_by_hand(rows, columns, SEEDS, 0.2, reward, probability,
                                   mask_absent=False),
                  _reverse_by_hand(rows, columns, SEEDS, 0.2, reward,
                                   None if probability is not None else p)):
      assert abs(wrong - want) > 1e-3


def test_the_model_adds_the_reverse_term_of_its_tables():
  """loss(w) - loss(0) = w x the term on S[item] and C[seed], over B rows."""
  config = CONFIG.replace(transition_reverse_weight=0.7)
  model, plain = _built(config), _built(config.replace(transition_reverse_weight=0.0))
  plain.set_weights(model.get_weights())
  batch = query_lib.parsed([
      {"user_id": f"u{i}", "item_id": f"i{i}", "seed_item_id": seed.decode(),
       "history_item_ids": [seed.decode()] if seed else [], "reward": 1.0 + i / 4}
      for i, seed in enumerate(SEEDS)])
  difference = float(model.compute_loss(batch) - plain.compute_loss(batch))
  rows = model.query_tower.seed_transition(batch["item_id"]).numpy()
  columns = model.candidate_tower.item_transition(batch["seed_item_id"]).numpy()
  want = _reverse_by_hand(rows, columns, SEEDS, config.temperature,
                          batch["reward"].numpy())
  assert difference == pytest.approx(0.7 * want / len(SEEDS), rel=1e-4)
  assert abs(want) > 1e-3


def test_reverse_weight_needs_the_tables():
  with pytest.raises(ValueError, match="needs transition_embeddings"):
    CONFIG.replace(transition_embeddings=False, transition_reverse_weight=1.0)
  with pytest.raises(ValueError, match="must be >= 0"):
    CONFIG.replace(transition_reverse_weight=-1.0)

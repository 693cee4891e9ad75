"""serving/dpp.py: greedy MAP of the DPP against brute force and Chen et al.'s Algorithm 1.

The oracle is serving_testlib.dpp_reference: Algorithm 1 run literally on the
kernel L = diag(exp(alpha s)) S diag(exp(alpha s)) in float64. Data are random
but fixed, and each comparison first checks that every greedy choice wins by a
margin far above float32 error, so a tie can never decide a test.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from serving import dpp
import serving_testlib as tl

THETAS = (0.0, 0.2, 0.5, 0.8, 1.0)
# Far above float32's error on gains of order 1 (about 1e-6).
MARGIN = 1e-4


@tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32),
                              tf.TensorSpec([None, None], tf.float32),
                              tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32),
                              tf.TensorSpec([None, None], tf.bool),
                              tf.TensorSpec([None, None], tf.float32)])
def _graph(embeddings, scores, k, theta, valid, boosts):
  """greedy_map traced once, with dynamic shapes, as a servable runs it."""
  return dpp.greedy_map(embeddings, scores, k, theta, valid=valid, boosts=boosts)


def _select(embeddings, scores, k, theta, valid=None, boosts=None):
  """(indices, increments) as numpy, through the traced function."""
  valid = np.ones(scores.shape, bool) if valid is None else valid
  boosts = np.zeros(scores.shape, np.float32) if boosts is None else boosts
  found = _graph(tf.constant(embeddings, tf.float32), tf.constant(scores, tf.float32),
                 tf.constant(k), tf.constant(theta, tf.float32), tf.constant(valid),
                 tf.constant(boosts, tf.float32))
  return found.indices.numpy(), found.log_det_increments.numpy()


def _world(batch, num, dim, seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, num, dim)).astype(np.float32),
          rng.normal(size=(batch, num)).astype(np.float32))


def _objective(units, scores, chosen, theta):
  """f(Y) = theta sum s + (1 - theta) log det S_Y, by determinant (float64)."""
  chosen = list(chosen)
  gram = units[chosen] @ units[chosen].T
  sign, logdet = np.linalg.slogdet(gram)
  logdet = logdet if sign > 0 else -np.inf
  return theta * scores[chosen].sum() + (0.0 if theta == 1 else (1 - theta) * logdet)


def _units(embeddings):
  embeddings = np.asarray(embeddings, np.float64)
  return embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)


@pytest.mark.parametrize("theta", THETAS)
def test_greedy_equals_algorithm_1_of_chen_et_al(theta):
  # Seed 34 leaves every choice a margin of at least 2.5e-4 (checked below).
  embeddings, scores = _world(batch=4, num=30, dim=16, seed=34)
  valid = np.random.default_rng(134).random(scores.shape) > 0.2
  k = 10
  indices, increments = _select(embeddings, scores, k, theta, valid=valid)
  for row in range(len(scores)):
    want, want_increments, margins = tl.dpp_reference(embeddings[row], scores[row], k,
                                                      theta, valid=valid[row])
    assert min(margins) > MARGIN, (row, margins)
    assert indices[row].tolist() == want, row
    np.testing.assert_allclose(increments[row], want_increments, atol=1e-4)
    assert valid[row][indices[row]].all()


def test_k1_is_the_brute_force_map_and_each_step_the_best_extension():
  """k = 1 is exact: the best single item. Beyond, greedy is not the MAP (below),
  but each choice is the brute-force best extension of the items before it, by
  determinants computed afresh: the incremental Cholesky changes nothing."""
  embeddings, scores = _world(batch=5, num=8, dim=6, seed=3)
  for theta in THETAS:
    indices, _ = _select(embeddings, scores, 4, theta)
    for row in range(len(scores)):
      units = _units(embeddings[row])
      chosen = []
      for j in indices[row]:
        gains = {i: _objective(units, scores[row], chosen + [i], theta)
                 for i in range(8) if i not in chosen}
        best = max(gains.values())
        others = sorted(gains.values())[-2]
        if theta > 0 or chosen:  # at theta = 0 the first choice is a tie by design
          assert best - others > MARGIN and gains[j] == best, (theta, row, chosen, j)
        chosen.append(int(j))
      # Every single item has log det S = 0: at theta = 0 all tie (column 0 wins).
      single = max(range(8), key=lambda i: _objective(units, scores[row], [i], theta))
      first = _select(embeddings[row:row + 1], scores[row:row + 1], 1, theta)[0]
      assert first.tolist() == [[single if theta > 0 else 0]], (theta, row)


@pytest.mark.parametrize("theta", [0.2, 0.5, 1.0])
def test_k2_against_brute_force_where_greedy_is_exact(theta):
  """Greedy is the MAP at k = 2 when the objective is modular: theta = 1 (the sum
  of scores), or orthogonal items (log det S_Y = 0 for every Y)."""
  rng = np.random.default_rng(4)
  scores = rng.normal(size=(3, 12)).astype(np.float32)
  orthogonal = np.stack([np.eye(12, dtype=np.float32)[rng.permutation(12)]
                         for _ in range(3)])
  worlds = [orthogonal] + ([_world(3, 12, 5, seed=5)[0]] if theta == 1 else [])
  for embeddings in worlds:
    indices, _ = _select(embeddings, scores, 2, theta)
    for row in range(3):
      units = _units(embeddings[row])
      pairs = {pair: _objective(units, scores[row], pair, theta)
               for pair in itertools.combinations(range(12), 2)}
      best = max(pairs, key=pairs.get)
      assert sorted(indices[row].tolist()) == list(best)


def test_k2_greedy_is_not_the_map_in_general():
  """The documented limit: item a scores best but sits between b and c, which are
  orthogonal; greedy takes a, the MAP pair is {b, c}."""
  embeddings = np.array([[[1, 1], [1, 0], [0, 1]]], np.float32)
  scores = np.array([[1.0, 0.9, 0.9]], np.float32)
  indices, _ = _select(embeddings, scores, 2, 0.5)
  assert indices.tolist() == [[0, 1]]
  units = _units(embeddings[0])
  assert _objective(units, scores[0], [1, 2], 0.5) > _objective(units, scores[0], [0, 1],
                                                                0.5) + 0.2


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.0])
def test_log_det_increments_sum_to_the_log_det_of_each_prefix(theta):
  embeddings, scores = _world(batch=4, num=30, dim=10, seed=6)
  indices, increments = _select(embeddings, scores, 8, theta)
  for row in range(4):
    units = _units(embeddings[row])
    for t in range(1, 9):
      prefix = indices[row, :t]
      _, logdet = np.linalg.slogdet(units[prefix] @ units[prefix].T)
      np.testing.assert_allclose(increments[row, :t].sum(), logdet, atol=1e-4)


def test_theta_one_is_the_plain_top_k_even_with_duplicates():
  embeddings, scores = _world(batch=3, num=20, dim=4, seed=7)
  embeddings[:, 5] = embeddings[:, 2]  # an exact duplicate
  embeddings[:, 9] = 0.0  # an embedding that spans nothing
  indices, increments = _select(embeddings, scores, 12, 1.0)  # 12 > rank 4
  assert indices.tolist() == np.argsort(-scores, axis=1, kind="stable")[:, :12].tolist()
  assert np.isfinite(increments[:, 0]).all()


def test_theta_zero_ignores_scores_and_boosts_but_for_the_first_tie():
  embeddings, scores = _world(batch=4, num=25, dim=8, seed=8)
  rng = np.random.default_rng(9)
  indices, _ = _select(embeddings, scores, 6, 0.0)
  again, _ = _select(embeddings, rng.normal(size=scores.shape).astype(np.float32), 6, 0.0,
                     boosts=rng.normal(size=scores.shape).astype(np.float32))
  assert indices.tolist() == again.tolist()
  assert (indices[:, 0] == 0).all()
  for row in range(4):
    assert indices[row].tolist() == tl.dpp_reference(embeddings[row], scores[row], 6, 0.0)[0]


def test_rows_stop_at_the_rank_and_never_take_duplicates_or_zeros():
  embeddings, scores = _world(batch=2, num=12, dim=3, seed=10)
  embeddings[:, 4] = 2.0 * embeddings[:, 0]  # the same direction as item 0
  embeddings[:, 7] = 0.0
  scores[:, [0, 4, 7]] = 10.0  # the best scores, so only the DPP keeps them out
  for theta in (0.0, 0.5, 0.9):
    indices, increments = _select(embeddings, scores, 6, theta)
    for row in range(2):
      picked = [j for j in indices[row].tolist() if j >= 0]
      assert len(picked) == 3, (theta, indices[row])  # S has rank 3
      assert indices[row, 3:].tolist() == [-1, -1, -1]
      assert np.isneginf(increments[row, 3:]).all() and np.isfinite(increments[row, :3]).all()
      assert 7 not in picked and not {0, 4} <= set(picked)
  # With a larger epsilon, items closer than its square root to the span stop a row.
  near = embeddings[:1].copy()
  near[0, 1] = near[0, 0] + 0.05 * np.linalg.norm(near[0, 0]) * np.array([1, -1, 0]) / 1.4
  loose = dpp.greedy_map(near, scores[:1], 3, 0.0, epsilon=0.01).indices.numpy()[0]
  assert not {0, 1} <= set(loose.tolist())
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    dpp.greedy_map(near, scores[:1], 3, 0.5, epsilon=0.0)


def test_boosts_move_items_in_the_documented_direction():
  embeddings, scores = _world(batch=1, num=30, dim=12, seed=11)
  indices, _ = _select(embeddings, scores, 5, 0.5)
  chosen = indices[0].tolist()
  outside = next(j for j in np.argsort(scores[0]).tolist() if j not in chosen)
  up = np.zeros_like(scores)
  up[0, outside] = 20.0
  boosted, _ = _select(embeddings, scores, 5, 0.5, boosts=up)
  assert boosted[0, 0] == outside  # raised relevance: chosen, and first
  down = np.zeros_like(scores)
  down[0, chosen[0]] = -20.0
  lowered, _ = _select(embeddings, scores, 5, 0.5, boosts=down)
  assert chosen[0] not in lowered[0].tolist()
  # A boost is a shift of the score, nothing else.
  shifted, _ = _select(embeddings, scores + up, 5, 0.5)
  assert shifted.tolist() == boosted.tolist()


def test_invalid_candidates_and_empty_shapes():
  embeddings, scores = _world(batch=2, num=6, dim=4, seed=12)
  valid = np.array([[False, True, False, True, False, False]] * 2)
  scores[1, 3] = np.nan  # never chosen either
  indices, increments = _select(embeddings, scores, 4, 0.5, valid=valid)
  assert indices[0, :2].tolist() in ([1, 3], [3, 1]) and indices[0, 2:].tolist() == [-1, -1]
  assert indices[1].tolist() == [1, -1, -1, -1]
  assert _select(np.zeros((3, 0, 4)), np.zeros((3, 0)), 2, 0.5)[0].tolist() == [[-1, -1]] * 3
  assert _select(np.zeros((0, 5, 4)), np.zeros((0, 5)), 2, 0.5)[0].shape == (0, 2)
  assert _select(embeddings, scores, 0, 0.5)[0].shape == (2, 0)

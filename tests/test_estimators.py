"""Tests for estimators/: the streaming, exact, count-min and decayed-count layers."""

import numpy as np
import pytest
import tensorflow as tf

import estimators
from estimators import hashing
from estimators import simulation

ALPHA = 0.1


def _zipf_stream(num_items, batch_size, num_steps, seed, exponent=1.0):
  """A list of string batches drawn with replacement from a Zipf law (with repeats)."""
  rng = np.random.default_rng(seed)
  q = (np.arange(num_items) + 1.0) ** -exponent
  q /= q.sum()
  ids = np.array([f"item{i}" for i in range(num_items)])
  return [ids[rng.choice(num_items, batch_size, p=q)] for _ in range(num_steps)], ids


def _reference_update(state, batch, step, num_buckets, keys, alpha, initial_gap,
                      origin):
  """Plain-Python Algorithm 2 with bucket-level dedupe and multiplicity counting."""
  buckets = hashing.bucketize(tf.constant(batch), num_buckets, keys).numpy()
  for row in range(len(keys)):
    counts = {}
    for bucket in buckets[row]:
      counts[bucket] = counts.get(bucket, 0) + 1
    for bucket, c in counts.items():
      last, gap = state.get((row, bucket), (None, initial_gap))
      elapsed = step - (origin if last is None else last)
      keep = (1.0 - alpha) ** c
      state[(row, bucket)] = (step, keep * gap + (1.0 - keep) * elapsed / c)


def _reference_estimate(state, ids, num_buckets, keys, initial_gap):
  buckets = hashing.bucketize(tf.constant(ids), num_buckets, keys).numpy()
  gaps = [[state.get((row, b), (None, initial_gap))[1] for b in buckets[row]]
          for row in range(len(keys))]
  return 1.0 / np.max(np.array(gaps), axis=0)


@pytest.mark.parametrize("init", ["paper", "first_gap", "prior"])
@pytest.mark.parametrize("count_multiplicity", [False, True])
def test_without_collisions_streaming_equals_exact_oracle(init, count_multiplicity):
  batches, ids = _zipf_stream(60, 32, 80, seed=1)
  kwargs = dict(alpha=ALPHA, init=init, count_multiplicity=count_multiplicity,
                max_probability=1e3)
  hashed = estimators.StreamingFrequencyEstimator(
      num_buckets=1 << 16, num_hashes=2, **kwargs)
  buckets = hashed.buckets(tf.constant(ids)).numpy()
  assert all(len(set(row)) == len(ids) for row in buckets), "ids collide"
  oracle = estimators.ExactFrequencyEstimator(method="gap", **kwargs)
  for step, batch in enumerate(batches, start=5):
    np.testing.assert_array_equal(hashed(batch, step).numpy(),
                                  oracle(batch, step).numpy())
    np.testing.assert_array_equal(hashed.estimate(ids).numpy(),
                                  oracle.estimate(ids).numpy())


def test_duplicates_and_in_batch_collisions_match_reference():
  # H = 16 forces distinct items of a batch into shared buckets.
  batches, ids = _zipf_stream(40, 24, 30, seed=2)
  layer = estimators.StreamingFrequencyEstimator(
      num_buckets=16, num_hashes=3, alpha=ALPHA, count_multiplicity=True,
      max_probability=1e3, hash_seed=7)
  keys = hashing.hash_keys(7, 3)
  state = {}
  for step, batch in enumerate(batches):
    p = layer(batch, step).numpy()
    _reference_update(state, batch, step, 16, keys, ALPHA, 100.0, origin=-1)
    np.testing.assert_allclose(p, _reference_estimate(state, batch, 16, keys, 100.0),
                               rtol=1e-5)
  np.testing.assert_allclose(layer.estimate(ids).numpy(),
                             _reference_estimate(state, ids, 16, keys, 100.0),
                             rtol=1e-5)


def test_duplicates_update_once_per_step_without_multiplicity():
  once = estimators.StreamingFrequencyEstimator(num_buckets=64, num_hashes=2,
                                                alpha=0.5)
  repeated = estimators.StreamingFrequencyEstimator(num_buckets=64, num_hashes=2,
                                                    alpha=0.5)
  for step in (0, 3, 4):
    once(["a", "b"], step)
    p = repeated(["a", "a", "b", "a", "a"], step).numpy()
    assert p[0] == p[1] == p[3] == p[4]
  np.testing.assert_array_equal(once.gap.numpy(), repeated.gap.numpy())
  # Algorithm 2 by hand: B = 100, then gaps 1 (from the origin), 3, 1.
  expected = ((100 * 0.5 + 0.5 * 1) * 0.5 + 0.5 * 3) * 0.5 + 0.5 * 1
  np.testing.assert_allclose(once.estimate(["a"]).numpy(), [1 / expected],
                             rtol=1e-6)


def test_second_call_in_same_step_does_not_shrink_gap():
  layer = estimators.StreamingFrequencyEstimator(num_buckets=64, num_hashes=1,
                                                 alpha=0.5)
  layer(["a"], 0)
  layer(["a"], 4)
  before = layer.estimate(["a"]).numpy()
  np.testing.assert_array_equal(layer(["a"], 4).numpy(), before)
  with pytest.raises(tf.errors.InvalidArgumentError, match="must not decrease"):
    layer(["a"], 3)


def test_multiplicity_estimates_expected_count_instead_of_saturating():
  kwargs = dict(num_buckets=256, num_hashes=2, alpha=0.1, max_probability=100.0)
  paper = estimators.StreamingFrequencyEstimator(**kwargs)
  counted = estimators.StreamingFrequencyEstimator(count_multiplicity=True, **kwargs)
  counter = estimators.ExactFrequencyEstimator(
      method="count", count_multiplicity=True, max_probability=100.0)
  batch = ["hot"] * 4 + ["warm"] * 2 + ["cold"]
  for step in range(200):
    items = batch if step % 2 == 0 else ["hot"] * 4
    for layer in (paper, counted, counter):
      layer(items, step)
  ids = ["hot", "warm", "cold"]
  # hot: 4 per batch; warm: 2 every other batch; cold: 1 every other batch.
  np.testing.assert_allclose(counted.estimate(ids).numpy(), [4.0, 1.0, 0.5],
                             rtol=0.02)
  np.testing.assert_allclose(counter.estimate(ids).numpy(), [4.0, 1.0, 0.5],
                             rtol=0.02)
  np.testing.assert_allclose(paper.estimate(ids).numpy(), [1.0, 0.5, 0.5],
                             rtol=0.02)


def test_collisions_only_overestimate():
  batches, ids = _zipf_stream(200, 32, 150, seed=3)
  sketch = estimators.CountMinFrequencyEstimator(num_buckets=30, num_hashes=2)
  counter = estimators.ExactFrequencyEstimator(method="count")
  hashed = estimators.StreamingFrequencyEstimator(num_buckets=30, num_hashes=2,
                                                  alpha=ALPHA)
  oracle = estimators.ExactFrequencyEstimator(method="gap", alpha=ALPHA)
  hashed_sum = np.zeros(len(ids))
  oracle_sum = np.zeros(len(ids))
  for step, batch in enumerate(batches):
    for layer in (sketch, counter, hashed, oracle):
      layer(batch, step)
    # A count-min sketch never under-counts, at any step.
    assert np.all(sketch.estimate(ids).numpy() >= counter.estimate(ids).numpy())
    hashed_sum += hashed.estimate(ids).numpy()
    oracle_sum += oracle.estimate(ids).numpy()
  # The streaming estimate can briefly dip below its oracle (a collider's long
  # gap lands after the item's last sighting) but over time it only gains.
  np.testing.assert_array_less(oracle_sum * (1 - 1e-6), hashed_sum)
  assert np.mean(hashed_sum > oracle_sum * 1.01) > 0.5


def test_more_hashes_at_equal_memory_lower_error():
  stream = simulation.Stream(num_items=300, batch_size=64, num_steps=1000,
                             switch_step=None, power=2.0)

  def make(seed):
    return [estimators.StreamingFrequencyEstimator(
        num_buckets=600 // m, num_hashes=m, alpha=0.05, hash_seed=seed)
            for m in (1, 4)]

  errors = simulation.run_seeds(stream, make, seeds=[0, 1], eval_every=50)
  one_hash, four_hashes = errors[:, :, -10:].mean(axis=2).T
  assert np.all(four_hashes < one_hash), (one_hash, four_hashes)


def _exact_decayed_counts(batches, ids, decay, multiplicity):
  """Per-id decayed average count per batch after each step (numpy reference)."""
  index = {item: i for i, item in enumerate(ids)}
  counts = np.zeros(len(ids))
  weight = 0.0
  history = []
  for batch in batches:
    counts *= 1.0 - decay
    weight = weight * (1.0 - decay) + 1.0
    for item in (batch if multiplicity else set(batch)):
      counts[index[item]] += 1.0
    history.append(counts / weight)
  return history


@pytest.mark.parametrize("conservative", [False, True])
@pytest.mark.parametrize("multiplicity", [False, True])
def test_decayed_count_equals_reference_without_collisions(conservative,
                                                           multiplicity):
  batches, ids = _zipf_stream(50, 16, 60, seed=6)
  layer = estimators.DecayedCountFrequencyEstimator(
      num_buckets=1 << 16, num_hashes=2, decay=0.05, conservative=conservative,
      count_multiplicity=multiplicity, min_probability=1e-12,
      max_probability=100.0)
  expected = _exact_decayed_counts(batches, ids, 0.05, multiplicity)
  for step, batch in enumerate(batches, start=100):
    layer(batch, step)
    np.testing.assert_allclose(layer.estimate(ids).numpy(), expected[step - 100],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("conservative", [False, True])
def test_decayed_count_never_underestimates_with_collisions(conservative):
  batches, ids = _zipf_stream(200, 32, 100, seed=7)
  layer = estimators.DecayedCountFrequencyEstimator(
      num_buckets=30, num_hashes=3, decay=0.02, conservative=conservative,
      count_multiplicity=True, min_probability=1e-12, max_probability=100.0)
  expected = _exact_decayed_counts(batches, ids, 0.02, multiplicity=True)
  excess = 0.0
  for step, batch in enumerate(batches):
    layer(batch, step)
    p = layer.estimate(ids).numpy()
    assert np.all(p >= expected[step] * (1 - 1e-5) - 1e-7)
    excess += np.sum(p - expected[step])
  assert excess > 0


def test_conservative_update_lowers_error_at_equal_memory():
  stream = simulation.Stream(num_items=300, batch_size=64, num_steps=800,
                             switch_step=None, power=2.0)

  def make(seed):
    return [estimators.DecayedCountFrequencyEstimator(
        num_buckets=150, num_hashes=4, decay=0.005, conservative=conservative,
        hash_seed=seed) for conservative in (False, True)]

  errors = simulation.run_seeds(stream, make, seeds=[0, 1], eval_every=50)
  plain, conservative = errors[:, :, -4:].mean(axis=2).T
  assert np.all(conservative < plain), (plain, conservative)


def test_unseen_items_and_clipping():
  layer = estimators.StreamingFrequencyEstimator(num_buckets=64, num_hashes=2,
                                                 initial_gap=50.0)
  np.testing.assert_allclose(layer.estimate(["never"]).numpy(), [0.02])
  for step in range(30):
    p = layer(["x", "x"], step).numpy()
    assert np.all((p > 0) & (p <= 1.0))
  sketch = estimators.CountMinFrequencyEstimator(num_buckets=64, num_hashes=2,
                                                 min_probability=1e-4)
  np.testing.assert_allclose(sketch.estimate(["never"]).numpy(), [1e-4])
  p = sketch([["a", "b"], ["a", "c"]], 0)
  assert p.shape == (2, 2)
  np.testing.assert_allclose(p.numpy(), [[1.0, 1.0], [1.0, 1.0]])


@pytest.mark.parametrize("init,expected_gap", [
    ("paper", 0.9 * 100 + 0.1 * 11),
    ("first_gap", 11.0),
    ("prior", 100.0),
])
def test_first_sighting_initialisation(init, expected_gap):
  layer = estimators.StreamingFrequencyEstimator(num_buckets=64, num_hashes=1,
                                                 alpha=0.1, init=init)
  layer(["a"], 10)  # origin is step 9
  layer(["b"], 20)
  np.testing.assert_allclose(layer.estimate(["b"]).numpy(), [1 / expected_gap],
                             rtol=1e-6)


def test_staleness_lowers_estimate_of_items_gone_quiet():
  layer = estimators.StreamingFrequencyEstimator(num_buckets=64, num_hashes=1,
                                                 alpha=0.5, staleness=0.5)
  for step in range(40):
    layer(["a", "b"] if step < 20 else ["b"], step)
  np.testing.assert_allclose(layer.estimate(["a", "b"]).numpy(),
                             [1 / (0.5 * (39 - 19)), 1.0], rtol=1e-5)


def _feed(layer, batches):
  return [layer(batch, step).numpy() for step, batch in enumerate(batches)]


@pytest.mark.parametrize("kind,kwargs", [
    ("streaming", dict(num_buckets=128, num_hashes=3, alpha=ALPHA)),
    ("exact", dict(method="gap", alpha=ALPHA)),
    ("exact", dict(method="count")),
    ("count_min", dict(num_buckets=128, num_hashes=3)),
    ("decayed_count", dict(num_buckets=128, num_hashes=3, decay=0.01)),
])
def test_checkpoint_round_trip(tmp_path, kind, kwargs):
  batches, ids = _zipf_stream(100, 16, 40, seed=4)
  original = estimators.make_estimator(kind, **kwargs)
  _feed(original, batches[:20])
  path = tf.train.Checkpoint(estimator=original).write(str(tmp_path / "ckpt"))
  restored = estimators.make_estimator(kind, **kwargs)
  tf.train.Checkpoint(estimator=restored).read(path).assert_consumed()
  np.testing.assert_array_equal(restored.estimate(ids).numpy(),
                                original.estimate(ids).numpy())
  for step, batch in enumerate(batches[20:], start=20):
    np.testing.assert_array_equal(restored(batch, step).numpy(),
                                  original(batch, step).numpy())


@pytest.mark.parametrize("kind,kwargs", [
    ("streaming", dict(num_buckets=128, num_hashes=3, alpha=ALPHA,
                       count_multiplicity=True, staleness=0.3)),
    ("exact", dict(method="gap", alpha=ALPHA)),
    ("count_min", dict(num_buckets=128, num_hashes=3)),
    ("decayed_count", dict(num_buckets=128, num_hashes=3, decay=0.01,
                           count_multiplicity=True)),
])
def test_tf_function_matches_eager(kind, kwargs):
  batches, ids = _zipf_stream(100, 16, 30, seed=5)
  eager = estimators.make_estimator(kind, **kwargs)
  graph = estimators.make_estimator(kind, **kwargs)
  update = tf.function(lambda ids, step: graph(ids, step))
  estimate = tf.function(graph.estimate)
  # Graph optimisations may round tf.pow differently (1 ulp), hence rtol.
  for step, batch in enumerate(batches):
    np.testing.assert_allclose(
        update(tf.constant(batch), tf.constant(step, tf.int64)).numpy(),
        eager(batch, step).numpy(), rtol=1e-6)
  np.testing.assert_allclose(estimate(tf.constant(ids)).numpy(),
                             eager.estimate(ids).numpy(), rtol=1e-6)


def test_saved_model_serves_estimates(tmp_path):
  layer = estimators.StreamingFrequencyEstimator(num_buckets=128, num_hashes=2)
  module = tf.Module()
  module.estimator = layer
  module.update = tf.function(
      lambda ids, step: layer(ids, step),
      input_signature=[tf.TensorSpec([None], tf.string),
                       tf.TensorSpec([], tf.int64)])
  module.estimate = tf.function(
      layer.estimate, input_signature=[tf.TensorSpec([None], tf.string)])
  for step in range(5):
    module.update(tf.constant(["a", "b", "a"]), tf.constant(step, tf.int64))
  tf.saved_model.save(module, str(tmp_path / "sm"))
  loaded = tf.saved_model.load(str(tmp_path / "sm"))
  ids = tf.constant(["a", "b", "zzz"])
  np.testing.assert_array_equal(loaded.estimate(ids).numpy(),
                                layer.estimate(ids).numpy())
  np.testing.assert_array_equal(loaded.update(ids, tf.constant(9, tf.int64)).numpy(),
                                layer(ids, 9).numpy())


def test_stats_and_config():
  layer = estimators.make_estimator("streaming", num_buckets=100, num_hashes=2,
                                    alpha=0.2, init="first_gap")
  layer(["a", "b"], 3)
  stats = {k: v.numpy() for k, v in layer.stats().items()}
  assert stats["last_step"] == 3 and stats["steps_seen"] == 1
  assert stats["mean_gap"] == 1.0
  # 'a' and 'b' may share a bucket: 3 or 4 of 200 cells. Compared as counts, not
  # float32 == float64 (True under NumPy 2's scalar rules, False under NumPy 1's).
  occupied = float(stats["occupancy"]) * 200
  assert any(occupied == pytest.approx(cells, abs=1e-4) for cells in (3, 4)), occupied
  assert layer.memory_bytes == 2 * 100 * 12


@pytest.mark.parametrize("kind,kwargs,bucket_bytes", [
    ("streaming", dict(num_buckets=100, num_hashes=2, alpha=0.2, init="first_gap",
                       count_multiplicity=True, staleness=0.5, hash_seed=3), 12),
    ("exact", dict(method="gap", alpha=0.2, init="prior", staleness=0.5), None),
    ("count_min", dict(num_buckets=100, num_hashes=2, hash_seed=3), 8),
    ("decayed_count", dict(num_buckets=100, num_hashes=2, decay=0.1,
                           conservative=False, hash_seed=3), 12),
])
def test_config_holds_every_argument(kind, kwargs, bucket_bytes):
  layer = estimators.make_estimator(kind, max_probability=5.0, name="f", **kwargs)
  config = layer.get_config()
  assert {**kwargs, "max_probability": 5.0, "name": "f"}.items() <= config.items()
  clone = estimators.ESTIMATORS[kind].from_config(config)
  assert clone.get_config() == config
  if bucket_bytes is not None:
    assert layer.memory_bytes == 2 * 100 * bucket_bytes


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="Unknown estimator kind"):
    estimators.make_estimator("bloom")
  with pytest.raises(ValueError, match="alpha"):
    estimators.StreamingFrequencyEstimator(num_buckets=8, alpha=0.0)
  with pytest.raises(ValueError, match="init"):
    estimators.StreamingFrequencyEstimator(num_buckets=8, init="zero")
  with pytest.raises(ValueError, match="method"):
    estimators.ExactFrequencyEstimator(method="exactly")
  with pytest.raises(ValueError, match="num_buckets"):
    estimators.DecayedCountFrequencyEstimator(num_buckets=0)
  with pytest.raises(ValueError, match="decay"):
    estimators.DecayedCountFrequencyEstimator(num_buckets=8, decay=1.0)
  # Options the "count" method could not honour are refused, not ignored.
  with pytest.raises(ValueError, match="apply to method 'gap' only"):
    estimators.ExactFrequencyEstimator(method="count", init="prior")
  with pytest.raises(ValueError, match="apply to method 'gap' only"):
    estimators.ExactFrequencyEstimator(staleness=0.5)
  # The exact "gap" method shares the streaming checks, staleness's included.
  with pytest.raises(ValueError, match="staleness"):
    estimators.ExactFrequencyEstimator(method="gap", staleness=-1.0)
  with pytest.raises(TypeError, match="integer"):
    estimators.CountMinFrequencyEstimator(num_buckets=8)(["a"], 1.0)


def test_each_kind_lists_the_arguments_it_takes():
  shared = {"count_multiplicity", "min_probability", "max_probability"}
  assert set(estimators.arguments("count_min")) == shared | {
      "num_buckets", "num_hashes", "hash_seed"}
  assert set(estimators.arguments("decayed_count")) == shared | {
      "num_buckets", "num_hashes", "hash_seed", "decay", "conservative"}
  assert {"alpha", "init", "initial_gap", "staleness"} <= set(
      estimators.arguments("streaming")) & set(estimators.arguments("exact"))
  estimators.check_options("streaming", {"init": "prior", "staleness": 0.1})
  with pytest.raises(ValueError, match=r"estimator 'decayed_count' does not take "
                     r"\['init', 'name'\]"):
    estimators.check_options("decayed_count",
                             {"init": "prior", "decay": 0.1, "name": "x"})
  with pytest.raises(ValueError, match="Unknown estimator kind"):
    estimators.arguments("bloom")

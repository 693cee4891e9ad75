"""Export contract: a trained model, exported, answers as TF Serving would ask.

Two worlds, neither relying on how well anything learned. In `trained`, the
real TwoTowerModel trains one day with the Trainer and is exported with its
trained position; both exports must return what the model itself ranks first
(computed here, tie-aware), and answer hostile requests. In `planted`, towers
with a planted ranking (serving_testlib.planted_towers: seed X ranks the items
from P(X) on, in a fixed order, with wide score gaps) are exported, and both
exports must return exactly that order.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from core import workdir as workdir_lib
from models import features
from models import memory
from models import trainer as trainer_lib
from models.retrieval import TwoTowerModel
from serving import corpus
from serving import exporter
from serving import servable
from serving import versions
from serving import warmup
import serving_testlib as tl

NUM_ITEMS = 80
K = 20
NUM_EVENTS = 1200  # 38 steps of 32; >= corpus.NUM_RECALL_QUERIES queries
ITEMS = [f"item{j:03d}" for j in range(NUM_ITEMS)]
_PERMUTATION = np.random.default_rng(7).permutation(NUM_ITEMS)
PLANTED = {ITEMS[j]: ITEMS[_PERMUTATION[j]] for j in range(NUM_ITEMS)}
# The planted order of seed X: the items of _PERMUTATION from P(X) on, cyclically.
PLANTED_ORDER = {ITEMS[j]: [ITEMS[_PERMUTATION[(j + r) % NUM_ITEMS]]
                            for r in range(NUM_ITEMS)] for j in range(NUM_ITEMS)}
SETTINGS = exporter.ExportSettings(export_k=K)
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _query(seeds, users=None, history=None, device="web", country="de", timestamp=0):
  size = len(seeds)
  return {
      "user_id": tf.constant(users if users is not None else ["u"] * size, tf.string),
      "seed_item_id": tf.constant(seeds, tf.string),
      "history_item_ids": (history if history is not None
                           else tf.zeros([size, 0], tf.string)),
      "device": tf.constant([device] * size, tf.string),
      "country": tf.constant([country] * size, tf.string),
      "timestamp": tf.constant([timestamp] * size, tf.int64),
  }


def _write_day(workdir, items=ITEMS, num_events=NUM_EVENTS):
  """Day DAY: events (a user on seed X watches P(X)) and the corpus `items`."""
  rng = np.random.default_rng(0)
  rows = []
  for n in range(num_events):
    seed = ITEMS[rng.integers(NUM_ITEMS)]
    rows.append(tl.event_row(f"e{n}", f"u{rng.integers(300)}", PLANTED[seed], seed=seed,
                             timestamp=1_709_600_000 + n))
  day_dir = tl.day_dir(workdir, tl.DAY)
  if rows:
    tl.write_records(os.path.join(day_dir, "examples-00.tfrecord.gz"), rows)
  tl.write_records(os.path.join(day_dir, "corpus-00.tfrecord.gz"),
                   [tl.corpus_row(i) for i in items])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """W with one day of events and its corpus, trained by the Trainer, one export."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  _write_day(workdir)
  trainer = trainer_lib.Trainer(workdir, tl.tiny_config())
  trainer.train_day(tl.DAY)
  model, config = trainer.model, trainer.config
  state = exporter.ExportState()
  result = exporter.export_day(model, config, workdir, tl.DAY, SETTINGS,
                               trained=trainer.trained_position(), state=state)
  return {"workdir": workdir, "model": model, "config": config, "result": result,
          "position": trainer.trained_position(), "global_step": trainer.global_step,
          "state": state, "scann": tf.saved_model.load(result["scann_dir"]),
          "exact": tf.saved_model.load(result["exact_dir"])}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  """W with DAY's corpus only, exported from towers whose ranking is planted."""
  workdir = str(tmp_path_factory.mktemp("planted"))
  _write_day(workdir, num_events=0)
  orders = [[ITEMS.index(i) for i in PLANTED_ORDER[x]] for x in ITEMS]
  towers = tl.planted_towers(ITEMS, orders)
  result = exporter.export_day(towers, tl.tiny_config(), workdir, tl.DAY, SETTINGS,
                               trained=tl.position(tl.DAY, 0, True))
  return {"result": result, "scann": tf.saved_model.load(result["scann_dir"]),
          "exact": tf.saved_model.load(result["exact_dir"])}


@pytest.mark.parametrize("variant", ["scann", "exact"])
def test_export_returns_the_planted_order(planted, variant):
  signatures = planted[variant].signatures
  out = signatures["serving_default"](**_query(ITEMS))
  want = [[i.encode() for i in PLANTED_ORDER[x][:K]] for x in ITEMS]
  assert out["item_ids"].numpy().tolist() == want
  assert np.all(np.diff(out["scores"].numpy(), axis=1) < 0)
  # Excluding each seed's planted first item moves the rest of its order up one.
  first = tf.constant([[PLANTED[x]] for x in ITEMS])
  out = signatures["retrieve"](**_query(ITEMS), k=tf.constant(K), exclude_item_ids=first)
  want = [[i.encode() for i in PLANTED_ORDER[x][1:K + 1]] for x in ITEMS]
  assert out["item_ids"].numpy().tolist() == want


def _diverse(signature, seeds, k, theta, boosts=(), exclude=None, count=None):
  """retrieve_diverse for `seeds`: k of `count` (default 2k), every row boosting
  the (item, boost) pairs `boosts`."""
  size = len(seeds)
  boosts = list(boosts) or [("", 0.0)]
  return signature(**_query(seeds), k=tf.constant(k),
                   num_candidates=tf.constant(count or 2 * k),
                   theta=tf.constant(theta, tf.float32),
                   exclude_item_ids=(exclude if exclude is not None
                                     else tf.zeros([size, 0], tf.string)),
                   boost_item_ids=tf.reshape(tf.constant(
                       [i for i, _ in boosts] * size, tf.string), [size, len(boosts)]),
                   boosts=tf.reshape(tf.constant([b for _, b in boosts] * size, tf.float32),
                                     [size, len(boosts)]))


@pytest.mark.parametrize("variant", ["scann", "exact"])
def test_retrieve_diverse_boosts_and_theta_on_the_planted_order(planted, variant):
  """Planted items embed one-hot, all orthogonal: S = I, so every theta keeps the
  relevance order (at theta = 0 as the tie rule: the retriever's order), and a
  boost moves an item as documented: raised, it comes first; lowered, it goes."""
  diverse = planted[variant].signatures["retrieve_diverse"]
  seed = ITEMS[5]
  order = [i.encode() for i in PLANTED_ORDER[seed]]
  for theta in (0.0, 0.5, 1.0):
    out = _diverse(diverse, [seed], 5, theta)
    assert out["item_ids"].numpy()[0].tolist() == order[:5], theta
    assert np.all(np.diff(out["scores"].numpy()) < 0)
  raised = _diverse(diverse, [seed], 5, 0.5, boosts=[(PLANTED_ORDER[seed][8], 1.0)])
  assert raised["item_ids"].numpy()[0].tolist() == [order[8]] + order[:4]
  # Its score is the model's, not boosted: below the others.
  assert raised["scores"].numpy()[0, 0] < raised["scores"].numpy()[0, 1:].min()
  lowered = _diverse(diverse, [seed], 5, 0.5, boosts=[(PLANTED_ORDER[seed][0], -1.0),
                                                        ("not-in-the-corpus", 5.0)])
  assert lowered["item_ids"].numpy()[0].tolist() == order[1:6]
  # At theta = 0 boosts change nothing; exclusions apply before the DPP.
  ignored = _diverse(diverse, [seed], 5, 0.0, boosts=[(PLANTED_ORDER[seed][8], 1.0)],
                     exclude=tf.constant([[PLANTED_ORDER[seed][1]]]))
  assert ignored["item_ids"].numpy()[0].tolist() == [order[0]] + order[2:6]


def _model_scores(trained, seeds):
  """[len(seeds), NUM_ITEMS] scores of the trained model itself (its pair memory's
  bonus included), and the corpus ids."""
  ids, columns = corpus.read_corpus(
      os.path.join(tl.day_dir(trained["workdir"], tl.DAY), corpus.CORPUS_PATTERN))
  model = trained["model"]
  request = _query(seeds)
  queries = model.query_tower(request, training=False)
  items = model.candidate_tower({k: tf.constant(v) for k, v in columns.items()},
                                training=False)
  scores = tf.linalg.matmul(queries, items, transpose_b=True) / trained["config"].temperature
  if model.memory is not None:
    history = request["history_item_ids"]
    scores += model.memory(memory.anchor_ids(request["seed_item_id"], history),
                           tf.constant(ids), history)
  return scores.numpy(), ids


@pytest.mark.parametrize("variant", ["scann", "exact"])
def test_export_returns_what_the_model_ranks_first(trained, variant):
  """The export's top K is the model's own top K, tie-aware: right scores, right ids."""
  out = trained[variant].signatures["serving_default"](**_query(ITEMS))
  ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
  assert ids.shape == scores.shape == (NUM_ITEMS, K)
  model_scores, corpus_ids = _model_scores(trained, ITEMS)
  column = {item: j for j, item in enumerate(corpus_ids.tolist())}
  best = -np.sort(-model_scores, axis=1)[:, :K]
  np.testing.assert_allclose(scores, best, rtol=1e-4, atol=1e-4)
  own = np.array([[model_scores[b, column[i]] for i in row] for b, row in
                  enumerate(ids.tolist())])
  np.testing.assert_allclose(own, scores, rtol=1e-4, atol=1e-4)
  assert all(len(set(row)) == K for row in ids.tolist())
  assert np.all(np.diff(scores, axis=1) <= 1e-5)


def test_layout_metadata_and_warmup(trained):
  result, config = trained["result"], trained["config"]
  assert result["version"] == 1
  for name, path in (("retrieval_scann", result["scann_dir"]),
                     ("retrieval_exact", result["exact_dir"])):
    assert path == os.path.join(trained["workdir"], "exports", name, "1")
    assert {"saved_model.pb", "variables", "assets.extra"} <= set(os.listdir(path))
    meta = versions.read_metadata(path)
    assert meta["model"] == name and meta["version"] == 1
    assert meta["config"] == config.to_dict()
    assert meta["corpus"]["size"] == NUM_ITEMS and meta["corpus"]["embedding_dim"] == 16
    assert meta["data_range"] == {"first_day": tl.DAY.isoformat(),
                                  "last_day": tl.DAY.isoformat(), "num_days": 1}
    assert meta["ann"]["recall_at_10"] >= 0.95
    assert meta["ann"]["num_queries"] == 1000
    assert meta["stack"]["tensorflow"] == tf.__version__
    assert meta["k"] == K
    assert "retrieve_diverse" in meta["signatures"] and meta["dpp_epsilon"] > 0
    assert meta["trained"] == {"day": tl.DAY.isoformat(), "examples": NUM_EVENTS,
                               "complete": True, "global_step": trained["global_step"],
                               "checkpoint": trained["position"].checkpoint}
    assert trained["position"].checkpoint.startswith(
        os.path.join(trained["workdir"], "checkpoints", "ckpt-"))
    logs = warmup.read_warmup(os.path.join(path, "assets.extra", warmup.WARMUP_FILE))
    assert {log.predict_log.request.model_spec.name for log in logs} == {name}
    for log, out in zip(logs, warmup.replay(trained[name.split("_")[1]], logs)):
      batch = tf.make_ndarray(log.predict_log.request.inputs["user_id"]).shape[0]
      assert next(iter(out.values())).shape[0] == batch
  assert versions.read_metadata(result["exact_dir"])["needs_scann_ops"] is False


def _ops(export_dir):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  graph = proto.meta_graphs[0].graph_def
  return ({node.op for node in graph.node} |
          {node.op for fn in graph.library.function for node in fn.node_def})


def test_only_the_scann_export_needs_custom_ops(trained):
  exact_ops = _ops(trained["result"]["exact_dir"])
  assert {"MatMul", "TopKV2", "StringToHashBucketFast"} <= exact_ops
  assert not [op for op in exact_ops if ">" in op]  # no namespaced (custom) op
  custom = {op for op in _ops(trained["result"]["scann_dir"]) if ">" in op}
  assert custom == {"Scann>TensorsToScann", "Scann>ScannSearchBatched"}


def test_item_embeddings_are_exposed_and_match_the_candidate_tower(trained):
  # Each export holds the corpus embeddings once: the exact search scores them,
  # and ScaNN reorders its candidates with them.
  for variant in ("scann", "exact"):
    saved = tf.train.list_variables(os.path.join(trained["result"][f"{variant}_dir"],
                                                 "variables", "variables"))
    assert [name for name, shape in saved if shape == [NUM_ITEMS, 16]] == [
        "item_embeddings/.ATTRIBUTES/VARIABLE_VALUE"], variant
  for variant in ("scann", "exact"):
    loaded = trained[variant]
    ids = loaded.item_ids.numpy()
    assert sorted(ids.tolist()) == [i.encode() for i in ITEMS]
    corpus = {"item_id": tf.constant(ids),
              "item_channel_id": tf.constant([f"channel-{i.decode()[-1]}" for i in ids]),
              "item_topics": tf.constant([["t"]] * len(ids)),
              "item_topic_weights": tf.ones([len(ids), 1]),
              "item_duration_s": tf.fill([len(ids)], 60.0)}
    embedded = loaded.signatures["candidate_embedding"](**corpus)["candidate_embedding"]
    np.testing.assert_allclose(embedded.numpy(), loaded.item_embeddings.numpy(), atol=1e-5)
    query = loaded.signatures["query_embedding"](**_query(ITEMS[:3]))["query_embedding"]
    # serving_default scores are <u, v> / temperature against those embeddings,
    # plus the pair memory's bonus of (the query's seed, the item).
    request = _query(ITEMS[:3])
    out = loaded.signatures["serving_default"](**request)
    top = out["item_ids"].numpy()[:, 0]
    best = tf.gather(loaded.item_embeddings, [ids.tolist().index(i) for i in top])
    expected = tf.reduce_sum(query * best, axis=1) / trained["config"].temperature
    history = request["history_item_ids"]
    expected += tf.linalg.diag_part(trained["model"].memory(
        memory.anchor_ids(request["seed_item_id"], history), tf.constant(top), history))
    np.testing.assert_allclose(out["scores"].numpy()[:, 0], expected.numpy(), rtol=1e-4)


_FRESH_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf
exact_dir, scann_dir = sys.argv[1:3]
request = dict(user_id=tf.constant(["u"]), seed_item_id=tf.constant(["item005"]),
               history_item_ids=tf.constant([[""]]), device=tf.constant(["web"]),
               country=tf.constant(["de"]), timestamp=tf.constant([0], tf.int64))
exact = tf.saved_model.load(exact_dir).signatures["serving_default"](**request)
try:
  tf.saved_model.load(scann_dir)
  error = None
except Exception as e:  # the documented failure without ScaNN's ops
  error = f"{type(e).__name__}: {e}"
ours = sorted(m for m in sys.modules if m.split(".")[0] in
              ("models", "serving", "pipeline", "estimators", "scann"))
import scann  # registers ScaNN's TF ops
scann_out = tf.saved_model.load(scann_dir).signatures["serving_default"](**request)
print(json.dumps({"exact": exact["item_ids"].numpy()[0].astype(str).tolist(),
                  "scann": scann_out["item_ids"].numpy()[0].astype(str).tolist(),
                  "error": error, "modules_before_scann": ours}))
"""


def test_fresh_stock_tensorflow_process(trained, tmp_path):
  result = trained["result"]
  script = tmp_path / "fresh.py"
  script.write_text(_FRESH_PROCESS)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, str(script), result["exact_dir"],
                         result["scann_dir"]], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  answer = json.loads(done.stdout.strip().splitlines()[-1])
  assert answer["modules_before_scann"] == []
  # The same answers as in this process (where they are the model's own ranking).
  request = _query(["item005"], history=tf.constant([[""]]))
  for variant in ("exact", "scann"):
    here = trained[variant].signatures["serving_default"](**request)["item_ids"]
    assert answer[variant] == here.numpy()[0].astype(str).tolist()
  assert answer["error"].startswith("RuntimeError")
  assert "Op type not registered 'Scann>TensorsToScann'" in answer["error"]


def test_saved_model_cli_show_and_run(trained):
  exact_dir = trained["result"]["exact_dir"]
  shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", exact_dir, "--tag_set", "serve",
                          "--signature_def", "serving_default"],
                         capture_output=True, text=True, timeout=300)
  assert shown.returncode == 0, shown.stderr[-3000:]
  for name in features.QUERY_FEATURES + ("item_ids", "scores"):
    assert f"['{name}']" in shown.stdout
  assert f"shape: (-1, {K})" in shown.stdout
  exprs = ("user_id=['u'];seed_item_id=['item005'];history_item_ids=[['']];"
           "device=['web'];country=['de'];timestamp=[0]")
  ran = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", exact_dir, "--tag_set", "serve",
                        "--signature_def", "serving_default", "--input_exprs", exprs],
                       capture_output=True, text=True, timeout=300)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert "Result for output key item_ids" in ran.stdout
  assert "Result for output key scores" in ran.stdout
  here = trained["exact"].signatures["serving_default"](**_query(["item005"]))
  assert repr(here["item_ids"].numpy()[0, 0]) in ran.stdout


def _assert_valid(out, batch, k=K):
  ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
  assert ids.shape == scores.shape == (batch, k)
  assert set(ids.ravel().tolist()) <= {i.encode() for i in ITEMS}
  assert np.isfinite(scores).all()


@pytest.mark.parametrize("variant", ["scann", "exact"])
def test_hostile_requests(trained, variant):
  serve = trained[variant].signatures["serving_default"]
  unseen = _query(["never-seen"], users=["new-user"], device="fridge", country="xx",
                  history=tf.constant([["unknown-1", "unknown-2"]]))
  _assert_valid(serve(**unseen), 1)
  _assert_valid(serve(**_query(["item001"])), 1)  # empty history: width 0
  padding = _query([""], users=[""], device="", country="",
                   history=tf.constant([[""] * 7]))
  _assert_valid(serve(**padding), 1)
  huge = "\u00e9" * 5120  # 10 KB of UTF-8 in every string
  _assert_valid(serve(**_query([huge], users=[huge], device=huge, country=huge,
                               history=tf.constant([[huge] * 3]),
                               timestamp=-(2 ** 62))), 1)
  wide = tf.constant([[f"item{j % NUM_ITEMS:03d}" for j in range(500)]] * 2)
  _assert_valid(serve(**_query(["item001", "item002"], history=wide)), 2)
  seeds = [ITEMS[j % NUM_ITEMS] for j in range(1000)]
  _assert_valid(serve(**_query(seeds, history=tf.fill([1000, 3], "item001"))), 1000)
  empty = serve(**_query([], history=tf.zeros([0, 2], tf.string)))
  assert empty["item_ids"].shape == (0, K)

  mismatched = _query(["item001", "item002"])
  mismatched["device"] = tf.constant(["web"])
  with pytest.raises(tf.errors.InvalidArgumentError, match="disagree on the batch size"):
    serve(**mismatched)
  retrieve = trained[variant].signatures["retrieve"]
  request = _query(["item001"])
  none = tf.zeros([1, 0], tf.string)
  with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 1"):
    retrieve(**request, k=tf.constant(0), exclude_item_ids=none)
  with pytest.raises(tf.errors.InvalidArgumentError, match="k must be <= max_k"):
    retrieve(**request, k=tf.constant(10 ** 6), exclude_item_ids=none)
  with pytest.raises(tf.errors.InvalidArgumentError, match="one row per query"):
    retrieve(**request, k=tf.constant(3), exclude_item_ids=tf.zeros([2, 1], tf.string))

  diverse = trained[variant].signatures["retrieve_diverse"]
  max_k = versions.read_metadata(trained["result"][f"{variant}_dir"])["max_k"]
  out = _diverse(diverse, ["never-seen", "item001"], 4, 0.5, count=max_k,
                 boosts=[("item002", 1e30), ("item003", -1e30), ("item002", 7.0)])
  _assert_valid(out, 2, k=4)
  empty = _diverse(diverse, [], 3, 0.5)
  assert empty["item_ids"].shape == (0, 3)
  unboosted = diverse(**_query(["item001"]), k=tf.constant(3), num_candidates=tf.constant(6),
                      theta=tf.constant(0.5), exclude_item_ids=tf.zeros([1, 0], tf.string),
                      boost_item_ids=tf.zeros([1, 0], tf.string), boosts=tf.zeros([1, 0]))
  _assert_valid(unboosted, 1, k=3)
  refusals = {
      "k must be >= 1": dict(k=0),
      "k must be <= num_candidates": dict(k=5, count=4),
      "num_candidates must be <= max_k": dict(k=5, count=max_k + 1),
      "theta must be in \\[0, 1\\]": dict(theta=1.5),
  }
  for message, arguments in refusals.items():
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      _diverse(diverse, ["item001"], **{"k": 3, "theta": 0.5, **arguments})
  for theta in (-0.1, float("nan")):
    with pytest.raises(tf.errors.InvalidArgumentError, match="theta must be in"):
      _diverse(diverse, ["item001"], 3, theta)
  for boost in (float("inf"), float("nan")):
    with pytest.raises(tf.errors.InvalidArgumentError, match="boosts must be finite"):
      _diverse(diverse, ["item001"], 3, 0.5, boosts=[("item002", boost)])
  base = dict(**_query(["item001"]), k=tf.constant(3), num_candidates=tf.constant(6),
              theta=tf.constant(0.5), exclude_item_ids=tf.zeros([1, 0], tf.string))
  with pytest.raises(tf.errors.InvalidArgumentError, match="boosts must have the shape"):
    diverse(**base, boost_item_ids=tf.constant([["a", "b"]]), boosts=tf.ones([1, 1]))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="boost_item_ids must have one row per query"):
    diverse(**base, boost_item_ids=tf.constant([["a"], ["b"]]), boosts=tf.ones([2, 1]))


@pytest.fixture
def copied(trained, tmp_path):
  """A copy of the trained workdir without its exports: data, config, checkpoints."""
  source, workdir = (workdir_lib.Workdir(w) for w in (trained["workdir"],
                                                       str(tmp_path / "w")))
  shutil.copytree(source.data_root, workdir.data_root)
  shutil.copytree(source.checkpoints_dir, workdir.checkpoints_dir)
  shutil.copy(source.config_path, workdir.config_path)
  return workdir.root


def _bases(workdir):
  return [workdir_lib.Workdir(workdir).exports_base(name)
          for name in (versions.SCANN_MODEL, versions.EXACT_MODEL)]


def test_versions_grow_never_go_backwards_and_a_failed_export_publishes_nothing(
    trained, copied):
  workdir, model, config = copied, trained["model"], trained["config"]
  bases = _bases(workdir)
  stale = versions.staging_dir(bases[0], 2)
  os.makedirs(stale)  # as left by a crash in the middle of writing
  with pytest.raises(ValueError, match="min_ann_recall"):
    exporter.export_day(model, config, workdir, tl.DAY,
                        exporter.ExportSettings(export_k=K, min_ann_recall=1.5),
                        trained=trained["position"])
  assert [versions.list_versions(b) for b in bases] == [[], []]
  # W/exports was lost, but the caller's high-water mark says 6 was published.
  # No `trained`: the position is read from the latest checkpoint.
  first = exporter.export_day(model, config, workdir, tl.DAY, SETTINGS, min_version=7)
  assert first["version"] == 7
  position = trainer_lib.checkpoint_position(workdir)
  assert first["metadata"]["trained"] == position.to_json()
  assert position.checkpoint.startswith(os.path.join(workdir, "checkpoints", "ckpt-"))
  second = exporter.export_day(model, config, workdir, tl.DAY, SETTINGS, min_version=3,
                               trained=trained["position"])
  assert second["version"] == 8
  assert [versions.list_versions(b) for b in bases] == [[7, 8], [7, 8]]
  assert not os.path.exists(stale)
  assert sorted(os.listdir(bases[0])) == ["7", "8"]


def test_the_caller_keeps_the_newest_exports_loaded_and_the_towers_traced(
    trained, copied):
  """ExportState: the versions just published stay loaded (at most two), and a
  second export of the same model traces no tower again."""
  model, config, state = trained["model"], trained["config"], trained["state"]
  traced = {name: state.embedder.function(tower).experimental_get_tracing_count()
            for name, tower in (("query", model.query_tower),
                                ("candidate", model.candidate_tower))}
  assert min(traced.values()) >= 1  # traced by the fixture's export, through the state
  result = exporter.export_day(model, config, copied, tl.DAY, SETTINGS,
                               trained=trained["position"], state=state)
  assert {name: state.embedder.function(tower).experimental_get_tracing_count()
          for name, tower in (("query", model.query_tower),
                              ("candidate", model.candidate_tower))} == traced
  published = state.published
  newest = {name: published.load(result[f"{name}_dir"]) for name in ("scann", "exact")}
  assert published.load(result["exact_dir"]) is newest["exact"]
  np.testing.assert_array_equal(newest["exact"].item_ids.numpy(),
                                trained["exact"].item_ids.numpy())
  # Bounded: loading an older version evicts the least recently used one.
  older = published.load(trained["result"]["exact_dir"])
  assert published.load(trained["result"]["exact_dir"]) is older
  assert published.load(result["exact_dir"]) is newest["exact"]
  assert published.load(result["scann_dir"]) is not newest["scann"]
  # A fresh state loads from disk; the embedder keeps only its newest towers.
  assert exporter.LoadedExports().load(result["exact_dir"]) is not newest["exact"]
  embedder = exporter.Embedder(max_towers=1)
  first = embedder.function(model.query_tower)
  assert embedder.function(model.query_tower) is first
  embedder.function(model.candidate_tower)
  assert embedder.function(model.query_tower) is not first


def test_export_refuses_a_label_the_model_has_not_trained(trained, tmp_path):
  workdir, model, config = str(tmp_path), trained["model"], trained["config"]
  day_before = tl.DAY - datetime.timedelta(days=1)
  refusals = {
      (day_before, NUM_EVENTS, True): "has trained 1200 examples of 2024-03-04 "
                                      "\\(complete, global step 38\\)",
      (tl.DAY, 600, False): "has trained 600 examples of 2024-03-05 \\(incomplete, "
                            "global step 38\\)",
      (None, 0, False): "has not trained any day",
  }
  for position, reason in refusals.items():
    with pytest.raises(ValueError, match="refusing to label an export 2024-03-05: the "
                                         f"model given {reason}"):
      exporter.export_day(model, config, workdir, tl.DAY, SETTINGS,
                          trained=tl.position(*position, global_step=38))
  with pytest.raises(FileNotFoundError, match="checkpoints: no checkpoint"):
    exporter.export_day(model, config, workdir, tl.DAY, SETTINGS)
  with pytest.raises(ValueError, match="min_version must be >= 1"):
    exporter.export_day(model, config, workdir, tl.DAY, SETTINGS,
                        trained=trained["position"], min_version=0)
  exports = tmp_path / "exports"
  exports.write_text("a file where the exports should be")
  with pytest.raises(NotADirectoryError, match=f"{exports}: exists but is not a dir"):
    exporter.export_day(model, config, workdir, tl.DAY, SETTINGS,
                        trained=trained["position"])
  assert sorted(os.listdir(workdir)) == ["exports"]  # nothing else was written


def test_export_command_refuses_a_day_the_checkpoint_has_not_trained(trained):
  workdir = trained["workdir"]
  env = {**os.environ, "PYTHONPATH": REPO}
  done = subprocess.run(
      [sys.executable, "-m", "serving.export", f"--workdir={workdir}",
       "--date=2024-03-06"],
      env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  latest = tf.train.latest_checkpoint(workdir_lib.Workdir(workdir).checkpoints_dir)
  assert (f"error: refusing to label an export 2024-03-06: {latest} has trained "
          f"{NUM_EVENTS} examples of 2024-03-05 (complete, global step "
          f"{trained['global_step']})") in done.stderr
  assert [versions.list_versions(b) for b in _bases(workdir)] == [[1], [1]]


def test_scann_export_returns_k_real_items_up_to_max_k(trained, tmp_path):
  """1,100 items: ScaNN searches 10 of 33 leaves, ~330 items, yet max_k is 420."""
  workdir = str(tmp_path)
  big = [f"big{j:04d}" for j in range(1100)]
  _write_day(workdir, items=big, num_events=0)
  # min_ann_recall=0: keep the first ScaNN parameters, whatever their recall.
  result = exporter.export_day(trained["model"], trained["config"], workdir, tl.DAY,
                               exporter.ExportSettings(export_k=100, min_ann_recall=0.0),
                               trained=trained["position"])
  meta = result["metadata"]
  params = meta["ann"]["params"]
  assert (params["num_leaves"], params["num_leaves_to_search"]) == (33, 10)
  assert meta["max_k"] == params["num_reordering_candidates"] == 420
  assert meta["ann"]["leaves_searched"]["420"] > 10
  seeds = big[::17]
  retrieve = tf.saved_model.load(result["scann_dir"]).signatures["retrieve"]
  out = retrieve(**_query(seeds), k=tf.constant(meta["max_k"]),
                 exclude_item_ids=tf.zeros([len(seeds), 0], tf.string))
  ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
  assert ids.shape == (len(seeds), 420)
  assert (ids != b"").all() and np.isfinite(scores).all()
  assert all(len(set(row)) == 420 for row in ids.tolist())
  assert set(ids.ravel().tolist()) <= {i.encode() for i in big}


def test_bad_corpus_is_named(tmp_path):
  path = tl.write_records(str(tmp_path / "corpus-00.tfrecord.gz"),
                          [tl.corpus_row("a"), tl.corpus_row("b"), tl.corpus_row("a")])
  with pytest.raises(ValueError, match=r"corpus-00.tfrecord.gz: record 2: item_id b'a' "
                                       r"repeats .*record 0"):
    corpus.read_corpus(path)
  with open(tmp_path / "corpus-01.tfrecord.gz", "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(ValueError, match="corpus-01.tfrecord.gz: unreadable"):
    corpus.read_corpus(str(tmp_path / "corpus-01.tfrecord.gz"))
  with pytest.raises(FileNotFoundError, match="no corpus files"):
    corpus.read_corpus(str(tmp_path / "nothing-*.tfrecord.gz"))


# Loads each export given (in order, in this one fresh process) and prints, for
# each, every item `retrieve` and `retrieve_diverse` (theta = 1) return at k = max_k
# (from its metadata), its item_ids variable and its query embedding of the request.
_LOAD_EACH = r"""
import json, sys
import scann  # noqa: F401  (ScaNN's ops)
import tensorflow as tf
request = {name: tf.constant(value) for name, value in json.loads(sys.argv[1]).items()}
request["timestamp"] = tf.cast(request["timestamp"], tf.int64)
out = {}
for path, max_k in json.loads(sys.argv[2]):
  loaded = tf.saved_model.load(path)
  none = tf.zeros([len(request["user_id"]), 0], tf.string)
  answer = loaded.signatures["retrieve"](**request, k=tf.constant(max_k),
                                         exclude_item_ids=none)
  diverse = loaded.signatures["retrieve_diverse"](
      **request, k=tf.constant(max_k), num_candidates=tf.constant(max_k),
      theta=tf.constant(1.0), exclude_item_ids=none, boost_item_ids=none,
      boosts=tf.zeros([len(request["user_id"]), 0]))
  out[path] = {
      "retrieved": sorted({i.decode() for i in answer["item_ids"].numpy().ravel()}),
      "diverse": sorted({i.decode() for i in diverse["item_ids"].numpy().ravel()}),
      "item_ids": sorted(i.decode() for i in loaded.item_ids.numpy()),
      "query_embedding": loaded.signatures["query_embedding"](**request)[
          "query_embedding"].numpy().tolist()}
print(json.dumps(out))
"""


def test_consecutive_exports_reuse_the_traced_servables_and_hold_their_own_day(tmp_path):
  """Two days through one ExportState: day 2 assigns its corpus (one item more)
  and the towers' new weights to day 1's servables and traces nothing; loaded in
  a fresh process, each version serves its own day's corpus and towers."""
  workdir, config = str(tmp_path), tl.tiny_config()
  day2 = tl.DAY + datetime.timedelta(days=1)
  corpora = {tl.DAY: ITEMS, day2: ITEMS + ["brand-new"]}
  for day, items in corpora.items():
    tl.write_records(os.path.join(tl.day_dir(workdir, day), "corpus-00.tfrecord.gz"),
                     [tl.corpus_row(i) for i in items])
  model = TwoTowerModel(config)
  state = exporter.ExportState()
  request = {"user_id": ["u1", ""], "seed_item_id": ["item003", "item050"],
             "history_item_ids": [["item001", "item002"], ["", ""]],
             "device": ["web", ""], "country": ["de", "us"],
             "timestamp": [1_709_600_000, 0]}
  tensors = {name: tf.constant(value) for name, value in request.items()}
  tensors["timestamp"] = tf.cast(tensors["timestamp"], tf.int64)

  first = exporter.export_day(model, config, workdir, tl.DAY, SETTINGS,
                              trained=tl.position(tl.DAY, 0, True), state=state)
  held = {variant: state.published.load(first[f"{variant}_dir"])
          for variant in ("scann", "exact")}
  kept = dict(state.retrievers)
  traced = {(model_name, name): function.experimental_get_tracing_count()
            for model_name, retriever in kept.items()
            for name, function in retriever.functions.items()}
  signatures = {model_name: retriever.signatures()
                for model_name, retriever in kept.items()}
  queries = {tl.DAY: model.query_tower(tensors, training=False).numpy()}
  # Training moves the towers' weights between two exports.
  for variable in model.query_tower.trainable_variables:
    variable.assign(tf.random.stateless_normal(variable.shape, [1, 2]))
  queries[day2] = model.query_tower(tensors, training=False).numpy()
  assert not np.allclose(queries[tl.DAY], queries[day2], atol=1e-3)
  second = exporter.export_day(model, config, workdir, day2, SETTINGS,
                               trained=tl.position(day2, 0, True), state=state)

  assert (first["version"], second["version"]) == (1, 2)
  assert state.retrievers == kept  # the same objects, updated
  assert min(traced.values()) == 1
  assert {(model_name, name): function.experimental_get_tracing_count()
          for model_name, retriever in kept.items()
          for name, function in retriever.functions.items()} == traced
  for model_name, retriever in kept.items():
    for name, function in retriever.signatures().items():
      assert function is signatures[model_name][name], (model_name, name)
  # Day 2 wrote only the variables beside day 1's graph (saved_model.pb, byte for
  # byte), and its exact version took them into day 1's loaded SavedModel, verified
  # there instead of loaded again; ScaNN's must be loaded (its searcher is built
  # once per load). The old version's path no longer holds that object.
  for variant in ("scann", "exact"):
    graphs = [open(os.path.join(result[f"{variant}_dir"], "saved_model.pb"), "rb").read()
              for result in (first, second)]
    assert graphs[0] == graphs[1], variant
  assert state.published.load(second["exact_dir"]) is held["exact"]
  assert state.published.load(second["scann_dir"]) is not held["scann"]
  assert sorted(i.decode() for i in held["exact"].item_ids.numpy()) == sorted(corpora[day2])
  everything = held["exact"].signatures["retrieve"](
      **tensors, k=tf.constant(len(corpora[day2])),
      exclude_item_ids=tf.zeros([2, 0], tf.string))["item_ids"].numpy()
  assert all(sorted(i.decode() for i in row) == sorted(corpora[day2]) for row in everything)
  assert state.published.load(first["exact_dir"]) is not held["exact"]

  exports = [(result[f"{variant}_dir"], result["metadata"]["max_k"] if variant == "scann"
              else versions.read_metadata(result["exact_dir"])["max_k"], day)
             for result, day in ((first, tl.DAY), (second, day2))
             for variant in ("scann", "exact")]
  done = subprocess.run(
      [sys.executable, "-c", _LOAD_EACH, json.dumps(request),
       json.dumps([[path, max_k] for path, max_k, _ in exports])],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  answers = json.loads(done.stdout.strip().splitlines()[-1])
  for path, max_k, day in exports:
    assert max_k == len(corpora[day]), path
    assert answers[path]["item_ids"] == sorted(corpora[day]), path
    assert answers[path]["retrieved"] == sorted(corpora[day]), path
    assert answers[path]["diverse"] == sorted(corpora[day]), path
    np.testing.assert_allclose(answers[path]["query_embedding"], queries[day],
                               atol=1e-5, err_msg=path)


def test_a_damaged_version_restored_into_a_loaded_one_fails_and_is_dropped(
    tmp_path, monkeypatch):
  """The exact version restored into the previous day's loaded SavedModel is still
  verified from its files: a truncated variables file fails the export, nothing is
  published, and the half-restored SavedModel leaves the caller's cache."""
  workdir, config = str(tmp_path), tl.tiny_config()
  day2 = tl.DAY + datetime.timedelta(days=1)
  for day in (tl.DAY, day2):
    tl.write_records(os.path.join(tl.day_dir(workdir, day), "corpus-00.tfrecord.gz"),
                     [tl.corpus_row(i) for i in ITEMS])
  model, state = TwoTowerModel(config), exporter.ExportState()
  first = exporter.export_day(model, config, workdir, tl.DAY, SETTINGS,
                              trained=tl.position(tl.DAY, 0, True), state=state)
  held = state.published.load(first["exact_dir"])
  write = servable.write_saved_model

  def damaged(export_dir, graph, checkpoint):
    write(export_dir, graph, checkpoint)
    if versions.EXACT_MODEL in export_dir:
      data = os.path.join(export_dir, "variables", "variables.data-00000-of-00001")
      os.truncate(data, os.path.getsize(data) // 2)
  monkeypatch.setattr(servable, "write_saved_model", damaged)
  with pytest.raises(RuntimeError, match="retrieval_exact.*variables do not restore"):
    exporter.export_day(model, config, workdir, day2, SETTINGS,
                        trained=tl.position(day2, 0, True), state=state)
  bases = [workdir_lib.Workdir(workdir).exports_base(name) for name in exporter.MODELS]
  assert [versions.list_versions(base) for base in bases] == [[1], [1]]
  assert state.published.load(first["exact_dir"]) is not held
  monkeypatch.setattr(servable, "write_saved_model", write)
  second = exporter.export_day(model, config, workdir, day2, SETTINGS,
                               trained=tl.position(day2, 0, True), state=state)
  assert second["version"] == 2


def test_dpp_curve_bench_on_a_trained_export(trained, tmp_path):
  """bench/dpp_curve.py on the next day's events: every figure is there, and at
  theta = 1 its recall@10 is the exact export's `retrieve` recall@10 itself."""
  source, workdir = (workdir_lib.Workdir(w) for w in (trained["workdir"], str(tmp_path)))
  shutil.copytree(source.data_root, workdir.data_root)
  shutil.copytree(os.path.join(source.root, "exports"), os.path.join(workdir.root, "exports"))
  next_day = tl.DAY + datetime.timedelta(days=1)
  rng = np.random.default_rng(1)
  seeds = [ITEMS[j] for j in rng.integers(NUM_ITEMS, size=150)]
  tl.write_records(os.path.join(tl.day_dir(workdir.root, next_day), "examples-00.tfrecord.gz"),
                   [tl.event_row(f"n{n}", "u", PLANTED[seed], seed=seed)
                    for n, seed in enumerate(seeds)])
  out = tmp_path / "curve.json"
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "dpp_curve.py"),
       f"--workdir={workdir.root}", "--thetas=0,0.5,1", "--num_candidates=30",
       "--max_events=1000", f"--json_out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  figures = json.loads(out.read_text())
  assert (figures["days"], figures["events"]) == (1, 150)
  for row in figures["overall"].values():
    assert set(row) == {"recall", "pairwise_distance", "channels", "topics", "coverage",
                        "list_length"}
    assert row["list_length"] == 10 and 1 <= row["channels"] <= 10
  out = trained["exact"].signatures["retrieve"](
      **_query(seeds, timestamp=1_709_600_000), k=tf.constant(10),
      exclude_item_ids=tf.zeros([150, 0], tf.string))
  hits = [PLANTED[s].encode() in row for s, row in zip(seeds, out["item_ids"].numpy().tolist())]
  assert figures["overall"]["1.0"]["recall"] == pytest.approx(np.mean(hits), abs=1e-4)

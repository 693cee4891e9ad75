"""Export contract: a tiny trained model, exported, answers as TF Serving would ask.

The model learns a planted mapping (a user on seed item X next watches item
P(X)) for a few hundred steps, then both variants are exported from the day's
corpus and must retrieve P(X) for seed X.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from models import features
from models.retrieval import TwoTowerModel
from serving import export
from serving import versions
from serving import warmup
import serving_testlib as tl

NUM_ITEMS = 80
K = 20
ITEMS = [f"item{j:03d}" for j in range(NUM_ITEMS)]
_PERMUTATION = np.random.default_rng(7).permutation(NUM_ITEMS)
PLANTED = {ITEMS[j]: ITEMS[_PERMUTATION[j]] for j in range(NUM_ITEMS)}
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


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


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  """W with one day of planted events and its corpus, a trained model, one export."""
  workdir = str(tmp_path_factory.mktemp("planted"))
  rng = np.random.default_rng(0)
  rows = []
  for n in range(9600):  # 300 steps of 32
    seed = ITEMS[rng.integers(NUM_ITEMS)]
    rows.append(tl.event_row(f"e{n}", f"u{rng.integers(300)}", PLANTED[seed], seed=seed,
                             timestamp=1_709_600_000 + n))
  day_dir = tl.day_dir(workdir, tl.DAY)
  tl.write_records(os.path.join(day_dir, "examples-00.tfrecord.gz"), rows)
  tl.write_records(os.path.join(day_dir, "corpus-00.tfrecord.gz"),
                   [tl.corpus_row(i) for i in ITEMS])
  config = tl.tiny_config()
  model = TwoTowerModel(config)
  model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
  batches = (tf.data.TFRecordDataset(os.path.join(day_dir, "examples-00.tfrecord.gz"),
                                     compression_type="GZIP")
             .batch(config.batch_size)
             .map(lambda s: features.parse_examples(s, max_history=config.max_history)))
  model.fit(batches, epochs=1, verbose=0)
  result = export.export_day(model, config, workdir, tl.DAY, k=K)
  return {"workdir": workdir, "model": model, "config": config, "result": result,
          "scann": tf.saved_model.load(result["scann_dir"]),
          "exact": tf.saved_model.load(result["exact_dir"])}


@pytest.mark.parametrize("variant", ["scann", "exact"])
def test_export_retrieves_the_planted_answers(planted, variant):
  out = planted[variant].signatures["serving_default"](**_query(ITEMS))
  top = out["item_ids"].numpy()
  assert top.shape == (NUM_ITEMS, K)
  first = np.mean([top[j, 0] == PLANTED[x].encode() for j, x in enumerate(ITEMS)])
  in_five = np.mean([PLANTED[x].encode() in top[j, :5] for j, x in enumerate(ITEMS)])
  assert first >= 0.9, first
  assert in_five == 1.0, in_five
  scores = out["scores"].numpy()
  assert np.all(np.diff(scores, axis=1) <= 1e-5)


def test_layout_metadata_and_warmup(planted):
  result, config = planted["result"], planted["config"]
  assert result["version"] == 1
  for name, path in (("retrieval_scann", result["scann_dir"]),
                     ("retrieval_exact", result["exact_dir"])):
    assert path == os.path.join(planted["workdir"], "exports", name, "1")
    assert {"saved_model.pb", "variables", "assets.extra"} <= set(os.listdir(path))
    meta = export.read_metadata(path)
    assert meta["model"] == name and meta["version"] == 1
    assert meta["config"] == config.to_dict()
    assert meta["corpus"]["size"] == NUM_ITEMS and meta["corpus"]["embedding_dim"] == 16
    assert meta["data_range"] == {"first_day": tl.DAY.isoformat(),
                                  "last_day": tl.DAY.isoformat(), "num_days": 1}
    assert meta["ann"]["recall_at_10"] >= 0.95
    assert meta["ann"]["num_queries"] == 1000
    assert meta["stack"]["tensorflow"] == tf.__version__
    assert meta["k"] == K
    logs = warmup.read_warmup(os.path.join(path, "assets.extra", warmup.WARMUP_FILE))
    assert {log.predict_log.request.model_spec.name for log in logs} == {name}
    for log, out in zip(logs, warmup.replay(planted[name.split("_")[1]], logs)):
      batch = tf.make_ndarray(log.predict_log.request.inputs["user_id"]).shape[0]
      assert next(iter(out.values())).shape[0] == batch
  assert export.read_metadata(result["exact_dir"])["needs_scann_ops"] is False


def _ops(export_dir):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  graph = proto.meta_graphs[0].graph_def
  return ({node.op for node in graph.node} |
          {node.op for fn in graph.library.function for node in fn.node_def})


def test_only_the_scann_export_needs_custom_ops(planted):
  exact_ops = _ops(planted["result"]["exact_dir"])
  assert {"MatMul", "TopKV2", "StringToHashBucketFast"} <= exact_ops
  assert not [op for op in exact_ops if ">" in op]  # no namespaced (custom) op
  custom = {op for op in _ops(planted["result"]["scann_dir"]) if ">" in op}
  assert custom == {"Scann>TensorsToScann", "Scann>ScannSearchBatched"}


def test_item_embeddings_are_exposed_and_match_the_candidate_tower(planted):
  for variant in ("scann", "exact"):
    loaded = planted[variant]
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
    # serving_default scores are <u, v> / temperature against those embeddings.
    out = loaded.signatures["serving_default"](**_query(ITEMS[:3]))
    best = tf.gather(loaded.item_embeddings,
                     [ids.tolist().index(i) for i in out["item_ids"].numpy()[:, 0]])
    expected = tf.reduce_sum(query * best, axis=1) / planted["config"].temperature
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


def test_fresh_stock_tensorflow_process(planted, tmp_path):
  result = planted["result"]
  script = tmp_path / "fresh.py"
  script.write_text(_FRESH_PROCESS)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, str(script), result["exact_dir"],
                         result["scann_dir"]], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  answer = json.loads(done.stdout.strip().splitlines()[-1])
  assert answer["modules_before_scann"] == []
  # The same answers as in this process, and the planted item near the top.
  request = _query(["item005"], history=tf.constant([[""]]))
  for variant in ("exact", "scann"):
    here = planted[variant].signatures["serving_default"](**request)["item_ids"]
    assert answer[variant] == here.numpy()[0].astype(str).tolist()
    assert PLANTED["item005"] in answer[variant][:5]
  assert answer["error"].startswith("RuntimeError")
  assert "Op type not registered 'Scann>TensorsToScann'" in answer["error"]


def test_saved_model_cli_show_and_run(planted):
  exact_dir = planted["result"]["exact_dir"]
  shown = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", exact_dir, "--tag_set", "serve",
                          "--signature_def", "serving_default"],
                         capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0, shown.stderr[-3000:]
  for name in features.QUERY_FEATURES + ("item_ids", "scores"):
    assert f"['{name}']" in shown.stdout
  assert f"shape: (-1, {K})" in shown.stdout
  exprs = ("user_id=['u'];seed_item_id=['item005'];history_item_ids=[['']];"
           "device=['web'];country=['de'];timestamp=[0]")
  ran = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", exact_dir, "--tag_set", "serve",
                        "--signature_def", "serving_default", "--input_exprs", exprs],
                       capture_output=True, text=True, timeout=120)
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert "Result for output key item_ids" in ran.stdout
  assert "Result for output key scores" in ran.stdout
  here = planted["exact"].signatures["serving_default"](**_query(["item005"]))
  assert repr(here["item_ids"].numpy()[0, 0]) in ran.stdout


def _assert_valid(out, batch):
  ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
  assert ids.shape == scores.shape == (batch, K)
  assert set(ids.ravel().tolist()) <= {i.encode() for i in ITEMS}
  assert np.isfinite(scores).all()


@pytest.mark.parametrize("variant", ["scann", "exact"])
def test_hostile_requests(planted, variant):
  serve = planted[variant].signatures["serving_default"]
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
  retrieve = planted[variant].signatures["retrieve"]
  request = _query(["item001"])
  none = tf.zeros([1, 0], tf.string)
  with pytest.raises(tf.errors.InvalidArgumentError, match="k must be >= 1"):
    retrieve(**request, k=tf.constant(0), exclude_item_ids=none)
  with pytest.raises(tf.errors.InvalidArgumentError, match="k must be <= max_k"):
    retrieve(**request, k=tf.constant(10 ** 6), exclude_item_ids=none)
  with pytest.raises(tf.errors.InvalidArgumentError, match="one row per query"):
    retrieve(**request, k=tf.constant(3), exclude_item_ids=tf.zeros([2, 1], tf.string))


def test_versions_grow_and_a_failed_export_publishes_nothing(planted):
  workdir, model, config = planted["workdir"], planted["model"], planted["config"]
  bases = [export.export_base(workdir, name)
           for name in (export.SCANN_MODEL, export.EXACT_MODEL)]
  stale = versions.staging_dir(bases[0], 2)
  os.makedirs(stale)  # as left by a crash in the middle of writing
  with pytest.raises(ValueError, match="min_ann_recall"):
    export.export_day(model, config, workdir, tl.DAY, k=K, min_ann_recall=1.5)
  assert [versions.list_versions(b) for b in bases] == [[1], [1]]
  second = export.export_day(model, config, workdir, tl.DAY, k=K)
  assert second["version"] == 2
  assert [versions.list_versions(b) for b in bases] == [[1, 2], [1, 2]]
  assert not os.path.exists(stale)
  assert sorted(os.listdir(bases[0])) == ["1", "2"]
  # The newest versions stay loaded for the next day's evaluation; older ones load.
  newest = export.load_export(second["exact_dir"])
  assert newest is export.load_export(second["exact_dir"])
  older = export.load_export(os.path.join(bases[1], "1"))
  assert older is not export.load_export(os.path.join(bases[1], "1"))
  np.testing.assert_array_equal(newest.item_ids.numpy(), older.item_ids.numpy())


def test_bad_corpus_is_named(tmp_path):
  path = tl.write_records(str(tmp_path / "corpus-00.tfrecord.gz"),
                          [tl.corpus_row("a"), tl.corpus_row("b"), tl.corpus_row("a")])
  with pytest.raises(ValueError, match=r"corpus-00.tfrecord.gz: record 2: item_id b'a' "
                                       r"repeats .*record 0"):
    export.read_corpus(path)
  with open(tmp_path / "corpus-01.tfrecord.gz", "wb") as f:
    f.write(b"not gzip at all")
  with pytest.raises(ValueError, match="corpus-01.tfrecord.gz: unreadable"):
    export.read_corpus(str(tmp_path / "corpus-01.tfrecord.gz"))
  with pytest.raises(FileNotFoundError, match="no corpus files"):
    export.read_corpus(str(tmp_path / "nothing-*.tfrecord.gz"))

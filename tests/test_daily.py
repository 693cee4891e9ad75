"""The daily job end to end on tiny synthetic days, through the real parts.

The module's fixture runs days 1..3 once, killed during day 2's training by the
trainer's fault injection and then resumed; every test starts from that workdir
(tests that change it work on a copy), so each test also passes alone.
"""

import datetime as dt
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import types

import pytest

from pipeline import manifest as manifest_lib
from pipeline import synthetic_world
from pipeline import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAYS = ("2024-01-01", "2024-01-02", "2024-01-03")
DAY4 = "2024-01-04"  # has logs; the fixture leaves it for the tests to run
STEPS = ("beam", "evaluate", "train", "export", "report")
BATCH = 64
# Small tables (checkpoints and exports of a few MB, so copies and saves are cheap)
# and one pass a day (models.config.ONE_PASS): the step counts below depend on it.
TINY = ['--config_overrides={"embedding_dim": 16, "id_embedding_dim": 16, '
        '"item_buckets": 4096, "user_buckets": 2048, "channel_buckets": 512, '
        '"estimator_buckets": 8192, "replay_days": 1, "epochs_per_day": 1, '
        '"uniform_negatives": 0, "transition_embeddings": false}', f"--batch_size={BATCH}"]
KILL_AFTER_STEP = 26  # a checkpoint step of day 2 (19 steps a day)
# What the libraries print when their logging is not routed: none may reach the terminal.
NOISE = re.compile(r"cpu_feature_guard|oneDNN|apitools|cuda|cuInit|absl::|"
                   r"^[IWEF]\d{4} |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |"
                   r"^(WARNING|INFO|ERROR)[: ]", re.MULTILINE | re.IGNORECASE)


def _daily(workdir, *args, env=None, **kwargs):
  return subprocess.run(
      [sys.executable, "-m", "pipeline.daily", f"--workdir={workdir}", *args],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def _range(*extra):
  return [f"--start_date={DAYS[0]}", f"--end_date={DAYS[-1]}", *TINY, *extra]


def _manifest(workdir):
  with open(os.path.join(workdir, "manifest.json")) as f:
    return json.load(f)["days"]


def _copy(workdir, tmp_path):
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  return copy


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Days 1..3: killed right after global step 26 (day 2), then resumed to the end.

  The resumed run checkpoints only at day ends, so the checkpoint before the
  newest is day 2's last (test_checkpoint_fallback_retrains_the_lost_day).
  """
  w = str(tmp_path_factory.mktemp("daily"))
  synthetic_world.generate(w, synthetic_world.WorldConfig(
      start_date=dt.date(2024, 1, 1), days=4, users=150, items=400, new_items_per_day=20,
      events_per_day=1200, bad_line_rate=0.005, seed=3))
  env = dict(os.environ, TOWERSTREAM_KILL_AFTER_STEP=str(KILL_AFTER_STEP))
  killed = _daily(w, *_range("--checkpoint_every_steps=2"), env=env)
  after_kill = _manifest(w)
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  resumed = _daily(w, *_range("--checkpoint_every_steps=1000"), env=env)
  return types.SimpleNamespace(workdir=w, killed=killed, after_kill=after_kill,
                               resumed=resumed, days=_manifest(w))


@pytest.fixture
def workdir(run):
  assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
  return run.workdir


def test_killed_during_training_resumes_and_completes(run):
  assert run.killed.returncode == -signal.SIGKILL, run.killed.stderr[-3000:]
  assert set(run.after_kill[DAYS[0]]) == set(STEPS)
  assert set(run.after_kill[DAYS[1]]) == {"beam", "evaluate"}, "not killed in day 2"

  assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
  days = run.days
  for d in DAYS:
    assert set(days[d]) == set(STEPS), days[d]
    # Each day trained the examples the Beam job wrote, neither more nor less.
    assert days[d]["train"]["examples"] == days[d]["beam"]["examples"]
  assert days[DAYS[1]]["train"]["status"] == "resumed"
  assert days[DAYS[1]]["train"]["examples_this_run"] < days[DAYS[1]]["beam"]["examples"]
  # No step ran twice or was lost: the global step is the sum of the days' batches.
  assert days[DAYS[-1]]["train"]["global_step"] == sum(
      math.ceil(days[d]["beam"]["examples"] / BATCH) for d in DAYS)
  assert f"\n{DAYS[-1]} " in run.resumed.stdout


def test_terminal_shows_progress_and_the_log_goes_to_a_file(run, workdir):
  out, err = run.resumed.stdout, run.resumed.stderr
  assert not NOISE.search(out + err), NOISE.search(out + err)
  assert err == ""
  assert f"{DAYS[0]} already complete" in out
  for d in DAYS[1:]:
    for step in STEPS if d != DAYS[1] else STEPS[2:]:
      assert re.search(rf"^{d} {step} +[0-9.]+ s  ", out, re.MULTILINE), (d, step, out)
  assert re.search(rf"^{DAYS[2]} evaluate .* R@10 exact [0-9.]+, scann", out, re.MULTILINE)
  logs = sorted(glob.glob(os.path.join(workdir, "run_logs", "daily-*.log")))
  assert len(logs) == 2  # the killed run's and the resumed run's
  with open(logs[-1]) as f:
    log = f.read()
  assert re.search(r"^I\d{4} .*trainer\.py:\d+\] day 2024-01-03 done", log, re.MULTILINE)
  assert re.search(r"^I\d{4} .*beam_day\.py:\d+\]", log, re.MULTILINE)
  assert re.search(r"^I\d{4} .*exporter\.py:\d+\] published version 3", log, re.MULTILINE)


def test_exports_and_metrics(workdir):
  for name in ("retrieval_scann", "retrieval_exact"):
    assert sorted(os.listdir(os.path.join(workdir, "exports", name))) == ["1", "2", "3"]
  code = (
      "import sys, tensorflow as tf; import scann; "
      "m = tf.saved_model.load(sys.argv[1]); f = m.signatures['serving_default']; "
      "out = f(user_id=tf.constant(['user_000001']), seed_item_id=tf.constant(['']), "
      "history_item_ids=tf.constant([['', '']]), device=tf.constant(['web']), "
      "country=tf.constant(['US']), timestamp=tf.constant([1704100000], tf.int64)); "
      "print(out['item_ids'].shape[1])")
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
  for name in ("retrieval_scann", "retrieval_exact"):
    for v in ("1", "3"):
      res = subprocess.run([sys.executable, "-c", code,
                            os.path.join(workdir, "exports", name, v)],
                           capture_output=True, text=True, env=env, cwd="/")
      assert res.returncode == 0, res.stderr[-2000:]
      assert int(res.stdout.split()[-1]) > 0
  assert not os.path.exists(os.path.join(workdir, "eval", DAYS[0], "metrics.json"))
  for i, d in enumerate(DAYS[1:]):
    with open(os.path.join(workdir, "eval", d, "metrics.json")) as f:
      metrics = json.load(f)
    # Test-then-train: day D is scored by the export of day D-1.
    assert metrics["exports"]["exact"]["exported_from_day"] == DAYS[i]
    recall = metrics["recall"]["all"]
    for method in ("exact", "scann", "popularity"):
      assert 0.0 <= recall[method]["10"] <= recall[method]["50"] <= recall[method]["100"] <= 1
    assert os.path.getsize(os.path.join(workdir, "eval", d, "recall.png")) > 0
  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    summary = json.load(f)["days"]
  assert [r["day"] for r in summary] == list(DAYS)
  assert summary[0]["recall"] is None and summary[2]["recall"]["all"]["exact"]["10"] >= 0
  assert os.path.getsize(os.path.join(workdir, "eval", "summary.png")) > 0


def test_rerun_is_a_noop(workdir):
  before = _manifest(workdir)
  mtimes = {p: os.path.getmtime(p) for p in glob.glob(
      os.path.join(workdir, "**", "*"), recursive=True) if os.path.isfile(p)
            and not p.endswith((".lock", "manifest.json")) and "run_logs" not in p}
  proc = _daily(workdir, *_range())
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [line for line in proc.stdout.splitlines() if "already complete" in line] == [
      f"{d} already complete (--force runs it again)" for d in DAYS]
  assert _manifest(workdir) == before
  for p, t in mtimes.items():
    assert os.path.getmtime(p) == t, p
  assert sorted(os.listdir(os.path.join(workdir, "exports", "retrieval_exact"))) == [
      "1", "2", "3"]


def test_concurrent_run_is_refused(workdir):
  with workdir_lock.WorkdirLock(workdir):
    proc = _daily(workdir, *_range())
  assert proc.returncode == 2
  assert "another run on this workdir is in progress" in proc.stderr
  assert f"pid {os.getpid()}" in proc.stderr
  assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_missing_day_and_dead_letter_rate_fail_clearly(workdir, tmp_path):
  proc = _daily(workdir, "--date=2024-02-01")
  assert proc.returncode == 2
  assert "no log partition for 2024-02-01" in proc.stderr
  bad = str(tmp_path / "bad")
  synthetic_world.generate(bad, synthetic_world.WorldConfig(days=1, users=50, items=100,
                                                events_per_day=300, bad_line_rate=0.2))
  proc = _daily(bad, "--date=2024-01-01", "--max_dead_letter_rate=0.05")
  assert proc.returncode == 2
  assert "exceeds --max_dead_letter_rate=0.05" in proc.stderr
  assert os.path.join(bad, "data", "2024-01-01", "stats.json") in proc.stderr
  assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_gaps_fail_unless_skipped_then_show_as_one_line(workdir):
  command = ["--start_date=2023-12-29", f"--end_date={DAYS[-1]}", *TINY]
  proc = _daily(workdir, *command)
  assert proc.returncode == 2
  assert "no log partition for 2023-12-29, 2023-12-30, 2023-12-31 (3 of 6 days)" in (
      proc.stderr)
  assert "pass --skip_missing_days" in proc.stderr
  # --verbosity=0 brings the INFO log back to the terminal.
  proc = _daily(workdir, *command, "--skip_missing_days", "--verbosity=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipping 3 of 6 days (2023-12-29 .. 2023-12-31)" in proc.stdout
  assert "skipping 3 of 6 days (2023-12-29 .. 2023-12-31)" in proc.stderr
  assert len(re.findall(r"^I\d{4} .*already complete$", proc.stderr, re.MULTILINE)) == 15
  assert "2023-12-29 .. 2023-12-31 skipped (3 days): no log partition" in proc.stdout
  assert all(f"\n{day} " in proc.stdout for day in DAYS)
  days = _manifest(workdir)
  assert [d for d in days if "skipped" in days[d]] == ["2023-12-29", "2023-12-30",
                                                        "2023-12-31"]


def test_forced_day_is_scored_by_the_export_made_before_it(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  metrics_path = os.path.join(w, "eval", DAYS[1], "metrics.json")
  with open(metrics_path) as f:
    first = json.load(f)
  proc = _daily(w, f"--date={DAYS[1]}", "--force", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(metrics_path) as f:
    forced = json.load(f)
  # Scored by day 1's export (version 1), not by the newest (3, trained on day 2).
  assert forced["exports"]["exact"]["exported_from_day"] == DAYS[0]
  assert forced["exports"]["exact"]["dir"] == os.path.join(w, "exports",
                                                           "retrieval_exact", "1")
  assert forced["recall"]["all"]["exact"] == first["recall"]["all"]["exact"]
  day = _manifest(w)[DAYS[1]]
  assert day["evaluate"]["export"].endswith(os.path.join("retrieval_exact", "1"))
  # The model has trained day 3 since: day 2's own export is kept, none is added.
  assert day["export"]["version"] == 2 and day["export"]["reused"]
  assert sorted(os.listdir(os.path.join(w, "exports", "retrieval_exact"))) == [
      "1", "2", "3"]


def test_diversity_theta_scores_the_diverse_list_beside_the_plain_one(workdir, tmp_path):
  """--diversity_theta adds the DPP list's figures; theta = 1 is the plain top k."""
  w = _copy(workdir, tmp_path)
  metrics_path = os.path.join(w, "eval", DAYS[1], "metrics.json")
  with open(metrics_path) as f:
    assert "diversity" not in json.load(f)
  proc = _daily(w, f"--date={DAYS[1]}", "--force", "--diversity_theta=1",
                "--diversity_candidates=50", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "DPP theta 1: R@10" in proc.stdout, proc.stdout[-2000:]
  with open(metrics_path) as f:
    diversity = json.load(f)["diversity"]
  assert diversity["theta"] == 1 and diversity["num_candidates"] == 50
  exact = diversity["recall"]["all"]["exact"]
  assert exact["diverse"] == exact["plain"]
  assert diversity["lists"]["all"]["exact"]["diverse"] == (
      diversity["lists"]["all"]["exact"]["plain"])
  assert _manifest(w)[DAYS[1]]["evaluate"]["diversity"]["theta"] == 1


RANKER_BATCH = 128


def test_ranker_step_killed_mid_day_resumes_and_the_funnel_is_scored(workdir, tmp_path):
  """--ranker on days 2..3 (forced): the teacher trains after the export and is
  exported; killed after its step 14 (a checkpoint step of day 3), the next run
  resumes it mid-day. Day 3's funnel uses day 2's teacher (test-then-train)."""
  w = _copy(workdir, tmp_path)
  overrides = f'--ranker_overrides={{"checkpoint_every_steps": 2, "batch_size": {RANKER_BATCH}}}'
  env = dict(os.environ, TOWERSTREAM_KILL_RANKER_AFTER_STEP="14")
  killed = _daily(w, f"--start_date={DAYS[1]}", f"--end_date={DAYS[2]}", "--force",
                  "--ranker", overrides, *TINY, env=env)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  days = _manifest(w)
  assert "ranker" in days[DAYS[1]] and set(days[DAYS[2]]) == set(STEPS) - {"report"}
  resumed = _daily(w, f"--date={DAYS[2]}", "--ranker", *TINY)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"{DAYS[2]} resuming at ranker" in resumed.stdout
  assert re.search(rf"^{DAYS[2]} +[0-9.]+ +[0-9.]+ / [0-9.]+", resumed.stdout,
                   re.MULTILINE), resumed.stdout  # the funnel table's row
  days = _manifest(w)
  trained = [days[d]["ranker"]["train"] for d in DAYS[1:]]
  assert trained[1]["status"] == "resumed"
  assert trained[1]["examples_this_run"] == days[DAYS[2]]["beam"]["examples"] - (
      14 - math.ceil(days[DAYS[1]]["beam"]["examples"] / RANKER_BATCH)) * RANKER_BATCH
  # No step of the teacher ran twice or was lost.
  assert trained[1]["global_step"] == sum(
      math.ceil(days[d]["beam"]["examples"] / RANKER_BATCH) for d in DAYS[1:])
  assert [days[d]["ranker"]["export"]["version"] for d in DAYS[1:]] == [1, 2]
  assert sorted(os.listdir(os.path.join(w, "exports", "ranker"))) == ["1", "2"]
  # Negatives of day D come from the retrieval export labelled D.
  for d in DAYS[1:]:
    with open(os.path.join(days[d]["ranker"]["negatives_from"], "assets.extra",
                           "metadata.json")) as f:
      assert json.load(f)["day"] == d
  with open(os.path.join(w, "eval", DAYS[1], "metrics.json")) as f:
    assert "skipped" in json.load(f)["funnel"]  # no teacher before day 2
  with open(os.path.join(w, "eval", DAYS[2], "metrics.json")) as f:
    metrics = json.load(f)
  found = metrics["funnel"]
  assert found["ranker"]["exported_from_day"] == DAYS[1] and found["k"] == 100
  for mode in ("all", "seen_excluded"):
    # The lists re-ranked are the exact export's: its recall is the retrieval's.
    assert found[mode]["retrieval"]["recall"]["10"] == metrics["recall"][mode]["exact"]["10"]
    assert found[mode]["retrieval_recall_at_k"] == metrics["recall"][mode]["exact"]["100"]
    assert 0 <= found[mode]["funnel"]["recall"]["10"] <= found[mode]["retrieval_recall_at_k"]
    assert 0 <= found[mode]["funnel"]["ndcg"]["10"] <= found[mode]["funnel"]["recall"]["10"]
  assert days[DAYS[2]]["evaluate"]["funnel"]["all"]["funnel"]["recall"] == (
      found["all"]["funnel"]["recall"]["10"])


def test_distillation_in_the_daily_job_uses_the_ranker_of_the_day_before(workdir, tmp_path):
  """--distill_weight needs --ranker; with it, day D's two-tower distils from the
  teacher the job trained through D-1, and its train record names that teacher."""
  w = _copy(workdir, tmp_path)
  refused = _daily(w, f"--date={DAY4}", "--distill_weight=1", *TINY)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert len(refused.stderr.splitlines()) == 1 and "add --ranker" in refused.stderr
  assert "train" not in _manifest(w).get(DAY4, {})  # refused before any step
  overrides = f'--ranker_overrides={{"batch_size": {RANKER_BATCH}}}'
  teacher = _daily(w, f"--date={DAYS[2]}", "--force", "--ranker", overrides, *TINY)
  assert teacher.returncode == 0, teacher.stderr[-3000:]
  distilled = _daily(w, f"--date={DAY4}", "--ranker", overrides, "--distill_weight=1",
                     "--distill_candidates=8", *TINY)
  assert distilled.returncode == 0, distilled.stderr[-3000:]
  day = _manifest(w)[DAY4]
  assert day["train"]["status"] == "trained"
  assert day["train"]["distilled_from"]["day"] == DAYS[2]
  assert day["train"]["distilled_from"]["complete"] is True
  assert day["ranker"]["train"]["status"] == "trained"  # the teacher then learns D itself


def test_missing_exports_fail_the_day_naming_them(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  exports = os.path.join(w, "exports")
  shutil.move(exports, os.path.join(w, "exports.moved"))
  with open(exports, "w") as f:
    f.write("not a directory\n")
  proc = _daily(w, f"--date={DAY4}", *TINY)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) == 1, proc.stderr
  assert f"{exports}: exists but is not a directory" in proc.stderr
  os.remove(exports)
  proc = _daily(w, f"--date={DAY4}", *TINY)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) == 1, proc.stderr
  assert f"{os.path.join(exports, 'retrieval_exact', '3')} is missing" in proc.stderr
  assert f"the export of {DAYS[2]} (version 3)" in proc.stderr
  assert "evaluate" not in _manifest(w)[DAY4]  # not recorded as "no export yet"


def test_export_versions_never_go_back(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  # A run killed after training day 3, then W/exports lost: day 3 exports again.
  with open(os.path.join(w, "manifest.json")) as f:
    manifest = json.load(f)
  for step in ("export", "report"):
    del manifest["days"][DAYS[2]][step]
  with open(os.path.join(w, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  shutil.rmtree(os.path.join(w, "exports"))
  proc = _daily(w, f"--date={DAYS[2]}", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Versions 1..3 were published once (TF Serving may have loaded them): never reused.
  assert _manifest(w)[DAYS[2]]["export"]["version"] == 4
  assert os.listdir(os.path.join(w, "exports", "retrieval_exact")) == ["4"]


def test_checkpoint_fallback_retrains_the_lost_day(workdir, tmp_path):
  w = _copy(workdir, tmp_path)
  days = _manifest(w)
  index = sorted(glob.glob(os.path.join(w, "checkpoints", "ckpt-*.index")),
                 key=lambda p: int(re.search(r"ckpt-(\d+)", p)[1]))
  steps = [int(re.search(r"ckpt-(\d+)", p)[1]) for p in index]
  assert steps[-2:] == [days[DAYS[1]]["train"]["global_step"],
                        days[DAYS[2]]["train"]["global_step"]]
  # Day 3's checkpoint is corrupt: the trainer falls back to day 2's end.
  (data,) = glob.glob(index[-1].replace(".index", ".data-*"))
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  proc = _daily(w, f"--date={DAY4}", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{DAYS[2]} train    again" in proc.stdout
  days = _manifest(w)
  train = days[DAY4]["train"]
  assert [r["day"] for r in train["retrained"]] == [DAYS[2]]
  # Day 3 trained once more from day 2's end, then day 4: no day skipped or doubled.
  assert train["global_step"] == sum(
      math.ceil(days[d]["beam"]["examples"] / BATCH) for d in (*DAYS, DAY4))
  assert days[DAY4]["evaluate"]["export_version"] == 3
  assert days[DAY4]["export"]["version"] == 4


def test_airflow_example_is_valid_python_calling_the_daily_job():
  path = os.path.join(ROOT, "examples", "airflow_dag.py")
  with open(path) as f:
    source = f.read()
  compile(source, path, "exec")
  assert "-m pipeline.daily" in source and "--date={{{{ ds }}}}" in source


def test_a_manifest_write_encodes_only_the_day_it_changes(tmp_path, monkeypatch):
  path = str(tmp_path / "manifest.json")
  record = {"seconds": 1.5, "recall": {"all": {"exact": {"10": 0.25}}}, "note": "a\nb"}
  first = dt.date(2024, 1, 1)
  manifest_lib.Manifest(path).mark_all(
      [first + dt.timedelta(days=i) for i in range(300)], "beam", record)
  manifest = manifest_lib.Manifest(path)
  manifest.mark(first, "train", record)  # encodes every day it loaded, once
  encoded = []
  dumps = json.dumps
  monkeypatch.setattr(json, "dumps", lambda *a, **k: encoded.append(dumps(*a, **k))
                      or encoded[-1])
  manifest.mark(first + dt.timedelta(days=299), "train", record)
  manifest.clear(first + dt.timedelta(days=5))
  monkeypatch.setattr(json, "dumps", dumps)
  assert sum(map(len, encoded)) < 2_000  # the day marked, not the 300 days (~40 KB)
  with open(path) as f:
    text = f.read()
  days = {day: steps for day, steps in json.loads(text)["days"].items()}
  assert len(days) == 299 and days["2024-10-26"] == {"beam": record, "train": record}
  assert text == json.dumps({"days": days, "export_high_water": 0}, indent=1,
                            sort_keys=True)


def test_keep_exports_prunes_older_versions_after_the_day_exports(workdir, tmp_path):
  """Day 4 with --keep_exports=2: scored by version 3, exports 4, keeps 3 and 4."""
  w = _copy(workdir, tmp_path)
  proc = _daily(w, f"--date={DAY4}", "--keep_exports=2", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  day = _manifest(w)[DAY4]
  assert day["export"]["version"] == 4 and day["export"]["pruned"] == [1, 2]
  assert day["evaluate"]["export_version"] == 3
  for model in ("retrieval_exact", "retrieval_scann"):
    assert sorted(os.listdir(os.path.join(w, "exports", model))) == ["3", "4"]

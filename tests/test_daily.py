"""The daily job end to end on 3 tiny synthetic days, through the real parts.

One workdir is shared by the tests of this module, in order: a run killed during
training resumes and completes, exports 1..3 load, metrics exist for days 2 and 3,
a re-run is a no-op, and a concurrent run is refused.
"""

import datetime as dt
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import synthetic
from pipeline import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAYS = ("2024-01-01", "2024-01-02", "2024-01-03")
TINY = ['--config_overrides={"embedding_dim": 16}', "--batch_size=64",
        "--checkpoint_every_steps=2"]


def _daily(workdir, *extra, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-m", "pipeline.daily", f"--workdir={workdir}",
       f"--start_date={DAYS[0]}", f"--end_date={DAYS[-1]}", *TINY, *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _manifest(workdir):
  try:
    with open(os.path.join(workdir, "manifest.json")) as f:
      return json.load(f)["days"]
  except (OSError, ValueError):
    return {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("daily"))
  synthetic.generate(w, synthetic.WorldConfig(
      start_date=dt.date(2024, 1, 1), days=3, users=150, items=400, new_items_per_day=20,
      events_per_day=1200, bad_line_rate=0.005, seed=3))
  return w


def test_killed_during_training_resumes_and_completes(workdir):
  proc = _daily(workdir)
  deadline = time.time() + 400
  # Kill -9 once day 2's training has written a mid-day checkpoint.
  while time.time() < deadline and proc.poll() is None:
    steps = _manifest(workdir).get(DAYS[1], {})
    if "evaluate" in steps and "train" not in steps and glob.glob(
        os.path.join(workdir, "checkpoints", "ckpt-*.index")):
      index = glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index"))
      if max(os.path.getmtime(p) for p in index) > os.path.getmtime(
          os.path.join(workdir, "manifest.json")):
        proc.send_signal(signal.SIGKILL)
        break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
  assert "train" not in _manifest(workdir)[DAYS[1]]

  again = _daily(workdir)
  out, err = again.communicate(timeout=600)
  assert again.returncode == 0, err[-3000:]
  days = _manifest(workdir)
  for d in DAYS:
    assert set(days[d]) == {"beam", "evaluate", "train", "export", "report"}, days[d]
  # The resumed day finished the examples the Beam job wrote, neither more nor less.
  assert days[DAYS[1]]["train"]["examples"] == days[DAYS[1]]["beam"]["examples"]
  assert days[DAYS[1]]["train"]["status"] == "resumed"
  assert "2024-01-03" in out


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
  for d in DAYS[1:]:
    with open(os.path.join(workdir, "eval", d, "metrics.json")) as f:
      metrics = json.load(f)
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
            and not p.endswith((".lock", "manifest.json"))}
  proc = _daily(workdir)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert err.count("already complete") == 3 * 5
  assert _manifest(workdir) == before
  for p, t in mtimes.items():
    assert os.path.getmtime(p) == t, p
  assert sorted(os.listdir(os.path.join(workdir, "exports", "retrieval_exact"))) == [
      "1", "2", "3"]


def test_concurrent_run_is_refused(workdir):
  with workdir_lock.WorkdirLock(workdir):
    proc = _daily(workdir)
    _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2
  assert "another run on this workdir is in progress" in err
  assert f"pid {os.getpid()}" in err


def test_missing_day_and_dead_letter_rate_fail_clearly(workdir, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "pipeline.daily", f"--workdir={workdir}", "--date=2024-02-01"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "no log partition for 2024-02-01" in proc.stderr
  bad = str(tmp_path / "bad")
  synthetic.generate(bad, synthetic.WorldConfig(days=1, users=50, items=100,
                                                events_per_day=300, bad_line_rate=0.2))
  proc = subprocess.run(
      [sys.executable, "-m", "pipeline.daily", f"--workdir={bad}", "--date=2024-01-01",
       "--max_dead_letter_rate=0.05"], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2
  assert "exceeds --max_dead_letter_rate=0.05" in proc.stderr
  assert os.path.join(bad, "data", "2024-01-01", "stats.json") in proc.stderr


def test_gaps_fail_unless_skipped_then_show_as_one_line(workdir):
  command = [sys.executable, "-m", "pipeline.daily", f"--workdir={workdir}",
             "--start_date=2023-12-29", f"--end_date={DAYS[-1]}", *TINY]
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "no log partition for 2023-12-29, 2023-12-30, 2023-12-31 (3 of 6 days)" in (
      proc.stderr)
  assert "pass --skip_missing_days" in proc.stderr
  proc = subprocess.run(command + ["--skip_missing_days"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipping 3 of 6 days (2023-12-29 .. 2023-12-31)" in proc.stderr
  assert proc.stderr.count("already complete") == 3 * 5
  assert "2023-12-29 .. 2023-12-31 skipped (3 days): no log partition" in proc.stdout
  assert all(f"\n{day} " in proc.stdout for day in DAYS)
  days = _manifest(workdir)
  assert [d for d in days if "skipped" in days[d]] == ["2023-12-29", "2023-12-30",
                                                        "2023-12-31"]


def test_airflow_example_is_valid_python_calling_the_daily_job():
  path = os.path.join(ROOT, "examples", "airflow_dag.py")
  with open(path) as f:
    source = f.read()
  compile(source, path, "exec")
  assert "-m pipeline.daily" in source and "--date={{{{ ds }}}}" in source

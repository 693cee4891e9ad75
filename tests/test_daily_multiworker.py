"""The daily job under TF_CONFIG: the chief runs the job, the other worker follows.

Two `pipeline.daily` processes on free 127.0.0.1 ports run two tiny synthetic days;
one process runs the same days on a copy of the logs. The cluster must train as the
single process does (same global steps, day losses within float tolerance), only
the chief may write the manifest, checkpoints and exports, and the worker must end
when the chief lets it go.
"""

import datetime as dt
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from models import distribute
from pipeline import synthetic_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAYS = ("2024-01-01", "2024-01-02")
TINY = ['--config_overrides={"embedding_dim": 16, "id_embedding_dim": 16, '
        '"item_buckets": 4096, "user_buckets": 2048, "channel_buckets": 512, '
        '"estimator_buckets": 8192, "replay_days": 1, "epochs_per_day": 1, '
        '"uniform_negatives": 0, "transition_embeddings": false}', "--batch_size=64"]
PORT_ERRORS = ("address already in use", "failed to add port", "could not start grpc")
TIMEOUT_S = 600


def _command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "pipeline.daily", f"--workdir={workdir}",
          f"--start_date={DAYS[0]}", f"--end_date={DAYS[-1]}", *TINY]


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != distribute.TF_CONFIG}
  return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _manifest(workdir: str) -> dict:
  with open(os.path.join(workdir, "manifest.json")) as f:
    return json.load(f)["days"]


def _cluster_run(workdir: str, logs: str) -> list[str]:
  """Runs the two workers to their end (retrying when a port was taken between
  choosing and binding it); returns their outputs, chief first."""
  for attempt in range(3):
    workers, paths = [], []
    try:
      for task, config in enumerate(distribute.localhost_tf_configs(2)):
        paths.append(os.path.join(logs, f"{attempt}-{task}.log"))
        with open(paths[-1], "wb") as log:
          workers.append(subprocess.Popen(
              _command(workdir), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
              env=_env(**{distribute.TF_CONFIG: config})))
      codes = [w.wait(timeout=TIMEOUT_S) for w in workers]
    finally:
      for worker in workers:
        if worker.poll() is None:
          worker.kill()
        worker.wait()
    outputs = []
    for path in paths:
      with open(path, errors="replace") as f:
        outputs.append(f.read())
    if any(e in text.lower() for text in outputs for e in PORT_ERRORS):
      shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
      continue
    assert codes == [0, 0], "\n".join(text[-3000:] for text in outputs)
    return outputs
  raise AssertionError("ports taken in 3 tries")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("daily_mw")
  single, cluster = str(root / "single"), str(root / "cluster")
  synthetic_world.generate(single, synthetic_world.WorldConfig(
      start_date=dt.date(2024, 1, 1), days=len(DAYS), users=120, items=300,
      new_items_per_day=10, events_per_day=700, bad_line_rate=0.0, seed=5))
  shutil.copytree(single, cluster)
  proc = subprocess.run(_command(single), cwd=ROOT, capture_output=True, text=True,
                        env=_env(), timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  logs = root / "logs"
  logs.mkdir()
  return single, cluster, _cluster_run(cluster, str(logs))


def test_the_cluster_trains_the_days_as_one_process_does(runs):
  single, cluster, (chief, worker) = runs
  want, got = _manifest(single), _manifest(cluster)
  assert sorted(got) == list(DAYS)
  for day in DAYS:
    assert got[day]["train"]["global_step"] == want[day]["train"]["global_step"]
    assert got[day]["train"]["examples"] == want[day]["train"]["examples"]
    assert got[day]["train"]["mean_loss"] == pytest.approx(want[day]["train"]["mean_loss"],
                                                           rel=1e-4)
    assert got[day]["export"]["version"] == want[day]["export"]["version"]
  assert f"{DAYS[-1]} report" in chief
  assert "worker 1 of 2: following the chief's training" in worker
  assert "worker 1: trained 2 days with the chief" in worker
  for day in DAYS:
    assert f"{day} train (worker 1)" in worker


def test_only_the_chief_writes_what_the_job_keeps(runs):
  _, cluster, (_, worker) = runs
  for line in worker.splitlines():  # the worker runs no step but training
    assert not any(f"{day} {step}" in line for day in DAYS
                   for step in ("beam", "evaluate", "export", "report")), line
  logs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cluster, "run_logs", "*")))
  assert [n for n in logs if n.startswith("daily-worker")], logs
  assert len([n for n in logs if n.startswith("daily-2")]) == 1, logs
  # No directory of the worker's temporary checkpoints is left in the workdir.
  assert not [n for n in os.listdir(os.path.join(cluster, "checkpoints"))
              if n.startswith(("workertemp", "tmp"))]

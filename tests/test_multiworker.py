"""Multi-worker training (models/distribute.py): 2 workers x B/2 train as 1 worker x B.

The equivalence test starts two worker processes on free 127.0.0.1 ports with a
TF_CONFIG each (MultiWorkerMirroredStrategy), kills one mid-day (the trainer's
fault injection), restarts both, and compares what they dumped with one process
trained in this test on the same data: loss, gradients (SGD: the first step's
weight change over the learning rate), estimator state and weights. Run as a
script, this file is one such worker: `python tests/test_multiworker.py W OUT`
with TF_CONFIG in its environment.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import signal
import subprocess
import sys
from typing import Callable, Iterator, Optional

if __name__ == "__main__":  # a worker: the repo on the path, its environment first
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import core  # noqa: F401  pylint: disable=unused-import
  from models import distribute as _distribute
  _STRATEGY = _distribute.strategy_from_environment()  # before any TensorFlow op

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import data  # noqa: E402
from models import distribute  # noqa: E402
from models import trainer as trainer_lib  # noqa: E402
from trainer_testlib import REPO  # noqa: E402
from trainer_testlib import TINY  # noqa: E402
from trainer_testlib import world_examples  # noqa: E402
from trainer_testlib import write_corpus  # noqa: E402
from trainer_testlib import write_day  # noqa: E402

DAY1, DAY2 = datetime.date(2024, 3, 1), datetime.date(2024, 3, 2)
DAYS = (DAY1, DAY2)
# SGD, so that a step's weight change is the gradient times the learning rate;
# uniform negatives, so that the drawn columns are checked too.
CONFIG = TINY.replace(optimizer="sgd", uniform_negatives=4, checkpoint_every_steps=2,
                      log_every_steps=3)
# Day 1 is one global batch (1 step); day 2 is 97 examples: steps 2..5, the last
# of 1 example, split 0 / 1 (a worker with nothing to score still takes part).
# Worker 1 dies after global step 3: after checkpoint 2, before checkpoint 4.
SIZES = {DAY1: CONFIG.batch_size, DAY2: 3 * CONFIG.batch_size + 1}
KILL_STEP = 3
WORKERS = 2
ROUND_TIMEOUT_S = 600
_PORT_ERRORS = ("address already in use", "failed to add port", "could not start grpc")


def _item_id(item: str) -> str:
  """Ids of every length, some past 8 bytes and some not ASCII: the gathered ids
  are rebuilt from their bytes (distribute.GlobalBatch.gather_strings)."""
  number = int(item[1:])
  return f"ï{number}-" + "x" * (number % 11)


def _examples(day: datetime.date) -> list[dict]:
  examples = world_examples(day, SIZES[day], seed=day.day)
  for e in examples:
    e["item_id"] = _item_id(e["item_id"])
    e["seed_item_id"] = _item_id(e["seed_item_id"]) if e["seed_item_id"] else ""
    e["history_item_ids"] = [_item_id(i) for i in e["history_item_ids"]]
  return examples


def _write_world(workdir: str) -> None:
  for day in DAYS:
    examples = _examples(day)
    write_day(workdir, day, examples)
    write_corpus(workdir, day, examples)


def _snapshot(trainer: trainer_lib.Trainer) -> dict[str, np.ndarray]:
  """Trainable weights (t*), estimator state (e*) and the global step."""
  out = {f"t{i}": v.numpy() for i, v in enumerate(trainer.model.trainable_variables)}
  out.update({f"e{i}": v.numpy() for i, v in enumerate(trainer.model.estimator.variables)})
  out["global_step"] = np.array(trainer.global_step)
  return out


def worker_main(workdir: str, out: str, mode: str) -> None:
  """One worker: trains DAYS with CONFIG, dumping its state before and after each
  day it trains. `mode` "same": every worker calls train_day; "follow": the
  chief does, the others follow it (the daily job's way)."""
  trainer = trainer_lib.Trainer(workdir, CONFIG, strategy=_STRATEGY)
  task = distribute.strategy_task(trainer.strategy).index
  if trainer.restored is None:
    np.savez(os.path.join(out, f"init-{task}.npz"), **_snapshot(trainer))

  def dump(stats: dict) -> None:
    if stats["status"] != "already_trained":
      np.savez(os.path.join(out, f"{stats['day']}-{task}.npz"), **_snapshot(trainer))
      with open(os.path.join(out, f"{stats['day']}-{task}.json"), "w") as f:
        json.dump({**stats, "chief": trainer.is_chief}, f)

  if mode == "follow" and not trainer.is_chief:
    trainer.follow(on_day=dump)
    return
  for day in DAYS:
    dump(trainer.train_day(day))
  trainer.release_workers()


@contextlib.contextmanager
def _cluster(workdir: str, out: str, logs: list[str], mode: str,
             kill_task: Optional[int] = None) -> Iterator[list[subprocess.Popen]]:
  """Starts the workers, logging to `logs`; on the way out, kills whichever still
  runs (always, failures included)."""
  workers = []
  try:
    for task, (log_path, config) in enumerate(
        zip(logs, distribute.localhost_tf_configs(len(logs)))):
      env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
             "TMPDIR": os.path.dirname(log_path), distribute.TF_CONFIG: config}
      env.pop(trainer_lib.KILL_AFTER_STEP_ENV, None)
      if task == kill_task:
        env[trainer_lib.KILL_AFTER_STEP_ENV] = str(KILL_STEP)
      with open(log_path, "wb") as log:
        workers.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), workdir, out, mode], cwd=REPO,
            env=env,
            stdout=log, stderr=subprocess.STDOUT))
    yield workers
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
      worker.wait()


def _tail(path: str) -> str:
  with open(path, errors="replace") as f:
    return f"{path}:\n{f.read()[-3000:]}"


def _run_round(name: str, workdir: str, out: str, logs: str, mode: str,
               kill_task: Optional[int] = None,
               meanwhile: Callable[[], None] = lambda: None) -> list[int]:
  """Runs the workers (`worker_main` `mode`) to their end; with `kill_task`, that
  one kills itself and the others must fail at the step it never joins, naming
  the loss. Runs `meanwhile` while they work; retries when a port was taken
  between choosing and binding it. Returns the workers' pids."""
  for attempt in range(3):
    paths = [os.path.join(logs, f"{name}-{attempt}-worker-{t}.log") for t in range(WORKERS)]
    with _cluster(workdir, out, paths, mode, kill_task) as workers:
      if attempt == 0:
        meanwhile()
      for worker in workers:
        worker.wait(timeout=ROUND_TIMEOUT_S)
      codes = [w.returncode for w in workers]
    tails = "\n".join(_tail(path) for path in paths)
    if any(e in tails.lower() for e in _PORT_ERRORS):
      continue
    if kill_task is None:
      assert codes == [0] * WORKERS, tails
    else:
      assert codes == [-signal.SIGKILL if t == kill_task else 1
                       for t in range(WORKERS)], tails
      for task, path in enumerate(paths):
        if task != kill_task:
          assert "the cluster lost a worker after global step" in _tail(path), tails
    return [w.pid for w in workers]
  raise AssertionError(f"ports taken in 3 tries:\n{tails}")


def _assert_equivalent(got: dict, want: dict, what: str) -> None:
  """Same estimator state (exactly) and weights (float tolerance)."""
  assert int(got["global_step"]) == int(want["global_step"]), what
  for key in want:
    if key.startswith("e"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what} {key}")
    elif key.startswith("t"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=2e-6,
                                 err_msg=f"{what} {key}")


def test_two_workers_train_as_one_with_the_global_batch_and_resume_exactly(tmp_path):
  reference_dir, workdir = str(tmp_path / "one"), str(tmp_path / "two")
  out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
  for directory in (out, logs):
    os.makedirs(directory)
  _write_world(reference_dir)
  _write_world(workdir)

  one = trainer_lib.Trainer(reference_dir, CONFIG)
  want = {"init": _snapshot(one)}
  want_stats = {}

  def train_one_process() -> None:
    for day in DAYS:
      want_stats[day] = one.train_day(day)
      want[day] = _snapshot(one)

  # Round 1: both workers train day 1, then worker 1 dies after global step 3
  # and worker 0 fails (one process trains the reference meanwhile). Round 2:
  # both restart from the chief's checkpoint 2 and finish day 2, worker 1
  # following the chief.
  chiefs = _run_round("first", workdir, out, logs, "same", kill_task=1,
                      meanwhile=train_one_process)[:1]
  chiefs += _run_round("restart", workdir, out, logs, "follow")[:1]

  got = {(name, task): dict(np.load(os.path.join(out, f"{name}-{task}.npz")))
         for name in ("init", *DAYS) for task in range(WORKERS)}
  stats = {(day, task): json.load(open(os.path.join(out, f"{day}-{task}.json")))
           for day in DAYS for task in range(WORKERS)}
  for task in range(WORKERS):
    for name in ("init", *DAYS):
      _assert_equivalent(got[name, task], want[name], f"worker {task} {name}")
    # The gradient of day 1's one step: the same as one process's on the whole batch.
    for key in want["init"]:
      if key.startswith("t"):
        gradient = (want["init"][key] - want[DAY1][key]) / CONFIG.learning_rate
        scale = max(float(np.abs(gradient).max()), 1e-3)
        np.testing.assert_allclose(
            (got["init", task][key] - got[DAY1, task][key]) / CONFIG.learning_rate,
            gradient, rtol=1e-3, atol=1e-4 * scale, err_msg=f"gradient {key}")
    for day in DAYS:
      assert stats[day, task]["mean_loss"] == pytest.approx(
          want_stats[day]["mean_loss"], rel=1e-5), (task, day)
    assert stats[DAY2, task]["status"] == "resumed"
    assert stats[DAY2, task]["examples"] == SIZES[DAY2]
    assert stats[DAY2, task]["examples_this_run"] == SIZES[DAY2] - CONFIG.batch_size
    assert stats[DAY2, task]["chief"] == (task == 0)
  # Every replica reads the same p: the workers' estimators are one.
  for name in ("init", *DAYS):
    for key in got[name, 0]:
      np.testing.assert_array_equal(got[name, 0][key], got[name, 1][key])

  # Only the chief wrote: its checkpoints, summaries and config; the other
  # worker's checkpoints went to a temporary directory, removed.
  assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith(
      f"ckpt-{want[DAY2]['global_step']}")
  assert not glob.glob(os.path.join(logs, "towerstream-worker-*"))
  events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  # events.out.tfevents.<time>.<host>.<pid>.<n>.v2: all from the chief's processes
  assert events and {int(e.split(".")[-3]) for e in events} <= set(chiefs), (events, chiefs)


def test_tf_config_names_the_task_and_refuses_parameter_servers():
  def task(config) -> Optional[distribute.Task]:
    return distribute.cluster_task({distribute.TF_CONFIG: json.dumps(config)})

  assert distribute.cluster_task({}) is None
  assert task({"cluster": {}}) is None
  two = {"worker": ["a:1", "b:1"]}
  first = task({"cluster": two, "task": {"type": "worker", "index": 0}})
  assert first == distribute.Task("worker", 0, workers=2, has_chief=False)
  assert first.is_chief
  assert not task({"cluster": two, "task": {"type": "worker", "index": 1}}).is_chief
  with_chief = {"chief": ["c:1"], "worker": ["a:1"]}
  assert task({"cluster": with_chief, "task": {"type": "chief", "index": 0}}).is_chief
  assert not task({"cluster": with_chief, "task": {"type": "worker", "index": 0}}).is_chief
  with pytest.raises(ValueError, match="ParameterServerStrategy"):
    task({"cluster": {**two, "ps": ["p:1"]}, "task": {"type": "worker", "index": 0}})
  with pytest.raises(ValueError, match="not a task of the cluster"):
    task({"cluster": two, "task": {"type": "worker", "index": 2}})
  with pytest.raises(ValueError, match="not JSON"):
    distribute.cluster_task({distribute.TF_CONFIG: "{"})


def test_train_command_reads_tf_config_and_refuses_parameter_servers(tmp_path):
  """models.train takes its strategy from TF_CONFIG: one with parameter servers is
  refused in one line (exit status 2), before anything is written."""
  workdir = tmp_path / "w"
  config = {"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]},
            "task": {"type": "worker", "index": 0}}
  process = subprocess.run(
      [sys.executable, "-m", "models.train", f"--workdir={workdir}", f"--date={DAY1}"],
      cwd=REPO, capture_output=True, text=True, check=False,
      env={**os.environ, distribute.TF_CONFIG: json.dumps(config)})
  assert process.returncode == 2, process.stderr[-3000:]
  lines = process.stderr.splitlines()
  assert len(lines) == 1 and "ParameterServerStrategy" in lines[0], process.stderr[-3000:]
  assert not workdir.exists()


@pytest.mark.parametrize("epochs", [1, 2])
def test_replica_shares_are_each_global_batch_split_in_order(tmp_path, epochs):
  """Worker 0 (replicas 0, 1) and worker 1 (replica 2) of 3: their slices, in
  turn, are the stream's global batches, from any position; a short last batch
  is split in order too, even into empty slices."""
  workdir = str(tmp_path / "w")
  write_day(workdir, DAY1, world_examples(DAY1, 23, seed=1))
  days = [data.day_files(workdir, DAY1, seed=0)]

  def batches(share: Optional[data.ReplicaShare], skip: int) -> list[list[bytes]]:
    return [list(b["timestamp"].numpy()) for b in data.stream_batches(
        days, 5, skip=skip, epochs=epochs, share=share)]

  # The last batch's rows: 23 x epochs examples from `skip` on, in batches of 5.
  last_split = {(1, 0): [1, 1, 1], (1, 7): [0, 0, 1], (2, 0): [0, 0, 1], (2, 7): [1, 1, 2]}
  for skip in (0, 7):
    whole = batches(None, skip)
    first = batches(data.ReplicaShare(first=0, local=2, total=3), skip)
    second = batches(data.ReplicaShare(first=2, local=1, total=3), skip)
    assert len(first) == 2 * len(second) == 2 * len(whole)
    slices = [(first[2 * i], first[2 * i + 1], second[i]) for i in range(len(whole))]
    assert [a + b + c for a, b, c in slices] == whole
    assert [len(s) for s in slices[-1]] == last_split[epochs, skip]


if __name__ == "__main__":
  worker_main(*sys.argv[1:])

"""The day's Beam job on Beam's DaskRunner over a dask.distributed cluster.

A LocalCluster of two worker processes with one thread each (module fixture, closed
after the module whatever happened, and checked to leave no process behind) runs
days that the in-process engine also runs: the outputs must be the same bytes.
"""

import datetime as dt
import json
import os
import shutil

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
import psutil
import pytest
from distributed import LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from core import workdir as workdir_lib
from models import config as config_lib
from pipeline import beam_day
from pipeline import daily_job
from pipeline import dask_runner
from pipeline import io
from pipeline import synthetic_world
from pipeline import workdir_lock

DAYS = (dt.date(2024, 1, 1), dt.date(2024, 1, 2))
WORLD = synthetic_world.WorldConfig(start_date=DAYS[0], days=len(DAYS), users=150,
                                    items=400, new_items_per_day=20, events_per_day=1200,
                                    bad_line_rate=0.01, seed=5)
# Small tables: the daily job builds its trainer (for the history length) before beam.
TINY = config_lib.ModelConfig(embedding_dim=8, id_embedding_dim=8, item_buckets=512,
                              user_buckets=512, channel_buckets=64, estimator_buckets=512,
                              **config_lib.ONE_PASS)


def _processes() -> set[int]:
  """This process's descendants, but multiprocessing's resource tracker (started
  once by the first spawned process, it lives as long as this process)."""
  pids = set()
  for process in psutil.Process().children(recursive=True):
    try:
      if "resource_tracker" not in " ".join(process.cmdline()):
        pids.add(process.pid)
    except psutil.Error:  # ended while listed
      pass
  return pids


@pytest.fixture(scope="module")
def cluster():
  """2 worker processes x 1 thread; closed after the module, leaving no process."""
  before = _processes()
  with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                    dashboard_address=None) as local:
    yield local
  assert _processes() <= before


class _TaskLog(SchedulerPlugin):
  """Calls `check` (in this process, where the scheduler runs) as each task ends,
  and counts the tasks each worker ran."""

  def __init__(self, check=lambda: None):
    self.check = check
    self.by_worker: dict[str, int] = {}
    self.seen: list = []

  def transition(self, key, start, finish, *args, **kwargs):
    if start == "processing" and finish == "memory":
      worker = kwargs.get("worker", "?")
      self.by_worker[worker] = self.by_worker.get(worker, 0) + 1
      self.seen.append(self.check())


@pytest.fixture
def task_log(cluster):
  """A _TaskLog on the cluster's scheduler for the test's length."""
  log = _TaskLog()
  cluster.scheduler.add_plugin(log, name="task_log")
  yield log
  cluster.scheduler.remove_plugin(name="task_log")


def _dask_args(cluster):
  return ["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]


def _outputs(workdir):
  """{relative path: bytes} of everything the Beam step writes: data/ (examples,
  corpus, dead letters, stats) and state/ (history and catalog states)."""
  out = {}
  for sub in ("data", "state"):
    for path in io.list_files(os.path.join(workdir, sub)):
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_days_on_a_two_worker_cluster_give_the_in_process_bytes(cluster, task_log,
                                                                tmp_path):
  w = str(tmp_path / "w")
  synthetic_world.generate(w, WORLD)
  for day in DAYS:  # the second day reads the first day's history and catalog states
    beam_day.run_day(day, w)
  in_process = _outputs(w)
  for sub in ("data", "state"):
    shutil.rmtree(os.path.join(w, sub))

  for day in DAYS:
    stats = beam_day.run_day(day, w, pipeline_args=_dask_args(cluster))
    assert stats["dead_letters"] > 0 and stats["duplicates"] > 0  # every output has data
  on_dask = _outputs(w)

  assert sorted(on_dask) == sorted(in_process)
  assert any(name.startswith("state/catalog/") for name in in_process)
  for name, data in in_process.items():
    assert on_dask[name] == data, f"{name} differs"
  # The work ran as tasks of the cluster's worker processes, not here.
  assert set(task_log.by_worker) <= set(cluster.scheduler.workers)
  assert sum(task_log.by_worker.values()) > 100


def test_a_damaged_input_fails_the_day_on_the_cluster_naming_the_file(cluster, tmp_path):
  w = str(tmp_path / "w")
  synthetic_world.generate(w, WORLD)
  damaged = io.partition_inputs(workdir_lib.Workdir(w).logs_dir(DAYS[0]))[0]
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 2)
  with pytest.raises(Exception, match=f"cannot read {damaged}"):
    beam_day.run_day(DAYS[0], w, pipeline_args=_dask_args(cluster))
  for sub in ("data", "state"):  # nothing published, no temporaries left
    assert not any(dirs or files for _, dirs, files in os.walk(os.path.join(w, sub))), sub


def _manifest_day(paths):
  """The manifest's record of DAYS[0] ({} when there is none yet)."""
  if not os.path.exists(paths.manifest_path):
    return {}
  with open(paths.manifest_path) as f:
    return json.load(f).get("days", {}).get(DAYS[0].isoformat(), {})


def test_the_daily_job_runs_its_beam_step_on_the_cluster_under_its_lock(
    cluster, task_log, tmp_path):
  w = str(tmp_path / "w")
  synthetic_world.generate(w, WORLD)
  paths = workdir_lib.Workdir(w)

  def lock_and_manifest():
    """(W/.lock is held, the manifest records the day's beam step), as a task ends."""
    try:
      with workdir_lock.WorkdirLock(w):
        held = False
    except workdir_lock.WorkdirLocked:
      held = True
    return held, "beam" in _manifest_day(paths)

  task_log.check = lock_and_manifest
  # The evaluate step after beam fails at once: W/exports is a file.
  with open(os.path.join(w, "exports"), "w") as f:
    f.write("not a directory")
  with pytest.raises(daily_job.DayFailed, match="cannot list the exports"):
    daily_job.run(w, DAYS[0], DAYS[0], config=TINY, pipeline_args=_dask_args(cluster))

  assert task_log.seen and set(task_log.seen) == {(True, False)}
  beam_record = _manifest_day(paths)["beam"]
  with open(paths.stats_path(DAYS[0])) as f:
    stats = json.load(f)
  assert beam_record["examples"] == stats["examples"] > 0
  with workdir_lock.WorkdirLock(w):  # released
    pass


def test_every_branch_runs_outputs_are_routed_and_the_started_cluster_is_closed(
    tmp_path):
  """Without --dask_client_address the runner starts a LocalCluster; it computes
  every branch (Beam's computes only the last step's), routes each output of a
  multi-output ParDo to its own readers (Beam's hands all of them to every reader),
  and leaves no process behind."""

  class Split(beam.DoFn):  # defined here: pickled by value, no test module on workers

    def process(self, n):
      if n % 2:
        yield beam.pvalue.TaggedOutput("odd", n)
      else:
        yield n
      yield beam.pvalue.TaggedOutput("unread", -n)

  def write(values, name):
    (tmp_path / name).write_text(json.dumps(sorted(values)))

  before = _processes()
  options = PipelineOptions(["--runner=DaskRunner"])
  with beam.Pipeline(runner=beam_day._runner(options), options=options) as p:
    split = (p | io.Values(list(range(6)))
             | beam.ParDo(Split()).with_outputs("odd", "unread", main="even"))
    for name in ("even", "odd"):
      _ = (split[name]
           | f"List{name}" >> beam.CombineGlobally(
               beam.combiners.ToListCombineFn()).without_defaults()
           | f"Write{name}" >> beam.Map(write, name))
  assert json.loads((tmp_path / "even").read_text()) == [0, 2, 4]
  assert json.loads((tmp_path / "odd").read_text()) == [1, 3, 5]
  assert _processes() <= before


@pytest.mark.parametrize("name", ["DaskRunner", "dask", "daskrunner",
                                  "apache_beam.runners.dask.dask_runner.DaskRunner"])
def test_dask_runner_is_a_short_name(name):
  options = PipelineOptions([f"--runner={name}"])
  assert isinstance(beam_day._runner(options), dask_runner.DaskRunner)
  beam_day.check_pipeline_args([f"--runner={name}"])


def test_other_runners_are_beams():
  assert isinstance(beam_day._runner(PipelineOptions([])), FnApiRunner)
  assert beam_day._runner(PipelineOptions(["--runner=DataflowRunner"])) is None


def test_without_dask_installed_the_runner_is_refused_saying_what_to_install(
    monkeypatch):
  monkeypatch.setattr(dask_runner, "_IMPORT_ERROR", ImportError("No module named 'dask'"))
  with pytest.raises(ValueError, match=r"pip install -e '\.\[dask\]'"):
    beam_day.check_pipeline_args(["--runner=DaskRunner"])
  beam_day.check_pipeline_args(["--runner=DataflowRunner"])  # others need no dask

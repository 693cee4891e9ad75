"""The daily job's and the demo's command lines: bad arguments fail in one line with
exit status 2 before anything is created, and the terminal carries no library noise."""

import datetime as dt
import os
import re
import subprocess
import sys

from absl import flags
import pytest

from models import ranker as ranker_lib
from models.config import ModelConfig
from models.config import write_config
from core import cli
from pipeline import synthetic_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"cpu_feature_guard|oneDNN|apitools|cuda|cuInit|absl::|"
                   r"^[IWEF]\d{4} |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |"
                   r"^(WARNING|INFO|ERROR)[: ]", re.MULTILINE | re.IGNORECASE)


def _app(module, *args):
  """Runs `python -m module args` with the packages' default logging settings."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, name), root)
                for d, dirs, names in os.walk(root) for name in dirs + names)


def _one_line_error(proc, *words):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert proc.stdout == ""
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for word in words:
    assert word in lines[0], (word, lines[0])


@pytest.fixture
def logs_only(tmp_path):
  """A workdir holding one day of raw logs and catalog, and nothing else."""
  w = str(tmp_path / "w")
  synthetic_world.generate(w, synthetic_world.WorldConfig(start_date=dt.date(2024, 1, 1), days=1,
                                              users=20, items=30, events_per_day=50))
  return w


@pytest.mark.parametrize("bad, words", [
    ("--batchsize=5", ("unknown flag --batchsize", "did you mean --batch_size?")),
    ("--direct_num_workers=two", ("--direct_num_workers", "invalid int value: 'two'")),
    ("--batch_size=abc", ("--batch_size=abc",)),
    ("stray", ("unexpected argument 'stray'",)),
])
def test_bad_flags_fail_before_anything_is_created(logs_only, bad, words):
  before = _files(logs_only)
  proc = _app("pipeline.daily", f"--workdir={logs_only}", "--date=2024-01-01", bad)
  _one_line_error(proc, *words)
  assert _files(logs_only) == before


def test_beam_pipeline_options_pass_the_check(tmp_path):
  # Accepted as Beam options, the run goes on and stops at the missing logs.
  w = str(tmp_path / "none")
  proc = _app("pipeline.daily", f"--workdir={w}", "--date=2024-01-01",
              "--direct_num_workers=2", "--direct_running_mode", "multi_processing")
  _one_line_error(proc, "no log partition for 2024-01-01")
  assert not os.path.exists(w)  # the refused run created no workdir (and no lock)


def test_the_dask_runner_and_its_options_pass_the_check(tmp_path):
  # --runner=DaskRunner is a short name of pipeline.dask_runner (Beam knows none), and
  # Beam's DaskOptions are known: the run goes on and stops at the missing logs.
  w = str(tmp_path / "none")
  proc = _app("pipeline.daily", f"--workdir={w}", "--date=2024-01-01",
              "--runner=DaskRunner", "--dask_client_address=tcp://127.0.0.1:1")
  _one_line_error(proc, "no log partition for 2024-01-01")
  assert not os.path.exists(w)


def test_workdir_that_is_a_file_fails_in_one_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  for workdir in (path, path / "sub"):
    proc = _app("pipeline.daily", f"--workdir={workdir}", "--date=2024-01-01")
    _one_line_error(proc, f"--workdir={workdir}", "not a directory")


def test_filesystem_root_is_refused_and_left_alone():
  existed = os.path.exists("/.lock")
  proc = _app("pipeline.daily", "--workdir=/", "--date=2024-01-01")
  _one_line_error(proc, "--workdir=/", "root")
  assert os.path.exists("/.lock") == existed


def test_config_errors_fail_before_the_lock(logs_only):
  write_config(ModelConfig(embedding_dim=16), os.path.join(logs_only, "config.json"))
  before = _files(logs_only)
  proc = _app("pipeline.daily", f"--workdir={logs_only}", "--date=2024-01-01",
              '--config_overrides={"embedding_dim": 32}')
  _one_line_error(proc, os.path.join(logs_only, "config.json"), "embedding_dim: 16 != 32")
  proc = _app("pipeline.daily", f"--workdir={logs_only}", "--date=2024-01-01",
              "--config_overrides={bad")
  _one_line_error(proc, "--config_overrides={bad", "not JSON")
  assert _files(logs_only) == before


@pytest.mark.parametrize("module", ["pipeline.daily", "pipeline.demo"])
def test_help_is_free_of_library_noise(module):
  proc = _app(module, "--help")
  assert not NOISE.search(proc.stdout + proc.stderr), NOISE.search(proc.stdout + proc.stderr)
  assert "--workdir" in proc.stdout
  assert proc.stderr == ""


def test_demo_refuses_a_misspelt_flag(tmp_path):
  proc = _app("pipeline.demo", f"--workdir={tmp_path / 'demo'}", "--demo_dayz=2")
  _one_line_error(proc, "unknown flag --demo_dayz", "did you mean --demo_days?")
  assert not os.path.exists(tmp_path / "demo")


def test_check_beam_args():
  ok = ["--runner=DirectRunner", "--direct_num_workers", "2", "--project=p",
        "--temp_location=gs://b/t", "--flink_master=h:8081", "--environment_type=PROCESS",
        "--setup_file=./setup.py"]
  assert cli.check_beam_args(ok) == ok
  assert cli.check_beam_args([]) == []
  for bad, message in ((["--runer=X"], "unknown flag --runer"),
                       (["--runner"], "--runner: expected one argument"),
                       (["--direct_running_mode=fast"], "invalid choice: 'fast'"),
                       (["-h"], "use --help")):
    with pytest.raises(flags.Error, match=re.escape(message)):
      cli.check_beam_args(bad)


def test_ranker_override_errors_fail_before_anything_is_created(logs_only):
  """--ranker_overrides: only with --ranker, known fields, the saved architecture."""
  before = _files(logs_only)
  proc = _app("pipeline.daily", f"--workdir={logs_only}", "--date=2024-01-01",
              '--ranker_overrides={"negatives": 2}')
  _one_line_error(proc, "--ranker_overrides needs --ranker")
  proc = _app("pipeline.daily", f"--workdir={logs_only}", "--date=2024-01-01",
              "--ranker", '--ranker_overrides={"negatvies": 2}')
  _one_line_error(proc, "unknown RankerConfig fields: ['negatvies']")
  assert _files(logs_only) == before
  ranker_lib.write_config(logs_only, ranker_lib.RankerConfig(cross_layers=2))
  before = _files(logs_only)
  proc = _app("pipeline.daily", f"--workdir={logs_only}", "--date=2024-01-01",
              "--ranker", '--ranker_overrides={"cross_layers": 3}')
  _one_line_error(proc, os.path.join("ranker", "config.json"), "cross_layers: 2 != 3")
  assert _files(logs_only) == before

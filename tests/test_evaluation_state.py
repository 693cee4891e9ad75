"""The evaluation's persisted running total (W/state/evaluation): a new process, a
rebuild from W/data, damage to the file, rewritten days and kills all give the figures
of an evaluation built from W/data alone, and no day is counted twice."""

import datetime
import gzip
import os
import shutil
import zipfile

import numpy as np
import pytest

from core import workdir as workdir_lib
from evaluation import evaluator
from evaluation import records
from models import data
from serving import corpus as corpus_lib
from serving import exporter
from serving import index
import serving_testlib as tl

N = 40
ITEMS = [f"i{j:03d}" for j in range(N)]
DAYS = [tl.DAY + datetime.timedelta(days=n) for n in range(9)]
EVENTS_PER_DAY = 30


def _write_day(workdir, n, rng, histories, shards=3):
  """Day n: users with repeat and fresh items (some outside the corpus), histories
  carried as Beam carries them, in `shards` files in time order."""
  day = DAYS[n]
  rows = []
  for e in range(EVENTS_PER_DAY):
    user = f"u{rng.integers(8)}"
    history = histories.setdefault(user, [])
    if history and rng.random() < 0.3:
      item = history[rng.integers(len(history))]  # a re-consumption
    elif rng.random() < 0.1:
      item = f"x{rng.integers(3)}"  # not in the export's corpus
    else:
      item = ITEMS[rng.integers(N)]
    rows.append(tl.event_row(f"{day}-{e}", user, item, seed=history[0] if history else "",
                             history=history[:5], timestamp=1_709_600_000 + 86_400 * n + e))
    histories[user] = [item] + history
  directory = tl.day_dir(workdir, day)
  for shard in range(shards):
    tl.write_records(os.path.join(directory, f"examples-{shard:02d}.tfrecord.gz"),
                     rows[shard * len(rows) // shards:(shard + 1) * len(rows) // shards])
  return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Nine data days and an export labelled with the first (scored on every later day)."""
  workdir = str(tmp_path_factory.mktemp("state_world"))
  rng = np.random.default_rng(7)
  histories = {}
  for n in range(len(DAYS)):
    _write_day(workdir, n, rng, histories)
  tl.write_records(os.path.join(tl.day_dir(workdir, DAYS[0]), "corpus-00.tfrecord.gz"),
                   [tl.corpus_row(i) for i in ITEMS])
  orders = [list(rng.permutation(N)) for _ in range(N)]
  params = index.ScannParams(num_leaves=4, num_leaves_to_search=4,
                             num_reordering_candidates=N)
  exported = exporter.export_day(
      tl.planted_towers(ITEMS, orders), tl.tiny_config(), workdir, DAYS[0],
      exporter.ExportSettings(export_k=N, scann_params=params),
      trained=tl.position(DAYS[0], EVENTS_PER_DAY, True))
  return workdir, exported, exporter.LoadedExports()


@pytest.fixture
def workdir(world, tmp_path):
  """A copy of the world, without any evaluation yet."""
  path = str(tmp_path / "w")
  shutil.copytree(world[0], path)
  return path


def _fresh(world):
  """The state of a new process (the exports, loaded once for all tests, aside)."""
  return evaluator.EvaluationState(exports=world[2])


def _evaluate(world, workdir, n, state=None):
  exported = world[1]
  return evaluator.evaluate_day(workdir, DAYS[n], exported["scann_dir"],
                                exported["exact_dir"], state=state or _fresh(world),
                                plot=False)


def _rebuilt(world, workdir, n):
  """Day n's metrics from W/data alone: no persisted state, a fresh process."""
  shutil.rmtree(workdir_lib.Workdir(workdir).eval_state_dir, ignore_errors=True)
  return _evaluate(world, workdir, n, _fresh(world))


def _examples_before(workdir, n):
  return sum(len(records.read_columns(data.example_files(workdir, d),
                                      ("item_id",))["item_id"]) for d in DAYS[:n])


@pytest.fixture
def reads(monkeypatch):
  """The days whose examples are read, one entry per read (whole, or in chunks)."""
  days = []
  real = records.iter_columns

  def counting(files, *args, **kwargs):
    days.extend(sorted({os.path.basename(os.path.dirname(f)) for f in files}))
    return real(files, *args, **kwargs)

  monkeypatch.setattr(records, "iter_columns", counting)
  return days


def test_a_new_process_resumes_from_the_state_with_the_figures_of_a_rebuild(
    world, workdir, reads):
  state = _fresh(world)
  for n in range(1, 7):  # the daily job: one state from day to day
    _evaluate(world, workdir, n, state)
  # Day n's events are read once, to score them, and not again to add them.
  assert reads == [d.isoformat() for d in DAYS[:7]]
  del reads[:]
  # A new process: the state file covers days 0..5; it reads day 6 and day 7 alone.
  resumed = _evaluate(world, workdir, 7, _fresh(world))
  assert reads == [DAYS[6].isoformat(), DAYS[7].isoformat()]
  continued = _evaluate(world, workdir, 7, state)
  rebuilt = _rebuilt(world, workdir, 7)
  assert resumed == rebuilt
  assert continued == rebuilt
  assert rebuilt["training_days"] == [d.isoformat() for d in DAYS[:7]]
  assert rebuilt["num_training_events"] == _examples_before(workdir, 7)
  assert rebuilt["num_events_seen_excluded"] < rebuilt["num_events"]  # re-consumptions
  assert 0 < rebuilt["target_in_corpus"] < 1


def _flipped(member):
  """A counts.npy with 2**56 added to its first count (little-endian int64)."""
  at = member.index(b"\n") + 1 + 7  # the .npy header ends with a newline
  return member[:at] + bytes([member[at] ^ 0x01]) + member[at + 1:]


def _flip_first_count(path):
  """Flips the bit of the first count inside the file: its zip CRC no longer matches."""
  with zipfile.ZipFile(path) as z:
    info = z.getinfo("counts.npy")
    member = z.read("counts.npy")
  with open(path, "rb") as f:
    content = f.read()
  name_and_extra = 30 + int.from_bytes(content[info.header_offset + 26:
                                               info.header_offset + 28], "little") + (
      int.from_bytes(content[info.header_offset + 28:info.header_offset + 30], "little"))
  start = info.header_offset + name_and_extra
  assert content[start:start + len(member)] == member  # stored, not compressed
  with open(path, "wb") as f:
    f.write(content[:start] + _flipped(member) + content[start + len(member):])


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "garbage",
                                    "stale_temp_file_beside"])
def test_a_missing_or_damaged_state_is_rebuilt_not_trusted(world, workdir, damage):
  _evaluate(world, workdir, 6)
  want = _rebuilt(world, workdir, 7)
  path = workdir_lib.Workdir(workdir).eval_state_path
  if damage == "missing":
    os.remove(path)
  elif damage == "truncated":
    with open(path, "rb") as f:
      content = f.read()
    with open(path, "wb") as f:
      f.write(content[:len(content) // 2])
  elif damage == "flipped":
    _flip_first_count(path)
  elif damage == "garbage":
    with open(path, "wb") as f:
      f.write(b"not a state")
  else:  # a kill in the middle of atomic_write leaves its temp file, never the file
    with open(f"{path}.tmp-1-deadbeef", "wb") as f:
      f.write(b"half a stat")
  got = _evaluate(world, workdir, 7, _fresh(world))
  assert got == want
  # The file is whole again: a new total loads it without reading a day.
  total = records.TrainingInteractions().before(workdir, DAYS[7])
  assert total.num_events == want["num_training_events"]


def test_the_flipped_count_would_change_the_figures_if_trusted(world, workdir):
  """What test_a_missing_or_damaged_state_is_rebuilt_not_trusted[flipped] guards
  against: the same bytes with a fresh CRC load, and count 2**56 more events."""
  _evaluate(world, workdir, 7)
  path = workdir_lib.Workdir(workdir).eval_state_path
  with zipfile.ZipFile(path) as z:
    members = {name: z.read(name) for name in z.namelist()}
  members["counts.npy"] = _flipped(members["counts.npy"])
  with zipfile.ZipFile(path, "w") as z:  # written again: CRCs of the flipped bytes
    for name, content in members.items():
      z.writestr(name, content)
  total = records.TrainingInteractions()
  total._load(path)  # pylint: disable=protected-access
  assert total.num_events == _examples_before(workdir, 7) + 2 ** 56


def _publish_day(workdir, n, rows):
  """Replaces day n as Beam does: a new directory renamed into place."""
  final = tl.day_dir(workdir, DAYS[n])
  tmp = final + ".tmp"
  tl.write_records(os.path.join(tmp, "examples-00.tfrecord.gz"), rows)
  shutil.rmtree(final)
  os.rename(tmp, final)


def test_a_rewritten_or_removed_earlier_day_rebuilds_the_state(world, workdir):
  state = _fresh(world)
  before = _evaluate(world, workdir, 7, state)
  path = workdir_lib.Workdir(workdir).eval_state_path
  with open(path, "rb") as f:
    covering_the_old_day = f.read()
  # A forced re-run of day 3 publishes it again, with a third of its events.
  rows = records.read_columns(data.example_files(workdir, DAYS[3]),
                              ("user_id", "item_id", "timestamp"))
  _publish_day(workdir, 3, [tl.event_row(f"r{j}", user.decode(), item.decode(),
                                         timestamp=int(ts))
                            for j, (user, item, ts) in enumerate(zip(
                                rows["user_id"], rows["item_id"], rows["timestamp"]))
                            if j % 3 == 0])
  for source in (state, _fresh(world)):  # this process, a new one
    workdir_lib.atomic_write(path, covering_the_old_day)
    got = _evaluate(world, workdir, 7, source)
    assert got["num_training_events"] == before["num_training_events"] - 20
    assert got == _rebuilt(world, workdir, 7)
  # Day 5 removed.
  shutil.rmtree(tl.day_dir(workdir, DAYS[5]))
  got = _evaluate(world, workdir, 7, state)
  assert DAYS[5].isoformat() not in got["training_days"]
  assert got == _rebuilt(world, workdir, 7)


class _Killed(Exception):
  pass


def test_a_kill_at_any_point_counts_no_day_twice(world, workdir, monkeypatch, reads):
  want = {n: _rebuilt(world, workdir, n) for n in (6, 7, 8)}
  shutil.rmtree(workdir_lib.Workdir(workdir).eval_state_dir)
  _evaluate(world, workdir, 6)
  # Killed after the state covers days 0..6, before day 7's metrics are written.
  with monkeypatch.context() as m:
    m.setattr(evaluator, "write_metrics", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
      _evaluate(world, workdir, 7)
  again = _evaluate(world, workdir, 7)  # the step runs again, in a new process
  assert again == want[7]
  # Killed while writing the state of day 8: the temp file is all it wrote.
  real = workdir_lib.atomic_write

  def killed_writing(path, content):
    if path.endswith(workdir_lib.EVAL_STATE):
      with open(f"{path}.tmp-2-cafe", "wb") as f:
        f.write(content[:100])
      raise _Killed()
    return real(path, content)

  with monkeypatch.context() as m:
    m.setattr(workdir_lib, "atomic_write", killed_writing)
    with pytest.raises(_Killed):
      _evaluate(world, workdir, 8)
  state = _fresh(world)
  assert _evaluate(world, workdir, 8, state) == want[8]
  # The same day twice in one process, and an earlier day after a later one.
  assert _evaluate(world, workdir, 8, state) == want[8]
  assert _evaluate(world, workdir, 6, state) == want[6]
  assert _evaluate(world, workdir, 8, state) == want[8]
  # The earlier day did not shorten the file: it still covers days 0..7.
  del reads[:]
  total = records.TrainingInteractions().before(workdir, DAYS[8])
  assert total.day_names == [d.isoformat() for d in DAYS[:8]] and reads == []
  assert total.num_events == _examples_before(workdir, 8)


def test_a_day_directory_that_keeps_its_stamp_keeps_its_files_unlisted(tmp_path):
  """list_days stats each file only of a day whose directory changed (or is recent)."""
  workdir = str(tmp_path)
  rng = np.random.default_rng(1)
  _write_day(workdir, 0, rng, {})
  directory = tl.day_dir(workdir, DAYS[0])
  old = 1_600_000_000_000_000_000
  os.utime(directory, ns=(old, old))
  (stamp, files), = records.list_days(workdir).values()
  assert stamp is not None and [name for name, _, _ in files] == [
      f"examples-{s:02d}.tfrecord.gz" for s in range(3)]
  planted = (stamp, (("planted", 1, 1),))
  assert records.list_days(workdir, {DAYS[0]: planted}) == {DAYS[0]: planted}
  # A file removed changes the directory, so its files are listed again.
  os.remove(os.path.join(directory, "examples-02.tfrecord.gz"))
  (_, files), = records.list_days(workdir, {DAYS[0]: planted}).values()
  assert [name for name, _, _ in files] == ["examples-00.tfrecord.gz",
                                            "examples-01.tfrecord.gz"]
  # Modified within the racy window: no stamp, so the files are always listed.
  os.utime(directory, ns=(old, old))
  stamp, _ = records.list_days(workdir)[DAYS[0]]
  os.utime(directory)
  recent, _ = records.list_days(workdir)[DAYS[0]]
  assert stamp is not None and recent is None


def test_read_columns_matches_tensorflow_and_names_a_corrupt_file(world, tmp_path):
  files = data.example_files(world[0], DAYS[2])
  names = ("user_id", "history_item_ids", "timestamp", "item_id")
  got = records.read_columns(files, names, max_history=4)
  want = corpus_lib.read_columns(files, names, max_history=4)
  assert set(got) == set(want)
  for name in names:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert got["history_item_ids"].shape == (EVENTS_PER_DAY, 4)
  with open(files[1], "rb") as f:
    content = f.read()
  raw = bytearray(gzip.decompress(content))
  raw[len(raw) // 2] ^= 0xFF
  broken = str(tmp_path / "examples-01.tfrecord.gz")
  with open(broken, "wb") as f:
    f.write(gzip.compress(bytes(raw)))
  with pytest.raises(ValueError, match=r"examples-01.tfrecord.gz: record \d+ .*CRC"):
    records.read_columns([files[0], broken], names)
  with open(broken, "wb") as f:
    f.write(content[:len(content) // 2])
  with pytest.raises(ValueError, match="examples-01.tfrecord.gz: not a whole gzip"):
    records.read_columns([files[0], broken], names)


def test_seen_items_are_history_earlier_days_and_earlier_events_of_the_day(workdir):
  day = DAYS[5]
  events = records.read_events(workdir, day, 5)
  earlier = records.read_columns(
      [f for d in DAYS[:5] for f in data.example_files(workdir, d)],
      ("user_id", "item_id"))
  prior = {}
  for user, item in zip(earlier["user_id"].tolist(), earlier["item_id"].tolist()):
    prior.setdefault(user, set()).add(item)
  want, today = [], {}
  for user, history, item in zip(events["user_id"].tolist(),
                                 events["history_item_ids"].tolist(),
                                 events["item_id"].tolist()):
    want.append({h for h in history if h} | prior.get(user, set()) | today.get(user, set()))
    today.setdefault(user, set()).add(item)
  training = records.TrainingInteractions().before(workdir, day)
  seen = records.SeenItems.of(events, training)
  assert [set(s) for s in seen.sets()] == want
  assert [set(s) for s in records.seen_sets(events, training.seen)] == want
  novel = [i for i, (t, s) in enumerate(zip(events["item_id"].tolist(), want)) if t not in s]
  assert seen.novel_rows().tolist() == novel and 0 < len(novel) < len(want)
  matrix = seen.matrix(np.array(novel))
  assert matrix.shape == (len(novel), max(len(want[i]) for i in novel))
  assert [set(row) - {b""} for row in matrix.tolist()] == [want[i] for i in novel]


def test_a_day_evaluated_without_its_plot_gets_it_drawn_from_its_metrics(world, workdir):
  _evaluate(world, workdir, 1)  # plot=False
  directory = workdir_lib.Workdir(workdir).eval_dir(DAYS[1])
  assert os.listdir(directory) == [workdir_lib.METRICS]
  path = evaluator.plot_day(workdir, DAYS[1])
  assert path == os.path.join(directory, evaluator.PLOT_FILE)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(FileNotFoundError, match="was not evaluated"):
    evaluator.plot_day(workdir, DAYS[2])

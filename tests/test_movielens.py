"""The MovieLens converter on tiny fixtures of both formats (no real data committed)."""

import datetime as dt
import glob
import gzip
import json
import os
import subprocess
import sys

import pytest

from pipeline import movielens_convert
from pipeline import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = 86400
T0 = 978307200  # 2001-01-01T00:00:00Z


def _read(root, kind):
  out = {}
  for path in sorted(glob.glob(os.path.join(root, kind, "*", "*.jsonl.gz"))):
    with gzip.open(path, "rt", encoding="utf-8") as f:
      out.setdefault(path.split(os.sep)[-2], []).extend(json.loads(l) for l in f)
  return out


@pytest.fixture
def csv_dir(tmp_path):
  d = tmp_path / "ml-latest-small"
  d.mkdir()
  (d / "movies.csv").write_text(
      "movieId,title,genres\n"
      '1,Toy Story (1995),Adventure|Animation|Children\n'
      '2,"Shawshank Redemption, The (1994)",Drama\n'
      "3,Untitled,(no genres listed)\n"
      "4,Never Rated (2001),Comedy\n", encoding="utf-8")
  (d / "ratings.csv").write_text(
      "userId,movieId,rating,timestamp\n"
      f"1,1,4.0,{T0 + 10}\n"
      f"1,2,5.0,{T0 + 20}\n"
      f"2,1,2.5,{T0 + DAY + 5}\n"
      "2,3,oops,123\n"
      f"3,3,0.5,{T0 + 9 * DAY}\n", encoding="utf-8")
  return str(d)


@pytest.fixture
def u_dir(tmp_path):
  d = tmp_path / "ml-100k"
  d.mkdir()
  flags = ["0"] * 19
  action = list(flags)
  action[1] = "1"
  drama = list(flags)
  drama[8] = "1"
  (d / "u.item").write_bytes(
      ("1|Les Misérables (1995)|01-Jan-1995||http://x|" + "|".join(action) + "\n"
       "2|Some Film|01-Jan-1996||http://y|" + "|".join(drama) + "\n"
       "3|Broken|row\n").encode("latin-1"))
  (d / "u.data").write_text(
      f"10\t1\t3\t{T0}\n"
      f"11\t2\t5\t{T0 + 2 * DAY}\n"
      f"12\t2\t4\n", encoding="utf-8")
  return str(d)


def test_csv_format_days_rewards_topics_and_report(csv_dir, tmp_path):
  out = str(tmp_path / "out")
  report = movielens_convert.convert(csv_dir, out)
  logs, catalog = _read(out, "logs"), _read(out, "catalog")
  assert sorted(logs) == ["2001-01-01", "2001-01-02", "2001-01-10"]
  first = logs["2001-01-01"]
  assert [e["item_id"] for e in first] == ["movie_1", "movie_2"]
  assert first[0]["reward"] == 0.8 and first[0]["ts"] == T0 + 10
  assert logs["2001-01-02"][0]["reward"] == 0.5
  for day, events in logs.items():
    for e in events:
      assert isinstance(schema.validate_event(json.dumps(e), dt.date.fromisoformat(day),
                                              max_skew_s=0), schema.Event)
  items = {c["item_id"]: c for cs in catalog.values() for c in cs}
  assert items["movie_1"]["topics"] == ["Adventure", "Animation", "Children", "decade_1990s"]
  assert items["movie_1"]["topic_weights"] == [1.0, 1.0, 1.0, 0.5]
  assert items["movie_1"]["year"] == 1995
  assert items["movie_2"]["year"] == 1994
  assert items["movie_3"]["topics"] == [] and "year" not in items["movie_3"]
  # Never-rated movies go into the first partition; others where first rated.
  assert {c["item_id"] for c in catalog["2001-01-01"]} == {"movie_1", "movie_2", "movie_4"}
  assert [c["item_id"] for c in catalog["2001-01-10"]] == ["movie_3"]
  assert report["format"] == "csv" and report["events"] == 4
  assert report["skipped_total"] == 1
  assert report["examples"][0]["line"] == 5
  assert report["examples"][0]["file"].endswith("ratings.csv")
  with open(os.path.join(out, "movielens_report.json")) as f:
    assert json.load(f)["skipped_total"] == 1


def test_period_days_groups_calendar_days(csv_dir, tmp_path):
  out = str(tmp_path / "out")
  movielens_convert.convert(csv_dir, out, period_days=7)
  logs = _read(out, "logs")
  assert sorted(logs) == ["2001-01-01", "2001-01-08"]
  assert len(logs["2001-01-01"]) == 3 and len(logs["2001-01-08"]) == 1


def test_100k_format_latin1_and_genre_flags(u_dir, tmp_path):
  out = str(tmp_path / "out")
  report = movielens_convert.convert(u_dir, out)
  assert report["format"] == "100k"
  items = {c["item_id"]: c for cs in _read(out, "catalog").values() for c in cs}
  assert items["movie_1"]["topics"] == ["Action", "decade_1990s"]
  assert items["movie_1"]["year"] == 1995
  assert items["movie_2"]["topics"] == ["Drama", "decade_1990s"]  # year from release date
  logs = _read(out, "logs")
  assert logs["2001-01-01"][0]["reward"] == 0.6
  assert report["skipped"] == {"u.item: bad row": 1, "u.data: expected 4 columns, got 3": 1}


def test_strict_names_file_and_line(u_dir, tmp_path):
  with pytest.raises(movielens_convert.MalformedRow, match=r"u\.item:3: bad row"):
    movielens_convert.convert(u_dir, str(tmp_path / "out"), strict=True)


def test_unknown_format_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no ratings.csv"):
    movielens_convert.convert(str(tmp_path), str(tmp_path / "out"))


def test_the_command_fails_in_one_line_naming_file_and_line(u_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "pipeline.movielens", f"--input={u_dir}",
       f"--out={tmp_path / 'out'}", "--strict"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {u_dir}/u.item:3: bad row: '3|Broken|row'"]

"""The daily job's report: its table, eval/summary.json, eval/summary.png, the progress line."""

import datetime as dt
import json
import math
import os

import numpy as np
import pytest

from core import workdir as workdir_lib
from pipeline import daily_job
from pipeline import report

START = dt.date(2024, 1, 1)


def _recall(base):
  """Recall figures of every method, both modes: base + method offset + K offset."""
  return {mode: {method: {k: round(base + m / 10 + j / 100, 3)
                          for j, k in enumerate(("10", "50", "100"))}
                 for m, method in enumerate(report.METHODS)}
          for mode in ("all", "seen_excluded")}


def _days(num_days=12):
  """Manifest days: the first without an export, then days of 1 to 100 events."""
  days = {}
  for i in range(num_days):
    day = (START + dt.timedelta(days=i)).isoformat()
    events = 1 if i % 3 else 100  # days of one event among bigger ones
    steps = {"beam": {"examples": events, "dead_letters": 0},
             "train": {"mean_loss": 1.5, "global_step": 10 * i}}
    if i == 0:
      steps["evaluate"] = {"skipped": "no export yet: nothing trained before this day"}
    else:
      steps["evaluate"] = {"export_version": i, "exported_from_day": day,
                           "recall": _recall(0.6 if events == 1 and i % 2 else 0.0)}
    days[day] = steps
  days["2024-01-20"] = {"skipped": {"reason": "no log partition"}}
  return days


def test_table_has_a_column_group_per_method_covisitation_included():
  lines = report.table(_days(4)).splitlines()
  assert lines[0].split()[3:] == ["exact@10/50/100", "scann@10/50/100",
                                  "popul@10/50/100", "covis@10/50/100"]
  assert lines[2].split()[3:] == ["-"] * 12  # no export on the first day
  # Day 3: base 0.0; methods 0.0 0.1 0.2 0.3 (covisitation), + 0.01 per K.
  assert lines[4].split() == ["2024-01-03", "1", "1.500", "0.000", "0.010", "0.020",
                              "0.100", "0.110", "0.120", "0.200", "0.210", "0.220",
                              "0.300", "0.310", "0.320"]
  assert len({len(line) for line in lines[:6]}) == 1  # the columns line up


def test_summary_json_and_plot_carry_covisitation(tmp_path):
  workdir = workdir_lib.Workdir(str(tmp_path))
  days = _days()
  written = report.update(workdir, days, START + dt.timedelta(days=11))
  with open(written["summary"]) as f:
    rows = json.load(f)["days"]
  assert [r["day"] for r in rows] == sorted(d for d in days if "beam" in days[d])
  assert rows[0]["recall"] is None
  assert rows[1]["recall"]["all"]["covisitation"] == {"10": 0.9, "50": 0.91, "100": 0.92}
  assert rows[1]["recall"]["seen_excluded"]["covisitation"]["10"] == 0.9
  with open(written["plot"], "rb") as f:
    image = f.read()
  assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 20_000
  assert not [p for p in os.listdir(workdir.eval_root) if p.startswith(".")]  # atomic


def test_the_summary_is_its_rows_json_and_follows_a_day_run_again(tmp_path, monkeypatch):
  workdir = workdir_lib.Workdir(str(tmp_path))
  days = _days(6)
  through = START + dt.timedelta(days=4)
  kept = report.Report(workdir)

  def expected():
    rows = [report._row(d, steps) for d, steps in sorted(days.items())
            if d <= through.isoformat() and "beam" in steps]
    return json.dumps({"days": rows}, indent=1)  # what the summary always held

  path = kept.update(days, through)["summary"]
  with open(path) as f:
    assert f.read() == expected()
  days["2024-01-03"]["train"]["mean_loss"] = 0.25  # e.g. the day was run again
  encoded = []
  dumps = json.dumps
  monkeypatch.setattr(json, "dumps", lambda *a, **k: encoded.append(dumps(*a, **k))
                      or encoded[-1])
  kept.update(days, through)
  monkeypatch.setattr(json, "dumps", dumps)
  assert len(encoded) == 1  # that day's row alone is encoded again
  with open(path) as f:
    text = f.read()
  assert text == expected() and json.loads(text)["days"][2]["mean_loss"] == 0.25
  report.Report(workdir).update({}, through)
  with open(path) as f:
    assert f.read() == json.dumps({"days": []}, indent=1)


def test_the_plot_draws_each_series_as_one_artist_whatever_the_days(tmp_path,
                                                                     monkeypatch):
  figures = []
  monkeypatch.setattr(report.plots, "write_png", lambda fig, path: figures.append(fig))
  days = _days(30)
  rows = [report._row(d, steps) for d, steps in sorted(days.items()) if "beam" in steps]
  report._plot(rows, str(tmp_path / "summary.png"))
  top, _, bottom, _ = figures[0].axes
  assert len(top.lines) == 2 * len(report.METHODS) * len(report.KS)  # dots and means
  assert not bottom.patches and len(bottom.collections) == 1  # not a bar per day
  bars = bottom.collections[0]
  heights = [path.vertices[:, 1].max() for path in bars.get_paths()]
  assert heights == [r["examples"] for r in rows]
  assert len({tuple(c) for c in bars.get_facecolors()}) == 2  # scored, not scored
  assert bottom.get_ylim() == pytest.approx((0, 105))


@pytest.mark.parametrize("num_days", [1, 2])
def test_plot_of_one_unscored_day_or_one_scored_day(tmp_path, num_days):
  path = str(tmp_path / "summary.png")
  report._plot([report._row(d, s) for d, s in list(_days(num_days).items())[:num_days]],
               path)
  assert os.path.getsize(path) > 20_000


def test_rolling_mean_weights_days_by_events_over_calendar_days():
  days = [START + dt.timedelta(days=n) for n in (0, 1, 2, 9)]
  # A one-event day at 1.0 beside a 99-event day at 0.0 moves the mean by 1/100.
  mean = report.rolling_mean(days, [0.0, 1.0, None, 0.5], [99, 1, 50, 10])
  assert mean[0] == 0.0
  assert mean[1] == pytest.approx(0.01)
  assert mean[2] == pytest.approx(0.01)  # None does not count, whatever its weight
  assert mean[3] == pytest.approx(0.5)  # 9 days on: the others left the window
  assert math.isnan(report.rolling_mean(days[:1], [None], [5])[0])
  assert report.rolling_mean([], [], []).shape == (0,)
  # The window is calendar days: day 6 still counts at day 6, not at day 7.
  week = [START + dt.timedelta(days=n) for n in (0, 6, 7)]
  np.testing.assert_allclose(report.rolling_mean(week, [1.0, 0.0, 0.0], [1, 1, 2]),
                             [1.0, 0.5, 0.0])


def test_progress_line_of_the_evaluate_step_names_covisitation():
  record = {"recall": _recall(0.0), "export_version": 3, "exported_from_day": "2024-01-02"}
  line = daily_job._summary("evaluate", record)
  assert line == ("R@10 exact 0.000, scann 0.100, popularity 0.200, covisitation 0.300 "
                  "(export 3 of 2024-01-02)")


def test_a_mode_is_weighted_by_the_events_it_scored():
  steps = {"beam": {"examples": 10},
           "evaluate": {"recall": {}, "scored_events": {"all": 10, "seen_excluded": 3}}}
  row = report._row("2024-01-02", steps)
  assert report._weight(row, "all") == 10
  assert report._weight(row, "seen_excluded") == 3
  older = report._row("2024-01-02", {"beam": {"examples": 10}, "evaluate": {"recall": {}}})
  assert report._weight(older, "seen_excluded") == 10  # recorded before the counts

"""The running report of the daily job: `eval/summary.json`, `eval/summary.png`, a table.

Each day contributes one row built from its manifest records: the events the Beam
job kept, the trainer's mean loss, and the test-then-train recall of the export
made before the day (ScaNN, exact, and the popularity and co-visitation baselines).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.collections import PolyCollection  # noqa: E402
import matplotlib.dates as mdates  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core import workdir as workdir_lib  # noqa: E402
from evaluation import plots  # noqa: E402

METHODS = ("exact", "scann", "popularity", "covisitation")
KS = ("10", "50", "100")
# The summary plot's main lines: the event-weighted mean of this many days.
ROLLING_DAYS = 7
_K_STYLES = {"10": "-", "50": "--", "100": ":"}
_MODES = {"all": "all events", "seen_excluded": "seen items excluded"}
_SCORED, _NOT_SCORED = "tab:gray", "lightgray"
_MARGINS = {"left": 0.067, "right": 0.962, "bottom": 0.223, "top": 0.944, "wspace": 0.153,
            "hspace": 0.178}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
  """The recall figures of an evaluation: {mode: {method: {k: recall}}}."""
  return metrics["recall"]


def _weight(row: dict[str, Any], mode: str) -> float:
  """The events `row`'s day scored in `mode`: the weight of its recall."""
  return (row.get("scored_events") or {}).get(mode, row.get("examples") or 0)


def _row(day: str, steps: dict[str, Any]) -> dict[str, Any]:
  evaluate = steps.get("evaluate", {})
  train = steps.get("train", {})
  return {
      "day": day,
      "examples": steps.get("beam", {}).get("examples"),
      "dead_letters": steps.get("beam", {}).get("dead_letters"),
      "mean_loss": train.get("mean_loss"),
      "global_step": train.get("global_step"),
      "recall": evaluate.get("recall"),
      "scored_events": evaluate.get("scored_events"),
      "export": steps.get("export", {}).get("version"),
  }


class Report:
  """The running report of one workdir, kept from day to day by the daily job.

  A day's report costs the same on day 1000 as on day 1: each day's row of
  summary.json is encoded once and kept (again only when its manifest record
  changes), and the plot draws each series as one artist, so the figure's layout
  and rendering, not the days, set its cost.
  """

  def __init__(self, workdir: workdir_lib.Workdir):
    self.workdir = workdir
    self._encoded: dict[str, tuple[dict[str, Any], str]] = {}

  def _encode(self, row: dict[str, Any]) -> str:
    """`row` as it sits in summary.json's "days" list (json.dumps, indent=1)."""
    cached = self._encoded.get(row["day"])
    if cached is None or cached[0] != row:
      text = "\n".join("  " + line
                       for line in json.dumps(row, indent=1).splitlines())
      cached = self._encoded[row["day"]] = (row, text)
    return cached[1]

  def update(self, days: dict[str, dict[str, Any]], through: dt.date) -> dict[str, str]:
    """Rewrites the summary JSON and plot from every day up to `through`."""
    rows = [_row(d, steps) for d, steps in sorted(days.items())
            if d <= through.isoformat() and "beam" in steps]
    # What json.dumps({"days": rows}, indent=1) writes, from each row's kept text.
    body = ",\n".join(self._encode(row) for row in rows)
    summary = workdir_lib.atomic_write(
        self.workdir.join("eval", workdir_lib.SUMMARY),
        '{\n "days": [\n' + body + "\n ]\n}" if rows else '{\n "days": []\n}')
    plot = self.workdir.join("eval", workdir_lib.SUMMARY_PLOT)
    _plot(rows, plot)
    return {"summary": summary, "plot": plot}


def update(workdir: workdir_lib.Workdir, days: dict[str, dict[str, Any]],
           through: dt.date) -> dict[str, str]:
  """`Report.update` once, for a caller that keeps no report between days."""
  return Report(workdir).update(days, through)


def _recall(row: dict[str, Any], mode: str, method: str, k: str) -> Optional[float]:
  value = (row.get("recall") or {}).get(mode, {}).get(method, {}).get(k)
  return None if value is None else float(value)


def rolling_mean(days: Sequence[dt.date], values: Sequence[Optional[float]],
                 weights: Sequence[float], window: int = ROLLING_DAYS) -> np.ndarray:
  """At each day, the weighted mean of `values` over the `window` calendar days
  ending there (days D-window+1..D).

  A day with one event then moves the line by 1/total of the window's events, not
  to 0 or 1. Days whose value is None or whose weight is 0 do not count; NaN
  where no day of the window counts.
  """
  if not days:
    return np.zeros(0)
  values = np.array([np.nan if v is None else v for v in values], float)
  weights = np.where(np.isnan(values), 0.0, np.asarray(weights, float))
  position = np.array([d.toordinal() for d in days])
  position -= position.min()
  # Cumulative sums over the calendar, so each day's window is one subtraction.
  sums = np.zeros((2, position.max() + 2))
  np.add.at(sums, (0, position + 1), weights)
  np.add.at(sums, (1, position + 1), weights * np.nan_to_num(values))
  sums = np.cumsum(sums, axis=1)
  first = np.maximum(position + 1 - window, 0)
  weight, total = sums[:, position + 1] - sums[:, first]
  return np.divide(total, weight, out=np.full(len(days), np.nan), where=weight > 0)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
  """Draws the recall of every scored day into a PNG at `path` (written atomically).

  One column per mode (all events, seen items excluded). Top: per system (colour)
  and K (line style) the `rolling_mean` of recall@K weighted by the events scored
  each day in that mode (days recorded before the counts were kept: the day's
  examples), with each day's own figure faint behind
  it; the y range fits the means, so faint single-event days at 1.0 may fall off
  the top. Bottom: the events of each day (light: not scored, e.g. no export
  yet). One legend for every panel.
  """
  days = [dt.date.fromisoformat(r["day"]) for r in rows]
  events = [r.get("examples") or 0 for r in rows]
  scored = [i for i, r in enumerate(rows) if r.get("recall")]
  x = [days[i] for i in scored]
  fig, axes = plt.subplots(2, len(_MODES), figsize=(13, 6.5), sharex=True, sharey="row",
                           gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
  top = 0.0
  for column, (mode, title) in enumerate(_MODES.items()):
    ax = axes[0, column]
    for method in sorted(METHODS, key=list(plots.WIDTHS).index):
      for k in KS:
        values = [_recall(rows[i], mode, method, k) for i in scored]
        if all(v is None for v in values):
          continue
        mean = rolling_mean(x, values, [_weight(rows[i], mode) for i in scored])
        top = max(top, np.nanmax(mean, initial=0.0))
        ax.plot(x, [np.nan if v is None else v for v in values], linestyle="none",
                marker="o", ms=2, alpha=0.25, color=plots.COLORS[method])
        ax.plot(x, mean, _K_STYLES[k], color=plots.COLORS[method],
                linewidth=plots.WIDTHS[method])
    ax.set_title(f"Next-day recall@K, {title}")
    ax.grid(alpha=0.3)
    if not scored:
      ax.text(0.5, 0.5, "no day evaluated yet", ha="center", transform=ax.transAxes)
    bottom = axes[1, column]
    bottom.add_collection(_bars(days, events, [bool(r.get("recall")) for r in rows]))
    bottom.set_xlabel("day")
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    bottom.xaxis.set_major_locator(mdates.AutoDateLocator(
        minticks=2, maxticks=8, interval_multiples=False))
    bottom.tick_params(axis="x", rotation=45)
    bottom.grid(alpha=0.3, axis="y")
  if days:  # whole days either side, so that one day is not spread over hours
    axes[0, 0].set_xlim(days[0] - dt.timedelta(days=1), days[-1] + dt.timedelta(days=1))
  axes[1, 0].set_ylim(0, 1.05 * max(events, default=0) or 1.0)
  axes[0, 0].set_ylim(0, min(1.0, 1.2 * top) or 1.0)
  axes[0, 0].set_ylabel(f"recall@K, {ROLLING_DAYS}-day mean\nweighted by events")
  axes[1, 0].set_ylabel("events")
  handles = ([Line2D([], [], color=plots.COLORS[m], linewidth=2.5, label=m)
              for m in METHODS]
             + [Line2D([], [], color="black", linestyle=_K_STYLES[k], label=f"R@{k}")
                for k in KS]
             + [Line2D([], [], color="black", marker="o", ms=3, alpha=0.3,
                       linestyle="none", label="one day"),
                Patch(color=_SCORED, label="events scored"),
                Patch(color=_NOT_SCORED, label="events not scored")])
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
             frameon=False)
  # Fixed margins, the widest that fig.tight_layout() picks for this figure (an
  # events axis up to 999,999 included): tight_layout draws the figure once more
  # to measure it, which cost as much as drawing it.
  fig.subplots_adjust(**_MARGINS)
  plots.write_png(fig, path)


def _bars(days: Sequence[dt.date], heights: Sequence[float], scored: Sequence[bool]
          ) -> PolyCollection:
  """One bar per day, 0.8 days wide, as one artist (ax.bar makes one per day)."""
  centers = mdates.date2num(days) if days else np.zeros(0)
  heights = np.asarray(heights, float)
  verts = np.zeros((len(centers), 4, 2))
  verts[:, :2, 0] = (centers - 0.4)[:, None]
  verts[:, 2:, 0] = (centers + 0.4)[:, None]
  verts[:, 1:3, 1] = heights[:, None]
  return PolyCollection(verts, facecolors=[_SCORED if s else _NOT_SCORED for s in scored],
                        edgecolors="none")


def table(days: dict[str, dict[str, Any]]) -> str:
  """A per-day text table of the headline figures."""
  width = len(KS) * 6 - 1  # one group of K figures per method: "0.123 0.456 0.789"
  header = (f"{'day':<11} {'examples':>8} {'loss':>7}  "
            + "  ".join(f"{m[:5] + '@' + '/'.join(KS):<{width}}" for m in METHODS))
  lines = [header, "-" * len(header)]
  skipped: list[str] = []  # the current run of consecutive skipped days
  for day, steps in sorted(days.items()):
    if "skipped" in steps and "beam" not in steps:
      gap = skipped and dt.date.fromisoformat(day) - dt.date.fromisoformat(skipped[-1])
      if gap and gap.days > 1:
        lines.append(_skipped_line(skipped, days))
        skipped = []
      skipped.append(day)
      continue
    if skipped:
      lines.append(_skipped_line(skipped, days))
      skipped = []
    row = _row(day, steps)
    loss = "" if row["mean_loss"] is None else f"{row['mean_loss']:.3f}"
    groups = []
    for m in METHODS:
      figures = [_recall(row, "all", m, k) for k in KS]
      groups.append(" ".join(f"{'-' if v is None else f'{v:.3f}':>5}" for v in figures))
    lines.append(f"{day:<11} {row['examples'] or 0:>8} {loss:>7}  " + "  ".join(groups))
  if skipped:
    lines.append(_skipped_line(skipped, days))
  return "\n".join(lines)


def _skipped_line(run: list[str], days: dict[str, dict[str, Any]]) -> str:
  """One line for consecutive skipped days, e.g. a catch-up's days without logs."""
  reason = days[run[0]]["skipped"]["reason"]
  if len(run) == 1:
    return f"{run[0]:<11} skipped: {reason}"
  return f"{run[0]} .. {run[-1]} skipped ({len(run)} days): {reason}"

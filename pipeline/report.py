"""The running report of the daily job: `eval/summary.json`, `eval/summary.png`, a table.

Each day contributes one row built from its manifest records: the events the Beam
job kept, the trainer's mean loss, and the test-then-train recall of the export
made before the day (ScaNN, exact, and the popularity baseline).
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from core import workdir as workdir_lib  # noqa: E402

METHODS = ("exact", "scann", "popularity")
KS = ("10", "50", "100")


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
  """The recall figures of an evaluation: {mode: {method: {k: recall}}}."""
  return metrics["recall"]


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
      "export": steps.get("export", {}).get("version"),
  }


def update(workdir: workdir_lib.Workdir, days: dict[str, dict[str, Any]],
           through: dt.date) -> dict[str, str]:
  """Rewrites the summary JSON and plot from every day up to `through`."""
  rows = [_row(d, steps) for d, steps in sorted(days.items())
          if d <= through.isoformat() and "beam" in steps]
  summary = workdir_lib.write_json(workdir.join("eval", workdir_lib.SUMMARY),
                                   {"days": rows})
  plot = workdir.join("eval", workdir_lib.SUMMARY_PLOT)
  _plot(rows, plot)
  return {"summary": summary, "plot": plot}


def _recall(row: dict[str, Any], mode: str, method: str, k: str) -> Optional[float]:
  value = (row.get("recall") or {}).get(mode, {}).get(method, {}).get(k)
  return None if value is None else float(value)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
  scored = [r for r in rows if r.get("recall")]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for ax, mode, title in zip(axes, ("all", "seen_excluded"),
                             ("all events", "seen items excluded")):
    for method, style in zip(METHODS, ("-", "--", ":")):
      for k, color in zip(KS, ("tab:blue", "tab:orange", "tab:green")):
        ys = [_recall(r, mode, method, k) for r in scored]
        if any(y is not None for y in ys):
          ax.plot([dt.date.fromisoformat(r["day"]) for r in scored],
                  [float("nan") if y is None else y for y in ys],
                  style, color=color, marker="o", ms=3, label=f"{method} R@{k}")
    ax.set_title(f"Next-day recall (test-then-train), {title}")
    ax.set_xlabel("day")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=10))
    ax.tick_params(axis="x", rotation=45)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("recall@K over the full corpus")
  axes[1].legend(fontsize=7, ncol=3, loc="upper left")
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=110)
  plt.close(fig)
  workdir_lib.atomic_write(path, image.getvalue())


def table(days: dict[str, dict[str, Any]]) -> str:
  """A per-day text table of the headline figures."""
  header = (f"{'day':<11} {'examples':>8} {'loss':>7}  "
            + "  ".join(f"{m[:5]}@{k:<3}" for m in METHODS for k in KS))
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
    cells = []
    for m in METHODS:
      for k in KS:
        v = _recall(row, "all", m, k)
        cells.append(f"{'-' if v is None else f'{v:.3f}':>9}")
    lines.append(f"{day:<11} {row['examples'] or 0:>8} {loss:>7}  " + "  ".join(cells))
  if skipped:
    lines.append(_skipped_line(skipped, days))
  return "\n".join(lines)


def _skipped_line(run: list[str], days: dict[str, dict[str, Any]]) -> str:
  """One line for consecutive skipped days, e.g. a catch-up's days without logs."""
  reason = days[run[0]]["skipped"]["reason"]
  if len(run) == 1:
    return f"{run[0]:<11} skipped: {reason}"
  return f"{run[0]} .. {run[-1]} skipped ({len(run)} days): {reason}"

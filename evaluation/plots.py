"""The evaluation figure: recall@K curves and recall by item-popularity decile."""

from __future__ import annotations

import io
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np

from core import workdir as workdir_lib

# One colour per system, in every figure (the daily summary's too).
COLORS = {"scann": "tab:blue", "exact": "tab:orange", "popularity": "tab:gray",
          "covisitation": "tab:green"}
# Exact is drawn first and wider, so a ScaNN curve on top of it stays visible.
WIDTHS = {"exact": 3.0, "popularity": 1.5, "covisitation": 1.5, "scann": 1.2}
_MODES = {"all": ("all items", "-"), "seen_excluded": ("seen items excluded", "--")}


def plot_recall(metrics: Mapping[str, Any], path: str) -> str:
  """Draws `metrics` (evaluate_day's dict) into a PNG at `path` (written atomically).

  Left: recall@K for K = 1..100, one colour per method, solid over all items and
  dashed with the user's seen items excluded. Middle and right: recall@K at the
  largest K per popularity decile of the target item (0 = least popular tenth of
  the corpus), without and with exclusion.
  """
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  curves = metrics["recall_curve"]
  for mode, (label, style) in _MODES.items():
    for method in sorted(curves[mode], key=list(WIDTHS).index):
      values = curves[mode][method]
      if values:
        axes[0].plot(np.arange(1, len(values) + 1), values, style, color=COLORS[method],
                     linewidth=WIDTHS[method], label=f"{method}, {label}")
  axes[0].set(xscale="log", xlabel="K", ylabel="recall@K",
              title=f"Recall@K on {metrics['day']} ({metrics['num_events']} events)")
  axes[0].grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)

  k = str(max(metrics["ks"]))
  deciles = metrics["by_popularity_decile"]
  positions = np.arange(len(deciles["deciles"]))
  methods = list(deciles["all"])
  width = 0.8 / max(len(methods), 1)
  for ax, mode in zip(axes[1:], _MODES):
    for j, method in enumerate(methods):
      values = [np.nan if v is None else v for v in deciles[mode][method][k]]
      ax.bar(positions + (j - (len(methods) - 1) / 2) * width, values, width,
             color=COLORS[method], label=method)
    counts_key = "num_events" if mode == "all" else "num_events_seen_excluded"
    ax.set_xticks(positions, [f"{d['decile']}\n{d[counts_key]}" for d in deciles["deciles"]])
    ax.set(xlabel="popularity decile of the target (9 = most popular) / events",
           ylabel=f"recall@{k}", ylim=(0, 1),
           title=f"Recall@{k} by popularity decile, {_MODES[mode][0]}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  # Fixed margins, not tight_layout: that lays every label out twice, and took a third
  # of the time of a day's figure.
  fig.subplots_adjust(left=0.045, right=0.995, bottom=0.17, top=0.93, wspace=0.17)
  return write_png(fig, path)


def write_png(fig: matplotlib.figure.Figure, path: str, dpi: int = 110) -> str:
  """Renders `fig` as a PNG written atomically to `path`, then closes it."""
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=dpi)
  plt.close(fig)
  return workdir_lib.atomic_write(path, image.getvalue())

"""Reproduces the paper's frequency-estimation simulation (Figs 4 and 5) and ours.

Runs the estimator layers themselves (estimators/, through `call` and `estimate`)
on the synthetic streams of estimators/simulation.py, over several hash and
sampling seeds, and prints four tables:
  fig4:         m = 1, H = 5000, alpha in {0.01, 0.05, 0.1}, 20,000 steps with a
                switch at 10,000, beside the paper's errors before the switch;
  fig5:         10,000 steps, no switch, 4000 buckets split over m = 1, 2, 4
                hashes, beside the paper's errors, plus our decayed sketch;
  improvements: the Fig. 4 stream at Fig. 4's memory (5000 buckets): other
                initialisations, staleness, more hashes, the decayed count-min
                sketch with conservative update, and the oracles;
  multiplicity: a stream drawn with replacement where popular items repeat in a
                batch, against the expected count per batch.
Errors are the paper's sum_i |p_hat_i - p_i| / (2 * batch). A PNG like Fig. 4 and
a JSON of every number go to --out_dir.

  python -m bench.frequency_simulation [--steps=4000 --seeds=0 for a quick run]
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import core  # noqa: F401  (first: sets the environment before TensorFlow loads)
from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np
import tensorflow as tf

from core import workdir
import estimators
from estimators import simulation
from evaluation import plots

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20000, "Steps of the Fig. 4 stream; switch at half.")
flags.DEFINE_integer("fig5_steps", 10000, "Steps of the Fig. 5 stream (no switch).")
flags.DEFINE_integer("num_items", 1000, "M, the number of items.")
flags.DEFINE_integer("batch_size", 128, "Items per batch.")
flags.DEFINE_integer("multiplicity_batch_size", 512,
                     "Batch of the with-replacement stream (repeats grow with it).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Hash and sampling seeds.")
flags.DEFINE_integer("eval_every", 10, "Score every estimator every this many steps.")
flags.DEFINE_integer("window", 500, "Steps averaged for 'before switch' and 'end'.")
flags.DEFINE_list("sections", ["fig4", "fig5", "improvements", "multiplicity"],
                  "Which tables to run.")
flags.DEFINE_string("out_dir", "bench/out", "Where the PNG and JSON go.")

# Read off the paper's Figs 4 and 5 (approximate).
PAPER_FIG4 = {0.01: 0.10, 0.05: 0.12, 0.1: 0.145}
PAPER_FIG5 = {1: 0.167, 2: 0.118, 4: 0.096}
FIG4_BUCKETS = 5000
FIG5_BUCKETS = 4000

Factory = Callable[[int], estimators.FrequencyEstimator]


@dataclasses.dataclass
class Variant:
  name: str
  make: Factory
  paper: float | None = None


def _streaming(buckets: int, hashes: int, **kwargs) -> Factory:
  return lambda seed: estimators.StreamingFrequencyEstimator(
      num_buckets=buckets // hashes, num_hashes=hashes, hash_seed=seed, **kwargs)


def _decayed(buckets: int, hashes: int, **kwargs) -> Factory:
  return lambda seed: estimators.DecayedCountFrequencyEstimator(
      num_buckets=buckets // hashes, num_hashes=hashes, hash_seed=seed, **kwargs)


def _exact(**kwargs) -> Factory:
  return lambda seed: estimators.ExactFrequencyEstimator(**kwargs)


def _count_min(buckets: int, hashes: int, **kwargs) -> Factory:
  # At the memory of `buckets` streaming buckets (12 bytes) in 8-byte counters.
  per_row = estimators.count_min.equal_memory_buckets(buckets * 12, hashes)
  return lambda seed: estimators.CountMinFrequencyEstimator(
      num_buckets=per_row, num_hashes=hashes, hash_seed=seed, **kwargs)


def _run(stream: simulation.Stream, variants: Sequence[Variant],
         seeds: Sequence[int]) -> np.ndarray:
  """Errors [seeds, variants, evals] of every variant on `stream`."""
  return simulation.run_seeds(stream, lambda s: [v.make(s) for v in variants],
                              seeds, FLAGS.eval_every)


def _window_mean(errors: np.ndarray, end_step: int) -> np.ndarray:
  """Mean error per seed over the `window` steps ending at `end_step`: [seeds]."""
  last = end_step // FLAGS.eval_every
  first = max(0, last - max(1, FLAGS.window // FLAGS.eval_every))
  return errors[:, first:last].mean(axis=1)


def _summary(values: np.ndarray) -> dict:
  return {"mean": float(values.mean()), "min": float(values.min()),
          "max": float(values.max()), "per_seed": [float(v) for v in values]}


def _cell(summary: dict) -> str:
  return f"{summary['mean']:.3f} ({summary['min']:.3f}-{summary['max']:.3f})"


def _table(title: str, variants: Sequence[Variant], errors: np.ndarray,
           columns: dict[str, int], seconds: float) -> list[dict]:
  """Prints one table; returns its rows with per-seed numbers."""
  print(f"\n{title}  [{errors.shape[0]} seeds, {seconds:.0f} s]")
  header = f"{'variant':44s}" + "".join(f"{c:>22s}" for c in columns)
  print(header + f"{'run mean':>22s}{'paper':>8s}")
  rows = []
  for i, variant in enumerate(variants):
    row = {"variant": variant.name, "paper": variant.paper}
    for column, end_step in columns.items():
      row[column] = _summary(_window_mean(errors[:, i], end_step))
    row["run_mean"] = _summary(errors[:, i].mean(axis=1))
    paper = "" if variant.paper is None else f"{variant.paper:.3f}"
    print(f"{variant.name:44s}" + "".join(f"{_cell(row[c]):>22s}" for c in columns)
          + f"{_cell(row['run_mean']):>22s}{paper:>8s}")
    rows.append(row)
  return rows


def _fig4_variants() -> list[Variant]:
  return [Variant(f"paper m=1 H=5000 alpha={a}", _streaming(FIG4_BUCKETS, 1, alpha=a),
                  PAPER_FIG4[a]) for a in (0.01, 0.05, 0.1)]


def _fig5_variants() -> list[Variant]:
  variants = []
  for alpha in (0.01, 0.05):
    variants += [Variant(f"paper m={m} H={FIG5_BUCKETS // m} alpha={alpha}",
                         _streaming(FIG5_BUCKETS, m, alpha=alpha), PAPER_FIG5[m])
                 for m in (1, 2, 4)]
  variants += [Variant(f"decayed+CU m={m} H={FIG5_BUCKETS // m} decay=0.001",
                       _decayed(FIG5_BUCKETS, m, decay=0.001)) for m in (1, 2, 4)]
  variants += [
      Variant("oracle: exact gap alpha=0.01", _exact(method="gap", alpha=0.01)),
      Variant("oracle: exact count", _exact(method="count")),
  ]
  return variants


def _improvement_variants() -> list[Variant]:
  b = FIG4_BUCKETS
  return [
      Variant("paper m=1 alpha=0.01", _streaming(b, 1, alpha=0.01), PAPER_FIG4[0.01]),
      Variant("  init=first_gap", _streaming(b, 1, alpha=0.01, init="first_gap")),
      Variant("  init=prior", _streaming(b, 1, alpha=0.01, init="prior")),
      Variant("  staleness=0.2", _streaming(b, 1, alpha=0.01, staleness=0.2)),
      Variant("  m=4 H=1250", _streaming(b, 4, alpha=0.01)),
      Variant("  m=4 H=1250 first_gap staleness=0.2",
              _streaming(b, 4, alpha=0.01, init="first_gap", staleness=0.2)),
      Variant("paper m=1 alpha=0.05", _streaming(b, 1, alpha=0.05), PAPER_FIG4[0.05]),
      Variant("  m=4 H=1250 staleness=0.2", _streaming(b, 4, alpha=0.05,
                                                       staleness=0.2)),
      Variant("decayed+CU m=1 decay=0.002", _decayed(b, 1, decay=0.002)),
      Variant("decayed+CU m=4 H=1250 decay=0.001", _decayed(b, 4, decay=0.001)),
      Variant("decayed+CU m=4 H=1250 decay=0.002", _decayed(b, 4, decay=0.002)),
      Variant("decayed+CU m=4 H=1250 decay=0.005", _decayed(b, 4, decay=0.005)),
      Variant("decayed (no CU) m=4 H=1250 decay=0.002",
              _decayed(b, 4, decay=0.002, conservative=False)),
      Variant("count-min m=4 (equal bytes)", _count_min(b, 4)),
      Variant("oracle: exact gap alpha=0.01", _exact(method="gap", alpha=0.01)),
      Variant("oracle: exact count", _exact(method="count")),
  ]


def _multiplicity_variants(batch_size: int) -> list[Variant]:
  b, cap = FIG4_BUCKETS, dict(max_probability=float(batch_size))
  return [
      Variant("paper m=4 alpha=0.05", _streaming(b, 4, alpha=0.05, **cap)),
      Variant("  count_multiplicity", _streaming(b, 4, alpha=0.05,
                                                 count_multiplicity=True, **cap)),
      Variant("  count_multiplicity staleness=0.2",
              _streaming(b, 4, alpha=0.05, count_multiplicity=True, staleness=0.2,
                         **cap)),
      Variant("decayed+CU m=4 decay=0.002 multiplicity",
              _decayed(b, 4, decay=0.002, count_multiplicity=True, **cap)),
      Variant("oracle: exact count, distinct", _exact(method="count", **cap)),
      Variant("oracle: exact count, multiplicity",
              _exact(method="count", count_multiplicity=True, **cap)),
  ]


def _plot(path: str, fig4: tuple[Sequence[Variant], np.ndarray],
          improvements: tuple[Sequence[Variant], np.ndarray] | None) -> None:
  """Error over steps: the paper's Fig. 4 and, beside it, our variants."""
  panels = [("Fig. 4 reproduced: m=1, H=5000", fig4)]
  if improvements is not None:
    variants, errors = improvements
    keep = [i for i, v in enumerate(variants)
            if v.name in ("paper m=1 alpha=0.01", "  m=4 H=1250",
                          "  m=4 H=1250 first_gap staleness=0.2",
                          "decayed+CU m=4 H=1250 decay=0.002",
                          "decayed+CU m=4 H=1250 decay=0.005",
                          "oracle: exact count")]
    panels.append(("Same memory (5000 buckets), ours",
                   ([variants[i] for i in keep], errors[:, keep])))
  figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2),
                              squeeze=False)
  for axis, (title, (variants, errors)) in zip(axes[0], panels):
    steps = (np.arange(errors.shape[-1]) + 1) * FLAGS.eval_every
    for i, variant in enumerate(variants):
      mean = errors[:, i].mean(axis=0)
      line, = axis.plot(steps, mean, lw=1, label=variant.name.strip())
      axis.fill_between(steps, errors[:, i].min(axis=0), errors[:, i].max(axis=0),
                        color=line.get_color(), alpha=0.2, lw=0)
    axis.set(title=title, xlabel="step", ylabel="estimation error", ylim=(0, 0.8))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  plots.write_png(figure, path, dpi=120)


def main(argv: Sequence[str]) -> None:
  del argv
  tf.get_logger().setLevel("ERROR")  # one tf.function per run: retracing is expected
  seeds = [int(s) for s in FLAGS.seeds]
  switch = FLAGS.steps // 2
  fig4_stream = simulation.Stream(
      num_items=FLAGS.num_items, batch_size=FLAGS.batch_size,
      num_steps=FLAGS.steps, switch_step=switch)
  switch_columns = {"before switch": switch - 1, "end": FLAGS.steps}
  results = {"flags": {name: FLAGS[name].value for name in (
      "steps", "fig5_steps", "num_items", "batch_size", "multiplicity_batch_size",
      "seeds", "eval_every", "window")}}
  fig4 = improvements = None

  def section(name, stream, variants, columns):
    start = time.time()
    errors = _run(stream, variants, seeds)
    results[name] = {"stream": dataclasses.asdict(stream),
                     "rows": _table(name, variants, errors, columns,
                                    time.time() - start),
                     "eval_every": FLAGS.eval_every}
    return variants, errors

  if "fig4" in FLAGS.sections:
    fig4 = section("fig4", fig4_stream, _fig4_variants(), switch_columns)
  if "fig5" in FLAGS.sections:
    stream = dataclasses.replace(fig4_stream, num_steps=FLAGS.fig5_steps,
                                 switch_step=None)
    section("fig5", stream, _fig5_variants(), {"end": FLAGS.fig5_steps})
  if "improvements" in FLAGS.sections:
    improvements = section("improvements", fig4_stream, _improvement_variants(),
                           switch_columns)
  if "multiplicity" in FLAGS.sections:
    batch = FLAGS.multiplicity_batch_size
    stream = dataclasses.replace(fig4_stream, batch_size=batch, replace=True)
    q_max = stream.probabilities().max()
    print(f"\nmultiplicity stream: batch {batch} with replacement; the most popular "
          f"item's expected count {batch * q_max:.2f}, inclusion probability "
          f"{1 - (1 - q_max) ** batch:.2f}")
    section("multiplicity", stream, _multiplicity_variants(batch), switch_columns)

  if fig4 is not None:
    png = os.path.join(FLAGS.out_dir, "frequency_fig4.png")
    _plot(png, fig4, improvements)
    print(f"\nwrote {png}")
  path = os.path.join(FLAGS.out_dir, "frequency_simulation.json")
  workdir.write_json(path, results)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)

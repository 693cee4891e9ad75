r"""Test-then-train recall of model configurations against the baselines (issue 13).

Protocol. The raw logs are made once: the synthetic world of `make demo` (same
generator, seed and size), or MovieLens converted by pipeline/movielens_convert.py
into `--ml_period_days` partitions. For each entry of `--configs` (name -> ModelConfig
overrides, on top of `--quality_config`), a fresh workdir runs the daily job over
the partitions in order, exactly as `pipeline.daily` does. Day D is scored by the
export made after the day before it (exact brute-force and ScaNN exports), over
the full corpus of D, beside popularity and co-visitation counted over the days
before D (evaluation/evaluator.py).

Split. The partitions are cut in two halves in time order: the first half is the
VALIDATION half (settings are chosen on it only), the second the TEST half (reported,
never tuned on). Each figure is the event-weighted mean recall over the scored
days of one half: every scored event counts once ("all"), or every event whose
target the user had not seen ("seen_excluded"). `--through=validation` stops each
run at the end of the validation half (for tuning); `--through=all` runs both.

  python bench/quality.py --dataset=synthetic --out=/tmp/quality
  python bench/quality.py --dataset=movielens --movielens_dir=../shared/data/ml-latest-small \
      --configs='{"default": {}, "no_replay": {"replay_days": 1}}' --out=/tmp/quality
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import cli  # noqa: E402
from core import workdir as workdir_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from pipeline import beam_day  # noqa: E402
from pipeline import daily_job  # noqa: E402
from pipeline import movielens_convert  # noqa: E402
from pipeline import synthetic_world  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/towerstream_quality", "Output root.")
_DATASET = flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "movielens"],
                             "Which data to run on.")
_MOVIELENS = flags.DEFINE_string("movielens_dir", None, "MovieLens directory.")
_PERIOD = flags.DEFINE_integer("ml_period_days", 30, "MovieLens days per partition.")
_SYN_DAYS = flags.DEFINE_integer("syn_days", 5, "Synthetic days (make demo: 5).")
_SYN_EVENTS = flags.DEFINE_integer("syn_events_per_day", 30000,
                                   "Synthetic events a day (make demo: 30000).")
_CONFIGS = flags.DEFINE_string(
    "configs", '{"streaming": {"correction": "streaming"}, "exact": {"correction": '
    '"exact"}, "none": {"correction": "none"}}',
    "JSON object: run name -> ModelConfig overrides (default: the paper's ablation).")
_OVERRIDES = flags.DEFINE_string("quality_config", "{}",
                                 "JSON ModelConfig overrides shared by every run.")
_THROUGH = flags.DEFINE_enum("through", "all", ["validation", "all"],
                             "Stop after the validation half, or run both halves.")

MODES = ("all", "seen_excluded")
METHODS = ("exact", "scann", "popularity", "covisitation")
KS = ("10", "50", "100")
HALVES = ("validation", "test")


def _raw_logs(out: str) -> tuple[str, beam_day.BeamSettings]:
  raw = os.path.join(out, "raw")
  if _DATASET.value == "synthetic":
    # The world of pipeline/demo.py (make demo).
    cfg = synthetic_world.WorldConfig(start_date=dt.date(2024, 1, 1), days=_SYN_DAYS.value,
                                      events_per_day=_SYN_EVENTS.value,
                                      bad_line_rate=0.002)
    if not os.path.exists(os.path.join(raw, "logs")):
      synthetic_world.generate(raw, cfg)
    return raw, beam_day.BeamSettings()
  if not os.path.exists(os.path.join(raw, "logs")):
    movielens_convert.convert(_MOVIELENS.value, raw, period_days=_PERIOD.value)
  return raw, beam_day.BeamSettings(max_skew_s=_PERIOD.value * 86400)


def weighted_recall(days: dict[str, dict[str, Any]], names: Sequence[str]
                    ) -> dict[str, Any]:
  """Event-weighted mean recall over the scored days among `names`."""
  scored = [days[d]["evaluate"] for d in names
            if "recall" in days.get(d, {}).get("evaluate", {})]
  table: dict[str, Any] = {"scored_days": len(scored)}
  for mode in MODES:
    table[f"{mode}/events"] = sum(e["scored_events"][mode] for e in scored)
    for method in METHODS:
      for k in KS:
        pairs = [(e["recall"][mode][method][k], e["scored_events"][mode]) for e in scored
                 if e["recall"][mode].get(method, {}).get(k) is not None]
        weight = sum(w for _, w in pairs)
        table[f"{mode}/{method}/{k}"] = (sum(v * w for v, w in pairs) / weight
                                         if weight else None)
  return table


def markdown(results: dict[str, Any], half: str) -> str:
  """One table of the `half`: each run's exports, then the baselines."""
  header = ["| system | " + " | ".join(f"R@{k}" for k in KS) + " | " +
            " | ".join(f"R@{k} seen excl." for k in KS) + " |",
            "|---|" + "---|" * (2 * len(KS))]

  def row(name: str, res: dict[str, Any], method: str) -> str:
    cells = [res[f"{mode}/{method}/{k}"] for mode in MODES for k in KS]
    return f"| {name} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |"

  lines = list(header)
  for name, res in results.items():
    if half in res:
      lines.append(row(f"{name} (exact)", res[half], "exact"))
      lines.append(row(f"{name} (ScaNN)", res[half], "scann"))
  first = next((r[half] for r in results.values() if half in r), None)
  if first is not None:
    for baseline in ("covisitation", "popularity"):
      lines.append(row(baseline, first, baseline))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  out = os.path.join(_OUT.value, _DATASET.value)
  raw, beam = _raw_logs(out)
  dates = sorted(os.listdir(os.path.join(raw, "logs")))
  halves = {"validation": dates[:len(dates) // 2], "test": dates[len(dates) // 2:]}
  last = halves["validation"][-1] if _THROUGH.value == "validation" else dates[-1]
  shared = json.loads(_OVERRIDES.value)
  results: dict[str, Any] = {}
  for name, overrides in json.loads(_CONFIGS.value).items():
    config = ModelConfig.from_dict({**shared, **overrides})
    start = time.perf_counter()
    days = daily_job.run(
        workdir_lib.Workdir(os.path.join(out, name), os.path.join(raw, "logs"),
                            os.path.join(raw, "catalog")),
        dt.date.fromisoformat(dates[0]), dt.date.fromisoformat(last),
        settings=daily_job.JobSettings(skip_missing_days=True), config=config, beam=beam,
        pipeline_args=argv[1:])
    results[name] = {"config": config.to_dict(),
                     "seconds": round(time.perf_counter() - start, 1),
                     **{half: weighted_recall(days, names) for half, names in halves.items()
                        if names[0] <= last}}
    print(name, json.dumps({h: results[name][h] for h in HALVES if h in results[name]}),
          flush=True)
  text = "\n\n".join(
      f"{half} half: {len(halves[half])} partitions {halves[half][0]}..{halves[half][-1]}, "
      f"shared overrides {_OVERRIDES.value}\n\n{markdown(results, half)}"
      for half in HALVES if any(half in r for r in results.values()))
  print(text)
  workdir_lib.write_json(os.path.join(out, "quality.json"), {
      "results": results, "halves": halves, "tables": text,
      "finished": dt.datetime.now().isoformat()})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)

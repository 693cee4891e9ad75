r"""Next-day recall of the logQ corrections (issue 4, "Quality"), test-then-train.

Protocol: the raw logs are made once (the synthetic world, or MovieLens converted
by pipeline/movielens_convert.py). For each `--corrections` entry, a fresh workdir runs
the daily job over every day with that correction and otherwise the same config.
Day D is scored by the export made after day D-1 (exact brute-force export and
ScaNN export), over the full corpus of D; the popularity baseline ranks items by
their interactions in the days before D. The table reports the mean over the
scored days (all but the first) of recall@10/50/100, over all events and with the
user's already-seen items excluded.

  python bench/quality.py --dataset=synthetic --out=/tmp/quality
  python bench/quality.py --dataset=movielens \
      --movielens_dir=../shared/data/ml-latest-small --ml_period_days=365 \
      --quality_config='{"batch_size": 128}' --out=/tmp/quality
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
_PERIOD = flags.DEFINE_integer("ml_period_days", 365, "MovieLens days per partition.")
_SYN_DAYS = flags.DEFINE_integer("syn_days", 8, "Synthetic days.")
_SYN_EVENTS = flags.DEFINE_integer("syn_events_per_day", 30000, "Synthetic events a day.")
_CORRECTIONS = flags.DEFINE_list("corrections", ["streaming", "exact", "none"],
                                 "Corrections to compare.")
_OVERRIDES = flags.DEFINE_string("quality_config", "{}",
                                 "JSON ModelConfig fields shared by every run.")

MODES = ("all", "seen_excluded")
METHODS = ("exact", "scann", "popularity", "covisitation")
KS = ("10", "50", "100")


def _raw_logs(out: str) -> tuple[str, beam_day.BeamSettings]:
  raw = os.path.join(out, "raw")
  if _DATASET.value == "synthetic":
    cfg = synthetic_world.WorldConfig(days=_SYN_DAYS.value,
                                      events_per_day=_SYN_EVENTS.value)
    if not os.path.exists(os.path.join(raw, "logs")):
      synthetic_world.generate(raw, cfg)
    return raw, beam_day.BeamSettings()
  if not os.path.exists(os.path.join(raw, "logs")):
    movielens_convert.convert(_MOVIELENS.value, raw, period_days=_PERIOD.value)
  return raw, beam_day.BeamSettings(max_skew_s=_PERIOD.value * 86400)


def _mean_recall(days: dict[str, dict[str, Any]]) -> dict[str, Any]:
  scored = [s["evaluate"]["recall"] for s in days.values()
            if "recall" in s.get("evaluate", {})]
  table: dict[str, Any] = {"scored_days": len(scored)}
  for mode in MODES:
    for method in METHODS:
      for k in KS:
        values = [r[mode][method][k] for r in scored if r[mode][method][k] is not None]
        table[f"{mode}/{method}/{k}"] = sum(values) / len(values) if values else None
  return table


def main(argv: Sequence[str]) -> None:
  out = os.path.join(_OUT.value, _DATASET.value)
  raw, beam = _raw_logs(out)
  dates = sorted(os.listdir(os.path.join(raw, "logs")))
  results = {}
  for correction in _CORRECTIONS.value:
    config = ModelConfig.from_dict({**json.loads(_OVERRIDES.value),
                                    "correction": correction})
    workdir = os.path.join(out, correction)
    start = time.perf_counter()
    days = daily_job.run(
        workdir_lib.Workdir(workdir, os.path.join(raw, "logs"), os.path.join(raw, "catalog")),
        dt.date.fromisoformat(dates[0]), dt.date.fromisoformat(dates[-1]),
        settings=daily_job.JobSettings(skip_missing_days=True), config=config, beam=beam,
        pipeline_args=argv[1:])
    results[correction] = {**_mean_recall(days),
                           "seconds": round(time.perf_counter() - start, 1)}
    print(correction, json.dumps(results[correction]), flush=True)
  lines = [f"dataset: {_DATASET.value}, {len(dates)} partitions, config overrides "
           f"{_OVERRIDES.value}",
           "| model | R@10 | R@50 | R@100 | R@10 (seen excl.) | R@50 (seen excl.) | "
           "R@100 (seen excl.) |", "|---|---|---|---|---|---|---|"]

  def row(name: str, res: dict[str, Any], method: str) -> str:
    cells = [res[f"{mode}/{method}/{k}"] for mode in MODES for k in KS]
    return f"| {name} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |"

  for correction, res in results.items():
    lines.append(row(f"{correction} (exact export)", res, "exact"))
    lines.append(row(f"{correction} (ScaNN export)", res, "scann"))
  for baseline in ("popularity", "covisitation"):
    lines.append(row(baseline, next(iter(results.values())), baseline))
  text = "\n".join(lines)
  print(text)
  workdir_lib.write_json(os.path.join(out, "quality.json"), {
      "results": results, "table": text, "finished": dt.datetime.now().isoformat()})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)

r"""The two-stage funnel against retrieval alone, and the teacher's cost (issue 16.1).

Runs the daily job with --ranker over a synthetic world (pipeline/synthetic_world.py,
the generator of `make demo`, smaller by default), or over MovieLens converted into
`--ml_period_days` partitions (yearly by default), in a fresh workdir: each day D
the two-tower trains and exports, then the ranking teacher (models/ranker.py)
trains on D with negatives from that export's top 100 and is exported; D+1's
evaluation re-ranks the exact export's top 100 of every event with the teacher
labelled D (test-then-train). Reported, as event-weighted means over the days with
a teacher (day 2 on):

  * recall@10 and NDCG@10 of the retrieval alone and of the funnel, over all
    events and with seen items excluded, and the retrieval's recall@100 (the
    funnel's ceiling);
  * per day, seconds of the two-tower's training and export and of the teacher's
    training and export, and of the funnel's re-ranking in the evaluation, with
    the teacher's cost as a ratio of the two-tower's (same run, same machine).

  python bench/funnel_quality.py --out=/tmp/funnel
  python bench/funnel_quality.py --syn_days=4 --syn_events_per_day=4000 \
      --ranker_config='{"negatives": 8}'
  python bench/funnel_quality.py --dataset=movielens \
      --movielens_dir=../shared/data/ml-latest-small --quality_config='{"batch_size": 128}'
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import cli  # noqa: E402
from core import workdir as workdir_lib  # noqa: E402
from models import ranker as ranker_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from pipeline import beam_day  # noqa: E402
from pipeline import daily_job  # noqa: E402
from pipeline import movielens_convert  # noqa: E402
from pipeline import synthetic_world  # noqa: E402

_OUT = flags.DEFINE_string("out", "/tmp/towerstream_funnel", "Output root (its "
                           "workdir is made anew).")
_DATASET = flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "movielens"],
                             "Which data to run on.")
_MOVIELENS = flags.DEFINE_string("movielens_dir", None, "MovieLens directory "
                                 "(ml-latest-small).")
_PERIOD = flags.DEFINE_integer("ml_period_days", 365, "MovieLens days per partition.")
_DAYS = flags.DEFINE_integer("syn_days", 5, "Synthetic days.")
_EVENTS = flags.DEFINE_integer("syn_events_per_day", 10000, "Synthetic events a day.")
_USERS = flags.DEFINE_integer("syn_users", 2000, "Synthetic users.")
_ITEMS = flags.DEFINE_integer("syn_items", 5000, "Synthetic items.")
_CONFIG = flags.DEFINE_string("quality_config", "{}", "JSON ModelConfig overrides.")
_RANKER = flags.DEFINE_string("ranker_config", "{}", "JSON RankerConfig overrides "
                              "(on RankerConfig.like the two-tower's config).")
_REUSE = flags.DEFINE_bool("reuse", False, "Summarize OUT/workdir as a previous run "
                           "left it instead of running the days again.")

MODES = ("all", "seen_excluded")
BASELINES = ("covisitation", "popularity")


def _mean(pairs: Sequence[tuple[Optional[float], int]]) -> Optional[float]:
  pairs = [(v, w) for v, w in pairs if v is not None]
  weight = sum(w for _, w in pairs)
  return sum(v * w for v, w in pairs) / weight if weight else None


def summarize(workdir: str, days: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Event-weighted funnel figures over the days with a teacher, and per-day costs."""
  scored, baselines = [], []
  for name, steps in sorted(days.items()):
    path = os.path.join(workdir_lib.Workdir(workdir).eval_dir(dt.date.fromisoformat(
        name)), workdir_lib.METRICS)
    if os.path.exists(path):
      metrics = workdir_lib.read_json(path)
      found = metrics.get("funnel", {})
      if "skipped" not in found:
        scored.append(found)
        baselines.append(metrics["recall"])
  figures: dict[str, Any] = {"scored_days": len(scored)}
  for mode in MODES:
    figures[f"{mode}/events"] = sum(f[mode]["events"] for f in scored)
    for stage in ("retrieval", "funnel"):
      for figure in ("recall", "ndcg"):
        figures[f"{mode}/{stage}/{figure}@10"] = _mean(
            [(f[mode][stage][figure]["10"], f[mode]["events"]) for f in scored])
    figures[f"{mode}/retrieval/recall@100"] = _mean(
        [(f[mode]["retrieval_recall_at_k"], f[mode]["events"]) for f in scored])
    for baseline in BASELINES:  # the same days and events, over the full corpus
      figures[f"{mode}/{baseline}/recall@10"] = _mean(
          [(r[mode][baseline]["10"], f[mode]["events"]) for r, f in zip(baselines, scored)])
  costs = []
  for name, steps in sorted(days.items()):
    if "beam" not in steps:  # a day without logs, skipped
      continue
    ranker = steps.get(daily_job.RANKER_STEP) or {}
    funnel = (steps.get("evaluate") or {}).get("funnel") or {}
    path = os.path.join(workdir_lib.Workdir(workdir).eval_dir(dt.date.fromisoformat(
        name)), workdir_lib.METRICS)
    rerank = (workdir_lib.read_json(path).get("funnel", {}).get("seconds")
              if os.path.exists(path) and funnel and "skipped" not in funnel else None)
    costs.append({"day": name, "examples": steps["beam"]["examples"],
                  "two_tower_train_s": steps["train"]["seconds"],
                  "retrieval_export_s": steps["export"]["seconds"],
                  "teacher_train_s": (ranker.get("train") or {}).get("seconds"),
                  "teacher_export_s": (ranker.get("export") or {}).get("seconds"),
                  "teacher_step_s": ranker.get("seconds"),
                  "evaluate_s": steps["evaluate"]["seconds"],
                  "funnel_rerank_s": rerank})
  return {"figures": figures, "costs": costs}


def markdown(summary: dict[str, Any]) -> str:
  """The quality table, then the cost table."""
  f = summary["figures"]
  number = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
  lines = [f"{f['scored_days']} days with a teacher; "
           + ", ".join(f"{f[f'{m}/events']} events ({m})" for m in MODES), "",
           "| system | R@10 | NDCG@10 | R@10 seen excl. | NDCG@10 seen excl. |",
           "|---|---|---|---|---|"]
  for stage, label in (("retrieval", "retrieval (exact export)"),
                       ("funnel", "funnel: top 100 re-ranked by the teacher")):
    lines.append(f"| {label} | " + " | ".join(
        number(f[f"{m}/{stage}/{figure}@10"]) for m in MODES
        for figure in ("recall", "ndcg")) + " |")
  lines.append("| ceiling: retrieval R@100 | " + " | ".join(
      f"{number(f[f'{m}/retrieval/recall@100'])} | -" for m in MODES) + " |")
  for baseline in BASELINES:
    lines.append(f"| {baseline} (full corpus) | " + " | ".join(
        f"{number(f[f'{m}/{baseline}/recall@10'])} | -" for m in MODES) + " |")
  lines += ["", "| day | examples | two-tower train s | retrieval export s | teacher "
            "train s | teacher export s | funnel re-rank s (eval) |",
            "|---|---|---|---|---|---|---|"]
  seconds = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
  for c in summary["costs"]:
    lines.append(f"| {c['day']} | {c['examples']} | {seconds(c['two_tower_train_s'])} | "
                 f"{seconds(c['retrieval_export_s'])} | {seconds(c['teacher_train_s'])} | "
                 f"{seconds(c['teacher_export_s'])} | {seconds(c['funnel_rerank_s'])} |")
  later = summary["costs"][1:]  # day 1 pays for tracing and first builds
  if later:
    ratio = lambda a, b: (sum(c[a] or 0 for c in later)  # noqa: E731
                          / max(sum(c[b] or 0 for c in later), 1e-9))
    lines.append(f"\nDays 2+: teacher training / two-tower training = "
                 f"{ratio('teacher_train_s', 'two_tower_train_s'):.2f}, teacher export "
                 f"/ retrieval export = {ratio('teacher_export_s', 'retrieval_export_s'):.2f}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  out = _OUT.value
  raw, workdir = os.path.join(out, "raw"), os.path.join(out, "workdir")
  beam = beam_day.BeamSettings()
  if _DATASET.value == "movielens":
    if not os.path.exists(os.path.join(raw, "logs")):
      movielens_convert.convert(_MOVIELENS.value, raw, period_days=_PERIOD.value)
    beam = beam_day.BeamSettings(max_skew_s=_PERIOD.value * 86400)
  elif not os.path.exists(os.path.join(raw, "logs")):
    synthetic_world.generate(raw, synthetic_world.WorldConfig(
        start_date=dt.date(2024, 1, 1), days=_DAYS.value, users=_USERS.value,
        items=_ITEMS.value, events_per_day=_EVENTS.value, bad_line_rate=0.002))
  config = ModelConfig.from_dict(json.loads(_CONFIG.value))
  ranker = ranker_lib.RankerConfig.like(config, **json.loads(_RANKER.value))
  dates = sorted(os.listdir(os.path.join(raw, "logs")))
  started = time.perf_counter()
  if _REUSE.value:
    days = workdir_lib.read_json(workdir_lib.Workdir(workdir).manifest_path)["days"]
  else:
    shutil.rmtree(workdir, ignore_errors=True)
    days = daily_job.run(
        workdir_lib.Workdir(workdir, os.path.join(raw, "logs"),
                            os.path.join(raw, "catalog")),
        dt.date.fromisoformat(dates[0]), dt.date.fromisoformat(dates[-1]),
        settings=daily_job.JobSettings(ranker=True, ranker_config=ranker,
                                       skip_missing_days=True),
        config=config, beam=beam, pipeline_args=argv[1:], progress=lambda line: print(line, flush=True))
  summary = summarize(workdir, days)
  text = markdown(summary)
  print(daily_job.funnel_table(days))
  print(text)
  workdir_lib.write_json(os.path.join(out, "funnel_quality.json"), {
      **summary, "config": config.to_dict(), "ranker_config": ranker.to_dict(),
      "seconds": round(time.perf_counter() - started, 1), "table": text,
      "finished": dt.datetime.now().isoformat()})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)

r"""Fast sweep of model configurations for tuning (issue 13), on the validation half.

bench/quality.py runs the whole daily job per configuration: Beam, evaluation of
both exports, training, two exports and the report, every day. To compare many
configurations, this sweep does the Beam step once (W/data of every partition,
shared by all runs) and then, per configuration and per day D in order:

  1. scores D's events with the model in memory, trained through the day before:
     exact brute-force ranks over the corpus of that day's data (the corpus the
     daily job's exact export of that day holds), over all events and with the
     user's seen items excluded (evaluation.records.seen_sets);
  2. trains D with models.trainer.Trainer, as the daily job does.

These are the daily job's exact-export figures without the SavedModel round
trip; the baselines use evaluation.baselines on the same events, as the daily
job's evaluation does. The first run of a sweep (which scores the baselines) also
splits recall over all events by whether the event's (user's last item, target)
pair was co-visited before D ("by_pair": new_pair, seen_pair, seen_pair_twice),
which is where co-visitation's figure comes from. Flags: those of bench/quality.py
(same protocol and split); figures are event-weighted means over the scored days of
each half.

  python bench/quality_sweep.py --dataset=movielens \
      --movielens_dir=../shared/data/ml-latest-small --through=validation \
      --configs='{"base": {"batch_size": 128}, "replay": {"batch_size": 128, "replay_days": 8}}'
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import quality  # noqa: E402  (its flags and protocol are this sweep's)
from core import cli  # noqa: E402
from core import workdir as workdir_lib  # noqa: E402
from evaluation import baselines  # noqa: E402
from evaluation import recall  # noqa: E402
from evaluation import records  # noqa: E402
from models import features  # noqa: E402
from models import memory  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.trainer import Trainer  # noqa: E402
from pipeline import beam_day  # noqa: E402
from serving import corpus as corpus_lib  # noqa: E402

KS = (10, 50, 100)
_ROWS = 2048

_HALF = flags.DEFINE_enum(
    "sweep_half", None, ["validation", "test"],
    "Run one half only; 'test' continues each run's validation-half checkpoint "
    "(default: what --through says).")


def prepare(out: str, dates: Sequence[str], raw: str, beam: beam_day.BeamSettings,
            pipeline_args: Sequence[str]) -> str:
  """Runs the Beam step of every partition once into OUT/data_workdir; returns it."""
  root = os.path.join(out, "data_workdir")
  paths = workdir_lib.Workdir(root)
  for i, name in enumerate(dates):
    day = dt.date.fromisoformat(name)
    if not workdir_lib.exists(paths.stats_path(day)):
      beam_day.run_day(day, root, beam, os.path.join(raw, "logs"),
                       os.path.join(raw, "catalog"), pipeline_args)
    if i % 20 == 0:
      print(f"beam {i + 1}/{len(dates)} {name}", flush=True)
  return root


def _embed(tower, columns: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
  n = len(next(iter(columns.values())))
  return np.concatenate([tower({k: columns[k][s:s + _ROWS] for k in names}).numpy()
                         for s in range(0, n, _ROWS)] or [np.zeros((0, 1), np.float32)])


def model_ranks(trainer: Trainer, events: dict[str, np.ndarray], corpus: dict[str, np.ndarray],
                seen: Optional[list[frozenset[bytes]]], rows: np.ndarray) -> np.ndarray:
  """0-based rank of each selected event's target by the model's score over the
  corpus (<u, v> / temperature, plus the pair memory's bonus where the model has
  one, as its exports rank), MISS if the target is not in it; items in the event's
  seen set are skipped."""
  model = trainer.model
  items = corpus["item_id"]
  index = {item: i for i, item in enumerate(items.tolist())}
  candidates = _embed(model.candidate_tower, corpus, features.CANDIDATE_FEATURES)
  ranks = np.full(len(rows), recall.MISS, np.int64)
  for start in range(0, len(rows), _ROWS):
    batch = rows[start:start + _ROWS]
    queries = _embed(model.query_tower, {k: events[k][batch] for k in features.QUERY_FEATURES},
                     features.QUERY_FEATURES)
    scores = queries @ candidates.T / trainer.config.temperature
    if model.memory is not None:
      history = tf.constant(events["history_item_ids"][batch])
      scores += model.memory(
          memory.anchor_ids(tf.constant(events["seed_item_id"][batch]), history),
          tf.constant(items), history).numpy()
    for j, event in enumerate(batch.tolist()):
      target = index.get(events["item_id"][event])
      if target is None:
        continue
      row = scores[j]
      beaten = row > row[target]
      if seen is not None:
        skip = [index[s] for s in seen[event] if s in index]
        beaten[skip] = False
      ranks[start + j] = int(beaten.sum())
  return ranks


def _recall(ranks: np.ndarray) -> dict[str, Optional[float]]:
  return {str(k): v for k, v in recall.recall_at(ranks, KS).items()}


def score_day(trainer: Trainer, data_root: str, day: dt.date, previous: dt.date,
              interactions: records.TrainingInteractions, with_baselines: bool
              ) -> dict[str, Any]:
  """The daily job's evaluation of D (exact export and baselines) in memory."""
  max_history = trainer.config.max_history
  events = records.read_events(data_root, day, max_history)
  _, corpus = corpus_lib.read_corpus(os.path.join(
      workdir_lib.Workdir(data_root).data_dir(previous), corpus_lib.CORPUS_PATTERN))
  training = interactions.before(data_root, day)
  seen = records.seen_sets(events, training.seen)
  targets = events["item_id"]
  every = np.arange(len(targets))
  novel = np.flatnonzero([t not in s for t, s in zip(targets.tolist(), seen)])
  all_ranks = model_ranks(trainer, events, corpus, None, every)
  result = {"recall": {"all": {"exact": _recall(all_ranks)},
                       "seen_excluded": {"exact": _recall(model_ranks(
                           trainer, events, corpus, seen, novel))}},
            "scored_events": {"all": len(every), "seen_excluded": len(novel)}}
  if with_baselines:
    items = corpus["item_id"]
    counts = np.array([training.counts.get(i, 0) for i in items.tolist()], np.int64)
    recent = np.array([training.recent.get(i, 0) for i in items.tolist()], np.int64)
    history = events["history_item_ids"]
    last = history[:, 0] if history.ndim == 2 and history.shape[1] else np.full(
        len(targets), b"", object)
    for mode, rows, excluded in (("all", every, None),
                                 ("seen_excluded", novel, [seen[i] for i in novel])):
      result["recall"][mode]["popularity"] = _recall(baselines.popularity_ranks(
          items, counts, targets[rows], excluded))
      covisitation = baselines.covisitation_ranks(
          items, recent, training.covisits, last[rows], targets[rows], excluded)
      result["recall"][mode]["covisitation"] = _recall(covisitation)
      if mode == "all":
        result["by_pair"] = _by_pair(all_ranks, covisitation, _pair_counts(
            training.covisits, last, targets))
  return result


def _pair_counts(covisits: Any, last: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """How often each event's (user's last item, target) pair was co-visited before D."""
  return np.array([covisits.get(a, {}).get(t, 0) if a else 0
                   for a, t in zip(last.tolist(), targets.tolist())], np.int64)


def _by_pair(model: np.ndarray, covisitation: np.ndarray, pairs: np.ndarray
             ) -> dict[str, dict[str, Any]]:
  """Recall over all events split by whether the event's pair was co-visited before
  (at least once, at least twice) or not: where co-visitation's figure comes from."""
  split = {"new_pair": pairs == 0, "seen_pair": pairs >= 1, "seen_pair_twice": pairs >= 2}
  return {name: {"events": int(rows.sum()), "exact": _recall(model[rows]),
                 "covisitation": _recall(covisitation[rows])}
          for name, rows in split.items()}


def weighted_by_pair(days: dict[str, dict[str, Any]], names: Sequence[str]
                     ) -> dict[str, dict[str, Any]]:
  """`_by_pair`'s figures as event-weighted means over the days `names`."""
  scored = [days[d]["evaluate"]["by_pair"] for d in names
            if "by_pair" in days.get(d, {}).get("evaluate", {})]
  table: dict[str, dict[str, Any]] = {}
  for split in ("new_pair", "seen_pair", "seen_pair_twice"):
    events = sum(e[split]["events"] for e in scored)
    table[split] = {"events": events}
    for method in ("exact", "covisitation"):
      table[split][method] = {
          str(k): (sum(e[split][method][str(k)] * e[split]["events"] for e in scored
                       if e[split]["events"]) / events if events else None) for k in KS}
  return table


def sweep_one(name: str, config: ModelConfig, data_root: str, out: str,
              dates: Sequence[str], first: int, baselines_too: bool
              ) -> dict[str, dict[str, Any]]:
  """Test-then-train over dates[first:] with one config, from the run's checkpoint
  (so a test-half run continues the validation-half run of the same name);
  {day: {"evaluate": ..., "train": ...}}."""
  root = os.path.join(out, "sweep", name)
  os.makedirs(root, exist_ok=True)
  link = workdir_lib.Workdir(root).data_root
  if not os.path.exists(link):
    os.symlink(workdir_lib.Workdir(data_root).data_root, link)
  trainer = Trainer(root, config)
  interactions = records.TrainingInteractions()
  days: dict[str, dict[str, Any]] = {}
  start = time.perf_counter()
  for i in range(first, len(dates)):
    name_of_day = dates[i]
    day = dt.date.fromisoformat(name_of_day)
    days[name_of_day] = {}
    trained, examples, _ = trainer.position()
    if trained is not None and (trained > day or (trained == day and examples)):
      # A run resumed from a later checkpoint: its model has trained on D, and
      # scoring D with it would leak D into D's own figures.
      raise SystemExit(f"{root}: the checkpoint has trained through {trained}, past "
                       f"{name_of_day}; remove the run directory or use a new run name")
    if i > 0:
      days[name_of_day]["evaluate"] = score_day(
          trainer, data_root, day, dt.date.fromisoformat(dates[i - 1]), interactions,
          baselines_too)
    days[name_of_day]["train"] = trainer.train_day(day)
    if i % 20 == 0 or i == len(dates) - 1:
      print(f"{name} {i + 1}/{len(dates)} {name_of_day} {time.perf_counter() - start:.0f} s",
            flush=True)
  return days


def main(argv: Sequence[str]) -> None:
  out = os.path.join(quality._OUT.value, quality._DATASET.value)
  raw, beam = quality._raw_logs(out)
  dates = sorted(os.listdir(os.path.join(raw, "logs")))
  halves = {"validation": dates[:len(dates) // 2], "test": dates[len(dates) // 2:]}
  run_dates = halves["validation"] if quality._THROUGH.value == "validation" else dates
  first = len(halves["validation"]) if _HALF.value == "test" else 0
  if _HALF.value == "validation":
    run_dates = halves["validation"]
  data_root = prepare(out, run_dates, raw, beam, argv[1:])
  shared = json.loads(quality._OVERRIDES.value)
  results: dict[str, Any] = {}
  for n, (name, overrides) in enumerate(json.loads(quality._CONFIGS.value).items()):
    config = ModelConfig.from_dict({**shared, **overrides})
    start = time.perf_counter()
    days = sweep_one(name, config, data_root, out, run_dates, first, baselines_too=n == 0)
    results[name] = {"config": config.to_dict(),
                     "seconds": round(time.perf_counter() - start, 1),
                     **{half: quality.weighted_recall(days, names)
                        for half, names in halves.items() if any(d in days for d in names)},
                     "days": {d: v["evaluate"] for d, v in days.items() if "evaluate" in v}}
    if n == 0:  # the run that scored the baselines
      results[name]["by_pair"] = {half: weighted_by_pair(days, names)
                                  for half, names in halves.items()
                                  if any(d in days for d in names)}
      print(name, "by pair", json.dumps(results[name]["by_pair"]), flush=True)
    print(name, json.dumps({h: results[name][h] for h in quality.HALVES
                            if h in results[name]}), flush=True)
    # Each run's figures as soon as it ends, beside its checkpoints.
    half = _HALF.value or quality._THROUGH.value
    workdir_lib.write_json(os.path.join(out, "sweep", name, f"result-{half}.json"),
                           {"results": {name: results[name]}, "halves": halves})
  text = "\n\n".join(f"{half} half (in-memory exact ranks):\n\n"
                     f"{quality.markdown(results, half)}"
                     for half in quality.HALVES if any(half in r for r in results.values()))
  print(text)
  workdir_lib.write_json(os.path.join(out, "sweep", f"sweep-{'-'.join(results)}.json"), {
      "results": results, "halves": halves, "tables": text,
      "finished": dt.datetime.now().isoformat()})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_with_beam_options)

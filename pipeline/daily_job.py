"""The daily job as a library: runs days, or catches up a range, end to end.

For each day D, in order (test-then-train):
  1. beam:     logs/D + catalog/D + state/{catalog,history}/D-1 -> data/D (Beam job);
  2. evaluate: the newest export labelled with a day before D is scored on D's events;
  3. train:    one pass over data/D in time order, from the latest checkpoint;
  4. export:   a new ScaNN and exact export version from the trained model;
  5. report:   D's metrics are appended to eval/summary.json and eval/summary.png.

With JobSettings.ranker (--ranker) a step "ranker" runs between export and report:
the ranking teacher (models/ranker.py) trains on D's examples, its negatives drawn
from the retrieval export labelled D, and is exported as W/exports/ranker/<v>
(serving/ranker_export.py); the evaluation then also scores the two-stage funnel
(evaluation/funnel.py) with the newest ranker export made before D. Its state lives
in W/ranker; a kill anywhere in it resumes like the two-tower's training (the
trainer from its checkpoint, an export labelled D found is reused).

`W/manifest.json` records each completed step, so a re-run of a completed day is a
no-op (unless --force) and a killed run resumes at the step it was in (the trainer
itself resumes mid-day from its checkpoint). `W/.lock` keeps a second run out.
A range runs in one process: TensorFlow is imported once and the model and its
frequency estimator stay in memory from day to day.

Evaluation never uses a model that has seen D: a forced re-run of D, or a day run
after later ones, is scored by the export made before D, as the first run was.
When the manifest records an export of an earlier day but W/exports lacks it, the
day fails naming the missing directory (it is not recorded as "no export yet").
Export versions only grow: the manifest keeps the highest one published.

If the trainer restored a checkpoint older than the manifest says was trained (the
newest was unreadable and the trainer fell back to the one before), the days in
between are trained again, in order and from the restored position, before D: no
example is skipped or trained twice. Their exports are kept, not redone: each was
made from a model trained on exactly the days up to its label, so scoring later
days with them stays honest, and TF Serving keeps the versions it has.

The app is pipeline/daily.py; the demo and the benches call `run` directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import tensorflow as tf

from core import workdir as workdir_lib
from evaluation import evaluator
from evaluation import funnel
from models import distribute
from models import ranker as ranker_lib
from models import ranker_trainer
from models import trainer as trainer_lib
from models.config import ModelConfig
from pipeline import beam_day
from pipeline import manifest as manifest_lib
from pipeline import report
from pipeline import workdir_lock
from serving import exporter
from serving import ranker_export
from serving import versions

STEPS = ("beam", "evaluate", "train", "export", "report")
RANKER_STEP = "ranker"
# With JobSettings.ranker: the teacher trains and exports after the two-tower.
RANKER_STEPS = STEPS[:4] + (RANKER_STEP,) + STEPS[4:]


class DayFailed(RuntimeError):
  """A day cannot be run as asked; the message says why and what to look at."""


@dataclasses.dataclass(frozen=True)
class JobSettings:
  """What the daily job itself decides (the steps have settings of their own).

  Attributes:
    force: re-run days whose steps are complete.
    max_dead_letter_rate: fail a day whose dead-letter lines exceed this fraction
      of its input lines.
    skip_missing_days: in a range, skip dates without a log partition (recorded
      in the manifest) instead of failing.
    ranker: train and export the ranking teacher each day (step "ranker") and
      score the two-stage funnel in the evaluation.
    ranker_config: the teacher's config (None: W/ranker/config.json, else
      RankerConfig.like the two-tower's).
    keep_exports: N > 0 keeps only the newest N versions of each export (the
      retrieval variants and the teacher's) after each day's export; 0 keeps all.
      A forced re-run of a day whose export before it is gone fails naming it.
  """
  force: bool = False
  max_dead_letter_rate: float = 0.05
  skip_missing_days: bool = False
  ranker: bool = False
  ranker_config: Optional[ranker_lib.RankerConfig] = None
  keep_exports: int = 0

  def __post_init__(self):
    if self.keep_exports < 0:
      raise ValueError(f"keep_exports must be >= 0, got {self.keep_exports}")


def log_partitions(logs_root: str) -> set[dt.date]:
  """Dates that have a non-empty `logs_root/YYYY-MM-DD/`."""
  return set(workdir_lib.partition_files(logs_root))


def _version_of(export_dir: str) -> int:
  return int(os.path.basename(export_dir.rstrip("/")))


class DailyJob:
  """Runs days in order in one process, keeping the trainer (model, estimator) warm.

  It owns what lives from day to day: the trainer, the evaluation state (loaded
  exports, interaction counts), the report's encoded rows, the manifest. `progress`, when given, receives one
  line per day and step (the apps print it).
  """

  def __init__(self, workdir: workdir_lib.Workdir, *,
               settings: JobSettings = JobSettings(),
               config: Optional[ModelConfig] = None,
               beam: Optional[beam_day.BeamSettings] = None,
               evaluate: Optional[evaluator.EvaluationSettings] = None,
               export: Optional[exporter.ExportSettings] = None,
               pipeline_args: Sequence[str] = (), strategy: Any = None,
               progress: Optional[Callable[[str], None]] = None):
    self.workdir = workdir
    self.settings = settings
    self.config = config
    self.beam = beam
    self.evaluate = evaluate or evaluator.EvaluationSettings()
    if settings.ranker:
      self.evaluate = dataclasses.replace(self.evaluate, funnel=True)
    self.steps = RANKER_STEPS if settings.ranker else STEPS
    self.export = export or exporter.ExportSettings()
    self.pipeline_args = list(pipeline_args)
    self.strategy = strategy
    self.progress = progress or (lambda line: None)
    self.manifest = manifest_lib.Manifest(workdir.manifest_path)
    # Exports published today are scored tomorrow: one cache serves both steps.
    self.exporting = exporter.ExportState()
    self.evaluation = evaluator.EvaluationState(exports=self.exporting.published)
    self.reporting = report.Report(workdir)
    self._trainer: Optional[trainer_lib.Trainer] = None
    self._ranker: Optional[ranker_trainer.RankerTrainer] = None
    self._wanted: Optional[ModelConfig] = None
    self._undistilled = False  # distill_weight > 0, but no trained ranker yet
    self.ranker_exporting = ranker_export.RankExportState()
    self.failed_in_training = False

  @property
  def trainer(self) -> trainer_lib.Trainer:
    """The two-tower's trainer. With distill_weight > 0 (and --ranker) it distils
    from the ranker in memory (models/distill.py), trained through the day before
    the one being trained (the "ranker" step follows "train"). Until the ranker
    has trained a day, it trains without distillation (the train record says so);
    it is then rebuilt, from its end-of-day checkpoint, with the teacher."""
    if self._trainer is None or (self._undistilled and self._teacher() is not None):
      config, teacher = self._model_config(), self._teacher()
      self._undistilled = config.distill_weight > 0 and teacher is None
      self._trainer = trainer_lib.Trainer(
          self.workdir.root, config.replace(distill_weight=0.0) if self._undistilled
          else config, strategy=self.strategy, teacher=teacher)
    return self._trainer

  @property
  def ranker(self) -> ranker_trainer.RankerTrainer:
    if self._ranker is None:
      self._ranker = ranker_trainer.RankerTrainer(
          self.workdir.root, self.settings.ranker_config, self._model_config())
    return self._ranker

  def _model_config(self) -> ModelConfig:
    """The two-tower config this run asks for (W/config.json's when none)."""
    if self._wanted is None:
      self._wanted = trainer_lib.resolve_config(self.workdir.root, self.config)
    return self._wanted

  def _teacher(self) -> Optional[ranker_lib.Ranker]:
    """The ranker to distil from: None at distill_weight 0, or before the ranker
    has trained a day.

    Raises:
      DayFailed: distill_weight > 0 without --ranker.
    """
    if self._model_config().distill_weight == 0:
      return None
    if not self.settings.ranker:
      raise DayFailed("distill_weight > 0 distils the two-tower from the ranking "
                      "teacher that --ranker trains: add --ranker")
    return self.ranker.model if self.ranker.position()[0] is not None else None

  def run_day(self, day: dt.date) -> dict[str, Any]:
    """Runs every step of `day` not yet complete; returns the day's step records."""
    if self.settings.force and self.manifest.get(day, "report"):
      self.manifest.clear(day)
    steps: dict[str, Callable[[dt.date], dict[str, Any]]] = {
        "beam": self._beam, "evaluate": self._evaluate, "train": self._train,
        "export": self._export, RANKER_STEP: self._rank, "report": self._report}
    complete = [step for step in self.steps if self.manifest.done(day, step)]
    if len(complete) == len(self.steps):
      self.progress(f"{day} already complete (--force runs it again)")
    elif complete:
      resume = next(step for step in self.steps if not self.manifest.done(day, step))
      self.progress(f"{day} resuming at {resume} "
                    f"({', '.join(complete)} already complete)")
    for step in self.steps:
      if self.manifest.done(day, step):
        logging.info("%s %-8s already complete", day, step)
        continue
      logging.info("%s %-8s started", day, step)
      start = time.perf_counter()
      record = steps[step](day)
      record["seconds"] = round(time.perf_counter() - start, 2)
      self.manifest.mark(day, step, record)
      logging.info("%s %-8s done in %.1f s", day, step, record["seconds"])
      self.progress(f"{day} {step:<8} {record['seconds']:6.1f} s  "
                    f"{_summary(step, record)}")
    return self.manifest.days()[day.isoformat()]

  def _beam(self, day: dt.date) -> dict[str, Any]:
    # The model's history length is the one fact both sides use.
    settings = dataclasses.replace(self.beam or beam_day.BeamSettings(),
                                   max_history=self.trainer.config.max_history)
    stats = beam_day.run_day(day, self.workdir.root, settings, logs=self.workdir.logs,
                             catalog=self.workdir.catalog,
                             pipeline_args=self.pipeline_args)
    stats_path = self.workdir.stats_path(day)
    lines = stats["input_lines"]
    if lines == 0:
      raise DayFailed(f"{day}: the logs under {self.workdir.logs_dir(day)} hold no lines "
                      f"(see {stats_path})")
    rate = stats["dead_letters"] / lines
    if rate > self.settings.max_dead_letter_rate:
      raise DayFailed(
          f"{day}: dead-letter rate {rate:.4f} exceeds --max_dead_letter_rate="
          f"{self.settings.max_dead_letter_rate} ({stats['dead_letters']} of {lines} "
          f"lines); see {stats_path} and the dead_letter files beside it")
    return {"input_lines": lines, "examples": stats["examples"],
            "duplicates": stats["duplicates"], "dead_letters": stats["dead_letters"]}

  def _exports_before(self, day: dt.date) -> Optional[tuple[str, str]]:
    """versions.exports_before, its errors as DayFailed naming the day."""
    try:
      return versions.exports_before(self.workdir.root, day)
    except (NotADirectoryError, FileNotFoundError, ValueError) as e:
      raise DayFailed(f"{day}: cannot list the exports: {e}") from e

  def _recorded_export_before(self, day: dt.date) -> Optional[tuple[str, dict[str, Any]]]:
    """(day, export record) of the latest day before `day` whose export the manifest
    records as published, or None."""
    for earlier, steps in sorted(self.manifest.days().items(), reverse=True):
      record = steps.get(manifest_lib.EXPORT_STEP) or {}
      if earlier < day.isoformat() and isinstance(record.get("version"), int):
        return earlier, record
    return None

  def _evaluate(self, day: dt.date) -> dict[str, Any]:
    found = self._exports_before(day)
    expected = self._recorded_export_before(day)
    if expected and (found is None or _version_of(found[1]) < expected[1]["version"]):
      earlier, record = expected
      missing = os.path.join(self.workdir.exports_base(versions.EXACT_MODEL),
                             str(record["version"]))
      raise DayFailed(
          f"{day}: cannot evaluate: {missing} is missing, but the manifest "
          f"records it as the export of {earlier} (version {record['version']}), the "
          f"one day {day} must be scored with; restore it under "
          f"{self.workdir.exports_root}")
    if found is None:
      return {"skipped": "no export yet: nothing trained before this day"}
    metrics = evaluator.evaluate_day(self.workdir.root, day, found[0], found[1],
                                     state=self.evaluation, settings=self.evaluate)
    exact = metrics["exports"].get("exact") or metrics["exports"]["scann"]
    record = {"export": found[1], "export_version": exact["version"],
              "exported_from_day": exact["exported_from_day"],
              "scored_events": {"all": metrics["num_events"],
                                "seen_excluded": metrics["num_events_seen_excluded"]},
              "metrics": os.path.join(self.workdir.eval_dir(day), workdir_lib.METRICS),
              "recall": report.headline(metrics)}
    diversity = evaluator.diversity_summary(metrics)
    if diversity is not None:  # only with --diversity_theta: records stay as they were
      record["diversity"] = diversity
    found_funnel = funnel.summary(metrics)
    if found_funnel is not None:  # only with --ranker
      record["funnel"] = found_funnel
    return record

  def _behind(self, day: dt.date) -> list[dt.date]:
    """Days before `day` the manifest records as trained but the trainer has not
    (fully) trained: it restored a checkpoint older than the newest."""
    last, _, complete = self.trainer.position()
    behind = []
    for name, steps in self.manifest.days().items():
      trained = dt.date.fromisoformat(name)
      if trained < day and "train" in steps and (
          last is None or trained > last or (trained == last and not complete)):
        behind.append(trained)
    return behind

  def _train(self, day: dt.date) -> dict[str, Any]:
    try:
      return self._train_days(day)
    except BaseException:
      self.failed_in_training = True
      raise

  def _train_days(self, day: dt.date) -> dict[str, Any]:
    """Trains `day`, after any earlier day the restored checkpoint lacks."""
    retrained = []
    for earlier in self._behind(day):
      logging.warning("%s: the manifest records %s as trained, but the restored "
                      "checkpoint %s is at %s; training %s again first", day, earlier,
                      self.trainer.restored, self.trainer.position(), earlier)
      self.progress(f"{earlier} train    again: the checkpoint restored "
                    f"({self.trainer.restored}) is behind the manifest")
      stats = self.trainer.train_day(earlier)
      retrained.append({key: stats.get(key) for key in (
          "day", "status", "examples", "examples_this_run", "global_step")})
    record = _jsonable(self.trainer.train_day(day))
    if self._undistilled:
      record["distilled_from"] = None  # the ranker had not trained a day yet
    elif self.trainer.teacher is not None:
      record["distilled_from"] = _jsonable(self.ranker.trained_position().to_json())
    if retrained:
      record["retrained"] = _jsonable(retrained)
    return record

  def _export(self, day: dt.date) -> dict[str, Any]:
    found = self._exports_before(day + dt.timedelta(days=1))
    meta = versions.read_metadata(found[1]) if found else {}
    labelled_today = meta.get("day") == day.isoformat()
    last, _, complete = self.trainer.position()
    if labelled_today and (not self.settings.force or (last, complete) != (day, True)):
      # Published by a run that died before recording it, or the model has trained
      # past D since (a forced re-run of D): keep that version.
      return {"version": meta["version"], "scann_dir": found[0], "exact_dir": found[1],
              "ann_recall_at_10": meta["ann"]["recall_at_10"], "reused": True}
    if (last, complete) != (day, True):
      return {"skipped": f"the model has trained through {last}, past {day}, and no "
                         f"export of {day} exists; an export labelled {day} would "
                         "hold later days"}
    try:
      result = exporter.export_day(
          self.trainer.model, self.trainer.config, self.workdir.root, day,
          self.export, trained=self.trainer.trained_position(),
          min_version=self.manifest.export_high_water + 1, state=self.exporting)
    except (NotADirectoryError, ValueError) as e:  # W/exports a file; ANN recall too low
      raise DayFailed(f"{day}: cannot export: {e}") from e
    return {"version": result["version"], "scann_dir": result["scann_dir"],
            "exact_dir": result["exact_dir"],
            "ann_recall_at_10": result["metadata"]["ann"]["recall_at_10"],
            **self._pruned(versions.SCANN_MODEL, versions.EXACT_MODEL)}

  def _pruned(self, *models: str) -> dict[str, Any]:
    """Applies `keep_exports` to the exports of `models`: {"pruned": versions} or {}."""
    keep = self.settings.keep_exports
    if not keep:
      return {}
    removed = sorted({v for model in models
                      for v in versions.prune(self.workdir.exports_base(model), keep)})
    return {"pruned": removed} if removed else {}

  def _rank(self, day: dt.date) -> dict[str, Any]:
    """Trains the teacher on D (negatives from the retrieval export labelled D, else
    the newest before it) and exports it labelled D; reuses an export of D."""
    found = self._exports_before(day + dt.timedelta(days=1))
    if found is None:
      return {"skipped": "no retrieval export to draw the negatives from"}
    meta = versions.read_metadata(found[1])
    k = min(self.ranker.config.candidates_k, meta["max_k"])
    retrieve = ranker_export.export_retriever(self.exporting.published.load(found[1]), k)
    try:
      stats = self.ranker.train_day(day, retrieve)
    except (FileNotFoundError, RuntimeError) as e:
      raise DayFailed(f"{day}: cannot train the ranker: {e}") from e
    record: dict[str, Any] = {
        "negatives_from": found[1],
        "train": _jsonable({key: stats.get(key) for key in (
            "status", "examples", "examples_this_run", "global_step", "mean_loss",
            "negatives_per_example", "seconds")})}
    existing = ranker_export.ranker_of(self.workdir.root, day)
    last, _, complete = self.ranker.position()
    if existing is not None:
      record["export"] = {"version": _version_of(existing), "dir": existing,
                          "reused": True}
    elif (last, complete) != (day, True):
      record["export"] = {"skipped": f"the ranker has trained through {last}, past "
                                     f"{day}, and no ranker export of {day} exists"}
    else:
      try:
        record["export"] = ranker_export.export_day(
            self.ranker.model, self.workdir.root, day, self.ranker.trained_position(),
            min_version=self._ranker_high_water() + 1, state=self.ranker_exporting)
      except (NotADirectoryError, ValueError) as e:
        raise DayFailed(f"{day}: cannot export the ranker: {e}") from e
      record["export"].update(self._pruned(ranker_export.RANKER_MODEL))
    return record

  def _ranker_high_water(self) -> int:
    """The highest ranker export version the manifest records (0: none)."""
    found = [((steps.get(RANKER_STEP) or {}).get("export") or {}).get("version")
             for steps in self.manifest.days().values()]
    return max((v for v in found if isinstance(v, int)), default=0)

  def _report(self, day: dt.date) -> dict[str, Any]:
    return self.reporting.update(self.manifest.days(), day)


def _summary(step: str, record: dict[str, Any]) -> str:
  """The progress line's words for a finished step record."""
  if "skipped" in record:
    return f"skipped: {record['skipped']}"
  if step == "beam":
    return (f"{record['examples']} examples, {record['dead_letters']} dead letters, "
            f"{record['duplicates']} duplicates")
  if step == "evaluate":
    recall = record["recall"]["all"]
    figures = ", ".join(f"{method} {recall[method]['10']:.3f}"
                        for method in report.METHODS if method in recall)
    words = (f"R@10 {figures} (export {record['export_version']} of "
             f"{record['exported_from_day']})")
    if record.get("diversity"):
      words += "; " + _diversity_words(record["diversity"])
    if record.get("funnel"):
      words += "; " + _funnel_words(record["funnel"])
    return words
  if step == RANKER_STEP:
    train, export = record["train"], record["export"]
    words = "teacher " + _trained_words(
        train, f"{train.get('negatives_per_example') or 0:.1f} negatives per example")
    if "skipped" in export:
      return words + f"; export skipped: {export['skipped']}"
    return (words + f"; version {export['version']}"
            + (" (reused)" if export.get("reused") else ""))
  if step == "train":
    words = _trained_words(record, f"global step {record.get('global_step')}")
    if record.get("retrained"):
      words += f"; trained again first: {', '.join(r['day'] for r in record['retrained'])}"
    return words
  if step == "export":
    return (f"version {record['version']}{' (reused)' if record.get('reused') else ''}, "
            f"ANN recall@10 {record['ann_recall_at_10']:.3f}")
  return record.get("summary", "")


def _trained_words(record: dict[str, Any], extra: str) -> str:
  """A training record's examples, mean loss, `extra`, and its status unless
  "trained"."""
  loss = record.get("mean_loss")
  words = (f"{record.get('examples')} examples, "
           f"{'-' if loss is None else f'{loss:.3f}'} mean loss, {extra}")
  if record.get("status") != "trained":
    words += f" ({record.get('status')})"
  return words


def _diversity_words(summary: dict[str, Any]) -> str:
  """The progress line's words for the evaluation's diversity headline (all events,
  the exact export, else the ScaNN one): diverse against plain."""
  by_export = summary["all"]
  found = by_export.get("exact") or by_export["scann"]
  recall, distance = found["recall"], found["pairwise_distance"]
  return (f"DPP theta {summary['theta']:g}: R@{summary['k']} {_number(recall['diverse'])} "
          f"(plain {_number(recall['plain'])}), pairwise distance "
          f"{_number(distance['diverse'])} (plain {_number(distance['plain'])})")


def _funnel_words(summary: dict[str, Any]) -> str:
  """The progress line's words for the funnel headline (all events)."""
  if "skipped" in summary:
    return f"funnel skipped: {summary['skipped']}"
  found, k = summary["all"], summary["cutoff"]
  return (f"funnel R@{k} {_number(found['funnel']['recall'])} NDCG@{k} "
          f"{_number(found['funnel']['ndcg'])} (retrieval "
          f"{_number(found['retrieval']['recall'])}, "
          f"{_number(found['retrieval']['ndcg'])}; ranker {summary['ranker_version']})")


def funnel_table(days: dict[str, dict[str, Any]]) -> str:
  """A per-day text table of the funnel against the retrieval alone (--ranker):
  recall and NDCG at K = 10 over all events and with seen items excluded, and the
  teacher's mean training loss of the day."""
  modes = ("all", "seen_excluded")
  header = (f"{'day':<11} {'teacher':>7}  "
            + "  ".join(f"{mode + ' R@10 retr/funnel':<25}" for mode in modes)
            + "  " + "  ".join(f"{mode + ' NDCG@10 retr/funnel':<28}" for mode in modes))
  lines = [header, "-" * len(header)]
  for day, steps in sorted(days.items()):
    if "beam" not in steps:
      continue
    loss = ((steps.get(RANKER_STEP) or {}).get("train") or {}).get("mean_loss")
    found = (steps.get("evaluate") or {}).get("funnel") or {}
    cells = []
    for figure, width in (("recall", 25), ("ndcg", 28)):
      for mode in modes:
        by_stage = found.get(mode) or {}
        pair = [(by_stage.get(stage) or {}).get(figure) for stage in ("retrieval",
                                                                       "funnel")]
        cells.append(f"{_number(pair[0]) + ' / ' + _number(pair[1]):<{width}}")
    lines.append(f"{day:<11} {'-' if loss is None else f'{loss:.3f}':>7}  "
                 + "  ".join(cells))
  return "\n".join(lines)


def _number(value: Optional[float]) -> str:
  return "-" if value is None else f"{value:.3f}"


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def days_to_run(first: dt.date, last: dt.date, available: set[dt.date],
                skip_missing: bool) -> tuple[list[dt.date], list[dt.date]]:
  """(days to run, days skipped for lack of logs); raises DayFailed on a gap."""
  wanted = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
  missing = [d for d in wanted if d not in available]
  single = first == last
  if missing and (single or not skip_missing):
    raise DayFailed(
        f"no log partition for {', '.join(map(str, missing[:5]))}"
        f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(wanted)} days)"
        + ("" if single else "; pass --skip_missing_days to run only the days with logs"))
  return [d for d in wanted if d in available], missing


def run(workdir: workdir_lib.Workdir | str, first: dt.date, last: dt.date,
        on_start: Optional[Callable[[], None]] = None,
        **job_options: Any) -> dict[str, Any]:
  """Runs the days `first`..`last` under the workdir lock; returns the manifest's days.

  Everything that can be checked before a step runs (the dates and their log
  partitions, the model config against W/config.json) is checked before the lock
  is taken, so a refused run creates nothing. `on_start` is called once the lock
  is held (an app opens its log file there). `job_options` are DailyJob's keyword
  arguments (settings, config, beam, export, progress, ...).

  Raises:
    DayFailed: the days cannot be run (missing logs, a config that differs from
      the workdir's).
  """
  workdir = workdir if isinstance(workdir, workdir_lib.Workdir) else workdir_lib.Workdir(
      workdir)
  settings = job_options.get("settings", JobSettings())
  job: Optional[DailyJob] = None
  try:
    days, missing = days_to_run(first, last, log_partitions(workdir.logs),
                                settings.skip_missing_days)
    try:
      trainer_lib.resolve_config(workdir.root, job_options.get("config"))
    except ValueError as e:  # a config that W/config.json refuses
      raise DayFailed(str(e)) from e
    with workdir_lock.WorkdirLock(workdir.root):
      if on_start:
        on_start()
      job = DailyJob(workdir, **job_options)
      if missing:
        reason = f"no log partition under {workdir.logs}"
        line = (f"skipping {len(missing)} of {len(missing) + len(days)} days "
                f"({missing[0]} .. {missing[-1]}): {reason}")
        logging.warning("%s", line)
        job.progress(line)
        job.manifest.mark_all(missing, "skipped", {"reason": reason})
      for day in days:
        job.run_day(day)
      return job.manifest.days()
  finally:
    _release_workers(workdir, job, job_options)


def _release_workers(workdir: workdir_lib.Workdir, job: Optional[DailyJob],
                     job_options: dict[str, Any]) -> None:
  """The chief's end of a run on several workers: whatever happened outside
  training, the workers waiting in Trainer.follow() are let go (after a failed
  training step they fail too: nothing to let go). A no-op in one process."""
  strategy = job_options.get("strategy")
  if strategy is None or distribute.num_workers(strategy) == 1:
    return
  if job is not None:
    if not job.failed_in_training:
      job.trainer.release_workers()
    return
  try:  # refused before the job started: a trainer only to let the workers go
    trainer_lib.Trainer(workdir.root, job_options.get("config"),
                        strategy=strategy).release_workers()
  except (ValueError, tf.errors.OpError) as e:
    logging.error("could not release the workers: %s", e)

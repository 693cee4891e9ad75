"""The workdir's layout, its date partitions, and atomic writes: one place for each.

Every path of the daily loop is spelled here and nowhere else (README: "Workdir
layout"). All file access goes through `tf.io.gfile`, so a workdir may live on any
filesystem TensorFlow reads (local, gs://, hdfs://). Beam's own sources and sinks
read and write the same paths through Beam's filesystems.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import posixpath
import uuid
from typing import Any, Union

import tensorflow as tf

MANIFEST = "manifest.json"
LOCK = ".lock"
CONFIG = "config.json"
STATS = "stats.json"
SUMMARY = "summary.json"
SUMMARY_PLOT = "summary.png"
METRICS = "metrics.json"
EVAL_STATE = "interactions.npz"


def partition_name(day: dt.date) -> str:
  """The partition directory name of a day: YYYY-MM-DD."""
  return day.isoformat()


def is_data_file(path: str) -> bool:
  """False for names that writers use for temporary or marker files: .* and _*."""
  return not posixpath.basename(path.replace("\\", "/").rstrip("/")).startswith((".", "_"))


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of one workdir `root`.

  `logs` and `catalog` default to W/logs and W/catalog but may live elsewhere.
  """
  root: str
  logs: str = ""
  catalog: str = ""

  def __post_init__(self):
    if not self.logs:
      object.__setattr__(self, "logs", self.join("logs"))
    if not self.catalog:
      object.__setattr__(self, "catalog", self.join("catalog"))

  def join(self, *parts: str) -> str:
    return posixpath.join(self.root, *parts) if "://" in self.root else os.path.join(
        self.root, *parts)

  def logs_dir(self, day: dt.date) -> str:
    return posixpath.join(self.logs, partition_name(day))

  def catalog_dir(self, day: dt.date) -> str:
    return posixpath.join(self.catalog, partition_name(day))

  @property
  def data_root(self) -> str:
    return self.join("data")

  def data_dir(self, day: dt.date) -> str:
    """W/data/D: day D's examples, corpus, dead letters and stats."""
    return self.join("data", partition_name(day))

  def stats_path(self, day: dt.date) -> str:
    return self.join("data", partition_name(day), STATS)

  @property
  def history_root(self) -> str:
    return self.join("state", "history")

  def history_dir(self, day: dt.date) -> str:
    """W/state/history/D: users' recent items after day D."""
    return self.join("state", "history", partition_name(day))

  @property
  def catalog_state_root(self) -> str:
    return self.join("state", "catalog")

  def catalog_state_dir(self, day: dt.date) -> str:
    """W/state/catalog/D: the corpus after day D, one catalog line per item."""
    return self.join("state", "catalog", partition_name(day))

  @property
  def config_path(self) -> str:
    return self.join(CONFIG)

  @property
  def checkpoints_dir(self) -> str:
    return self.join("checkpoints")

  @property
  def tensorboard_dir(self) -> str:
    return self.join("tensorboard")

  @property
  def exports_root(self) -> str:
    return self.join("exports")

  def exports_base(self, model_name: str) -> str:
    """W/exports/<model_name>: the TF Serving base path of its versions."""
    return self.join("exports", model_name)

  @property
  def eval_root(self) -> str:
    return self.join("eval")

  def eval_dir(self, day: dt.date) -> str:
    return self.join("eval", partition_name(day))

  @property
  def manifest_path(self) -> str:
    return self.join(MANIFEST)

  @property
  def lock_path(self) -> str:
    return self.join(LOCK)

  @property
  def run_logs_dir(self) -> str:
    """W/run_logs: one full log file per run of an app."""
    return self.join("run_logs")

  @property
  def eval_state_dir(self) -> str:
    """W/state/evaluation: the evaluation's running totals of the earlier days."""
    return self.join("state", "evaluation")

  @property
  def eval_state_path(self) -> str:
    """W/state/evaluation/interactions.npz (evaluation/records.py, TrainingInteractions)."""
    return self.join("state", "evaluation", EVAL_STATE)


def partition_dates(root: str) -> list[dt.date]:
  """The dates of the YYYY-MM-DD subdirectories of `root`, ascending ([] if none)."""
  if not tf.io.gfile.isdir(root):
    return []
  dates = []
  for name in tf.io.gfile.listdir(root):
    try:
      dates.append(dt.date.fromisoformat(name.rstrip("/")))
    except ValueError:
      continue
  return sorted(dates)


def partition_files(root: str, pattern: str = "*") -> dict[dt.date, list[str]]:
  """Data files matching `root/YYYY-MM-DD/pattern`, by date, names sorted."""
  found: dict[dt.date, list[str]] = {}
  for path in tf.io.gfile.glob(posixpath.join(root, "????-??-??", pattern)):
    if not is_data_file(path):
      continue
    try:
      day = dt.date.fromisoformat(posixpath.basename(posixpath.dirname(path)))
    except ValueError:
      continue
    found.setdefault(day, []).append(path)
  return {day: sorted(paths) for day, paths in sorted(found.items())}


def atomic_write(path: str, content: Union[bytes, str]) -> str:
  """Writes `content` to `path` whole or not at all: a temp file beside it, then rename.

  A reader never sees a half-written file, and a crash leaves the old one (or none).
  Local files are fsynced before the rename, so a power loss cannot publish an empty
  file either; on object stores the rename is a copy (still all or nothing for a
  reader of one object).
  """
  data = content.encode("utf-8") if isinstance(content, str) else content
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  if "://" in path:
    tf.io.gfile.makedirs(posixpath.dirname(path))
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def write_json(path: str, value: Any, **dump_options: Any) -> str:
  """`atomic_write` of `value` as JSON (indent=1 unless told otherwise)."""
  dump_options.setdefault("indent", 1)
  return atomic_write(path, json.dumps(value, **dump_options))


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def read_json(path: str) -> Any:
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)

"""TF Serving version directories: integers that only grow, published atomically.

TF Serving watches `<base>/<int>/` and loads a version as soon as its directory
appears, so a version is written whole in a staging directory beside the target
(same filesystem, a name TF Serving ignores because it is not an integer) and then
renamed into place. A crash leaves only a staging directory, which the next export
removes. Rename is atomic on POSIX filesystems and HDFS; on object stores (gs://,
s3://) it is a copy, so write there from a finished local version instead.

Every lookup of published versions is here: `list_versions`, `next_version`, and
`exports_before`, the export a day's test-then-train evaluation scores (read from
each version's `assets.extra/metadata.json`).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Optional
import uuid

from absl import logging
import tensorflow as tf

from core import workdir as workdir_lib

SCANN_MODEL = "retrieval_scann"
EXACT_MODEL = "retrieval_exact"
ASSETS_EXTRA = "assets.extra"
METADATA_FILE = "metadata.json"
_STAGING_PREFIX = ".staging-"


def require_directory(path: str) -> None:
  """Raises NotADirectoryError if `path`, or its nearest existing parent, is a file.

  No version could be listed or written under it; without this check a file at
  W/exports would read as "no versions yet" and versions would restart at 1.
  """
  while not tf.io.gfile.exists(path):
    parent = os.path.dirname(path.rstrip("/"))
    if not parent or parent == path:
      return
    path = parent
  if not tf.io.gfile.isdir(path):
    raise NotADirectoryError(f"{path}: exists but is not a directory; exports cannot "
                             "be listed or written under it (move it away)")


def list_versions(base_dir: str) -> list[int]:
  """The published versions under `base_dir`, ascending ([] when it does not exist).

  Raises:
    NotADirectoryError: `base_dir` or a parent of it is a file (require_directory).
  """
  require_directory(base_dir)
  if not tf.io.gfile.isdir(base_dir):
    return []
  names = (name.rstrip("/") for name in tf.io.gfile.listdir(base_dir))
  return sorted(int(name) for name in names if name.isdigit())


def latest_version_dir(base_dir: str) -> str | None:
  """The directory of the newest version, or None when there is none."""
  versions = list_versions(base_dir)
  return os.path.join(base_dir, str(versions[-1])) if versions else None


def next_version(*base_dirs: str, min_version: int = 1) -> int:
  """One more than the newest version in any of `base_dirs`, and at least `min_version`.

  Taking the maximum over all variants gives the ScaNN and exact exports of one
  model the same number, and a number never reused after a partial export.
  `min_version` is a high-water mark kept elsewhere (the daily manifest): with it,
  versions do not restart at 1 when the export directories were lost.
  """
  return max(min_version,
             1 + max((v for base in base_dirs for v in list_versions(base)), default=0))


def staging_dir(base_dir: str, version: int) -> str:
  """A fresh directory name beside `<base_dir>/<version>` to write the version into."""
  return os.path.join(base_dir, f"{_STAGING_PREFIX}{version}-{uuid.uuid4().hex}")


def remove_stale_staging(base_dir: str) -> int:
  """Deletes staging directories left by crashed exports; returns how many."""
  if not tf.io.gfile.isdir(base_dir):
    return 0
  stale = [name.rstrip("/") for name in tf.io.gfile.listdir(base_dir)
           if name.startswith(_STAGING_PREFIX)]
  for name in stale:
    logging.warning("removing the staging directory of an unfinished export: %s/%s",
                    base_dir, name)
    tf.io.gfile.rmtree(os.path.join(base_dir, name))
  return len(stale)


def publish(staged: str, base_dir: str, version: int) -> str:
  """Renames a finished staging directory to `<base_dir>/<version>`.

  Raises:
    FileExistsError: the version exists already (versions are never overwritten).
  """
  target = os.path.join(base_dir, str(version))
  if tf.io.gfile.exists(target):
    raise FileExistsError(f"{target} exists; versions are never overwritten")
  tf.io.gfile.rename(staged, target, overwrite=False)
  return target


def prune(base_dir: str, keep: int) -> list[int]:
  """Deletes all but the newest `keep` published versions under `base_dir`, oldest
  first; returns the versions deleted. Staging directories are not touched.

  TF Serving unloads a version whose directory goes (its default policy serves
  the latest only). The numbers are never reused (`next_version`).

  Raises:
    ValueError: `keep` < 1 (the newest version is always kept).
  """
  if keep < 1:
    raise ValueError(f"keep must be >= 1, got {keep}")
  stale = list_versions(base_dir)[:-keep]
  for version in stale:
    logging.info("removing export %s/%d (keeping the newest %d)", base_dir, version, keep)
    tf.io.gfile.rmtree(os.path.join(base_dir, str(version)))
  return stale


def metadata_path(export_dir: str) -> str:
  """<export_dir>/assets.extra/metadata.json."""
  return os.path.join(export_dir, ASSETS_EXTRA, METADATA_FILE)


def write_metadata(export_dir: str, values: dict[str, Any]) -> str:
  """Writes an export's metadata.json (atomically); returns its path."""
  return workdir_lib.write_json(metadata_path(export_dir), values, indent=2,
                                sort_keys=True)


def read_metadata(export_dir: str) -> dict[str, Any]:
  """The metadata.json of an export.

  Raises:
    FileNotFoundError: the export has none.
    ValueError: it is not a JSON object (naming the file).
  """
  path = metadata_path(export_dir)
  try:
    with tf.io.gfile.GFile(path) as f:
      text = f.read()
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(f"{path}: missing; not an export of serving.export") from e
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: line {e.lineno}: unreadable metadata: {e.msg}") from e
  if not isinstance(values, dict):
    raise ValueError(f"{path}: line 1: metadata must be a JSON object")
  return values


def exports_before(workdir: str, day: datetime.date) -> Optional[tuple[str, str]]:
  """(scann_dir, exact_dir) of the newest export labelled with a day before `day`.

  What day D's test-then-train evaluation scores: an export labelled D or later
  comes from a model that has trained on D (a forced re-run of D, a catch-up
  that ran ahead). Both variants share a version number and the exact one is
  published last, so the exact versions are searched, newest first.

  Returns:
    The two version directories, or None when no export is labelled before `day`.

  Raises:
    FileNotFoundError: an exact version without its ScaNN twin, or without metadata.
    ValueError: unreadable metadata, or a bad "day" in it (naming the file).
    NotADirectoryError: W/exports, or a base under it, is a file.
  """
  paths = workdir_lib.Workdir(workdir)
  scann_base = paths.exports_base(SCANN_MODEL)
  exact_base = paths.exports_base(EXACT_MODEL)
  for version in reversed(list_versions(exact_base)):
    exact_dir = os.path.join(exact_base, str(version))
    label = read_metadata(exact_dir).get("day")
    try:
      labelled = datetime.date.fromisoformat(label)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{metadata_path(exact_dir)}: \"day\" is {label!r}, not a "
                       "YYYY-MM-DD date") from e
    if labelled < day:
      scann_dir = os.path.join(scann_base, str(version))
      if not tf.io.gfile.isdir(scann_dir):
        raise FileNotFoundError(
            f"{scann_dir}: missing, though its exact twin {exact_dir} is published")
      return scann_dir, exact_dir
  return None

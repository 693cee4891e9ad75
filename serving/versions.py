"""TF Serving version directories: integers that only grow, published atomically.

TF Serving watches `<base>/<int>/` and loads a version as soon as its directory
appears, so a version is written whole in a staging directory beside the target
(same filesystem, a name TF Serving ignores because it is not an integer) and then
renamed into place. A crash leaves only a staging directory, which the next export
removes. Rename is atomic on POSIX filesystems and HDFS; on object stores (gs://,
s3://) it is a copy, so write there from a finished local version instead.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import uuid  # noqa: E402

from absl import logging  # noqa: E402
import tensorflow as tf  # noqa: E402

_STAGING_PREFIX = ".staging-"


def list_versions(base_dir: str) -> list[int]:
  """The published versions under `base_dir`, ascending ([] when it does not exist)."""
  if not tf.io.gfile.isdir(base_dir):
    return []
  names = (name.rstrip("/") for name in tf.io.gfile.listdir(base_dir))
  return sorted(int(name) for name in names if name.isdigit())


def latest_version_dir(base_dir: str) -> str | None:
  """The directory of the newest version, or None when there is none."""
  versions = list_versions(base_dir)
  return os.path.join(base_dir, str(versions[-1])) if versions else None


def next_version(*base_dirs: str) -> int:
  """One more than the newest version in any of `base_dirs` (1 when none exists).

  Taking the maximum over all variants gives the ScaNN and exact exports of one
  model the same number, and a number never reused after a partial export.
  """
  return 1 + max((v for base in base_dirs for v in list_versions(base)), default=0)


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

"""Independent keyed hash functions from item-id strings to sketch buckets.

Each of the m rows of a sketch gets its own 128-bit SipHash key
(`tf.strings.to_hash_bucket_strong`), so the rows collide independently. Keys are
derived from one integer seed, so a sketch is reproducible and a checkpoint written
with seed s is only meaningful to a layer built with seed s (the layer's config
carries it). There is no vocabulary: an id never seen before simply hashes.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_MAX_KEY = np.iinfo(np.int64).max


def hash_keys(seed: int, num_hashes: int) -> list[tuple[int, int]]:
  """Returns `num_hashes` SipHash keys derived deterministically from `seed`."""
  if num_hashes < 1:
    raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
  rng = np.random.Generator(np.random.PCG64(seed))
  keys = rng.integers(0, _MAX_KEY, size=(num_hashes, 2), dtype=np.int64)
  return [(int(k0), int(k1)) for k0, k1 in keys]


def bucketize(item_ids: tf.Tensor, num_buckets: int,
              keys: list[tuple[int, int]]) -> tf.Tensor:
  """Hashes string ids [N] into int64 buckets [m, N], row i under key i."""
  return tf.stack([
      tf.strings.to_hash_bucket_strong(item_ids, num_buckets, key=list(key))
      for key in keys
  ])


def cells(item_ids: tf.Tensor, num_buckets: int,
          keys: list[tuple[int, int]]) -> tf.Tensor:
  """Indices [m, N] of string ids [N] into a flat row-major [m * H] sketch."""
  buckets = bucketize(item_ids, num_buckets, keys)
  rows = tf.range(len(keys), dtype=tf.int64)[:, tf.newaxis]
  return buckets + rows * num_buckets

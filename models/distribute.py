"""Multi-worker training: the strategy from TF_CONFIG, and the global batch of a step.

The trainer runs synchronous data parallelism under
`tf.distribute.MultiWorkerMirroredStrategy` (MWMS): N worker processes, one
replica each (or more: local devices), described by the standard TF_CONFIG
environment variable, e.g. for worker 1 of 2

  TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
              "task": {"type": "worker", "index": 1}}'

Every step consumes one global batch of `batch_size` examples, split in order
across the replicas (`replica_rows`), and the replicas compute together what one
process would on that batch (models/retrieval.py):
  - each replica scores its queries against the candidates of the whole global
    batch, all-gathered (`GlobalBatch`), with their log q: the in-batch softmax
    of B, not of B / replicas;
  - the frequency estimator is updated with the global batch's ids at the global
    step on every replica: its copies (one per replica, mirrored variables
    updated in replica context) make the same update and stay equal;
  - the loss is divided by the global batch's rows, and the gradients of the
    replicas are summed by the optimizer, so 2 workers x B/2 give the loss and
    gradients of 1 worker x B.

Cross-replica calls here are `tf.distribute.get_replica_context().all_gather`
and `all_reduce` inside `strategy.run`, the supported route for a custom step.
On CPUs (anything but XLA on all-GPU devices) they go through `merge_call`,
which uses each value's own `.device` as the destination of the reduction; a
graph tensor made outside `strategy.run` (in the cross-replica part of a
tf.function) has no device, and the call fails with "ValueError: destinations
can not be empty". Every value is therefore passed through `tf.identity` inside
the replica function first (`_local`), which places it on the replica's device.

ParameterServerStrategy is refused (`strategy_from_environment`): its workers
step asynchronously, so there is no global batch to gather candidates over and
no single global step at which to update the estimator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from typing import Any, Iterator, Mapping, NamedTuple, Optional

import tensorflow as tf

TF_CONFIG = "TF_CONFIG"
_WORKER_TYPES = ("chief", "worker")
# Every byte as a one-byte string: gathered ids are rebuilt from their bytes.
_BYTES = tuple(bytes([b]) for b in range(256))


class Task(NamedTuple):
  """This process's place in a multi-worker cluster.

  Attributes:
    type: "chief" or "worker".
    index: its index among the tasks of that type.
    workers: chief and worker tasks in the cluster.
    has_chief: whether the cluster has a "chief" task.
  """
  type: str
  index: int
  workers: int
  has_chief: bool

  @property
  def is_chief(self) -> bool:
    """TF's convention: the "chief" task, or worker 0 when there is none. The
    chief writes what the job keeps: checkpoints, summaries, the config."""
    return self.type == "chief" or (self.index == 0 and not self.has_chief)


def cluster_task(environ: Optional[Mapping[str, str]] = None) -> Optional[Task]:
  """The task TF_CONFIG describes, or None when TF_CONFIG is unset or names no cluster.

  Raises:
    ValueError: TF_CONFIG is not JSON, or describes a cluster this trainer does
      not run: parameter servers or an evaluator (ParameterServerStrategy's
      asynchronous workers have no global batch and no single global step), or
      a task that is not in the cluster.
  """
  environ = os.environ if environ is None else environ
  text = environ.get(TF_CONFIG, "").strip()
  if not text:
    return None
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{TF_CONFIG} is not JSON: {e}") from None
  cluster = config.get("cluster") or {}
  if not cluster:
    return None
  others = sorted(set(cluster) - set(_WORKER_TYPES))
  if others:
    raise ValueError(
        f"{TF_CONFIG}: the cluster has {others} tasks; only 'chief' and 'worker' are "
        "supported (MultiWorkerMirroredStrategy): ParameterServerStrategy's workers "
        "step asynchronously, with no global batch and no single estimator step")
  task = config.get("task") or {}
  kind, index = task.get("type"), task.get("index", 0)
  if kind not in _WORKER_TYPES or not isinstance(index, int) or not (
      0 <= index < len(cluster.get(kind, ()))):
    raise ValueError(f"{TF_CONFIG}: task {task} is not a task of the cluster "
                     f"{ {t: len(v) for t, v in cluster.items()} }")
  return Task(kind, index, sum(len(cluster.get(t, ())) for t in _WORKER_TYPES),
              "chief" in cluster)


def strategy_task(strategy: tf.distribute.Strategy) -> Optional[Task]:
  """The task of a multi-worker strategy, None for a single-process one."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return None
  spec = resolver.cluster_spec()
  if not spec.as_dict() or resolver.task_type not in _WORKER_TYPES:
    return None
  return Task(resolver.task_type, int(resolver.task_id),
              sum(spec.num_tasks(t) for t in _WORKER_TYPES if t in spec.jobs),
              "chief" in spec.jobs)


def strategy_from_environment(environ: Optional[Mapping[str, str]] = None
                              ) -> Optional[tf.distribute.Strategy]:
  """MultiWorkerMirroredStrategy when TF_CONFIG names a cluster, else None.

  Call it first thing in a program (before any TensorFlow op runs): MWMS
  configures the collective ops of the process, which is refused once the
  runtime has started ("Collective ops must be configured at program startup").

  Raises:
    ValueError: see `cluster_task`.
  """
  if cluster_task(environ) is None:
    return None
  # RING: collectives over gRPC, what CPUs have (NCCL is for GPUs).
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=tf.distribute.experimental.CommunicationImplementation.RING)
  return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def localhost_tf_configs(workers: int) -> list[str]:
  """TF_CONFIG values of a cluster of `workers` worker tasks on free 127.0.0.1
  ports, one per task (tests, benchmarks, trying it out on one machine).

  The ports are free when chosen (held together, so distinct); another process
  may still take one before a worker binds it, so a caller retries on "address
  already in use".
  """
  sockets = [socket.socket() for _ in range(workers)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]}
  finally:
    for s in sockets:
      s.close()
  return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": task}})
          for task in range(workers)]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes what the job keeps: True but for a multi-worker
  strategy's non-chief workers."""
  task = strategy_task(strategy)
  return task is None or task.is_chief


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes taking part in the strategy's steps (1 unless multi-worker)."""
  task = strategy_task(strategy)
  return 1 if task is None else task.workers


@contextlib.contextmanager
def write_directory(directory: str, chief: bool) -> Iterator[str]:
  """Where a worker writes what all workers must write but only the chief keeps.

  TF's multi-worker recipe: every worker saves (a save may run collectives),
  the chief into `directory`, the others into a temporary directory deleted
  afterwards, so that they never overwrite the chief's files.
  """
  if chief:
    yield directory
    return
  temporary = tempfile.mkdtemp(prefix="towerstream-worker-")
  try:
    yield temporary
  finally:
    shutil.rmtree(temporary, ignore_errors=True)


def replica_rows(rows: tf.Tensor, replica: tf.Tensor, replicas: int
                 ) -> tuple[tf.Tensor, tf.Tensor]:
  """[start, end) of global replica `replica`'s rows in a global batch of `rows`.

  In order and as even as can be: replica r gets rows [r n / R, (r + 1) n / R),
  so a short last batch is still split in order (a replica may get none).
  """
  rows = tf.cast(rows, tf.int64)
  replica = tf.cast(replica, tf.int64)
  return rows * replica // replicas, rows * (replica + 1) // replicas


def _local(value: tf.Tensor) -> tf.Tensor:
  """`value` placed on this replica's device (see the module docstring)."""
  return tf.identity(value)


class GlobalBatch(NamedTuple):
  """This replica's share of the global batch: where its rows sit, how many in all.

  Built in replica context (inside `strategy.run`) with `of`; `None` from `of`
  when there is one replica, so that the single-process path is unchanged.

  Attributes:
    offset: int32, rows of the replicas before this one.
    rows: int32, rows of the global batch.
  """
  offset: tf.Tensor
  rows: tf.Tensor

  @classmethod
  def of(cls, local_rows: tf.Tensor) -> Optional[GlobalBatch]:
    """The global batch that this replica's `local_rows` belong to; None without
    cross-replica training (one replica, or not in a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
      return None
    sizes = context.all_gather(_local(tf.reshape(tf.cast(local_rows, tf.int32), [1])),
                               axis=0)
    replica = context.replica_id_in_sync_group
    return cls(offset=tf.reduce_sum(sizes[:replica]), rows=tf.reduce_sum(sizes))

  @staticmethod
  def gather(local: tf.Tensor) -> tf.Tensor:
    """The replicas' `local` rows concatenated in replica order (= the global batch).

    Differentiable: the gradient of a replica's rows is the sum of every replica's.
    """
    return tf.distribute.get_replica_context().all_gather(_local(local), axis=0)

  @staticmethod
  def gather_strings(local: tf.Tensor) -> tf.Tensor:
    """`gather` for a string vector [n], which collectives cannot carry.

    Each string travels as its bytes, zero-padded to the batch's longest and
    packed 8 to an int64, with its length, and is rebuilt byte for byte.
    """
    context = tf.distribute.get_replica_context()
    all_lengths = context.all_gather(_local(tf.strings.length(local)), axis=0)
    words = (tf.reduce_max(tf.concat([all_lengths, [1]], 0)) + 7) // 8
    raw = tf.io.decode_raw(local, tf.uint8, fixed_length=words * 8)
    packed = tf.bitcast(tf.reshape(raw, [-1, words, 8]), tf.int64)
    all_packed = context.all_gather(_local(packed), axis=0)
    codes = tf.reshape(tf.bitcast(all_packed, tf.uint8), [-1, words * 8])
    chars = tf.gather(tf.constant(_BYTES), tf.cast(codes, tf.int32))
    return tf.strings.substr(tf.strings.reduce_join(chars, axis=1),
                             tf.zeros_like(all_lengths), all_lengths)

  def own_first(self, global_values: tf.Tensor) -> tf.Tensor:
    """Global rows rotated so that this replica's come first, the others after in
    replica order (as TFRS's cross-replica concat does): row i of this replica's
    queries then has its positive in column i."""
    return tf.roll(global_values, -self.offset, axis=0)

  @staticmethod
  def sum(value: tf.Tensor) -> tf.Tensor:
    """The sum of `value` over the replicas, on every replica."""
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                          _local(value))


def describe(strategy: tf.distribute.Strategy) -> dict[str, Any]:
  """The strategy in a few fields, for logs and stats."""
  return {"strategy": type(strategy).__name__, "workers": num_workers(strategy),
          "replicas": strategy.num_replicas_in_sync, "chief": is_chief(strategy)}

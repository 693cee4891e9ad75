r"""Multi-worker training throughput (issue 15), and what a step sends at N workers.

Measured, on this machine: `Trainer.train_day` examples/s on a synthetic day
(bench/train_throughput.py's examples: batch 1024, history 50) by
  one_process   the trainer with no strategy (what a single machine runs);
  mwms_1        one MultiWorkerMirroredStrategy worker (TF_CONFIG of one task):
                the strategy's own cost;
  mwms_2        two worker processes on 127.0.0.1, each global batch split in
                two: global batch softmax, one estimator, one step per call.
Each variant trains a short warm-up day (tracing) then the timed day, in fresh
processes, in alternating rounds; the best round counts (the machine may be
shared). Beside examples/s it reports the CPU seconds per example summed over
the variant's processes, which other load disturbs less.

On paper (--paper_workers, default 100): the bytes each worker sends or
receives per step, from the model's own gradient structure (one batch's
gradients: dense tensors and the rows of the sparse embedding gradients) and
the collectives of models/distribute.py: the candidate all-gather and its
gradient's all-reduce, the id all-gather, the gradient all-reduce (dense: ring,
2 (R-1)/R x bytes; sparse: all-gather, R - 1 other workers' rows), and the
estimator, which sends nothing (each worker updates its copy with the B ids).

  python bench/multiworker_throughput.py                 # 204800 examples a day
  python bench/multiworker_throughput.py --examples=4096 --variant_rounds=1 \
      --json_out=/tmp/m.json
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import train_throughput as tt  # noqa: E402  (its flags: --examples, ...)
from models import distribute  # noqa: E402
from models import features  # noqa: E402
from models import trainer as trainer_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.retrieval import TwoTowerModel  # noqa: E402

_ROLE = flags.DEFINE_enum("role", "bench", ["bench", "worker"],
                          "bench: the whole benchmark; worker: one training process.")
_WORKDIR = flags.DEFINE_string("workdir", None, "worker: its workdir.")
_VARIANT_ROUNDS = flags.DEFINE_integer("variant_rounds", 2,
                                       "Alternating rounds of the variants; best counts.")
_PAPER_WORKERS = flags.DEFINE_integer("paper_workers", 100, "Workers of the estimate.")
_ID_BYTES = flags.DEFINE_integer("id_bytes", 12, "Bytes of an item id in the estimate.")
_BANDWIDTH = flags.DEFINE_float("bandwidth_gbit_s", 10.0, "Per-worker network, Gbit/s.")
_HOP_LATENCY_US = flags.DEFINE_float("hop_latency_us", 50.0,
                                     "Latency of one ring hop, microseconds.")
WARM_DAY, TIMED_DAY = datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)
VARIANTS = {"one_process": 0, "mwms_1": 1, "mwms_2": 2}  # name -> TF_CONFIG workers


def _config() -> ModelConfig:
  return ModelConfig(batch_size=tt._BATCH_SIZE.value, checkpoint_every_steps=10**9,
                        log_every_steps=10**9)


def worker() -> None:
  """One training process: the warm-up day, then the timed day; prints its stats."""
  strategy = distribute.strategy_from_environment()  # before any TensorFlow op
  trainer = trainer_lib.Trainer(_WORKDIR.value, _config(), strategy=strategy)
  trainer.train_day(WARM_DAY)
  cpu = time.process_time()
  stats = trainer.train_day(TIMED_DAY)
  print(json.dumps({"examples_per_s": stats["examples_per_s"],
                    "examples": stats["examples_this_run"],
                    "cpu_s": time.process_time() - cpu, "chief": trainer.is_chief,
                    "mean_loss": stats["mean_loss"]}), flush=True)


def run_variant(data_root: str, workers: int, scratch: str) -> dict[str, float]:
  """One run of a variant in fresh processes and a fresh workdir (data shared)."""
  workdir = tempfile.mkdtemp(dir=scratch)
  os.symlink(data_root, os.path.join(workdir, "data"))
  configs = distribute.localhost_tf_configs(workers) if workers else [None]
  processes = []
  try:
    for config in configs:
      env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
      env.pop(distribute.TF_CONFIG, None)
      if config:
        env[distribute.TF_CONFIG] = config
      processes.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "--role=worker",
           f"--workdir={workdir}", f"--batch_size={tt._BATCH_SIZE.value}"],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=3600) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  results = []
  for p, (out, err) in zip(processes, outputs):
    if p.returncode != 0:
      raise RuntimeError(f"worker failed ({p.returncode}): {err[-3000:]}")
    results.append(json.loads(out.strip().splitlines()[-1]))
  chief = next(r for r in results if r["chief"])
  return {"examples_per_s": chief["examples_per_s"], "mean_loss": chief["mean_loss"],
          "cpu_us_per_example": 1e6 * sum(r["cpu_s"] for r in results) / chief["examples"]}


def gradient_structure(records: list[bytes]) -> dict[str, float]:
  """Per example of one batch: dense gradient bytes (per step) and sparse rows."""
  config = _config()
  model = TwoTowerModel(config)
  batch = features.parse_examples(tf.constant(records[:config.batch_size]),
                                  features.TRAINING_FEATURES,
                                  max_history=config.max_history)
  model(batch)
  with tf.GradientTape() as tape:
    loss = model.compute_loss(batch, training=True, step=tf.constant(1, tf.int64))
  dense_bytes = sparse_rows_bytes = 0.0
  for grad in tape.gradient(loss, model.trainable_variables):
    if isinstance(grad, tf.IndexedSlices):
      rows, width = grad.values.shape
      sparse_rows_bytes += rows * (width * 4 + 8)  # values + an int64 index
    else:
      dense_bytes += grad.shape.num_elements() * 4
  return {"dense_gradient_bytes": dense_bytes,
          "sparse_gradient_bytes_per_example": sparse_rows_bytes / config.batch_size,
          "embedding_dim": config.embedding_dim,
          "estimator_state_bytes": model.estimator.memory_bytes}


def on_paper(structure: dict[str, float], workers: int) -> dict[str, Any]:
  """Bytes one worker moves per step at `workers` workers, by collective, with a
  global batch of batch_size (fixed) and of batch_size per worker (grown)."""
  out: dict[str, Any] = {"workers": workers}
  for name, global_batch in (("fixed_global_batch", tt._BATCH_SIZE.value),
                             ("batch_per_worker", tt._BATCH_SIZE.value * workers)):
    per_worker = global_batch / workers
    others = workers - 1
    ring = 2 * others / workers
    d = structure["embedding_dim"]
    words = (_ID_BYTES.value + 7) // 8 * 8
    moved = {
        "candidate_gather": others * per_worker * d * 4,
        "candidate_gradient_all_reduce": ring * global_batch * d * 4,
        "id_gather": others * per_worker * (words + 4),
        "estimator": 0.0,
        "dense_gradient_all_reduce": ring * structure["dense_gradient_bytes"],
        "sparse_gradient_all_gather": (
            others * per_worker * structure["sparse_gradient_bytes_per_example"]),
    }
    total = sum(moved.values())
    # 9 collectives a step (sizes, ids x 2, candidates, their gradient, the
    # loss check, the sparse and dense gradients), each R - 1 ring hops at least.
    latency_s = 9 * 2 * others * _HOP_LATENCY_US.value * 1e-6
    out[name] = {
        "global_batch": global_batch, "bytes": {k: round(v) for k, v in moved.items()},
        "total_mb": round(total / 1e6, 1),
        "network_ms": round(1e3 * total * 8 / (_BANDWIDTH.value * 1e9), 1),
        "latency_ms": round(1e3 * latency_s, 1),
        "estimator_ids_updated_per_worker": global_batch,
        "logits_per_worker": round(per_worker * global_batch),
    }
  return out


def bench() -> dict[str, Any]:
  scratch = tempfile.mkdtemp(prefix="multiworker-bench-")
  base = os.path.join(scratch, "base")
  warm = tt.synthetic_examples(2 * tt._BATCH_SIZE.value, seed=1)
  records = tt.synthetic_examples(tt._EXAMPLES.value, seed=2)
  tt.write_day(base, WARM_DAY, warm)
  tt.write_day(base, TIMED_DAY, records)
  data_root = os.path.join(base, "data")
  best: dict[str, dict[str, float]] = {}
  for _ in range(_VARIANT_ROUNDS.value):
    for name, workers in VARIANTS.items():
      result = run_variant(data_root, workers, scratch)
      if name not in best or result["examples_per_s"] > best[name]["examples_per_s"]:
        best[name] = result
  one = best["one_process"]["examples_per_s"]
  structure = gradient_structure(records)
  return {
      "examples": tt._EXAMPLES.value, "batch_size": tt._BATCH_SIZE.value,
      "cpus": os.cpu_count(), "measured": best,
      "ratios": {name: round(v["examples_per_s"] / one, 3) for name, v in best.items()},
      "gradient_structure": structure,
      "paper": on_paper(structure, _PAPER_WORKERS.value),
  }


def main(argv: Sequence[str]) -> None:
  del argv
  if _ROLE.value == "worker":
    worker()
    return
  figures = bench()
  print(json.dumps(figures, indent=1))
  if tt._JSON.value:
    with open(tt._JSON.value, "w") as f:
      json.dump(figures, f, indent=1)


if __name__ == "__main__":
  app.run(main)

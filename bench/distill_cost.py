r"""The cost of distillation (issue 16, part 2): training examples/s, as ratios within one run.

The trainer's step alone, on one in-memory batch of synthetic examples (those
of bench/train_throughput.py, whose flags --batch_size, --history, --items,
--rounds, --steps_per_round and --json_out apply), timed in alternating rounds with the best
kept, for:
  none          distill_weight 0 (the teacher is never called);
  planted       distill_weight 1, an ItemAffinityTeacher over the --planted_items
                most popular items: the term's own cost, with a teacher that costs
                next to nothing;
  ranker_K      distill_weight 1, the real ranking teacher (models/ranker.py,
                untrained: its cost does not depend on its weights), on the first
                K columns (distill_candidates = K, for each K of --candidates);
  ranker_all    the same on every column (B x B pairs), with --ranker_all.
Each line gives examples/s, CPU us per example (less disturbed by other
processes) and the ratio of its examples/s to none's.

  python bench/distill_cost.py                               # batch 1024
  python bench/distill_cost.py --batch_size=256 --ranker_all --json_out=/tmp/d.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import distill  # noqa: E402
from models import features  # noqa: E402
from models import ranker as ranker_lib  # noqa: E402
from models import trainer as trainer_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
import train_throughput  # noqa: E402  (bench/, the script's directory)

_CANDIDATES = flags.DEFINE_list("candidates", ["64", "256"],
                                "distill_candidates K of the ranker_K variants.")
_RANKER_ALL = flags.DEFINE_bool("ranker_all", False,
                                "Also time the ranker on all B x B pairs (slow, memory).")
_PLANTED_ITEMS = flags.DEFINE_integer("planted_items", 2000,
                                      "Items of the planted teacher's table.")


def planted_teacher(items: int) -> distill.ItemAffinityTeacher:
  """A random affinity table over the `items` most popular items (ids i0, i1, ...)."""
  table = np.random.default_rng(0).normal(0.0, 1.0, [items, items])
  return distill.ItemAffinityTeacher([f"i{i}" for i in range(items)], table)


def main(argv: Sequence[str]) -> None:
  del argv
  batch_size = flags.FLAGS.batch_size
  base = ModelConfig(batch_size=batch_size, max_history=flags.FLAGS.history)
  records = train_throughput.synthetic_examples(batch_size, seed=1)
  batch = features.parse_examples(tf.constant(records), features.TRAINING_FEATURES,
                                  max_history=flags.FLAGS.history)
  ranker = ranker_lib.build(ranker_lib.RankerConfig.like(base))
  variants = {"none": (base, None),
              "planted": (base.replace(distill_weight=1.0),
                          planted_teacher(_PLANTED_ITEMS.value))}
  for k in map(int, _CANDIDATES.value):
    variants[f"ranker_{k}"] = (base.replace(distill_weight=1.0, distill_candidates=k),
                               ranker)
  if _RANKER_ALL.value:
    variants["ranker_all"] = (base.replace(distill_weight=1.0), ranker)
  with tempfile.TemporaryDirectory() as root:
    trainers = {name: trainer_lib.Trainer(os.path.join(root, name), config,
                                          teacher=teacher)
                for name, (config, teacher) in variants.items()}
    best = train_throughput.time_steps(trainers, batch)

  figures = {"batch_size": batch_size, "history": flags.FLAGS.history,
             "cpus": os.cpu_count()}
  for name, timing in best.items():
    figures.update(timing.figures(name))
    figures[f"{name}_speed_over_none"] = best["none"].wall_s / timing.wall_s
    figures[f"{name}_cpu_over_none"] = timing.cpu_s / best["none"].cpu_s
  text = json.dumps({name: round(value, 3) for name, value in figures.items()}, indent=1)
  print(text)
  if flags.FLAGS.json_out:
    with open(flags.FLAGS.json_out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  flags.FLAGS.set_default("rounds", 6)
  flags.FLAGS.set_default("steps_per_round", 3)
  app.run(main)

r"""Trainer days with one parse at a time vs AUTOTUNE-parallel parses (issue 4).

`models.data.stream_batches` parses one batch at a time behind the prefetch
(`parallel_parses=None`), each parse being multi-threaded already. This A/B
measures that choice: the same synthetic day (default config in
models.config.ONE_PASS's regime, batch 1024, history 50) is trained end to end by
one Trainer, alternating the two settings day after day; each keeps its best
day. A warm-up day per setting is not counted. One pass: with more epochs the
window is parsed once, eagerly (`models.data.parse_window`), and the setting
would change nothing.

  python bench/input_parallelism.py                  # 204,800 examples a day
  python bench/input_parallelism.py --ab_rounds=3 --json_out=/tmp/p.json
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402,F401  (the environment, before TensorFlow loads)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import train_throughput as tt  # noqa: E402  (its flags: --examples, ...)
from core.workdir import Workdir  # noqa: E402
from models import data  # noqa: E402
from models import trainer as trainer_lib  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.config import ONE_PASS  # noqa: E402

_ROUNDS = flags.DEFINE_integer("ab_rounds", 6, "Timed days per setting.")
SETTINGS = {"one_at_a_time": None, "autotune_parallel": tf.data.AUTOTUNE}


def main(argv: Sequence[str]) -> None:
  del argv
  examples = flags.FLAGS.examples
  first = tt.FIRST_DAY
  original = data.stream_batches
  best = {name: float("inf") for name in SETTINGS}
  with tempfile.TemporaryDirectory() as root:
    source = os.path.join(root, "source")
    tt.write_day(source, first, tt.synthetic_examples(examples, seed=1))
    trainer = trainer_lib.Trainer(os.path.join(root, "workdir"), ModelConfig(**ONE_PASS))
    day = first
    for round_ in range(_ROUNDS.value + 1):
      for name, parses in SETTINGS.items():
        shutil.copytree(Workdir(source).data_dir(first),
                        Workdir(trainer.workdir).data_dir(day))
        data.stream_batches = functools.partial(original, parallel_parses=parses)
        start = time.perf_counter()
        trainer.train_day(day)
        if round_:  # round 0 traces
          best[name] = min(best[name], time.perf_counter() - start)
        day += datetime.timedelta(days=1)
  data.stream_batches = original
  figures = {f"{name}_examples_per_s": examples / seconds for name, seconds in best.items()}
  figures["one_at_a_time_speedup"] = best["autotune_parallel"] / best["one_at_a_time"]
  for name, value in figures.items():
    print(f"{name:36s} {value:12.3f}")
  if flags.FLAGS.json_out:
    with open(flags.FLAGS.json_out, "w") as f:
      json.dump({"examples": examples, **figures}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

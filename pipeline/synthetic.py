r"""Writes the synthetic world's daily logs and catalogs (`pipeline.synthetic_world`).

    python -m pipeline.synthetic --out=/tmp/w --first_day=2024-01-01 --days=3

Writes OUT/logs/D/ and OUT/catalog/D/ for each day and prints a per-day summary
(events, catalog lines, corrupted lines by kind). The output is a pure function of
the flags (byte for byte). A bad flag value fails in one line with exit status 2.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app
from absl import flags

from core import app_logging
from core import cli
from pipeline import synthetic_world

_DEFAULTS = synthetic_world.WorldConfig()

_OUT = flags.DEFINE_string("out", None, "Output root: logs/ and catalog/ go under it.")
_FIRST_DAY = flags.DEFINE_string("first_day", _DEFAULTS.start_date.isoformat(),
                                 "First day, YYYY-MM-DD.")
_DAYS = flags.DEFINE_integer("days", _DEFAULTS.days, "Number of days.", lower_bound=1)
_USERS = flags.DEFINE_integer("users", _DEFAULTS.users, "Number of users.", lower_bound=1)
_ITEMS = flags.DEFINE_integer("items", _DEFAULTS.items,
                              "Items cataloged before the first day.", lower_bound=1)
_NEW_ITEMS = flags.DEFINE_integer("new_items_per_day", _DEFAULTS.new_items_per_day,
                                  "Items born each day.", lower_bound=0)
_EVENTS = flags.DEFINE_integer("events_per_day", _DEFAULTS.events_per_day,
                               "Events per day.", lower_bound=1)
_ZIPF = flags.DEFINE_float("zipf", _DEFAULTS.zipf, "Zipf exponent of item appeal.")
_SHARDS = flags.DEFINE_integer("shards", _DEFAULTS.shards, "Log files per day.",
                               lower_bound=1)
_BAD = flags.DEFINE_float("bad_line_rate", _DEFAULTS.bad_line_rate,
                          "Fraction of lines corrupted.", lower_bound=0, upper_bound=1)
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed,
                             "Random seed; output is a function of it.")


def main(argv: Sequence[str]) -> None:
  """Checks the flags, generates the days, prints their summary."""
  del argv
  try:
    out = cli.workdir(_OUT.value, "out")
    cfg = synthetic_world.WorldConfig(
        start_date=cli.parse_day(_FIRST_DAY.value, "first_day"), days=_DAYS.value,
        users=_USERS.value, items=_ITEMS.value, new_items_per_day=_NEW_ITEMS.value,
        events_per_day=_EVENTS.value, zipf=_ZIPF.value, shards=_SHARDS.value,
        bad_line_rate=_BAD.value, seed=_SEED.value)
  except (app.UsageError, flags.Error) as e:
    cli.exit_with_error(e)
  app_logging.setup(out, "synthetic")
  print(json.dumps(synthetic_world.generate(out, cfg), indent=1))


if __name__ == "__main__":
  app.run(main)

r"""Synthetic daily logs and catalogs: the project's embedded default data (a library;
its command is `pipeline.synthetic`).

The generated world makes the paper's problem real:
- item popularity is Zipf-like and drifts: new items are born every day and an
  item's appeal halves every `half_life_days`, so hot items cool down;
- users have a few topic interests and watch in sessions: the next item is often
  from the previous item's channel or topic (so seed and history carry signal);
- reward is a watch fraction in [0, 1] that grows with the user-item topic match;
- channels own topics, and items take their topics from their channel.

Everything is drawn with numpy in vectorised steps (one step per position within a
session), so a million events take seconds. Output, for each day D:
`OUT/logs/D/part-NNNNN-of-SSSSS.jsonl.gz` and `OUT/catalog/D/part-00000-of-00001.jsonl.gz`,
lines in exactly the raw schema of `pipeline/schema.py`. The output is a pure
function of `WorldConfig` (byte for byte).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import posixpath
from typing import Iterator

import numpy as np

from core import workdir as workdir_lib
from pipeline import textio

DEVICES = ("android", "ios", "web", "tv")
COUNTRIES = ("US", "BR", "IN", "DE", "JP", "FR", "GB", "MX")
# Kinds of corruption --bad_line_rate injects; "duplicate" repeats an event_id.
CORRUPTIONS = ("truncated_json", "missing_id", "nan_reward", "bad_timestamp",
               "out_of_partition", "duplicate", "oversize_id", "wrong_type",
               "negative_reward")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Sizes and dynamics of the synthetic world."""
  start_date: dt.date = dt.date(2024, 1, 1)
  days: int = 3
  users: int = 2000
  items: int = 5000
  new_items_per_day: int = 100
  events_per_day: int = 20000
  topics: int = 40
  items_per_channel: int = 20
  zipf: float = 1.1
  half_life_days: float = 5.0
  mean_session_length: float = 6.0
  p_same_channel: float = 0.45
  p_same_topic: float = 0.25
  shards: int = 2
  bad_line_rate: float = 0.0
  seed: int = 0


@dataclasses.dataclass
class _World:
  """The fixed part of the world, drawn once from the seed."""
  item_channel: np.ndarray      # [I] int
  item_topics: list[np.ndarray]  # per item, topic ids
  item_weights: list[np.ndarray]
  item_main_topic: np.ndarray   # [I]
  item_birth: np.ndarray        # [I] day index (< 0: before the first day)
  item_appeal: np.ndarray       # [I] Zipf weight
  item_duration: np.ndarray     # [I] seconds
  user_interest: np.ndarray     # [U, T] rows sum to 1
  user_activity: np.ndarray     # [U] sums to 1
  user_device: np.ndarray
  user_country: np.ndarray


def _build_world(cfg: WorldConfig) -> _World:
  rng = np.random.default_rng([cfg.seed, 0])
  n_items = cfg.items + cfg.new_items_per_day * cfg.days
  n_channels = max(1, math.ceil(n_items / cfg.items_per_channel))
  channel_topics = [rng.choice(cfg.topics, size=rng.integers(1, 3), replace=False)
                    for _ in range(n_channels)]
  item_channel = rng.integers(0, n_channels, size=n_items)
  item_topics, item_weights = [], []
  for c in item_channel:
    own = channel_topics[c]
    extra = rng.integers(0, cfg.topics, size=rng.integers(0, 2))
    topics = np.unique(np.concatenate([own, extra]))
    weights = np.where(np.isin(topics, own), 1.0, 0.3)
    item_topics.append(topics)
    item_weights.append(np.round(weights / weights.sum(), 4))
  main = np.array([t[np.argmax(w)] for t, w in zip(item_topics, item_weights)])
  # Items before day 0 have random ages, so some start hot and others already cool.
  birth = np.concatenate([
      -rng.integers(1, 30, size=cfg.items),
      np.repeat(np.arange(cfg.days), cfg.new_items_per_day)])
  ranks = rng.permutation(n_items)
  appeal = (ranks + 1.0) ** -cfg.zipf
  duration = np.round(rng.lognormal(np.log(600), 0.8, size=n_items), 1)
  interest = np.zeros((cfg.users, cfg.topics))
  for u in range(cfg.users):
    k = rng.integers(1, 4)
    interest[u, rng.choice(cfg.topics, size=k, replace=False)] = rng.dirichlet(np.ones(k))
  activity = rng.pareto(1.5, size=cfg.users) + 1.0
  return _World(item_channel, item_topics, item_weights, main, birth, appeal, duration,
                interest, activity / activity.sum(),
                rng.integers(0, len(DEVICES), size=cfg.users),
                rng.integers(0, len(COUNTRIES), size=cfg.users))


class _GroupSampler:
  """Draws an item from a group (topic or channel), by weight, vectorised.

  The groups' CDFs are laid end to end on [g, g + 1) so one `searchsorted` serves a
  whole batch of draws from different groups.
  """

  def __init__(self, groups: np.ndarray, weights: np.ndarray, n_groups: int):
    order = np.lexsort((np.arange(len(groups)), groups))
    self._items = order
    g = groups[order]
    w = weights[order]
    totals = np.bincount(g, weights=w, minlength=n_groups)
    cum = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)])[g]
    with np.errstate(invalid="ignore", divide="ignore"):
      self._cdf = g + np.where(totals[g] > 0, cum / totals[g], 1.0)
    self._has = totals > 0

  def has(self, groups: np.ndarray) -> np.ndarray:
    return self._has[groups]

  def draw(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = groups + rng.random(len(groups)) * (1 - 1e-9)
    idx = np.searchsorted(self._cdf, u, side="right")
    return self._items[np.minimum(idx, len(self._items) - 1)]


def _item_id(i: int) -> str:
  return f"item_{i:06d}"


def _day_events(world: _World, cfg: WorldConfig, day: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Draws one day's events as columns, in session order."""
  alive = world.item_birth <= day
  age = np.maximum(day - world.item_birth, 0)
  weight = np.where(alive, world.item_appeal * 0.5 ** (age / cfg.half_life_days), 0.0)
  by_topic = _GroupSampler(world.item_main_topic, weight, cfg.topics)
  by_channel = _GroupSampler(world.item_channel, weight, int(world.item_channel.max()) + 1)
  n_sessions = max(1, int(round(cfg.events_per_day / cfg.mean_session_length)))
  lengths = rng.geometric(1.0 / cfg.mean_session_length, size=n_sessions)
  # Trim or pad so the day has exactly events_per_day events.
  excess = lengths.sum() - cfg.events_per_day
  while excess != 0:
    i = rng.integers(0, n_sessions)
    step = -min(excess, lengths[i] - 1) if excess > 0 else 1
    lengths[i] += step
    excess += step
  users = rng.choice(cfg.users, size=n_sessions, p=world.user_activity)
  # Diurnal start times: more sessions in the evening (UTC, for simplicity).
  hours = rng.choice(24, size=n_sessions, p=_DIURNAL)
  starts = hours * 3600 + rng.integers(0, 3600, size=n_sessions)
  n = int(lengths.sum())
  session = np.repeat(np.arange(n_sessions), lengths)
  position = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  items = np.empty(n, dtype=np.int64)
  topic_cdf = np.cumsum(world.user_interest, axis=1)
  for pos in range(int(lengths.max())):
    rows = np.flatnonzero(position == pos)
    s_users = users[session[rows]]
    u = rng.random(len(rows))[:, None]
    topic = np.minimum((u > topic_cdf[s_users]).sum(axis=1), cfg.topics - 1)
    choice = by_topic.draw(topic, rng)
    fallback = ~by_topic.has(topic)  # the user's topic has no live item today
    if pos > 0:
      prev = items[rows - 1]
      mode = rng.random(len(rows))
      same_channel = mode < cfg.p_same_channel
      same_topic = (mode >= cfg.p_same_channel) & (
          mode < cfg.p_same_channel + cfg.p_same_topic)
      ch = world.item_channel[prev]
      ok = same_channel & by_channel.has(ch)
      choice[ok] = by_channel.draw(ch[ok], rng)
      fallback[ok] = False
      tp = world.item_main_topic[prev]
      ok = same_topic & by_topic.has(tp)
      choice[ok] = by_topic.draw(tp[ok], rng)
      fallback[ok] = False
    fallback |= ~alive[choice]
    if fallback.any():
      live = np.flatnonzero(alive)
      choice[fallback] = rng.choice(live, size=int(fallback.sum()),
                                    p=weight[live] / weight[live].sum())
    items[rows] = choice
  s_user = users[session]
  match = _match(world, s_user, items)
  reward = np.clip(0.15 + 0.8 * match + rng.normal(0, 0.15, size=n), 0.0, 1.0)
  gaps = rng.exponential(240.0, size=n) + 30.0
  csum = np.cumsum(gaps)
  offset = csum - np.repeat(csum[np.cumsum(lengths) - lengths], lengths)
  ts = np.minimum(starts[session] + offset.astype(np.int64), 86399)
  return {"session": session, "position": position, "user": s_user, "item": items,
          "reward": np.round(reward, 3), "ts": ts}


_DIURNAL = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 5, 5, 5, 5, 6, 7, 9, 10, 10, 9, 6, 4],
                    dtype=float)
_DIURNAL /= _DIURNAL.sum()


def _match(world: _World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
  """Weighted share of the item's topics that the user is interested in, in [0, 1]."""
  max_topics = max(len(t) for t in world.item_topics)
  topics = np.zeros((len(world.item_topics), max_topics), dtype=np.int64)
  weights = np.zeros_like(topics, dtype=float)
  for i, (t, w) in enumerate(zip(world.item_topics, world.item_weights)):
    topics[i, :len(t)] = t
    weights[i, :len(w)] = w
  interest = world.user_interest[users[:, None], topics[items]]
  score = (interest * weights[items]).sum(axis=1)
  return np.minimum(score / np.maximum(world.user_interest[users].max(axis=1), 1e-9), 1.0)


def _event_lines(world: _World, cfg: WorldConfig, day: int, date: dt.date,
                 ev: dict[str, np.ndarray]) -> list[str]:
  day_start = int(dt.datetime(date.year, date.month, date.day,
                              tzinfo=dt.timezone.utc).timestamp())
  stamp = date.strftime("%Y%m%d")
  lines = []
  for k in range(len(ev["item"])):
    u = int(ev["user"][k])
    pos = int(ev["position"][k])
    seed = f',"seed_item_id":"{_item_id(int(ev["item"][k - 1]))}"' if pos > 0 else ""
    lines.append(
        f'{{"event_id":"ev-{stamp}-{k:08d}","ts":{day_start + int(ev["ts"][k])},'
        f'"user_id":"user_{u:06d}","item_id":"{_item_id(int(ev["item"][k]))}",'
        f'"reward":{float(ev["reward"][k])}{seed},'
        f'"device":"{DEVICES[world.user_device[u]]}",'
        f'"country":"{COUNTRIES[world.user_country[u]]}"}}')
  return lines


def corrupt(line: str, kind: str, other_event_id: str) -> str:
  """Corrupts one valid event line the way real pipelines see it break."""
  obj = json.loads(line)
  if kind == "truncated_json":
    return line[: max(1, len(line) // 2)]
  if kind == "missing_id":
    obj.pop("user_id" if len(line) % 2 else "item_id")
  elif kind == "nan_reward":
    return line.replace(f'"reward":{obj["reward"]}', '"reward":NaN')
  elif kind == "bad_timestamp":
    obj["ts"] = "yesterday evening"
  elif kind == "out_of_partition":
    obj["ts"] = obj["ts"] - 5 * 86400
  elif kind == "duplicate":
    obj["event_id"] = other_event_id
  elif kind == "oversize_id":
    obj["item_id"] = "x" * 300
  elif kind == "wrong_type":
    obj["user_id"] = 12345
  elif kind == "negative_reward":
    obj["reward"] = -0.5
  return json.dumps(obj, separators=(",", ":"), allow_nan=True)


def _inject(lines: list[str], rate: float, rng: np.random.Generator) -> dict[str, int]:
  """Corrupts a `rate` fraction of lines in place; returns counts per kind."""
  n_bad = int(round(rate * len(lines)))
  counts = {kind: 0 for kind in CORRUPTIONS}
  if n_bad == 0 or len(lines) < 2:
    return counts
  rows = rng.choice(np.arange(1, len(lines)), size=min(n_bad, len(lines) - 1),
                    replace=False)
  kinds = rng.integers(0, len(CORRUPTIONS), size=len(rows))
  original = list(lines)
  for row, k in zip(rows, kinds):
    kind = CORRUPTIONS[k]
    other = json.loads(original[row - 1])["event_id"]
    lines[row] = corrupt(original[row], kind, other)
    counts[kind] += 1
  return counts


def _catalog_lines(world: _World, cfg: WorldConfig, day: int, date: dt.date) -> list[str]:
  born = np.flatnonzero((world.item_birth <= day) if day == 0 else
                        (world.item_birth == day))
  day_start = int(dt.datetime(date.year, date.month, date.day,
                              tzinfo=dt.timezone.utc).timestamp())
  lines = []
  for i in born:
    lines.append(json.dumps({
        "item_id": _item_id(int(i)),
        "channel_id": f"channel_{int(world.item_channel[i]):05d}",
        "topics": [f"topic_{int(t):03d}" for t in world.item_topics[i]],
        "topic_weights": [float(w) for w in world.item_weights[i]],
        "duration_s": float(world.item_duration[i]),
        "upload_ts": day_start + 86400 * int(min(world.item_birth[i], 0)),
    }, separators=(",", ":")))
  return lines


def iter_days(cfg: WorldConfig) -> Iterator[tuple[dt.date, list[str], list[str], dict]]:
  """Yields (date, event lines, catalog lines, corruption counts) for each day."""
  world = _build_world(cfg)
  for day in range(cfg.days):
    rng = np.random.default_rng([cfg.seed, 1, day])
    date = cfg.start_date + dt.timedelta(days=day)
    events = _event_lines(world, cfg, day, date, _day_events(world, cfg, day, rng))
    counts = _inject(events, cfg.bad_line_rate, rng)
    yield date, events, _catalog_lines(world, cfg, day, date), counts


def generate(out: str, cfg: WorldConfig) -> dict[str, dict]:
  """Writes every day's logs and catalog under `out`; returns per-day summaries."""
  paths = workdir_lib.Workdir(out)
  summary = {}
  for date, events, catalog, counts in iter_days(cfg):
    per = math.ceil(len(events) / cfg.shards)
    for s in range(cfg.shards):
      textio.write_gz(posixpath.join(paths.logs_dir(date),
                                     f"part-{s:05d}-of-{cfg.shards:05d}.jsonl.gz"),
                      events[s * per:(s + 1) * per])
    textio.write_gz(posixpath.join(paths.catalog_dir(date), "part-00000-of-00001.jsonl.gz"),
                    catalog)
    summary[workdir_lib.partition_name(date)] = {
        "events": len(events), "catalog": len(catalog), "corrupted": counts}
  return summary

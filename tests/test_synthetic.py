"""The synthetic world: valid schema, deterministic, skewed, drifting, corrupted on request."""

import collections
import dataclasses
import datetime as dt
import glob
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import schema
from pipeline import synthetic_world

CFG = synthetic_world.WorldConfig(days=6, users=400, items=1500, new_items_per_day=80,
                            events_per_day=4000, seed=7)


def _lines(root: str, kind: str, day: str) -> list[bytes]:
  out = []
  for path in sorted(glob.glob(os.path.join(root, kind, day, "*.jsonl.gz"))):
    with gzip.open(path, "rb") as f:
      out.extend(line.rstrip(b"\n") for line in f)
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  summary = synthetic_world.generate(root, CFG)
  days = sorted(summary)
  events = {d: [schema.validate_event(l, dt.date.fromisoformat(d), max_skew_s=0)
                for l in _lines(root, "logs", d)] for d in days}
  catalog = {d: [schema.validate_catalog(l) for l in _lines(root, "catalog", d)]
             for d in days}
  return root, days, events, catalog


def test_every_line_is_valid_and_items_are_cataloged(world):
  _, days, events, catalog = world
  known = set()
  for d in days:
    assert len(events[d]) == CFG.events_per_day
    assert all(isinstance(c, schema.CatalogItem) for c in catalog[d])
    known |= {c.item_id for c in catalog[d]}
    for e in events[d]:
      assert isinstance(e, schema.Event), e
      assert e.item_id in known
      assert 0.0 <= e.reward <= 1.0
    assert len({e.event_id for e in events[d]}) == len(events[d])


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
  small = dataclasses.replace(CFG, days=2, events_per_day=500)
  synthetic_world.generate(str(tmp_path / "a"), small)
  synthetic_world.generate(str(tmp_path / "b"), small)
  synthetic_world.generate(str(tmp_path / "c"), dataclasses.replace(small, seed=8))
  files = sorted(glob.glob(str(tmp_path / "a" / "**" / "*.gz"), recursive=True))
  assert len(files) == 2 * (small.shards + 1)
  for path in files:
    with open(path, "rb") as f, open(path.replace("/a/", "/b/"), "rb") as g:
      assert f.read() == g.read(), path
  assert _lines(str(tmp_path / "a"), "logs", "2024-01-01") != _lines(
      str(tmp_path / "c"), "logs", "2024-01-01")


def test_popularity_is_power_law(world):
  _, days, events, _ = world
  counts = np.array(sorted(collections.Counter(
      e.item_id for e in events[days[0]]).values(), reverse=True), dtype=float)
  top = counts[: max(1, len(counts) // 100)].sum() / counts.sum()
  assert top > 0.15, f"top 1% of items hold only {top:.2f} of events"
  # Log-log slope of rank vs count over the head is Zipf-like (clearly negative).
  ranks = np.arange(1, min(200, len(counts)) + 1)
  slope = np.polyfit(np.log(ranks), np.log(counts[: len(ranks)]), 1)[0]
  assert slope < -0.5, slope


def test_popularity_drifts(world):
  _, days, events, catalog = world
  initial = {c.item_id for c in catalog[days[0]]} - {
      f"item_{i:06d}" for i in range(CFG.items, CFG.items + CFG.new_items_per_day)}
  new_share = [np.mean([e.item_id not in initial for e in events[d]]) for d in days]
  assert new_share[-1] > new_share[0] + 0.1, new_share
  first = collections.Counter(e.item_id for e in events[days[0]])
  last = collections.Counter(e.item_id for e in events[days[-1]])
  top_first = [i for i, _ in first.most_common(20)]
  assert sum(last[i] for i in top_first) < 0.7 * sum(first[i] for i in top_first)


def test_sessions_follow_channels_and_reward_varies(world):
  _, days, events, catalog = world
  channel = {c.item_id: c.channel_id for d in days for c in catalog[d]}
  evs = [e for e in events[days[0]] if e.seed_item_id]
  same = np.mean([channel[e.item_id] == channel[e.seed_item_id] for e in evs])
  assert same > 0.3, same  # a random pair shares a channel ~1/300 of the time
  rewards = np.array([e.reward for e in events[days[0]]])
  assert 0.1 < rewards.std() < 0.5


def test_bad_line_rate_injects_every_kind(tmp_path):
  cfg = dataclasses.replace(CFG, days=1, events_per_day=6000, bad_line_rate=0.05)
  summary = synthetic_world.generate(str(tmp_path), cfg)
  counts = summary["2024-01-01"]["corrupted"]
  assert set(counts) == set(synthetic_world.CORRUPTIONS)
  assert all(v > 0 for v in counts.values()), counts
  assert sum(counts.values()) == 300
  parsed = [schema.validate_event(l, dt.date(2024, 1, 1))
            for l in _lines(str(tmp_path), "logs", "2024-01-01")]
  reasons = collections.Counter(p.reason for p in parsed if isinstance(p, schema.Invalid))
  invalid = sum(reasons.values())
  ids = collections.Counter(p.event_id for p in parsed if isinstance(p, schema.Event))
  duplicates = sum(n - 1 for n in ids.values())
  assert invalid == sum(counts.values()) - counts["duplicate"]
  assert duplicates == counts["duplicate"]
  for reason in (schema.MALFORMED_JSON, schema.MISSING_ID, schema.NON_FINITE_REWARD,
                 schema.BAD_TIMESTAMP, schema.TIMESTAMP_OUT_OF_PARTITION,
                 schema.OVERSIZE_ID, schema.WRONG_TYPE, schema.NEGATIVE_REWARD):
    assert reasons[reason] > 0, reason


def test_cli_writes_the_layout(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "pipeline.synthetic", f"--out={tmp_path}",
       "--first_day=2024-03-01", "--days=2", "--events_per_day=300", "--users=50",
       "--items=200"], check=True, capture_output=True, text=True, cwd=root).stdout
  assert json.loads(out)["2024-03-02"]["events"] == 300
  assert os.path.exists(tmp_path / "logs" / "2024-03-02" / "part-00001-of-00002.jsonl.gz")
  assert os.path.exists(tmp_path / "catalog" / "2024-03-01" / "part-00000-of-00001.jsonl.gz")

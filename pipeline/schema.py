"""The raw log and catalog schema of docs/design.md, and its validation.

One module owns the input contract so that the Beam job, the synthetic generator,
the MovieLens converter and the tests agree on what a valid line is. Validation
never raises on bad data: it returns an `Invalid` carrying a machine-readable
reason, which the Beam job turns into a dead-letter record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from typing import Any, Mapping, Optional, Union

MAX_ID_BYTES = 256
# Lines longer than this are dead-lettered without being parsed, and the copy kept
# in the dead-letter record is cut to this length (the record says so).
MAX_LINE_BYTES = 1 << 20
DEAD_LETTER_LINE_BYTES = 64 << 10
# Epoch values above this are read as milliseconds (1e11 s is the year 5138).
_MILLIS_THRESHOLD = 1e11
# The last second of the year 9999 (datetime's limit, and far inside int64): later
# timestamps are bad_timestamp, whatever --max_skew_s says.
MAX_TIMESTAMP_S = 253402300799
# Rewards, weights and durations become float32 features: larger ones would be inf.
_FLOAT32_MAX = 3.4028234663852886e38

# Machine-readable dead-letter reasons.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
BAD_ENCODING = "bad_encoding"
LINE_TOO_LONG = "line_too_long"
MISSING_ID = "missing_id"
EMPTY_ID = "empty_id"
OVERSIZE_ID = "oversize_id"
WRONG_TYPE = "wrong_type"
NON_FINITE_REWARD = "non_finite_reward"
NEGATIVE_REWARD = "negative_reward"
BAD_TIMESTAMP = "bad_timestamp"
TIMESTAMP_OUT_OF_PARTITION = "timestamp_out_of_partition"
BAD_TOPICS = "bad_topics"

EVENT_REASONS = (
    MALFORMED_JSON, NOT_AN_OBJECT, BAD_ENCODING, LINE_TOO_LONG, MISSING_ID, EMPTY_ID,
    OVERSIZE_ID, WRONG_TYPE, NON_FINITE_REWARD, NEGATIVE_REWARD, BAD_TIMESTAMP,
    TIMESTAMP_OUT_OF_PARTITION)
CATALOG_REASONS = (
    MALFORMED_JSON, NOT_AN_OBJECT, BAD_ENCODING, LINE_TOO_LONG, MISSING_ID, EMPTY_ID,
    OVERSIZE_ID, WRONG_TYPE, BAD_TIMESTAMP, BAD_TOPICS)


@dataclasses.dataclass(frozen=True)
class Event:
  """One valid interaction, normalised: timestamp in epoch seconds, strings decoded."""
  event_id: str
  timestamp: int
  user_id: str
  item_id: str
  reward: float = 1.0
  seed_item_id: str = ""
  device: str = ""
  country: str = ""


@dataclasses.dataclass(frozen=True)
class CatalogItem:
  """One catalog line. A later line for the same `item_id` replaces an earlier one."""
  item_id: str
  channel_id: str = ""
  topics: tuple[str, ...] = ()
  topic_weights: tuple[float, ...] = ()
  duration_s: float = 0.0
  upload_ts: int = 0


@dataclasses.dataclass(frozen=True)
class Invalid:
  """Why a line was rejected: `reason` is one of the constants above."""
  reason: str
  detail: str = ""


class _Reject(Exception):

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.invalid = Invalid(reason, detail)


def parse_timestamp(value: Any) -> int:
  """Epoch seconds, epoch millis or an RFC 3339 string -> epoch seconds (UTC).

  Raises:
    ValueError: the value is none of those, not finite, or outside
      [1970-01-01, 9999-12-31] (a later value would overflow the int64 features).
  """
  if isinstance(value, bool):
    raise ValueError(f"boolean timestamp {value!r}")
  if isinstance(value, (int, float)):
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"timestamp {value!r} is not a finite non-negative number")
    seconds = int(math.floor(value / 1000.0 if value > _MILLIS_THRESHOLD else value))
  elif isinstance(value, str):
    text = value.strip()
    if text.endswith(("Z", "z")):
      text = text[:-1] + "+00:00"
    try:
      parsed = dt.datetime.fromisoformat(text)
    except ValueError as e:
      raise ValueError(f"timestamp {value!r} is not RFC 3339") from e
    if parsed.tzinfo is None or "T" not in text.upper():
      raise ValueError(f"timestamp {value!r} lacks a time or a UTC offset")
    seconds = int(math.floor(parsed.timestamp()))
  else:
    raise ValueError(f"timestamp of type {type(value).__name__}")
  if not 0 <= seconds <= MAX_TIMESTAMP_S:
    raise ValueError(f"timestamp {value!r} is outside 1970-01-01 .. 9999-12-31")
  return seconds


def day_bounds(day: dt.date) -> tuple[int, int]:
  """[start, end) of a UTC calendar day, in epoch seconds."""
  start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
  return start, start + 86400


def _unencodable(obj: Any) -> Optional[str]:
  """A string of a parsed JSON value (keys included) that UTF-8 cannot encode, or None.

  json.loads turns a "\\ud800" escape into a lone surrogate, which every later
  .encode("utf-8") (ids, Examples, dead-letter files) would fail on.
  """
  stack = [obj]
  while stack:
    value = stack.pop()
    if isinstance(value, str):
      try:
        value.encode("utf-8")
      except UnicodeEncodeError:
        return value
    elif isinstance(value, dict):
      stack.extend(value.keys())
      stack.extend(value.values())
    elif isinstance(value, list):
      stack.extend(value)
  return None


def _decode(line: Union[bytes, str]) -> Mapping[str, Any]:
  if isinstance(line, bytes):
    if len(line) > MAX_LINE_BYTES:
      raise _Reject(LINE_TOO_LONG, f"{len(line)} bytes > {MAX_LINE_BYTES}")
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _Reject(BAD_ENCODING, str(e)) from e
  else:
    if len(line) > MAX_LINE_BYTES:
      raise _Reject(LINE_TOO_LONG, f"{len(line)} chars > {MAX_LINE_BYTES}")
    try:
      line.encode("utf-8")
    except UnicodeEncodeError as e:
      raise _Reject(BAD_ENCODING, str(e)) from e
  try:
    obj = json.loads(line)
  except (ValueError, RecursionError) as e:  # ValueError: also ints over 4300 digits
    raise _Reject(MALFORMED_JSON, str(e)[:200]) from e
  if not isinstance(obj, dict):
    raise _Reject(NOT_AN_OBJECT, type(obj).__name__)
  # Only a \u escape can make a lone surrogate out of valid UTF-8.
  if "\\u" in line:
    bad = _unencodable(obj)
    if bad is not None:
      raise _Reject(BAD_ENCODING,
                    f"string {bad[:40]!r} holds a lone UTF-16 surrogate (not UTF-8)")
  return obj


def _id(obj: Mapping[str, Any], key: str, required: bool = True) -> str:
  if key not in obj or obj[key] is None:
    if required:
      raise _Reject(MISSING_ID, key)
    return ""
  value = obj[key]
  if not isinstance(value, str):
    raise _Reject(WRONG_TYPE, f"{key} is {type(value).__name__}, not string")
  if required and not value:
    raise _Reject(EMPTY_ID, key)
  if len(value.encode("utf-8")) > MAX_ID_BYTES:
    raise _Reject(OVERSIZE_ID, f"{key} is over {MAX_ID_BYTES} bytes")
  return value


def _optional_str(obj: Mapping[str, Any], key: str) -> str:
  value = obj.get(key)
  if value is None:
    return ""
  if not isinstance(value, str):
    raise _Reject(WRONG_TYPE, f"{key} is {type(value).__name__}, not string")
  if len(value.encode("utf-8")) > MAX_ID_BYTES:
    raise _Reject(OVERSIZE_ID, f"{key} is over {MAX_ID_BYTES} bytes")
  return value


def _as_float(value: Union[int, float]) -> float:
  """float(value), or an infinity for a JSON integer too large for a float."""
  try:
    return float(value)
  except OverflowError:
    return math.inf if value > 0 else -math.inf


def _finite32(value: float) -> bool:
  """Whether a value stays finite as the float32 of an Example feature."""
  return math.isfinite(value) and abs(value) <= _FLOAT32_MAX


def _number(obj: Mapping[str, Any], key: str, default: float) -> float:
  value = obj.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _Reject(WRONG_TYPE, f"{key} is {type(value).__name__}, not number")
  return _as_float(value)


def _timestamp(obj: Mapping[str, Any], key: str) -> int:
  if key not in obj or obj[key] is None:
    raise _Reject(BAD_TIMESTAMP, f"{key} missing")
  try:
    return parse_timestamp(obj[key])
  except (ValueError, OverflowError) as e:
    raise _Reject(BAD_TIMESTAMP, str(e)[:200]) from e


def validate_event(
    line: Union[bytes, str],
    day: Optional[dt.date] = None,
    max_skew_s: int = 3600,
) -> Union[Event, Invalid]:
  """Parses one raw log line.

  Args:
    line: the line, without its newline.
    day: the partition the line came from. An event more than `max_skew_s` outside
      that UTC day is rejected (late or early data belongs in its own partition).
    max_skew_s: tolerated skew around the day, in seconds.

  Returns:
    An `Event`, or an `Invalid` naming the first problem found.
  """
  try:
    obj = _decode(line)
    event_id = _id(obj, "event_id")
    user_id = _id(obj, "user_id")
    item_id = _id(obj, "item_id")
    seed = _id(obj, "seed_item_id", required=False)
    device = _optional_str(obj, "device")
    country = _optional_str(obj, "country")
    reward = _number(obj, "reward", 1.0)
    if not _finite32(reward):
      raise _Reject(NON_FINITE_REWARD, f"{reward!r} is not a finite float32")
    if reward < 0:
      raise _Reject(NEGATIVE_REWARD, repr(reward))
    ts = _timestamp(obj, "ts")
    if day is not None:
      start, end = day_bounds(day)
      if not start - max_skew_s <= ts < end + max_skew_s:
        raise _Reject(TIMESTAMP_OUT_OF_PARTITION, f"ts {ts} outside {day.isoformat()}")
  except _Reject as r:
    return r.invalid
  return Event(event_id=event_id, timestamp=ts, user_id=user_id, item_id=item_id,
               reward=reward, seed_item_id=seed, device=device, country=country)


def validate_catalog(line: Union[bytes, str]) -> Union[CatalogItem, Invalid]:
  """Parses one catalog line; see `validate_event` for the return convention."""
  try:
    obj = _decode(line)
    item_id = _id(obj, "item_id")
    channel = _optional_str(obj, "channel_id")
    topics = obj.get("topics") or []
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
      raise _Reject(BAD_TOPICS, "topics must be a list of strings")
    weights = obj.get("topic_weights")
    if weights is None:
      weights = [1.0] * len(topics)
    if (not isinstance(weights, list) or len(weights) != len(topics) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool)
        and _finite32(_as_float(w))
        for w in weights)):
      raise _Reject(BAD_TOPICS, "topic_weights must be finite numbers, one per topic")
    duration = _number(obj, "duration_s", 0.0)
    if not _finite32(duration) or duration < 0:
      raise _Reject(WRONG_TYPE, f"duration_s {duration!r} is not a finite float32 >= 0")
    upload_ts = _timestamp(obj, "upload_ts") if obj.get("upload_ts") is not None else 0
  except _Reject as r:
    return r.invalid
  return CatalogItem(item_id=item_id, channel_id=channel, topics=tuple(topics),
                     topic_weights=tuple(float(w) for w in weights),
                     duration_s=duration, upload_ts=upload_ts)


def event_to_json(event: Event) -> str:
  """The canonical raw line for an event (what the generator and converter write)."""
  obj = dataclasses.asdict(event)
  obj["ts"] = obj.pop("timestamp")
  for key in ("seed_item_id", "device", "country"):
    if not obj[key]:
      del obj[key]
  return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def catalog_to_json(item: CatalogItem) -> str:
  """The canonical raw catalog line for an item."""
  obj = dataclasses.asdict(item)
  obj["topics"] = list(item.topics)
  obj["topic_weights"] = list(item.topic_weights)
  return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def parse_date(text: str) -> dt.date:
  """YYYY-MM-DD -> date, with an error that says what was expected."""
  try:
    return dt.date.fromisoformat(text)
  except ValueError as e:
    raise ValueError(f"date {text!r} is not YYYY-MM-DD") from e


def dead_letter(line: Union[bytes, str], source: str, line_number: int,
                invalid: Invalid, line_bytes: Optional[int] = None) -> dict[str, Any]:
  """The dead-letter record of a rejected line: the line (cut if huge), where, and why.

  `line_bytes` is the line's true length when `line` is already a cut copy (a reader
  that never holds a huge line whole).
  """
  raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")
  kept = raw[:DEAD_LETTER_LINE_BYTES]
  size = len(raw) if line_bytes is None else line_bytes
  return {
      "file": source,
      "line_number": line_number,
      "reason": invalid.reason,
      "detail": invalid.detail,
      "line": kept.decode("utf-8", "backslashreplace"),
      "line_bytes": size,
      "line_truncated": len(kept) < size,
  }


"""pipeline.schema: lines that once crashed validation are dead-letter reasons now."""

import datetime as dt
import json

import pytest

from pipeline import schema

DAY = dt.date(2024, 3, 10)
START, _ = schema.day_bounds(DAY)


def _event_line(**fields):
  return json.dumps({"event_id": "e", "ts": START, "user_id": "u", "item_id": "i",
                     **fields}).encode()


@pytest.mark.parametrize("line", [
    _event_line(user_id="u\ud800"),                    # a lone high surrogate, escaped
    _event_line(device="\udfff"),                      # a lone low one
    _event_line(extra={"nested": ["ok", "x\ud83d"]}),  # in a field nobody reads
    _event_line(**{"k\ud800": 1}),                     # in a key
], ids=["high", "low", "unread_field", "key"])
def test_a_lone_surrogate_is_bad_encoding_not_a_crash(line):
  result = schema.validate_event(line, DAY)
  assert isinstance(result, schema.Invalid) and result.reason == schema.BAD_ENCODING
  assert "surrogate" in result.detail
  # The dead-letter record of such a line can be written as UTF-8.
  json.dumps(schema.dead_letter(line, "f", 1, result), ensure_ascii=False).encode("utf-8")
  catalog = json.dumps({"item_id": "i", "topics": ["t\ud800"]}).encode()
  assert schema.validate_catalog(catalog).reason == schema.BAD_ENCODING
  assert schema.validate_event(line.decode("unicode_escape"), DAY).reason == (
      schema.BAD_ENCODING)


def test_a_surrogate_pair_is_a_valid_character():
  event = schema.validate_event(_event_line(device="\U0001f600"), DAY)
  assert isinstance(event, schema.Event) and event.device == "\U0001f600"


# 1e25 and 10**30 are read as milliseconds (> 1e11), still after the year 9999, and
# so is the first millisecond of the year 10000.
@pytest.mark.parametrize("ts", [1e25, 10**30, 253402300800000, "1969-12-31T23:59:59Z"])
def test_timestamps_out_of_range_are_bad_timestamp_whatever_the_skew(ts):
  result = schema.validate_event(_event_line(ts=ts), DAY, max_skew_s=10**30)
  assert isinstance(result, schema.Invalid) and result.reason == schema.BAD_TIMESTAMP


def test_the_last_second_of_year_9999_is_still_a_timestamp():
  assert schema.parse_timestamp("9999-12-31T23:59:59Z") == schema.MAX_TIMESTAMP_S
  assert schema.parse_timestamp(schema.MAX_TIMESTAMP_S * 1000) == schema.MAX_TIMESTAMP_S


def test_numbers_too_large_for_a_float32_feature_are_dead_letters():
  assert schema.validate_event(_event_line(reward=1e39), DAY).reason == (
      schema.NON_FINITE_REWARD)
  assert schema.validate_event(_event_line(reward=3e38), DAY).reward == 3e38
  assert schema.validate_catalog(b'{"item_id":"i","duration_s":1e39}').reason == (
      schema.WRONG_TYPE)
  assert schema.validate_catalog(
      b'{"item_id":"i","topics":["t"],"topic_weights":[-1e39]}').reason == schema.BAD_TOPICS


def test_integers_too_large_for_a_float_are_dead_letters():
  huge = "9" * 400
  event = b'{"event_id":"e","ts":%d,"user_id":"u","item_id":"i","reward":%s}' % (
      START, huge.encode())
  assert schema.validate_event(event, DAY).reason == schema.NON_FINITE_REWARD
  assert schema.validate_event(event.replace(b":9", b":-9"), DAY).reason == (
      schema.NON_FINITE_REWARD)
  assert schema.validate_catalog(
      b'{"item_id":"i","duration_s":%s}' % huge.encode()).reason == schema.WRONG_TYPE
  assert schema.validate_catalog(
      b'{"item_id":"i","topics":["t"],"topic_weights":[%s]}' % huge.encode()).reason == (
          schema.BAD_TOPICS)
  # Past Python's 4300-digit limit json.loads itself refuses the number.
  assert schema.validate_event(b'{"ts":%s}' % (b"9" * 5000), DAY).reason == (
      schema.MALFORMED_JSON)

r"""Converts MovieLens data into towerstream's daily log and catalog layout (a library;
its command is `pipeline.movielens`).

Two formats are read, detected from the files present in `--input`:
- `ml-latest-small` / `ml-25m` style: `ratings.csv` (userId,movieId,rating,timestamp)
  and `movies.csv` (movieId,title,genres with genres separated by "|").
- classic `ml-100k`: tab-separated `u.data` (user, item, rating, timestamp) and
  "|"-separated latin-1 `u.item` (id|title|release date|video date|url|19 genre flags).

Mapping: the day comes from the timestamp (UTC); reward = rating / 5; topics = genres.
The release year (from the title "(1995)" or the release date) is kept as the
catalog field `year` and, so the model can use it, as a `decade_1990s` topic at
weight 0.5. A movie is cataloged in the partition of its first rating (movies never
rated go in the first partition), so new items appear over time as in a live catalog.

`--period_days=N` groups N calendar days into one partition dated at the period's
first day, counted from the first day with data. Events keep their real timestamps,
so run the Beam job with `--max_skew_s` of at least (N - 1) * 86400 on such data.

Malformed rows never vanish: by default they are skipped and listed in
`OUT/movielens_report.json` (file, line number, reason, counts); `--strict` turns
the first one into an error naming the file and line.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import json
import os
import posixpath
import re
from typing import Iterator, Optional

import numpy as np

from core import workdir as workdir_lib
from pipeline import schema
from pipeline import textio

REPORT_FILE = "movielens_report.json"

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
                 "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
                 "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_REPORT_EXAMPLES = 100
_PART = "part-00000-of-00001.jsonl.gz"


class MalformedRow(ValueError):
  """A row that cannot be read; the message names the file and line."""


@dataclasses.dataclass
class Movie:
  item_id: str
  genres: list[str]
  year: Optional[int]


@dataclasses.dataclass
class Report:
  """Rows read and skipped, per file and reason: nothing is dropped silently."""
  rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list = dataclasses.field(default_factory=list)
  strict: bool = False

  def skip(self, path: str, line: int, reason: str) -> None:
    if self.strict:
      raise MalformedRow(f"{path}:{line}: {reason}")
    self.skipped[f"{os.path.basename(path)}: {reason.split(':')[0]}"] += 1
    if len(self.examples) < _REPORT_EXAMPLES:
      self.examples.append({"file": path, "line": line, "reason": reason})

  def to_json(self) -> dict:
    return {"rows": dict(self.rows), "skipped": dict(self.skipped),
            "skipped_total": sum(self.skipped.values()), "examples": self.examples}


def detect_format(path: str) -> str:
  """'csv' (ml-latest-small, ml-25m) or '100k' from the files present."""
  if os.path.exists(os.path.join(path, "ratings.csv")):
    return "csv"
  if os.path.exists(os.path.join(path, "u.data")):
    return "100k"
  raise FileNotFoundError(
      f"{path}: no ratings.csv (ml-latest-small/ml-25m) or u.data (ml-100k) found")


def _year(text: str) -> Optional[int]:
  match = _YEAR_IN_TITLE.search(text.strip())
  return int(match.group(1)) if match else None


def _read_movies_csv(path: str, report: Report) -> dict[str, Movie]:
  movies = {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header != ["movieId", "title", "genres"]:
      raise MalformedRow(f"{path}:1: expected header movieId,title,genres, got {header}")
    for row in reader:
      line = reader.line_num
      report.rows[os.path.basename(path)] += 1
      if len(row) != 3 or not row[0].strip().isdigit():
        report.skip(path, line, f"bad row: {row!r:.120}")
        continue
      genres = [] if row[2] == "(no genres listed)" else [g for g in row[2].split("|") if g]
      movies[row[0].strip()] = Movie(f"movie_{row[0].strip()}", genres, _year(row[1]))
  return movies


def _read_u_item(path: str, report: Report) -> dict[str, Movie]:
  movies = {}
  with open(path, encoding="latin-1") as f:
    for line, text in enumerate(f, start=1):
      text = text.rstrip("\r\n")
      if not text:
        continue
      report.rows[os.path.basename(path)] += 1
      cols = text.split("|")
      if len(cols) != 5 + len(ML100K_GENRES) or not cols[0].isdigit() or any(
          c not in ("0", "1") for c in cols[5:]):
        report.skip(path, line, f"bad row: {text!r:.120}")
        continue
      genres = [g for g, flag in zip(ML100K_GENRES, cols[5:]) if flag == "1"]
      year = _year(cols[1])
      if year is None and re.search(r"\d{4}$", cols[2]):
        year = int(cols[2][-4:])
      movies[cols[0]] = Movie(f"movie_{cols[0]}", genres, year)
  return movies


def _rating_rows(path: str, fmt: str, report: Report) -> Iterator[tuple[int, str, str, float, int]]:
  """Yields (line, user, movie, rating, ts) for each well-formed rating row."""
  with open(path, newline="", encoding="utf-8") as f:
    if fmt == "csv":
      reader = csv.reader(f)
      header = next(reader, None)
      if header != ["userId", "movieId", "rating", "timestamp"]:
        raise MalformedRow(f"{path}:1: expected header userId,movieId,rating,timestamp, "
                           f"got {header}")
      rows = ((reader.line_num, row) for row in reader)
    else:
      rows = ((n, text.rstrip("\r\n").split("\t")) for n, text in enumerate(f, start=1)
              if text.strip())
    for line, row in rows:
      report.rows[os.path.basename(path)] += 1
      if len(row) != 4:
        report.skip(path, line, f"expected 4 columns, got {len(row)}")
        continue
      user, movie, rating, ts = (c.strip() for c in row)
      try:
        value, stamp = float(rating), int(ts)
      except ValueError:
        report.skip(path, line, f"unparsable rating or timestamp: {row!r:.120}")
        continue
      if not user or not movie:
        report.skip(path, line, "empty user or movie id")
      elif not 0 < value <= 5:
        report.skip(path, line, f"rating {value} outside (0, 5]")
      elif stamp < 0:
        report.skip(path, line, f"negative timestamp {stamp}")
      else:
        yield line, user, movie, value, stamp


def _catalog_line(movie: Movie) -> str:
  topics = list(movie.genres)
  weights = [1.0] * len(topics)
  if movie.year is not None:
    topics.append(f"decade_{movie.year // 10 * 10}s")
    weights.append(0.5)
  line = json.loads(schema.catalog_to_json(schema.CatalogItem(
      item_id=movie.item_id, topics=tuple(topics), topic_weights=tuple(weights))))
  if movie.year is not None:
    line["year"] = movie.year
  return json.dumps(line, separators=(",", ":"), ensure_ascii=False)


def convert(input_dir: str, out: str, period_days: int = 1, strict: bool = False) -> dict:
  """Writes OUT/logs/D and OUT/catalog/D for every partition holding events.

  Returns:
    The report also written to OUT/movielens_report.json.

  Raises:
    FileNotFoundError: `input_dir` holds neither format.
    MalformedRow: a bad header, no valid rating, or (under `strict`) any bad row.
  """
  if period_days < 1:
    raise ValueError(f"period_days must be >= 1, got {period_days}")
  fmt = detect_format(input_dir)
  paths = workdir_lib.Workdir(out)
  report = Report(strict=strict)
  if fmt == "csv":
    movies = _read_movies_csv(os.path.join(input_dir, "movies.csv"), report)
    ratings_path = os.path.join(input_dir, "ratings.csv")
  else:
    movies = _read_u_item(os.path.join(input_dir, "u.item"), report)
    ratings_path = os.path.join(input_dir, "u.data")
  users, items, values, stamps = [], [], [], []
  for _, user, movie, value, stamp in _rating_rows(ratings_path, fmt, report):
    users.append(user)
    items.append(movie)
    values.append(value)
    stamps.append(stamp)
  if not stamps:
    raise MalformedRow(f"{ratings_path}: no valid rating rows")
  stamps_np = np.asarray(stamps, dtype=np.int64)
  days = stamps_np // 86400
  period = (days - days.min()) // period_days
  order = np.lexsort((stamps_np, period))
  first_day = dt.date(1970, 1, 1) + dt.timedelta(days=int(days.min()))
  cataloged = set()
  partitions = collections.Counter()
  unknown_movies = 0
  sorted_period = period[order]
  bounds = np.flatnonzero(np.diff(sorted_period)) + 1
  for rows in np.split(order, bounds):
    date = first_day + dt.timedelta(days=int(period[rows[0]]) * period_days)
    events, catalog = [], []
    if not cataloged:  # first partition: every movie never rated, too
      rated = set(items)
      catalog.extend(_catalog_line(m) for k, m in sorted(movies.items()) if k not in rated)
    for r in rows:
      movie = items[r]
      if movie not in cataloged:
        cataloged.add(movie)
        if movie in movies:
          catalog.append(_catalog_line(movies[movie]))
        else:
          unknown_movies += 1
      events.append(schema.event_to_json(schema.Event(
          event_id=f"ml-{users[r]}-{movie}-{stamps[r]}", timestamp=int(stamps[r]),
          user_id=f"user_{users[r]}", item_id=f"movie_{movie}",
          reward=round(values[r] / 5.0, 4))))
    textio.write_gz(posixpath.join(paths.logs_dir(date), _PART), events)
    if catalog:
      textio.write_gz(posixpath.join(paths.catalog_dir(date), _PART), catalog)
    partitions[workdir_lib.partition_name(date)] = len(events)
  result = report.to_json()
  result.update(format=fmt, events=int(sum(partitions.values())), partitions=len(partitions),
                first_partition=min(partitions), last_partition=max(partitions),
                movies=len(movies), rated_movies_not_in_catalog=unknown_movies)
  workdir_lib.write_json(paths.join(REPORT_FILE), result)
  return result

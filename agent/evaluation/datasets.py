"""Converters from public rating datasets to the wire contract (``items.jsonl``, ``events.jsonl``).

Items carry id, title, categories (genres) and the year as an attribute. They carry no
``text``: these datasets have no description, and the embedding text the agent builds
(``agent.vectors.embeddings.item_text``) already reads the title, categories and attributes, so a text
repeating them would only be embedded twice. MovieLens' IMDb URLs are left out for the same
reason: they would be embedded as noise and are not needed to recommend.

Every output line is one Item or one Event exactly as a client would publish it, so the
converted files can be replayed offline (``recsys-agent replay``) or published to a live agent.
Those commands read them back with :func:`read_jsonl` and :func:`read_items`.
A malformed input line stops the conversion with a :class:`DatasetError` that names the file and
the line: a silently skipped row would make every metric computed downstream unreproducible.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent.wire.contract import Event, InvalidMessage, Item, parse_item

ITEMS_FILE = "items.jsonl"
EVENTS_FILE = "events.jsonl"

# MovieLens 100K marks items without any known genre with this flag; it is not a genre.
MOVIELENS_NO_GENRE = "unknown"
# "Toy Story (1995)" -> 1995; MovieTweetings and MovieLens titles both end this way.
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


class DatasetError(ValueError):
    """Input that cannot be converted; the message names the file and line."""


@dataclass(slots=True)
class Dataset:
    items: list[Item]
    events: list[Event]


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Numbered non-blank lines of ``path`` (1-based), without their line ending."""
    try:
        with open(path, encoding=encoding, newline="") as fh:
            for number, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid {encoding} text ({exc.reason} at byte {exc.start})") from None


def _int_field(raw: str, name: str, where: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise DatasetError(f"{where}: {name} must be an integer, got {raw!r}") from None


def _rating_event(fields: list[str], where: str) -> Event:
    """``user, item, rating, timestamp`` (the order of both datasets) as a ``rate`` Event."""
    user_id, item_id, rating, timestamp = (f.strip() for f in fields)
    if not user_id or not item_id:
        raise DatasetError(f"{where}: empty user or item id")
    value = _int_field(rating, "rating", where)
    ts = _int_field(timestamp, "timestamp", where)
    if ts < 0:
        raise DatasetError(f"{where}: negative timestamp {ts}")
    return Event(type="rate", user_id=user_id, item_id=item_id, ts=float(ts), value=float(value))


def _year_attributes(title: str) -> dict[str, int]:
    match = _TITLE_YEAR.search(title)
    return {"year": int(match.group(1))} if match else {}


def read_movietweetings(source: Path) -> Dataset:
    """``movies.dat`` and ``ratings.dat`` (``::``-separated, UTF-8) from a MovieTweetings snapshot.

    ``movies.dat``: ``movie_id::title (year)::genre|genre|...`` (the genre field may be empty);
    ``ratings.dat``: ``user_id::movie_id::rating::timestamp``. Movie ids stay strings so the
    zero-padded IMDb ids of ``movies.dat`` and ``ratings.dat`` keep matching.
    """
    items: list[Item] = []
    path = source / "movies.dat"
    for number, line in _lines(path, "utf-8"):
        where = f"{path}:{number}"
        fields = line.split("::")
        if len(fields) != 3:
            raise DatasetError(f"{where}: expected 3 '::'-separated fields (id, title, genres), got {len(fields)}")
        item_id, title, genre_field = (f.strip() for f in fields)
        if not item_id or not title:
            raise DatasetError(f"{where}: empty movie id or title")
        genres = [g.strip() for g in genre_field.split("|") if g.strip()]
        items.append(Item(id=item_id, title=title, categories=tuple(genres), attributes=_year_attributes(title)))
    events: list[Event] = []
    path = source / "ratings.dat"
    for number, line in _lines(path, "utf-8"):
        fields = line.split("::")
        where = f"{path}:{number}"
        if len(fields) != 4:
            raise DatasetError(
                f"{where}: expected 4 '::'-separated fields (user, movie, rating, timestamp), got {len(fields)}"
            )
        events.append(_rating_event(fields, where))
    return Dataset(items=items, events=events)


def _movielens_genres(path: Path) -> list[str]:
    """``u.genre``: ``name|index`` lines; returns the names in flag order."""
    by_index: dict[int, str] = {}
    for number, line in _lines(path, "latin-1"):
        where = f"{path}:{number}"
        name, sep, index = line.rpartition("|")
        if not sep or not name:
            raise DatasetError(f"{where}: expected 'genre|index'")
        position = _int_field(index, "genre index", where)
        if position in by_index:
            raise DatasetError(f"{where}: genre index {position} appears twice")
        by_index[position] = name
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(f"{path}: genre indexes must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def read_movielens_100k(source: Path) -> Dataset:
    """``u.data``, ``u.item`` and ``u.genre`` from MovieLens 100K.

    ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``. ``u.item`` (latin-1): ``id|title|
    release date|video release date|IMDb URL|`` then one 0/1 flag per genre of ``u.genre``. The
    ``unknown`` genre flag means "no genre known" and gives no category.
    """
    genres = _movielens_genres(source / "u.genre")
    n_fields = 5 + len(genres)
    items: list[Item] = []
    path = source / "u.item"
    for number, line in _lines(path, "latin-1"):
        where = f"{path}:{number}"
        fields = line.split("|")
        if len(fields) != n_fields:
            raise DatasetError(
                f"{where}: expected {n_fields} '|'-separated fields (5 + {len(genres)} genre flags), got {len(fields)}"
            )
        item_id, title, release_date, _video_date, _imdb_url = (f.strip() for f in fields[:5])
        if not item_id or not title:
            raise DatasetError(f"{where}: empty movie id or title")
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DatasetError(f"{where}: genre flags must be 0 or 1, got {'|'.join(flags)!r}")
        categories = [g for g, flag in zip(genres, flags) if flag == "1" and g != MOVIELENS_NO_GENRE]
        attributes: dict[str, object] = dict(_year_attributes(title))
        if release_date:
            attributes["release_date"] = release_date
        items.append(Item(id=item_id, title=title, categories=tuple(categories), attributes=attributes))
    events: list[Event] = []
    path = source / "u.data"
    for number, line in _lines(path, "latin-1"):
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != 4:
            raise DatasetError(
                f"{where}: expected 4 tab-separated fields (user, item, rating, timestamp), got {len(fields)}"
            )
        events.append(_rating_event(fields, where))
    return Dataset(items=items, events=events)


READERS: dict[str, Callable[[Path], Dataset]] = {
    "movietweetings": read_movietweetings,
    "movielens": read_movielens_100k,
}


def _natural(value: str) -> tuple[int, int, str]:
    # Numeric ids order as numbers ("9" before "10"), so "ties by user, then item" means what a
    # reader of the source files expects; other ids order as text, after the numeric ones.
    # isdecimal and ASCII: "²" is a digit to isdigit, but int() refuses it
    return (0, int(value), value) if value.isascii() and value.isdecimal() else (1, 0, value)


def stream_order_key(event: Event) -> tuple[float, tuple[int, int, str], tuple[int, int, str]]:
    """Replay order: time, then user, then item."""
    return (event.ts, _natural(event.user_id), _natural(event.item_id or ""))


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, decoded value) for each non-blank line; a bad line names file and line."""
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    records = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append((number, orjson.loads(raw)))
        except orjson.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: invalid JSON: {exc}") from None
    return records


def read_items(path: Path) -> list[Item]:
    """The Items of a JSON-lines file (``items.jsonl``), in file order."""
    items = []
    for number, obj in read_jsonl(path):
        try:
            items.append(parse_item(obj))
        except InvalidMessage as exc:
            raise DatasetError(f"{path}:{number}: invalid item: {exc}") from None
    return items


def write_dataset(dataset: Dataset, out_dir: Path) -> tuple[Path, Path]:
    """Write ``items.jsonl`` and ``events.jsonl`` (events in replay order) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items_path, events_path = out_dir / ITEMS_FILE, out_dir / EVENTS_FILE
    with open(items_path, "wb") as fh:
        for item in dataset.items:
            fh.write(orjson.dumps(item.to_dict()) + b"\n")
    with open(events_path, "wb") as fh:
        for event in sorted(dataset.events, key=stream_order_key):
            fh.write(orjson.dumps(_compact(event.to_dict())) + b"\n")
    return items_path, events_path


def _compact(record: dict[str, object]) -> dict[str, object]:
    # Unix seconds and integer ratings are written as integers: "ts": 1365029107, not
    # 1365029107.0, as the source files have them.
    for key in ("ts", "value"):
        value = record.get(key)
        if isinstance(value, float) and value.is_integer():
            record[key] = int(value)
    return record


def convert(fmt: str, source: Path, out_dir: Path) -> Dataset:
    """Read ``source`` in format ``fmt`` and write the wire-contract files into ``out_dir``."""
    reader = READERS.get(fmt)
    if reader is None:
        raise DatasetError(f"unknown dataset format {fmt!r}; known: {', '.join(sorted(READERS))}")
    if not source.is_dir():
        raise DatasetError(f"{source}: not a directory")
    dataset = reader(source)
    write_dataset(dataset, out_dir)
    return dataset


# -- command line ----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Convert public rating datasets to the wire contract (items.jsonl, events.jsonl)."
    actions = parser.add_subparsers(dest="dataset_command", required=True)
    conv = actions.add_parser("convert", help="write items.jsonl and events.jsonl from a dataset directory")
    conv.add_argument(
        "--format",
        required=True,
        choices=sorted(READERS),
        help="movietweetings (ratings.dat, movies.dat) or movielens (MovieLens 100K: u.data, u.item, u.genre)",
    )
    conv.add_argument("source", type=Path, help="directory holding the dataset's files")
    conv.add_argument("out", type=Path, help="output directory (created if missing)")


def run_command(args: argparse.Namespace) -> int:
    try:
        dataset = convert(args.format, args.source, args.out)
    except DatasetError as exc:
        print(f"recsys-agent dataset: {exc}", file=sys.stderr)
        return 2
    users = len({event.user_id for event in dataset.events})
    print(
        f"{len(dataset.items):,} items, {len(dataset.events):,} events, {users:,} users -> "
        f"{args.out / ITEMS_FILE}, {args.out / EVENTS_FILE}"
    )
    return 0

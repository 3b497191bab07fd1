"""Dataset converters on fixtures in the real MovieTweetings and MovieLens 100K layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from agent.cli.main import main
from agent.evaluation.datasets import DatasetError, convert, read_movielens_100k, read_movietweetings
from tests.builders import FIXTURES

MOVIETWEETINGS = FIXTURES / "movietweetings-mini"
MOVIELENS = FIXTURES / "movielens-100k-mini"


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def copy_fixture(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_movietweetings_items_keep_padded_ids_utf8_titles_and_empty_genres(tmp_path: Path) -> None:
    convert("movietweetings", MOVIETWEETINGS, tmp_path)
    items = {item["id"]: item for item in read_jsonl(tmp_path / "items.jsonl")}
    assert list(items) == ["0002844", "0004936", "0110912", "0133093", "1074638", "2171847"]
    assert items["0002844"] == {
        "id": "0002844",
        "title": "Fantômas - À l'ombre de la guillotine (1913)",
        "categories": ["Crime", "Drama"],
        "attributes": {"year": 1913},
    }
    assert items["2171847"]["title"] == "Körkarlen (1921)"
    # an empty genre field gives no categories at all, not [""]
    assert items["1074638"] == {"id": "1074638", "title": "Skyfall (2012)", "attributes": {"year": 2012}}


def test_movietweetings_events_are_rate_events_in_replay_order(tmp_path: Path) -> None:
    convert("movietweetings", MOVIETWEETINGS, tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    assert events[0] == {"type": "rate", "user_id": "2", "item_id": "0110912", "ts": 1364690142, "value": 10}
    # four ratings share ts 1364690142: by user as a number (2, 9, 10), then by item
    assert [(e["user_id"], e["item_id"]) for e in events[:4]] == [
        ("2", "0110912"),
        ("2", "2171847"),
        ("9", "0004936"),
        ("10", "0002844"),
    ]
    assert events[3]["value"] == 0
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert len(events) == 7


def test_movielens_items_genres_from_u_genre_and_latin1_titles(tmp_path: Path) -> None:
    convert("movielens", MOVIELENS, tmp_path)
    items = {item["id"]: item for item in read_jsonl(tmp_path / "items.jsonl")}
    assert items["1"] == {
        "id": "1",
        "title": "Toy Story (1995)",
        "categories": ["Animation", "Children's", "Comedy"],
        "attributes": {"year": 1995, "release_date": "01-Jan-1995"},
    }
    assert items["2"]["categories"] == ["Action", "Adventure", "Thriller"]
    # latin-1 bytes (0xE9) decoded, not mangled
    assert items["4"]["title"] == "Misérables, Les (1995)"
    assert items["5"]["title"] == "Cité des enfants perdus, La (1995)"
    # the 'unknown' flag means no genre; no date, no year
    assert items["267"] == {"id": "267", "title": "unknown"}


def test_movielens_events_from_tab_separated_u_data(tmp_path: Path) -> None:
    convert("movielens", MOVIELENS, tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    assert len(events) == 8
    assert events[0] == {"type": "rate", "user_id": "22", "item_id": "1", "ts": 878887116, "value": 4}
    assert events[1] == {"type": "rate", "user_id": "22", "item_id": "4", "ts": 878887116, "value": 1}
    assert events[-1] == {"type": "rate", "user_id": "186", "item_id": "5", "ts": 891717742, "value": 2}


def test_readers_return_wire_objects() -> None:
    mt = read_movietweetings(MOVIETWEETINGS)
    ml = read_movielens_100k(MOVIELENS)
    assert (len(mt.items), len(mt.events), len(ml.items), len(ml.events)) == (6, 7, 6, 8)
    assert mt.events[0].type == "rate" and mt.events[0].value == 7.0 and mt.events[0].ts == 1365029107.0


@pytest.mark.parametrize(
    ("fixture", "fmt", "file", "line_number", "bad_line", "expected"),
    [
        (MOVIETWEETINGS, "movietweetings", "ratings.dat", 3, "2::0110912::10", "expected 4 '::'-separated fields"),
        (
            MOVIETWEETINGS,
            "movietweetings",
            "ratings.dat",
            5,
            "9::0004936::five::1364690142",
            "rating must be an integer, got 'five'",
        ),
        (
            MOVIETWEETINGS,
            "movietweetings",
            "movies.dat",
            2,
            "0004936::The Bank (1915)",
            "expected 3 '::'-separated fields",
        ),
        (MOVIELENS, "movielens", "u.data", 4, "196 3 5 881250950", "expected 4 tab-separated fields"),
        (
            MOVIELENS,
            "movielens",
            "u.item",
            3,
            "3|Four Rooms (1995)|01-Jan-1995||http://x|0|1",
            "expected 24 '|'-separated fields",
        ),
        (MOVIELENS, "movielens", "u.genre", 6, "Comedy|five", "genre index must be an integer"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(
    tmp_path: Path, fixture: Path, fmt: str, file: str, line_number: int, bad_line: str, expected: str
) -> None:
    source = copy_fixture(fixture, tmp_path)
    path = source / file
    lines = path.read_bytes().split(b"\n")
    lines[line_number - 1] = bad_line.encode()
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DatasetError) as caught:
        convert(fmt, source, tmp_path / "out")
    assert f"{path}:{line_number}: " in str(caught.value)
    assert expected in str(caught.value)


def test_movietweetings_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    source = copy_fixture(MOVIETWEETINGS, tmp_path)
    (source / "movies.dat").write_bytes("0002844::Fantômas (1913)::Crime\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"movies.dat: not valid utf-8 text"):
        convert("movietweetings", source, tmp_path / "out")


def test_cli_converts_and_reports_bad_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dataset", "convert", "--format", "movielens", str(MOVIELENS), str(tmp_path / "ml")]) == 0
    assert "6 items, 8 events, 4 users" in capsys.readouterr().out
    assert (tmp_path / "ml" / "items.jsonl").exists() and (tmp_path / "ml" / "events.jsonl").exists()

    source = copy_fixture(MOVIELENS, tmp_path)
    (source / "u.data").write_text("196\t1\t3\n")
    assert main(["dataset", "convert", "--format", "movielens", str(source), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{source / 'u.data'}:1: expected 4 tab-separated fields" in err
    assert "Traceback" not in err

    assert (
        main(["dataset", "convert", "--format", "movietweetings", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    )
    assert "not a directory" in capsys.readouterr().err

"""Dataset importers: exact events per format, the log order, --item-text, errors, real data."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from infra.cli import UserError, main
from producers.importers import ImportReport, import_dataset
from producers.importers.recbole import BASE_TS, DAY_MS
from schemas.eventlog import EVENT_LOG_SCHEMA, from_row

FIXTURES = Path(__file__).parent / "fixtures" / "importers"
RECBOLE = FIXTURES / "recbole"
MOVIELENS = FIXTURES / "movielens"
AMAZON_2014 = FIXTURES / "amazon" / "Instruments_2014.json.gz"
AMAZON_2018 = FIXTURES / "amazon" / "Instruments_2018.json"
ITEM_TEXT = FIXTURES / "item_text.csv"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCIENTIFIC = SHARED_DATA / "amazon-scientific"
INSTRUMENTS = SHARED_DATA / "amazon-instruments-2014" / "Musical_Instruments.json.gz"

ASIN = [f"B{n:09d}" for n in range(60)]
TINY_SEQUENCES = {
    "AUSERLONG": [*ASIN[:54], ASIN[5]],
    "AUSERSHORT": [ASIN[56], ASIN[57], ASIN[54], ASIN[58]],
    "AUSERTHREE": [ASIN[57], ASIN[56], ASIN[55]],
}


def _import(fmt: str, src: Path, out: Path, item_text: Path | None = None) -> pl.DataFrame:
    report = import_dataset(fmt, src, out, item_text)
    log = pl.read_parquet(out)
    assert report.events == log.height
    return log


def _rows(log: pl.DataFrame, kind: str) -> list[dict[str, Any]]:
    return log.filter(pl.col("type") == kind).to_dicts()


def _sequences(log: pl.DataFrame) -> dict[str, list[str]]:
    """Each user's behaviour items in log order."""
    grouped = (
        log.filter(pl.col("type") != "item")
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"))
    )
    return dict(zip(grouped["user_id"], grouped["item_id"].to_list(), strict=True))


def test_recbole_rebuilds_full_sequences_beyond_truncated_histories(tmp_path: Path) -> None:
    """RecBole rows chain into each user's full sequence, even past the 50-item history cut."""
    log = _import("recbole", RECBOLE, tmp_path / "log.parquet")
    assert _sequences(log) == TINY_SEQUENCES
    purchases = _rows(log, "purchase")
    assert len(purchases) == 62
    assert {row["source"] for row in log.to_dicts()} == {"recbole:Tiny"}
    last = next(
        r for r in purchases if r["event_id"] == "recbole:Tiny:purchase:AUSERLONG:B000000005:54"
    )
    assert last["ts"] == BASE_TS + 54 * DAY_MS + 0
    short = [r for r in purchases if r["user_id"] == "AUSERSHORT"]
    assert [r["ts"] for r in short] == [BASE_TS + p * DAY_MS + 1 for p in range(4)]
    assert all(r["value"] is None and r["topic"] is None for r in purchases)


def test_recbole_items_come_first_with_titles_from_text(tmp_path: Path) -> None:
    """Every indexed item gets an item event 1 ms before the first purchase, titled by its text."""
    log = _import("recbole", RECBOLE, tmp_path / "log.parquet")
    items = {r["item_id"]: r for r in _rows(log, "item")}
    assert len(items) == 60
    assert log["type"].head(60).to_list() == ["item"] * 60
    assert {r["ts"] for r in items.values()} == {BASE_TS - 1}
    assert (items[ASIN[0]]["title"], items[ASIN[0]]["description"]) == (
        "Pipette 10 ml",
        "Lab Supplies Pipettes. Acme.",
    )
    assert (items[ASIN[54]]["title"], items[ASIN[54]]["description"]) == (
        "Beaker without a category",
        "",
    )
    assert (items[ASIN[59]]["title"], items[ASIN[59]]["event_id"]) == (
        ASIN[59],
        f"recbole:Tiny:item:{ASIN[59]}",
    )


def test_movielens_ratings_and_movies(tmp_path: Path) -> None:
    """u.data becomes rating events in ms; u.item gives titles, genre names and release years."""
    log = _import("movielens", MOVIELENS, tmp_path / "log.parquet")
    ratings = _rows(log, "rating")
    assert [(r["user_id"], r["item_id"], r["value"], r["ts"]) for r in ratings] == [
        ("22", "377", 1.0, 878_887_116_000),
        ("186", "242", 5.0, 881_250_949_000),
        ("196", "242", 3.0, 881_250_949_000),
        ("196", "302", 4.5, 881_250_949_000),
        ("186", "302", 3.0, 891_717_742_000),
    ]
    assert ratings[0]["event_id"] == "movielens:movielens:rating:22:377:3"
    items = {r["item_id"]: r for r in _rows(log, "item")}
    assert {r["ts"] for r in items.values()} == {878_887_116_000 - 1}
    assert (items["242"]["title"], items["242"]["categories"], items["242"]["attributes"]) == (
        "Kolya (1996)",
        ["Comedy"],
        '{"year": 1997}',
    )
    assert items["302"]["categories"] == ["Crime", "Film-Noir", "Mystery", "Thriller"]
    assert items["377"]["categories"] == ["Children's", "Comedy"]
    assert (items["999"]["title"], items["999"]["attributes"]) == (
        "Café Flore (unknown date)",
        "{}",
    )


def test_amazon_2014_gzip_purchase_then_review(tmp_path: Path) -> None:
    """Each review gives a purchase and a review at its time; empty text gives no review event."""
    log = _import("amazon-reviews", AMAZON_2014, tmp_path / "log.parquet")
    src = "amazon-reviews:Instruments_2014"
    assert [(r["event_id"], r["ts"]) for r in log.to_dicts()] == [
        (f"{src}:item:1384719342", 1_363_392_000_000 - 1),
        (f"{src}:item:B00004Y2UT", 1_363_392_000_000 - 1),
        # same day, same user: by item, then the purchase before its review
        (f"{src}:purchase:A14VAT5EAX3D9S:1384719342:2", 1_363_392_000_000),
        (f"{src}:purchase:A14VAT5EAX3D9S:1384719342:4", 1_363_392_000_000),
        (f"{src}:review:A14VAT5EAX3D9S:1384719342:2", 1_363_392_000_000),
        (f"{src}:review:A14VAT5EAX3D9S:1384719342:4", 1_363_392_000_000),
        (f"{src}:purchase:A14VAT5EAX3D9S:B00004Y2UT:3", 1_363_392_000_000),
        (f"{src}:purchase:A2IBPI20UZIR0U:1384719342:1", 1_393_545_600_000),
        (f"{src}:review:A2IBPI20UZIR0U:1384719342:1", 1_393_545_600_000),
    ]
    reviews = {
        r["event_id"].rsplit(":", 1)[1]: (r["text"], r["rating"]) for r in _rows(log, "review")
    }
    assert reviews == {
        "1": ("good. Filters out the pop sounds.", 5.0),
        "2": ("Quite affordable.", 4.0),
        "4": ("Again. Bought a second one.", 5.0),
    }
    items = _rows(log, "item")
    assert [(r["title"], r["description"]) for r in items] == [
        ("1384719342", ""),
        ("B00004Y2UT", ""),
    ]


def test_amazon_2018_plain_json_ignores_extra_fields_and_clamps_rating(tmp_path: Path) -> None:
    """A plain 2018-style file imports; extra fields are ignored and overall is clamped to 0..5."""
    log = _import("amazon-reviews", AMAZON_2018, tmp_path / "log.parquet")
    reviews = _rows(log, "review")
    assert [(r["item_id"], r["text"], r["rating"]) for r in reviews] == [
        ("B0002E1G5C", "Five Stars. Solid stand.", 5.0),
        ("B0002GXF8Q", "Meh", 2.0),
    ]
    assert {r["source"] for r in reviews} == {"amazon-reviews:Instruments_2018"}


def test_log_order_is_the_documented_tie_break(tmp_path: Path) -> None:
    """Rows sort by ts, type rank, user, item, event id; every row reads back as an event."""
    log = _import("movielens", MOVIELENS, tmp_path / "log.parquet")
    assert log.schema == pl.Schema(EVENT_LOG_SCHEMA)
    same_second = log.filter(pl.col("ts") == 881_250_949_000)
    assert list(zip(same_second["user_id"], same_second["item_id"], strict=True)) == [
        ("186", "242"),
        ("196", "242"),
        ("196", "302"),
    ]
    assert log["ts"].is_sorted()
    events = [from_row(row) for row in log.to_dicts()]
    assert [e.type for e in events] == ["item"] * 4 + ["rating"] * 5


def test_import_is_deterministic(tmp_path: Path) -> None:
    """Importing the same files twice writes identical logs (ids and order do not drift)."""
    first = _import("amazon-reviews", AMAZON_2014, tmp_path / "a.parquet")
    second = _import("amazon-reviews", AMAZON_2014, tmp_path / "nested" / "b.parquet")
    assert first.equals(second)


def test_item_text_appends_and_creates_items(tmp_path: Path) -> None:
    """--item-text appends to an item's description and creates unknown items from their text."""
    log = _import("amazon-reviews", AMAZON_2014, tmp_path / "log.parquet", ITEM_TEXT)
    items = {r["item_id"]: (r["title"], r["description"]) for r in _rows(log, "item")}
    assert items == {
        "1384719342": ("1384719342", "Pop filter, double screen\nFor vocals"),
        "B00004Y2UT": ("B00004Y2UT", ""),
        "NEWITEM01": ("A brand-new item described only here", ""),
    }
    extra = tmp_path / "extra.csv"
    extra.write_text(f"item_id,text\n{ASIN[0]},Borosilicate glass\n")
    recbole = _import("recbole", RECBOLE, tmp_path / "r.parquet", extra)
    pipette = next(r for r in _rows(recbole, "item") if r["item_id"] == ASIN[0])
    assert pipette["description"] == "Lab Supplies Pipettes. Acme.\nBorosilicate glass"


def test_cli_prints_one_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`recstream data import` exits 0 and prints one line with the counts and the output path."""
    out = tmp_path / "log.parquet"
    rc = main(["data", "import", "--format", "amazon-reviews", str(AMAZON_2014), "-o", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert len(printed) == 1
    assert printed[0].startswith(
        "imported 9 events (2 users, 2 items, 4 interactions, 3 reviews) in "
    )
    assert printed[0].endswith(f"-> {out}")
    assert pl.read_parquet(out).height == 9


def _broken_recbole(tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(RECBOLE, broken)
    test = broken / "Tiny.test.inter"
    test.write_text(test.read_text().replace("1\t56 57 54\t58", "1\t56 54 57\t58"))
    return broken


def _error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Arguments to `data import` and a fragment of the one-line error each must give."""
    empty = tmp_path / "empty"
    empty.mkdir()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not json\n")
    no_asin = tmp_path / "no_asin.json"
    no_asin.write_text('{"reviewerID": "A1", "overall": 5, "unixReviewTime": 1393545600}\n')
    bad_data = tmp_path / "ml"
    bad_data.mkdir()
    (bad_data / "u.data").write_text("1\t2\t3\t881250949\n1\t2\n")
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("1384719342,Pop filter\n")
    empty_id = tmp_path / "empty_id.csv"
    empty_id.write_text("item_id,text\nA,ok\n,orphan text\n")
    amazon = ["--format", "amazon-reviews", str(AMAZON_2014)]
    return {
        "missing dir": (["--format", "recbole", str(tmp_path / "nope")], "not found"),
        "no inter": (["--format", "recbole", str(empty)], "no *.train.inter file"),
        "file not dir": (["--format", "recbole", str(text_file)], "must be a directory"),
        "history mismatch": (["--format", "recbole", str(_broken_recbole(tmp_path))], "AUSERSHORT"),
        "no u.data": (["--format", "movielens", str(empty)], "u.data not found"),
        "bad u.data line": (["--format", "movielens", str(bad_data)], "u.data:2: expected"),
        "not json": (["--format", "amazon-reviews", str(text_file)], "notes.txt:1: not JSON lines"),
        "no asin": (
            ["--format", "amazon-reviews", str(no_asin)],
            "no_asin.json:1: the review has no asin",
        ),
        "missing file": (["--format", "amazon-reviews", str(tmp_path / "x.json.gz")], "not found"),
        "csv no header": (
            [*amazon, "--item-text", str(no_header)],
            "header with columns item_id,text",
        ),
        "csv empty id": ([*amazon, "--item-text", str(empty_id)], "empty_id.csv:3: empty item_id"),
        "csv missing": ([*amazon, "--item-text", str(tmp_path / "none.csv")], "none.csv"),
        "out is a dir": (["--format", "amazon-reviews", str(AMAZON_2014)], "is a directory"),
    }


ERROR_NAMES = [
    "missing dir",
    "no inter",
    "file not dir",
    "history mismatch",
    "no u.data",
    "bad u.data line",
    "not json",
    "no asin",
    "missing file",
    "csv no header",
    "csv empty id",
    "csv missing",
    "out is a dir",
]


@pytest.mark.parametrize("case", ERROR_NAMES)
def test_user_mistakes_give_one_line_errors(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each wrong path, wrong format or bad CSV exits 1 with one error line naming the problem."""
    args, fragment = _error_cases(tmp_path)[case]
    out = tmp_path if case == "out is a dir" else tmp_path / "out" / "log.parquet"
    rc = main(["data", "import", *args, "-o", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 1
    assert len(lines) == 1
    assert lines[0].startswith("recstream: error: ")
    assert fragment in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_a_user_error(tmp_path: Path) -> None:
    """The Python API rejects a format it does not know with a UserError, not a KeyError."""
    with pytest.raises(UserError, match="unknown dataset format 'csv'"):
        import_dataset("csv", RECBOLE, tmp_path / "log.parquet")


# -- real data (skipped where ../shared/data is absent) -----------------------------------------

needs_scientific = pytest.mark.skipif(not SCIENTIFIC.is_dir(), reason="no shared amazon-scientific")
needs_instruments = pytest.mark.skipif(not INSTRUMENTS.is_file(), reason="no shared instruments")


@pytest.fixture(scope="module")
def scientific(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImportReport, pl.DataFrame]:
    """amazon-scientific imported once for the module."""
    out = tmp_path_factory.mktemp("scientific") / "log.parquet"
    report = import_dataset("recbole", SCIENTIFIC, out)
    return report, pl.read_parquet(out)


def _raw_split(name: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(user, history, target) rows of a Scientific split, with raw ids."""

    def inverse(kind: str) -> dict[str, str]:
        lines = (SCIENTIFIC / f"Scientific.{kind}2index").read_text().splitlines()
        return {index: raw for raw, index in (line.split("\t") for line in lines)}

    users, items = inverse("user"), inverse("item")
    lines = (SCIENTIFIC / f"Scientific.{name}.inter").read_text().splitlines()[1:]
    rows = []
    for line in lines:
        user, history, target = line.split("\t")
        rows.append((users[user], tuple(items[i] for i in history.split()), items[target]))
    return rows


@needs_scientific
def test_scientific_counts(scientific: tuple[ImportReport, pl.DataFrame]) -> None:
    """amazon-scientific imports to 8,442 users, 4,385 items and 59,427 purchases."""
    report, log = scientific
    assert (report.users, report.items, report.interactions, report.reviews) == (
        8442,
        4385,
        59427,
        0,
    )
    assert report.by_type == {"item": 4385, "purchase": 59427}
    titles = log.filter(pl.col("type") == "item")["title"].to_list()
    assert all(titles)


@needs_scientific
def test_scientific_leave_one_out_reproduces_the_given_split(
    scientific: tuple[ImportReport, pl.DataFrame],
) -> None:
    """Leave-one-out on the log gives back every train, valid and test row exactly."""
    _, log = scientific
    sequences = _sequences(log)
    test, valid, train = set(), set(), set()
    for user, items in sequences.items():
        n = len(items)
        test.add((user, tuple(items[max(0, n - 51) : n - 1]), items[n - 1]))
        valid.add((user, tuple(items[max(0, n - 52) : n - 2]), items[n - 2]))
        train |= {(user, tuple(items[max(0, p - 50) : p]), items[p]) for p in range(1, n - 2)}
    assert test == set(_raw_split("test"))
    assert valid == set(_raw_split("valid"))
    assert train == set(_raw_split("train"))
    assert len(train) == 34101


@needs_instruments
def test_instruments_counts(tmp_path: Path) -> None:
    """amazon-instruments-2014 imports 10,261 reviews by 1,429 users of 900 items."""
    report = import_dataset("amazon-reviews", INSTRUMENTS, tmp_path / "log.parquet")
    assert (report.users, report.items, report.interactions, report.reviews) == (
        1429,
        900,
        10261,
        10261,
    )
    assert report.by_type == {"item": 900, "purchase": 10261, "review": 10261}
    assert report.source == "amazon-reviews:Musical_Instruments"

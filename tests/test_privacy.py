"""Privacy: PII scrubbing, pseudonymous user ids at the producer, and archive compaction."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest
from clirun import run_cli
from confluent_kafka import Producer
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from consumers.archive import archive_row
from consumers.compact import compact_archive, payload_user
from consumers.consumer import RecommendationConsumer, read_topic
from infra.kafka import confluent_config
from infra.settings import PrivacySettings, Settings, load_settings
from producers.producer import BehaviorProducer
from schemas.eventlog import rows_to_frame, to_row
from schemas.events import (
    BehaviorEvent,
    Event,
    ForgetUserEvent,
    RecommendationEvent,
    RecommendedItem,
    ReviewEvent,
)
from schemas.internal import EncodeRequest, UserUpdate
from schemas.privacy import (
    is_pseudonym,
    luhn_valid,
    pseudonym_for,
    pseudonymise,
    scrub_pii,
)
from schemas.serde import dead_letter, decode_input, encode
from schemas.topics import BEHAVIOR, ENCODE_REQUESTS, FORGET, RECOMMENDATIONS, USER_UPDATES
from streams.ingest import route

TS = 1_700_000_000_000
KEY = b"k"

# -- scrub_pii -------------------------------------------------------------------------------

SCRUBBED = [
    ("write to jane.doe+shop@example.co.uk please", "write to [email] please"),
    ("(JANE@Example.COM)", "([email])"),
    ("call +44 20 7946 0958 today", "call [phone] today"),
    ("call +44 (0)20 7946 0958", "call [phone]"),
    ("ring (555) 123-4567 now", "ring [phone] now"),
    ("555-123-4567", "[phone]"),
    ("555.123.4567.", "[phone]."),
    ("1-800-555-1234", "[phone]"),
    ("desk 555-1234, ask for Jo", "desk [phone], ask for Jo"),
    ("uk 020 7946 0958", "uk [phone]"),
    ("fr 01 23 45 67 89", "fr [phone]"),
    ("text 5551234567", "text [phone]"),
    ("card 4111 1111 1111 1111 exp 12/27", "card [card] exp 12/27"),
    ("card 4111-1111-1111-1111", "card [card]"),
    ("4111111111111111", "[card]"),
    ("amex 378282246310005.", "amex [card]."),
    ("order 12345 4111111111111111", "order 12345 [card]"),
    (
        "a@b.io, 4111 1111 1111 1111 and 555-123-4567",
        "[email], [card] and [phone]",
    ),
]
UNCHANGED = [
    "bought it in 2019 and still love it",
    "only $19.99!",
    "the 500 ml bottle",
    "€1234.56 well spent",
    "1,000,000 stars",
    "used it 2019-2020",
    "arrived on 2019-12-31",
    "on 01.02.2019 10 units arrived",
    "12.345.678 people",
    "version 1.2.3",
    "pi is 3.14159265",
    "4 out of 5",
    "pages 123-145",
    "ISBN 978-0306406157",
    "at 3:30 pm",
    "card 4111 1111 1111 1112",  # fails the Luhn check
    "twitter @handle and user@localhost",
    "Brews a clean, bright pour-over; I use it every morning.",
    "",
]


@pytest.mark.parametrize(("text", "expected"), SCRUBBED)
def test_scrub_replaces_emails_phones_and_cards(text: str, expected: str) -> None:
    """Each e-mail, phone and Luhn-valid card in the text becomes its token, the rest stays."""
    assert scrub_pii(text) == expected


@pytest.mark.parametrize("text", UNCHANGED)
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    """Years, prices, quantities, dates, ranges and Luhn-invalid numbers survive unchanged."""
    assert scrub_pii(text) == text


def test_luhn_tells_card_numbers_from_typos() -> None:
    """Test card numbers pass the Luhn check, and one changed digit fails it."""
    valid = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"]
    assert all(luhn_valid(number) for number in valid)
    assert not any(luhn_valid(number[:-1] + str((int(number[-1]) + 1) % 10)) for number in valid)
    assert scrub_pii("pay 5555 5555 5555 4444") == "pay [card]"
    assert scrub_pii("pay 5555 5555 5555 4445") == "pay 5555 5555 5555 4445"


def test_card_runs_before_phone_detection() -> None:
    """A grouped card number is one [card], never split into phone-shaped pieces."""
    assert scrub_pii("4111 1111 1111 1111") == "[card]"
    assert scrub_pii("call 555 123 4567 or pay 4111 1111 1111 1111") == (
        "call [phone] or pay [card]"
    )


@given(st.text(max_size=300))
@hsettings(max_examples=300, deadline=None)
def test_scrub_never_raises_and_is_idempotent(text: str) -> None:
    """Any string scrubs to a string, and scrubbing it again changes nothing more."""
    once = scrub_pii(text)
    assert isinstance(once, str)
    assert scrub_pii(once) == once


@given(st.text(alphabet="0123456789 +-().,$ab", max_size=80))
@hsettings(max_examples=300, deadline=None)
def test_scrub_on_digit_heavy_text_only_replaces_numbers(text: str) -> None:
    """Without an "@", only digits and their separators are ever replaced: letters all remain."""
    out = scrub_pii(text)
    rest = out.replace("[card]", "").replace("[phone]", "")
    assert (rest.count("a"), rest.count("b")) == (text.count("a"), text.count("b"))
    assert set(rest) <= set(text)
    assert "[email]" not in out


@given(st.text(max_size=60), st.emails(), st.text(max_size=60))
@hsettings(max_examples=300, deadline=None)
def test_an_email_in_random_text_never_survives(before: str, email: str, after: str) -> None:
    """Whatever surrounds it, an e-mail address is never left whole in the scrubbed text."""
    assert email not in scrub_pii(before + email + after)


def test_scrub_is_fast_on_long_and_hostile_text() -> None:
    """A 20,000-character review, even one built to make regexes backtrack, scrubs quickly."""
    for text in ("a" * 20_000 + "@", "a@" * 10_000, "1 " * 10_000, "ok 555-1234 " * 1_500):
        started = time.perf_counter()
        scrub_pii(text)
        assert time.perf_counter() - started < 2.0


# -- pseudonymise ----------------------------------------------------------------------------


def test_pseudonyms_are_stable_keyed_and_short() -> None:
    """The same id and key give the same token; another key or id gives another one."""
    alice = pseudonymise("alice", KEY)
    assert alice == pseudonymise("alice", KEY)
    assert alice.startswith("p-")
    assert len(alice) == 34
    assert is_pseudonym(alice)
    assert alice != pseudonymise("alice", b"other key")
    assert alice != pseudonymise("alice ", KEY)
    assert "alice" not in alice
    assert pseudonym_for(alice, KEY) == alice  # already one: not pseudonymised twice
    assert pseudonym_for("alice", KEY) == alice
    assert not is_pseudonym("alice")
    with pytest.raises(ValueError, match="empty"):
        pseudonymise("alice", b"")


def test_privacy_settings_read_from_the_environment_and_reject_an_empty_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The privacy section defaults to scrubbing with raw ids, reads RECSTREAM_PRIVACY__* as a
    secret key, and refuses an empty key."""
    monkeypatch.delenv("RECSTREAM_PRIVACY__PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("RECSTREAM_PRIVACY__SCRUB_PII", raising=False)
    default = load_settings()
    assert (default.privacy.scrub_pii, default.privacy.pseudonym_key) == (True, None)
    assert default.privacy.pseudonym_key_bytes() is None

    monkeypatch.setenv("RECSTREAM_PRIVACY__PSEUDONYM_KEY", "s3cret")
    monkeypatch.setenv("RECSTREAM_PRIVACY__SCRUB_PII", "false")
    built = load_settings()
    assert built.privacy.scrub_pii is False
    assert built.privacy.pseudonym_key_bytes() == b"s3cret"
    assert "s3cret" not in repr(built)
    with pytest.raises(ValidationError, match="must not be empty"):
        load_settings(privacy={"pseudonym_key": ""})


# -- scrubbing in the stream and the archive ---------------------------------------------------

PII_REVIEW = "Great kettle! Mail me at bob@example.com or call 555-123-4567."
CLEAN_REVIEW = "Great kettle! Mail me at [email] or call [phone]."


def _review(text: str = PII_REVIEW, user: str = "bob", ts: int = TS) -> ReviewEvent:
    return ReviewEvent(
        type="review", event_id=f"r-{ts}", ts=ts, user_id=user, item_id="i1", text=text, rating=4
    )


def test_route_scrubs_the_review_text_it_sends_to_the_encoder() -> None:
    """The encode request of a review holds scrubbed text; with scrubbing off, the text as sent."""
    update_out, request_out = route(_review(), TS + 1)
    assert (update_out.spec, request_out.spec) == (USER_UPDATES, ENCODE_REQUESTS)
    request = EncodeRequest.model_validate_json(request_out.value)
    assert request.text == CLEAN_REVIEW
    assert "bob@example.com" not in (update_out.value + request_out.value).decode()
    assert UserUpdate.model_validate_json(update_out.value).event_type == "review"

    _, raw_out = route(_review(), TS + 1, scrub=False)
    assert EncodeRequest.model_validate_json(raw_out.value).text == PII_REVIEW


def test_archive_rows_hold_scrubbed_review_text() -> None:
    """An archived review row has the scrubbed text; other rows and scrub=False are unchanged."""
    row = archive_row(_review(), BEHAVIOR.name, 0, 7, scrub=True)
    assert row["text"] == CLEAN_REVIEW
    assert (row["topic"], row["offset"], row["user_id"]) == (BEHAVIOR.name, 7, "bob")
    assert archive_row(_review(), BEHAVIOR.name, 0, 7, scrub=False)["text"] == PII_REVIEW
    view = BehaviorEvent(type="view", event_id="v1", ts=TS, user_id="bob", item_id="i1")
    assert archive_row(view, BEHAVIOR.name, 0, 8) == to_row(view, BEHAVIOR.name, 0, 8)


# -- pseudonymisation through the broker -------------------------------------------------------


def _keyed(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"privacy": PrivacySettings(pseudonym_key=SecretStr(KEY.decode()))}
    )


def test_producer_publishes_pseudonyms_and_never_the_raw_id(settings: Settings) -> None:
    """With a key, behaviour, review and forget events carry the pseudonym as value and key."""
    keyed = _keyed(settings)
    alias = pseudonymise("alice", KEY)
    with BehaviorProducer(keyed, source="shop") as producer:
        sent = [
            producer.view("alice", "i1", ts=TS),
            producer.review("alice", "i1", "Lovely.", ts=TS + 1),
            producer.send_dict({"type": "purchase", "user_id": "alice", "item_id": "i2"}),
            producer.forget_user("alice", ts=TS + 2),
            producer.item("i3", "Kettle"),
        ]
    assert producer.delivered == 5
    assert [getattr(e, "user_id", None) for e in sent] == [alias] * 4 + [None]

    read = [
        (spec, msg) for spec in (BEHAVIOR, FORGET) for msg in read_topic(keyed, spec, timeout_s=0.5)
    ]
    assert [(spec, msg.key()) for spec, msg in read] == [
        *[(BEHAVIOR, alias.encode())] * 3,
        (FORGET, alias.encode()),
    ]
    values = [msg.value() or b"" for _, msg in read]
    assert all(b"alice" not in value for value in values)
    assert [json.loads(value)["user_id"] for value in values] == [alias] * 4
    assert [decode_input(v, spec.name).type for (spec, _), v in zip(read, values, strict=True)] == [
        "view",
        "review",
        "purchase",
        "forget_user",
    ]
    assert json.loads(values[1])["text"] == "Lovely."


def test_producer_without_a_key_publishes_raw_ids(settings: Settings) -> None:
    """Without a key (the default) the user id is published as given."""
    with BehaviorProducer(settings) as producer:
        producer.view("alice", "i1", ts=TS)
    [msg] = list(read_topic(settings, BEHAVIOR, timeout_s=0.5))
    assert (msg.key(), json.loads(msg.value() or b"")["user_id"]) == (b"alice", "alice")


def _rec(user: str, trigger: str) -> RecommendationEvent:
    return RecommendationEvent(
        user_id=user,
        trigger_event_id=trigger,
        model_version="test-1",
        latency_ms=3.0,
        items=[RecommendedItem(item_id="i9", rank=1, score=0.5, reasons=["like i1"])],
    )


def test_recommendation_filter_maps_the_raw_id_to_its_pseudonym(settings: Settings) -> None:
    """`tail --user alice` finds the lists published for alice's pseudonym, and only those."""
    keyed = _keyed(settings)
    alias = pseudonymise("alice", KEY)
    mine, other = _rec(alias, "t1"), _rec(pseudonymise("bob", KEY), "t2")
    producer = Producer(confluent_config(settings.kafka))
    for rec in (other, mine):
        producer.produce(RECOMMENDATIONS.name, key=rec.user_id.encode(), value=encode(rec))
    assert producer.flush(10) == 0

    with RecommendationConsumer(keyed, user_id="alice") as by_raw_id:
        assert by_raw_id.user_id == alias
        assert by_raw_id.take(2, timeout_s=2.0) == [mine]
    with RecommendationConsumer(keyed, user_id=alias) as by_pseudonym:
        assert by_pseudonym.take(2, timeout_s=2.0) == [mine]
    with RecommendationConsumer(settings, user_id="alice") as unkeyed:
        assert unkeyed.take(2, timeout_s=1.0) == []


# -- archive compaction ----------------------------------------------------------------------


def _write(path: Path, events: list[Event]) -> Path:
    """An archive file written with the project's event-log writer."""
    rows = [to_row(e, BEHAVIOR.name, 0, n) for n, e in enumerate(events)]
    rows_to_frame(rows).write_parquet(path)
    return path


def _view(user: str, ts: int, item: str = "i1") -> BehaviorEvent:
    return BehaviorEvent(type="view", event_id=f"{user}-{ts}", ts=ts, user_id=user, item_id=item)


def _forget(user: str, ts: int) -> ForgetUserEvent:
    return ForgetUserEvent(type="forget_user", event_id=f"forget-{user}-{ts}", ts=ts, user_id=user)


def _ids(archive_dir: Path) -> set[str]:
    return {
        row["event_id"]
        for path in sorted(archive_dir.glob("*.parquet"))
        for row in pl.read_parquet(path).iter_rows(named=True)
    }


def test_compaction_drops_a_forgotten_users_rows_up_to_the_forget(tmp_path: Path) -> None:
    """Rows of a forgotten user up to the forget go, later ones and other users stay; idempotent."""
    arch = tmp_path / "archive"
    arch.mkdir()
    bad = dead_letter(
        stage="validate-input",
        topic=BEHAVIOR.name,
        partition=0,
        offset=9,
        raw=b'{"type": "view", "user_id": "alice", "item_id": ""}',
        exc=ValueError("empty item"),
    ).model_copy(update={"event_id": "dl-1", "ts": TS + 3})
    first = _write(
        arch / "events-1-000000.parquet",
        [_view("alice", TS), _view("bob", TS + 1), _review(user="alice", ts=TS + 2), bad],
    )
    second = _write(
        arch / "events-2-000001.parquet",
        [_forget("alice", TS + 5), _view("alice", TS + 6), _view("carol", TS + 7)],
    )
    only_alice = _write(arch / "events-3-000002.parquet", [_view("alice", TS + 4)])
    untouched = _write(arch / "events-4-000003.parquet", [_view("bob", TS + 8)])
    before = untouched.stat().st_mtime_ns, untouched.read_bytes()

    report = compact_archive(arch)
    assert (report.files, report.forgotten_users, report.rows_dropped) == (4, 1, 4)
    assert report.rewritten == [first]
    assert report.removed == [only_alice]
    assert not only_alice.exists()
    assert (untouched.stat().st_mtime_ns, untouched.read_bytes()) == before
    assert second.exists()
    assert _ids(arch) == {
        "bob-1700000000001",
        "forget-alice-1700000000005",
        "alice-1700000000006",
        "carol-1700000000007",
        "bob-1700000000008",
    }
    assert pl.read_parquet(first).schema == rows_to_frame([]).schema
    assert not list(arch.glob(".*"))

    again = compact_archive(arch)
    assert (again.rows_dropped, again.rewritten, again.removed) == (0, [], [])
    assert len(_ids(arch)) == 5


def test_compaction_drops_late_redeliveries_after_the_tombstone(tmp_path: Path) -> None:
    """A row from before the forget that arrives in a later file is dropped by the next run."""
    arch = tmp_path / "archive"
    arch.mkdir()
    _write(arch / "events-1-000000.parquet", [_view("alice", TS), _forget("alice", TS + 5)])
    assert compact_archive(arch).rows_dropped == 1
    late = _write(arch / "events-2-000001.parquet", [_view("alice", TS + 1), _view("dan", TS)])
    report = compact_archive(arch)
    assert (report.rows_dropped, report.rewritten) == (1, [late])
    assert _ids(arch) == {"forget-alice-1700000000005", "dan-1700000000000"}


def test_dead_letter_payloads_name_their_user() -> None:
    """A dead letter's bytes are read for a user id; unreadable bytes name nobody."""
    bad = dead_letter(
        stage="s", topic="t", partition=0, offset=0, raw=b'{"user_id": "eve"}', exc=ValueError()
    )
    assert payload_user(bad.payload_b64) == "eve"
    assert payload_user("not base64!") is None
    assert payload_user("bm90IGpzb24=") is None  # "not json"
    assert payload_user(None) is None


def test_archive_compact_cli_reports_and_fails_in_one_line(tmp_path: Path) -> None:
    """`archive --compact` prints a summary; a wrong directory is one error line and exit 1."""
    arch = tmp_path / "archive"
    arch.mkdir()
    _write(arch / "events-1-000000.parquet", [_view("alice", TS), _forget("alice", TS + 5)])
    done = run_cli(["archive", "--out", str(arch), "--compact"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 forgotten user(s), 1 row(s) dropped, 1 file(s) rewritten" in done.stdout
    assert _ids(arch) == {"forget-alice-1700000000005"}

    for wrong in (tmp_path / "nope", arch / "events-1-000000.parquet", tmp_path / "empty"):
        if wrong.name == "empty":
            wrong.mkdir()
        failed = run_cli(["archive", "--out", str(wrong), "--compact"], cwd=tmp_path)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1
        assert "Traceback" not in failed.stderr
        assert len(lines) == 1
        assert lines[0].startswith("recstream: error:")
        assert str(wrong) in lines[0]

"""Event contracts: decoding rules and reasons, dead letters, topics, JSON Schema, event log."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.eventlog import EVENT_LOG_SCHEMA, from_row, rows_to_frame, to_row
from schemas.events import (
    ALL_TYPES,
    INPUT_TYPES,
    MAX_TEXT_CHARS,
    DeadLetter,
    Event,
    RecommendationEvent,
    now_ms,
)
from schemas.export import export_json_schemas
from schemas.serde import MAX_EVENT_BYTES, InvalidEvent, dead_letter, decode_input, encode
from schemas.topics import (
    ALL_TOPICS,
    BEHAVIOR,
    CATALOG,
    DEAD_LETTER,
    FORGET,
    INPUT_TOPICS,
    by_name,
    topic_for_type,
)

TS = 1_700_000_000_000

#: One valid event of every public type, as a client would write it.
VALID: dict[str, dict[str, Any]] = {
    "view": {"event_id": "e-view", "ts": TS, "type": "view", "user_id": "u1", "item_id": "i1"},
    "click": {"event_id": "e-click", "ts": TS, "type": "click", "user_id": "u1", "item_id": "i1"},
    "add_to_cart": {
        "event_id": "e-cart",
        "ts": TS,
        "type": "add_to_cart",
        "user_id": "u1",
        "item_id": "i1",
    },
    "purchase": {
        "event_id": "e-buy",
        "ts": TS,
        "type": "purchase",
        "user_id": "u1",
        "item_id": "i1",
        "source": "web",
    },
    "rating": {
        "event_id": "e-rate",
        "ts": TS,
        "type": "rating",
        "user_id": "u1",
        "item_id": "i1",
        "value": 4.5,
    },
    "review": {
        "event_id": "e-review",
        "ts": TS,
        "type": "review",
        "user_id": "u1",
        "item_id": "i1",
        "text": "Loved the ending.",
        "rating": 5.0,
    },
    "item": {
        "event_id": "e-item",
        "ts": TS,
        "type": "item",
        "item_id": "i1",
        "title": "Dune",
        "description": "Desert planet epic.",
        "categories": ["books", "sci-fi"],
        "attributes": {"pages": 612, "author": "Herbert", "rating": 4.3, "paperback": True},
        "available": False,
    },
    "item_removed": {"event_id": "e-gone", "ts": TS, "type": "item_removed", "item_id": "i1"},
    "forget_user": {"event_id": "e-forget", "ts": TS, "type": "forget_user", "user_id": "u1"},
    "recommendation": {
        "event_id": "e-rec",
        "ts": TS,
        "type": "recommendation",
        "user_id": "u1",
        "trigger_event_id": "e-view",
        "model_version": "untrained",
        "latency_ms": 12.5,
        "items": [{"item_id": "i2", "rank": 1, "score": 0.9, "reasons": ["because you viewed"]}],
    },
    "dead_letter": {
        "event_id": "e-dead",
        "ts": TS,
        "type": "dead_letter",
        "stage": "validate-input",
        "topic": "behavior.events.v1",
        "partition": 0,
        "offset": 42,
        "error_type": "bad_json",
        "error": "event is not JSON",
        "payload_b64": "e25vcGU=",
    },
}


def _raw(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _reject(obj: dict[str, Any] | bytes, topic: str | None = None) -> InvalidEvent:
    raw = obj if isinstance(obj, bytes) else _raw(obj)
    with pytest.raises(InvalidEvent) as caught:
        decode_input(raw, topic=topic)
    return caught.value


# --- validation rules -------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id"])
@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_empty_or_whitespace_id_is_rejected_naming_the_field(field: str, blank: str) -> None:
    """An id that is empty or only whitespace is an invalid_field naming that id."""
    exc = _reject({**VALID["view"], field: blank})
    assert exc.error_type == "invalid_field"
    assert field in str(exc)
    assert str(exc).startswith("view: ")


def test_timestamp_in_seconds_is_rejected_as_a_unit_mistake() -> None:
    """A ts in seconds (before 1990 as milliseconds) is rejected with a hint about milliseconds."""
    exc = _reject({**VALID["click"], "ts": TS // 1000})
    assert exc.error_type == "invalid_field"
    assert "ts" in str(exc)
    assert "milliseconds" in str(exc)


def test_timestamp_far_in_the_future_is_rejected() -> None:
    """A ts more than a day ahead of the clock is rejected as absurd, naming ts."""
    exc = _reject({**VALID["click"], "ts": now_ms() + 3 * 86_400_000})
    assert exc.error_type == "invalid_field"
    assert "ts" in str(exc)
    assert "future" in str(exc)


def test_timestamp_within_clock_skew_is_accepted() -> None:
    """A ts an hour ahead (within the one-day skew allowance) is accepted unchanged."""
    ahead = now_ms() + 3_600_000
    assert decode_input(_raw({**VALID["click"], "ts": ahead})).ts == ahead


def test_over_long_review_text_is_rejected() -> None:
    """Review text over MAX_TEXT_CHARS is an invalid_field naming text."""
    exc = _reject({**VALID["review"], "text": "x" * (MAX_TEXT_CHARS + 1)})
    assert exc.error_type == "invalid_field"
    assert "text" in str(exc)
    assert str(exc).startswith("review: ")


@pytest.mark.parametrize("value", [-0.5, 5.5, 100])
def test_rating_value_out_of_range_is_rejected(value: float) -> None:
    """A rating value outside 0..5 is an invalid_field naming value and the range."""
    exc = _reject({**VALID["rating"], "value": value})
    assert exc.error_type == "invalid_field"
    assert "value" in str(exc)
    assert "0..5" in str(exc)


def test_rating_without_value_is_rejected() -> None:
    """A rating event with no value is an invalid_field saying it needs a value."""
    obj = {k: v for k, v in VALID["rating"].items() if k != "value"}
    exc = _reject(obj)
    assert exc.error_type == "invalid_field"
    assert "needs a value" in str(exc)


def test_review_rating_out_of_range_is_rejected() -> None:
    """A review's optional rating is bounded to 0..5 like a rating event's value."""
    exc = _reject({**VALID["review"], "rating": 6})
    assert exc.error_type == "invalid_field"
    assert "rating" in str(exc)


def test_unknown_field_is_ignored_for_forward_compatibility() -> None:
    """A field this version does not know is dropped, not rejected (the contract grows)."""
    event = decode_input(_raw({**VALID["view"], "colour": "red"}))
    assert event == decode_input(_raw(VALID["view"]))
    assert "colour" not in event.model_dump()


def test_unknown_type_is_rejected_listing_the_known_ones() -> None:
    """An unknown type gives unknown_type and lists every accepted input type."""
    exc = _reject({**VALID["view"], "type": "teleport"})
    assert exc.error_type == "unknown_type"
    assert "'teleport'" in str(exc)
    for known in INPUT_TYPES:
        assert known in str(exc)


@pytest.mark.parametrize("obj", [{"user_id": "u"}, {"type": ""}, {"type": 7}])
def test_missing_type_is_rejected(obj: dict[str, Any]) -> None:
    """An object without a non-empty string type is missing_type."""
    exc = _reject(obj)
    assert exc.error_type == "missing_type"
    assert "type" in str(exc)


@pytest.mark.parametrize("output_type", ["recommendation", "dead_letter"])
def test_output_records_are_not_accepted_as_input(output_type: str) -> None:
    """Recommendation and dead-letter records are outputs: ingest refuses them as unknown input."""
    assert _reject(VALID[output_type]).error_type == "unknown_type"


def test_event_on_the_wrong_topic_is_rejected_naming_both_topics() -> None:
    """A view published to the catalogue topic is wrong_topic, naming where it belongs."""
    exc = _reject(VALID["view"], topic=CATALOG.name)
    assert exc.error_type == "wrong_topic"
    assert BEHAVIOR.name in str(exc)
    assert CATALOG.name in str(exc)


def test_not_utf8_is_rejected() -> None:
    """Bytes that are not UTF-8 are not_utf8, with the offending byte's position."""
    exc = _reject(b'{"type": "view", "user_id": "\xff"}')
    assert exc.error_type == "not_utf8"
    assert "UTF-8" in str(exc)
    assert "byte 29" in str(exc)


@pytest.mark.parametrize("raw", [b"{nope", b"", b'{"type": "view",}'])
def test_not_json_is_rejected(raw: bytes) -> None:
    """Text that is not JSON is bad_json."""
    exc = _reject(raw)
    assert exc.error_type == "bad_json"
    assert "not JSON" in str(exc)


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"[1, 2]", "list"), (b'"view"', "str"), (b"3", "int"), (b"null", "NoneType")]
)
def test_json_that_is_not_an_object_is_rejected(raw: bytes, kind: str) -> None:
    """A JSON array (or any non-object) is not_object, naming what it was."""
    exc = _reject(raw)
    assert exc.error_type == "not_object"
    assert f"JSON {kind}" in str(exc)


def test_too_large_payload_is_rejected_before_parsing() -> None:
    """A payload over MAX_EVENT_BYTES is too_large, stating its size and the limit."""
    raw = _raw({**VALID["review"], "text": "x" * MAX_EVENT_BYTES})
    exc = _reject(raw)
    assert exc.error_type == "too_large"
    assert str(len(raw)) in str(exc)
    assert str(MAX_EVENT_BYTES) in str(exc)


def test_missing_value_is_rejected() -> None:
    """A message with no value (a tombstone) is rejected as empty."""
    with pytest.raises(InvalidEvent) as caught:
        decode_input(None)
    assert caught.value.error_type == "empty"


def test_deeply_nested_json_is_rejected_as_invalid_event() -> None:
    """JSON nested deeper than the parser's recursion limit is an InvalidEvent, not a crash."""
    assert _reject(b"[" * 100_000).error_type == "bad_json"


def test_integer_with_too_many_digits_is_rejected_as_invalid_event() -> None:
    """A number with more digits than Python's int-parsing limit is an InvalidEvent."""
    raw = b'{"type": "view", "user_id": "u", "item_id": "i", "ts": ' + b"9" * 5000 + b"}"
    exc = _reject(raw)
    assert isinstance(exc, InvalidEvent)


# --- valid events and defaults ----------------------------------------------------------------


@pytest.mark.parametrize("event_type", sorted(INPUT_TYPES))
def test_valid_event_of_every_input_type_decodes(event_type: str) -> None:
    """Each input type decodes on its own topic to its record, with every field kept."""
    obj = VALID[event_type]
    event = decode_input(_raw(obj), topic=topic_for_type(event_type).name)
    assert type(event) is INPUT_TYPES[event_type]
    assert event.model_dump(exclude_none=True) == obj


@pytest.mark.parametrize("event_type", sorted(INPUT_TYPES))
def test_encode_then_decode_is_identity(event_type: str) -> None:
    """encode() output decodes back to an equal event."""
    event = decode_input(_raw(VALID[event_type]))
    assert decode_input(encode(event)) == event


def test_defaults_fill_missing_event_id_and_ts() -> None:
    """Absent event_id and ts are taken from ``defaults``."""
    defaults = {"event_id": "behavior.events.v1-0-17", "ts": TS + 5}
    bare = {"type": "view", "user_id": "u1", "item_id": "i1"}
    event = decode_input(_raw(bare), defaults=defaults)
    assert (event.event_id, event.ts) == ("behavior.events.v1-0-17", TS + 5)


def test_defaults_fill_null_event_id_and_ts() -> None:
    """Explicit null event_id and ts are filled from ``defaults`` like absent ones."""
    defaults = {"event_id": "behavior.events.v1-0-17", "ts": TS + 5}
    nulls = {"type": "view", "user_id": "u1", "item_id": "i1", "event_id": None, "ts": None}
    event = decode_input(_raw(nulls), defaults=defaults)
    assert (event.event_id, event.ts) == ("behavior.events.v1-0-17", TS + 5)


def test_defaults_never_override_fields_the_event_has() -> None:
    """An event's own event_id and ts win over ``defaults``."""
    event = decode_input(_raw(VALID["view"]), defaults={"event_id": "other", "ts": TS + 99})
    assert (event.event_id, event.ts) == ("e-view", TS)


def test_without_defaults_event_id_and_ts_are_generated() -> None:
    """With no defaults, a fresh 32-hex event id and the current time are filled in."""
    before = now_ms()
    event = decode_input(_raw({"type": "view", "user_id": "u1", "item_id": "i1"}))
    assert re.fullmatch(r"[0-9a-f]{32}", event.event_id)
    assert before <= event.ts <= now_ms()


# --- dead letters -----------------------------------------------------------------------------


def test_dead_letter_keeps_original_bytes_and_reason() -> None:
    """A dead letter carries base64 of the exact input bytes, the error type and the message."""
    raw = b'\xff\x00{"type": "view"}'
    exc = _reject(raw)
    letter = dead_letter(
        stage="validate-input", topic=BEHAVIOR.name, partition=3, offset=41, raw=raw, exc=exc
    )
    assert base64.b64decode(letter.payload_b64) == raw
    assert (letter.error_type, letter.error) == ("not_utf8", str(exc))
    assert (letter.stage, letter.topic, letter.partition, letter.offset) == (
        "validate-input",
        BEHAVIOR.name,
        3,
        41,
    )
    assert letter.type == "dead_letter"
    assert topic_for_type(letter.type) is DEAD_LETTER
    assert DeadLetter.model_validate_json(encode(letter)) == letter


def test_dead_letter_of_other_errors_uses_the_exception_class_name() -> None:
    """A non-InvalidEvent failure is named by its class, and a missing value stores no bytes."""
    letter = dead_letter(
        stage="encode-text", topic="t", partition=0, offset=0, raw=None, exc=RuntimeError("oom")
    )
    assert (letter.error_type, letter.error, letter.payload_b64) == ("RuntimeError", "oom", "")


# --- topic catalogue --------------------------------------------------------------------------


def test_catalog_topic_is_compacted_and_others_delete() -> None:
    """Only the catalogue topic is compacted (it holds the current catalogue)."""
    assert CATALOG.cleanup == "compact"
    assert CATALOG.config() == {"cleanup.policy": "compact"}
    assert CATALOG.key == "item_id"
    assert [t.name for t in ALL_TOPICS if t.cleanup == "compact"] == [CATALOG.name]


def test_every_input_type_maps_to_an_input_topic() -> None:
    """Behaviour and reviews go to behaviour, items to catalogue, forget to the forget topic."""
    expected = {
        "view": BEHAVIOR,
        "click": BEHAVIOR,
        "add_to_cart": BEHAVIOR,
        "purchase": BEHAVIOR,
        "rating": BEHAVIOR,
        "review": BEHAVIOR,
        "item": CATALOG,
        "item_removed": CATALOG,
        "forget_user": FORGET,
    }
    assert {t: topic_for_type(t) for t in INPUT_TYPES} == expected
    assert {topic_for_type(t) for t in INPUT_TYPES} == set(INPUT_TOPICS)


def test_every_public_type_has_a_topic() -> None:
    """Every public record type, outputs included, maps to a declared topic."""
    for event_type in ALL_TYPES:
        assert topic_for_type(event_type) in ALL_TOPICS


def test_topic_names_carry_a_version_and_are_unique() -> None:
    """Every topic name ends in a version suffix like .v1, and no name is declared twice."""
    names = [t.name for t in ALL_TOPICS]
    assert all(re.search(r"\.v\d+$", n) for n in names), names
    assert len(set(names)) == len(names)


def test_by_name_finds_every_topic_and_rejects_others() -> None:
    """by_name returns the declared spec for each name and KeyError for a stranger."""
    for spec in ALL_TOPICS:
        assert by_name(spec.name) is spec
    with pytest.raises(KeyError):
        by_name("behavior.events")


# --- JSON Schema export -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The JSON Schemas exported once into a temp dir."""
    out = tmp_path_factory.mktemp("schemas")
    return out, export_json_schemas(out)


def test_export_writes_one_schema_per_record_and_topics(exported: tuple[Path, list[Path]]) -> None:
    """Export writes <Record>.schema.json for each distinct record and a topics.json."""
    out, paths = exported
    records = {r.__name__ for r in ALL_TYPES.values()}
    assert {p.name for p in paths} == {f"{r}.schema.json" for r in records} | {"topics.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    topics = json.loads((out / "topics.json").read_text())
    assert [t["name"] for t in topics] == [t.name for t in ALL_TOPICS]
    assert {t["name"]: t["cleanup.policy"] for t in topics}[CATALOG.name] == "compact"


@pytest.mark.parametrize("event_type", sorted(VALID))
def test_example_events_validate_against_their_exported_schema(
    exported: tuple[Path, list[Path]], event_type: str
) -> None:
    """Each valid example validates against its record's schema; with an empty user_id it fails."""
    out, _ = exported
    record = ALL_TYPES[event_type]
    schema = json.loads((out / f"{record.__name__}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    example = VALID[event_type]
    record.model_validate(example)  # the example is valid by our own rules too
    assert list(validator.iter_errors(example)) == []
    if "user_id" in example:
        errors = list(validator.iter_errors({**example, "user_id": ""}))
        assert errors
        assert all(list(e.absolute_path) == ["user_id"] for e in errors)


def test_exported_schema_agrees_with_the_decoder_on_edge_cases(
    exported: tuple[Path, list[Path]],
) -> None:
    """The behaviour schema refuses a non-behaviour type and a blank id, and allows extra fields."""
    out, _ = exported
    schema = json.loads((out / "BehaviorEvent.schema.json").read_text())
    assert schema["title"] == "BehaviorEvent"
    validator = jsonschema.Draft202012Validator(schema)
    assert not validator.is_valid({**VALID["view"], "type": "item"})
    assert not validator.is_valid({**VALID["view"], "user_id": "   "})
    assert validator.is_valid({**VALID["view"], "colour": "red"})  # ignored by the decoder too


# --- event log --------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", sorted(INPUT_TYPES))
def test_event_log_row_round_trips_every_input_type(event_type: str) -> None:
    """to_row -> rows_to_frame -> from_row gives back the same event, with its coordinates."""
    event = ALL_TYPES[event_type].model_validate(VALID[event_type])
    row = to_row(event, topic="some.topic.v1", partition=2, offset=9)
    assert set(row) == set(EVENT_LOG_SCHEMA)
    frame = rows_to_frame([row])
    assert dict(frame.schema) == EVENT_LOG_SCHEMA
    (back_row,) = frame.to_dicts()
    assert (back_row["topic"], back_row["partition"], back_row["offset"]) == ("some.topic.v1", 2, 9)
    assert from_row(back_row) == event


@pytest.mark.parametrize("event_type", ["recommendation", "dead_letter"])
def test_event_log_row_round_trips_output_types(event_type: str) -> None:
    """Recommendation and dead-letter events (archivable with --topics) survive the event log."""
    event = ALL_TYPES[event_type].model_validate(VALID[event_type])
    (back_row,) = rows_to_frame([to_row(event, "recommendations.v1", 0, 1)]).to_dicts()
    assert from_row(back_row) == event


def test_event_log_rows_of_mixed_types_share_one_frame() -> None:
    """Rows of different types form one frame with nulls where a type has no field."""
    events = [ALL_TYPES[t].model_validate(VALID[t]) for t in ("view", "item", "forget_user")]
    frame = rows_to_frame([to_row(e) for e in events])
    assert frame.height == 3
    assert frame["type"].to_list() == ["view", "item", "forget_user"]
    assert frame["title"].to_list() == [None, "Dune", None]
    assert frame["categories"].to_list() == [None, ["books", "sci-fi"], None]
    assert json.loads(frame["attributes"][1]) == VALID["item"]["attributes"]


def test_recommendation_record_defaults_its_type() -> None:
    """A RecommendationEvent built without a type is of type recommendation on its topic."""
    event = RecommendationEvent.model_validate(
        {k: v for k, v in VALID["recommendation"].items() if k != "type"}
    )
    assert event.type == "recommendation"
    assert topic_for_type(event.type).name == "recommendations.v1"


# --- property: decoding never raises anything but InvalidEvent --------------------------------

_FIELDS = sorted({name for record in ALL_TYPES.values() for name in record.model_fields})
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(sorted(INPUT_TYPES))
    | st.integers(TS - 10**9, TS + 10**9)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_json_objects = st.dictionaries(
    st.sampled_from(_FIELDS) | st.text(max_size=10), _json_values, max_size=8
)
_topics = st.none() | st.sampled_from([t.name for t in ALL_TOPICS])


def _outcome(raw: bytes, topic: str | None) -> Event | InvalidEvent:
    """The decoded event or the InvalidEvent; any other exception propagates and fails the test."""
    try:
        return decode_input(raw, topic=topic)
    except InvalidEvent as exc:
        return exc


def _decodes_or_rejects(raw: bytes, topic: str | None) -> None:
    outcome = _outcome(raw, topic)
    if isinstance(outcome, InvalidEvent):
        assert outcome.error_type
        assert str(outcome)
    else:
        assert isinstance(outcome, Event)
        assert type(outcome) is INPUT_TYPES[outcome.type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=200), topic=_topics)
def test_decode_of_arbitrary_bytes_raises_only_invalid_event(raw: bytes, topic: str | None) -> None:
    """decode_input on any bytes returns an Event or raises InvalidEvent, nothing else."""
    _decodes_or_rejects(raw, topic)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    obj=_json_objects, event_type=st.sampled_from(sorted(INPUT_TYPES)) | st.none(), topic=_topics
)
def test_decode_of_arbitrary_json_objects_raises_only_invalid_event(
    obj: dict[str, Any], event_type: str | None, topic: str | None
) -> None:
    """decode_input on any JSON object returns an Event or raises InvalidEvent, nothing else."""
    if event_type is not None:
        obj = {**obj, "type": event_type}
    _decodes_or_rejects(json.dumps(obj).encode(), topic)


@settings(max_examples=100, deadline=None)
@given(event_type=st.sampled_from(sorted(INPUT_TYPES)), drop=st.sets(st.sampled_from(_FIELDS)))
def test_decode_of_valid_events_missing_fields_raises_only_invalid_event(
    event_type: str, drop: set[str]
) -> None:
    """Valid events with any fields removed still decode or are rejected with InvalidEvent."""
    obj = {k: v for k, v in VALID[event_type].items() if k not in drop}
    _decodes_or_rejects(json.dumps(obj).encode(), None)

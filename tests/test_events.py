"""Audit events: emit, batch emit, keyset pagination, filters and pruning, against both adapters."""

from __future__ import annotations

import base64
import datetime as dt
import json
import types
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
import pytest

from kitium_pg import AuthEvent, EventPage, ValidationError

from .fix_holder import adapter_module, committed_later, release_when_waiting

BASE = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
ANCIENT = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # only test_prune_* emits events this old

HOSTILE = [
    "'; DROP TABLE kitium_auth.auth_events; --",
    '" OR 1=1 --',
    "%s %(id)s %% 100%",
    ":name :id ::jsonb $1 ?",
    "back\\slash \\x00 \\u0000",
    "emoji 🔐 café ﷽ 中文 Ω≈ç√ e\u0301",
    "\u202eright-to-left",
]


def newest_first(events: list[AuthEvent]) -> list[AuthEvent]:
    return sorted(events, key=lambda e: (e.timestamp, e.id), reverse=True)


def target(storage: Any) -> Any:
    """The real adapter object behind ``storage`` (to patch its internals)."""
    return storage.adapter if storage.kind == "sync" else storage


async def all_pages(storage: Any, limit: int, **filters: Any) -> list[EventPage]:
    pages = [await storage.list_events(limit=limit, **filters)]
    while pages[-1].next_cursor is not None:
        pages.append(await storage.list_events(limit=limit, after=pages[-1].next_cursor, **filters))
        assert len(pages) < 1000
    return pages


# -- emit_event ---------------------------------------------------------------------------------


async def test_emit_event_round_trip(storage: Any, unique: Callable[[str], str]) -> None:
    principal = unique("p")
    data = {
        "ip": "203.0.113.9",
        "nested": {"list": [1, 2.5, None, True, {"deep": ["x"]}], "empty": {}},
        "hostile": HOSTILE,
        **{value: value for value in HOSTILE},
    }
    event = await storage.emit_event(type="user.login", principal_id=principal, data=data)
    assert isinstance(event, AuthEvent)
    assert event.id.version == 7
    assert (event.type, event.principal_id, event.org_id) == ("user.login", principal, None)
    assert event.data == data
    assert event.timestamp.tzinfo is dt.UTC
    assert abs(event.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    page = await storage.list_events(principal_id=principal)
    assert page.events == (event,)
    assert page.next_cursor is None


@pytest.mark.parametrize("text", HOSTILE)
async def test_hostile_text_is_stored_verbatim_in_every_column(
    storage: Any, unique: Callable[[str], str], text: str
) -> None:
    principal = unique("p") + text
    org = unique("o") + text
    event = await storage.emit_event(
        type=text, principal_id=principal, org_id=org, data={text: text}
    )
    assert (event.type, event.principal_id, event.org_id, event.data) == (
        text,
        principal,
        org,
        {text: text},
    )
    assert (await storage.list_events(principal_id=principal, type=text)).events == (event,)
    assert (await storage.list_events(org_id=org)).events == (event,)
    written = await storage.emit_events(
        [{"type": text, "principal_id": principal, "org_id": org, "data": {"batch": text}}]
    )
    assert written == 1
    newest = (await storage.list_events(principal_id=principal, limit=1)).events[0]
    assert (newest.type, newest.org_id, newest.data) == (text, org, {"batch": text})


async def test_uuid_ids_are_stored_as_canonical_text(storage: Any) -> None:
    principal, org = uuid.uuid4(), uuid.uuid4()
    event = await storage.emit_event(type="t", principal_id=principal, org_id=org, data=None)
    assert (event.principal_id, event.org_id, event.data) == (str(principal), str(org), {})
    assert (await storage.list_events(principal_id=principal)).events == (event,)
    assert (await storage.list_events(principal_id=str(principal).upper())).events == ()
    assert (await storage.list_events(org_id=org)).events == (event,)


async def test_explicit_timestamp_is_kept_and_normalised_to_utc(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    tokyo = dt.timezone(dt.timedelta(hours=9))
    when = dt.datetime(2023, 3, 4, 5, 6, 7, 891011, tzinfo=tokyo)
    event = await storage.emit_event(type="t", principal_id=principal, data={}, timestamp=when)
    assert event.timestamp == when
    assert event.timestamp.tzinfo is dt.UTC
    assert event.timestamp.hour == 20  # 05:06 at +09:00 is 20:06 UTC the day before


async def test_emit_event_retry_after_lost_acknowledgement_returns_the_same_row(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = target(storage)
    calls = lose_first_acknowledgement(adapter, monkeypatch, storage.kind)
    principal = unique("p")
    event = await storage.emit_event(type="t", principal_id=principal, data={"n": 1})
    assert calls == ["emit_event", "emit_event"]  # committed, "lost", retried
    assert (await storage.list_events(principal_id=principal)).events == (event,)


async def test_emit_events_retry_after_lost_acknowledgement_counts_every_event(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = target(storage)
    calls = lose_first_acknowledgement(adapter, monkeypatch, storage.kind)
    principal = unique("p")
    batch = [{"type": "t", "principal_id": principal, "data": {"n": n}} for n in range(7)]
    assert await storage.emit_events(batch) == 7
    assert calls == ["emit_events", "emit_events"]
    events = (await storage.list_events(principal_id=principal)).events
    assert sorted(e.data["n"] for e in events) == list(range(7))


def lose_first_acknowledgement(
    adapter: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> list[str]:
    """Make the adapter's first statement commit and then fail as if the connection dropped
    before the reply arrived; returns the names of the statements run."""
    # _execute_on runs every statement outside a transaction's calls, with or without
    # transaction-local settings (pgbouncer=True): both commit before it returns.
    real = adapter._execute_on
    calls: list[str] = []

    def lose(query: Any) -> None:
        calls.append(query.name)
        if len(calls) == 1:
            raise psycopg.OperationalError("connection lost (simulated by the test)")

    if kind == "sync":

        def sync_execute(conn: Any, query: Any, params: Any, make: Any) -> Any:
            result = real(conn, query, params, make)
            lose(query)
            return result

        monkeypatch.setattr(adapter, "_execute_on", sync_execute)
    else:

        async def async_execute(conn: Any, query: Any, params: Any, make: Any) -> Any:
            result = await real(conn, query, params, make)
            lose(query)
            return result

        monkeypatch.setattr(adapter, "_execute_on", async_execute)
    return calls


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"type": ""}, "type"),
        ({"type": 42}, "type"),
        ({"type": "x" * 256}, "type"),
        ({"type": "a\x00b"}, "type"),
        ({"principal_id": ""}, "principal_id"),
        ({"principal_id": 42}, "principal_id"),
        ({"principal_id": None}, "principal_id"),
        ({"principal_id": "x" * 256}, "principal_id"),
        ({"org_id": ""}, "org_id"),
        ({"org_id": "\ud800"}, "org_id"),
        ({"data": [1, 2]}, "data"),
        ({"data": {"x": float("nan")}}, "data"),
        ({"data": {"x": "\x00"}}, "data"),
        ({"data": {1: "non-string key"}}, "data"),
        ({"timestamp": dt.datetime(2024, 1, 1)}, "timestamp"),  # naive
        ({"timestamp": "2024-01-01T00:00:00Z"}, "timestamp"),
    ],
)
async def test_emit_event_bad_input_names_the_field_and_writes_nothing(
    storage: Any, unique: Callable[[str], str], kwargs: dict[str, Any], field: str
) -> None:
    principal = unique("p")
    args: dict[str, Any] = {"type": "t", "principal_id": principal, "data": {}, **kwargs}
    with pytest.raises(ValidationError) as caught:
        await storage.emit_event(**args)
    assert caught.value.field == field
    assert (await storage.list_events(principal_id=principal)).events == ()


def _nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth):
        doc = {"x": doc}
    return doc


def record_statements(storage: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the statements the adapter runs from now on (until ``monkeypatch.undo()``)."""
    adapter = target(storage)
    statements: list[str] = []
    real = adapter._run

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(adapter, "_run", spy)
    return statements


# -- emit_events --------------------------------------------------------------------------------


async def test_emit_events_writes_a_thousand_events_in_one_call(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = record_statements(storage, monkeypatch)
    principal, org = unique("p"), unique("o")
    batch = [
        {
            "type": f"bulk.{n % 3}",
            "principal_id": principal,
            "data": {"n": n, "text": HOSTILE[n % len(HOSTILE)]},
            **({"org_id": org} if n % 2 else {}),
            **({"timestamp": BASE + dt.timedelta(seconds=n)} if n % 5 else {}),
        }
        for n in range(1000)
    ]
    assert await storage.emit_events(batch) == 1000
    assert statements == ["emit_events"]
    monkeypatch.undo()

    page = await storage.list_events(principal_id=principal, limit=1000)
    assert page.next_cursor is None
    assert len(page.events) == 1000
    assert list(page.events) == newest_first(list(page.events))
    by_n = {e.data["n"]: e for e in page.events}
    assert sorted(by_n) == list(range(1000))
    for n, event in by_n.items():
        assert event.type == f"bulk.{n % 3}"
        assert event.org_id == (org if n % 2 else None)
        assert event.data["text"] == HOSTILE[n % len(HOSTILE)]
        if n % 5:
            assert event.timestamp == BASE + dt.timedelta(seconds=n)
        else:  # no timestamp given: the database's now()
            assert abs(event.timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    assert len((await storage.list_events(org_id=org, limit=1000)).events) == 500
    only_type = await storage.list_events(principal_id=principal, type="bulk.0", limit=1000)
    assert {e.data["n"] for e in only_type.events} == set(range(0, 1000, 3))


async def test_emit_events_of_nothing_returns_zero_without_a_query(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_query(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no statement expected")

    monkeypatch.setattr(target(storage), "_run", no_query)
    assert await storage.emit_events([]) == 0
    assert await storage.emit_events(()) == 0
    assert await storage.emit_events(iter([])) == 0


async def test_emit_events_accepts_any_iterable_of_mappings(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    gen = ({"type": "t", "principal_id": principal, "data": {"n": n}} for n in range(3))
    assert await storage.emit_events(gen) == 3
    assert len((await storage.list_events(principal_id=principal)).events) == 3


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"type": ""}, "events[3].type"),
        ({"type": None}, "events[3].type"),
        ({"principal_id": 7}, "events[3].principal_id"),
        ({"org_id": "x" * 256}, "events[3].org_id"),
        ({"data": "not an object"}, "events[3].data"),
        ({"data": {"x": float("inf")}}, "events[3].data"),
        ({"data": {"x": "\ud800"}}, "events[3].data"),  # a lone surrogate
        ({"data": {"x": "a\x00b"}}, "events[3].data"),
        ({"data": {1: "int key"}}, "events[3].data"),
        ({"data": {"x": "y" * 1_000_001}}, "events[3].data"),  # over the per-event limit
        ({"data": _nested(40)}, "events[3].data"),
        ({"timestamp": dt.datetime(2024, 1, 1)}, "events[3].timestamp"),  # naive
        ({"timestamp": 1_700_000_000}, "events[3].timestamp"),
        ({"colour": "red"}, "events[3]"),
        ({"id": str(uuid.uuid4())}, "events[3]"),
    ],
)
async def test_emit_events_validates_everything_first_and_names_the_index(
    storage: Any, unique: Callable[[str], str], bad: dict[str, Any], field: str
) -> None:
    principal = unique("p")
    batch: list[Any] = [{"type": "t", "principal_id": principal, "data": {}} for _ in range(6)]
    batch[3] = {**batch[3], **bad}
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events(batch)
    assert caught.value.field == field
    assert (await storage.list_events(principal_id=principal)).events == ()


class _SecondThoughts(Mapping[str, Any]):
    """A mapping whose first ``items()`` is ``first`` and every later read ``later``."""

    def __init__(self, first: dict[str, Any], later: dict[str, Any]) -> None:
        self.first, self.later, self.reads = first, later, 0

    def items(self) -> Any:
        self.reads += 1
        return (self.first if self.reads == 1 else self.later).items()

    def __getitem__(self, key: str) -> Any:
        return self.later[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.later)

    def __len__(self) -> int:
        return len(self.later)


@pytest.mark.parametrize(
    "first",
    [{"k": "\ud800"}, {"k": "x" * 2_000_000}],  # a lone surrogate; over the per-event limit
    ids=["surrogate", "oversized"],
)
async def test_emit_events_names_a_bad_event_from_the_data_it_checked(
    storage: Any, unique: Callable[[str], str], first: dict[str, Any]
) -> None:
    """Naming a bad event reads the copy checked and serialised, not the caller's mapping
    again: a second read answering with a good document gave an AssertionError, or wrote an
    event over the 1 MB limit."""
    principal = unique("p")
    batch: list[Any] = [{"type": "t", "principal_id": principal, "data": {}} for _ in range(3)]
    batch[1]["data"] = _SecondThoughts(first, {"k": "ok"})
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events(batch)
    assert caught.value.field == "events[1].data"
    with pytest.raises(ValidationError) as single:
        await storage.emit_event(
            type="t", principal_id=principal, data=_SecondThoughts(first, {"k": "ok"})
        )
    assert single.value.field == "data"
    assert (await storage.list_events(principal_id=principal)).events == ()


async def test_emit_events_keeps_floats_exact_next_to_plain_events(
    storage: Any, unique: Callable[[str], str]
) -> None:
    # Events whose data needs exact float formatting are serialised apart from the rest of the
    # batch; every event must still be written with its own data.
    principal = unique("p")
    datas: list[dict[str, Any]] = [
        {"n": 0},
        {"big": 3.6e16, "small": 1e-7},
        {"s": "plain", "f": 0.5},
        {"nested": [{"v": 1.5e300}]},
    ]
    batch = [{"type": "t", "principal_id": principal, "data": d} for d in datas]
    assert await storage.emit_events(batch) == len(datas)
    stored = (await storage.list_events(principal_id=principal)).events

    def canonical(doc: Any) -> str:
        return json.dumps(doc, sort_keys=True)

    assert sorted(map(canonical, (e.data for e in stored))) == sorted(map(canonical, datas))
    # A float, not the int 36000000000000000 jsonb would give back for 3.6e+16:
    assert [repr(e.data["big"]) for e in stored if "big" in e.data] == ["3.6e+16"]


@pytest.mark.parametrize("missing", ["type", "principal_id", "data"])
async def test_emit_events_requires_type_principal_and_data(
    storage: Any, unique: Callable[[str], str], missing: str
) -> None:
    principal = unique("p")
    event = {"type": "t", "principal_id": principal, "data": {}}
    del event[missing]
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events([{"type": "t", "principal_id": principal, "data": {}}, event])
    assert caught.value.field == f"events[1].{missing}"
    assert "required" in str(caught.value)
    assert (await storage.list_events(principal_id=principal)).events == ()


@pytest.mark.parametrize(
    ("events", "field"),
    [
        ("not a list", "events"),
        ({"type": "t", "principal_id": "p", "data": {}}, "events"),
        (None, "events"),
        (42, "events"),
        ([["type", "t"]], "events[0]"),
        ([{"type": "t", "principal_id": "p", "data": {}}, None], "events[1]"),
    ],
)
async def test_emit_events_refuses_what_is_not_a_list_of_dicts(
    storage: Any, events: Any, field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events(events)
    assert caught.value.field == field


async def test_emit_events_caps_a_batch_at_ten_thousand(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    event = {"type": "t", "principal_id": principal, "data": {}}
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events([event] * 10_001)
    assert caught.value.field == "events"
    assert "10000" in str(caught.value)
    assert (await storage.list_events(principal_id=principal)).events == ()
    assert await storage.emit_events([event] * 10_000) == 10_000


async def test_emit_events_refuses_a_batch_over_its_data_limit_before_encoding_it(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: each event's data was checked against its own 1 MB, and the whole batch
    was then encoded before its 64 MB total was checked, so 1,000 references to one 900 KB
    object took 7 s and 1.7 GB before being refused. The checks' lower bounds are summed as
    they go: the batch is refused at the event that passes the total, nothing is encoded and
    nothing written."""
    principal = unique("p")
    data = {"s": "x" * 900_000}
    events_module = adapter_module(storage, "events")
    encoded = _count_encoded(monkeypatch, events_module)
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events([{"type": "t", "principal_id": principal, "data": data}] * 1000)
    assert caught.value.field == "events"
    assert f"{events_module.MAX_BATCH_DATA_BYTES} bytes in all" in str(caught.value)
    assert sum(encoded) <= events_module.MAX_BATCH_DATA_BYTES
    monkeypatch.undo()
    assert (await storage.list_events(principal_id=principal)).events == ()


async def test_the_largest_batch_fits_one_jsonb_value(storage: Any, dsn: str) -> None:
    """Found in review: emit_events sends its batch as one jsonb value, whose containers hold
    at most 268,435,455 bytes, and a batch of short numbers within the 64 MB the adapter then
    allowed failed on the server (SQLSTATE 54000, an InternalError). JSON text grows at most
    6 times into jsonb (a one-digit number and its comma, measured here on the server), so the
    limit is a sixth of the container's, or less."""
    events_module = adapter_module(storage, "events")
    with psycopg.connect(dsn) as conn:
        for text in ("[" + ",".join(["1"] * 10_000) + "]", '{"a":[' + ",".join(["[1]"] * 10_000)):
            if text.startswith("{"):
                text += "]}"
            row = conn.execute("SELECT pg_column_size(%s::jsonb)", [text]).fetchone()
            assert row is not None and row[0] <= 6 * len(text) + 64  # and the value's header
    assert 6 * events_module.MAX_BATCH_DATA_BYTES + 64 <= 268_435_455


def _count_encoded(monkeypatch: pytest.MonkeyPatch, events_module: Any) -> list[int]:
    """The sizes of what emit_events serialises, as it goes."""
    sizes: list[int] = []
    real = events_module.v.json_document

    def counted(value: object) -> Any:
        document = real(value)
        sizes.append(0 if document is None else document[1])
        return document

    monkeypatch.setattr(events_module.v, "json_document", counted)
    return sizes


async def test_emit_events_refuses_a_batch_of_short_numbers_as_it_serialises_it(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review (rev2_s18): the check charges a short number one byte, and it writes up
    to 24 ("-0.00012345678901234568"), so a batch whose summed lower bounds were just under the
    limit was serialised whole (1.5 GB and 3 min at 64 MB) before being refused. The batch is
    now counted as it is serialised and refused within one event of the limit."""
    principal = unique("p")
    events_module = adapter_module(storage, "events")
    monkeypatch.setattr(events_module, "MAX_BATCH_DATA_BYTES", 2_000_000)
    data = {"a": [-0.00012345678901234568] * 40_000}  # charged 40,004; 960,007 bytes
    encoded = _count_encoded(monkeypatch, events_module)
    with pytest.raises(ValidationError) as caught:
        await storage.emit_events([{"type": "t", "principal_id": principal, "data": data}] * 40)
    assert caught.value.field == "events"
    assert sum(encoded) <= 2_000_000 + 1_000_000
    monkeypatch.undo()
    assert (await storage.list_events(principal_id=principal)).events == ()


# -- list_events --------------------------------------------------------------------------------


async def test_pagination_walks_every_event_once_in_order(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    emitted = [
        await storage.emit_event(
            type="t",
            principal_id=principal,
            data={"n": n},
            timestamp=BASE + dt.timedelta(seconds=n // 3),  # groups of three share a timestamp
        )
        for n in range(25)
    ]
    expected = newest_first(emitted)
    pages = await all_pages(storage, 10, principal_id=principal)
    assert [len(p.events) for p in pages] == [10, 10, 5]
    assert [p.next_cursor is None for p in pages] == [False, False, True]
    assert [e for p in pages for e in p.events] == expected
    for page in pages[:-1]:
        assert isinstance(page.next_cursor, str)


async def test_pagination_of_a_batch_sharing_one_timestamp_orders_by_id(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    batch = [{"type": "t", "principal_id": principal, "data": {"n": n}} for n in range(25)]
    assert await storage.emit_events(batch) == 25
    pages = await all_pages(storage, 10, principal_id=principal)
    assert [len(p.events) for p in pages] == [10, 10, 5]
    events = [e for p in pages for e in p.events]
    assert len({e.timestamp for e in events}) == 1  # one statement, one now()
    assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
    assert sorted(e.data["n"] for e in events) == list(range(25))


async def test_exact_multiple_of_the_limit_ends_without_an_empty_page(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    batch = [{"type": "t", "principal_id": principal, "data": {}} for _ in range(20)]
    await storage.emit_events(batch)
    pages = await all_pages(storage, 10, principal_id=principal)
    assert [len(p.events) for p in pages] == [10, 10]
    assert pages[-1].next_cursor is None
    one = await all_pages(storage, 1, principal_id=principal)
    assert len(one) == 20
    assert [p.events[0] for p in one] == [e for p in pages for e in p.events]


async def test_a_time_window_pages_only_its_events(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """since (inclusive) and until (exclusive) keep one window, newest first, paged by keyset
    with the same window; every filter takes it."""
    principal, org = unique("p"), unique("o")
    start = dt.datetime(2031, 3, 1, tzinfo=dt.UTC)
    at = [start + dt.timedelta(days=n) for n in range(-2, 33)]  # Feb 27 .. Apr 2
    await storage.emit_events(
        [
            {"type": "login", "principal_id": principal, "org_id": org, "data": {}, "timestamp": t}
            for t in at
        ]
    )
    since, until = start, dt.datetime(2031, 4, 1, tzinfo=dt.UTC)
    march = sorted((t for t in at if since <= t < until), reverse=True)
    assert len(march) == 31
    for filters in ({"principal_id": principal}, {"org_id": org}, {"type": "login"}, {}):
        pages = await all_pages(storage, 7, since=since, until=until, **filters)
        got = [e.timestamp for p in pages for e in p.events if e.principal_id == principal]
        assert got == march, filters
    only_since = await all_pages(storage, 50, principal_id=principal, since=until)
    assert [e.timestamp for p in only_since for e in p.events] == [at[-1], at[-2]]
    only_until = await all_pages(storage, 50, principal_id=principal, until=since)
    assert [e.timestamp for p in only_until for e in p.events] == [at[1], at[0]]
    empty = await storage.list_events(principal_id=principal, since=until, until=since)
    assert empty.events == () and empty.next_cursor is None
    # A cursor from another listing (here: the newest page of all) does not lift the window.
    newest = await storage.list_events(principal_id=principal, limit=1)
    assert newest.next_cursor is not None
    inside = await storage.list_events(
        principal_id=principal, since=since, until=until, after=newest.next_cursor, limit=100
    )
    assert [e.timestamp for e in inside.events] == march
    with pytest.raises(ValidationError) as refused:
        await storage.list_events(principal_id=principal, since=dt.datetime(2031, 3, 1))
    assert refused.value.field == "since"


async def test_events_emitted_while_paging_do_not_shift_later_pages(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    emitted = [
        await storage.emit_event(
            type="t",
            principal_id=principal,
            data={"n": n},
            timestamp=BASE + dt.timedelta(minutes=n),
        )
        for n in range(15)
    ]
    expected = newest_first(emitted)
    first = await storage.list_events(principal_id=principal, limit=5)
    assert list(first.events) == expected[:5]
    for n in range(3):  # newer events arrive between page reads
        await storage.emit_event(type="t", principal_id=principal, data={"late": n})
    second = await storage.list_events(principal_id=principal, limit=5, after=first.next_cursor)
    third = await storage.list_events(principal_id=principal, limit=5, after=second.next_cursor)
    assert list(second.events) == expected[5:10]
    assert list(third.events) == expected[10:]
    assert third.next_cursor is None


async def test_filters(storage: Any, unique: Callable[[str], str]) -> None:
    alice, bob = unique("alice"), unique("bob")
    acme, globex = unique("acme"), unique("globex")
    login, logout = unique("login"), unique("logout")
    plan = [
        (alice, acme, login),
        (alice, acme, logout),
        (alice, globex, login),
        (alice, None, login),
        (bob, acme, login),
        (bob, None, logout),
    ]
    emitted = [
        await storage.emit_event(
            type=kind,
            principal_id=who,
            org_id=org,
            data={"i": i},
            timestamp=BASE + dt.timedelta(seconds=i),
        )
        for i, (who, org, kind) in enumerate(plan)
    ]

    async def ids(**filters: Any) -> list[int]:
        return [e.data["i"] for e in (await storage.list_events(**filters)).events]

    assert await ids(principal_id=alice) == [3, 2, 1, 0]
    assert await ids(principal_id=bob) == [5, 4]
    assert await ids(org_id=acme) == [4, 1, 0]
    assert await ids(org_id=globex) == [2]
    assert await ids(principal_id=alice, org_id=acme) == [1, 0]
    assert await ids(principal_id=bob, org_id=globex) == []
    assert await ids(principal_id=alice, type=login) == [3, 2, 0]
    assert await ids(org_id=acme, type=login) == [4, 0]
    assert await ids(principal_id=alice, org_id=acme, type=logout) == [1]
    assert await ids(type=logout) == [5, 1]  # across all principals
    assert await ids(principal_id=unique("nobody")) == []
    assert [e.id for e in (await storage.list_events(type=login, limit=2)).events] == [
        emitted[4].id,
        emitted[3].id,
    ]
    pages = await all_pages(storage, 1, type=login)
    assert [p.events[0].data["i"] for p in pages] == [4, 3, 2, 0]


async def test_unfiltered_listing_is_newest_first_across_principals(
    storage: Any, unique: Callable[[str], str]
) -> None:
    future = dt.datetime(2999, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
        microseconds=uuid.uuid4().int % 10**6
    )
    event = await storage.emit_event(
        type=unique("future"), principal_id=unique("p"), data={}, timestamp=future
    )
    page = await storage.list_events(limit=50)
    assert event in page.events
    assert list(page.events) == newest_first(list(page.events))
    after = (
        await storage.list_events(limit=50, after=page.next_cursor) if page.next_cursor else None
    )
    if after is not None:
        assert not {e.id for e in page.events} & {e.id for e in after.events}
        assert all(
            (e.timestamp, e.id) < (page.events[-1].timestamp, page.events[-1].id)
            for e in after.events
        )


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "after",
    [
        "",
        "garbage",
        "!!!!",
        "é",
        "x" * 10_000,
        cursor_of("no separator"),
        cursor_of("2024-01-01T00:00:00+00:00|not-a-uuid"),
        cursor_of(f"not-a-date|{uuid.uuid4()}"),
        cursor_of(f"2024-01-01T00:00:00|{uuid.uuid4()}"),  # naive
        cursor_of(f"0001-01-01T00:00:00+05:00|{uuid.uuid4()}"),  # overflows in UTC
        cursor_of("'; DROP TABLE kitium_auth.auth_events; --"),
        42,
        b"bytes",
    ],
)
async def test_malformed_cursor_is_a_validation_error_naming_after(
    storage: Any, after: Any
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.list_events(after=after)
    assert caught.value.field == "after"


async def test_cursor_is_an_opaque_url_safe_string(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("p")
    await storage.emit_events([{"type": "t", "principal_id": principal, "data": {}}] * 3)
    cursor = (await storage.list_events(principal_id=principal, limit=1)).next_cursor
    assert cursor is not None
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # a cursor made with a padded encoding is still understood
    padded = cursor + "=" * (-len(cursor) % 4)
    assert await storage.list_events(principal_id=principal, after=padded) == (
        await storage.list_events(principal_id=principal, after=cursor)
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": True}, "limit"),
        ({"limit": "10"}, "limit"),
        ({"principal_id": ""}, "principal_id"),
        ({"principal_id": 5}, "principal_id"),
        ({"org_id": "x" * 256}, "org_id"),
        ({"type": ""}, "type"),
        ({"type": "a\x00"}, "type"),
    ],
)
async def test_list_events_bad_input_names_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.list_events(**kwargs)
    assert caught.value.field == field


async def test_limit_bounds_are_inclusive(storage: Any, unique: Callable[[str], str]) -> None:
    principal = unique("p")
    await storage.emit_events([{"type": "t", "principal_id": principal, "data": {}}] * 2)
    assert len((await storage.list_events(principal_id=principal, limit=1)).events) == 1
    assert len((await storage.list_events(principal_id=principal, limit=1000)).events) == 2


# -- prune_events -------------------------------------------------------------------------------


async def test_prune_deletes_only_older_events_in_batches(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cutoff = ANCIENT + dt.timedelta(days=365)
    await storage.prune_events(before=cutoff)  # leftovers of an interrupted earlier run
    principal = unique("p")
    old = [
        {
            "type": "t",
            "principal_id": principal,
            "data": {"old": n},
            "timestamp": ANCIENT + dt.timedelta(days=n),
        }
        for n in range(23)
    ]
    kept = [
        {
            "type": "t",
            "principal_id": principal,
            "data": {"kept": n},
            "timestamp": cutoff + dt.timedelta(microseconds=n),
        }  # the bound itself is not older
        for n in range(2)
    ]
    assert await storage.emit_events(old + kept) == 25

    statements = record_statements(storage, monkeypatch)
    assert await storage.prune_events(before=cutoff, batch_size=5) == 23
    assert statements == ["prune_events"] * 5  # 5+5+5+5+3
    monkeypatch.undo()

    remaining = (await storage.list_events(principal_id=principal)).events
    assert sorted(e.data["kept"] for e in remaining) == [0, 1]
    assert await storage.prune_events(before=cutoff) == 0


async def test_delete_principal_events_erases_one_principal_in_batches(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every event of the principal goes, old and new, in statements of at most batch_size;
    other principals' events stay. A UUID principal matches its stored text form."""
    erased, kept = uuid.uuid4(), unique("kept")
    events = [
        {
            "type": "login",
            "principal_id": erased,
            "data": {"ip": "192.0.2.1", "n": n},
            "timestamp": dt.datetime(2001, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=n),
        }
        for n in range(7)
    ] + [{"type": "login", "principal_id": kept, "data": {}}]
    assert await storage.emit_events(events) == 8
    await storage.emit_event(type="logout", principal_id=str(erased), data={})
    seen: list[int] = []
    statements = record_statements(storage, monkeypatch)
    assert await storage.delete_principal_events(erased, batch_size=3, progress=seen.append) == 8
    assert statements == ["delete_principal_events"] * 3  # 3+3+2
    assert seen == [3, 6, 8]
    monkeypatch.undo()
    assert (await storage.list_events(principal_id=erased)).events == ()
    assert len((await storage.list_events(principal_id=kept)).events) == 1
    assert await storage.delete_principal_events(str(erased)) == 0


async def test_delete_principal_events_waits_for_a_locked_event(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """An event another transaction holds (a prune deleting it) is waited for, not skipped; when
    that transaction deletes it, the batch locks the next event in its place (LockRows sits
    under the LIMIT), so every batch stays full and the erasure leaves nothing behind."""
    principal = unique("erased")
    base = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    events = [
        {"type": "t", "principal_id": principal, "data": {}, "timestamp": base + dt.timedelta(n)}
        for n in range(10)
    ]
    assert await storage.emit_events(events) == 10
    holder = psycopg.connect(dsn)
    try:
        # The newest event: the first one the batch (newest first, by the index) locks.
        holder.execute(
            'DELETE FROM kitium_auth.auth_events WHERE principal_id = %s AND "timestamp" = %s',
            (principal, base + dt.timedelta(9)),
        )
        watcher = release_when_waiting(dsn, holder, "WHERE principal_id =")
        assert await storage.delete_principal_events(principal, batch_size=3) == 9
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert (await storage.list_events(principal_id=principal)).events == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"principal_id": ""}, "principal_id"),
        ({"principal_id": None}, "principal_id"),
        ({"principal_id": 42}, "principal_id"),
        ({"principal_id": "p", "batch_size": 0}, "batch_size"),
        ({"principal_id": "p", "progress": 42}, "progress"),
    ],
)
async def test_delete_principal_events_bad_input_names_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.delete_principal_events(**kwargs)
    assert caught.value.field == field


async def test_prune_accepts_any_timezone(storage: Any, unique: Callable[[str], str]) -> None:
    principal = unique("p")
    when = ANCIENT + dt.timedelta(hours=3)
    await storage.emit_event(type="t", principal_id=principal, data={}, timestamp=when)
    plus_five = dt.timezone(dt.timedelta(hours=5))
    # 07:59 at +05:00 is 02:59 UTC: before the event, so nothing of ours goes
    await storage.prune_events(before=dt.datetime(1970, 1, 1, 7, 59, tzinfo=plus_five))
    assert len((await storage.list_events(principal_id=principal)).events) == 1
    # 08:01 at +05:00 is 03:01 UTC: after it
    assert await storage.prune_events(before=dt.datetime(1970, 1, 1, 8, 1, tzinfo=plus_five)) >= 1
    assert (await storage.list_events(principal_id=principal)).events == ()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"before": dt.datetime(2024, 1, 1)}, "before"),  # naive
        ({"before": "2024-01-01"}, "before"),
        ({"before": None}, "before"),
        ({"before": BASE, "batch_size": 0}, "batch_size"),
        ({"before": BASE, "batch_size": 1_000_000}, "batch_size"),
    ],
)
async def test_prune_bad_input_names_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.prune_events(**kwargs)
    assert caught.value.field == field


async def test_emit_events_counts_rows_an_attempt_committed_after_the_retry_began(
    storage: Any, dsn: str, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a single create (tests/test_users.py): the batch's ids are taken by a commit
    the statement cannot see, so it counts them again and reports the whole batch."""
    principal = unique("held")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    module = adapter_module(storage, "events")
    monkeypatch.setattr(module, "new_id_text", iter(ids).__next__)
    insert = "INSERT INTO kitium_auth.auth_events (id, type, principal_id) VALUES (%s, %s, %s)"
    with committed_later(dsn, insert, [(i, "login", principal) for i in ids]):
        written = await storage.emit_events(
            [{"type": "login", "principal_id": principal, "data": {}} for _ in ids]
        )
    assert written == 3


class _ReprFloat(float):
    def __repr__(self) -> str:  # as numpy.float64's: "np.float64(1e-07)"
        return f"np.float64({float.__repr__(self)})"


async def test_data_as_any_mapping_with_float_subclasses_is_stored(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("mapping")
    data = types.MappingProxyType(
        {"tiny": _ReprFloat(1e-7), "n": 1, "m": {"big": _ReprFloat(3.6e16)}}
    )
    event = await storage.emit_event(type="t", principal_id=principal, data=data)
    assert event.data == {"tiny": 1e-7, "n": 1, "m": {"big": 3.6e16}}
    batch = [{"type": "t", "principal_id": principal, "data": data}] * 2
    assert await storage.emit_events(batch) == 2
    page = await storage.list_events(principal_id=principal)
    assert [e.data for e in page.events] == [event.data] * 3


async def test_a_timestamp_that_could_not_be_read_back_is_refused(
    storage: Any, unique: Callable[[str], str]
) -> None:
    principal = unique("far")
    far = dt.datetime(9999, 12, 31, 20, tzinfo=dt.UTC)  # year 10000 in Asia/Tokyo
    with pytest.raises(ValidationError) as refused:
        await storage.emit_event(type="t", principal_id=principal, data={}, timestamp=far)
    assert refused.value.field == "timestamp"
    with pytest.raises(ValidationError) as in_batch:
        await storage.emit_events(
            [{"type": "t", "principal_id": principal, "data": {}, "timestamp": far}]
        )
    assert in_batch.value.field == "events[0].timestamp"
    assert (await storage.list_events(principal_id=principal)).events == ()

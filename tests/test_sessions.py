"""Sessions, against both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    NotFoundError,
    PostgresStorageAdapter,
    Session,
    ValidationError,
)
from kitium_pg._base import Retry, new_id

from .fix_holder import (
    call_while_holding,
    release_when_waiting,
    two_calls_queued_on,
    unretried_adapter,
)
from .fix_metadata import check_metadata_patch
from .fix_paging import check_bad_paging_arguments, check_walks
from .fix_plans import generic_plan_of
from .fix_race import start
from .fix_roles import schema as schema

UTC = dt.UTC


def later(**delta: float) -> dt.datetime:
    return dt.datetime.now(UTC) + dt.timedelta(**delta)


def earlier(**delta: float) -> dt.datetime:
    return dt.datetime.now(UTC) - dt.timedelta(**delta)


@pytest.fixture
def org_id(storage: Any, dsn: str) -> uuid.UUID:
    """An organization row, written directly so these tests do not depend on its domain."""
    org = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO kitium_auth.organizations (id, name, plan) VALUES (%s, 'Org', 'team')",
            (org,),
        )
    return org


def join(dsn: str, org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Make the user a member of the organization (written directly, as ``org_id`` is)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO kitium_auth.organization_members (org_id, user_id) VALUES (%s, %s)",
            (org_id, user_id),
        )


async def test_create_and_get_round_trip(
    storage: Any, email: str, org_id: uuid.UUID, dsn: str
) -> None:
    user = await storage.create_user(email=email)
    join(dsn, org_id, user.id)
    plus_five = dt.timezone(dt.timedelta(hours=5))
    expires = dt.datetime.now(plus_five).replace(microsecond=123456) + dt.timedelta(hours=1)
    session = await storage.create_session(
        user_id=str(user.id),
        expires_at=expires,
        org_id=org_id,
        plan="pro",
        entitlements=["read", "write"],
        metadata={"ip": "203.0.113.7", "ua": {"mobile": True}},
    )
    assert isinstance(session, Session)
    assert session.id.version == 7
    assert (session.user_id, session.org_id, session.plan) == (user.id, org_id, "pro")
    assert session.entitlements == ("read", "write")
    assert session.metadata == {"ip": "203.0.113.7", "ua": {"mobile": True}}
    assert session.expires_at == expires
    assert session.expires_at.tzinfo is UTC
    assert session.created_at.tzinfo is UTC
    assert await storage.get_session(session.id) == session
    assert await storage.get_session(str(session.id)) == session


async def test_an_organization_bound_session_needs_the_users_membership(
    storage: Any, email: str, org_id: uuid.UUID, dsn: str
) -> None:
    """create_session and issue_session_token (with a sign-in event or without) and
    update_session refuse to bind a session to an organization its user is not a member of,
    and write nothing: no session, no event (sessions__member_fkey, migration 0021)."""
    user = await storage.create_user(email=email)
    expires = later(hours=1)
    event = {"type": "login"}
    kwargs = {"user_id": user.id, "expires_at": expires, "org_id": org_id}
    for method in ("create_session", "issue_session_token"):
        for extra in ({}, {"event": event}):
            with pytest.raises(NotFoundError, match="not a member of the organization"):
                await getattr(storage, method)(**kwargs, **extra)
    assert await storage.list_user_sessions(user.id) == []
    assert (await storage.list_events(principal_id=user.id)).events == ()
    unbound = await storage.create_session(user_id=user.id, expires_at=expires)
    with pytest.raises(NotFoundError, match="not a member of the organization"):
        await storage.update_session(unbound.id, org_id=org_id)
    assert await storage.get_session(unbound.id) == unbound
    join(dsn, org_id, user.id)
    assert (await storage.update_session(unbound.id, org_id=org_id)).org_id == org_id
    bound = await storage.create_session(**kwargs, event=event)
    assert bound.org_id == org_id
    assert [e.type for e in (await storage.list_events(principal_id=user.id)).events] == ["login"]


async def test_a_removal_ends_a_bound_session_committed_while_it_ran(
    storage: Any, email: str, org_id: uuid.UUID, dsn: str
) -> None:
    """A session bound to the organization, inserted by a transaction still open when the
    member's removal starts: its membership check holds the membership row, so the removal
    waits for it to commit and then ends it by cascade. (remove_organization_member's own
    DELETE of the user's bound sessions cannot see a row committed after its snapshot: before
    migration 0021 this session survived the removal.)"""
    user = await storage.create_user(email=email)
    join(dsn, org_id, user.id)
    late = uuid.uuid4()
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "INSERT INTO kitium_auth.sessions (id, user_id, org_id, expires_at)"
            " VALUES (%s, %s, %s, now() + interval '1 hour')",
            (late, user.id, org_id),
        )
        watcher = release_when_waiting(dsn, holder, "remove_organization_member")
        assert await storage.remove_organization_member(org_id, user.id) is True
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert await storage.get_session(late) is None
    assert await storage.list_user_sessions(user.id) == []


@pytest.mark.parametrize("held", ["users", "organizations"])
@pytest.mark.parametrize("call", ["create_session", "sign_in", "update_session"])
async def test_a_bound_session_waits_for_its_user_and_organization_before_the_membership(
    storage: Any, email: str, org_id: uuid.UUID, dsn: str, held: str, call: str
) -> None:
    """Binding a session to an organization (``create_session`` with or without its event,
    ``update_session(org_id=)``) locks the user, then the organization, then the membership
    (sessions.sql). While another transaction holds the user or the organization, as
    ``delete_user`` and ``delete_organization`` do before their cascades reach the memberships,
    the call waits without holding the membership, so the two cannot wait on each other in a
    cycle: a third transaction can still lock the membership at once (``NOWAIT``)."""
    user = await storage.create_user(email=email)
    join(dsn, org_id, user.id)
    unbound = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    bound = {"user_id": user.id, "org_id": org_id, "expires_at": later(hours=1)}
    calls = {
        "create_session": lambda: storage.create_session(**bound),
        "sign_in": lambda: storage.create_session(**bound, event={"type": "login"}),
        "update_session": lambda: storage.update_session(unbound.id, org_id=org_id),
    }
    session = await call_while_holding(
        storage,
        dsn,
        ("users", {"id": user.id}) if held == "users" else ("organizations", {"id": org_id}),
        "UPDATE",
        calls[call],
        waits_on="UPDATE kitium_auth.sessions" if call == "update_session" else "sessions",
        free=[("organization_members", {"org_id": org_id, "user_id": user.id})],
    )
    assert isinstance(session, Session) and session.org_id == org_id


async def test_defaults(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    session = await storage.create_session(user_id=user.id, expires_at=later(minutes=5))
    assert (session.org_id, session.plan, session.entitlements, session.metadata) == (
        None,
        None,
        (),
        {},
    )


async def test_a_retried_create_returns_the_row_of_the_first_attempt(
    storage: Any, email: str
) -> None:
    # What a retry after a lost acknowledgement does: the same statement with the same id.
    user = await storage.create_user(email=email)
    params = {
        "id": new_id(),
        "user_id": user.id,
        "org_id": None,
        "plan": "free",
        "entitlements": ["a"],
        "metadata": "{}",
        "expires_at": later(hours=1),
        "token_hash": None,
    }
    first = await storage._one("create_session", params, Session, retry=Retry.NEVER)
    second = await storage._one(
        "create_session", {**params, "plan": "other"}, Session, retry=Retry.NEVER
    )
    assert second == first
    assert second.plan == "free"


async def _events_of(storage: Any, principal: object) -> list[Any]:
    return list((await storage.list_events(principal_id=principal)).events)


@pytest.mark.parametrize("method", ["create_session", "issue_session_token"])
async def test_a_sign_in_writes_the_session_and_its_event_together(
    storage: Any, email: str, org_id: uuid.UUID, method: str
) -> None:
    user = await storage.create_user(email=email)
    created = await getattr(storage, method)(
        user_id=user.id, expires_at=later(hours=1), event={"type": "login"}
    )
    session = created if method == "create_session" else created.session
    assert await storage.get_session(session.id) == session
    [event] = await _events_of(storage, user.id)  # principal defaults to the user
    assert (event.type, event.principal_id, event.org_id, event.data) == (
        "login",
        str(user.id),
        None,
        {},
    )
    # Every field of the event can be given, as in emit_events.
    when = dt.datetime(2024, 5, 1, 12, tzinfo=UTC)
    await getattr(storage, method)(
        user_id=user.id,
        expires_at=later(hours=1),
        event={
            "type": "login.sso",
            "principal_id": email,
            "org_id": org_id,
            "data": {"ip": "10.0.0.1"},
            "timestamp": when,
        },
    )
    [sso] = await _events_of(storage, email)
    assert (sso.type, sso.org_id, sso.data, sso.timestamp) == (
        "login.sso",
        str(org_id),
        {"ip": "10.0.0.1"},
        when,
    )


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({}, "event.type"),
        ({"data": {}}, "event.type"),
        ({"type": ""}, "event.type"),
        ({"type": "login", "data": [1]}, "event.data"),
        ({"type": "login", "data": {"x": float("nan")}}, "event.data"),
        ({"type": "login", "principal_id": ""}, "event.principal_id"),
        ({"type": "login", "timestamp": dt.datetime(2024, 1, 1)}, "event.timestamp"),
        ({"type": "login", "ip": "10.0.0.1"}, "event"),
        ("login", "event"),
    ],
)
async def test_a_bad_sign_in_event_writes_neither_row(
    storage: Any, email: str, event: Any, field: str
) -> None:
    user = await storage.create_user(email=email)
    with pytest.raises(ValidationError) as caught:
        await storage.create_session(user_id=user.id, expires_at=later(hours=1), event=event)
    assert caught.value.field == field
    assert await storage.list_user_sessions(user.id) == []
    assert await _events_of(storage, user.id) == []


async def test_a_sign_in_for_an_unknown_user_writes_no_event(storage: Any) -> None:
    ghost = uuid.uuid4()
    with pytest.raises(NotFoundError):
        await storage.create_session(
            user_id=ghost, expires_at=later(hours=1), event={"type": "login"}
        )
    assert await _events_of(storage, ghost) == []


async def test_unknown_user_or_org_is_not_found(storage: Any, email: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        await storage.create_session(user_id=uuid.uuid4(), expires_at=later(hours=1))
    assert "sessions__user_id_fkey" in str(caught.value)
    user = await storage.create_user(email=email)
    with pytest.raises(NotFoundError) as caught:
        await storage.create_session(
            user_id=user.id, expires_at=later(hours=1), org_id=uuid.uuid4()
        )
    assert "not a member of the organization" in str(caught.value)
    assert await storage.list_user_sessions(user.id) == []


async def test_lookups_of_unknown_or_malformed_ids_return_none(storage: Any) -> None:
    assert await storage.get_session(uuid.uuid4()) is None
    for bad in ("nope", "", "x" * 10_000, 42, None, "1' OR '1'='1"):
        assert await storage.get_session(bad) is None


async def test_an_expired_session_is_gone_for_reads_and_updates(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    expired = await storage.create_session(user_id=user.id, expires_at=earlier(seconds=1))
    assert expired.expires_at < dt.datetime.now(UTC)
    assert await storage.get_session(expired.id) is None
    assert await storage.list_user_sessions(user.id) == []
    with pytest.raises(NotFoundError):  # never revived by moving expires_at forward
        await storage.update_session(expired.id, expires_at=later(days=1))
    assert await storage.get_session(expired.id) is None
    assert await storage.delete_session(expired.id) is True


async def test_update_changes_only_given_fields(
    storage: Any, email: str, org_id: uuid.UUID, dsn: str
) -> None:
    user = await storage.create_user(email=email)
    join(dsn, org_id, user.id)
    session = await storage.create_session(
        user_id=user.id,
        expires_at=later(hours=1),
        org_id=org_id,
        plan="pro",
        entitlements=["a"],
        metadata={"k": 1},
    )
    new_expiry = later(days=30)
    updated = await storage.update_session(session.id, plan=None, expires_at=new_expiry)
    assert updated.plan is None
    assert updated.expires_at == new_expiry
    assert (updated.org_id, updated.entitlements, updated.metadata) == (org_id, ("a",), {"k": 1})
    assert updated.created_at == session.created_at
    assert updated.updated_at >= session.updated_at
    again = await storage.update_session(
        str(session.id), org_id=None, entitlements=[], metadata={"k": 2}
    )
    assert (again.org_id, again.entitlements, again.metadata) == (None, (), {"k": 2})
    assert again.expires_at == new_expiry
    assert await storage.get_session(session.id) == again
    unchanged = await storage.update_session(session.id)
    assert unchanged.metadata == {"k": 2}


async def test_update_patches_metadata_in_place(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    session = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    await check_metadata_patch(storage, "update_session", "get_session", session.id, plan="pro")


async def test_update_of_a_missing_session_raises(storage: Any, email: str) -> None:
    with pytest.raises(NotFoundError):
        await storage.update_session(uuid.uuid4(), plan="x")
    with pytest.raises(ValidationError) as caught:
        await storage.update_session("not-a-uuid", plan="x")
    assert caught.value.field == "id"
    user = await storage.create_user(email=email)
    session = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    with pytest.raises(TypeError):
        await storage.update_session(session.id, user_id=uuid.uuid4())  # not an updatable field
    with pytest.raises(ValidationError) as caught:
        await storage.update_session(session.id, expires_at=dt.datetime(2030, 1, 1))
    assert caught.value.field == "expires_at"
    assert await storage.get_session(session.id) == session


async def test_delete_is_idempotent(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    session = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    assert await storage.delete_session(session.id) is True
    assert await storage.delete_session(session.id) is False
    assert await storage.get_session(session.id) is None
    for bad in ("nope", None, 42):
        assert await storage.delete_session(bad) is False


async def test_delete_expired_sessions_runs_in_bounded_batches(
    storage: Any, email: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await storage.delete_expired_sessions()  # start from no expired rows (other tests leave some)
    user = await storage.create_user(email=email)
    expired = [
        await storage.create_session(user_id=user.id, expires_at=earlier(minutes=i + 1))
        for i in range(5)
    ]
    alive = [
        await storage.create_session(user_id=user.id, expires_at=later(hours=i + 1))
        for i in range(2)
    ]
    adapter = storage.adapter if storage.kind == "sync" else storage
    batches: list[tuple[int, int]] = []
    starts: list[str | None] = []
    original = adapter._run

    def record(name: str, params: Any, result: Any) -> Any:
        assert (name, params["batch_size"]) == ("delete_expired_sessions", 2)
        deleted, locked, last, _last_id = result
        batches.append((deleted, locked))
        starts.append(params["after"])
        starts.append(last)
        return result

    def sync_spy(name: str, params: Any, **kw: Any) -> Any:
        return record(name, params, original(name, params, **kw))

    async def async_spy(name: str, params: Any, **kw: Any) -> Any:
        return record(name, params, await original(name, params, **kw))

    monkeypatch.setattr(adapter, "_run", sync_spy if storage.kind == "sync" else async_spy)
    assert await storage.delete_expired_sessions(batch_size=2) == 5
    assert batches == [(2, 2), (2, 2), (1, 1)]  # (deleted, locked) per statement
    # Each statement starts at the expiry the one before reached (earliest expiry first), passed
    # on as the server's text for it, in UTC without a zone.
    expiries = sorted(s.expires_at for s in expired)
    parsed = [
        None if t is None else dt.datetime.fromisoformat(t).replace(tzinfo=dt.UTC) for t in starts
    ]
    assert parsed == [None, expiries[1], expiries[1], expiries[3], expiries[3], expiries[4]]
    monkeypatch.undo()

    for session in expired:
        assert await storage.delete_session(session.id) is False  # the rows are gone
    assert [s.id for s in await storage.list_user_sessions(user.id)] == [
        s.id for s in reversed(alive)
    ]
    assert await storage.delete_expired_sessions() == 0


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_a_batch_that_locks_rows_it_cannot_delete_does_not_end_the_purge(
    dsn: str, cls: type
) -> None:
    """A row updated while the purge statement runs is locked in a version the statement cannot
    see, so it is locked but not deleted: the batch comes up short of rows deleted, not of rows
    locked, and the purge goes on (it stopped there, leaving the whole backlog); the rows it
    could not delete are left for the next run, as rows another caller holds are. A trigger
    that spares three rows once plays that interleaving deterministically."""
    schema = f"purge_{uuid.uuid4().hex[:10]}"
    adapter = cls(dsn, schema=schema, max_size=1)
    await _call(adapter.connect())
    try:
        user = await _call(adapter.create_user())
        expired = [
            await _call(adapter.create_session(user_id=user.id, expires_at=earlier(minutes=i + 1)))
            for i in range(25)
        ]
        # The oldest expiries: in the first batch.
        _spare(dsn, schema, [s.id for s in expired[-3:]], once=True)
        assert await _call(adapter.delete_expired_sessions(batch_size=10)) == 22
        assert await _call(adapter.delete_expired_sessions(batch_size=10)) == 3
        for session in expired:
            assert await _call(adapter.get_session(session.id, consistency="primary")) is None
    finally:
        await _call(adapter.disconnect())
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


# The purges that resume where their last batch stopped: the index each scans, and the
# parameters a later batch gets (the key the batch before reached).
RESUMING_PURGES = {
    "delete_expired_sessions": ("sessions_expires_at_id_idx", {"after": "when", "after_id": "id"}),
    "delete_expired_sso_sessions": (
        "sso_sessions_expires_at_id_idx",
        {"after": "when", "after_id": "id"},
    ),
    "delete_expired_two_factor_sessions": (
        "twofa_sessions_expires_at_id_idx",
        {"after": "when", "after_id": "id"},
    ),
    "delete_expired_email_verification_tokens": (
        "email_verification_tokens_expires_at_id_idx",
        {"after": "when", "after_id": "id"},
    ),
    "prune_events": (
        "auth_events_timestamp_idx",
        {"before": "when", "after_ts": "when", "after_id": "id"},
    ),
}


@pytest.mark.parametrize("query", sorted(RESUMING_PURGES))
def test_each_purge_batch_scans_from_where_the_last_one_stopped(
    sync_adapter: Any, dsn: str, query: str
) -> None:
    """In the generic plan (the one a pooled connection settles on), a batch is one range scan
    of the expiry (or timestamp) index, bounded below by the key the batch before reached. From
    the start of the index instead, each batch walks the entries of every row deleted before
    it while an older snapshot (a pg_dump, a long report) keeps them from being marked dead:
    the review measured 171 s instead of 5.4 s for 378,000 sessions."""
    index, kinds = RESUMING_PURGES[query]
    values = {"when": dt.datetime.now(dt.UTC), "id": uuid.uuid4()}
    params = {name: values[kind] for name, kind in kinds.items()} | {"batch_size": 1000}
    plan = generic_plan_of(dsn, "kitium_auth", query, params)
    assert "Seq Scan" not in plan, plan
    scans = [line for line in plan.splitlines() if f"using {index} on" in line]
    assert len(scans) == 1, plan
    [bound] = [line for line in plan.splitlines() if "Index Cond" in line]
    resume = "ROW(COALESCE(($2 AT TIME ZONE" if query == "prune_events" else "ROW(COALESCE(($1"
    assert resume in bound, plan


async def test_purges_pass_keys_a_python_datetime_cannot_hold(dsn: str) -> None:
    """Another tool may store '-infinity' or a date BC, which psycopg cannot load as a datetime:
    a purge whose batch ended on one failed after deleting it (the key is passed on as the
    server's text now). The first batch of prune_events also takes the event at the lowest key
    there is ('-infinity', the all-zero id), which a strict bound left for ever."""
    schema = f"purge_{uuid.uuid4().hex[:10]}"
    adapter = AsyncPostgresStorageAdapter(dsn, schema=schema, max_size=1)
    await adapter.connect()
    try:
        user = await adapter.create_user()
        sessions = [await adapter.create_session(user_id=user.id, expires_at=later()) for _ in "ab"]
        await adapter.create_session(user_id=user.id, expires_at=earlier(minutes=1))
        lowest = uuid.UUID(int=0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for session, when in zip(sessions, ("-infinity", "0044-03-15 BC"), strict=True):
                conn.execute(
                    f"UPDATE {schema}.sessions SET expires_at = %s WHERE id = %s".encode(),
                    [when, session.id],
                )
            for event_id, when in ((lowest, "-infinity"), (uuid.uuid4(), "0044-03-15 BC")):
                conn.execute(
                    f"INSERT INTO {schema}.auth_events (id, type, principal_id, data, timestamp)"
                    " VALUES (%s, 'old', 'p', '{}', %s)".encode(),
                    [event_id, when],
                )
        await adapter.emit_event(
            type="old", principal_id="p", data=None, timestamp=earlier(minutes=1)
        )
        assert await adapter.delete_expired_sessions(batch_size=1) == 3
        assert await adapter.prune_events(before=dt.datetime.now(dt.UTC), batch_size=1) == 3
        with psycopg.connect(dsn, autocommit=True) as conn:
            for table in ("sessions", "auth_events"):
                left = conn.execute(f"SELECT count(*) FROM {schema}.{table}".encode()).fetchone()
                assert left == (0,), table
    finally:
        await adapter.disconnect()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("table", ["sessions", "auth_events"])
async def test_rows_a_purge_can_never_delete_neither_stop_it_nor_hold_it_for_ever(
    dsn: str, tied: bool, table: str
) -> None:
    """Rows a trigger always spares are locked by every batch that reaches them and deleted by
    none. With at least batch_size of them first in line, each batch started over at them, for
    ever; now the next batch starts past them and the purge deletes the rest, also when they
    share one expiry: each purge resumes from the last (expiry, id) of the batch before
    (prune_events from its (timestamp, id)). Spared rows sharing one expiry used to be read
    again by each batch, and the run ended with the rest undeleted."""
    schema = f"purge_{uuid.uuid4().hex[:10]}"
    adapter = AsyncPostgresStorageAdapter(dsn, schema=schema, max_size=1)
    await adapter.connect()
    try:
        user = await adapter.create_user()
        when = earlier(minutes=10)

        async def make(at: dt.datetime) -> uuid.UUID:
            if table == "sessions":
                return (await adapter.create_session(user_id=user.id, expires_at=at)).id
            event = await adapter.emit_event(type="old", principal_id="p", data=None, timestamp=at)
            return event.id

        spared = [await make(when if tied else earlier(minutes=10 + i)) for i in range(3)]
        for i in range(4):
            await make(earlier(minutes=i + 1))
        _spare(dsn, schema, spared, once=False, table=table)  # the oldest keys
        batches: list[int] = []
        if table == "sessions":
            purge = adapter.delete_expired_sessions(batch_size=2, progress=batches.append)
        else:
            purge = adapter.prune_events(
                before=dt.datetime.now(dt.UTC), batch_size=2, progress=batches.append
            )
        deleted = await asyncio.wait_for(purge, 30)
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(f"SELECT count(*) FROM {schema}.{table}".encode()).fetchone()
        # each purge resumes past the spared ones by id too (sessions since migration 0042)
        assert (deleted, left) == (4, (3,)), batches
    finally:
        await adapter.disconnect()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


SPARE = """
CREATE TABLE purge_schema.spared (id uuid PRIMARY KEY, once boolean NOT NULL);
CREATE FUNCTION purge_schema.spare() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM purge_schema.spared WHERE id = OLD.id) THEN
    DELETE FROM purge_schema.spared WHERE id = OLD.id AND once;
    RETURN NULL;  -- this time the row stays (locked by the purge, not deleted)
  END IF;
  RETURN OLD;
END $$;
CREATE TRIGGER spare BEFORE DELETE ON purge_schema.purged_table
  FOR EACH ROW EXECUTE FUNCTION purge_schema.spare();
"""


@pytest.mark.parametrize("table", ["sessions", "auth_events"])
async def test_one_spared_row_does_not_stop_a_purge_of_one_row_a_batch(
    dsn: str, table: str
) -> None:
    """Found in review: with batch_size 1, the batch after a row the purge locked and could not
    delete read that row again (the key was inclusive), deleted nothing and reached the same
    key, and the purge ended there, in every run, before the expired rows behind it. The next
    batch starts just past the last row reached."""
    schema = f"purge_{uuid.uuid4().hex[:10]}"
    adapter = AsyncPostgresStorageAdapter(dsn, schema=schema, max_size=1)
    await adapter.connect()
    try:
        user = await adapter.create_user()

        async def make(at: dt.datetime) -> uuid.UUID:
            if table == "sessions":
                return (await adapter.create_session(user_id=user.id, expires_at=at)).id
            event = await adapter.emit_event(type="old", principal_id="p", data=None, timestamp=at)
            return event.id

        spared = await make(earlier(minutes=10))
        for i in range(3):
            await make(earlier(minutes=i + 1))
        _spare(dsn, schema, [spared], once=False, table=table)
        if table == "sessions":
            purge = adapter.delete_expired_sessions(batch_size=1)
        else:
            purge = adapter.prune_events(before=dt.datetime.now(dt.UTC), batch_size=1)
        deleted = await asyncio.wait_for(purge, 30)
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(f"SELECT count(*) FROM {schema}.{table}".encode()).fetchone()
        assert (deleted, left) == (3, (1,))
    finally:
        await adapter.disconnect()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


def _spare(
    dsn: str, schema: str, ids: list[uuid.UUID], *, once: bool, table: str = "sessions"
) -> None:
    """Make the purge of ``schema``'s ``table`` spare these rows: once, or every time."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        spare = SPARE.replace("purge_schema", schema).replace("purged_table", table)
        conn.execute(spare.encode())
        conn.execute(
            f"INSERT INTO {schema}.spared (id, once) SELECT unnest(%s::uuid[]), %s".encode(),
            [ids, once],
        )


async def _call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


@pytest.mark.parametrize("batch_size", [0, -1, 100_001, 2.5, "10", True])
async def test_delete_expired_sessions_checks_batch_size(storage: Any, batch_size: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.delete_expired_sessions(batch_size=batch_size)
    assert caught.value.field == "batch_size"


async def test_list_user_sessions_newest_first_and_only_that_users(
    storage: Any, email: str
) -> None:
    user = await storage.create_user(email=email)
    other = await storage.create_user(email="other-" + email)
    first = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    second = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    await storage.create_session(user_id=user.id, expires_at=earlier(hours=1))
    theirs = await storage.create_session(user_id=other.id, expires_at=later(hours=1))
    assert await storage.list_user_sessions(user.id) == [second, first]
    assert await storage.list_user_sessions(str(other.id)) == [theirs]
    assert await storage.list_user_sessions(uuid.uuid4()) == []
    assert await storage.list_user_sessions("nope") == []


async def _sessions_with_ties(storage: Any, email: str) -> tuple[Any, list[Session]]:
    """A user with 13 live sessions created in three ways: 5 in one transaction (its one now(),
    so one created_at), 4 in another, and 4 one at a time; 2 expired ones and another user's
    session beside them."""
    user = await storage.create_user(email=email)
    other = await storage.create_user(email="other-" + email)
    made = []
    for group in (5, 4):
        async with storage.transaction() as tx:
            for _ in range(group):
                made.append(await tx.create_session(user_id=user.id, expires_at=later(hours=1)))
    for _ in range(4):
        made.append(await storage.create_session(user_id=user.id, expires_at=later(hours=1)))
    for _ in range(2):
        await storage.create_session(user_id=user.id, expires_at=earlier(minutes=1))
    await storage.create_session(user_id=other.id, expires_at=later(hours=1))
    return user, made


async def test_pages_list_every_live_session_once_newest_first(storage: Any, email: str) -> None:
    """Sessions created at the same instant come by id, newest first, on whichever page the
    limit puts them: the pages of every size, one after the other, are the whole list, and
    expired sessions and other users' are on none."""
    user, made = await _sessions_with_ties(storage, email)
    whole = await check_walks(
        storage.list_user_sessions, user.id, "created_at", "id", newest_first=True
    )
    assert {s.id for s in whole} == {s.id for s in made}
    ties = sorted(
        len([s for s in whole if s.created_at == t]) for t in {s.created_at for s in whole}
    )
    assert ties[-2:] == [4, 5]  # two groups share one created_at each
    assert await storage.list_user_sessions(str(user.id), limit=3) == whole[:3]
    # A session ended meanwhile (or another user's) still marks a place.
    gone = whole[6]
    assert await storage.delete_session(gone.id) is True
    assert await storage.list_user_sessions(user.id, after=gone, limit=2) == whole[7:9]
    stranger = await storage.create_user(email="stranger-" + email)
    assert await storage.list_user_sessions(stranger.id, after=whole[0], limit=5) == []
    for bad in ("nope", "", 42, None, uuid.uuid4()):
        assert await storage.list_user_sessions(bad, after=whole[0], limit=5) == []


async def test_session_paging_arguments_are_checked_first(storage: Any, email: str) -> None:
    user, _ = await _sessions_with_ties(storage, email)
    session = (await storage.list_user_sessions(user.id))[0]
    wrong = [
        {"id": session.id, "created_at": session.created_at},
        (session.created_at, session.id),
        str(session.id),
        user,  # a record of another kind, with an id and a created_at
        42,
    ]
    await check_bad_paging_arguments(
        storage.list_user_sessions, user.id, session, "created_at", wrong, tie="id"
    )


def test_a_page_of_sessions_is_one_backward_range_scan(sync_adapter: Any, dsn: str) -> None:
    """In the generic plan, a page is a backward range scan of
    sessions_user_id_created_at_id_idx with the keyset as its index condition, and no sort:
    the page after the 10,000th session reads no session newer than it."""
    params = {
        "user_id": uuid.uuid4(),
        "after_created_at": dt.datetime.now(UTC),
        "after_id": uuid.uuid4(),
        "page_size": 50,
    }
    plan = generic_plan_of(dsn, "kitium_auth", "list_user_sessions_page", params)
    assert "Index Scan Backward using sessions_user_id_created_at_id_idx" in plan, plan
    assert "Sort" not in plan, plan
    [bound] = [line for line in plan.splitlines() if "Index Cond" in line]
    assert "ROW(created_at, id) <" in bound, plan


async def test_delete_user_sessions_logs_out_everywhere(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    other = await storage.create_user(email="other-" + email)
    for expires in (later(hours=1), later(hours=2), earlier(hours=1)):
        await storage.create_session(user_id=user.id, expires_at=expires)
    theirs = await storage.create_session(user_id=other.id, expires_at=later(hours=1))
    assert await storage.delete_user_sessions(user.id) == 3  # expired ones included
    assert await storage.list_user_sessions(user.id) == []
    assert await storage.delete_user_sessions(user.id) == 0
    assert await storage.delete_user_sessions("nope") == 0
    assert await storage.get_session(theirs.id) == theirs


async def test_delete_user_sessions_can_keep_the_current_one(storage: Any, email: str) -> None:
    """ "Sign out other devices": every session of the user but the one the request came with;
    a malformed id to keep is refused rather than taken as "keep none"."""
    user = await storage.create_user(email=email)
    other = await storage.create_user(email="other-" + email)
    current = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    for expires in (later(hours=2), earlier(hours=1)):
        await storage.create_session(user_id=user.id, expires_at=expires)
    theirs = await storage.create_session(user_id=other.id, expires_at=later(hours=1))
    with pytest.raises(ValidationError) as refused:
        await storage.delete_user_sessions(user.id, except_session_id="current")
    assert refused.value.field == "except_session_id"
    assert len(await storage.list_user_sessions(user.id)) == 2  # nothing deleted
    assert await storage.delete_user_sessions(user.id, except_session_id=str(current.id)) == 2
    assert await storage.list_user_sessions(user.id) == [current]
    assert await storage.delete_user_sessions(user.id, except_session_id=theirs.id) == 1
    assert await storage.get_session(theirs.id) == theirs


async def test_deleting_the_user_deletes_its_sessions(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    session = await storage.create_session(user_id=user.id, expires_at=later(hours=1))
    assert await storage.delete_user(user.id) is True
    assert await storage.get_session(session.id) is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"expires_at": dt.datetime(2030, 1, 1)}, "expires_at"),  # naive on purpose
        ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": None}, "expires_at"),
        ({"user_id": "nope"}, "user_id"),
        ({"user_id": None}, "user_id"),
        ({"org_id": "nope"}, "org_id"),
        ({"plan": "x" * 256}, "plan"),
        ({"plan": "\x00"}, "plan"),
        ({"entitlements": "read"}, "entitlements"),
        ({"entitlements": ["ok", 7]}, "entitlements[1]"),
        ({"metadata": {"x": float("nan")}}, "metadata"),
        ({"metadata": {"x": "\x00"}}, "metadata"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    arguments: dict[str, Any] = {"user_id": uuid.uuid4(), "expires_at": later(hours=1), **kwargs}
    with pytest.raises(ValidationError) as caught:
        await storage.create_session(**arguments)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("other", "args"),
    [
        ("remove_organization_member", ("org", "user")),
        ("update_organization", ("org",)),
        ("delete_organization", ("org",)),
    ],
)
async def test_log_out_everywhere_and_a_members_removal_do_not_deadlock(
    storage: Any, dsn: str, schema: str, other: str, args: tuple[str, ...]
) -> None:
    """Found in the fourth review: delete_user_sessions deleted a user's sessions in creation
    order (an index scan), a member's removal (or a member-set replacement, or the
    organization's deletion) the member's sessions in row order; once a slid expiry had moved
    the older session's row after the newer one's, the two deadlocked (hidden by the retry: a
    second's wait and a warning; inside transaction() a ConflictError). Played without timing,
    on an adapter that does not retry and whose planner reads by plain index scans (as on a
    large table: a bitmap scan reads rows in row order): a holder keeps the older session, the
    logout waits for it, then the removal starts. The logout now locks the memberships first,
    so the removal waits for it before it holds any session. In a schema of its own, whose new
    tables put a row's new version after the rows before it (in the shared tables free space
    left by other tests may take it)."""
    async with unretried_adapter(storage.kind, dsn, schema=schema) as own:
        user = await own.create_user(email=f"logout-{uuid.uuid4().hex[:8]}@example.com")
        org = await own.create_organization(
            name="Acme", plan="team", members=[{"user_id": user.id}]
        )
        older, newer = [
            await own.create_session(user_id=user.id, org_id=org.id, expires_at=later(hours=1))
            for _ in "ab"
        ]
        with psycopg.connect(dsn, autocommit=True) as observer:
            for minutes in range(1, 51):  # a slid expiry stores a new row version, somewhere
                await own.update_session(older.id, expires_at=later(hours=1, minutes=minutes))
                rows = observer.execute(
                    f"SELECT id FROM {schema}.sessions WHERE user_id = %s ORDER BY ctid".encode(),
                    [user.id],
                ).fetchall()
                if rows == [(newer.id,), (older.id,)]:
                    break
            assert rows == [(newer.id,), (older.id,)]  # the older session's row after the newer's
        values = {"org": org.id, "user": user.id}
        kwargs: dict[str, Any] = {"members": []} if other == "update_organization" else {}
        results = await two_calls_queued_on(
            dsn,
            ("sessions", {"id": older.id}),
            lambda: start(own, "delete_user_sessions", user.id),
            f"DELETE FROM {schema}.sessions",
            lambda: start(own, other, *(values[a] for a in args), **kwargs),
            schema=schema,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert await own.get_session(newer.id) is None
        assert await own.get_session(older.id) is None


async def test_log_out_everywhere_locks_only_the_memberships_its_sessions_rest_on(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """delete_user_sessions locks the user's memberships of the organizations its sessions are
    bound to, not the others: while another transaction holds a membership with no session
    bound to it FOR UPDATE (as a removal's DELETE would), the logout does not wait for it."""
    user = await storage.create_user(email=f"{unique('locks')}@example.com")
    bound, idle = [
        await storage.create_organization(name="A", plan="team", members=[{"user_id": user.id}])
        for _ in "ab"
    ]
    await storage.create_session(user_id=user.id, org_id=bound.id, expires_at=later(hours=1))
    deleted = await call_while_holding(
        storage,
        dsn,
        ("organization_members", {"org_id": idle.id, "user_id": user.id}),
        "UPDATE",
        lambda: storage.with_statement_timeout(3000).delete_user_sessions(user.id),
        waits_on=None,
    )
    assert deleted == 1


async def test_log_out_everywhere_and_the_users_deletion_do_not_deadlock(
    storage: Any, dsn: str, schema: str
) -> None:
    """Found in review of the fix above, which locked the memberships in organization order: a
    user's deletion deletes them in row order (its cascade), and over a user who had joined the
    organization with the larger id first the two deadlocked. They are locked in row order.
    Played without timing: a holder keeps the first-joined membership; the deletion waits for
    it, then the logout starts. In a schema of its own, where rows go in the order written."""
    async with unretried_adapter(storage.kind, dsn, schema=schema) as own:
        user = await own.create_user(email=f"both-{uuid.uuid4().hex[:8]}@example.com")
        smaller = await own.create_organization(name="A", plan="team")
        larger = await own.create_organization(
            name="B", plan="team", members=[{"user_id": user.id}]
        )
        await own.add_organization_member(smaller.id, user.id)  # joined second
        assert smaller.id < larger.id
        for org in (smaller, larger):
            await own.create_session(user_id=user.id, org_id=org.id, expires_at=later(hours=1))
        with psycopg.connect(dsn, autocommit=True) as observer:
            joined = observer.execute(
                f"SELECT org_id FROM {schema}.organization_members WHERE user_id = %s"
                " ORDER BY ctid".encode(),
                [user.id],
            ).fetchall()
        assert joined == [(larger.id,), (smaller.id,)]  # row order is not organization order
        results = await two_calls_queued_on(
            dsn,
            ("organization_members", {"org_id": larger.id, "user_id": user.id}),
            lambda: start(own, "delete_user", user.id),
            f"DELETE FROM {schema}.users",
            lambda: start(own, "delete_user_sessions", user.id),
            schema=schema,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert results[0] is True

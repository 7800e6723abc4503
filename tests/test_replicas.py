"""Read replicas (``replica_dsn=``) against a real streaming standby (tests/fix_replication.py).

Which server answered is made visible by pausing WAL replay on the standby: a user created on
the primary afterwards is missing on the standby only. So ``get_user(id)`` returning ``None``
while ``get_user(id, consistency="primary")`` returns the user proves the read was served by the
standby; the same read returning the user while the standby is down proves the fallback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter

from .conftest import TEST_KEYS, AwaitableSync, open_adapter
from .fix_replication import ReplicatedPair, Server, wait_replayed

Consistency = Literal["replica", "primary"]
HOUR = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicatedPair]:
    """A migrated primary and its hot standby, replay caught up."""
    replicated = ReplicatedPair.create()
    try:
        with PostgresStorageAdapter(replicated.primary.dsn, max_size=1, encryption_keys=TEST_KEYS):
            pass
        wait_replayed(replicated.primary, replicated.standby)
        yield replicated
    finally:
        replicated.close()


def _options(pair: ReplicatedPair) -> dict[str, Any]:
    return {
        "replica_dsn": pair.standby.dsn,
        "max_size": 8,
        "encryption_keys": TEST_KEYS,
        "connect_timeout": 2.0,
    }


@pytest.fixture
def sync_routed(pair: ReplicatedPair) -> Iterator[AwaitableSync]:
    with PostgresStorageAdapter(pair.primary.dsn, **_options(pair)) as adapter:
        yield AwaitableSync(adapter)


@pytest.fixture
async def async_routed(pair: ReplicatedPair) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    async with AsyncPostgresStorageAdapter(pair.primary.dsn, **_options(pair)) as adapter:
        yield adapter


@pytest.fixture(params=["sync", "async"])
def routed(request: pytest.FixtureRequest) -> Any:
    """An adapter on the primary with the standby as its replica (each kind)."""
    return request.getfixturevalue(f"{request.param}_routed")


class PausedReplay:
    """``with PausedReplay(standby):`` stops WAL replay on the standby (it keeps receiving WAL)
    and resumes it on exit; ``paused_at`` is the last replayed LSN."""

    def __init__(self, standby: Server) -> None:
        self.standby = standby

    def __enter__(self) -> PausedReplay:
        self.standby.query("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while self.standby.value("SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "replay did not pause"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.standby.query("SELECT pg_wal_replay_resume()")


async def test_hot_path_reads_are_served_by_the_standby(routed: Any, pair: ReplicatedPair) -> None:
    seen = await routed.create_user(email=f"seen-{uuid.uuid4().hex[:8]}@example.com")
    wait_replayed(pair.primary, pair.standby)
    assert await routed.get_user(seen.id) == seen  # replicated, read on the standby
    with PausedReplay(pair.standby):
        hidden = await routed.create_user(email=f"hidden-{uuid.uuid4().hex[:8]}@example.com")
        key = await routed.create_api_key(
            principal_id=hidden.id, hash=uuid.uuid4().hex * 2, prefix="kp", last_four="abcd"
        )
        # Served by the paused standby: it has not replayed the inserts.
        assert await routed.get_user(hidden.id) is None
        assert await routed.get_user_by_email(hidden.email) is None
        assert await routed.get_api_key_by_hash(key.hash) is None
        # consistency="primary" reads its own writes.
        assert await routed.get_user(hidden.id, consistency="primary") == hidden
        assert await routed.get_user_by_email(hidden.email, consistency="primary") == hidden
        assert await routed.get_api_key_by_hash(key.hash, consistency="primary") == key
        # Reads inside a transaction run on the transaction's (primary) connection.
        async with routed.transaction() as tx:
            assert await tx.get_user(hidden.id) == hidden
    wait_replayed(pair.primary, pair.standby)
    assert await routed.get_user(hidden.id) == hidden


async def test_bearer_credentials_on_a_lagging_replica(routed: Any, pair: ReplicatedPair) -> None:
    """A token or key issued while the standby lags does not validate there until replayed
    (``consistency="primary"`` does); verify_api_key's last_used_at stamp goes to the primary."""
    user = await routed.create_user()
    with PausedReplay(pair.standby):
        issued = await routed.issue_session_token(
            user_id=user.id, expires_at=dt.datetime.now(dt.UTC) + HOUR
        )
        key = await routed.issue_api_key(user.id, ["read"])
        assert await routed.validate_session_token(issued.token) is None
        assert await routed.verify_api_key(key.key) is None
        assert await routed.validate_session_token(issued.token, consistency="primary") == (
            issued.session
        )
        assert (await routed.verify_api_key(key.key, consistency="primary")).id == key.record.id
    wait_replayed(pair.primary, pair.standby)
    assert await routed.validate_session_token(issued.token) == issued.session
    verified = await routed.verify_api_key(key.key)  # read on the standby, stamp on the primary
    assert verified.id == key.record.id and verified.last_used_at is not None
    stamped = pair.primary.value(
        "SELECT last_used_at FROM kitium_auth.api_keys WHERE id = %s", [key.record.id]
    )
    assert stamped is not None


async def test_a_replica_verifies_an_api_key_until_it_expires_and_restamps_it_each_minute(
    routed: Any, pair: ReplicatedPair
) -> None:
    """verify_api_key on the standby refuses an expired key (one used within the minute too,
    which needs no stamp from the primary) and accepts one whose expiry is ahead; a key never
    used, or last stamped over a minute ago, is stamped (on the primary), one stamped within
    the minute is not."""
    user = await routed.create_user()
    now = dt.datetime.now(dt.UTC)
    expired = await routed.issue_api_key(user.id, ["read"], expires_at=now - HOUR)
    expiring = await routed.issue_api_key(user.id, ["read"], expires_at=now + HOUR)
    unused = await routed.issue_api_key(user.id, ["read"])
    assert (await routed.verify_api_key(expiring.key, consistency="primary")) is not None
    pair.primary.query(
        "UPDATE kitium_auth.api_keys SET last_used_at = last_used_at - interval '2 minutes'"
        " WHERE id = %s",
        [expiring.record.id],
    )
    pair.primary.query(
        "UPDATE kitium_auth.api_keys SET last_used_at = now() WHERE id = %s", [expired.record.id]
    )
    old = pair.primary.value(
        "SELECT last_used_at FROM kitium_auth.api_keys WHERE id = %s", [expiring.record.id]
    )
    wait_replayed(pair.primary, pair.standby)
    assert await routed.verify_api_key(expired.key) is None
    first_use = await routed.verify_api_key(unused.key)
    assert first_use is not None and first_use.last_used_at is not None
    restamped = await routed.verify_api_key(expiring.key)
    assert restamped is not None and restamped.last_used_at > old + dt.timedelta(minutes=1)
    wait_replayed(pair.primary, pair.standby)
    again = await routed.verify_api_key(expiring.key)  # within the minute: not stamped
    assert again is not None and again.last_used_at == restamped.last_used_at


class _ClockAhead:
    """A stand-in for a module's ``datetime`` import whose ``datetime.now`` runs 3 minutes
    ahead: an application server whose clock is off."""

    class datetime(dt.datetime):  # stands in for the class of that name
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Any:
            return dt.datetime.now(tz) + dt.timedelta(minutes=3)

    timedelta = dt.timedelta
    UTC = dt.UTC


async def test_whether_an_api_key_stamp_is_due_is_judged_by_the_database_clock(
    routed: Any, pair: ReplicatedPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_api_key reads a replica and goes to the primary only when last_used_at is over a
    minute old: judged by the application's clock, one running 3 minutes ahead sent every
    verification to the primary as well (twice the statements, the replica's offload lost)."""
    user = await routed.create_user()
    key = await routed.issue_api_key(user.id, ["read"])
    assert (await routed.verify_api_key(key.key, consistency="primary")).last_used_at is not None
    wait_replayed(pair.primary, pair.standby)
    from kitium_pg._async import tokens as async_tokens
    from kitium_pg._sync import tokens as sync_tokens

    for module in (async_tokens, sync_tokens):
        monkeypatch.setattr(module, "dt", _ClockAhead)
    adapter = routed.adapter if isinstance(routed, AwaitableSync) else routed
    names: list[str] = []
    original = adapter._run

    def sync_spy(name: str, params: Any, **kw: Any) -> Any:
        names.append(name)
        return original(name, params, **kw)

    async def async_spy(name: str, params: Any, **kw: Any) -> Any:
        names.append(name)
        return await original(name, params, **kw)

    spy = sync_spy if isinstance(routed, AwaitableSync) else async_spy
    monkeypatch.setattr(adapter, "_run", spy)
    for _ in range(5):
        assert (await routed.verify_api_key(key.key)).id == key.record.id
    assert names == ["get_api_key_to_verify"] * 5


async def test_writes_go_to_the_primary(routed: Any, pair: ReplicatedPair) -> None:
    assert pair.standby.value("SELECT pg_is_in_recovery()") is True
    with PausedReplay(pair.standby):
        user = await routed.create_user()
        updated = await routed.update_user(user.id, plan="team")
        assert updated.plan == "team"
        assert await routed.delete_user(user.id) is True
        rows = pair.primary.query("SELECT id FROM kitium_auth.users WHERE id = %s", [user.id])
        assert rows == []
        assert await routed.get_user(user.id, consistency="primary") is None
    health = await routed.health_check()
    assert health.status == "ok", health.error
    assert [(r["replica"], r["status"]) for r in health.replicas] == [(0, "ok")]


async def test_a_stopped_standby_is_skipped_and_used_again_once_back(
    pair: ReplicatedPair,
) -> None:
    """Both adapters at once: reads keep working (on the primary) while the standby is down,
    ``health_check().replicas`` reports it, and reads return to it after its restart."""
    with PostgresStorageAdapter(pair.primary.dsn, **_options(pair)) as sync_adapter:
        async with AsyncPostgresStorageAdapter(pair.primary.dsn, **_options(pair)) as async_:
            adapters: list[Any] = [AwaitableSync(sync_adapter), async_]
            user = await async_.create_user(email=f"fb-{uuid.uuid4().hex[:8]}@example.com")
            wait_replayed(pair.primary, pair.standby)
            for adapter in adapters:
                assert await adapter.get_user(user.id) == user
            pair.standby.stop("fast")
            try:
                started = time.perf_counter()
                slowest = 0.0
                for _ in range(30):
                    for adapter in adapters:
                        began = time.perf_counter()
                        assert await adapter.get_user(user.id) == user
                        assert await adapter.get_user_by_email(user.email) == user
                        slowest = max(slowest, time.perf_counter() - began)
                    await asyncio.sleep(0.01)
                took = time.perf_counter() - started
                for adapter in adapters:
                    health = await adapter.health_check()
                    assert health.status == "ok", health.error  # the primary is fine
                    (replica,) = health.replicas
                    assert replica["status"] == "error"
                    assert replica["error"]
                    print(f"replica down: health_check().replicas[0] = {dict(replica)!r}")
            finally:
                pair.standby.start()
            print(f"replica down: 120 reads per adapter in {took:.2f} s (slowest {slowest:.2f} s)")
            assert slowest < 3.0
            # Back: reads return to the standby (the skip lasts 5 s), shown by pausing replay.
            wait_replayed(pair.primary, pair.standby)
            with PausedReplay(pair.standby):
                hidden = await async_.create_user()
                restarted = time.perf_counter()
                for adapter in adapters:
                    while await adapter.get_user(hidden.id) is not None:
                        assert time.perf_counter() - restarted < 20, "reads never returned"
                        await asyncio.sleep(0.1)
                back = time.perf_counter() - restarted
            print(f"replica back: reads served by the standby again after {back:.2f} s")
            for adapter in adapters:
                health = await adapter.health_check()
                assert [r["status"] for r in health.replicas] == ["ok"]


async def test_health_names_why_a_stopped_standby_fails(pair: ReplicatedPair) -> None:
    async with AsyncPostgresStorageAdapter(pair.primary.dsn, **_options(pair)) as adapter:
        pair.standby.stop("fast")
        try:
            (replica,) = (await adapter.health_check()).replicas
        finally:
            pair.standby.start()
    assert replica["status"] == "error"
    assert "pool exhausted" not in replica["error"]


@pytest.mark.slow
async def test_replica_read_throughput(pair: ReplicatedPair) -> None:
    """Measured, not asserted beyond sanity: get_user throughput with 16 concurrent callers,
    reads on the primary vs routed to the standby (both servers and the client on this one
    machine, the suite's DEBUG log capture on). Printed for docs/scaling.md."""
    calls = 1500
    async with AsyncPostgresStorageAdapter(
        pair.primary.dsn, **{**_options(pair), "min_size": 8, "max_size": 8}
    ) as adapter:
        users = [await adapter.create_user() for _ in range(50)]
        wait_replayed(pair.primary, pair.standby)

        async def reader(n: int, consistency: Consistency) -> None:
            for i in range(n, calls, 16):
                user = users[i % len(users)]
                assert await adapter.get_user(user.id, consistency=consistency) == user

        figures: dict[Consistency, list[float]] = {"primary": [], "replica": []}
        for _ in range(3):
            for consistency, rates in figures.items():
                started = time.perf_counter()
                await asyncio.gather(*(reader(n, consistency) for n in range(16)))
                rates.append(calls / (time.perf_counter() - started))
    print(
        "replica read throughput (async get_user, 16 callers, 8 connections per pool, 3 runs): "
        + "; ".join(
            f"{name} median {statistics.median(rates):,.0f} reads/s"
            f" (runs: {', '.join(f'{r:,.0f}' for r in rates)})"
            for name, rates in figures.items()
        )
    )
    assert all(rate > 50 for rates in figures.values() for rate in rates)


@pytest.fixture
def lagging_replica(dsn: str) -> Iterator[str]:
    """The DSN of a database that stands in for a replica which has not replayed a migration
    yet: migrated, then its ``users.email_verified_at`` renamed away (what a replica without
    migration 0015 lacks). A real server answering with a real error; no standby needed."""
    name = f"lagging_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    replica = make_conninfo(dsn, dbname=name)
    try:
        with PostgresStorageAdapter(replica, max_size=1):
            pass  # migrated
        with psycopg.connect(replica, autocommit=True) as conn:
            conn.execute("ALTER TABLE kitium_auth.users RENAME COLUMN email_verified_at TO not_yet")
        yield replica
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_replica_that_fails_a_read_the_primary_would_answer_is_skipped(
    dsn: str, lagging_replica: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: only a connection-type failure sent a read to the primary; any other
    raised, so while a replica had not replayed a deploy's migration every routed read failed
    (InternalError, undefined column) and health_check still said ok. Now the primary answers
    and the replica is skipped for a while (health_check shows it); a failure the caller's
    input caused would still be raised."""
    options: dict[str, Any] = {"replica_dsn": lagging_replica, "max_size": 2}
    async with open_adapter(kind, dsn, **options) as adapter:
        user = await adapter.create_user(email=f"lag-{uuid.uuid4().hex[:8]}@example.com")
        assert await adapter.get_user(user.id) == user  # answered by the primary
        warned = [r.getMessage() for r in caplog.records if "@replica0" in r.getMessage()]
        assert len(warned) == 1 and "sqlstate_42703" in warned[0], warned  # undefined column
        assert await adapter.get_user_by_email(user.email) == user  # replica skipped meanwhile
        assert len([r for r in caplog.records if "@replica0" in r.getMessage()]) == 1
        (replica,) = (await adapter.health_check()).replicas
        assert replica["skipped"] is True

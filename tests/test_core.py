"""The I/O core: retries after lost connections, statement timeouts, pool exhaustion,
logging hygiene, and concurrent creates."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import tempfile
import types
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import psycopg
import psycopg_pool
import pytest
from hypothesis import settings
from psycopg import pq

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    ConflictError,
    HealthStatus,
    InternalError,
    KitiumPgError,
    MigrationError,
    NotFoundError,
    PostgresStorageAdapter,
    QueryTimeoutError,
    UnavailableError,
    ValidationError,
    _base,
)
from kitium_pg._async.core import AsyncCore
from kitium_pg._async.migrate import _failed as _migration_failure
from kitium_pg._base import Retry, connect_failure, log_call
from kitium_pg._sync.core import Core
from kitium_pg.errors import connection_lost, is_auto_retryable, translate

from .conftest import EXAMPLES_ENV, event_loop_wanted, examples, open_adapter
from .fix_race import race_each, waiting_on_a_lock
from .roundtrips import count
from .test_hostile_all import HYPOTHESIS


@pytest.fixture(scope="module")
def sync_single(dsn: str) -> Iterator[PostgresStorageAdapter]:
    with PostgresStorageAdapter(dsn, min_size=1, max_size=1, pool_timeout=0.5) as adapter:
        yield adapter


@pytest.fixture(scope="module")
async def async_single(dsn: str) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    async with AsyncPostgresStorageAdapter(
        dsn, min_size=1, max_size=1, pool_timeout=0.5
    ) as adapter:
        yield adapter


@pytest.fixture(params=["sync", "async"])
def single(request: pytest.FixtureRequest) -> Any:
    """An adapter with a one-connection pool and a short pool timeout."""
    return request.getfixturevalue(f"{request.param}_single")


async def _call(result: Any) -> Any:
    return await result if asyncio.iscoroutine(result) else result


def _kill_kitium_backends(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'kitium-pg' AND pid <> pg_backend_pid()"
            " AND datname = current_database()"
        ).fetchall()
    return len(rows)


async def test_reads_are_retried_after_the_connection_is_killed(single: Any, dsn: str) -> None:
    user = await _call(single.create_user())
    assert _kill_kitium_backends(dsn) >= 1
    assert await _call(single.get_user(user.id)) == user


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_a_retry_after_a_restart_does_not_draw_another_dead_connection(
    dsn: str, cls: type
) -> None:
    """A restart kills every idle connection at once. The first failure has the pool test its
    idle connections, so the one retry allowed here gets a live one (it drew the next dead
    one before, and a pool with more idle connections than retries failed the call)."""
    name = f"kpg-dead-{uuid.uuid4().hex[:8]}"
    adapter = cls(dsn, min_size=6, max_size=6, max_retries=1, application_name=name)
    await _call(adapter.connect())
    try:
        user = await _call(adapter.create_user())
        with psycopg.connect(dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                [name],
            ).fetchall()
        assert len(killed) == 6
        assert await _call(adapter.get_user(user.id)) == user
        assert await _call(adapter.get_user(user.id)) == user
        # A call that is never retried fails once, on the dead connection it drew; the pool's
        # other dead connections are gone by then, so the next such call works.
        await _call(adapter.pool.wait())  # all six replaced: none is connecting late
        assert _kill_by_name(dsn, name) == 6
        with pytest.raises(UnavailableError):
            await _call(adapter.increment_two_factor_attempts(uuid.uuid4()))
        assert await _call(adapter.increment_two_factor_attempts(uuid.uuid4())) is None
    finally:
        await _call(adapter.disconnect())


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_transactions_after_a_restart_do_not_draw_the_dead_connections_one_by_one(
    dsn: str, cls: type
) -> None:
    """A transaction whose BEGIN finds its connection dead replaces the pool's connections as
    a call does, so the next transaction gets a live one (each drew the next dead one before:
    up to max_size failures after every restart); run_in_transaction re-runs a transaction
    that could not begin, which ran nothing."""
    name = f"kpg-deadtx-{uuid.uuid4().hex[:8]}"
    adapter = cls(dsn, min_size=6, max_size=6, application_name=name)
    await _call(adapter.connect())
    sync = isinstance(adapter, PostgresStorageAdapter)

    async def read_in_transaction(user_id: uuid.UUID) -> Any:
        if sync:
            with adapter.transaction() as tx:
                return tx.get_user(user_id)
        async with adapter.transaction() as tx:
            return await tx.get_user(user_id)

    async def work(tx: Any) -> Any:
        return await tx.get_user(user.id)

    try:
        user = await _call(adapter.create_user())
        await _call(adapter.pool.wait())
        assert _kill_by_name(dsn, name) == 6
        with pytest.raises(UnavailableError):
            await read_in_transaction(user.id)
        assert await read_in_transaction(user.id) == user
        await _call(adapter.pool.wait())
        assert _kill_by_name(dsn, name) == 6
        run = adapter.run_in_transaction(lambda tx: tx.get_user(user.id) if sync else work(tx))
        assert await _call(run) == user
    finally:
        await _call(adapter.disconnect())


async def test_a_savepoint_on_a_lost_connection_is_not_re_run_and_drains_once(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_in_transaction on a transaction's view re-runs nothing that could not begin: its
    savepoint cannot begin on a lost connection however often it is tried (it was tried
    max_retries more times, each draining the pool's fresh connections again)."""
    name = f"kpg-savepoint-{uuid.uuid4().hex[:8]}"
    adapter = AsyncPostgresStorageAdapter(dsn, min_size=4, max_size=4, application_name=name)
    await adapter.connect()
    drains: list[int] = []
    real = adapter.pool.drain

    async def counted() -> None:
        drains.append(1)
        await real()

    try:
        user = await adapter.create_user()
        await adapter.pool.wait()
        monkeypatch.setattr(adapter.pool, "drain", counted)
        with pytest.raises(UnavailableError):
            async with adapter.transaction() as tx:
                assert _kill_by_name(dsn, name) == 4

                async def work(inner: Any) -> Any:
                    return await inner.get_user(user.id)

                with pytest.raises(UnavailableError) as caught:
                    await tx.run_in_transaction(work)
                assert caught.value.code == "admin_shutdown"  # the cause, not a later attempt's
                raise caught.value
        assert drains == [1]
    finally:
        await adapter.disconnect()


def _kill_by_name(dsn: str, application_name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        return len(
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                [application_name],
            ).fetchall()
        )


async def test_callers_that_lose_their_connections_to_one_event_drain_once(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"kpg-once-{uuid.uuid4().hex[:8]}"
    adapter = AsyncPostgresStorageAdapter(dsn, min_size=4, max_size=4, application_name=name)
    await adapter.connect()
    try:
        user = await adapter.create_user()
        await adapter.pool.wait()
        drains: list[int] = []
        real = adapter.pool.drain

        async def counted() -> None:
            drains.append(1)
            await real()

        monkeypatch.setattr(adapter.pool, "drain", counted)
        assert _kill_by_name(dsn, name) == 4
        found = await asyncio.gather(*(adapter.get_user(user.id) for _ in range(4)))
        assert found == [user] * 4  # every one retried onto a fresh connection
        assert drains == [1]
    finally:
        await adapter.disconnect()


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_a_callers_pool_is_never_drained(
    dsn: str, cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replacing connections after a lost one is for pools the adapter made: a pool passed in
    is the caller's to manage (draining it would also retire the caller's own connections)."""
    name = f"kpg-own-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {"autocommit": True, "application_name": name}
    pool: Any
    if cls is PostgresStorageAdapter:
        pool = psycopg_pool.ConnectionPool(dsn, min_size=2, max_size=2, kwargs=settings, open=True)
    else:
        pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=2, max_size=2, kwargs=settings, open=False
        )
        await pool.open()
    drains: list[int] = []
    monkeypatch.setattr(pool, "drain", lambda: drains.append(1))
    adapter = cls(pool)
    try:
        await _call(adapter.connect())
        await _call(pool.wait())
        assert _kill_by_name(dsn, name) == 2
        with pytest.raises(UnavailableError):
            await _call(adapter.increment_two_factor_attempts(uuid.uuid4()))
        assert drains == []
    finally:
        await _call(adapter.disconnect())
        await _call(pool.close())


def test_errors_pickle_and_copy() -> None:
    """Errors cross process boundaries (multiprocessing, task queues) and get copied: every
    class rebuilds with its message and attributes, ValidationError's two-part constructor
    included."""
    import copy
    import pickle

    for error in (
        ValidationError("email", "must be an email address"),
        ConflictError("create_user: taken", code="unique_violation"),
        UnavailableError("lost", retryable=False),
    ):
        for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):  # noqa: S301
            assert type(again) is type(error)
            assert str(again) == str(error)
            assert again.__dict__ == error.__dict__
    unpickled = pickle.loads(pickle.dumps(ValidationError("email", "bad")))  # noqa: S301
    assert unpickled.field == "email"


def test_health_status_is_hashable_like_every_record() -> None:
    """Its dicts (pool figures, replica reports) are left out of the hash, as every record's
    JSON fields are, so a status can go into a set or serve as a cache key."""
    status = HealthStatus(
        status="ok",
        latency_ms=1.5,
        pool={"pool_size": 1},
        applied_migrations=("0001_core",),
        pending_migrations=(),
        replicas=({"dsn": "host=r1", "status": "ok"},),
    )
    assert hash(status) == hash(attrs.evolve(status, pool={"pool_size": 2}))
    assert len({status, attrs.evolve(status)}) == 1


def test_what_counts_as_a_lost_connection() -> None:
    """Only a closed or reset connection, or a server shutting down, makes the adapter replace
    its idle connections (and a migration report the database, not itself): not a pool
    timeout, and not a server-side failure such as lack of resources, which a fresh connection
    would not cure."""
    assert connection_lost(psycopg.OperationalError("server closed the connection"))
    assert connection_lost(psycopg.errors.AdminShutdown())
    assert connection_lost(psycopg.errors.ConnectionFailure())
    assert not connection_lost(psycopg.errors.DiskFull())
    assert not connection_lost(psycopg.errors.OutOfMemory())
    assert not connection_lost(psycopg_pool.PoolTimeout("timed out"))
    assert not connection_lost(psycopg_pool.TooManyRequests("too many waiting"))
    assert not connection_lost(psycopg_pool.PoolClosed("closed"))
    assert not connection_lost(psycopg.errors.UniqueViolation())
    lost = _migration_failure(psycopg.errors.AdminShutdown(), "migrations/0007_x.sql")
    assert isinstance(lost, UnavailableError)
    assert "migrations/0007_x.sql" in str(lost)
    full = _migration_failure(psycopg.errors.DiskFull("no space"), "migrations/0007_x.sql")
    assert isinstance(full, MigrationError)
    assert "migrations/0007_x.sql failed: no space" in str(full)


def test_retries_back_off_exponentially_up_to_two_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full jitter: a retry waits a random time up to its bound, which doubles from 50 ms and
    stops at 2 s (found by mutation testing: uncapped, the tenth retry could wait 25.6 s)."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    bounds = [_base.backoff(n) for n in range(1, _base.MAX_RETRIES + 1)]
    assert bounds[:3] == [0.05, 0.1, 0.2]
    assert bounds[-1] == max(bounds) == 2.0


def test_a_write_on_a_demoted_primary_is_retried() -> None:
    """After a failover the pool can still hold connections to the old primary, now a
    standby: a write that is safe to retry is retried on another connection (found by
    mutation testing: no test had a write meet read_only_sql_transaction)."""
    error = translate(psycopg.errors.ReadOnlySqlTransaction("read-only"), operation="op")
    assert isinstance(error, InternalError) and error.code == "read_only_sql_transaction"
    assert error.retryable and is_auto_retryable(error)


def test_a_not_null_violation_names_its_column(
    sync_adapter: PostgresStorageAdapter, dsn: str
) -> None:
    """A NULL the database refuses (a writer going around the adapter's checks) is a
    ValidationError naming the column PostgreSQL reports (found by mutation testing: no test
    met a not_null_violation)."""
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.NotNullViolation) as raised:
        conn.execute(
            "INSERT INTO kitium_auth.roles (id, org_id, name)"
            " VALUES (gen_random_uuid(), gen_random_uuid(), NULL)"
        )
    error = translate(raised.value, operation="create_role")
    assert isinstance(error, ValidationError) and error.field == "name"


def _answering(answers: list[Any], calls: list[str], asynchronous: bool) -> Any:
    """A stand-in for an adapter whose ``_one`` returns ``answers`` in turn."""

    def one(name: str, params: Any, cls: Any, *, retry: Retry) -> Any:
        calls.append(name)
        return answers.pop(0)

    async def one_async(name: str, params: Any, cls: Any, *, retry: Retry) -> Any:
        return one(name, params, cls, retry=retry)

    return types.SimpleNamespace(_one=one_async if asynchronous else one)


def _written(asynchronous: bool, adapter: Any) -> Any:
    if asynchronous:
        return asyncio.run(
            AsyncCore._written(adapter, "create_x", {}, dict, retry=Retry.SAFE, refused="why")
        )
    return Core._written(adapter, "create_x", {}, dict, retry=Retry.SAFE, refused="why")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_write_that_returns_no_row_runs_once_more(asynchronous: bool) -> None:
    """An idempotent write that returns no row (a retry whose snapshot predates the commit of
    the attempt whose acknowledgement was lost) runs once more, and only then reports its
    guard's refusal (found by mutation testing: no test reached the second run)."""
    calls: list[str] = []
    row = {"id": 1}
    assert _written(asynchronous, _answering([None, row], calls, asynchronous)) is row
    assert calls == ["create_x", "create_x"]
    calls.clear()
    with pytest.raises(NotFoundError, match="create_x: why"):
        _written(asynchronous, _answering([None, None], calls, asynchronous))
    assert calls == ["create_x", "create_x"]


async def test_creates_are_retried_without_duplicates(single: Any, dsn: str) -> None:
    _kill_kitium_backends(dsn)
    email = f"retry-{uuid.uuid4().hex[:8]}@example.com"
    user = await _call(single.create_user(email=email))
    assert await _call(single.get_user_by_email(email)) == user


async def test_statement_timeout_is_a_retryable_query_timeout(single: Any, dsn: str) -> None:
    user = await _call(single.create_user())
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT id FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        with pytest.raises(QueryTimeoutError) as caught:
            await _call(single.with_statement_timeout(200).update_user(user.id, name="x"))
        locker.rollback()
    assert caught.value.retryable is True
    assert isinstance(caught.value.__cause__, psycopg.errors.QueryCanceled)
    assert (await _call(single.update_user(user.id, name="y"))).name == "y"


async def test_async_tests_run_on_the_event_loop_the_run_asks_for(
    async_adapter: AsyncPostgresStorageAdapter,
) -> None:
    """``KITIUM_PG_TEST_LOOP=uvloop`` (a CI step) runs every async test and fixture on uvloop:
    this fails if such a run fell back to asyncio's loop, or a default run did not use it."""
    loop = asyncio.get_running_loop()
    assert type(loop).__module__.partition(".")[0] == event_loop_wanted()
    # The shared adapter's pool works on that loop. Not health_check(), which reports a
    # connection an earlier test's backend kill left dead instead of retrying.
    user = await async_adapter.create_user()
    assert await async_adapter.get_user(user.id) == user


def test_property_tests_try_the_examples_the_run_asks_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """``KITIUM_PG_TEST_EXAMPLES`` multiplies every property test's examples (CI's PostgreSQL 15
    and uvloop runs ask for 4): the settings the hostile-input tests built at import, and the
    default for tests without settings, follow this run's value; a malformed value is a usage
    error."""
    scale = examples(1)
    assert HYPOTHESIS.max_examples == 25 * scale
    if scale > 1:  # otherwise the default is whatever profile the run loaded (100 unless told)
        assert settings().max_examples == 100 * scale
    monkeypatch.setenv(EXAMPLES_ENV, "4")
    assert examples(25) == 100
    monkeypatch.delenv(EXAMPLES_ENV)
    assert examples(25) == 25
    for bad in ("0", "-1", "x", "\u00b2", "1.5", "10000", " 2", "4\n"):
        monkeypatch.setenv(EXAMPLES_ENV, bad)
        with pytest.raises(pytest.UsageError, match=EXAMPLES_ENV):
            examples(25)


async def test_a_cancelled_call_with_a_setting_writes_nothing_and_frees_its_connection(
    async_single: AsyncPostgresStorageAdapter, dsn: str
) -> None:
    """A task cancelled while its call (with a per-call setting: a transaction of its own)
    waits on a lock returns at once, with the lock still held; the write is rolled back, and
    the pool's only connection comes back idle and serves the next call."""
    user = await async_single.create_user()
    view = async_single.with_statement_timeout(30_000)
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT id FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        task = asyncio.create_task(view.update_user(user.id, name="cancelled"))
        while not waiting_on_a_lock(dsn):  # noqa: ASYNC110 - the server is polled
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert waiting_on_a_lock(dsn) is False  # the statement was cancelled on the server too
        locker.rollback()
    assert (await view.get_user(user.id)) == user  # name unchanged
    assert async_single.pool.get_stats()["pool_available"] == 1
    assert (await view.update_user(user.id, name="after")).name == "after"


@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_a_timeout_given_with_a_callers_pool_applies(
    dsn: str, cls: type, autocommit: bool
) -> None:
    """The adapter sets its timeout when it opens a connection, which it does not do for a
    caller's pool: a given timeout was silently ignored there (a call waited on a lock for
    ever). It now applies per call, each call in a transaction of its own, which commits (also
    on a pool that is not in autocommit mode, where psycopg opens the transaction itself: no
    second BEGIN, whose warning would be a notice); the pool's connections are left as they
    were."""
    notices: list[str] = []

    def listen(conn: Any) -> None:
        conn.add_notice_handler(lambda notice: notices.append(notice.message_primary))

    async def listen_async(conn: Any) -> None:
        listen(conn)

    options: dict[str, Any] = {"min_size": 1, "max_size": 2, "open": False}
    options["kwargs"] = {"autocommit": autocommit}
    pool: Any
    if cls is PostgresStorageAdapter:
        pool = psycopg_pool.ConnectionPool(dsn, configure=listen, **options)
    else:
        pool = psycopg_pool.AsyncConnectionPool(dsn, configure=listen_async, **options)
    await _call(pool.open(wait=True))
    timed = cls(pool, statement_timeout_ms=200)
    try:
        await _call(timed.connect())
        user = await _call(timed.create_user())
        with psycopg.connect(dsn) as other:
            found = other.execute("SELECT id FROM kitium_auth.users WHERE id = %s", [user.id])
            assert found.fetchone() == (user.id,)
        assert (await _call(timed.get_user(user.id))) == user
        assert notices == []
        with psycopg.connect(dsn) as locker:
            locker.execute("SELECT id FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
            with pytest.raises(QueryTimeoutError):
                await _call(timed.update_user(user.id, name="x"))
            locker.rollback()
        conn = await _call(pool.getconn())
        try:
            assert conn.autocommit is autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            shown = await _call((await _call(conn.execute("SHOW statement_timeout"))).fetchone())
            assert shown == ("0",)
        finally:
            await _call(pool.putconn(conn))
    finally:
        await _call(pool.close())


def test_a_timeout_for_a_callers_pool_costs_nothing_on_a_replica(dsn: str) -> None:
    """The replicas' pools are the adapter's own, with the timeout as a startup option: a
    timeout given for a caller's primary pool must not add the per-call round trip there."""
    pool = psycopg_pool.ConnectionPool(
        dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False
    )
    pool.open(wait=True)
    adapter = PostgresStorageAdapter(pool, statement_timeout_ms=3000, replica_dsn=dsn, max_size=1)
    try:
        adapter.connect()
        user = adapter.create_user(email=f"{uuid.uuid4().hex}@example.com")
        assert adapter.get_user(user.id) == user  # opens the replica's connection
        [replica] = adapter._replicas
        with tempfile.TemporaryFile("w+") as out:
            with replica.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
                assert conn.execute("SHOW statement_timeout").fetchone() == ("3s",)
            assert adapter.get_user(user.id) == user
            with replica.connection() as conn:
                conn.pgconn.untrace()
            out.seek(0)
            assert count(out.read()) == 2  # the SHOW above, and the read: one round trip
    finally:
        adapter.disconnect()
        pool.close()


def test_pool_exhaustion_is_unavailable(sync_single: PostgresStorageAdapter) -> None:
    user = sync_single.create_user()
    with sync_single.pool.connection(), pytest.raises(UnavailableError) as caught:
        sync_single.get_user(user.id)  # the only connection is held by the with above
    assert caught.value.code == "pool_timeout" and caught.value.retryable


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_connections_the_pool_closed_are_freed_with_their_reused_cursor(
    dsn: str, cls: type, caplog: pytest.LogCaptureFixture
) -> None:
    """Each pooled connection keeps one cursor for the adapter's calls. A connection the pool
    has closed (idle shrink, max_lifetime, a drain, a restart) must be freed, and with it its
    cursor's last result rows: a registry of cursors keyed by connection kept them all."""
    # The pool's "discarding closed connection" warning carries the connection, and the
    # captured record would keep it alive.
    caplog.set_level(logging.ERROR, logger="psycopg.pool")
    adapter = cls(dsn, min_size=1, max_size=1)
    await _call(adapter.connect())
    closed: list[weakref.ref[Any]] = []
    try:
        for _ in range(5):
            assert await _call(adapter.get_user(uuid.uuid4())) is None  # fills the cursor
            conn = await _call(adapter.pool.getconn())
            closed.append(weakref.ref(conn))
            await _call(conn.close())
            await _call(adapter.pool.putconn(conn))  # the pool replaces a closed connection
            del conn
        assert await _call(adapter.get_user(uuid.uuid4())) is None
        gc.collect()
        assert [ref() for ref in closed] == [None] * 5
    finally:
        await _call(adapter.disconnect())


def _socket_appearing_later(dsn: str, tmp_path: Path) -> tuple[str, Callable[[], None]]:
    """A DSN for the test server through a socket folder that is empty until the returned
    function links the server's socket into it (skips for a server not on a Unix socket)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    socket_dir = Path(str(params.get("host", "")))
    if not socket_dir.is_dir():
        # KITIUM_PG_TEST_DSN over TCP: no socket folder to make appear later.
        pytest.skip("the test server is not on a Unix socket")
    name = f".s.PGSQL.{params.get('port', 5432)}"
    later = tmp_path / "sock"
    later.mkdir()
    return psycopg.conninfo.make_conninfo(dsn, host=str(later)), lambda: (later / name).symlink_to(
        socket_dir / name
    )


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_connect_can_be_retried_once_the_database_is_up(
    dsn: str, cls: type, tmp_path: Path
) -> None:
    """A service often starts before its database. The first connect() raises a retryable
    error, and a later one on the same adapter must work: psycopg-pool closes a pool whose
    open(wait=True) times out, and the adapter then refused every connect() for good."""
    later_dsn, server_appears = _socket_appearing_later(dsn, tmp_path)
    adapter = cls(later_dsn, connect_timeout=1.0)
    try:
        with pytest.raises(UnavailableError) as caught:
            await _call(adapter.connect(migrate=False))
        assert caught.value.retryable is True
        server_appears()
        # As a supervisor would: the pool reconnects on its own back-off schedule (1 s, 2 s,
        # 4 s... between attempts), so a retry may come before its next attempt.
        refusals: list[UnavailableError] = []
        for _ in range(10):
            try:
                await _call(adapter.connect())
                break
            except UnavailableError as again:
                refusals.append(again)
        assert await _call(adapter.get_user(uuid.uuid4())) is None
        assert all(r.retryable and "not reconnected yet" in str(r) for r in refusals)
    finally:
        await _call(adapter.disconnect())


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_a_failed_with_block_leaves_nothing_connecting(cls: type) -> None:
    adapter = cls("postgresql://kitium@127.0.0.1:1/nodb", connect_timeout=1.0)
    with pytest.raises(UnavailableError):
        if cls is PostgresStorageAdapter:
            with adapter:
                pass
        else:
            async with adapter:
                pass
    assert adapter.pool.closed


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_what_the_dsn_sets_is_kept(dsn: str, cls: type) -> None:
    """psycopg's keyword arguments replace DSN parameters: the adapter's startup options
    threw away the DSN's (a read-only DSN wrote) and its application_name the DSN's."""
    await _call(cls(dsn, max_size=1).connect())  # migrated, by a writable adapter
    read_only = psycopg.conninfo.make_conninfo(
        dsn,
        application_name="billing-api",
        options=(
            "-c default_transaction_read_only=on -c lock_timeout=1234"
            r" -c default_transaction_isolation=repeatable\ read"
        ),
    )
    adapter = cls(read_only, max_size=1, statement_timeout_ms=4321)
    await _call(adapter.connect(migrate=False))
    try:
        with pytest.raises(KitiumPgError) as refused:
            await _call(adapter.create_user())
        assert refused.value.code == "read_only_sql_transaction"
        conn = await _call(adapter.pool.getconn())
        try:
            settings = await _call(
                conn.execute(
                    "SELECT current_setting('application_name'), current_setting('lock_timeout'),"
                    " current_setting('statement_timeout'), current_setting('TimeZone'),"
                    " current_setting('default_transaction_isolation')"
                )
            )
            # The adapter's own settings win: its guarded statements need READ COMMITTED.
            assert await _call(settings.fetchone()) == (
                "billing-api",
                "1234ms",
                "4321ms",
                "UTC",
                "read committed",
            )
        finally:
            await _call(adapter.pool.putconn(conn))
    finally:
        await _call(adapter.disconnect())


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_a_disconnected_adapter_says_it_cannot_reconnect(dsn: str, cls: type) -> None:
    adapter = cls(dsn, max_size=1)
    await _call(adapter.connect(migrate=False))
    await _call(adapter.disconnect())
    with pytest.raises(UnavailableError) as caught:
        await _call(adapter.connect(migrate=False))
    # Not retryable: a supervisor retrying it would retry forever.
    assert caught.value.retryable is False
    assert "create a new adapter" in str(caught.value)
    # A call on it, the same (found by mutation testing: no test called a closed adapter).
    with pytest.raises(UnavailableError) as called:
        await _call(adapter.get_user(uuid.uuid4()))
    assert (called.value.code, called.value.retryable) == ("pool_closed", False)


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_an_empty_pool_still_checks_the_database_on_connect(cls: type) -> None:
    """With ``min_size=0`` the pool opens without a connection; connect() tries one anyway, so
    an unreachable database is reported there and not at the first call."""
    adapter = cls("postgresql://kitium@127.0.0.1:1/nodb", min_size=0, connect_timeout=1.0)
    try:
        with pytest.raises(UnavailableError, match="cannot connect"):
            await _call(adapter.connect(migrate=False))
    finally:
        await _call(adapter.disconnect())


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_the_diagnosis_after_a_pool_timeout_waits_briefly(
    cls: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the pool gave up after ``connect_timeout``, the direct attempt that finds out why
    must not wait as long again (it doubled the wait for a host that never answers)."""
    seen: list[Any] = []
    connection = psycopg.Connection if cls is PostgresStorageAdapter else psycopg.AsyncConnection
    real = connection.connect

    def spy(conninfo: str, **kwargs: Any) -> Any:
        seen.append(kwargs.get("connect_timeout"))
        return real(conninfo, **kwargs)

    monkeypatch.setattr(connection, "connect", spy)
    adapter = cls("postgresql://kitium@127.0.0.1:1/nodb", min_size=1, connect_timeout=30.0)
    monkeypatch.setattr(adapter.pool, "open", _give_up)
    try:
        with pytest.raises(UnavailableError):
            await _call(adapter.connect(migrate=False))
    finally:
        await _call(adapter.disconnect())
    assert seen == [2]
    # An empty pool is checked at connect() the same way: the pool's own attempts get the
    # whole timeout, then the diagnosis the brief one.
    seen.clear()
    empty = cls("postgresql://kitium@127.0.0.1:1/nodb", min_size=0, connect_timeout=3.0)
    try:
        with pytest.raises(UnavailableError):
            await _call(empty.connect(migrate=False))
    finally:
        await _call(empty.disconnect())
    assert seen[-1] == 2 and set(seen[:-1]) == {3}


def _give_up(*args: Any, **kwargs: Any) -> Any:
    # The pool's open() after its connect_timeout: raises at once here.
    raise psycopg_pool.PoolTimeout("pool initialization incomplete")


def test_an_unreachable_database_is_unavailable_and_the_password_stays_hidden() -> None:
    storage = PostgresStorageAdapter(
        "postgresql://kitium:s3cret-pw@127.0.0.1:1/nodb", connect_timeout=1.0
    )
    assert "s3cret-pw" not in repr(storage)
    with pytest.raises(UnavailableError) as caught:
        storage.connect()
    assert "s3cret-pw" not in str(caught.value)
    # The cause, then libpq's hint (the hint alone dropped the cause).
    assert str(caught.value).endswith(
        ": Connection refused (Is the server running on that host and accepting TCP/IP"
        " connections?)"
    )
    storage.disconnect()


@pytest.mark.parametrize(
    ("sqlstate", "level"),
    [
        ("23505", logging.INFO),  # a taken address: an answer to the caller
        ("23503", logging.INFO),
        ("23514", logging.INFO),
        ("23P01", logging.INFO),
        ("40P01", logging.WARNING),  # a deadlock is a lock-order fault, not the caller's input
        ("40001", logging.WARNING),
        ("23502", logging.WARNING),
        ("22012", logging.WARNING),
        ("42704", logging.WARNING),
        ("57014", logging.WARNING),
        ("57P01", logging.WARNING),
    ],
)
def test_a_refusal_of_the_callers_input_is_logged_at_info_and_a_fault_at_warning(
    sqlstate: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    cause = psycopg.errors.lookup(sqlstate)("refused")
    error = translate(cause, operation="create_user")
    with caplog.at_level(logging.DEBUG, logger="kitium_pg"):
        log_call("create_user", 0.0, 1, error, cause)
    [record] = [r for r in caplog.records if r.name == "kitium_pg"]
    assert record.levelno == level, error.code


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            'connection is bad: connection to server on socket "/x/.s.PGSQL.5432" failed: No such'
            " file or directory\n\tIs the server running locally and accepting connections on"
            " that socket?",
            "No such file or directory (Is the server running locally and accepting connections"
            " on that socket?)",
        ),
        (
            'connection failed: connection to server at "h", port 5432 failed: FATAL:  password'
            ' authentication failed for user "app"',
            'FATAL:  password authentication failed for user "app"',
        ),
        (
            'connection failed: connection to server at "b", port 1 failed: Connection refused\n'
            "\tIs the server running on that host and accepting TCP/IP connections?\n"
            "Multiple connection attempts failed. All failures were:\n- host: 'a', port: '1'",
            "Connection refused (Is the server running on that host and accepting TCP/IP"
            " connections?)",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 3 failed: Connection'
            " refused\n\tIs the server running on that host and accepting TCP/IP connections?\n"
            "Multiple connection attempts failed. All failures were:\n"
            "- host: '/nonexistent', port: '5432', hostaddr: None: connection is bad: connection"
            ' to server on socket "/nonexistent/.s.PGSQL.5432" failed: No such file or'
            " directory\n\tIs the server running locally and accepting connections on that"
            " socket?\n- host: '127.0.0.1', port: '3', hostaddr: '127.0.0.1': connection failed:"
            ' connection to server at "127.0.0.1", port 3 failed: Connection refused\n\tIs the'
            " server running on that host and accepting TCP/IP connections?",
            "No such file or directory (host '/nonexistent', port '5432'); Connection refused"
            " (host '127.0.0.1', port '3')",
        ),
        (
            'connection failed: connection to server at "10.0.0.3", port 1 failed: timeout\n'
            "Multiple connection attempts failed. All failures were:\n"
            "- host: \"o'db\", port: '1', hostaddr: '10.0.0.2': connection failed: connection"
            ' to server at "10.0.0.2", port 1 failed: Connection refused\n'
            "- host: \"o'db\", port: '1', hostaddr: '10.0.0.3': connection failed: connection"
            ' to server at "10.0.0.3", port 1 failed: timeout',
            "Connection refused (host \"o'db\", port '1', hostaddr '10.0.0.2'); timeout (host"
            " \"o'db\", port '1', hostaddr '10.0.0.3')",
        ),
        ("timeout expired", "timeout expired"),
        ("", ""),
    ],
)
def test_a_connection_failure_names_its_cause_and_libpqs_hint(message: str, reason: str) -> None:
    assert connect_failure(message) == reason


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_size": 0}, "max_size"),
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"statement_timeout_ms": -1}, "statement_timeout_ms"),
        ({"schema": "Robert'); DROP TABLE users;--"}, "schema"),
        ({"max_retries": True}, "max_retries"),
    ],
)
def test_bad_settings_are_validation_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        PostgresStorageAdapter("postgresql://localhost/x", **kwargs)
    assert caught.value.field == field


async def test_sixteen_concurrent_signups_with_one_email_make_one_user(
    storage: Any, email: str
) -> None:
    variants = [
        "".join(c.upper() if (i >> n) & 1 else c for n, c in enumerate(email)) for i in range(16)
    ]
    results = await race_each(storage, "create_user", [((), {"email": e}) for e in variants])
    users = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, ConflictError)]
    assert (len(users), len(conflicts)) == (1, 15), results
    assert await storage.get_user_by_email(email) == users[0]


async def test_logs_never_contain_parameters_or_secrets(
    storage: Any, caplog: pytest.LogCaptureFixture, email: str
) -> None:
    secret_hash = f"$argon2id$secret-{uuid.uuid4().hex}"
    with caplog.at_level(logging.DEBUG, logger="kitium_pg"):
        user = await storage.create_user(email=email, password_hash=secret_hash)
        await storage.get_password_hash(user.id)
        await storage.get_user_by_email(email)
        with pytest.raises(ConflictError):
            await storage.create_user(email=email, password_hash=secret_hash)
    records = [r for r in caplog.records if r.name == "kitium_pg"]
    assert any(getattr(r, "operation", None) == "create_user" for r in records)
    # A taken address is an answer to the caller, logged at INFO, not a fault (WARNING).
    [conflict] = [r for r in records if getattr(r, "sqlstate", None) == "23505"]
    assert conflict.levelno == logging.INFO
    for record in records:
        text = record.getMessage() + repr(record.__dict__)
        for secret in (secret_hash, email, str(user.id)):
            assert secret not in text


async def test_a_statement_the_transaction_timeout_ends_is_a_query_timeout(
    storage: Any, dsn: str
) -> None:
    """A statement that outlives transaction_timeout (PostgreSQL 17+; set on a role or in a
    DSN's options), here waiting for a row lock, ends with the server closing the connection
    (SQLSTATE 25P04): ``QueryTimeoutError`` (code ``transaction_timeout``), not the catch-all
    ``InternalError`` it was."""
    user = await storage.create_user()
    with psycopg.connect(dsn) as holder:
        if holder.info.server_version < 170000:
            pytest.skip("transaction_timeout is PostgreSQL 17's")
        holder.execute("SELECT FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        limited = psycopg.conninfo.make_conninfo(dsn, options="-c transaction_timeout=300ms")
        async with open_adapter(storage.kind, limited, migrate=False) as own:
            with pytest.raises(QueryTimeoutError) as raised:
                await own.update_user(user.id, name="waits")
    assert raised.value.code == "transaction_timeout"


async def test_a_date_style_other_than_iso_is_set_or_refused(
    storage: Any, dsn: str, email: str
) -> None:
    """Found in review: psycopg reads dates and times in ISO only, and under another DateStyle
    (the server's, the role's or the DSN's) every record with a timestamp failed to load, with
    psycopg's NotImplementedError, after a write had committed. The adapter sets ISO on the
    connections it opens directly; behind PgBouncer, where it sends no startup options,
    ``connect()`` refuses such a server with ``ValidationError`` naming ``dsn``."""
    sql_style = psycopg.conninfo.make_conninfo(dsn, options="-c DateStyle=SQL,DMY")
    async with open_adapter(storage.kind, sql_style, migrate=False) as own:
        user = await own.create_user(email=email)
        stored = await own.get_user(user.id)
        assert stored is not None and stored.created_at == user.created_at
    if storage.kind == "sync":
        sync = PostgresStorageAdapter(sql_style, pgbouncer=True)
        try:
            with pytest.raises(ValidationError) as refused:
                sync.connect(migrate=False)
        finally:
            sync.disconnect()
    else:
        adapter = AsyncPostgresStorageAdapter(sql_style, pgbouncer=True)
        try:
            with pytest.raises(ValidationError) as refused:
                await adapter.connect(migrate=False)
        finally:
            await adapter.disconnect()
    assert refused.value.field == "dsn" and "DateStyle" in str(refused.value)

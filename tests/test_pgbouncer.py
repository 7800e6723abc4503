"""Behind a real PgBouncer in transaction pooling mode (tests/fix_pgbouncer.py).

With ``pgbouncer=True`` the adapters keep no session state: many more clients than server
connections work (no prepared statement crosses a server connection), and the statement
timeout is applied per transaction, so it is enforced and does not leak into the shared server
connection. Without it, the startup ``options`` the adapter sends by default is refused by
PgBouncer, and ``connect()`` fails with a clear ``UnavailableError``. Migrations run on the
direct connection (``dsn``) first, as docs/scaling.md asks.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    MigrationError,
    PostgresStorageAdapter,
    QueryTimeoutError,
    UnavailableError,
)

from .conftest import TEST_KEYS
from .fix_pgbouncer import PgBouncer
from .fix_proxy import CuttingProxy

SERVER_CONNECTIONS = 2
ROLE_TIMEOUT_MS = 200


@pytest.fixture(scope="module")
def app_role(dsn: str) -> Iterator[str]:
    """A login role with the adapter's runtime grants and a role-level statement timeout
    (``ALTER ROLE ... SET statement_timeout``): the alternative to the per-call setting."""
    role = f"kitium_pgb_{uuid.uuid4().hex[:8]}"
    with PostgresStorageAdapter(dsn, max_size=1, encryption_keys=TEST_KEYS) as owner:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {role} LOGIN".encode())
            admin.execute(
                f"ALTER ROLE {role} SET statement_timeout = '{ROLE_TIMEOUT_MS}ms'".encode()
            )
        owner.grant_app_role(role)
    yield role
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP OWNED BY {role}".encode())
        admin.execute(f"DROP ROLE {role}".encode())


@pytest.fixture(scope="module")
def bouncer(
    dsn: str, app_role: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncer]:
    """PgBouncer with a pool of two server connections per user; the schema is migrated on
    the direct connection first (the ``app_role`` fixture does it)."""
    with PgBouncer(
        dsn,
        Path(tmp_path_factory.mktemp("bouncer")),
        pool_size=SERVER_CONNECTIONS,
        users=(app_role,),
        extra="admin_users = postgres\n",
    ) as running:
        yield running


def _admin_console(bouncer: PgBouncer) -> psycopg.Connection[dict[str, Any]]:
    """A connection to PgBouncer's admin console, rows as dicts. The console speaks the simple
    query protocol only: never prepare."""
    return psycopg.connect(
        make_conninfo(bouncer.dsn, dbname="pgbouncer"),
        autocommit=True,
        prepare_threshold=None,
        row_factory=dict_row,
    )


class PoolWatch:
    """Samples PgBouncer's ``SHOW POOLS`` (admin console) in a thread: the most clients and
    the most server connections seen at once for the application database."""

    def __init__(self, bouncer: PgBouncer) -> None:
        self._admin = _admin_console(bouncer)
        self.clients = 0
        self.servers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="pool-watch", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for row in self._admin.execute("SHOW POOLS").fetchall():
                if row["database"] != "postgres":
                    continue
                self.clients = max(self.clients, row["cl_active"] + row["cl_waiting"])
                servers = sum(row[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_login"))
                self.servers = max(self.servers, servers)
            time.sleep(0.005)

    def __enter__(self) -> PoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._admin.close()


async def test_many_clients_share_two_server_connections(bouncer: PgBouncer) -> None:
    sync = PostgresStorageAdapter(
        bouncer.dsn, min_size=8, max_size=8, pgbouncer=True, encryption_keys=TEST_KEYS
    )
    async_ = AsyncPostgresStorageAdapter(
        bouncer.dsn, min_size=12, max_size=12, pgbouncer=True, encryption_keys=TEST_KEYS
    )
    sync.connect(migrate=False)
    await async_.connect(migrate=False)
    rounds = 6  # above prepare_threshold's default (5): psycopg would have prepared by now

    def sync_worker(n: int) -> int:
        done = 0
        for _ in range(rounds):
            user = sync.create_user(email=f"pgb-sync-{n}-{uuid.uuid4().hex[:8]}@example.com")
            assert sync.get_user(user.id) == user
            assert sync.get_user_by_email(user.email or "") == user
            done += 3
        return done

    async def async_worker(n: int) -> int:
        done = 0
        for _ in range(rounds):
            user = await async_.create_user(email=f"pgb-async-{n}-{uuid.uuid4().hex[:8]}@x.org")
            assert await async_.get_user(user.id) == user
            async with async_.transaction() as tx:
                assert await tx.get_user_by_email(user.email or "") == user
                await tx.update_user(user.id, plan="team")
            done += 4
        return done

    threads = ThreadPoolExecutor(8)
    try:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        with PoolWatch(bouncer) as watch:
            done = await asyncio.gather(
                *(loop.run_in_executor(threads, sync_worker, n) for n in range(8)),
                *(async_worker(n) for n in range(16)),
            )
            calls = sum(done)
        took = time.perf_counter() - started
        health = await async_.health_check()
        # Every call has returned and 20 client connections sit idle in their pools: none may
        # still hold a server connection (a stray Flush would leave one linked; see
        # test_a_client_slow_after_each_sync_leaves_no_server_connection_linked).
        linked = _linked_servers(bouncer)
    finally:
        # Off the event loop: a sync worker still at work when a task failed may wait for a
        # server connection an async client holds, and that client needs the loop to go on.
        await asyncio.to_thread(threads.shutdown)
        sync.disconnect()
        await async_.disconnect()
    print(
        f"pgbouncer: {calls} calls in {took:.2f} s from {watch.clients} client connections"
        f" over at most {watch.servers} server connections"
    )
    assert calls == 8 * rounds * 3 + 16 * rounds * 4
    assert watch.clients > SERVER_CONNECTIONS * 5
    assert 1 <= watch.servers <= SERVER_CONNECTIONS
    assert health.status == "ok", health.error
    assert linked == []


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_statement_timeout_is_enforced_through_pgbouncer(
    bouncer: PgBouncer, dsn: str, kind: str
) -> None:
    options: dict[str, Any] = {"max_size": 2, "pgbouncer": True, "statement_timeout_ms": 200}
    with PostgresStorageAdapter(dsn, max_size=1) as direct:
        locked = direct.create_user()
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT id FROM kitium_auth.users WHERE id = %s FOR UPDATE", [locked.id])
        started = time.perf_counter()
        if kind == "sync":
            sync = PostgresStorageAdapter(bouncer.dsn, **options)
            sync.connect(migrate=False)
            try:
                with pytest.raises(QueryTimeoutError) as caught:
                    sync.update_user(locked.id, name="blocked")
                with pytest.raises(QueryTimeoutError):
                    sync.with_statement_timeout(100).update_user(locked.id, name="blocked")
            finally:
                sync.disconnect()
        else:
            adapter = AsyncPostgresStorageAdapter(bouncer.dsn, **options)
            await adapter.connect(migrate=False)
            try:
                with pytest.raises(QueryTimeoutError) as caught:
                    await adapter.update_user(locked.id, name="blocked")
                with pytest.raises(QueryTimeoutError):
                    async with adapter.with_statement_timeout(100).transaction() as tx:
                        await tx.update_user(locked.id, name="blocked")
            finally:
                await adapter.disconnect()
        took = time.perf_counter() - started
        locker.rollback()
    assert caught.value.code == "statement_timeout"
    assert took < 3.0, f"two timed-out updates took {took:.2f} s"
    # The timeout was transaction-local: the server connections PgBouncer hands to the next
    # client carry the server default again.
    for _ in range(SERVER_CONNECTIONS * 2):
        with psycopg.connect(bouncer.dsn, prepare_threshold=None, autocommit=True) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)


async def test_a_role_level_timeout_saves_the_per_call_setting(
    bouncer: PgBouncer, app_role: str, dsn: str
) -> None:
    """``statement_timeout_ms=0`` plus ``ALTER ROLE ... SET statement_timeout``: enforced
    through PgBouncer without the pipelined ``set_config`` (and its extra round trip) that
    ``pgbouncer=True`` otherwise adds to every call. Latencies printed for docs/scaling.md."""
    per_call = AsyncPostgresStorageAdapter(bouncer.dsn, max_size=1, pgbouncer=True)
    role_level = AsyncPostgresStorageAdapter(
        make_conninfo(bouncer.dsn, user=app_role),
        max_size=1,
        pgbouncer=True,
        statement_timeout_ms=0,
    )
    await per_call.connect(migrate=False)
    await role_level.connect(migrate=False)
    try:
        user = await per_call.create_user()
        timings: dict[str, list[float]] = {"per-call set_config": [], "role-level": []}
        for _ in range(6):
            for name, adapter in (("per-call set_config", per_call), ("role-level", role_level)):
                for _ in range(50):
                    began = time.perf_counter()
                    assert await adapter.get_user(user.id) == user
                    timings[name].append((time.perf_counter() - began) * 1000)
        with psycopg.connect(dsn) as locker:
            locker.execute("SELECT 1 FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
            started = time.perf_counter()
            with pytest.raises(QueryTimeoutError):
                await role_level.update_user(user.id, name="blocked")
            took = time.perf_counter() - started
            locker.rollback()
    finally:
        await per_call.disconnect()
        await role_level.disconnect()
    print(
        "pgbouncer: get_user median "
        + ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in timings.items())
        + f"; role-level timeout fired after {took:.2f} s"
    )
    assert ROLE_TIMEOUT_MS / 1000 <= took < 3.0


async def test_without_pgbouncer_flag_the_startup_options_are_refused(
    bouncer: PgBouncer, caplog: pytest.LogCaptureFixture
) -> None:
    # What PgBouncer answers to the adapter's default connection options.
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(bouncer.dsn, options="-c statement_timeout=5000").close()
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    sync = PostgresStorageAdapter(bouncer.dsn, connect_timeout=1.0)
    started = time.perf_counter()
    try:
        with pytest.raises(UnavailableError, match="cannot connect to") as caught:
            sync.connect(migrate=False)
    finally:
        sync.disconnect()
    async_ = AsyncPostgresStorageAdapter(bouncer.dsn, connect_timeout=1.0)
    try:
        with pytest.raises(UnavailableError, match="cannot connect to"):
            await async_.connect(migrate=False)
    finally:
        await async_.disconnect()
    assert time.perf_counter() - started < 5.0
    assert caught.value.retryable is True
    # The pool's own log says why too (the error's message does: see the next test).
    assert "unsupported startup parameter: options" in caplog.text


async def test_the_refusal_reason_is_in_the_error(bouncer: PgBouncer) -> None:
    adapter = AsyncPostgresStorageAdapter(bouncer.dsn, connect_timeout=1.0)
    try:
        with pytest.raises(UnavailableError) as caught:
            await adapter.connect(migrate=False)
    finally:
        await adapter.disconnect()
    assert "unsupported startup parameter: options" in str(caught.value)


async def test_migrating_through_pgbouncer_is_refused_with_the_way_out(bouncer: PgBouncer) -> None:
    # A schema nothing was applied to: every migration is pending.
    schema = f"pgb_{uuid.uuid4().hex[:12]}"
    adapter = AsyncPostgresStorageAdapter(bouncer.dsn, pgbouncer=True, schema=schema)
    try:
        with pytest.raises(MigrationError, match="direct connection"):
            await adapter.connect()  # migrate=True by default
    finally:
        await adapter.disconnect()


async def test_connecting_through_pgbouncer_to_a_migrated_schema_only_reads_the_ledger(
    bouncer: PgBouncer,
) -> None:
    # The schema the bouncer's database was migrated to directly: nothing is pending, so the
    # default connect() (which migrates) succeeds without running DDL through the pooler.
    adapter = AsyncPostgresStorageAdapter(bouncer.dsn, pgbouncer=True, encryption_keys=TEST_KEYS)
    try:
        await adapter.connect()
        assert (await adapter.migration_status()).pending == ()
    finally:
        await adapter.disconnect()


def _linked_servers(bouncer: PgBouncer) -> list[str]:
    """PgBouncer's server connections that are linked to a client (``SHOW SERVERS``)."""
    with _admin_console(bouncer) as admin:
        rows = admin.execute("SHOW SERVERS").fetchall()
    return [f"{row['ptr']} linked to {row['link']}" for row in rows if row["link"]]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_client_slow_after_each_sync_leaves_no_server_connection_linked(
    dsn: str, tmp_path: Path, kind: str
) -> None:
    """PgBouncer frees a server connection when the server reports the transaction over; a
    message the client sends after that needs a server connection again, and a bare Flush,
    which gets no answer, keeps it linked to the client until the client's next statement:
    with the client idle in its pool, that server is lost to everyone else. A ``pgbouncer=True``
    call sends nothing there (tests/test_round_trips.py counts it in the trace); here a proxy
    holds back whatever a client sends after each Sync, so a message sent there would arrive
    late, every time. With one server connection: after the slow client's calls, no server
    connection is linked, and another client's call gets one."""
    pause = 0.3
    options: dict[str, Any] = {"max_size": 1, "pgbouncer": True, "encryption_keys": TEST_KEYS}
    with (
        PgBouncer(
            dsn, tmp_path, pool_size=1, extra="admin_users = postgres\nquery_wait_timeout = 5\n"
        ) as bouncer,
        CuttingProxy(bouncer.dsn, pause_after_sync=pause) as slow_path,
    ):
        if kind == "sync":
            with PostgresStorageAdapter(slow_path.dsn, **options) as slow:
                user = slow.create_user()
                assert slow.get_user(user.id) == user
                await asyncio.sleep(pause * 3)  # what the proxy held back has reached PgBouncer
                assert _linked_servers(bouncer) == []
                with PostgresStorageAdapter(bouncer.dsn, **options) as other:
                    assert other.get_user(user.id) == user
        else:
            async with AsyncPostgresStorageAdapter(slow_path.dsn, **options) as slow_async:
                user = await slow_async.create_user()
                assert await slow_async.get_user(user.id) == user
                await asyncio.sleep(pause * 3)
                assert _linked_servers(bouncer) == []
                async with AsyncPostgresStorageAdapter(bouncer.dsn, **options) as other_async:
                    assert await other_async.get_user(user.id) == user


def test_statement_pooling_takes_single_calls_without_a_per_call_setting(
    dsn: str, tmp_path: Path
) -> None:
    """docs/scaling.md: statement pooling refuses every transaction block, so a call with the
    per-call statement timeout (a transaction of its own) and ``transaction()`` fail with
    ``UnavailableError`` (PgBouncer closes the connection); with ``statement_timeout_ms=0``
    single calls carry no transaction block and work."""
    with PgBouncer(dsn, tmp_path, pool_size=1, pool_mode="statement") as bouncer:
        per_call = PostgresStorageAdapter(
            bouncer.dsn, max_size=1, pgbouncer=True, encryption_keys=TEST_KEYS, max_retries=0
        )
        per_call.connect(migrate=False)
        try:
            with pytest.raises(UnavailableError):
                per_call.create_user()
        finally:
            per_call.disconnect()
        with PostgresStorageAdapter(
            bouncer.dsn,
            max_size=1,
            pgbouncer=True,
            statement_timeout_ms=0,
            encryption_keys=TEST_KEYS,
            max_retries=0,
        ) as role_level:
            user = role_level.create_user()
            assert role_level.get_user(user.id) == user
            assert role_level.update_user(user.id, name="statement-mode").name == "statement-mode"
            with pytest.raises(UnavailableError), role_level.transaction() as tx:
                tx.get_user(user.id)
            found = role_level.get_user(user.id)
            assert found is not None and found.name == "statement-mode"

"""Applying and rolling back ``migrations/`` (async source; the sync copy is generated).

A run (``migrate`` or ``rollback``) holds a session-level advisory lock on one connection from
start to end, then re-reads the ledger: any number of processes may call ``connect()`` at once,
and each migration is applied exactly once. A process that finds the lock taken polls for it
between statements, outside any transaction: waiting inside a statement would hold a snapshot,
and ``CREATE INDEX CONCURRENTLY`` in the run it waits for would wait for that snapshot in turn
(a deadlock PostgreSQL breaks by failing one of the two). Each part runs in its own
transaction, or, marked ``transaction:false``, statement by statement. DDL should run on a
direct connection rather than through a transaction-pooling proxy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Self

import psycopg
import psycopg_pool

from .. import _sql, _validate
from .._base import (
    Direction,
    Migration,
    MigrationState,
    Retry,
    backoff,
    load_migrations,
    newer_migrations,
    plan,
)
from .._transaction import TransactionState
from ..errors import (
    KitiumPgError,
    MigrationError,
    UnavailableError,
    ValidationError,
    chained,
    connection_lost,
    scrubbed,
    translate,
)
from .core import AsyncCore

Progress = Callable[[str, str], None]

# How often a process polls for the migrators' lock: from 50 ms, doubling up to a second.
_LOCK_POLL_FIRST = 0.05
_LOCK_POLL_MAX = 1.0
# Runs of migrate() when a part fails with a deadlock (each run starts by taking the lock).
_RUNS = 3
_IDLE = psycopg.pq.TransactionStatus.IDLE
logger = logging.getLogger("kitium_pg")


class AsyncMigrations(AsyncCore):
    """Migration methods of the async adapter."""

    def _migrations(self) -> tuple[Migration, ...]:
        return load_migrations(self._settings.schema, optional=self._settings.optional_migrations)

    async def _applied(self) -> dict[str, str]:
        if not await self._value("ledger_exists", {}, retry=Retry.SAFE):
            return {}
        rows = await self._run("list_applied_migrations", {}, retry=Retry.SAFE)
        return {mig_id: checksum for mig_id, checksum in rows}

    async def migration_status(self) -> MigrationState:
        """Applied and pending migration ids, the schema's invalid indexes, and the applied ids
        a newer version applied (``newer``); creates nothing.

        Raises ``MigrationError`` on drift (an applied file changed).
        """
        migrations = self._migrations()
        applied = await self._applied()
        pending = plan(migrations, applied, newer_ok=True)
        return MigrationState(
            applied=tuple(sorted(applied)),
            pending=tuple(m.id for m in pending),
            invalid_indexes=await self._invalid_indexes(),
            newer=newer_migrations(migrations, applied),
        )

    async def _invalid_indexes(self) -> tuple[str, ...]:
        rows = await self._run("list_invalid_indexes", {}, retry=Retry.SAFE)
        return tuple(name for (name,) in rows)

    async def _migration_running(self) -> bool:
        """Whether another session holds the migrators' lock: a migration may be running
        (building an index that ``invalid_indexes`` lists when this role cannot see the
        build's progress)."""
        return bool(await self._value("migrators_lock_taken", {}, retry=Retry.SAFE))

    @asynccontextmanager
    async def _migrators_lock(self) -> AsyncIterator[Self]:
        """A view of this adapter bound to a pooled connection that holds the migrators' lock
        until the block ends, waiting for it as long as another run holds it. For the block the
        connection is in autocommit mode, without a statement timeout (a long index build or
        backfill must not be cut off half-way: a part that takes locks in a transaction sets
        its own lock_timeout), and goes back to the pool as it came, the lock
        released; after a block (or the release) ended by an interruption (a cancelled task,
        Ctrl-C) or a failed connection it is closed instead. The other timeouts that would cut
        a run off half-way (``_UNLIMITED``: a lock or transaction timeout that the DSN's options
        or the role's defaults set) are off for the block too, and put back after it."""
        async with self._pool.connection() as conn:
            autocommit = conn.autocommit
            if not autocommit:
                await conn.set_autocommit(True)
            # Without the adapter's per-call settings (a statement timeout or a tenant applied
            # per transaction): the run sets what it needs on its connection itself.
            bound = self._view(_conn=conn, _tx=TransactionState(), _local=())
            clean = False
            try:
                delay = _LOCK_POLL_FIRST
                while not await bound._value("try_lock_migrations", {}, retry=Retry.NEVER):
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, _LOCK_POLL_MAX)
                saved: dict[str, str] = {}
                for name in _UNLIMITED:
                    value = await bound._value("show_setting", {"name": name}, retry=Retry.NEVER)
                    if value is not None:  # None: not a setting of this server's version
                        saved[name] = value
                        await bound._set_session_setting(name, "0")
                try:
                    yield bound
                except Exception:
                    clean = not conn.broken and conn.info.transaction_status == _IDLE
                    raise
                clean = True
            finally:
                if clean:
                    try:
                        await bound._release(autocommit, saved)
                    except BaseException:
                        # Interrupted or failed while releasing: the same as below.
                        if not conn.closed:
                            await conn.close()
                        raise
                elif not conn.closed:
                    # An interruption may have come after the server granted the lock or
                    # changed a setting, before the reply was read: ending the session ends
                    # them all (the pool replaces the connection).
                    await conn.close()

    async def _set_session_setting(self, name: str, value: str) -> None:
        await self._value("set_session_setting", {"name": name, "value": value}, retry=Retry.NEVER)

    async def _release(self, autocommit: bool, saved: Mapping[str, str]) -> None:
        """Release the migrators' lock this run's connection holds and give the connection its
        timeouts (``saved``: name to value) and autocommit mode back."""
        assert self._conn is not None
        for name, value in saved.items():
            await self._set_session_setting(name, value)
        if not await self._value("unlock_migrations", {}, retry=Retry.NEVER):
            # The statements of the run did not all reach one server session.
            logger.warning(
                "kitium_pg migrations: the migrators' lock was not held by this session at the"
                " end of the run; migrate on a direct connection, not through a transaction"
                " pooler (the lock may stay held by a pooled server connection)"
            )
        if not autocommit:
            await self._conn.set_autocommit(False)

    async def _ledger(self, *, create: bool = True) -> dict[str, str]:
        """The applied migrations (id to checksum), creating the ledger when it is missing
        (with ``create``; else none are)."""
        assert self._conn is not None
        async with self._conn.transaction():
            # Only when missing: CREATE SCHEMA IF NOT EXISTS needs the right to create schemas
            # even when the schema exists, and a role without DDL rights may have waited here
            # for another process that has just applied everything.
            if not await self._value("ledger_exists", {}, retry=Retry.NEVER):
                if not create:
                    return {}
                await self._run("ensure_ledger", {}, retry=Retry.NEVER)
            rows = await self._run("list_applied_migrations", {}, retry=Retry.NEVER)
        return {mig_id: checksum for mig_id, checksum in rows}

    async def migrate(self, *, progress: Progress | None = None) -> tuple[str, ...]:
        """Apply pending migrations in order; returns the ids this call applied.

        Idempotent and safe to run from many processes at once: a process that finds another
        one migrating waits for it, without a time limit. When nothing is pending it only reads
        the migration ledger (no lock, no DDL), so an application role without DDL rights can
        connect to a migrated schema, and a database a newer version migrated further (a
        rolling deploy's older instances) is no error when none of this version's migrations is
        pending: it logs a warning and applies nothing. Raises ``MigrationError`` on drift or
        when a migration's
        SQL fails (a part that runs in a transaction is rolled back; of one marked
        ``transaction:false``, the statements before the failed one stay, and running it again
        finishes it; the earlier migrations stay applied), and ``UnavailableError`` when the
        database cannot be reached or the connection is lost. A failure after this call applied
        some migrations names them in its message and in its ``completed`` attribute.
        """
        _validate.callback("progress", progress)
        migrations = self._migrations()
        try:
            if not _pending(migrations, await self._applied()):
                return ()
        except MigrationError:
            raise
        except KitiumPgError:
            pass  # e.g. no right to read the ledger yet: the locked path below says why
        if self._settings.pgbouncer:
            raise MigrationError(
                "migrations must run on a direct connection, not through PgBouncer: connect with"
                " migrate=False here and run `kitium-pg --dsn <direct DSN> migrate` (or an adapter"
                " without pgbouncer=True) from your deploy"
            )
        done: list[str] = []
        announced: set[str] = set()  # once each, though a run after a deadlock tries it again

        async def apply_pending(bound: Self) -> None:
            # Planned again under the lock: a newer version's run, which this one waited for,
            # may have applied what was pending (and migrations of its own).
            for migration in _pending(migrations, await bound._ledger()):
                if progress and migration.id not in announced:
                    announced.add(migration.id)
                    progress(migration.id, "up")
                await bound._apply(migration, "up")
                done.append(migration.id)

        try:
            await self._locked_runs("migrate", apply_pending)
        except KitiumPgError as failure:
            _name_completed(failure, "applied before the failure", done)
            raise
        return tuple(done)

    async def _locked_runs(self, operation: str, work: Callable[[Self], Awaitable[None]]) -> None:
        """``await work(bound)`` with a view bound to a connection holding the migrators' lock;
        up to ``_RUNS`` times while it fails with a transient ``MigrationError`` (a deadlock),
        releasing the lock in between. ``work`` must pick up where an earlier run stopped (it
        reads the ledger). Connection failures become ``UnavailableError`` and the like."""
        for run in range(1, _RUNS + 1):
            try:
                async with self._migrators_lock() as bound:
                    await work(bound)
                    for name in await bound._invalid_indexes():
                        # Not an error: the run did its work. But the index costs every write.
                        logger.warning(
                            "kitium_pg %s: index %s.%s is invalid (a CREATE INDEX CONCURRENTLY"
                            " failed or was cancelled): no query uses it, every write still"
                            " updates it; run the migration that builds it again, or drop it"
                            " with DROP INDEX CONCURRENTLY",
                            operation,
                            self._settings.schema,
                            name,
                        )
            except MigrationError as refused:
                if not refused.retryable or run == _RUNS:
                    raise
                # A deadlock: most likely an earlier kitium-pg version's migrator, waiting for
                # the lock inside a statement, whose snapshot an index build waits out. Let it
                # have the lock, then run again (each part can be run again).
                logger.warning("kitium_pg %s: %s; running again", operation, refused)
                await asyncio.sleep(backoff(run))
                continue
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                failure = chained(translate(exc, operation=operation), exc)
            else:
                return
            raise failure  # here, not in the except block: see errors.chained

    async def _apply(self, migration: Migration, direction: Direction) -> None:
        """Run one part of ``migration`` and record it in the ledger (``up``) or remove it from
        there (``down``): in one transaction, or statement by statement and then the ledger."""
        assert self._conn is not None
        started = time.perf_counter()
        what = migration.file if direction == "up" else f"{migration.file} (down)"
        if migration.in_transaction(direction):
            async with self._conn.transaction():
                await self._execute_part(what, (migration.sql(direction),))
                await self._record(migration, direction, started)
            return
        await self._execute_part(what, migration.statements(direction), one_each=True)
        await self._record(migration, direction, started)

    async def _execute_part(
        self, what: str, statements: tuple[str, ...], *, one_each: bool = False
    ) -> None:
        """Send each of ``statements`` on its own; the first failure raises (``_failed``).
        ``one_each``: each is sent as a prepared statement, which the server refuses when it
        holds more than one command (where sqlparse and PostgreSQL split a text differently)."""
        assert self._conn is not None
        failure: KitiumPgError | None = None
        for number, statement in enumerate(statements, 1):
            try:
                await self._conn.execute(statement, prepare=one_each or None)
            except psycopg.Error as exc:
                where = what if len(statements) == 1 else f"{what}, statement {number}"
                failure = chained(_failed(exc, where), exc)
            if failure is not None:
                raise failure  # here, not in the except block: see errors.chained

    async def _record(self, migration: Migration, direction: Direction, started: float) -> None:
        if direction == "down":
            await self._exec("forget_migration", {"id": migration.id}, retry=Retry.NEVER)
            return
        duration_ms = (time.perf_counter() - started) * 1000
        await self._exec(
            "record_migration",
            {"id": migration.id, "checksum": migration.checksum, "duration_ms": duration_ms},
            retry=Retry.NEVER,
        )

    async def rollback(
        self, steps: int = 1, *, progress: Progress | None = None
    ) -> tuple[str, ...]:
        """Undo the last ``steps`` applied migrations (newest first); returns their ids.

        Raises ``MigrationError`` on drift, for an applied optional migration this adapter was
        not configured with among the ``steps`` newest (checked before any is undone; the
        error's ``not_enabled`` attribute names them), or when a
        down part's SQL fails (as ``migrate`` does for an up part), and ``UnavailableError``
        when the connection is lost. A failure after this call undid some migrations (each
        committed on its own) names them in its message and in its ``completed`` attribute."""
        _validate.callback("progress", progress)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValidationError("steps", "must be a positive integer")
        migrations = {m.id: m for m in self._migrations()}
        undone: list[str] = []
        announced: set[str] = set()

        async def undo_last(bound: Self) -> None:
            applied = await bound._ledger(create=False)  # a rollback creates nothing
            plan(tuple(migrations.values()), applied)
            # The ledger lists migrations in the order they were applied. Every one to undo is
            # checked before the first is undone: a refusal half-way would leave some undone.
            chosen = list(applied)[::-1][: steps - len(undone)]
            unknown = [mig_id for mig_id in chosen if mig_id not in migrations]
            if unknown:
                refused = MigrationError(
                    f"cannot roll back {', '.join(map(repr, unknown))}: enable"
                    f" {'it' if len(unknown) == 1 else 'them'} with optional_migrations"
                )
                refused.not_enabled = tuple(unknown)  # type: ignore[attr-defined]
                raise refused
            for last_id in chosen:
                if progress and last_id not in announced:
                    announced.add(last_id)
                    progress(last_id, "down")
                await bound._apply(migrations[last_id], "down")
                undone.append(last_id)

        try:
            await self._locked_runs("rollback", undo_last)
        except KitiumPgError as failure:
            _name_completed(failure, "rolled back before the failure", undone)
            raise
        return tuple(undone)

    def app_role_grants(self, role: str) -> str:
        """The GRANT statements that give application role ``role`` what the adapter's runtime
        calls need and nothing more (no DDL; ``auth_events`` append-only)."""
        return _role_sql(self._queries["grant_app_role"].sql, role)

    async def grant_app_role(self, role: str) -> None:
        """Apply ``app_role_grants(role)`` (run it as the schema owner). The role must exist."""
        sql = self.app_role_grants(role)
        try:
            async with self._connection() as conn:
                await conn.execute(sql)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            failure = chained(translate(exc, operation="grant_app_role"), exc)
        else:
            return
        raise failure  # here, not in the except block: see errors.chained


def _pending(
    migrations: tuple[Migration, ...], applied: Mapping[str, str]
) -> tuple[Migration, ...]:
    """The migrations of ``migrations`` still to apply, after ``applied`` (``plan``'s checks).
    A schema a newer version migrated further (a rolling deploy's older instances, or the
    application rolled back) is no error when none of these is pending: nothing to apply,
    and a warning names the newer ones. Raises ``MigrationError`` when some are pending below
    a newer version's (this version would migrate under it), and on drift."""
    if plan(migrations, applied, newer_ok=True):
        return plan(migrations, applied)
    if newer := newer_migrations(migrations, applied):
        logger.warning(
            "kitium_pg migrate: the database has migrations this version does not ship (%s),"
            " applied by a newer version; nothing to apply",
            ", ".join(newer),
        )
    return ()


def _name_completed(failure: KitiumPgError, what: str, ids: list[str]) -> None:
    """Add to ``failure`` the migrations a run applied or undid (and committed) before it
    failed: in its message, and as its ``completed`` attribute (a tuple of ids, which the CLI's
    --json output lists). Nothing when there are none."""
    if not ids:
        return
    failure.args = (f"{failure} ({what}: {', '.join(ids)})",)
    failure.completed = tuple(ids)  # type: ignore[attr-defined]


def _failed(exc: psycopg.Error, what: str) -> KitiumPgError:
    """A migration statement's failure: ``UnavailableError`` when the connection was lost (the
    CLI's exit code 3: the database, not the migration), else ``MigrationError`` (a lock
    timeout or a lack of resources included: exit code 4, run it again later). The message has
    the server's primary message only, as every error does (``errors.scrubbed``): its DETAIL
    line may quote rows (a unique index that cannot be built names the duplicated value)."""
    if connection_lost(exc):
        return UnavailableError(f"{what}: the connection to the database was lost: {exc}")
    # A deadlock or a serialization failure left nothing to undo by hand: run it again.
    transient = exc.sqlstate in _TRANSIENT
    return MigrationError(f"{what} failed: {scrubbed(exc)}", retryable=transient)


_TRANSIENT = frozenset({"40P01", "40001"})

# The timeouts off while a run holds the migrators' lock (each where the server has it:
# transaction_timeout is PostgreSQL 17's).
_UNLIMITED = (
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "transaction_timeout",
)


def _role_sql(sql: str, role: str) -> str:
    if not isinstance(role, str) or not _ROLE_RE.fullmatch(role):
        raise ValidationError("role", "must match [a-z_][a-z0-9_]* (at most 63 characters)")
    role = _validate.plain(role)  # a subclass may answer in/startswith for another name
    if role in _NOT_A_ROLE or role.startswith("pg_"):
        # GRANT ... TO public grants to every role of the cluster; current_user and friends
        # name whoever runs the grant; pg_* are PostgreSQL's own roles.
        raise ValidationError("role", f"{role!r} is not an application role")
    if role in _sql.RESERVED_KEYWORDS:
        raise ValidationError(
            "role", f"{role!r} is a reserved SQL keyword PostgreSQL will not parse"
        )
    # Only where the role stands (`TO kitium_app;`): a schema may be named kitium_app too.
    return re.sub(r"\bTO kitium_app;", lambda _: f"TO {role};", sql)


_ROLE_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_NOT_A_ROLE = frozenset({"public", "current_user", "current_role", "session_user", "none"})

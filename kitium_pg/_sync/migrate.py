# WARNING: generated from kitium_pg/_async/migrate.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Applying and rolling back ``migrations/`` (generated from the async source).

Each migration runs in its own transaction that first takes a transaction-scoped advisory lock,
re-reads the ledger and skips work another process finished meanwhile: any number of processes
may call ``connect()`` at once, and each migration is applied exactly once. Transaction-scoped
locks hold nothing across transactions, but DDL should still run on a direct connection rather
than through a transaction-pooling proxy.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import psycopg
import psycopg_pool

from .. import _sql, _validate
from .._base import Migration, MigrationState, Retry, load_migrations, plan
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
from .core import Core

Progress = Callable[[str, str], None]


class Migrations(Core):
    """Migration methods of the sync adapter."""

    def _migrations(self) -> tuple[Migration, ...]:
        return load_migrations(self._settings.schema, optional=self._settings.optional_migrations)

    def _applied(self) -> dict[str, str]:
        if not self._value("ledger_exists", {}, retry=Retry.SAFE):
            return {}
        rows = self._run("list_applied_migrations", {}, retry=Retry.SAFE)
        return {mig_id: checksum for mig_id, checksum in rows}

    def migration_status(self) -> MigrationState:
        """Applied and pending migration ids; creates nothing.

        Raises ``MigrationError`` on drift (an applied file changed, or an unknown id).
        """
        migrations = self._migrations()
        applied = self._applied()
        pending = plan(migrations, applied)
        return MigrationState(applied=tuple(sorted(applied)), pending=tuple(m.id for m in pending))

    def _locked_ledger(self) -> dict[str, str]:
        # Waiting for another process's migration is part of the job: no statement timeout
        # for the lock or for what runs after it in this transaction.
        self._value(
            "set_local_setting", {"name": "statement_timeout", "value": "0"}, retry=Retry.NEVER
        )
        self._value("lock_migrations", {}, retry=Retry.NEVER)
        # Only when missing: CREATE SCHEMA IF NOT EXISTS needs the right to create schemas
        # even when the schema exists, and a role without DDL rights may have waited here
        # for another process that has just applied everything.
        if not self._value("ledger_exists", {}, retry=Retry.NEVER):
            self._run("ensure_ledger", {}, retry=Retry.NEVER)
        rows = self._run("list_applied_migrations", {}, retry=Retry.NEVER)
        return {mig_id: checksum for mig_id, checksum in rows}

    def migrate(self, *, progress: Progress | None = None) -> tuple[str, ...]:
        """Apply pending migrations in order; returns the ids this call applied.

        Idempotent and safe to run from many processes at once: a process that finds another
        one migrating waits for it, without a statement timeout. When nothing is pending it
        only reads the ledger (no lock, no DDL), so an application role without DDL rights can
        connect to a migrated schema. Raises ``MigrationError`` on drift or when a migration's
        SQL fails (that migration is rolled back; the earlier ones stay applied), and
        ``UnavailableError`` when the database cannot be reached or the connection is lost.
        """
        _validate.callback("progress", progress)
        migrations = self._migrations()
        try:
            if not plan(migrations, self._applied()):
                return ()
        except MigrationError:
            raise
        except KitiumPgError:
            pass  # e.g. no right to read the ledger yet: the locked path below says why
        if self._settings.pgbouncer:
            raise MigrationError(
                "migrations must run on a direct connection, not through PgBouncer: connect with"
                " migrate=False here and run `kitium-pg migrate --dsn <direct DSN>` (or an adapter"
                " without pgbouncer=True) from your deploy"
            )
        done: list[str] = []
        try:
            with self._pool.connection() as conn:
                bound = self._bound(conn)
                with conn.transaction():
                    applied = bound._locked_ledger()
                plan(migrations, applied)
                for migration in migrations:
                    if migration.id in applied:
                        continue
                    with conn.transaction():
                        applied = bound._locked_ledger()
                        if migration.id in applied:
                            continue
                        if progress:
                            progress(migration.id, "up")
                        bound._apply(migration, migration.up)
                        done.append(migration.id)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            failure = chained(translate(exc, operation="migrate"), exc)
        else:
            return tuple(done)
        raise failure  # here, not in the except block: see errors.chained

    def _apply(self, migration: Migration, sql: str) -> None:
        started = time.perf_counter()
        assert self._conn is not None
        failure: KitiumPgError | None = None
        try:
            self._conn.execute(sql)
        except psycopg.Error as exc:
            failure = chained(_failed(exc, migration.file), exc)
        if failure is not None:
            raise failure  # here, not in the except block: see errors.chained
        duration_ms = (time.perf_counter() - started) * 1000
        self._exec(
            "record_migration",
            {"id": migration.id, "checksum": migration.checksum, "duration_ms": duration_ms},
            retry=Retry.NEVER,
        )

    def rollback(self, steps: int = 1, *, progress: Progress | None = None) -> tuple[str, ...]:
        """Undo the last ``steps`` applied migrations (newest first); returns their ids."""
        _validate.callback("progress", progress)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValidationError("steps", "must be a positive integer")
        migrations = {m.id: m for m in self._migrations()}
        undone: list[str] = []
        try:
            with self._pool.connection() as conn:
                bound = self._bound(conn)
                for _ in range(steps):
                    with conn.transaction():
                        applied = bound._locked_ledger()
                        plan(tuple(migrations.values()), applied)
                        if not applied:
                            break
                        # The ledger lists migrations in the order they were applied.
                        last_id = list(applied)[-1]
                        if last_id not in migrations:
                            raise MigrationError(
                                f"cannot roll back {last_id!r}: enable it with optional_migrations"
                            )
                        last = migrations[last_id]
                        if progress:
                            progress(last.id, "down")
                        failure: KitiumPgError | None = None
                        try:
                            conn.execute(last.down)
                        except psycopg.Error as exc:
                            failure = chained(_failed(exc, f"{last.file} (down)"), exc)
                        if failure is not None:
                            raise failure  # not in the except block: see errors.chained
                        bound._exec("forget_migration", {"id": last.id}, retry=Retry.NEVER)
                        undone.append(last.id)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            failure = chained(translate(exc, operation="rollback"), exc)
        else:
            return tuple(undone)
        raise failure  # here, not in the except block: see errors.chained

    def app_role_grants(self, role: str) -> str:
        """The GRANT statements that give application role ``role`` what the adapter's runtime
        calls need and nothing more (no DDL; ``auth_events`` append-only)."""
        return _role_sql(self._queries["grant_app_role"].sql, role)

    def grant_app_role(self, role: str) -> None:
        """Apply ``app_role_grants(role)`` (run it as the schema owner). The role must exist."""
        sql = self.app_role_grants(role)
        try:
            with self._connection() as conn:
                conn.execute(sql)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            failure = chained(translate(exc, operation="grant_app_role"), exc)
        else:
            return
        raise failure  # here, not in the except block: see errors.chained


def _failed(exc: psycopg.Error, what: str) -> KitiumPgError:
    """A migration statement's failure: ``UnavailableError`` when the connection was lost (the
    CLI's exit code 3: the database, not the migration), else ``MigrationError`` (a lock
    timeout or a lack of resources included: exit code 4, run it again later). The message has
    the server's primary message only, as every error does (``errors.scrubbed``): its DETAIL
    line may quote rows (a unique index that cannot be built names the duplicated value)."""
    if connection_lost(exc):
        return UnavailableError(f"{what}: the connection to the database was lost: {exc}")
    return MigrationError(f"{what} failed: {scrubbed(exc)}")


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

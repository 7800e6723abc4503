"""The ways of doing each benchmarked operation: kitium-pg (sync, async) and the raw-driver
floors (psycopg sync/async on one reused cursor with prepared statements, asyncpg prepared
statements), all running the SQL text the adapter itself loaded from ``queries/``.

Every variant exposes ``op_<operation>(input)`` (a coroutine function for async variants);
an operation a variant lacks is skipped and reported with the reason in ``skips``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import psycopg
from psycopg.rows import TupleRow

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter, _sql
from kitium_pg._base import new_id_text

from .seed import new_id

# -- operations and their inputs ---------------------------------------------------------------

HOT_PATHS = (
    "get_session",
    "validate_session_token",
    "get_user_by_email",
    "get_api_key_by_hash",
    "verify_api_key",
    "get_user_permissions",
)
WRITES = (
    "create_user",
    "create_session",
    "emit_event",
    "emit_events",
    "create_backup_codes",
    "mark_email_verification_token_as_used",
)
OPERATIONS = HOT_PATHS + WRITES
SINGLE_ROW = (
    "get_session",
    "validate_session_token",
    "get_user_by_email",
    "get_api_key_by_hash",
    "verify_api_key",
    "create_user",
    "create_session",
    "emit_event",
    "mark_email_verification_token_as_used",
)
EVENTS_PER_BATCH = 1000
BACKUP_CODES = 10


@dataclass(frozen=True, slots=True)
class NewUser:
    email: str
    name: str
    password_hash: str
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewSession:
    user_id: uuid.UUID
    expires_at: dt.datetime
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewEvent:
    type: str
    principal_id: uuid.UUID
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewBackupCodes:
    user_id: uuid.UUID
    code_hashes: list[str]


@dataclass(frozen=True, slots=True)
class Login:
    """A sign-in: a new session and its audit event, which belong in one transaction."""

    session: NewSession
    event: NewEvent


# -- parameters of the raw variants (the same values the adapter sends) ------------------------


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def create_user_params(x: NewUser) -> dict[str, Any]:
    return {
        "id": new_id(),
        "email": x.email,
        "email_verified_at": None,
        "name": x.name,
        "picture": None,
        "plan": "free",
        "entitlements": [],
        "metadata": _json(x.metadata),
        "password_hash": x.password_hash,
    }


def create_session_params(x: NewSession) -> dict[str, Any]:
    return {
        "id": new_id(),
        "user_id": x.user_id,
        "org_id": None,
        "plan": None,
        "entitlements": [],
        "metadata": _json(x.metadata),
        "expires_at": x.expires_at,
        "token_hash": None,
    }


def emit_event_params(x: NewEvent) -> dict[str, Any]:
    return {
        "id": new_id(),
        "type": x.type,
        "principal_id": str(x.principal_id),
        "org_id": None,
        "data": _json(x.data),
        "ts": None,
    }


def sign_in_params(x: Login) -> dict[str, Any]:
    """The parameters of ``create_session_with_event`` (a session and its audit event)."""
    event = emit_event_params(x.event)
    return create_session_params(x.session) | {f"event_{k}": v for k, v in event.items()}


def emit_events_params(events: Sequence[Mapping[str, Any]], sql: str) -> dict[str, Any]:
    """The parameters of the adapter's ``emit_events`` query, in whichever shape its SQL takes:
    one jsonb document of the batch (``:batch`` and ``:count``) or parallel arrays (``:types``,
    ``:datas``…)."""
    ids = [new_id_text() for _ in events]
    if "batch" in _placeholders(sql):
        document = [
            {
                "id": event_id,
                "type": e["type"],
                "principal_id": str(e["principal_id"]),
                "org_id": None,
                "ts": None,
                "data": e["data"],
            }
            for event_id, e in zip(ids, events, strict=True)
        ]
        return {"batch": _json_list(document), "count": len(events)}
    return {
        "ids": [uuid.UUID(i) for i in ids],
        "types": [e["type"] for e in events],
        "principal_ids": [str(e["principal_id"]) for e in events],
        "org_ids": [None] * len(events),
        "datas": [_json(e["data"]) for e in events],
        "timestamps": [None] * len(events),
    }


def _json_list(value: list[dict[str, Any]]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _placeholders(sql: str) -> set[str]:
    return {m.group(1) for m in _PLACEHOLDER.finditer(sql) if m.group(1)}


def backup_codes_params(x: NewBackupCodes) -> dict[str, Any]:
    return {
        "user_id": x.user_id,
        "ids": [new_id() for _ in x.code_hashes],
        "code_hashes": x.code_hashes,
    }


def token_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# -- variant bases -----------------------------------------------------------------------------


class Variant:
    """One way of running the operations."""

    name: str
    is_async: ClassVar[bool]
    stack: ClassVar[str]
    skips: ClassVar[dict[str, str]] = {}
    notes: ClassVar[dict[str, str]] = {}

    def op(self, operation: str) -> Any:
        """The bound ``op_<operation>`` method, or ``None``."""
        return getattr(self, f"op_{operation}", None)


class SyncVariant(Variant):
    is_async = False

    def open(self) -> None:
        """Connect (outside any measurement)."""

    def close(self) -> None:
        """Disconnect."""


class AsyncVariant(Variant):
    is_async = True

    async def open(self) -> None:
        """Connect (outside any measurement)."""

    async def close(self) -> None:
        """Disconnect."""


# -- kitium-pg ---------------------------------------------------------------------------------


class BatchClock:
    """Times each batch of a purge from its ``progress`` callback, called after every batch:
    the public way to watch it, and one that leaves logging (the concurrent reader's adapter
    logs through the same ``kitium_pg`` logger) at its usual level."""

    def __init__(self) -> None:
        self.durations_s: list[float] = []
        self._last = time.perf_counter()

    def tick(self, deleted_so_far: int) -> None:
        now = time.perf_counter()
        self.durations_s.append(now - self._last)
        self._last = now


class KitiumSync(SyncVariant):
    """``PostgresStorageAdapter`` with its defaults (pool min_size=1, prepare_threshold=5)."""

    name = "kitium-sync"
    stack = "kitium-pg"

    def __init__(self, dsn: str, schema: str) -> None:
        self.storage = PostgresStorageAdapter(dsn, schema=schema)

    def open(self) -> None:
        self.storage.connect(migrate=False)

    def close(self) -> None:
        self.storage.disconnect()

    def op_get_session(self, x: uuid.UUID) -> Any:
        return self.storage.get_session(x)

    def op_validate_session_token(self, x: str) -> Any:
        return self.storage.validate_session_token(x)

    def op_get_user_by_email(self, x: str) -> Any:
        return self.storage.get_user_by_email(x)

    def op_get_api_key_by_hash(self, x: str) -> Any:
        return self.storage.get_api_key_by_hash(x)

    def op_verify_api_key(self, x: str) -> Any:
        return self.storage.verify_api_key(x)

    def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        return self.storage.get_user_permissions(x[0], x[1])

    def op_create_user(self, x: NewUser) -> Any:
        return self.storage.create_user(
            email=x.email, name=x.name, metadata=x.metadata, password_hash=x.password_hash
        )

    def op_create_session(self, x: NewSession) -> Any:
        return self.storage.create_session(
            user_id=x.user_id, expires_at=x.expires_at, metadata=x.metadata
        )

    def op_emit_event(self, x: NewEvent) -> Any:
        return self.storage.emit_event(type=x.type, principal_id=x.principal_id, data=x.data)

    def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        return self.storage.emit_events(x)

    def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        return self.storage.create_backup_codes(x.user_id, x.code_hashes)

    def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        return self.storage.mark_email_verification_token_as_used(x)

    def maint_delete_expired_sessions(self, batch_size: int) -> tuple[int, list[float]]:
        clock = BatchClock()
        deleted = self.storage.delete_expired_sessions(batch_size=batch_size, progress=clock.tick)
        return deleted, clock.durations_s


class KitiumAsync(AsyncVariant):
    """``AsyncPostgresStorageAdapter`` with its defaults."""

    name = "kitium-async"
    stack = "kitium-pg"

    def __init__(self, dsn: str, schema: str) -> None:
        self.storage = AsyncPostgresStorageAdapter(dsn, schema=schema)

    async def open(self) -> None:
        await self.storage.connect(migrate=False)

    async def close(self) -> None:
        await self.storage.disconnect()

    async def op_get_session(self, x: uuid.UUID) -> Any:
        return await self.storage.get_session(x)

    async def op_validate_session_token(self, x: str) -> Any:
        return await self.storage.validate_session_token(x)

    async def op_get_user_by_email(self, x: str) -> Any:
        return await self.storage.get_user_by_email(x)

    async def op_get_api_key_by_hash(self, x: str) -> Any:
        return await self.storage.get_api_key_by_hash(x)

    async def op_verify_api_key(self, x: str) -> Any:
        return await self.storage.verify_api_key(x)

    async def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        return await self.storage.get_user_permissions(x[0], x[1])

    async def op_create_user(self, x: NewUser) -> Any:
        return await self.storage.create_user(
            email=x.email, name=x.name, metadata=x.metadata, password_hash=x.password_hash
        )

    async def op_create_session(self, x: NewSession) -> Any:
        return await self.storage.create_session(
            user_id=x.user_id, expires_at=x.expires_at, metadata=x.metadata
        )

    async def op_emit_event(self, x: NewEvent) -> Any:
        return await self.storage.emit_event(type=x.type, principal_id=x.principal_id, data=x.data)

    async def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        return await self.storage.emit_events(x)

    async def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        return await self.storage.create_backup_codes(x.user_id, x.code_hashes)

    async def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        return await self.storage.mark_email_verification_token_as_used(x)

    async def op_login(self, x: Login) -> Any:
        """``create_session(event=…)``: the session and its event in one statement."""
        return await self.storage.create_session(
            user_id=x.session.user_id,
            expires_at=x.session.expires_at,
            metadata=x.session.metadata,
            event={
                "type": x.event.type,
                "principal_id": x.event.principal_id,
                "data": x.event.data,
            },
        )

    async def op_login_tx(self, x: Login) -> Any:
        """create_session + emit_event in one ``transaction()``."""
        async with self.storage.transaction() as tx:
            session = await tx.create_session(
                user_id=x.session.user_id,
                expires_at=x.session.expires_at,
                metadata=x.session.metadata,
            )
            event = await tx.emit_event(
                type=x.event.type, principal_id=x.event.principal_id, data=x.event.data
            )
        return session, event

    async def op_login_no_tx(self, x: Login) -> Any:
        """The same two calls, each its own statement (not atomic)."""
        session = await self.storage.create_session(
            user_id=x.session.user_id, expires_at=x.session.expires_at, metadata=x.session.metadata
        )
        event = await self.storage.emit_event(
            type=x.event.type, principal_id=x.event.principal_id, data=x.event.data
        )
        return session, event

    async def maint_delete_expired_sessions(self, batch_size: int) -> tuple[int, list[float]]:
        clock = BatchClock()
        deleted = await self.storage.delete_expired_sessions(
            batch_size=batch_size, progress=clock.tick
        )
        return deleted, clock.durations_s


# -- raw psycopg: the floor --------------------------------------------------------------------


def connection_kwargs() -> dict[str, Any]:
    """The session settings the adapter uses (autocommit, UTC, statement timeout as a startup
    option), so raw and kitium connections differ only in the client code."""
    return {
        "autocommit": True,
        "options": "-c statement_timeout=5000 -c TimeZone=UTC",
        "prepare_threshold": 5,
    }


class RawPsycopg(SyncVariant):
    """The adapter's SQL text on ONE reused psycopg cursor, ``prepare=True``, tuple rows."""

    name = "raw-psycopg"
    stack = "raw driver"

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.sql = {name: q.sql for name, q in _sql.queries(schema).items()}

    def open(self) -> None:
        self.conn: psycopg.Connection[TupleRow] = psycopg.connect(self.dsn, **connection_kwargs())
        self.cur = self.conn.cursor()

    def close(self) -> None:
        self.conn.close()

    def _one(self, name: str, params: Mapping[str, Any]) -> Any:
        self.cur.execute(self.sql[name], params, prepare=True)
        return self.cur.fetchone()

    def _all(self, name: str, params: Mapping[str, Any]) -> Any:
        self.cur.execute(self.sql[name], params, prepare=True)
        return self.cur.fetchall()

    def op_get_session(self, x: uuid.UUID) -> Any:
        return self._one("get_session", {"id": x})

    def op_validate_session_token(self, x: str) -> Any:
        sid, _, secret = x.partition(".")
        row = self._one("get_session_for_token", {"id": uuid.UUID(sid)})
        if row is None or not hmac.compare_digest(row[-1], token_digest(secret)):
            return None
        return row

    def op_get_user_by_email(self, x: str) -> Any:
        return self._one("get_user_by_email", {"email": x})

    def op_get_api_key_by_hash(self, x: str) -> Any:
        return self._one("get_api_key_by_hash", {"hash": x})

    def op_verify_api_key(self, x: str) -> Any:
        digest = key_digest(x)
        row = self._one("verify_api_key", {"hash": digest})
        if row is None or not hmac.compare_digest(row[2], digest):
            return None
        return row

    def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        return self._all("get_user_permissions", {"user_id": x[0], "org_id": x[1]})

    def op_create_user(self, x: NewUser) -> Any:
        return self._one("create_user", create_user_params(x))

    def op_create_session(self, x: NewSession) -> Any:
        return self._one("create_session", create_session_params(x))

    def op_emit_event(self, x: NewEvent) -> Any:
        return self._one("emit_event", emit_event_params(x))

    def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        row = self._one("emit_events", emit_events_params(x, self.sql["emit_events"]))
        return row[0]

    def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        return self._all("create_backup_codes", backup_codes_params(x))

    def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        row = self._one(
            "mark_email_verification_token_as_used", {"id": x, "consumer": uuid.uuid4()}
        )
        if row is None or not row[0]:
            raise RuntimeError(f"token {x} was not consumable")
        return row

    def maint_delete_expired_sessions(
        self, batch_size: int, sql: str | None = None
    ) -> tuple[int, list[float]]:
        """The adapter's batch loop on the adapter's SQL (or ``sql``), timing each statement."""
        statement = sql or self.sql["delete_expired_sessions"]
        total = 0
        durations: list[float] = []
        params: dict[str, Any] = {"batch_size": batch_size, "after": None, "after_id": None}
        while True:
            started = time.perf_counter()
            self.cur.execute(statement, params)
            # The adapter's statement returns (deleted, locked, the key the next batch starts
            # from: expiry and id); a plain DELETE a row count.
            row = self.cur.fetchone() if self.cur.description is not None else None
            if row is None:
                deleted = taken = self.cur.rowcount
            else:
                deleted, taken, params["after"], params["after_id"] = row
            durations.append(time.perf_counter() - started)
            total += deleted
            if taken < batch_size:
                return total, durations

    def maint_delete_expired_sessions_any_array(self, batch_size: int) -> tuple[int, list[float]]:
        """The same loop with the batch selected through ``id = ANY (ARRAY(subquery))``, as
        ``prune_events`` already does: a primary-key index scan per batch instead of the hash
        semi-join over a sequential scan of the whole table that ``id IN (subquery)`` gets."""
        return self.maint_delete_expired_sessions(batch_size, _any_array(self.schema))


def _any_array(schema: str) -> str:
    return (
        f"DELETE FROM {schema}.sessions"  # noqa: S608 - a checked schema identifier
        f" WHERE id = ANY (ARRAY(SELECT id FROM {schema}.sessions WHERE expires_at <= now()"
        " ORDER BY expires_at LIMIT %(batch_size)s FOR UPDATE SKIP LOCKED))"
    )


class RawPsycopgAsync(AsyncVariant):
    """``RawPsycopg`` on an ``AsyncConnection``."""

    name = "raw-psycopg-async"
    stack = "raw driver"

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.sql = {name: q.sql for name, q in _sql.queries(schema).items()}
        self.emit_events_sql = self.sql["emit_events"]

    async def open(self) -> None:
        self.conn: psycopg.AsyncConnection[TupleRow] = await psycopg.AsyncConnection.connect(
            self.dsn, **connection_kwargs()
        )
        self.cur = self.conn.cursor()
        # Two more cursors for the pipelined login (results are read after one sync).
        self.cur_a = self.conn.cursor()
        self.cur_b = self.conn.cursor()

    async def close(self) -> None:
        await self.conn.close()

    async def _one(self, name: str, params: Mapping[str, Any]) -> Any:
        await self.cur.execute(self.sql[name], params, prepare=True)
        return await self.cur.fetchone()

    async def _all(self, name: str, params: Mapping[str, Any]) -> Any:
        await self.cur.execute(self.sql[name], params, prepare=True)
        return await self.cur.fetchall()

    async def op_get_session(self, x: uuid.UUID) -> Any:
        return await self._one("get_session", {"id": x})

    async def op_validate_session_token(self, x: str) -> Any:
        sid, _, secret = x.partition(".")
        row = await self._one("get_session_for_token", {"id": uuid.UUID(sid)})
        if row is None or not hmac.compare_digest(row[-1], token_digest(secret)):
            return None
        return row

    async def op_get_user_by_email(self, x: str) -> Any:
        return await self._one("get_user_by_email", {"email": x})

    async def op_get_api_key_by_hash(self, x: str) -> Any:
        return await self._one("get_api_key_by_hash", {"hash": x})

    async def op_verify_api_key(self, x: str) -> Any:
        digest = key_digest(x)
        row = await self._one("verify_api_key", {"hash": digest})
        if row is None or not hmac.compare_digest(row[2], digest):
            return None
        return row

    async def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        return await self._all("get_user_permissions", {"user_id": x[0], "org_id": x[1]})

    async def op_create_user(self, x: NewUser) -> Any:
        return await self._one("create_user", create_user_params(x))

    async def op_create_session(self, x: NewSession) -> Any:
        return await self._one("create_session", create_session_params(x))

    async def op_emit_event(self, x: NewEvent) -> Any:
        return await self._one("emit_event", emit_event_params(x))

    async def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        row = await self._one("emit_events", emit_events_params(x, self.emit_events_sql))
        return row[0]

    async def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        return await self._all("create_backup_codes", backup_codes_params(x))

    async def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        row = await self._one(
            "mark_email_verification_token_as_used", {"id": x, "consumer": uuid.uuid4()}
        )
        if row is None or not row[0]:
            raise RuntimeError(f"token {x} was not consumable")
        return row

    async def op_login_one_statement(self, x: Login) -> Any:
        """The adapter's one-statement sign-in (``create_session_with_event``), prepared: what
        kitium-async's sign-in costs on this driver without the adapter."""
        return await self._one("create_session_with_event", sign_in_params(x))

    async def op_login(self, x: Login) -> Any:
        """BEGIN, both INSERTs and COMMIT queued in one pipeline, whose exit sends the one Sync:
        one round trip (tests/test_benchmarks.py counts it). Not ``conn.transaction()``, which
        in a pipeline sends a Sync after BEGIN and after COMMIT, nor ``pipeline.sync()``
        before the exit, which sends its own: five and two round trips."""
        async with self.conn.pipeline():
            await self.cur.execute("BEGIN")
            await self.cur_a.execute(
                self.sql["create_session"], create_session_params(x.session), prepare=True
            )
            await self.cur_b.execute(
                self.sql["emit_event"], emit_event_params(x.event), prepare=True
            )
            await self.cur.execute("COMMIT")
        return await self.cur_a.fetchone(), await self.cur_b.fetchone()


# -- raw asyncpg -------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


def to_dollar_params(sql: str) -> tuple[str, tuple[str, ...]]:
    """psycopg's ``%(name)s`` SQL as asyncpg's ``$n`` SQL, with the parameter names in order
    (a name used twice keeps one number; ``%%`` becomes ``%``)."""
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PLACEHOLDER.sub(replace, sql), tuple(names)


ASYNCPG_QUERIES = (
    "get_session",
    "get_session_for_token",
    "get_user_by_email",
    "get_api_key_by_hash",
    "verify_api_key",
    "get_user_permissions",
    "create_user",
    "create_session",
    "create_session_with_event",
    "emit_event",
    "emit_events",
    "create_backup_codes",
    "mark_email_verification_token_as_used",
)


def asyncpg_connect_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg ``connect()`` keywords for a libpq DSN (URL or key=value)."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    kwargs: dict[str, Any] = {
        "host": info.get("host"),
        "port": int(str(info["port"])) if info.get("port") else None,
        "user": info.get("user"),
        "password": info.get("password") or None,
        "database": info.get("dbname"),
        "server_settings": {"TimeZone": "UTC", "statement_timeout": "5000"},
    }
    return {k: v for k, v in kwargs.items() if v is not None}


class RawAsyncpg(AsyncVariant):
    """The adapter's SQL converted to ``$n``, as asyncpg prepared statements (records as asyncpg
    returns them: jsonb stays text, as asyncpg does by default)."""

    name = "raw-asyncpg"
    stack = "raw driver"

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        queries = _sql.queries(schema)
        self.sql = {name: to_dollar_params(queries[name].sql) for name in ASYNCPG_QUERIES}
        self.emit_events_sql = queries["emit_events"].sql

    async def open(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        self.conn = await asyncpg.connect(**asyncpg_connect_kwargs(self.dsn))
        self.stmts: dict[str, tuple[Any, tuple[str, ...]]] = {}
        for name, (sql, names) in self.sql.items():
            self.stmts[name] = (await self.conn.prepare(sql), names)
        # asyncpg's prepare() ends without a Sync: the implicit transaction (its table locks and
        # its statement_timeout clock) stays open until the next statement. Close it now.
        await self.conn.execute("SELECT 1")

    async def close(self) -> None:
        await self.conn.close()

    async def _one(self, name: str, params: Mapping[str, Any]) -> Any:
        stmt, names = self.stmts[name]
        return await stmt.fetchrow(*[params[n] for n in names])

    async def _all(self, name: str, params: Mapping[str, Any]) -> Any:
        stmt, names = self.stmts[name]
        return await stmt.fetch(*[params[n] for n in names])

    async def op_get_session(self, x: uuid.UUID) -> Any:
        return await self._one("get_session", {"id": x})

    async def op_validate_session_token(self, x: str) -> Any:
        sid, _, secret = x.partition(".")
        row = await self._one("get_session_for_token", {"id": uuid.UUID(sid)})
        if row is None or not hmac.compare_digest(row[-1], token_digest(secret)):
            return None
        return row

    async def op_get_user_by_email(self, x: str) -> Any:
        return await self._one("get_user_by_email", {"email": x})

    async def op_get_api_key_by_hash(self, x: str) -> Any:
        return await self._one("get_api_key_by_hash", {"hash": x})

    async def op_verify_api_key(self, x: str) -> Any:
        digest = key_digest(x)
        row = await self._one("verify_api_key", {"hash": digest})
        if row is None or not hmac.compare_digest(row[2], digest):
            return None
        return row

    async def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        return await self._all("get_user_permissions", {"user_id": x[0], "org_id": x[1]})

    async def op_create_user(self, x: NewUser) -> Any:
        return await self._one("create_user", create_user_params(x))

    async def op_create_session(self, x: NewSession) -> Any:
        return await self._one("create_session", create_session_params(x))

    async def op_emit_event(self, x: NewEvent) -> Any:
        return await self._one("emit_event", emit_event_params(x))

    async def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        row = await self._one("emit_events", emit_events_params(x, self.emit_events_sql))
        return row[0]

    async def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        return await self._all("create_backup_codes", backup_codes_params(x))

    async def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        row = await self._one(
            "mark_email_verification_token_as_used", {"id": x, "consumer": uuid.uuid4()}
        )
        if row is None or not row[0]:
            raise RuntimeError(f"token {x} was not consumable")
        return row

    async def op_login(self, x: Login) -> Any:
        """Two awaited statements, each its own implicit transaction (not atomic)."""
        session = await self._one("create_session", create_session_params(x.session))
        event = await self._one("emit_event", emit_event_params(x.event))
        return session, event

    async def op_login_one_statement(self, x: Login) -> Any:
        """The adapter's one-statement sign-in (``create_session_with_event``) on asyncpg."""
        return await self._one("create_session_with_event", sign_in_params(x))

    async def op_login_tx(self, x: Login) -> Any:
        """The same two statements inside ``conn.transaction()`` (BEGIN … COMMIT)."""
        async with self.conn.transaction():
            session = await self._one("create_session", create_session_params(x.session))
            event = await self._one("emit_event", emit_event_params(x.event))
        return session, event

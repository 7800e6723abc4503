"""transaction(), nested savepoints and run_in_transaction, against both adapters."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import psycopg
import pytest

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    ConflictError,
    NotFoundError,
    PostgresStorageAdapter,
    QueryTimeoutError,
    ValidationError,
)
from kitium_pg._async import core as async_core
from kitium_pg._base import Retry
from kitium_pg._sync import core as sync_core

from .conftest import AwaitableSync, drive
from .fix_race import waiting_on_a_lock


class Boom(Exception):
    """Raised inside a transaction block to force a rollback."""


async def test_a_transaction_commits_all_its_calls(storage: Any, email: str) -> None:
    async with storage.transaction() as tx:
        user = await tx.create_user(email=email)
        session = await tx.create_session(user_id=user.id, expires_at=_later())
        assert await tx.get_user(user.id) == user
    assert await storage.get_user(user.id) == user
    assert await storage.get_session(session.id) == session


async def test_an_exception_rolls_everything_back(storage: Any, email: str) -> None:
    created: list[Any] = []
    with pytest.raises(Boom):
        async with storage.transaction() as tx:
            created.append(await tx.create_user(email=email))
            raise Boom
    assert await storage.get_user(created[0].id) is None
    assert await storage.get_user_by_email(email) is None


async def test_a_database_error_rolls_back_the_earlier_calls(storage: Any, email: str) -> None:
    existing = await storage.create_user(email=email)
    with pytest.raises(ConflictError):
        async with storage.transaction() as tx:
            await tx.update_user(existing.id, name="changed")
            await tx.create_user(email=email.upper())
    assert (await storage.get_user(existing.id)).name is None


async def test_nested_transactions_are_savepoints(storage: Any, email: str) -> None:
    async with storage.transaction() as tx:
        outer = await tx.create_user(email=email)
        with pytest.raises(Boom):
            async with tx.transaction() as inner:
                await inner.update_user(outer.id, name="inner")
                raise Boom
        assert (await tx.get_user(outer.id)).name is None
    assert await storage.get_user(outer.id) == outer


async def test_run_in_transaction_returns_the_result(storage: Any, email: str) -> None:
    async def work(tx: Any) -> Any:
        user = await tx.create_user(email=email)
        return await tx.update_user(user.id, plan="team")

    user = await storage.run_in_transaction(work)
    assert (await storage.get_user(user.id)).plan == "team"


async def test_timeout_override_applies_inside_a_transaction(storage: Any, dsn: str) -> None:
    user = await storage.create_user()
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT 1 FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        with pytest.raises(QueryTimeoutError):
            async with storage.with_statement_timeout(150).transaction() as tx:
                assert await tx.get_user(uuid.uuid4()) is None
                await tx.update_user(user.id, name="blocked")
        locker.rollback()
    assert (await storage.get_user(user.id)).name is None


def _later() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


async def test_concurrent_calls_on_one_async_transaction_get_their_own_results(
    async_adapter: Any, unique: Any
) -> None:
    import asyncio

    users = [await async_adapter.create_user(email=f"{unique('tx')}@example.com") for _ in range(8)]
    async with async_adapter.transaction() as tx:
        found = await asyncio.gather(*(tx.get_user(u.id) for u in users))
    assert found == users


# -- a transaction's life and its savepoints -------------------------------------------------


def _background(
    storage: Any, call: Callable[[], Coroutine[Any, Any, Any]]
) -> Callable[[], Awaitable[Any]]:
    """Start ``call()`` alongside the test (a task; a thread for the sync adapter); the returned
    function waits for it and gives its result or the exception it raised."""
    if storage.kind == "sync":
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = drive(call())
            except BaseException as exc:  # handed to the test
                box["result"] = exc

        thread = threading.Thread(target=run)
        thread.start()

        async def join() -> Any:
            thread.join(20)
            return box["result"]

        return join
    task = asyncio.ensure_future(call())

    async def wait() -> Any:
        try:
            return await task
        except BaseException as exc:  # handed to the test
            return exc

    return wait


async def test_a_transaction_is_unusable_after_its_block(storage: Any, email: str) -> None:
    async with storage.transaction() as tx:
        user = await tx.create_user(email=email)
    with pytest.raises(ValidationError) as caught:
        await tx.get_user(user.id)
    assert caught.value.field == "transaction"
    with pytest.raises(ValidationError):
        await tx.create_user(email=f"late-{email}")
    with pytest.raises(ValidationError):
        async with tx.transaction():
            pass
    assert await storage.get_user_by_email(f"late-{email}") is None
    with pytest.raises(Boom):
        async with storage.transaction() as rolled_back:
            raise Boom
    with pytest.raises(ValidationError):
        await rolled_back.get_user(user.id)


async def test_a_task_the_block_left_running_cannot_write_after_it(
    async_adapter: Any, unique: Any
) -> None:
    """A task started in the block runs once the block has rolled back: its write is refused
    instead of landing outside the transaction."""
    email = f"{unique('late')}@example.com"
    with pytest.raises(Boom):
        async with async_adapter.transaction() as tx:
            late = asyncio.ensure_future(tx.create_user(email=email))
            raise Boom
    with pytest.raises(ValidationError):
        await late
    assert await async_adapter.get_user_by_email(email) is None


async def test_a_call_still_running_when_the_block_ends_is_waited_for(
    async_adapter: Any, unique: Any
) -> None:
    """A task's call already sent when the block ends: the end waits for it, so its failure
    aborts the block with an error instead of turning the COMMIT into a silent rollback of
    writes the block saw succeed."""
    taken = f"{unique('taken')}@example.com"
    await async_adapter.create_user(email=taken)
    kept = f"{unique('kept')}@example.com"
    with pytest.raises(ConflictError) as caught:
        async with async_adapter.transaction() as tx:
            await tx.create_user(email=kept)
            left = asyncio.ensure_future(tx.create_user(email=taken))
            await asyncio.sleep(0)  # its statement is sent
    assert "rolled back" in str(caught.value)
    with pytest.raises(ConflictError):
        await left
    assert await async_adapter.get_user_by_email(kept) is None


async def test_a_grant_still_running_when_the_block_ends_is_waited_for(
    async_adapter: Any, unique: Any, dsn: str
) -> None:
    """grant_app_role runs its SQL on the transaction's connection outside the per-statement
    path: it is counted and recorded all the same, so the block's end waits for it and raises
    its failure instead of committing nothing in silence."""
    role = f"kpg_r_{uuid.uuid4().hex[:8]}"
    kept = f"{unique('kept')}@example.com"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role}".encode())
    holder = psycopg.connect(dsn)
    try:
        # An uncommitted grant on the same table: the task's grant waits for it, then times out.
        holder.execute(f"GRANT SELECT ON kitium_auth.users TO {role}".encode())
        with pytest.raises(QueryTimeoutError) as caught:
            async with async_adapter.with_statement_timeout(500).transaction() as tx:
                await tx.create_user(email=kept)
                grant = asyncio.ensure_future(tx.grant_app_role(role))
                await asyncio.sleep(0.05)  # its statement is sent, and waits
        assert "rolled back" in str(caught.value)
        with pytest.raises(QueryTimeoutError):
            await grant
    finally:
        holder.rollback()
        holder.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}".encode())
            admin.execute(f"DROP ROLE {role}".encode())
    assert await async_adapter.get_user_by_email(kept) is None


async def test_a_caught_failure_fails_the_block_instead_of_a_silent_rollback(
    storage: Any, email: str
) -> None:
    """PostgreSQL aborts the transaction at the failed call; without this the COMMIT would
    turn into a rollback of every write, with no error."""
    existing = await storage.create_user(email=email)
    with pytest.raises(ConflictError) as caught:
        async with storage.transaction() as tx:
            kept = await tx.create_user(email=f"kept-{email}")
            with pytest.raises(ConflictError):
                await tx.create_user(email=email)  # taken: caught, and the block goes on
    assert "rolled back" in str(caught.value)
    assert caught.value.code == "unique_violation"
    assert isinstance(caught.value.__cause__, ConflictError)
    assert await storage.get_user(kept.id) is None
    assert await storage.get_user(existing.id) == existing

    async def work(tx: Any) -> Any:
        created = await tx.create_user(email=f"work-{email}")
        with contextlib.suppress(ConflictError):
            await tx.create_user(email=email)
        return created

    with pytest.raises(ConflictError):
        await storage.run_in_transaction(work)
    assert await storage.get_user_by_email(f"work-{email}") is None

    # Calls after the caught failure are not run (in_failed_sql_transaction): they raise the
    # failure that aborted the transaction, its class and code, and so does the block, whether
    # or not the later failure is caught.
    for catch_the_later_one in (True, False):
        with pytest.raises(ConflictError) as caught:
            async with storage.transaction() as tx:
                with pytest.raises(ConflictError):
                    await tx.create_user(email=email)
                if catch_the_later_one:
                    with pytest.raises(ConflictError) as later:
                        await tx.get_user(existing.id)
                    assert later.value.code == "unique_violation"
                    assert "get_user: not run, the transaction is aborted" in str(later.value)
                else:
                    await tx.get_user(existing.id)
        assert caught.value.code == "unique_violation"


@pytest.fixture
def trip_schema(dsn: str) -> Any:
    """A private schema whose users table fails the first insert with a deadlock (40P01)."""
    name = f"trip_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE".encode())


def _trip_first_insert(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE SEQUENCE {schema}.trips;
            CREATE FUNCTION {schema}.trip() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              -- nextval is not rolled back with the transaction: only the first insert fails
              IF nextval('{schema}.trips') = 1 THEN
                RAISE EXCEPTION 'deadlock (test)' USING ERRCODE = '40P01';
              END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER trip BEFORE INSERT ON {schema}.users
              FOR EACH ROW EXECUTE FUNCTION {schema}.trip();
            """.encode()
        )


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("then", ["raised", "caught", "caught-then-savepoint"])
async def test_run_in_transaction_reruns_a_deadlock_even_when_work_caught_it(
    kind: str, then: str, dsn: str, trip_schema: str
) -> None:
    """A deadlock rolls the transaction back; a later call in ``work`` raises it again rather
    than an error of its own, so run_in_transaction still sees a deadlock and re-runs."""
    email = f"trip-{uuid.uuid4().hex[:8]}@example.com"
    attempts: list[int] = []

    async def work(tx: Any) -> Any:
        attempts.append(1)
        if then == "raised":
            return await tx.create_user(email=email)
        with contextlib.suppress(ConflictError):
            await tx.create_user(email=email)
        if then == "caught":
            return await tx.get_user_by_email(email)
        # An aborted transaction refuses SAVEPOINT as well: opening one raises the deadlock.
        async with tx.transaction() as savepoint:
            return await savepoint.get_user_by_email(email)

    options: dict[str, Any] = {"schema": trip_schema, "max_retries": 2}
    if kind == "sync":
        sync = PostgresStorageAdapter(dsn, **options)
        sync.connect()
        try:
            _trip_first_insert(dsn, trip_schema)
            result = sync.run_in_transaction(lambda tx: drive(work(AwaitableSync(tx))))
        finally:
            sync.disconnect()
    else:
        async with AsyncPostgresStorageAdapter(dsn, **options) as adapter:
            _trip_first_insert(dsn, trip_schema)
            result = await adapter.run_in_transaction(work)
    assert len(attempts) == 2
    assert result is not None and result.email == email  # written by the second attempt


async def test_a_caught_failure_of_any_class_is_raised_again_as_itself(storage: Any) -> None:
    """A database-side ValidationError (SQLSTATE class 22) has another constructor than the
    other errors: re-raising it at the block's end must not fail with a TypeError."""
    with pytest.raises(ValidationError) as caught:
        async with storage.transaction() as tx:
            view = tx.adapter if storage.kind == "sync" else tx
            bad = {"names": ["statement_timeout"], "values": ["nonsense"]}
            with pytest.raises(ValidationError):
                result = view._value("set_local_settings", bad, retry=Retry.NEVER)
                if storage.kind == "async":
                    await result
    assert "rolled back" in str(caught.value)
    assert caught.value.field == "input"


async def test_a_caught_grant_failure_is_raised_again_as_itself(storage: Any) -> None:
    """grant_app_role runs its SQL outside the per-statement path; its failure inside a
    transaction is still the one the block raises again."""
    missing = f"no_such_role_{uuid.uuid4().hex[:8]}"
    with pytest.raises(NotFoundError) as caught:
        async with storage.transaction() as tx:
            with pytest.raises(NotFoundError):
                await tx.grant_app_role(missing)
    assert "rolled back" in str(caught.value)


async def test_a_failure_inside_a_savepoint_keeps_the_rest(storage: Any, email: str) -> None:
    existing = await storage.create_user(email=email)
    async with storage.transaction() as tx:
        before = await tx.create_user(email=f"before-{email}")
        with pytest.raises(ConflictError):
            async with tx.transaction():
                await tx.create_user(email=email)
        after = await tx.create_user(email=f"after-{email}")
    assert await storage.get_user(before.id) == before
    assert await storage.get_user(after.id) == after
    assert await storage.get_user(existing.id) == existing


async def test_other_callers_are_refused_while_a_savepoint_is_open(
    storage: Any, email: str
) -> None:
    """While one caller holds a savepoint, another caller's write on the same transaction
    would be undone by the savepoint's rollback: it is refused, and nothing of it is written."""
    with pytest.raises(Boom):
        async with storage.transaction() as tx, tx.transaction():
            other = _background(storage, lambda: tx.create_user(email=f"other-{email}"))
            refused = await other()
            mine = await tx.create_user(email=f"mine-{email}")
            raise Boom
    assert isinstance(refused, ValidationError), refused
    assert refused.field == "transaction"
    assert mine.email == f"mine-{email}"
    assert await storage.get_user_by_email(f"other-{email}") is None
    async with storage.transaction() as tx:
        async with tx.transaction():
            pass  # released: the savepoint's end lets every caller in again
        assert await _background(storage, lambda: tx.get_user(mine.id))() is None


async def test_no_savepoint_while_another_callers_call_runs(
    storage: Any, email: str, dsn: str
) -> None:
    user = await storage.create_user(email=email)
    locker = psycopg.connect(dsn)
    try:
        locker.execute("SELECT 1 FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        async with storage.transaction() as tx:
            # Another caller's update waits on the row lock, inside the transaction.
            other = _background(storage, lambda: tx.update_user(user.id, name="other"))
            await _until(lambda: waiting_on_a_lock(dsn))
            with pytest.raises(ValidationError) as caught:
                async with tx.transaction():
                    pass
            assert caught.value.field == "transaction"
            locker.rollback()
            updated = await other()
        assert updated.name == "other"
    finally:
        locker.close()
    assert (await storage.get_user(user.id)).name == "other"


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never held")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_run_in_transaction_on_an_aborted_transaction_raises_at_once(
    kind: str, dsn: str, trip_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nested in a transaction a caught deadlock has aborted, no savepoint can open: the
    deadlock is raised without an attempt and without sleeping through the retries."""
    module = sync_core if kind == "sync" else async_core
    waits: list[int] = []

    def backoff(attempt: int) -> float:
        waits.append(attempt)
        return 0.0

    monkeypatch.setattr(module, "backoff", backoff)
    calls: list[int] = []

    async def work(tx: Any) -> None:
        calls.append(1)

    email = f"trip-{uuid.uuid4().hex[:8]}@example.com"
    options: dict[str, Any] = {"schema": trip_schema, "max_retries": 5}
    if kind == "sync":
        sync = PostgresStorageAdapter(dsn, **options)
        sync.connect()
        storage: Any = AwaitableSync(sync)
    else:
        storage = AsyncPostgresStorageAdapter(dsn, **options)
        await storage.connect()
    try:
        _trip_first_insert(dsn, trip_schema)
        with pytest.raises(ConflictError) as raised:
            async with storage.transaction() as tx:
                with contextlib.suppress(ConflictError):
                    await tx.create_user(email=email)  # the deadlock, caught
                await tx.run_in_transaction(work)
        assert raised.value.code == "deadlock_detected"
        assert calls == [] and waits == []
    finally:
        if kind == "sync":
            sync.disconnect()
        else:
            await storage.disconnect()


async def test_a_block_waits_for_a_savepoint_another_task_holds(dsn: str, trip_schema: str) -> None:
    """The block ends while another task is inside a savepoint on it: the end waits for that
    savepoint (whose later calls are refused, so it rolls back) before the COMMIT, rather than
    commit under it and hand the connection back to the pool mid-savepoint."""
    unique = uuid.uuid4().hex[:8]
    async with AsyncPostgresStorageAdapter(dsn, schema=trip_schema, max_size=1) as storage:
        inside, go_on = asyncio.Event(), asyncio.Event()
        refused: list[str] = []

        async def holder(tx: Any) -> None:
            try:
                async with tx.transaction() as savepoint:
                    await savepoint.create_user(email=f"held-{unique}@example.com")
                    inside.set()
                    await go_on.wait()
                    await savepoint.create_user(email=f"late-{unique}@example.com")
            except ValidationError as exc:
                refused.append(exc.field)

        async with storage.transaction() as tx:
            kept = await tx.create_user(email=f"kept-{unique}@example.com")
            task = asyncio.create_task(holder(tx))
            await inside.wait()
            asyncio.get_running_loop().call_later(0.05, go_on.set)
        await task
        assert refused == ["transaction"]
        assert await storage.get_user(kept.id) == kept
        assert await storage.get_user_by_email(f"held-{unique}@example.com") is None
        # The pool's one connection serves the next transaction cleanly.
        async with storage.transaction() as tx:
            after = await tx.create_user(email=f"after-{unique}@example.com")
        assert await storage.get_user(after.id) == after


def test_a_thread_finding_the_transaction_aborted_gets_the_failure_not_25p02(
    dsn: str, trip_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread A's statement fails; psycopg lets thread B's statement through before A has
    recorded its failure (here: A records slowly). B waits for the record and raises A's
    failure, not InternalError(sqlstate_25P02), so run_in_transaction can judge it."""
    from kitium_pg import _transaction
    from kitium_pg.errors import translate as real

    def slow(exc: BaseException, *, operation: str) -> Any:
        if operation == "create_user":
            time.sleep(0.3)
        return real(exc, operation=operation)

    email = f"taken-{uuid.uuid4().hex[:8]}@example.com"
    outcome: dict[str, BaseException] = {}
    with PostgresStorageAdapter(dsn, schema=trip_schema, max_size=1) as storage:
        storage.create_user(email=email)
        monkeypatch.setattr(_transaction, "translate", slow)
        with pytest.raises(ConflictError), storage.transaction() as tx:

            def call(name: str, work: Callable[[], Any]) -> None:
                try:
                    work()
                except BaseException as exc:  # reported below
                    outcome[name] = exc

            a = threading.Thread(target=call, args=("a", lambda: tx.create_user(email=email)))
            b = threading.Thread(target=call, args=("b", lambda: tx.get_user_by_email(email)))
            a.start()
            time.sleep(0.1)  # A's insert has failed; A is recording it
            b.start()
            a.join()
            b.join()
    assert isinstance(outcome["a"], ConflictError)
    assert isinstance(outcome["b"], ConflictError), outcome["b"]
    assert getattr(outcome["b"], "code", None) == "unique_violation"


async def test_a_cancelled_call_is_the_failure_later_calls_raise(
    dsn: str, trip_schema: str
) -> None:
    """A call cancelled while it runs (asyncio.wait_for) aborts the transaction: psycopg
    cancels the statement and swallows the answer. Later calls and the block raise that."""
    async with AsyncPostgresStorageAdapter(dsn, schema=trip_schema) as storage:
        user = await storage.create_user()
        with psycopg.connect(dsn) as locker:
            locker.execute(
                f"SELECT 1 FROM {trip_schema}.users WHERE id = %s FOR UPDATE".encode(), [user.id]
            )
            with pytest.raises(QueryTimeoutError) as raised:
                async with storage.transaction() as tx:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(tx.update_user(user.id, name="waits"), 0.2)
                    with pytest.raises(QueryTimeoutError) as later:
                        await tx.get_user(user.id)
                    assert later.value.code == "query_canceled"
            locker.rollback()
        assert raised.value.code == "query_canceled"

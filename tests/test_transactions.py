"""transaction(), nested savepoints and run_in_transaction, against both adapters."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
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

from .conftest import open_adapter
from .fix_holder import in_background
from .fix_proxy import CuttingProxy
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


def _later() -> dt.datetime:
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
    """A private schema (a test makes its first user inserts fail: ``_trip_first_inserts``)."""
    name = f"trip_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE".encode())


def _trip_first_inserts(dsn: str, schema: str, failures: int) -> None:
    """Make the first ``failures`` inserts into ``schema``'s users fail with a deadlock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE SEQUENCE {schema}.trips;
            CREATE FUNCTION {schema}.trip() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              -- nextval is not rolled back with the transaction: only the first ones fail
              IF nextval('{schema}.trips') <= {failures} THEN
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

    result = await _run_tripped(kind, dsn, trip_schema, 1, work)
    assert len(attempts) == 2
    assert result is not None and result.email == email  # written by the second attempt


async def _run_tripped(
    kind: str, dsn: str, schema: str, failures: int, work: Callable[[Any], Coroutine[Any, Any, Any]]
) -> Any:
    """``run_in_transaction(work)`` with ``max_retries=2`` on an adapter of ``kind`` whose
    first ``failures`` user inserts fail with a deadlock (in ``schema``)."""
    async with open_adapter(kind, dsn, schema=schema, max_retries=2) as adapter:
        _trip_first_inserts(dsn, schema, failures)
        return await adapter.run_in_transaction(work)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("failures", [2, 3])
async def test_run_in_transaction_reruns_exactly_max_retries_times(
    kind: str, failures: int, dsn: str, trip_schema: str
) -> None:
    """With max_retries=2, two deadlocks in a row are re-run (the third attempt commits) and
    a third is raised: three attempts either way (found by mutation testing: the tests saw a
    single re-run only)."""
    email = f"trip-{uuid.uuid4().hex[:8]}@example.com"
    attempts: list[int] = []

    async def work(tx: Any) -> Any:
        attempts.append(1)
        return await tx.create_user(email=email)

    if failures == 2:
        assert (await _run_tripped(kind, dsn, trip_schema, failures, work)).email == email
    else:
        with pytest.raises(ConflictError) as caught:
            await _run_tripped(kind, dsn, trip_schema, failures, work)
        assert caught.value.code == "deadlock_detected"
    assert len(attempts) == 3


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
            other = in_background(storage, lambda: tx.create_user(email=f"other-{email}"))
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
        assert await in_background(storage, lambda: tx.get_user(mine.id))() is None


async def test_no_savepoint_while_another_callers_call_runs(
    storage: Any, email: str, dsn: str
) -> None:
    user = await storage.create_user(email=email)
    locker = psycopg.connect(dsn)
    try:
        locker.execute("SELECT 1 FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        async with storage.transaction() as tx:
            # Another caller's update waits on the row lock, inside the transaction.
            other = in_background(storage, lambda: tx.update_user(user.id, name="other"))
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
    async with open_adapter(kind, dsn, schema=trip_schema, max_retries=5) as storage:
        _trip_first_inserts(dsn, trip_schema, 1)
        with pytest.raises(ConflictError) as raised:
            async with storage.transaction() as tx:
                with contextlib.suppress(ConflictError):
                    await tx.create_user(email=email)  # the deadlock, caught
                await tx.run_in_transaction(work)
        assert raised.value.code == "deadlock_detected"
        assert calls == [] and waits == []


async def _hold_a_savepoint(
    tx: Any, unique: str, inside: asyncio.Event, go_on: asyncio.Event, refused: list[str]
) -> None:
    """Open a savepoint on ``tx``, write in it, set ``inside``, wait for ``go_on``, then write
    again: refused once the block has ended (the field is added to ``refused``), so the
    savepoint rolls back."""
    try:
        async with tx.transaction() as savepoint:
            await savepoint.create_user(email=f"held-{unique}@example.com")
            inside.set()
            await go_on.wait()
            await savepoint.create_user(email=f"late-{unique}@example.com")
    except ValidationError as exc:
        refused.append(exc.field)


async def test_a_block_waits_for_a_savepoint_another_task_holds(dsn: str, trip_schema: str) -> None:
    """The block ends while another task is inside a savepoint on it: the end waits for that
    savepoint (whose later calls are refused, so it rolls back) before the COMMIT, rather than
    commit under it and hand the connection back to the pool mid-savepoint."""
    unique = uuid.uuid4().hex[:8]
    async with AsyncPostgresStorageAdapter(dsn, schema=trip_schema, max_size=1) as storage:
        inside, go_on = asyncio.Event(), asyncio.Event()
        refused: list[str] = []

        async with storage.transaction() as tx:
            kept = await tx.create_user(email=f"kept-{unique}@example.com")
            task = asyncio.create_task(_hold_a_savepoint(tx, unique, inside, go_on, refused))
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


async def test_a_block_cancelled_while_it_waits_for_a_savepoint_raises_the_cancellation(
    dsn: str, trip_schema: str
) -> None:
    """Found in review: a task cancelled while its block's end waited for another task's
    savepoint rolled back under that savepoint; psycopg refused the ROLLBACK, the caller got
    InternalError instead of CancelledError and the pool discarded the connection. The end
    waits on through the cancellation, rolls back once the savepoint is gone, and raises it."""
    unique = uuid.uuid4().hex[:8]
    async with AsyncPostgresStorageAdapter(dsn, schema=trip_schema, max_size=1) as storage:
        inside, go_on = asyncio.Event(), asyncio.Event()
        refused: list[str] = []
        kept: list[Any] = []
        held: list[asyncio.Task[None]] = []

        async def block() -> None:
            async with storage.transaction() as tx:
                kept.append(await tx.create_user(email=f"kept-{unique}@example.com"))
                held.append(
                    asyncio.create_task(_hold_a_savepoint(tx, unique, inside, go_on, refused))
                )
                await inside.wait()

        ending = asyncio.create_task(block())
        await inside.wait()
        await asyncio.sleep(0.05)  # the block has ended: it waits for the savepoint
        ending.cancel()
        asyncio.get_running_loop().call_later(0.1, go_on.set)
        with pytest.raises(asyncio.CancelledError):
            await ending
        await held[0]
        assert refused == ["transaction"]
        assert await storage.get_user(kept[0].id) is None  # rolled back
        async with storage.transaction() as tx:  # on the pool's one connection, clean
            after = await tx.create_user(email=f"after-{unique}@example.com")
        assert await storage.get_user(after.id) == after


def test_an_interrupt_while_the_block_waits_for_a_savepoint_is_raised_after_it(
    dsn: str, trip_schema: str
) -> None:
    """The sync adapter's end of a block waits the same way for a savepoint another thread
    holds: an interrupt meanwhile (Ctrl-C's KeyboardInterrupt; here a signal handler's own
    exception) is raised once the savepoint is gone, after the rollback, instead of an
    InternalError (found in review)."""

    class Interrupted(BaseException):
        pass

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    unique = uuid.uuid4().hex[:8]
    inside, go_on = threading.Event(), threading.Event()
    refused: list[str] = []

    def holder(tx: Any) -> None:
        try:
            with tx.transaction() as savepoint:
                savepoint.create_user(email=f"held-{unique}@example.com")
                inside.set()
                go_on.wait(10)
                savepoint.create_user(email=f"late-{unique}@example.com")
        except ValidationError as exc:
            refused.append(exc.field)

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with PostgresStorageAdapter(dsn, schema=trip_schema, max_size=1) as storage:
            with pytest.raises(Interrupted), storage.transaction() as tx:
                kept = tx.create_user(email=f"kept-{unique}@example.com")
                thread = threading.Thread(target=holder, args=(tx,))
                thread.start()
                assert inside.wait(10)
                # while the block's end waits for the savepoint
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                threading.Timer(0.2, go_on.set).start()
            thread.join(10)
            assert refused == ["transaction"]
            assert storage.get_user(kept.id) is None
            with storage.transaction() as tx:
                after = tx.create_user(email=f"after-{unique}@example.com")
            assert storage.get_user(after.id) == after
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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


def _interrupt_after_the_statement(storage: Any, monkeypatch: pytest.MonkeyPatch) -> type:
    """Make the next ``update_user`` on a transaction be interrupted (a cancellation, Ctrl-C
    for the sync adapter) once its statement has run on the server: the interruption arrives
    after the server finished, as it most often did in review, and the transaction is still
    open. Only that call: a KeyboardInterrupt anywhere else would stop the test run (with
    ``pgbouncer=True`` the block's own first statement sets its timeout). Returns the
    interruption's class."""
    cls: Any = type(storage.adapter) if storage.kind == "sync" else type(storage)
    original = cls._execute_on
    armed = [True]

    def interrupt(view: Any, query: Any) -> None:
        if armed and view._tx is not None and query.name == "update_user":
            armed.clear()
            raise KeyboardInterrupt if storage.kind == "sync" else asyncio.CancelledError

    if storage.kind == "sync":

        def execute_on(self: Any, conn: Any, query: Any, *args: Any) -> Any:
            result = original(self, conn, query, *args)
            interrupt(self, query)
            return result

    else:

        async def execute_on(self: Any, conn: Any, query: Any, *args: Any) -> Any:  # type: ignore[misc]
            result = await original(self, conn, query, *args)
            interrupt(self, query)
            return result

    monkeypatch.setattr(cls, "_execute_on", execute_on)
    return KeyboardInterrupt if storage.kind == "sync" else asyncio.CancelledError


async def test_a_call_interrupted_after_its_statement_ran_rolls_the_block_back(
    storage: Any, email: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a call interrupted once its statement had finished on the server left
    the transaction open, and a block that caught the interruption committed the write the
    caller had been told was cancelled (77 times in 78 in one run). Whether an interrupted
    call's statement took effect is unknown, so later calls and the block raise
    ``QueryTimeoutError`` (``query_canceled``) and the block rolls back; in a savepoint, only
    the savepoint does."""
    user = await storage.create_user(email=email, name="before")
    interruption = _interrupt_after_the_statement(storage, monkeypatch)
    with pytest.raises(QueryTimeoutError) as raised:
        async with storage.transaction() as tx:
            with pytest.raises(interruption):
                await tx.update_user(user.id, name="interrupted")
            with pytest.raises(QueryTimeoutError) as later:
                await tx.get_user(user.id)
            assert later.value.code == "query_canceled"
    assert raised.value.code == "query_canceled"
    assert (await storage.get_user(user.id)).name == "before"

    interruption = _interrupt_after_the_statement(storage, monkeypatch)
    async with storage.transaction() as tx:
        with pytest.raises(QueryTimeoutError):  # raised by the savepoint's end
            async with tx.transaction() as savepoint:
                with pytest.raises(interruption):
                    await savepoint.update_user(user.id, name="interrupted")
        await tx.update_user(user.id, name="after")
    assert (await storage.get_user(user.id)).name == "after"


@contextlib.asynccontextmanager
async def _interrupted_after(kind: str, seconds: float) -> AsyncIterator[None]:
    """Interrupt the body ``seconds`` from now, as its caller would: a cancellation by
    ``asyncio.timeout`` (raised as ``TimeoutError``) for the async adapter, Ctrl-C's
    ``KeyboardInterrupt`` (from a timer signal) for the sync one."""
    if kind == "async":
        async with asyncio.timeout(seconds):
            yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("body_raises", [False, True], ids=["released", "rolled-back"])
async def test_a_savepoint_whose_end_is_interrupted_rolls_the_block_back(
    storage: Any, email: str, dsn: str, body_raises: bool
) -> None:
    """Found in review: a nested block interrupted while its savepoint's RELEASE was on its
    way raised the interruption, but psycopg cancels and drains the statement, and the server
    had run the RELEASE: the block's write belonged to the transaction, and a caller that
    caught the interruption committed it. Whether the end of a savepoint (its RELEASE, or its
    ROLLBACK TO when the block raised) ran is unknown once it is interrupted, so the
    transaction rolls back: later calls and its end raise ``QueryTimeoutError``."""
    with CuttingProxy(dsn) as proxy:
        async with open_adapter(storage.kind, proxy.dsn, migrate=False) as own:
            with pytest.raises(QueryTimeoutError) as raised:
                async with own.transaction() as tx:
                    kept = await tx.create_user(email=f"kept-{email}")
                    interruption = TimeoutError if storage.kind == "async" else KeyboardInterrupt
                    with pytest.raises(interruption):
                        async with (
                            _interrupted_after(storage.kind, 0.3),
                            tx.transaction() as nested,
                        ):
                            await nested.create_user(email=email)
                            proxy.delay("RELEASE" if not body_raises else "ROLLBACK TO", 1.0)
                            if body_raises:
                                raise Boom
                    assert proxy.seen("RELEASE") >= 1  # the savepoint's end was sent
                    with pytest.raises(QueryTimeoutError) as later:
                        await tx.get_user(kept.id)
                    assert later.value.code == "query_canceled"
    assert raised.value.code == "query_canceled"
    assert await storage.get_user_by_email(email) is None
    assert await storage.get_user(kept.id) is None


async def test_expiry_and_use_times_are_those_of_each_statement_not_of_the_transaction(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Each statement judges expiry, and stamps a use or a verification, at the time it starts
    (``statement_timestamp()``), not at its transaction's start (``now()``): a credential that
    expires while a caller's transaction is open is expired for the transaction's later calls,
    its purge takes it, and a use is stamped when it happened. Every query that judges expiry
    or stamps a use and may run in a caller's transaction (those that must commit on their own
    refuse one, and there the two times are the same)."""
    # A window the setup fits in even on a loaded machine: the first call inside the
    # transaction checks that everything is still live when the transaction starts.
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    user = await storage.create_user(email=email)
    org = await storage.create_organization(name=unique("org"), plan="free", seats=5)
    await storage.add_organization_member(org.id, user.id)
    session = await storage.create_session(user_id=user.id, expires_at=soon)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=soon)
    key = await storage.issue_api_key(user.id, expires_at=soon)
    lasting_key = await storage.issue_api_key(user.id)
    code = {"email": email, "type": "verify_email"}
    token = await storage.create_email_verification_token(
        **code, code_hash=_digest(unique("c")), expires_at=soon
    )
    assert await storage.increment_email_verification_token_attempts(token.id) == 1
    lasting_token = await storage.create_email_verification_token(
        **code, code_hash=_digest(unique("c")), expires_at=_later()
    )
    assert await storage.get_email_verification_token_attempts(lasting_token.id) == 1
    revoked = await storage.create_email_verification_token(
        **code, code_hash=_digest(unique("c")), expires_at=_later()
    )
    device = await storage.create_two_factor_device(
        user_id=user.id, method="totp", secret="JBSWY3DPEHPK3PXP"
    )
    live_login = await storage.create_session(user_id=user.id, expires_at=_later())
    challenge = {"user_id": user.id, "device_id": device.id}
    totp = await storage.create_two_factor_session(
        **challenge, session_id=live_login.id, method="totp", expires_at=soon
    )
    orphaned = await storage.create_two_factor_session(
        **challenge, session_id=session.id, method="totp", expires_at=_later()
    )
    lasting = await storage.create_two_factor_session(
        **challenge, session_id=live_login.id, method="totp", expires_at=_later()
    )
    backup = await storage.create_backup_codes(user.id, [_digest(unique("b")) for _ in "ab"])
    provider = await storage.create_sso_provider(type="oidc", name=unique("provider"))
    domain = f"{unique('d')}.example.com"
    await storage.add_sso_provider_domain(provider.id, domain)
    bound = {"user_id": user.id, "provider_id": provider.id, "provider_type": "oidc"}
    await storage.create_sso_link(**bound, provider_subject="s")
    sso = await storage.create_sso_session(**bound, provider_subject="s", expires_at=soon)
    # a user who moves to another address: the trigger ends its tokens sent to the old one
    mover = await storage.create_user(email=unique("mover") + "@example.com")
    old_address = {"email": mover.email, "type": "password_reset", "user_id": mover.id}
    ends_in_window = await storage.create_email_verification_token(
        **old_address, code_hash=_digest(unique("c")), expires_at=soon
    )
    ended_by_move = await storage.create_email_verification_token(
        **old_address, code_hash=_digest(unique("c")), expires_at=_later()
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        # last used just under a minute before the window closes: a stamp is due a minute
        # after that, which is after the window by the statement's clock, not the transaction's
        conn.execute(
            "UPDATE kitium_auth.api_keys SET last_used_at = %s - interval '1 minute' WHERE id = %s",
            [soon, lasting_key.record.id],
        )

    async with storage.transaction() as tx:
        assert await tx.get_session(session.id) == session, "the setup outran its window"
        await asyncio.sleep((soon - dt.datetime.now(dt.UTC)).total_seconds() + 0.2)

        # expired, though not yet at the transaction's start
        assert await tx.get_session(session.id) is None
        assert [s.id for s in await tx.list_user_sessions(user.id)] == [live_login.id]
        assert [s.id for s in await tx.list_user_sessions(user.id, limit=5)] == [live_login.id]
        assert await tx.validate_session_token(issued.token) is None
        for change in ({"plan": "pro"}, {"org_id": org.id}):
            with pytest.raises(NotFoundError):
                async with tx.transaction() as savepoint:
                    await savepoint.update_session(session.id, **change)
        assert await tx.get_api_key_by_hash(key.record.hash) is None
        assert await tx.verify_api_key(key.key) is None
        same_look = await tx.get_api_keys_by_prefix_and_last_four(
            key.record.prefix, key.record.last_four
        )
        assert key.record.id not in {k.id for k in same_look}
        with pytest.raises(ConflictError):
            async with tx.transaction() as savepoint:
                await savepoint.mark_email_verification_token_as_used(token.id)
        # the expired token's attempts no longer count against its address
        assert await tx.get_email_verification_token_attempts(lasting_token.id) == 0
        assert await tx.complete_two_factor_session(totp.id) is False
        # a live challenge whose login session expired, and a new one on that session
        assert await tx.complete_two_factor_session(orphaned.id) is False
        with pytest.raises(NotFoundError, match="no session"):
            async with tx.transaction() as savepoint:
                await savepoint.create_two_factor_session(
                    **challenge, session_id=session.id, method="totp", expires_at=_later()
                )
        assert await tx.get_sso_session(sso.id) is None

        # uses and verifications are stamped when they happen, after the window closed
        used = await tx.mark_email_verification_token_as_used(lasting_token.id)
        assert used.used_at is not None and used.used_at > soon
        # the expired token is not revoked, the live one is, now
        assert await tx.revoke_email_verification_tokens(email, "verify_email") == 1
        gone = await tx.get_email_verification_token_by_id(revoked.id)
        assert gone is not None and gone.used_at is not None and gone.used_at > soon
        consumed = await tx.consume_backup_code(user.id, backup[0].code_hash)
        assert consumed is not None and consumed.used_at is not None and consumed.used_at > soon
        assert await tx.mark_backup_code_used(backup[1].id) is True
        assert await tx.complete_two_factor_session(lasting.id) is True
        assert await tx.record_totp_step(device.id, 1) is True
        verified = await tx.verify_api_key(lasting_key.key)
        assert verified is not None and verified.last_used_at is not None
        assert verified.last_used_at > soon
        marked = await tx.mark_user_email_verified(user.id, email)
        assert marked is not None and marked.email_verified_at is not None
        assert marked.email_verified_at > soon
        await tx.update_user(mover.id, email=unique("moved") + "@example.com")
        expired_token = await tx.get_email_verification_token_by_id(ends_in_window.id)
        assert expired_token is not None and expired_token.used_at is None
        ended = await tx.get_email_verification_token_by_id(ended_by_move.id)
        assert ended is not None and ended.used_at is not None and ended.used_at > soon
        checked = await tx.verify_sso_provider_domain(provider.id, domain)
        assert checked.verified_at is not None and checked.verified_at > soon
        added = await tx.add_sso_provider_domain(provider.id, f"x{domain}", verified=True)
        assert added.verified_at is not None and added.verified_at > soon
        now_session = await tx.create_sso_session(
            **bound, provider_subject="s", expires_at=_later()
        )
        assert now_session.last_auth_at > soon
        # a future last_auth_at stays on the session; the link's is capped at the statement's
        await tx.create_sso_session(
            **bound, provider_subject="s", expires_at=_later(), last_auth_at=_later()
        )
        link = await tx.get_sso_link_by_subject(provider.id, "s")
        assert link is not None and now_session.last_auth_at < link.last_auth_at < _later()
        new_link = await tx.create_sso_link(**bound, provider_subject="t")
        assert new_link.last_auth_at is not None and new_link.last_auth_at > soon

        # the purges take what expired in the transaction
        await tx.delete_expired_sessions()
        await tx.delete_expired_email_verification_tokens()
        await tx.delete_expired_two_factor_sessions()
        await tx.delete_expired_sso_sessions()

    purged = {
        "sessions": [session.id, issued.session.id],
        "email_verification_tokens": [token.id],
        "twofa_sessions": [totp.id],
        "sso_sessions": [sso.id],
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table, ids in purged.items():
            query = f"SELECT count(*) FROM kitium_auth.{table} WHERE id = ANY(%s)"
            assert conn.execute(query, [ids]).fetchone() == (0,), table
    codes = {c.id: c for c in await storage.get_backup_codes(user.id)}
    stamped = codes[backup[1].id].used_at
    assert stamped is not None and stamped > soon
    completed = await storage.get_two_factor_session(lasting.id)
    assert completed is not None and completed.completed_at is not None
    assert completed.completed_at > soon
    used_device = await storage.get_two_factor_device(device.id)
    assert used_device is not None and used_device.last_used_at is not None
    assert used_device.last_used_at > soon


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


async def test_rows_one_transaction_makes_list_newest_first_by_their_ids(
    storage: Any, email: str, unique: Callable[[str], str]
) -> None:
    """Rows one transaction makes share its time (``created_at``, an event's ``timestamp``, a
    link's ``linked_at``): each list that promises newest first breaks that tie by id, which
    the adapter draws time-ordered (UUIDv7), so it still lists them newest first."""
    async with storage.transaction() as tx:
        user = await tx.create_user(email=email)
        org = await tx.create_organization(name=unique("org"), plan="team")
        keys = [(await tx.issue_api_key(user.id)).record for _ in range(3)]
        look = {"prefix": unique("p")[:16], "last_four": "tie4"}
        alike = [
            await tx.create_api_key(principal_id=user.id, hash=_digest(unique("k")), **look)
            for _ in range(3)
        ]
        tokens = [
            await tx.create_email_verification_token(
                email=email, code_hash=_digest(unique("t")), type="verify_email",
                expires_at=_later(),
            )
            for _ in range(3)
        ]  # fmt: skip
        kind = unique("tie")
        events = [
            await tx.emit_event(type=kind, principal_id=user.id, org_id=org.id, data=None)
            for _ in range(3)
        ]
        roles = [await tx.create_role(org_id=org.id, name=unique("role")) for _ in range(3)]
        providers = [
            await tx.create_sso_provider(type="oidc", name=unique("idp"), org_id=org.id)
            for _ in range(3)
        ]
        links = [
            await tx.create_sso_link(
                user_id=user.id, provider_id=p.id, provider_type="oidc", provider_subject="s"
            )
            for p in providers
        ]
    assert len({k.created_at for k in keys}) == 1  # the tie the lists must break

    def newest_first(made: list[Any]) -> list[Any]:
        return [row.id for row in reversed(made)]

    def ids(rows: Any, among: list[Any] | None = None) -> list[Any]:
        wanted = None if among is None else {row.id for row in among}
        return [row.id for row in rows if wanted is None or row.id in wanted]

    assert ids(await storage.list_api_keys(user.id)) == newest_first(keys + alike)
    alike_listed = await storage.get_api_keys_by_prefix_and_last_four(**look)
    assert ids(alike_listed) == newest_first(alike)
    assert ids(await storage.get_email_verification_tokens(email)) == newest_first(tokens)
    of_type = await storage.get_email_verification_tokens(email, "verify_email")
    assert ids(of_type) == newest_first(tokens)
    for query in ({"principal_id": user.id}, {"org_id": org.id}, {"type": kind}):
        assert ids((await storage.list_events(**query)).events) == newest_first(events), query
    assert ids(await storage.list_roles(org.id)) == newest_first(roles)
    assert ids(await storage.list_sso_providers(org.id), providers) == newest_first(providers)
    assert ids(await storage.list_sso_providers(), providers) == newest_first(providers)
    assert ids(await storage.get_user_sso_links(user.id)) == newest_first(links)


def test_an_interruption_as_a_call_ends_does_not_keep_the_block_from_ending(dsn: str) -> None:
    """Found in the fourth review: a KeyboardInterrupt landing as a call inside transaction()
    ended (at the entry of running()'s __exit__, after its statement had run) left the call
    counted, and the end of the block waited for it forever, holding the transaction open and
    its row locks. A caller's own calls are no longer waited for. Injected by a trace function
    at that point, as a signal handler raises it there, in a thread of its own (a hang fails
    the test rather than stop the run); only that call is interrupted."""
    storage = PostgresStorageAdapter(dsn, max_size=2)
    storage.connect()
    user = storage.create_user(email=f"ended-{uuid.uuid4().hex[:8]}@example.com")
    outcome: list[BaseException | None] = []

    def interrupt_as_running_ends(frame: Any, event: str, arg: Any) -> Any:
        manager = frame.f_locals.get("self") if event == "call" else None
        if (
            frame.f_code.co_name == "__exit__"
            and getattr(getattr(manager, "gen", None), "__name__", None) == "running"
            and frame.f_locals.get("typ") is None
            and not outcome
        ):
            outcome.append(None)  # injected once
            raise KeyboardInterrupt
        return None

    def block() -> None:
        try:
            with storage.transaction() as tx:
                sys.settrace(interrupt_as_running_ends)
                try:
                    tx.update_user(user.id, name="interrupted")
                finally:
                    sys.settrace(None)
        except BaseException as exc:  # the outcome is checked below
            outcome.append(exc)

    worker = threading.Thread(target=block, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the block's end waited for the interrupted call"
    assert outcome[0] is None and isinstance(outcome[-1], KeyboardInterrupt), outcome
    stored = storage.get_user(user.id)
    assert stored is not None and stored.name is None  # rolled back
    storage.disconnect()

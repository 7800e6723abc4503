"""What the views of one transaction share, for both adapters (no I/O here)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from .errors import (
    InternalError,
    KitiumPgError,
    QueryTimeoutError,
    ValidationError,
    rebuild,
    translate,
)


class TransactionState:
    """What the views of one transaction share: whether it is still open, which caller holds
    a savepoint on it, how many calls are running on it, and the last call that failed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held briefly, never across I/O
        self.open = True
        self.holder: object | None = None
        self.depth = 0
        # Calls running on the transaction, per caller (task, or thread for the sync adapter).
        # Per caller because a KeyboardInterrupt can land between a count and the code that
        # takes it back (as running()'s generator is left, say): a count so leaked is its
        # caller's own, and a caller never waits for its own calls, which cannot still run.
        # The end of the block used to wait for it forever (found in review).
        self.calls: dict[object, int] = {}
        self.failure: KitiumPgError | None = None
        # A call was interrupted while it ran: whether its statement took effect is unknown,
        # so the transaction must not commit (see running).
        self.interrupted = False

    @contextmanager
    def running(self, caller: object, operation: str) -> Iterator[None]:
        """Around one statement on the transaction's connection (a plain context manager: no
        I/O, so the async adapter uses it too). Refuses it as ``check_usable`` does, counts it
        while it runs (the block's end waits for running ones) and records its failure before
        it stops counting, so the block's end cannot miss it."""
        with self.lock:
            self.check_usable(caller)
            interrupted = self.interrupted
            if not interrupted:
                self.calls[caller] = self.calls.get(caller, 0) + 1
        if interrupted:
            self.raise_for_aborted_call(operation)
        try:
            yield
        except psycopg.errors.InFailedSqlTransaction:
            self.raise_for_aborted_call(operation)
            raise  # no failure recorded yet: the adapter waits for it (another thread's)
        except psycopg.Error as exc:
            self.record(exc, operation)
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Interrupted while it ran: psycopg cancels the statement on the server, which
            # aborts the transaction, and swallows the server's answer; or the statement had
            # already finished, or had not been sent, and the transaction is still open. The
            # caller cannot know which, so the transaction is treated as aborted either way:
            # later calls and the end of the block raise this, and the block rolls back. (Only
            # an aborted one used to: found in review, a block that caught the cancellation
            # committed the write it had been told was cancelled, most times.)
            self.interrupt(f"{operation}: interrupted while it ran (the call was cancelled)")
            raise
        finally:
            with self.lock:
                left = self.calls.pop(caller, 1) - 1
                if left:
                    self.calls[caller] = left

    def interrupt(self, what: str) -> None:
        """Note that a statement whose effect is unknown was interrupted (``what`` says which):
        the transaction must not commit. Later calls and the end of the block raise the first
        failure recorded, this one (``QueryTimeoutError``) when there was none."""
        with self.lock:
            self.interrupted = True
            if self.failure is None:
                self.failure = QueryTimeoutError(
                    f"{what}, which aborts the transaction", code="query_canceled"
                )

    def others_running_locked(self, caller: object) -> bool:
        """Whether callers other than ``caller`` have calls running on the transaction (hold
        ``lock``)."""
        return any(other is not caller for other in self.calls)

    def others_running(self, caller: object) -> bool:
        """``others_running_locked``, taking the lock."""
        with self.lock:
            return self.others_running_locked(caller)

    def busy_besides(self, caller: object) -> bool:
        """Whether callers other than ``caller`` have calls running, or hold a savepoint: what
        the end of the block, run by ``caller``, waits for. Its own are not waited for: by then
        they have ended, and any count left is one an interruption leaked."""
        with self.lock:
            return self.others_running_locked(caller) or bool(
                self.depth and self.holder is not caller
            )

    def refuse_unrunnable(
        self, caller: object, operation: str, conn: psycopg.BaseConnection[Any]
    ) -> None:
        """Before a call sends (and an observer sees) anything: raise what it would end with
        without its statement running. ``check_usable``'s refusals; an interrupted call's; and,
        when ``conn``'s transaction is aborted and a failure is recorded, that failure, which
        the server's in_failed_sql_transaction would only have led to after a round trip. Not
        an operation, so not observed (observe.py). ``running`` checks again, under the lock
        of the statement itself: this is an early answer, not the guard."""
        with self.lock:
            self.check_usable(caller)
            refused = self.interrupted or (
                self.failure is not None
                and conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            )
        if refused:
            self.raise_for_aborted_call(operation)

    def raise_for_aborted_call(self, operation: str) -> None:
        """For a call ``operation`` that found the transaction aborted (in_failed_sql_transaction):
        raise the recorded failure, the call the block caught, not the call's own error; nothing
        when none is recorded."""
        self.raise_if_failed(f"{operation}: not run, the transaction is aborted")

    def raise_if_failed(self, what: str) -> None:
        """Raise the recorded failure again, its message led by ``what`` (what could not be
        done: a call that found the transaction aborted, the block's COMMIT); nothing when none
        is recorded. Raised as it was (class, code, retryable, field), built without its
        ``__init__``, whose signature varies (``ValidationError``), so run_in_transaction still
        re-runs a deadlock caught this way."""
        failure = self.failure
        if failure is not None:
            message = (
                f"{what}: a call inside it failed ({failure}) and the block went on; a call that"
                " may fail belongs in a nested transaction() (a savepoint)"
            )
            raise rebuild(type(failure), message, failure.__dict__) from failure

    def close(self) -> None:
        """Refuse every call from now on (the block is ending)."""
        with self.lock:
            self.open = False

    def record(self, exc: psycopg.Error, operation: str) -> None:
        """Note the failure of a statement on the transaction (``running`` handles
        in_failed_sql_transaction, which only says an earlier one aborted it, apart: the first
        cause is the one the block raises again)."""
        error = translate(exc, operation=operation)
        with self.lock:
            self.failure = error

    def check_usable(self, caller: object) -> None:
        """Raises ``ValidationError`` when the transaction has ended, or when another caller
        holds a savepoint on it."""
        if not self.open:
            raise ValidationError(
                "transaction",
                "this transaction has ended (its block exited): a call on it would run outside"
                " it, on a connection the pool has taken back",
            )
        if self.holder is not None and self.holder is not caller:
            raise ValidationError(
                "transaction",
                "another task holds a savepoint on this transaction: until it ends, a call"
                " from here could be undone by its rollback",
            )


def raise_if_aborted(conn: psycopg.BaseConnection[Any], state: TransactionState) -> None:
    """Raise the failure that aborted the transaction on ``conn``, if one did (COMMIT, or
    RELEASE, would then silently roll back), or the interruption of a call (its statement may
    have taken effect: the transaction must not commit). Re-raised with its class, code and
    retryable flag (``run_in_transaction`` re-runs a deadlock caught this way), chained to
    it."""
    aborted = conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    if not (aborted or state.interrupted):
        return
    state.raise_if_failed("transaction rolled back")
    raise InternalError("transaction: aborted by a failed statement; rolled back")


def task_caller() -> object:
    """Who is calling, for the async adapter: the running task."""
    return asyncio.current_task()


def thread_caller() -> object:
    """Who is calling, for the sync adapter (``task_caller`` in the async source): the
    thread."""
    return threading.current_thread()

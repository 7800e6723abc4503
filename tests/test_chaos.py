"""The chaos run (kitium_pg/chaos.py, via benchmarks/chaos.py) as a slow test: 30 s of mixed load
against its own embedded server under terminated backends, restarts, held locks and a starved
pool; nothing acknowledged may be lost or duplicated, and every error must be an expected one.

Also (fast): the run's error classification, checked against ``errors.translate`` for every
transient SQLSTATE, and a server-ended connection (idle-session timeout) met by a real call."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    ConflictError,
    InternalError,
    KitiumPgError,
    PostgresStorageAdapter,
    QueryTimeoutError,
    UnavailableError,
)
from kitium_pg.chaos import classify
from kitium_pg.errors import is_auto_retryable, translate

ROOT = Path(__file__).resolve().parent.parent
FINAL = re.compile(
    r"^chaos: ops=(?P<ops>\d+) acked=(?P<acked>\d+) lost=(?P<lost>\d+)"
    r" duplicated=(?P<duplicated>\d+) unexpected_errors=(?P<unexpected>\d+)"
    r" max_recovery_s=(?P<recovery>\d+\.\d+)$"
)
FAULTS = re.compile(
    r"^chaos-faults: terminate=(?P<terminate>\d+) restart=(?P<restart>\d+)"
    r" locks=(?P<locks>\d+) starvation=(?P<starvation>\d+)$",
    re.MULTILINE,
)


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_chaos_run_loses_and_duplicates_nothing(loop: str) -> None:
    """30 s of load and faults, the asyncio tasks on ``loop`` (uvloop: the loop uvicorn runs on
    when it is installed; its socket handling is another code path under every fault)."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--duration",
            "30",
            "--threads",
            "3",
            "--tasks",
            "4",
            "--loop",
            loop,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, report
    final = FINAL.match(lines[-1])
    assert final is not None, report
    faults = FAULTS.search(done.stdout)
    assert faults is not None, report
    assert f", event loop {loop}." in done.stdout, report  # the tasks ran on the loop asked for
    assert int(final["ops"]) > 0 and int(final["acked"]) > 0, report
    assert int(final["lost"]) == 0, report
    assert int(final["duplicated"]) == 0, report
    assert int(final["unexpected"]) == 0, report
    for kind in ("terminate", "restart", "locks", "starvation"):
        assert int(faults[kind]) > 0, f"no {kind} fault was injected\n{report}"
    assert done.returncode == 0, report


def _chained(cause: BaseException) -> KitiumPgError:
    error = translate(cause, operation="op")
    error.__cause__ = cause
    return error


def test_classify_accepts_expected_errors_and_flags_the_rest() -> None:
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert classify(_chained(lost), frozenset()) is None
    wrong_flag = UnavailableError("op: lost", retryable=False)
    wrong_flag.__cause__ = lost
    assert "wrong retryable" in (classify(wrong_flag, frozenset()) or "")
    wrong_class = UnavailableError("op: timeout")
    wrong_class.__cause__ = psycopg.errors.QueryCanceled("canceling statement")
    assert "wrong class" in (classify(wrong_class, frozenset()) or "")
    duplicate = _chained(psycopg.errors.UniqueViolation("duplicate key"))
    assert isinstance(duplicate, ConflictError) and not duplicate.retryable
    assert classify(duplicate, frozenset({"unique_violation"})) is None
    assert "cannot get" in (classify(duplicate, frozenset()) or "")
    assert "escaped" in (classify(psycopg.OperationalError("raw"), frozenset()) or "")
    assert "escaped" in (classify(AssertionError(), frozenset()) or "")
    assert "unexpected" in (classify(InternalError("op: bug"), frozenset()) or "")


@pytest.mark.parametrize(
    ("sqlstate", "cls"),
    [
        ("08000", UnavailableError),
        ("08006", UnavailableError),
        ("08P01", UnavailableError),
        ("53300", UnavailableError),
        ("57P01", UnavailableError),
        ("57P02", UnavailableError),
        ("57P03", UnavailableError),
        ("57P05", UnavailableError),  # idle_session_timeout: the server ended the connection
        ("57014", QueryTimeoutError),
        ("55P03", QueryTimeoutError),
        ("40001", ConflictError),
        ("40P01", ConflictError),
    ],
)
def test_transient_causes_translate_to_retryable_errors(
    sqlstate: str, cls: type[KitiumPgError]
) -> None:
    error = _chained(psycopg.errors.lookup(sqlstate)("transient"))
    assert isinstance(error, cls), f"{sqlstate} became {error!r}"
    assert error.retryable is True
    assert classify(error, frozenset()) is None


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_a_rolled_back_transaction_is_not_called_a_duplicate(sqlstate: str) -> None:
    error = _chained(psycopg.errors.lookup(sqlstate)("rolled back"))
    assert "rolled back (retryable: run the whole transaction again)" in str(error)
    assert "existing row" not in str(error)


def test_a_pool_timeout_is_a_retryable_unavailable_error() -> None:
    error = _chained(psycopg_pool.PoolTimeout("couldn't get a connection after 2.00 sec"))
    assert isinstance(error, UnavailableError) and error.retryable
    assert classify(error, frozenset()) is None


# A server may end idle connections itself (idle_session_timeout, PostgreSQL 14+; common on
# managed databases). The next call on such a pooled connection reads a FATAL 57P05: the
# connection is gone, exactly as after pg_terminate_backend (57P01), so a retry-safe call should
# be retried on a fresh connection, and otherwise fail as a retryable UnavailableError.

IDLE_KWARGS: dict[str, Any] = {
    "autocommit": True,
    "options": "-c idle_session_timeout=200",
}


def _user(dsn: str) -> uuid.UUID:
    with PostgresStorageAdapter(dsn, max_size=1) as storage:
        return storage.create_user().id


def test_a_connection_ended_by_idle_session_timeout_is_retried_sync(dsn: str) -> None:
    user_id = _user(dsn)
    with psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, kwargs=IDLE_KWARGS) as pool:
        storage = PostgresStorageAdapter(pool)
        assert storage.get_user(user_id) is not None
        time.sleep(0.6)  # the server ends the idle pooled connection
        try:
            user = storage.get_user(user_id)
        except KitiumPgError as exc:
            pytest.fail(
                f"get_user (retry-safe) failed on a connection the server ended: {exc!r}"
                f" code={exc.code} retryable={exc.retryable} auto_retry={is_auto_retryable(exc)}"
                f" cause={exc.__cause__!r}"
            )
        assert user is not None and user.id == user_id


async def test_a_connection_ended_by_idle_session_timeout_is_retried_async(dsn: str) -> None:
    user_id = _user(dsn)
    pool = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=1, max_size=1, kwargs=IDLE_KWARGS, open=False
    )
    await pool.open(wait=True)
    try:
        storage = AsyncPostgresStorageAdapter(pool)
        assert await storage.get_user(user_id) is not None
        await asyncio.sleep(0.6)  # the server ends the idle pooled connection
        try:
            user = await storage.get_user(user_id)
        except KitiumPgError as exc:
            pytest.fail(
                f"get_user (retry-safe) failed on a connection the server ended: {exc!r}"
                f" code={exc.code} retryable={exc.retryable} auto_retry={is_auto_retryable(exc)}"
                f" cause={exc.__cause__!r}"
            )
        assert user is not None and user.id == user_id
    finally:
        await pool.close()

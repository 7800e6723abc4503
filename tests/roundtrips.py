"""Counting client/server round trips with libpq's protocol trace.

A round trip is a run of frontend (F) messages followed by a backend (B) reply: the moment the
client stops sending and waits. The adapters under test use a one-connection pool, so the trace
enabled on that connection sees every message of the call. Only lines that start a message
(``F<tab><length><tab><type>``) are read: libpq prints a simple-protocol ``Query`` with its SQL
text as is, newlines included, so continuation lines must not count as messages.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import pq

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter

_FLAGS = pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE
_MESSAGE = re.compile(r"^([FB])\t\d+\t[A-Za-z]+")


def sides(trace: str) -> list[str]:
    """The side (``"F"`` or ``"B"``) of every message of a libpq trace, in order."""
    return [m.group(1) for line in trace.splitlines() if (m := _MESSAGE.match(line))]


def count(trace: str) -> int:
    """Round trips in a libpq trace: runs of frontend messages answered by the backend."""
    return sum(1 for a, b in itertools.pairwise(sides(trace)) if a == "F" and b == "B")


async def round_trips(adapter: Any, call: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``call`` on ``adapter`` (sync or async, one-connection pool); returns
    (round trips, result)."""
    with tempfile.TemporaryFile("w+") as out:
        if isinstance(adapter, AsyncPostgresStorageAdapter):
            async with adapter.pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(_FLAGS)
            try:
                result = call()
                if isinstance(result, Awaitable):
                    result = await result
            finally:
                async with adapter.pool.connection() as conn:
                    conn.pgconn.untrace()  # flushes libpq's buffered trace
        else:
            assert isinstance(adapter, PostgresStorageAdapter)
            with adapter.pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(_FLAGS)
            try:
                result = call()
            finally:
                with adapter.pool.connection() as conn:
                    conn.pgconn.untrace()
        out.seek(0)
        return count(out.read()), result

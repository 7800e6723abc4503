"""Counting client/server round trips with libpq's protocol trace.

A round trip is a run of frontend (F) messages followed by a backend (B) reply: the moment the
client stops sending and waits. The adapters under test use a one-connection pool, so the trace
enabled on that connection sees every message of the call.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from psycopg import pq

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter

_FLAGS = pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE


def count(trace: str) -> int:
    """Round trips in a libpq trace."""
    sides = [line.split("\t", 1)[0] for line in trace.splitlines() if line]
    return sum(1 for a, b in itertools.pairwise(sides) if a == "F" and b == "B")


async def round_trips(adapter: Any, call: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``call`` on ``adapter`` (sync or async, one-connection pool); returns
    (round trips, result)."""
    with tempfile.TemporaryFile("w+") as out:
        if isinstance(adapter, AsyncPostgresStorageAdapter):
            async with adapter.pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(_FLAGS)
            result = call()
            if isinstance(result, Awaitable):
                result = await result
            async with adapter.pool.connection() as conn:
                conn.pgconn.untrace()  # flushes libpq's buffered trace
        else:
            assert isinstance(adapter, PostgresStorageAdapter)
            with adapter.pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(_FLAGS)
            result = call()
            with adapter.pool.connection() as conn:
                conn.pgconn.untrace()
        out.seek(0)
        return count(out.read()), result

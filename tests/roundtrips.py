"""Counting client/server round trips with libpq's protocol trace.

A round trip is the client waiting for the server: frontend (F) messages that ask for an answer
(``Sync``, a simple ``Query``, ``Flush``, the end of a COPY), then the backend (B) reply. Backend
messages that arrive before the client has asked for anything are not a wait: in a pipeline the
server answers a failed statement at once, and psycopg reads that answer while it is still
sending, before the pipeline's ``Sync``. The adapters under test use a one-connection pool, so
the trace enabled on that connection sees every message of the call. Only lines that start a
message (``F<tab><length><tab><type>``) are read: libpq prints a simple-protocol ``Query`` with
its SQL text as is, newlines included, so continuation lines must not count as messages.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any, Final

from psycopg import pq

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter

_FLAGS = pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE
# Side, type and (for ReadyForQuery, the transaction status) first argument of a message.
_MESSAGE = re.compile(r"^([FB])\t\d+\t([A-Za-z]+)(?:\t (\S+))?")


def messages(trace: str) -> list[tuple[str, str, str | None]]:
    """(side ``"F"`` or ``"B"``, message type, first argument) of every message of a libpq
    trace, in order."""
    return [
        (m.group(1), m.group(2), m.group(3))
        for line in trace.splitlines()
        if (m := _MESSAGE.match(line))
    ]


def strays(trace: str) -> list[str]:
    """Client messages of a libpq trace that follow the end of a transaction without starting
    a statement: a ``Sync`` or ``Flush`` sent right after a ``Sync`` (or simple ``Query``) whose
    ``ReadyForQuery`` reports the connection idle. A transaction pooler (PgBouncer) frees the
    server connection at that idle report, so such a message, if it arrives after the report,
    needs a server connection of its own; a bare ``Flush`` gets no answer, and the pooler keeps
    that server for the client until its next statement. Each ``Sync`` and ``Query`` gets one
    ``ReadyForQuery``, in order, which pairs them with their reports."""
    parsed = messages(trace)
    sent = [kind for side, kind, _ in parsed if side == "F"]
    ready = [status for side, kind, status in parsed if kind == "ReadyForQuery"]
    found = []
    syncs = 0
    for before, message in itertools.pairwise(sent):
        if before in ("Sync", "Query"):
            syncs += 1
            idle = syncs <= len(ready) and ready[syncs - 1] == "I"
            if idle and message in ("Sync", "Flush"):
                found.append(message)
    return found


# Frontend messages after which the client waits for the backend. A Flush right after a Sync
# asks for nothing more than the Sync did (psycopg follows a pipeline's last Sync with one).
_ASKS: Final = frozenset({"Sync", "Query", "Flush", "CopyDone", "CopyFail"})


def count(trace: str) -> int:
    """Round trips in a libpq trace: each reply of the backend to frontend messages that ask
    for one (``_ASKS``). Backend messages the client did not ask for yet (an early error in a
    pipeline, a notice) start no round trip: whether psycopg reads them before or after it
    sends the rest of its pipeline depends on timing alone."""
    trips = 0
    asked = False
    sent_before = None  # the frontend message before this one, whatever arrived in between
    for side, kind, _ in messages(trace):
        if side == "F":
            if kind in _ASKS and not (kind == "Flush" and sent_before == "Sync"):
                asked = True
            sent_before = kind
        elif asked:
            trips += 1
            asked = False
    return trips


async def round_trips(adapter: Any, call: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``call`` on ``adapter`` (sync or async, one-connection pool); returns
    (round trips, result). Also checks that the call sends nothing between the end of a
    transaction and the next statement (``strays``): every counted call is checked for it."""
    trace, result, error = await traced(adapter, call)
    if error is not None:
        raise error
    assert strays(trace) == [], f"sent after the end of a transaction:\n{trace}"
    return count(trace), result


async def traced(adapter: Any, call: Callable[[], Any]) -> tuple[str, Any, Exception | None]:
    """Run ``call`` on ``adapter`` (sync or async, one-connection pool); returns (libpq trace
    of the call, its result or None, the exception it raised or None)."""
    result: Any = None
    failure: Exception | None = None
    with tempfile.TemporaryFile("w+") as out:
        if isinstance(adapter, AsyncPostgresStorageAdapter):
            async with adapter.pool.connection() as conn:
                conn.pgconn.trace(out.fileno())
                conn.pgconn.set_trace_flags(_FLAGS)
            try:
                result = call()
                if isinstance(result, Awaitable):
                    result = await result
            except Exception as exc:
                failure = exc
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
            except Exception as exc:
                failure = exc
            finally:
                with adapter.pool.connection() as conn:
                    conn.pgconn.untrace()
        out.seek(0)
        return out.read(), result, failure

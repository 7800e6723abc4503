"""A second connection that writes rows and commits them a moment later, while the adapter's
statement waits for them: the interleaving of an attempt whose acknowledgement was lost and
which the server commits after the adapter's retry has started."""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from kitium_pg._base import Retry

from .conftest import drive, open_adapter


@contextmanager
def committed_later(
    dsn: str, sql: str, rows: list[tuple[Any, ...]], delay: float = 0.5
) -> Iterator[None]:
    """Insert ``rows`` with ``sql`` in an open transaction, and commit it ``delay`` seconds
    after the block starts (from another thread), so a statement in the block that needs those
    ids waits for the commit."""
    holder = psycopg.connect(dsn)
    try:
        with holder.cursor() as cur:
            cur.executemany(sql.encode(), rows)
        timer = threading.Timer(delay, holder.commit)
        timer.start()
        try:
            yield
        finally:
            timer.join()
    finally:
        holder.close()


def adapter_module(storage: Any, name: str) -> Any:
    """The module ``name`` (``users``, ``events``…) of the adapter under test, sync or async."""
    return importlib.import_module(f"kitium_pg._{storage.kind}.{name}")


def waiting(dsn: str, marker: str, waiters: int = 1) -> bool:
    """Wait until ``waiters`` backends of the database of ``dsn`` wait on a lock with ``marker``
    in their query; ``False`` if they are not seen within 10 s."""
    with psycopg.connect(dsn, autocommit=True) as observer:
        for _ in range(200):
            row = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND position(%s in query) > 0",
                (marker,),
            ).fetchone()
            if row is not None and row[0] >= waiters:
                return True
            time.sleep(0.05)
    return False


def release_when_waiting(
    dsn: str, holder: psycopg.Connection[Any], marker: str, waiters: int = 1
) -> threading.Thread:
    """Start a thread that commits ``holder`` as soon as ``waiters`` other backends wait on a
    lock with ``marker`` in their query (or after 10 s without seeing them); its ``seen``
    attribute says whether it saw them all."""

    def watch() -> None:
        thread.seen = waiting(dsn, marker, waiters)  # type: ignore[attr-defined]
        holder.commit()

    thread = threading.Thread(target=watch)
    thread.seen = False  # type: ignore[attr-defined]
    thread.start()
    return thread


def in_background(
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


Row = tuple[str, Mapping[str, Any]]  # a table and the column values naming a row


def _where(schema: str, row: Row) -> tuple[str, list[Any]]:
    table, key = row
    condition = " AND ".join(f"{column} = %s" for column in key)
    return f"{schema}.{table} WHERE {condition}", list(key.values())


async def call_while_holding(
    storage: Any,
    dsn: str,
    held: Row,
    mode: str,
    call: Callable[[], Coroutine[Any, Any, Any]],
    *,
    waits_on: str | None,
    free: Sequence[Row] = (),
    linger: float = 0.0,
    schema: str = "kitium_auth",
) -> Any:
    """Lock ``held`` (``FOR <mode>``) in a transaction of its own and run ``call()`` meanwhile.
    With ``waits_on`` (text of the call's statement), check that the call waits on a lock while
    a third transaction still locks each of ``free`` at once (``FOR UPDATE NOWAIT``: the call
    holds none of them), keep it waiting ``linger`` seconds more (times such as an expiry, a
    lease or a grace pass meanwhile), then release ``held``; without it, the call must finish
    while the row is held (give it a statement timeout). The rows are tables of ``schema``.
    Returns what the call returned or raised."""
    holder = psycopg.connect(dsn)
    try:
        target, params = _where(schema, held)
        holder.execute(f"SELECT FROM {target} FOR {mode}", params)
        if waits_on is None:
            return await call()
        result = in_background(storage, call)
        assert await asyncio.to_thread(waiting, dsn, waits_on)
        with psycopg.connect(dsn) as probe:
            for row in free:
                target, params = _where(schema, row)
                probe.execute(f"SELECT FROM {target} FOR UPDATE NOWAIT", params)
        await asyncio.sleep(linger)
        holder.commit()
        return await result()
    finally:
        holder.close()


@asynccontextmanager
async def unretried_adapter(kind: str, dsn: str, **options: Any) -> AsyncIterator[Any]:
    """An adapter of ``kind`` that raises a deadlock rather than retry it, whose planner reads
    by plain index scans, as on large tables (a sequential or bitmap scan reads rows in their
    physical order, which hides an order a statement takes from its index); ``start()`` can run
    its calls."""
    planner = make_conninfo(dsn, options="-c enable_seqscan=off -c enable_bitmapscan=off")
    async with open_adapter(kind, planner, max_retries=0, **options) as adapter:
        adapter.kind = kind
        yield adapter


async def two_calls_queued_on(
    dsn: str,
    held: Row,
    first: Callable[[], Awaitable[Any]],
    first_waits_on: str,
    second: Callable[[], Awaitable[Any]],
    *,
    schema: str = "kitium_auth",
) -> list[Any]:
    """Lock ``held`` FOR UPDATE in a transaction of its own; start ``first()`` and wait until it
    waits on a lock (its statement has ``first_waits_on``); start ``second()`` and wait until it
    waits too; then release ``held``. The two calls meet in the order set up, without timing.
    Returns what each returned or raised."""
    holder = psycopg.connect(dsn)
    try:
        target, params = _where(schema, held)
        holder.execute(f"SELECT FROM {target} FOR UPDATE", params)
        one = asyncio.ensure_future(first())
        assert await asyncio.to_thread(waiting, dsn, first_waits_on)
        two = asyncio.ensure_future(second())
        assert await asyncio.to_thread(waiting, dsn, f"{schema}.", 2)
        holder.commit()
        return list(await asyncio.gather(one, two, return_exceptions=True))
    finally:
        holder.close()


async def replay(storage: Any, name: str, params: Mapping[str, Any]) -> Any:
    """Run statement ``name`` once with chosen ``params`` (ids, consumer, digests), as the
    adapter's retry loop re-sends it after a lost acknowledgement; its result in the query's
    shape."""
    if storage.kind == "sync":
        return storage.adapter._run(name, params, retry=Retry.NEVER)
    return await storage._run(name, params, retry=Retry.NEVER)


async def replay_behind_open_attempt(
    storage: Any,
    dsn: str,
    name: str,
    params: Mapping[str, Any],
    *,
    waits_on: str,
    linger: float = 0.0,
) -> tuple[Any, Any]:
    """A first attempt whose acknowledgement was lost and whose commit is slow: run statement
    ``name`` with ``params`` in a transaction of its own, left open; replay it (``replay``)
    alongside, wait until the replay waits on the first attempt's lock (its statement has
    ``waits_on``), ``linger`` seconds more, then commit the first attempt. Returns the first
    attempt's first row and what the replay returned or raised."""
    queries = (storage.adapter if storage.kind == "sync" else storage)._queries
    first = psycopg.connect(dsn)
    try:
        row = first.execute(queries[name].sql.encode(), dict(params)).fetchone()
        retry = in_background(storage, lambda: replay(storage, name, params))
        assert await asyncio.to_thread(waiting, dsn, waits_on)
        await asyncio.sleep(linger)
        first.commit()
        return row, await retry()
    finally:
        first.close()

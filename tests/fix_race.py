"""Running one adapter call from many callers at once, for the race tests."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg


async def race(storage: Any, n: int, method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Call ``method(*args, **kwargs)`` ``n`` times at once; results and raised exceptions, in
    call order. The async adapter runs them with ``asyncio.gather``; the sync adapter from ``n``
    threads released together by a barrier (each on its own pooled connection)."""
    return await race_each(storage, method, [(args, kwargs)] * n)


async def race_each(
    storage: Any, method: str, calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
) -> list[Any]:
    """Like ``race``, with each caller's own ``(args, kwargs)``."""
    return await race_methods(storage, [(method, args, kwargs) for args, kwargs in calls])


async def race_methods(
    storage: Any, calls: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> list[Any]:
    """Like ``race_each``, with each caller's own method: ``(method, args, kwargs)``."""
    if storage.kind == "sync":
        barrier = threading.Barrier(len(calls))

        def run(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            call = getattr(storage.adapter, method)
            barrier.wait()
            return call(*args, **kwargs)

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = [pool.submit(run, m, a, kw) for m, a, kw in calls]
            return [f.exception() or f.result() for f in futures]
    return list(
        await asyncio.gather(
            *(getattr(storage, m)(*a, **kw) for m, a, kw in calls), return_exceptions=True
        )
    )


def start(storage: Any, method: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
    """Start ``method(*args, **kwargs)`` without waiting for it (await the future for its
    result): a thread for the sync adapter, a task of the async one (which runs once the caller
    next awaits), so a test can see the call wait on a lock before it sends the next one."""
    if storage.kind == "sync":
        call = functools.partial(getattr(storage.adapter, method), *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(None, call)
    started: asyncio.Future[Any] = asyncio.ensure_future(getattr(storage, method)(*args, **kwargs))
    return started


def waiting_on_a_lock(dsn: str) -> bool:
    """Whether an UPDATE in the database of ``dsn`` waits for a lock (``pg_stat_activity``;
    not another database's: the mutation runs share a server)."""
    with psycopg.connect(dsn, autocommit=True) as observer:
        row = observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND position('UPDATE' in query) > 0"
        ).fetchone()
    return row is not None and row[0] > 0

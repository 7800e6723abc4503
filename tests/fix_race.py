"""Running one adapter call from many callers at once, for the race tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


async def race(storage: Any, n: int, method: str, *args: Any, **kwargs: Any) -> list[Any]:
    """Call ``method(*args, **kwargs)`` ``n`` times at once; results and raised exceptions, in
    call order. The async adapter runs them with ``asyncio.gather``; the sync adapter from ``n``
    threads released together by a barrier (each on its own pooled connection)."""
    return await race_each(storage, method, [(args, kwargs)] * n)


async def race_each(
    storage: Any, method: str, calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
) -> list[Any]:
    """Like ``race``, with each caller's own ``(args, kwargs)``."""
    if storage.kind == "sync":
        call = getattr(storage.adapter, method)
        barrier = threading.Barrier(len(calls))

        def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            barrier.wait()
            return call(*args, **kwargs)

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            futures = [pool.submit(run, a, kw) for a, kw in calls]
            return [f.exception() or f.result() for f in futures]
    call = getattr(storage, method)
    return list(await asyncio.gather(*(call(*a, **kw) for a, kw in calls), return_exceptions=True))

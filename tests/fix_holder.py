"""A second connection that writes rows and commits them a moment later, while the adapter's
statement waits for them: the interleaving of an attempt whose acknowledgement was lost and
which the server commits after the adapter's retry has started."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg


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

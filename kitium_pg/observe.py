"""Hooks for metrics and tracing around every SQL statement the adapter runs.

An adapter built with ``observer=`` calls ``start(operation)`` before each statement and
``finish(token, operation, duration_s, error)`` after it. ``operation`` is the statement's name
in ``queries/*.sql``, not the method's: ``issue_api_key`` reports ``create_api_key``,
``validate_session_token`` reports ``get_session_for_token``, ``create_session(event=...)``
and ``issue_session_token(event=...)`` report ``create_session_with_event``, the batched
deletes report once per batch, and ``health_check`` reports ``ping``, ``ledger_exists``,
``list_applied_migrations`` and ``list_invalid_indexes``. One
observation spans the pool checkout, the adapter's automatic retries of that statement and, for
a read routed to a replica, the fallback to the primary. ``error`` is what the statement raised;
an error the method raises after a successful statement is not reported, and neither is a call
that runs no statement: arguments the adapter's checks refuse, and a call a ``transaction()``
refuses (after its block ended, or once a failure inside it has aborted it).

Without an observer the adapter does not read the clock for it: the hook costs one ``is None``
test per statement. A failing observer is logged and never fails the call.
``kitium_pg.metrics`` has ready-made Prometheus and OpenTelemetry observers, and
``CompositeObserver``, which isolates the observers it combines the same way (one that raises
does not keep the others from their ``start`` and ``finish``).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Observer"]


class Observer(Protocol):
    """What the adapter calls around each operation."""

    def start(self, operation: str) -> object:
        """Called before ``operation`` runs; the result is passed back to ``finish``."""
        ...

    def finish(
        self, token: object, operation: str, duration_s: float, error: BaseException | None
    ) -> None:
        """Called when ``operation`` ends, with its duration and what it raised, if anything:
        a ``KitiumPgError``, or (rarely) ``asyncio.CancelledError`` / ``KeyboardInterrupt`` when
        the call was interrupted. An exception raised here is logged, never passed on."""
        ...

"""Hooks for metrics and tracing around every adapter operation.

An adapter built with ``observer=`` calls ``start(operation)`` before each operation and
``finish(token, operation, duration_s, error)`` after it (once per call, retries included).
Without an observer the adapter does not even check the clock for it: the hook costs one
``is None`` test per call. A failing observer is logged and never fails the call.
``kitium_pg.metrics`` has ready-made Prometheus and OpenTelemetry observers.
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

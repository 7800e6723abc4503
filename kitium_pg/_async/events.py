"""Audit event methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncEvents(AsyncCore):
    """Audit event methods of the async adapter."""

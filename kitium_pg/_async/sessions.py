"""Session methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncSessions(AsyncCore):
    """Session methods of the async adapter."""

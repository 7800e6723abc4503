"""API key methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncApiKeys(AsyncCore):
    """API key methods of the async adapter."""

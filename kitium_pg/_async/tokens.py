"""Bearer session token and API key issue/verify methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncTokens(AsyncCore):
    """Bearer session token and API key issue/verify methods of the async adapter."""

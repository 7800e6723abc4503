"""Role and permission methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncRbac(AsyncCore):
    """Role and permission methods of the async adapter."""

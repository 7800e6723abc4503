"""Organization and membership methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncOrganizations(AsyncCore):
    """Organization and membership methods of the async adapter."""

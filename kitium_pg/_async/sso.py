"""SSO provider, domain, link and session methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncSso(AsyncCore):
    """SSO provider, domain, link and session methods of the async adapter."""

"""Email verification token methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncEmailVerification(AsyncCore):
    """Email verification token methods of the async adapter."""

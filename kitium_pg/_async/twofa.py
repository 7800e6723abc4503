"""Two-factor device, backup code and challenge methods (async source; the sync copy is generated)."""

from __future__ import annotations

from .core import AsyncCore


class AsyncTwoFactor(AsyncCore):
    """Two-factor device, backup code and challenge methods of the async adapter."""

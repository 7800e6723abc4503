# WARNING: generated from kitium_pg/_async/twofa.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Two-factor device, backup code and challenge methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class TwoFactor(Core):
    """Two-factor device, backup code and challenge methods of the sync adapter."""

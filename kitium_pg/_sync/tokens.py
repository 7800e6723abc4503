# WARNING: generated from kitium_pg/_async/tokens.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Bearer session token and API key issue/verify methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class Tokens(Core):
    """Bearer session token and API key issue/verify methods of the sync adapter."""

# WARNING: generated from kitium_pg/_async/api_keys.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""API key methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class ApiKeys(Core):
    """API key methods of the sync adapter."""

# WARNING: generated from kitium_pg/_async/events.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Audit event methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class Events(Core):
    """Audit event methods of the sync adapter."""

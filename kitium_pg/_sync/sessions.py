# WARNING: generated from kitium_pg/_async/sessions.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Session methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class Sessions(Core):
    """Session methods of the sync adapter."""

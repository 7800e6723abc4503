# WARNING: generated from kitium_pg/_async/organizations.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Organization and membership methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class Organizations(Core):
    """Organization and membership methods of the sync adapter."""

# WARNING: generated from kitium_pg/_async/rbac.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Role and permission methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class Rbac(Core):
    """Role and permission methods of the sync adapter."""

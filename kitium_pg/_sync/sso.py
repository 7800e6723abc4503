# WARNING: generated from kitium_pg/_async/sso.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""SSO provider, domain, link and session methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class Sso(Core):
    """SSO provider, domain, link and session methods of the sync adapter."""

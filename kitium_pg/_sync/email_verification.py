# WARNING: generated from kitium_pg/_async/email_verification.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Email verification token methods (generated from the async source)."""

from __future__ import annotations

from .core import Core


class EmailVerification(Core):
    """Email verification token methods of the sync adapter."""

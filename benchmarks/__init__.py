"""Benchmarks of kitium-pg against raw drivers and the SQLAlchemy stack (see ``run.py``)."""

from __future__ import annotations

import sys
import time

_STARTED = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[{time.perf_counter() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)

# WARNING: generated from kitium_pg/_async/__init__.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Async I/O code: the single hand-written source of both adapters (see tools/unasync.py)."""

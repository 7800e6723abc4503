# WARNING: generated from kitium_pg/_async/__init__.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Sync I/O code, generated from ``kitium_pg/_async`` (see tools/unasync.py)."""

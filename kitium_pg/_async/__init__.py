"""Async I/O code: the single hand-written source of both adapters (see tools/unasync.py)."""

"""A ``str`` subclass that lies about its characters to the checks, not to psycopg."""

from __future__ import annotations


class Disguised(str):
    """A str that answers ``len()``, ``in``, ``encode()``, ``==`` and ``hash()`` as if it
    held one clean character, whatever it holds (psycopg and f-strings send what it holds)."""

    def __len__(self) -> int:
        return 1

    def __contains__(self, item: object) -> bool:
        return False

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"x"

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0

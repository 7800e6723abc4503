"""``str`` subclasses that lie about their characters to the checks, not to psycopg (which,
like f-strings and file paths, uses the characters they hold)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator


class Disguised(str):
    """A str that answers ``len()``, ``in``, iteration, ``encode()``, ``==`` and ``hash()`` as
    if it held one clean character, whatever it holds (psycopg and f-strings send what it holds)."""

    def __len__(self) -> int:
        return 1

    def __contains__(self, item: object) -> bool:
        return False

    def __iter__(self) -> Iterator[str]:
        return iter("x")

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"x"

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 0


class Posing(str):
    """A str equal (``==``, ``hash()``) to ``poses_as`` as well as to itself."""

    def __new__(cls, value: str, poses_as: str) -> Posing:
        made = super().__new__(cls, value)
        made.poses_as = poses_as
        return made

    poses_as: str

    def __eq__(self, other: object) -> bool:
        return other == self.poses_as or str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.poses_as)


class Boundless(int):
    """An int that compares as within any range (``<``, ``<=``, ``>``, ``>=`` all true),
    whatever it holds (psycopg sends what it holds)."""

    def __lt__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return True

    def __ge__(self, other: object) -> bool:
        return True


class Masked(uuid.UUID):
    """A UUID whose ``str()``, ``hex`` and ``int`` say ``says`` (or another number), whatever
    number it holds; psycopg's dumpers read ``hex`` and ``int``."""

    def __init__(self, held: uuid.UUID, says: str) -> None:
        # uuid.UUID.__init__ would set ``int`` through the property below: set its slots.
        vars(uuid.UUID)["int"].__set__(self, held.int)
        vars(uuid.UUID)["is_safe"].__set__(self, uuid.SafeUUID.unknown)
        object.__setattr__(self, "says", says)

    says: str

    def __str__(self) -> str:
        return self.says

    @property
    def hex(self) -> str:
        return self.says

    @property  # type: ignore[misc]  # a lie on purpose
    def int(self) -> int:
        return 1

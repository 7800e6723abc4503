"""Input checks shared by the sync and async adapters.

Every public argument passes through one of these before any I/O, so hostile input becomes a
``ValidationError`` naming the field and nothing reaches the database. The limits mirror the
CHECK constraints in ``migrations/`` (the database stays the last line of defence).
"""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import json
import math
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Final, TypeVar, cast

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from .errors import ValidationError

T = TypeVar("T")

UTC: Final = dt.UTC

# Text limits (characters). Keep in step with the CHECK constraints in migrations/.
SHORT: Final = 255
EMAIL: Final = 320
URL: Final = 2048
LONG: Final = 8192
HASH: Final = 512
JSON_BYTES: Final = 1_000_000
JSON_DEPTH: Final = 32
INT4_MAX: Final = 2**31 - 1
INT8_MAX: Final = 2**63 - 1
# Python's ``\s`` on str patterns is exactly ``str.isspace`` (checked over every code point
# in tests/test_validate.py), and a quarter of the cost of a generator over the characters.
_WHITESPACE: Final = re.compile(r"\s")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def text(
    field: str,
    value: object,
    *,
    max_len: int = SHORT,
    allow_empty: bool = False,
    max_bytes: int | None = None,
) -> str:
    """A string PostgreSQL can store: no NUL, valid UTF-8, within ``max_len`` characters (and
    ``max_bytes`` bytes of UTF-8, for a column a B-tree index holds: an entry has at most 2704
    bytes). A ``str`` subclass is checked and returned as a plain copy of its characters (see
    ``plain``)."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, not {type(value).__name__}")
    value = plain(value)
    if not value and not allow_empty:
        raise ValidationError(field, "must not be empty")
    if len(value) > max_len:
        raise ValidationError(field, f"must be at most {max_len} characters")
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        pass  # raised below: the exception holds the whole value (.object), as __context__ would
    else:
        if max_bytes is not None and size > max_bytes:
            raise ValidationError(field, f"must be at most {max_bytes} bytes in UTF-8")
        return value
    raise ValidationError(field, "must be valid Unicode (no lone surrogates)")


def plain(value: str) -> str:
    """``value`` as a plain ``str``: a subclass may answer ``len()``, ``in``, ``==`` or
    ``encode()`` for other characters than the ones it holds, which are what psycopg sends (and
    what an f-string may not show), so a check must read a copy and pass that copy on."""
    return value if type(value) is str else str.__getitem__(value, slice(None))


def opt_text(
    field: str, value: object, *, max_len: int = SHORT, max_bytes: int | None = None
) -> str | None:
    """``text`` or ``None``."""
    return None if value is None else text(field, value, max_len=max_len, max_bytes=max_bytes)


def email(field: str, value: object) -> str:
    """An email address, in Unicode normal form NFC: text with an ``@``, something on either
    side, no whitespace, no control characters (a backspace or a terminal escape would make
    the address print as another), no invisible format characters (zero-width space and the
    like), no trailing dot on the domain, and no letter whose lowercase is an ASCII letter
    (``İ``): PostgreSQL's ``lower()``, which compares addresses, turns it into ``i``, so
    ``bob@gİthub.com``, an address at another domain anyone can register, would be
    ``bob@github.com``'s account. Normalising makes two spellings of one address (``é`` as one
    code point or as ``e`` and a combining accent) one address, for uniqueness and lookup (the
    Kelvin sign, the other letter ``lower()`` makes ASCII, becomes ``K`` there)."""
    value = email_key(text(field, value, max_len=EMAIL))
    local, at, domain = value.rpartition("@")
    if (
        not at
        or not local
        or not domain
        or domain.endswith(".")
        or _WHITESPACE.search(value)
        or _CONTROL.search(value)
        # ASCII holds no format character: most addresses skip the per-character scan.
        or (not value.isascii() and any(unicodedata.category(c) == "Cf" for c in value))
        or _lowers_into_ascii(value)
    ):
        raise ValidationError(field, "must be an email address")
    return value


def _lowers_into_ascii(value: str) -> bool:
    """Whether a non-ASCII character of ``value`` lowercases to an ASCII letter (with or without
    a combining mark after it: ``İ`` is ``i`` and a dot above in Python, plain ``i`` in
    PostgreSQL's ``lower()``)."""
    return not value.isascii() and any(not c.isascii() and c.lower()[0].isascii() for c in value)


def email_key(value: str) -> str:
    """``value`` in the form stored addresses have: NFC."""
    return unicodedata.normalize("NFC", value)


def lookup_email(value: object) -> str | None:
    """The form of ``value`` to look stored addresses up with, or ``None`` when it cannot be
    one (not text, too long, or with a letter ``email`` refuses because ``lower()`` would make
    it another address's): lookups of such a value find nothing."""
    try:
        key = email_key(text("email", value, max_len=EMAIL))
    except ValidationError:
        return None
    return None if _lowers_into_ascii(key) else key


def replica_allowed(consistency: object) -> bool:
    """Whether a read may go to a replica: ``"replica"`` allows it, ``"primary"`` asks for
    read-your-writes (``Consistency``); anything else raises ``ValidationError``."""
    if consistency not in ("replica", "primary"):
        raise ValidationError("consistency", 'must be "replica" or "primary"')
    return consistency == "replica"


def opt_email(field: str, value: object) -> str | None:
    """``email`` or ``None``."""
    return None if value is None else email(field, value)


def identifier(field: str, value: object, *, max_len: int = 64) -> str:
    """A short machine name (token types, roles): lowercase letters, digits, ``_ . : -``."""
    value = text(field, value, max_len=max_len)
    if not all(c.islower() or c.isdigit() or c in "_.:-" for c in value) or not value.isascii():
        raise ValidationError(field, "must use only a-z, 0-9 and _ . : -")
    return value


def opt_identifier(field: str, value: object) -> str | None:
    """``identifier`` or ``None``."""
    return None if value is None else identifier(field, value)


def strings(field: str, value: object, *, max_items: int = 256, max_len: int = SHORT) -> list[str]:
    """A list of at most ``max_items`` strings (a ``str`` alone is refused: it is almost always
    a mistake). At most ``max_items + 1`` items are drawn from ``value``, so an oversized or
    endless iterable is refused without being consumed."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError(field, "must be a list of strings")
    items = list(itertools.islice(value, max_items + 1))
    if len(items) > max_items:
        raise ValidationError(field, f"must have at most {max_items} items")
    return [text(f"{field}[{i}]", item, max_len=max_len) for i, item in enumerate(items)]


def integer(field: str, value: object, *, minimum: int = 0, maximum: int = INT4_MAX) -> int:
    """An ``int`` (not a ``bool``) within the given range, returned as a plain ``int``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, not {type(value).__name__}")
    # A subclass's own comparisons could pass any value (as a str subclass's methods could
    # lie, see text): compare and return int's value of it.
    value = int.__index__(value)
    if not minimum <= value <= maximum:
        raise ValidationError(field, f"must be between {minimum} and {maximum}")
    return value


# The instants a timestamp may hold: a day inside Python's range at either end, so that the
# stored value reads back as a datetime in any session time zone (a caller's pool, PgBouncer):
# psycopg converts to the session's zone, and 9999-12-31 20:00 UTC is year 10000 in Tokyo.
_EARLIEST: Final = dt.datetime(1, 1, 2, tzinfo=UTC)
_LATEST: Final = dt.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)


def timestamp(field: str, value: object) -> dt.datetime:
    """A timezone-aware datetime from 0001-01-02 to 9999-12-30 UTC, returned in UTC. Naive
    datetimes are refused: guessing their zone is how expiry checks drift (the reference's
    ``TIMESTAMP`` bug)."""
    if not isinstance(value, dt.datetime):
        raise ValidationError(field, f"must be a datetime, not {type(value).__name__}")
    if type(value) is not dt.datetime:
        # A subclass is checked and passed on as a plain copy of its stored fields, read by
        # datetime's own getters: its own methods (astimezone, comparisons, the __sub__
        # psycopg's dumper uses) may say otherwise.
        value = dt.datetime(*(getter.__get__(value) for getter in _DATETIME_FIELDS)).replace(
            tzinfo=_TZINFO.__get__(value), fold=_FOLD.__get__(value)
        )
    # The offset is asked for once: it is the tzinfo's own code, which may raise, or answer
    # differently on a second call (astimezone would ask again).
    try:
        offset = value.utcoffset()
    except Exception as exc:
        failed: str | None = type(exc).__name__
    else:
        failed = None
    if failed is not None:
        raise ValidationError(field, f"has a tzinfo whose utcoffset() failed ({failed})")
    if offset is None:
        raise ValidationError(field, "must be timezone-aware (naive datetimes are refused)")
    try:
        instant = (
            value
            if value.tzinfo is UTC
            else (value.replace(tzinfo=None) - offset).replace(tzinfo=UTC)
        )
    except OverflowError:
        instant = None
    if instant is None or not _EARLIEST <= instant <= _LATEST:
        raise ValidationError(field, "must be from 0001-01-02 to 9999-12-30 (UTC)")
    return instant


_DATETIME_FIELDS: Final = tuple(
    vars(dt.datetime)[name] if name in vars(dt.datetime) else vars(dt.date)[name]
    for name in ("year", "month", "day", "hour", "minute", "second", "microsecond")
)
_TZINFO: Final = vars(dt.datetime)["tzinfo"]
_FOLD: Final = vars(dt.datetime)["fold"]


def opt_timestamp(field: str, value: object) -> dt.datetime | None:
    """``timestamp`` or ``None``."""
    return None if value is None else timestamp(field, value)


def opt_duration(field: str, value: object, *, maximum: dt.timedelta) -> dt.timedelta | None:
    """A ``timedelta`` from zero to ``maximum``, or ``None``. A subclass is checked and passed
    on as a plain copy made from its stored fields (its own ``days`` or comparisons may say
    otherwise than what psycopg sends; ``timedelta.__pos__`` reads the fields in C)."""
    if value is None:
        return None
    if not isinstance(value, dt.timedelta):
        raise ValidationError(field, f"must be a timedelta or None, not {type(value).__name__}")
    plain_value = dt.timedelta.__pos__(value)
    if not dt.timedelta(0) <= plain_value <= maximum:
        raise ValidationError(field, f"must be from 0 to {maximum}")
    return plain_value


_UUID_INT: Final = vars(uuid.UUID)["int"]  # the slot holding a UUID's number


_UUID_SPAN: Final = 1 << 128


def plain_uuid(value: uuid.UUID) -> uuid.UUID | None:
    """``value`` as a plain ``uuid.UUID`` holding a plain int, or ``None`` when the number it
    holds is none of a UUID's. A subclass's own ``__str__``, ``hex`` or ``int`` may say anything
    (a NUL, 10 MB, another id), so its copy is made from the slot it stores; and that slot may
    hold an int subclass whose comparisons passed UUID's own range check (``uuid.UUID(int=...)``
    of a 200-digit number), so the number is read as a plain int and checked again."""
    number = _UUID_INT.__get__(value, uuid.UUID)
    if type(value) is uuid.UUID and type(number) is int:
        return value  # made by UUID's own checks, on a plain int
    if not isinstance(number, int):
        return None
    number = int.__int__(number)  # a plain int, whatever the subclass says
    return uuid.UUID(int=number) if 0 <= number < _UUID_SPAN else None


def uuid_arg(field: str, value: object) -> uuid.UUID:
    """A UUID (or its string form) for a write; anything else is a ``ValidationError``."""
    parsed = parse_uuid(value)
    if parsed is None:
        raise ValidationError(field, "must be a UUID")
    return parsed


def opt_uuid_arg(field: str, value: object) -> uuid.UUID | None:
    """``uuid_arg`` or ``None``."""
    return None if value is None else uuid_arg(field, value)


def keyset(
    field: str, value: object, kind: type[Any], at: str, tie: str = "user_id"
) -> tuple[dt.datetime, uuid.UUID]:
    """The keyset (``value.<at>``, ``value.<tie>``) of ``value``, the last record of a page of
    a listing ordered by them: ``value`` must be a ``kind`` (else the error names ``field``),
    its instant a ``timestamp`` and its ``tie`` a UUID (errors name ``field.<at>`` and
    ``field.<tie>``). Each attribute is read once and the value read is the one checked."""
    if not isinstance(value, kind):
        raise ValidationError(
            field,
            f"must be a {kind.__name__} (the last record of the previous page) or None,"
            f" not {type(value).__name__}",
        )
    instant = timestamp(f"{field}.{at}", getattr(value, at, None))
    return instant, uuid_arg(f"{field}.{tie}", getattr(value, tie, None))


def parse_uuid(value: object) -> uuid.UUID | None:
    """The UUID ``value`` denotes, or ``None`` when it is not one (lookups then return None).
    A subclass of ``uuid.UUID`` gives a plain copy of the number it holds (``plain_uuid``)."""
    if type(value) is uuid.UUID and type(value.int) is int:
        return value  # every call's id: no call
    if isinstance(value, uuid.UUID):
        return plain_uuid(value)
    if isinstance(value, str) and len(value) <= 64:
        try:
            return uuid.UUID(value)
        except ValueError:
            return None
    return None


class _Irregular(Exception):
    """A value of a subclass of a JSON container or of str, or a mapping that is not a dict:
    its own methods (``items``, ``__iter__``, ``__contains__``) may show the checks one thing
    and the encoder another, so the document is copied into plain builtins first."""


# Every type decision about a JSON value below goes by ``type(value)``, as the C encoder decides,
# never ``isinstance``: that reads ``value.__class__``, which an object may define as a property
# answering ``int`` (and editing the document around it) while the encoder sees what it is.


def _check_json(field: str, value: object, depth: int, budget: list[int]) -> bool:
    """Raise for what jsonb cannot hold; returns whether a float needs exact formatting.
    Raises ``_Irregular`` for a value that must be copied with ``_plain`` first.

    ``budget`` (one for the whole document, ``[JSON_BYTES]`` at the top) is spent as in
    ``_plain``, by less than any serialisation takes: one byte per container and per item, and
    a string's or key's length. A document that holds the same container or string many times
    (``a = [a, a]`` thirty times over is 60 references, 2**30 items to read) is refused after
    at most ``JSON_BYTES`` of them, not after reading and encoding every copy."""
    if depth > JSON_DEPTH:
        raise ValidationError(field, f"is nested deeper than {JSON_DEPTH} levels")
    kind = type(value)
    if kind is dict:
        items = _checked_keys(field, cast(dict[object, object], value), depth, budget)
    elif kind is list or kind is tuple:
        if value and depth >= JSON_DEPTH:
            raise ValidationError(field, f"is nested deeper than {JSON_DEPTH} levels")
        items = cast(Iterable[object], value)
        budget[0] -= 1 + len(value)  # type: ignore[arg-type]  # a list or tuple
    elif issubclass(kind, list | tuple | Mapping):
        raise _Irregular
    else:
        return _check_scalar(field, value, budget)
    if budget[0] < 0:
        raise ValidationError(field, f"must serialise to at most {JSON_BYTES} bytes")
    exact = False
    for item in items:
        # Strings and integers are most of any document: checked here, without a call each.
        cls = type(item)
        if cls is str:
            budget[0] -= len(item)  # type: ignore[arg-type]  # a str: cast() would cost a call
            if budget[0] < 0:
                raise ValidationError(field, f"must serialise to at most {JSON_BYTES} bytes")
            if "\x00" in item:  # type: ignore[operator]  # a str
                raise ValidationError(field, "must not contain NUL characters")
        elif cls is int:
            if not -_SHORT_INT <= item <= _SHORT_INT:  # type: ignore[operator]  # an int
                _spend(field, budget, _int_digits(item))  # type: ignore[arg-type]  # an int
        elif cls is not bool and item is not None:
            exact |= _check_json(field, item, depth + 1, budget)
    return exact


# Ints up to this size cost the budget nothing beyond their item's byte (most of them are
# small); a longer one is charged a lower bound of its digits, so 50,000 references to one
# 4,300-digit int are refused after a megabyte's worth, not encoded into 200 MB.
_SHORT_INT: Final = 10**18


def _int_digits(value: int) -> int:
    """A lower bound of the digits of ``value``: its bits times 0.3, below log10(2)."""
    return int.bit_length(value) * 3 // 10


def _checked_keys(
    field: str, value: dict[object, object], depth: int, budget: list[int]
) -> Iterable[object]:
    """The values of a JSON object, after checking its keys (strings without NUL) and spending
    the object's share of ``budget`` (see ``_check_json``)."""
    if value and depth >= JSON_DEPTH:
        raise ValidationError(field, f"is nested deeper than {JSON_DEPTH} levels")
    spent = 1 + len(value)
    for key in value:
        kind = type(key)
        if kind is not str:
            if issubclass(kind, str):
                raise _Irregular
            raise ValidationError(field, "object keys must be strings")
        if "\x00" in key:  # type: ignore[operator]  # a str
            raise ValidationError(field, "must not contain NUL characters")
        spent += len(key)  # type: ignore[arg-type]  # a str
    budget[0] -= spent
    return value.values()


def _check_scalar(field: str, value: object, budget: list[int]) -> bool:
    """Raise for a scalar jsonb cannot hold; returns whether it is a float that needs exact
    formatting, charging ``budget`` for the digits that writes out (and for a long int's)."""
    kind = type(value)
    if issubclass(kind, str):
        if kind is not str:
            raise _Irregular
        if "\x00" in value:  # type: ignore[operator]  # a str
            raise ValidationError(field, "must not contain NUL characters")
    elif issubclass(kind, float):
        # float's own methods, not the subclass's (numpy.float64's repr: "np.float64(1e-07)").
        if not math.isfinite(value):  # type: ignore[arg-type]  # reads the double: no call
            raise ValidationError(field, "must not contain NaN or Infinity")
        text = float.__repr__(value)  # a float
        if "e" not in text:
            return False
        # Written in full (_plain_float): 5e-324 takes 326 characters, 1e300 takes 303; at
        # least as many as the exponent says.
        _spend(field, budget, abs(int(text[text.index("e") + 1 :])))
        return True
    elif issubclass(kind, int):  # bool is an int
        if not -_SHORT_INT <= value <= _SHORT_INT:  # type: ignore[operator]  # an int
            _spend(field, budget, _int_digits(value))  # type: ignore[arg-type]  # an int
    elif value is not None:
        raise ValidationError(field, f"is not JSON-serialisable ({kind.__name__})")
    return False


def _spend(field: str, budget: list[int], amount: int) -> None:
    """Take ``amount`` from ``budget``: past ``JSON_BYTES``, the document cannot serialise
    within the limit."""
    budget[0] -= amount
    if budget[0] < 0:
        raise ValidationError(field, f"must serialise to at most {JSON_BYTES} bytes")


def _plain(field: str, value: object, depth: int, budget: list[int]) -> object:
    """``value`` copied into plain dicts, lists and strs: each container read once, through
    what the JSON encoder would read (a mapping's ``items()``; a list's or tuple's own storage,
    not an overridden ``__iter__``), so the copy is what is checked and what is sent.

    ``budget`` (one for the whole copy, ``[JSON_BYTES]`` at the top) is spent as the copy
    grows: a byte for each item and one for each character of a string, key or value, which
    is less than any serialisation of them takes. A document past it is refused as it is
    read, so a mapping producing items without end (or each of a million children producing
    a million more) costs at most ``JSON_BYTES`` items."""
    if depth > JSON_DEPTH:
        raise ValidationError(field, f"is nested deeper than {JSON_DEPTH} levels")
    kind = type(value)
    if issubclass(kind, str):
        _spend(field, budget, str.__len__(value))  # type: ignore[arg-type]  # a str
        return str.__getitem__(value, slice(None))  # type: ignore[index]  # a plain str
    if issubclass(kind, Mapping):
        copied: dict[str, object] = {}
        for key, item in cast(Mapping[object, object], value).items():
            if not issubclass(type(key), str):
                raise ValidationError(field, "object keys must be strings")
            _spend(field, budget, 1 + str.__len__(key))  # type: ignore[arg-type]  # a str
            plain_key = str.__getitem__(key, slice(None))  # type: ignore[index]  # a str
            copied[plain_key] = _plain(field, item, depth + 1, budget)
        return copied
    items: Iterator[object]
    if issubclass(kind, list):
        items = list.__iter__(value)  # type: ignore[arg-type]  # a list
    elif issubclass(kind, tuple):
        items = tuple.__iter__(value)  # type: ignore[arg-type]  # a tuple
    else:
        return value
    copied_items: list[object] = []
    for item in items:
        _spend(field, budget, 1)
        copied_items.append(_plain(field, item, depth + 1, budget))
    return copied_items


def _checked(field: str, value: object) -> tuple[object, bool, int]:
    """``value`` (or its plain copy) checked for jsonb, whether a float in it needs exact
    formatting, and a lower bound of its serialised size (what the check spent)."""
    budget = [JSON_BYTES]
    try:
        exact = _check_json(field, value, 0, budget)
    except _Irregular:
        value = _plain(field, value, 0, [JSON_BYTES])
        budget = [JSON_BYTES]
        exact = _check_json(field, value, 0, budget)
    return value, exact, JSON_BYTES - budget[0]


def _plain_float(value: float) -> str:
    # jsonb stores numbers as numeric and prints them without an exponent, so 3.6e16 would come
    # back as the int 36028797018963970. Written out in full with a decimal point, the value
    # survives as the same float.
    text = format(decimal.Decimal(float.__repr__(value)), "f")
    return text if "." in text else f"{text}.0"


def _dumps_exact(value: object) -> str:
    """A checked document (plain containers, strs, ints, floats, bools, None) serialised with
    its floats written in full. Types by ``type()``, as in the checks: ``json.dumps`` asks
    ``isinstance(value, str)`` of a leaf, which an int subclass could answer by editing the
    document still to be written."""
    kind = type(value)
    if issubclass(kind, float):
        return _plain_float(value)  # type: ignore[arg-type]  # a float
    if kind is dict:
        pairs = cast(dict[str, object], value).items()
        return "{" + ",".join(f"{_encode_str(k)}:{_dumps_exact(v)}" for k, v in pairs) + "}"
    if kind is list or kind is tuple:
        return "[" + ",".join(_dumps_exact(v) for v in cast(Iterable[object], value)) + "]"
    if kind is str:
        return _encode_str(value)  # type: ignore[arg-type]  # a str
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if issubclass(kind, int):
        return int.__repr__(value)
    raise TypeError(kind.__name__)  # not in a checked document


_encode_str: Final[Callable[[str], str]] = json.encoder.encode_basestring  # ensure_ascii=False's
_ENCODER: Final = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))
# json.dumps builds a new encoder on every call made with non-default options (~4 µs).


def _one_shot_encoder() -> Callable[[object], str]:
    """``_ENCODER.encode`` (the same text), without building the C encoder anew on each call,
    a third of a small document's cost (emit_events encodes a row at a time): the C encoder
    made once, where the accelerator is there. It keeps no markers for circular references:
    a checked document is at most ``JSON_DEPTH`` deep, and a cycle ends in RecursionError."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    encoder = make(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    return lambda value: "".join(encoder(value, 0))


_encode: Final = _one_shot_encoder()


def _is_object(value: object) -> bool:
    # By type(), as the checks above; a dict skips the ABC check.
    return type(value) is dict or issubclass(type(value), Mapping)


def json_text(field: str, value: object, *, default: str = "{}", obj: bool = True) -> str:
    """``value`` serialised for a ``jsonb`` parameter (``None`` gives ``default``).

    Refused: NaN/Infinity, NUL characters (jsonb cannot hold ``\\u0000``), lone surrogates,
    non-string keys, nesting past ``JSON_DEPTH`` and documents over ``JSON_BYTES``.
    """
    if value is None:
        return default
    if obj and not _is_object(value):
        raise ValidationError(field, "must be a JSON object (a dict)")
    value, exact, _ = _checked(field, value)
    try:
        dumped = _dumps_exact(value) if exact else _ENCODER.encode(value)
        size = len(dumped.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
        # Raised after this block: the exception may hold the document (a UnicodeEncodeError's
        # .object), which __context__ would keep.
        problem: str | None = type(exc).__name__
    else:
        problem = None
    if problem is not None:
        raise ValidationError(field, f"is not valid JSON ({problem})")
    if size > JSON_BYTES:
        raise ValidationError(field, f"must serialise to at most {JSON_BYTES} bytes")
    return dumped


def json_object(field: str, value: object) -> tuple[Mapping[str, Any], bool, int]:
    """``value`` checked as a JSON object (``None`` gives ``{}``) without serialising it,
    whether it holds floats that need ``json_text``'s exact formatting, and a lower bound of
    its serialised size in bytes (a batch refuses a sum over its limit before encoding). The
    byte limit and lone surrogates are left to the caller's serialisation (``json_text``
    checks both); reading stops at the limit's worth (``ValidationError``)."""
    if value is None:
        return {}, False, 2
    if not _is_object(value):
        raise ValidationError(field, "must be a JSON object (a dict)")
    checked, exact, size = _checked(field, value)
    return cast(Mapping[str, Any], checked), exact, size


def json_document(value: object) -> tuple[str, int] | None:
    """``value`` serialised compactly and its size in UTF-8 bytes, or ``None`` when the encoder
    or UTF-8 refuses it (the caller then names the bad field with ``json_text``)."""
    try:
        dumped = _encode(value)
        return dumped, _utf8_len(dumped)
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError):
        return None


def event_batch(batch: Sequence[object], new_id_text: Callable[[], str], max_bytes: int) -> str:
    """The events of ``batch`` checked (errors name ``events[i].field``) and serialised as one
    JSON array of rows (``id`` from ``new_id_text``, ``type``, ``principal_id``, ``org_id``,
    ``ts``, ``data``). Raises ``ValidationError`` naming ``events`` once the array passes
    ``max_bytes``.

    Each row is serialised right after its check, before any other event is read: reading the
    next one may run the caller's code (a mapping's ``items()``, an int subclass's comparison),
    which could change data already checked. The array is counted as it grows, so a batch is
    refused within a row of its limit (short numbers are charged a byte each by the check, and
    write up to 24), not after all of it is serialised."""
    parts: list[str] = []
    size = 1  # the array's bytes so far: "[" and a separator per row
    for index, event in enumerate(batch):
        prefix = f"events[{index}]."
        event_keys(f"events[{index}]", event, required=_BATCH_REQUIRED)
        fields = cast(Mapping[str, Any], event)
        row = event_scalars(
            prefix,
            fields["type"],
            fields["principal_id"],
            fields.get("org_id"),
            fields.get("timestamp"),
        )
        data, exact, least = json_object(prefix + "data", fields["data"])
        if size + least > max_bytes:
            raise _batch_too_large(max_bytes)  # before serialising a row that cannot fit
        row["id"] = new_id_text()
        if row["ts"] is not None:
            row["ts"] = row["ts"].isoformat()
        if exact:
            head = json_document(row)
            assert head is not None  # checked strings and None only
            part = f'{head[0][:-1]},"data":{json_text(prefix + "data", data)}}}'
            size += _utf8_len(part) + 1
        else:
            row["data"] = data
            document = json_document(row)
            if document is None or document[1] > JSON_BYTES:
                # The encoder refused something (a lone surrogate, nesting too deep for it), or
                # the data may be over the per-event limit: name it, in the copy checked above
                # (the caller's mapping may answer a second read with another document).
                json_text(prefix + "data", data)
            assert document is not None
            part, row_size = document
            size += row_size + 1
        if size > max_bytes:
            raise _batch_too_large(max_bytes)
        parts.append(part)
    return f"[{','.join(parts)}]"


_BATCH_REQUIRED: Final = ("type", "principal_id", "data")


def _batch_too_large(max_bytes: int) -> ValidationError:
    return ValidationError("events", f"data must serialise to at most {max_bytes} bytes in all")


def _utf8_len(text: str) -> int:
    # isascii() is a flag of the string in CPython, not a scan: most JSON needs no encoding.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


EVENT_KEYS: Final = frozenset({"type", "principal_id", "data", "org_id", "timestamp"})


def shown(value: object) -> str:
    """``value`` as an error message may show a key or a name the caller passed: a string's
    ``repr`` (its control characters escaped, so it cannot forge a log line), cut at 40
    characters; anything else by its type's name (its own ``repr`` or ``str`` may raise or
    lie)."""
    if isinstance(value, str):
        return str.__repr__(value)[:40]
    return f"<{str.__repr__(type(value).__name__)[1:-1][:40]}>"


def refuse_unknown_keys(field: str, mapping: Mapping[Any, Any], allowed: AbstractSet[str]) -> None:
    """Raise ``ValidationError`` naming ``field`` if ``mapping`` has keys outside ``allowed``:
    the message shows the first 10 (see ``shown``) and the allowed ones."""
    unknown = [key for key in mapping if key not in allowed]
    if unknown:
        listed = ", ".join(sorted(shown(key) for key in unknown[:10]))
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ValidationError(
            field, f"unknown key(s) {listed}{more} (allowed: {', '.join(sorted(allowed))})"
        )


def event_keys(field: str, event: object, *, required: Iterable[str]) -> Mapping[str, Any]:
    """``event`` if it is a dict of audit-event fields (``EVENT_KEYS``) with the ``required``
    ones; errors name ``field`` (unknown keys) or ``field.key`` (missing ones)."""
    if type(event) is not dict and not isinstance(event, Mapping):  # dict: skip the ABC check
        raise ValidationError(field, "must be a dict")
    if not event.keys() <= EVENT_KEYS:
        refuse_unknown_keys(field, event, EVENT_KEYS)
    for key in required:
        if key not in event:
            raise ValidationError(f"{field}.{key}", "is required")
    return event


def text_id(field: str, value: object) -> str:
    """A principal or organization id: a UUID (stored canonically) or non-empty text."""
    if isinstance(value, uuid.UUID):
        plain = plain_uuid(value)
        if plain is None:
            raise ValidationError(field, "must be a UUID or non-empty text")
        return str(plain)
    return text(field, value)


def event_fields(
    prefix: str,
    type: object,
    principal_id: object,
    data: object,
    org_id: object,
    timestamp: object,
) -> dict[str, Any]:
    """The checked columns of one audit event, ``data`` serialised; fields are named
    ``prefix + name`` in errors."""
    fields = event_scalars(prefix, type, principal_id, org_id, timestamp)
    fields["data"] = json_text(prefix + "data", data)
    return fields


def event_scalars(
    prefix: str, type: object, principal_id: object, org_id: object, timestamp: object
) -> dict[str, Any]:
    """The checked columns of one audit event but ``data`` (``type``, ``principal_id``,
    ``org_id``, ``ts``); fields are named ``prefix + name`` in errors."""
    return {
        "type": text(prefix + "type", type),
        "principal_id": text_id(prefix + "principal_id", principal_id),
        "org_id": None if org_id is None else text_id(prefix + "org_id", org_id),
        "ts": opt_timestamp(prefix + "timestamp", timestamp),
    }


def callback(field: str, value: T | None) -> T | None:
    """``value`` if it is callable or ``None`` (checked before any work starts)."""
    if value is not None and not callable(value):
        raise ValidationError(field, f"must be callable, not {type(value).__name__}")
    return value


def choice(field: str, value: object, allowed: Iterable[str]) -> str:
    """One of ``allowed``."""
    options = tuple(allowed)
    if not isinstance(value, str) or plain(value) not in options:
        raise ValidationError(field, f"must be one of {', '.join(options)}")
    return plain(value)


def expect_type(field: str, value: Any, kind: type) -> Any:
    """``value`` if it is an instance of ``kind``."""
    if not isinstance(value, kind):
        raise ValidationError(field, f"must be {kind.__name__}, not {type(value).__name__}")
    return value


def dsn(field: str, value: str) -> None:
    """Raises ``ValidationError(field)`` for a connection string libpq cannot parse: it would
    only fail at connect(), after connect_timeout, and its parse error quotes the part it could
    not read (possibly half of a password). The message quotes nothing."""
    try:
        conninfo_to_dict(value)
        return
    except ProgrammingError:
        pass  # raised below, outside this block: not even __context__ may keep libpq's text
    raise ValidationError(field, "is not a connection string libpq can parse")


DOMAIN: Final = 253
"""Longest domain name (RFC 1035, without the trailing dot)."""

_LABEL_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def domain(field: str, value: object) -> str:
    """An email domain in the form stored: lowercase ASCII labels of letters, digits and inner
    hyphens, separated by dots. Internationalised domains must be given in their ``xn--`` form:
    converting them here (IDNA 2003 and 2008 disagree on some names) could route a login to
    another domain's provider."""
    name = text(field, value, max_len=DOMAIN)
    if not name.isascii():
        raise ValidationError(field, "must be ASCII (write an internationalised domain as xn--)")
    name = name.lower()
    if not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValidationError(field, "must be a domain name such as example.com")
    return name


# Characters IDNA 2003 maps away (sharp s to ss, final sigma to sigma, the joiners dropped)
# while IDNA 2008 keeps them: the two give such a name different xn-- forms, different domains.
_IDNA_DEVIATIONS: Final = frozenset("\u00df\u03c2\u200c\u200d")


def lookup_domain(value: str) -> str | None:
    """The stored form of the domain of ``value`` (an email address or a domain) for a lookup,
    or ``None`` when it is malformed. A Unicode domain is converted to its ``xn--`` form (the
    standard library's IDNA 2003 codec, which agrees with IDNA 2008 on every name without the
    deviation characters); a name with one of those raises ``ValidationError``, so a caller
    that enforces SSO by domain fails closed rather than find no provider."""
    name = value.rpartition("@")[2]
    if not name.isascii():
        # Lowercased and NFKC-normalised too: capital sharp s (U+1E9E) lowercases to ß, and a
        # compatibility character may normalise into one of them. Character by character: a
        # capital sigma alone lowercases to sigma, but to final sigma at the end of a word.
        folded = unicodedata.normalize("NFKC", name)
        lowered = "".join(c.lower() for c in name + folded)
        if not _IDNA_DEVIATIONS.isdisjoint(name + lowered):
            raise ValidationError(
                "domain",
                "contains ß, ς or a zero-width joiner, which IDNA 2003 and 2008 encode"
                " differently: look it up by its xn-- form",
            )
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    try:
        return domain("domain", name)
    except ValidationError:
        return None

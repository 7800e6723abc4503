"""The keyset-paging contract ``list_organization_members``, ``get_role_users`` and
``list_user_sessions`` share (``after=`` the last record of the previous page, ``limit=``),
checked through each of them (tests/test_organizations.py, tests/test_rbac.py and
tests/test_sessions.py call these). A listing is ordered by (``at``, ``tie``), oldest first, or
newest first (``list_user_sessions``)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import pytest

from kitium_pg import ValidationError

ListPage = Callable[..., Awaitable[list[Any]]]

BAD_LIMITS = [0, -1, 1001, 2**70, True, 1.5, "10", [10]]


def keyset(record: Any, at: str, tie: str = "user_id") -> tuple[dt.datetime, uuid.UUID]:
    """The key a listing is ordered by: (``record.<at>``, ``record.<tie>``)."""
    return getattr(record, at), getattr(record, tie)


async def walk(list_page: ListPage, key: Any, limit: int) -> list[list[Any]]:
    """Every page of ``list_page(key, after=..., limit=limit)`` from the first, up to the first
    page shorter than ``limit`` (the last one)."""
    pages: list[list[Any]] = []
    after = None
    while True:
        page = await list_page(key, after=after, limit=limit)
        assert len(page) <= limit
        pages.append(page)
        if len(page) < limit:
            return pages
        after = page[-1]


async def check_walks(
    list_page: ListPage, key: Any, at: str, tie: str = "user_id", *, newest_first: bool = False
) -> list[Any]:
    """Paging through the listing with several page sizes gives the whole unpaged listing, in
    its order (``at`` then ``tie``, strictly increasing, or decreasing when ``newest_first``:
    no duplicates), split into pages of ``limit`` records and a last, shorter one (empty after
    an exact multiple). Returns the whole listing."""
    whole = await list_page(key)
    keys = [keyset(record, at, tie) for record in whole]
    assert keys == sorted(keys, reverse=newest_first) and len(set(keys)) == len(keys), keys
    n = len(whole)
    for limit in sorted({1, 2, 3, n - 1, n, n + 1, 1000} - {0}):
        pages = await walk(list_page, key, limit)
        assert [record for page in pages for record in page] == whole, limit
        assert [len(page) for page in pages] == [limit] * (n // limit) + [n % limit], limit
    # Without a limit, everything after the given record.
    for cut in (0, n // 2, n - 1):
        assert await list_page(key, after=whole[cut]) == whole[cut + 1 :]
    assert await list_page(key, limit=None) == whole
    assert await list_page(key, after=None, limit=None) == whole
    return whole


def forged(record: Any, **fields: Any) -> Any:
    """A copy of ``record`` holding ``fields`` as given, past the record's converters (as a
    careless subclass or ``object.__setattr__`` could leave it)."""
    copy = attrs.evolve(record)
    for name, value in fields.items():
        object.__setattr__(copy, name, value)
    return copy


async def check_bad_paging_arguments(
    list_page: ListPage,
    key: Any,
    record: Any,
    at: str,
    wrong: Sequence[Any],
    tie: str = "user_id",
) -> None:
    """A ``limit`` that is no int from 1 to 1000, an ``after`` that is not a record of the
    listing's class (``wrong``: such values), or one whose keyset fields are not a
    timezone-aware datetime and a UUID, is a ``ValidationError`` naming it, raised also when
    the id is malformed (the arguments are checked first)."""
    naive = getattr(record, at).replace(tzinfo=None)
    bad_after = [(value, "after") for value in wrong] + [
        (forged(record, **{at: naive}), f"after.{at}"),
        (forged(record, **{at: getattr(record, at).isoformat()}), f"after.{at}"),
        (forged(record, **{at: None}), f"after.{at}"),
        (forged(record, **{at: dt.datetime.max.replace(tzinfo=dt.UTC)}), f"after.{at}"),
        (forged(record, **{tie: "not-a-uuid"}), f"after.{tie}"),
        (forged(record, **{tie: None}), f"after.{tie}"),
        (forged(record, **{tie: getattr(record, tie).int}), f"after.{tie}"),
    ]
    for ident in (key, "not-a-uuid"):
        for limit in BAD_LIMITS:
            with pytest.raises(ValidationError) as caught:
                await list_page(ident, limit=limit)
            assert caught.value.field == "limit", limit
            with pytest.raises(ValidationError) as caught:
                await list_page(ident, after=record, limit=limit)
            assert caught.value.field == "limit", limit
        for after, field in bad_after:
            for limit in (None, 10):
                with pytest.raises(ValidationError) as caught:
                    await list_page(ident, after=after, limit=limit)
                assert caught.value.field == field, (after, field)
    # The edges are accepted; a keyset given as a string UUID or in another time zone too.
    assert await list_page(key, limit=1) == (await list_page(key))[:1]
    assert await list_page(key, limit=1000) == await list_page(key)
    east = dt.timezone(dt.timedelta(hours=5))
    same = forged(
        record, **{at: getattr(record, at).astimezone(east), tie: str(getattr(record, tie))}
    )
    assert await list_page(key, after=same, limit=5) == await list_page(key, after=record, limit=5)

"""Deterministic performance: every single-entity method costs exactly one round trip, and
batch methods a number of round trips that does not grow with the batch."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter

from .roundtrips import round_trips


@pytest.fixture(scope="module")
def sync_one(dsn: str) -> Iterator[PostgresStorageAdapter]:
    with PostgresStorageAdapter(dsn, min_size=1, max_size=1) as adapter:
        yield adapter


@pytest.fixture(scope="module")
async def async_one(dsn: str) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    async with AsyncPostgresStorageAdapter(dsn, min_size=1, max_size=1) as adapter:
        yield adapter


@pytest.fixture(params=["sync", "async"])
def one_conn(request: pytest.FixtureRequest) -> Any:
    """An adapter whose pool holds exactly one connection (so the trace sees everything)."""
    return request.getfixturevalue(f"{request.param}_one")


def _later() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


def _calls(s: Any, ctx: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, call) for every single-entity method; ``ctx`` carries ids made by earlier calls."""
    tag = uuid.uuid4().hex[:10]
    return [
        ("create_user", lambda: s.create_user(email=f"rt-{tag}@example.com", password_hash="h")),
        ("get_user", lambda: s.get_user(ctx["user"].id)),
        ("get_user_by_email", lambda: s.get_user_by_email(f"RT-{tag}@example.com")),
        ("update_user", lambda: s.update_user(ctx["user"].id, name="x")),
        ("set_password_hash", lambda: s.set_password_hash(ctx["user"].id, "h2")),
        ("get_password_hash", lambda: s.get_password_hash(ctx["user"].id)),
        ("link_oauth_account", lambda: s.link_oauth_account(ctx["user"].id, "gh", sub=tag)),
        ("get_user_by_oauth", lambda: s.get_user_by_oauth("gh", tag)),
        ("unlink_oauth_account", lambda: s.unlink_oauth_account(ctx["user"].id, "gh")),
        ("delete_user", lambda: s.delete_user(uuid.uuid4())),
    ]


async def test_every_single_entity_method_is_one_round_trip(one_conn: Any) -> None:
    ctx: dict[str, Any] = {}
    measured = {}
    for name, call in _calls(one_conn, ctx):
        trips, result = await round_trips(one_conn, call)
        if name == "create_user":
            ctx["user"] = result
        measured[name] = trips
    assert measured == dict.fromkeys(measured, 1)


async def test_statement_timeout_override_costs_one_extra_round_trip(one_conn: Any) -> None:
    user = (await round_trips(one_conn, lambda: one_conn.create_user()))[1]
    trips, found = await round_trips(
        one_conn, lambda: one_conn.with_statement_timeout(250).get_user(user.id)
    )
    assert found == user
    assert trips == 2


async def test_lookups_with_malformed_ids_make_no_round_trip(one_conn: Any) -> None:
    trips, found = await round_trips(one_conn, lambda: one_conn.get_user("not-a-uuid"))
    assert (trips, found) == (0, None)

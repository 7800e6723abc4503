"""transaction(), nested savepoints and run_in_transaction, against both adapters."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from kitium_pg import ConflictError, QueryTimeoutError


class Boom(Exception):
    """Raised inside a transaction block to force a rollback."""


async def test_a_transaction_commits_all_its_calls(storage: Any, email: str) -> None:
    async with storage.transaction() as tx:
        user = await tx.create_user(email=email)
        session = await tx.create_session(user_id=user.id, expires_at=_later())
        assert await tx.get_user(user.id) == user
    assert await storage.get_user(user.id) == user
    assert await storage.get_session(session.id) == session


async def test_an_exception_rolls_everything_back(storage: Any, email: str) -> None:
    created: list[Any] = []
    with pytest.raises(Boom):
        async with storage.transaction() as tx:
            created.append(await tx.create_user(email=email))
            raise Boom
    assert await storage.get_user(created[0].id) is None
    assert await storage.get_user_by_email(email) is None


async def test_a_database_error_rolls_back_the_earlier_calls(storage: Any, email: str) -> None:
    existing = await storage.create_user(email=email)
    with pytest.raises(ConflictError):
        async with storage.transaction() as tx:
            await tx.update_user(existing.id, name="changed")
            await tx.create_user(email=email.upper())
    assert (await storage.get_user(existing.id)).name is None


async def test_nested_transactions_are_savepoints(storage: Any, email: str) -> None:
    async with storage.transaction() as tx:
        outer = await tx.create_user(email=email)
        with pytest.raises(Boom):
            async with tx.transaction() as inner:
                await inner.update_user(outer.id, name="inner")
                raise Boom
        assert (await tx.get_user(outer.id)).name is None
    assert await storage.get_user(outer.id) == outer


async def test_run_in_transaction_returns_the_result(storage: Any, email: str) -> None:
    async def work(tx: Any) -> Any:
        user = await tx.create_user(email=email)
        return await tx.update_user(user.id, plan="team")

    user = await storage.run_in_transaction(work)
    assert (await storage.get_user(user.id)).plan == "team"


async def test_timeout_override_applies_inside_a_transaction(storage: Any, dsn: str) -> None:
    user = await storage.create_user()
    with psycopg.connect(dsn) as locker:
        locker.execute("SELECT 1 FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
        with pytest.raises(QueryTimeoutError):
            async with storage.with_statement_timeout(150).transaction() as tx:
                assert await tx.get_user(uuid.uuid4()) is None
                await tx.update_user(user.id, name="blocked")
        locker.rollback()
    assert (await storage.get_user(user.id)).name is None


def _later() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


async def test_concurrent_calls_on_one_async_transaction_get_their_own_results(
    async_adapter: Any, unique: Any
) -> None:
    import asyncio

    users = [await async_adapter.create_user(email=f"{unique('tx')}@example.com") for _ in range(8)]
    async with async_adapter.transaction() as tx:
        found = await asyncio.gather(*(tx.get_user(u.id) for u in users))
    assert found == users

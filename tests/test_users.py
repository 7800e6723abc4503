"""Users, password hashes and OAuth links, against both adapters."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import re
import threading
import time
import types
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    ConflictError,
    NotFoundError,
    PostgresStorageAdapter,
    User,
    ValidationError,
)
from kitium_pg._base import new_id

from .conftest import TEST_KEYS, AwaitableSync
from .fix_holder import (
    adapter_module,
    call_while_holding,
    committed_later,
    release_when_waiting,
    waiting,
)
from .fix_metadata import check_metadata_patch
from .fix_race import race_each, start


async def test_create_and_get_round_trip(storage: Any, email: str) -> None:
    user = await storage.create_user(
        email=email,
        name="Ada",
        picture="https://example.com/a.png",
        plan="pro",
        entitlements=["a", "b"],
        metadata={"n": 1, "nested": {"x": [1, 2.5, None, True]}},
    )
    assert isinstance(user, User)
    assert user.id.version == 7
    assert (user.email, user.name, user.plan, user.entitlements) == (
        email,
        "Ada",
        "pro",
        ("a", "b"),
    )
    assert user.metadata == {"n": 1, "nested": {"x": [1, 2.5, None, True]}}
    assert user.oauth == {}
    assert user.created_at.tzinfo is dt.UTC
    assert await storage.get_user(user.id) == user
    assert await storage.get_user(str(user.id)) == user


async def test_lookups_of_unknown_or_malformed_ids_return_none(storage: Any) -> None:
    assert await storage.get_user(uuid.uuid4()) is None
    for bad in ("nope", "", "x" * 10_000, 42, None, "1' OR '1'='1"):
        assert await storage.get_user(bad) is None
    assert await storage.get_user_by_email("nobody@example.com") is None
    assert await storage.get_user_by_email("bad\x00@example.com") is None


async def test_email_is_unique_and_looked_up_case_insensitively(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    assert await storage.get_user_by_email(email.upper()) == user
    with pytest.raises(ConflictError) as caught:
        await storage.create_user(email=email.upper())
    assert "users__email_key" in str(caught.value)
    assert caught.value.retryable is False


async def test_an_address_at_another_domain_never_finds_a_user_through_lower(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """PostgreSQL's ``lower()`` turns ``İ`` into ``i``: without a check, ``bob@gİthub.com``
    (mail for it goes to xn--github-qyd.com, which anyone can register) found
    ``bob@github.com``'s account, the start of a password-reset takeover. (The Kelvin sign,
    the other letter ``lower()`` makes ASCII, is ``K`` once the address is in NFC.)"""
    domain = f"i{unique('d')}.example"
    user = await storage.create_user(email=f"bob@{domain}")
    spoofed = f"bob@\u0130{domain[1:]}"
    assert await storage.get_user_by_email(spoofed) is None
    with pytest.raises(ValidationError) as refused:
        await storage.create_user(email=spoofed)
    assert refused.value.field == "email"
    with pytest.raises(ValidationError):
        await storage.update_user(user.id, email=spoofed)
    with pytest.raises(ValidationError):
        await storage.create_email_verification_token(
            email=spoofed,
            code_hash="h" * 64,
            type="password_reset",
            user_id=user.id,
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )
    assert await storage.get_email_verification_tokens(spoofed) == []
    assert await storage.get_user_by_email(f"BOB@{domain.upper()}") == user
    assert await storage.get_user_by_email(f"bob@\u212a{domain[1:]}") is None  # NFC: "K"


async def test_password_hash_is_stored_but_never_in_the_record(storage: Any, email: str) -> None:
    secret = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"
    user = await storage.create_user(email=email, password_hash=secret)
    assert await storage.get_password_hash(user.id) == secret
    assert secret not in repr(user)
    await storage.set_password_hash(user.id, None)
    assert await storage.get_password_hash(user.id) is None
    with pytest.raises(NotFoundError):
        await storage.set_password_hash(uuid.uuid4(), secret)


async def test_update_changes_only_given_fields(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email, name="Before", plan="free")
    updated = await storage.update_user(user.id, name=None, metadata={"k": "v"})
    assert updated.name is None
    assert updated.plan == "free"
    assert updated.metadata == {"k": "v"}
    assert updated.updated_at >= user.updated_at
    with pytest.raises(NotFoundError):
        await storage.update_user(uuid.uuid4(), name="x")
    with pytest.raises(TypeError):
        await storage.update_user(user.id, password_hash="nope")  # not an updatable field


async def test_email_verification_state_follows_the_address(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """email_verified_at: given at creation (an address a provider vouches for), set by
    mark_user_email_verified only for the user's current address (first proof's time kept),
    cleared by a change to another address unless a new time is given with it, kept across a
    change of letter case."""
    first, second = unique("ada") + "@example.com", unique("ada2") + "@example.com"
    vouched = dt.datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
    user = await storage.create_user(email=first, email_verified_at=vouched)
    assert user.email_verified_at == vouched
    assert await storage.get_user(user.id) == user
    plain = await storage.create_user(email=unique("bob") + "@example.com")
    assert plain.email_verified_at is None

    assert (await storage.update_user(user.id, email=first.upper())).email_verified_at == vouched
    changed = await storage.update_user(user.id, email=second)
    assert changed.email_verified_at is None
    # A token sent to the old address proves nothing about the new one.
    assert await storage.mark_user_email_verified(user.id, first) is None
    assert (await storage.get_user(user.id)).email_verified_at is None
    marked = await storage.mark_user_email_verified(str(user.id), second.upper())
    assert marked is not None and marked.email_verified_at is not None
    assert marked.email_verified_at > vouched and marked.email == second
    again = await storage.mark_user_email_verified(user.id, second)
    assert again is not None and again.email_verified_at == marked.email_verified_at
    given = await storage.update_user(user.id, email=first, email_verified_at=vouched)
    assert (given.email, given.email_verified_at) == (first, vouched)
    # The stored time given again with a new address looks to the trigger like the time left
    # alone: it is cleared (update_user's docstring says so).
    restated = await storage.update_user(user.id, email=second, email_verified_at=vouched)
    assert (restated.email, restated.email_verified_at) == (second, None)
    cleared = await storage.update_user(user.id, email_verified_at=None)
    assert (cleared.email, cleared.email_verified_at) == (second, None)
    removed = await storage.update_user(user.id, email_verified_at=vouched)
    assert (await storage.update_user(removed.id, email=None)).email_verified_at is None

    for user_id, address in (
        (uuid.uuid4(), first),
        ("not-a-uuid", first),
        (user.id, "not an address\x00"),
        (user.id, 42),
        (plain.id, first),
    ):
        assert await storage.mark_user_email_verified(user_id, address) is None
    assert (await storage.get_user(plain.id)).email_verified_at is None


async def test_any_writer_that_changes_the_address_clears_its_verification(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """The rule is the schema's (a trigger), not only update_user's: an UPDATE from SQL or an
    instance of the previous version, which knows nothing of email_verified_at, clears it when
    it changes the address, and keeps it for a change of letter case."""
    address = unique("sql") + "@example.com"
    user = await storage.create_user(email=address)
    assert await storage.mark_user_email_verified(user.id, address) is not None
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE kitium_auth.users SET email = upper(email) WHERE id = %s", [user.id])
    kept = await storage.get_user(user.id, consistency="primary")
    assert kept.email == address.upper() and kept.email_verified_at is not None
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE kitium_auth.users SET email = %s, name = 'x' WHERE id = %s",
            [unique("other") + "@example.com", user.id],
        )
    moved = await storage.get_user(user.id, consistency="primary")
    assert moved.email_verified_at is None


async def test_only_ascii_case_counts_as_the_same_address_for_a_proof(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """Under a linguistic locale lower() makes İ (U+0130) an i: bob@gİthub.com and
    bob@github.com, two domains, would compare equal. A row stored with such an address by
    another tool neither keeps its proof when changed to the ASCII one, nor takes the ASCII
    address's proof from mark_user_email_verified."""
    local = unique("bob")
    dotted, plain = f"{local}@g\u0130thub.com", f"{local}@github.com"
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "INSERT INTO kitium_auth.users (id, email, email_verified_at)"
            " VALUES (gen_random_uuid(), %s, now()) RETURNING id",
            [dotted],
        ).fetchone()
        assert row is not None
        user_id = row[0]
        conn.execute("UPDATE kitium_auth.users SET email = %s WHERE id = %s", [plain, user_id])
    moved = await storage.get_user(user_id, consistency="primary")
    assert moved.email == plain and moved.email_verified_at is None
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE kitium_auth.users SET email = %s WHERE id = %s", [dotted, user_id])
    assert await storage.mark_user_email_verified(user_id, plain) is None
    stored = await storage.get_user(user_id, consistency="primary")
    assert stored.email == dotted and stored.email_verified_at is None


async def test_email_verified_at_needs_an_email_and_a_time_zone(storage: Any, email: str) -> None:
    aware = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    for kwargs in (
        {"email_verified_at": aware},
        {"email": email, "email_verified_at": dt.datetime(2026, 5, 1)},
        {"email": email, "email_verified_at": "yesterday"},
    ):
        with pytest.raises(ValidationError) as caught:
            await storage.create_user(**kwargs)
        assert caught.value.field == "email_verified_at"
    assert await storage.get_user_by_email(email) is None


async def test_marking_an_address_verified_loses_to_a_concurrent_email_change(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """The guard is in the statement: a mark waiting on the row while another transaction
    changes the address re-checks it once that commits, and marks nothing."""
    old, new = unique("old") + "@example.com", unique("new") + "@example.com"
    user = await storage.create_user(email=old)
    holder = psycopg.connect(dsn)
    try:
        holder.execute("UPDATE kitium_auth.users SET email = %s WHERE id = %s", [new, user.id])
        watcher = release_when_waiting(dsn, holder, "email_verified_at = coalesce")
        assert await storage.mark_user_email_verified(user.id, old) is None
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    stored = await storage.get_user(user.id, consistency="primary")
    assert (stored.email, stored.email_verified_at) == (new, None)


async def test_update_patches_metadata_in_place(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    await check_metadata_patch(storage, "update_user", "get_user", user.id, plan="patched")


async def test_concurrent_metadata_patches_of_different_keys_all_survive(
    storage: Any, email: str, dsn: str
) -> None:
    """Two patches of different keys, sent while a third writer holds the user's row: each
    waits for the row lock (seen waiting), then applies its patch to the row as committed, so
    every key survives. A read-modify-write in the caller would have written back what it read
    before the others committed, and lost their keys."""
    user = await storage.create_user(email=email, metadata={"kept": True})
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "UPDATE kitium_auth.users SET metadata = metadata || '{\"c\": 3}' WHERE id = %s",
            (user.id,),
        )
        watcher = release_when_waiting(dsn, holder, "UPDATE kitium_auth.users AS u", waiters=2)
        results = await race_each(
            storage,
            "update_user",
            [
                ((user.id,), {"metadata_patch": {"a": 1}}),
                ((user.id,), {"metadata_patch": {"b": 2}}),
            ],
        )
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert all(isinstance(result, User) for result in results), results
    stored = await storage.get_user(user.id)
    assert stored.metadata == {"kept": True, "a": 1, "b": 2, "c": 3}


async def test_delete_is_idempotent(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    assert await storage.delete_user(user.id) is True
    assert await storage.delete_user(user.id) is False
    assert await storage.get_user(user.id) is None


async def test_oauth_links(storage: Any, email: str, unique: Callable[[str], str]) -> None:
    user = await storage.create_user(email=email)
    sub = unique("sub")
    linked = await storage.link_oauth_account(user.id, "github", sub=sub, email=email, name="A")
    assert linked.oauth["github"].sub == sub
    assert await storage.get_user_by_oauth("github", sub) == linked
    again = await storage.link_oauth_account(user.id, "github", sub=sub, name="B")
    assert again.oauth["github"].name == "B"
    other = await storage.create_user(email="other-" + email)
    with pytest.raises(ConflictError):
        await storage.link_oauth_account(other.id, "github", sub=sub)
    with pytest.raises(ConflictError):
        await storage.link_oauth_account(user.id, "github", sub=unique("other-sub"))
    with pytest.raises(NotFoundError):
        await storage.link_oauth_account(uuid.uuid4(), "gitlab", sub=sub)
    assert await storage.unlink_oauth_account(user.id, "github") is True
    assert await storage.get_user_by_oauth("github", sub) is None


LINK = "INSERT INTO kitium_auth.oauth_accounts AS o"  # link_oauth_account's statement


async def test_two_first_links_of_one_identity_to_one_user_both_succeed(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: ON CONFLICT chooses between insert and update on (provider, subject)
    alone. A first link that had found no row there, and inserted after a concurrent first link
    of the same identity to the same user had committed, failed on the other unique constraint,
    oauth_accounts__provider_key (user_id, provider), with ConflictError where it should have
    refreshed that link. Played without timing: the first link's insert waits, past its
    ON CONFLICT check, on its primary key (a holder's open transaction has a row with the same
    id, deleted again before it commits); the second link is sent then. The second now waits
    for the first on the user's row and updates the link the first made."""
    user = await storage.create_user(email=email)
    sub = unique("g")
    taken = new_id()
    ids = iter([taken])
    monkeypatch.setattr(
        adapter_module(storage, "users"), "new_id", lambda: next(ids, None) or new_id()
    )
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "INSERT INTO kitium_auth.oauth_accounts (id, user_id, provider, subject)"
            " VALUES (%s, %s, 'held', %s)",
            (taken, user.id, unique("held")),
        )
        holder.execute("DELETE FROM kitium_auth.oauth_accounts WHERE id = %s", (taken,))
        first = start(storage, "link_oauth_account", user.id, "google", sub=sub, name="first")
        assert await asyncio.to_thread(waiting, dsn, LINK)  # on the holder's id
        second = start(storage, "link_oauth_account", user.id, "google", sub=sub, name="second")
        # The holder commits once the second waits too, or has returned (as it did before).
        both_wait = asyncio.ensure_future(asyncio.to_thread(waiting, dsn, LINK, 2))
        await asyncio.wait([second, both_wait], return_when=asyncio.FIRST_COMPLETED)
        holder.commit()
        results = await asyncio.gather(first, second, return_exceptions=True)
        seen = await both_wait
    finally:
        holder.close()
    assert all(isinstance(result, User) for result in results), results
    assert seen  # the second waited for the first
    assert [cast(User, r).oauth["google"].name for r in results] == ["first", "second"]
    stored = await storage.get_user_by_oauth("google", sub)
    assert stored is not None and stored.id == user.id
    assert stored.oauth["google"].name == "second"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"email": "no-at-sign"}, "email"),
        ({"email": "a\x00@b.c"}, "email"),
        ({"name": "x" * 256}, "name"),
        ({"name": "\ud800"}, "name"),
        ({"metadata": {"x": float("nan")}}, "metadata"),
        ({"metadata": {"x": float("inf")}}, "metadata"),
        ({"metadata": [1, 2]}, "metadata"),
        ({"entitlements": "not-a-list"}, "entitlements"),
        ({"entitlements": [1]}, "entitlements[0]"),
        ({"plan": ""}, "plan"),
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.create_user(**kwargs)
    assert caught.value.field == field


async def test_oauth_provider_tokens_are_encrypted_at_rest(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    import psycopg

    user = await storage.create_user(email=email)
    access, refresh = unique("access-token"), unique("refresh-token")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await storage.link_oauth_account(
        user.id,
        "google",
        sub=unique("g"),
        access_token=access,
        refresh_token=refresh,
        token_expires_at=expires,
    )
    tokens = await storage.get_oauth_tokens(user.id, "google")
    assert (tokens.access_token, tokens.refresh_token, tokens.expires_at) == (
        access,
        refresh,
        expires,
    )
    assert access not in repr(tokens)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT t::text FROM kitium_auth.oauth_accounts t WHERE user_id = %s", [user.id]
        ).fetchone()
    assert row is not None and access not in row[0] and refresh not in row[0]
    sub = (await storage.get_user(user.id)).oauth["google"].sub
    await storage.link_oauth_account(user.id, "google", sub=sub, name="relinked")
    kept = await storage.get_oauth_tokens(user.id, "google")  # a link without tokens keeps them
    assert (kept.access_token, kept.refresh_token, kept.expires_at) == (access, refresh, expires)
    later = expires + dt.timedelta(hours=1)
    await storage.link_oauth_account(
        user.id, "google", sub=sub, access_token="a-2", refresh_token="r-2", token_expires_at=later
    )
    new = await storage.get_oauth_tokens(user.id, "google")  # one with tokens replaces them
    assert (new.access_token, new.refresh_token, new.expires_at) == ("a-2", "r-2", later)
    assert await storage.get_oauth_tokens(user.id, "github") is None


async def _linked_with_tokens(storage: Any, email: str, unique: Callable[[str], str]) -> Any:
    user = await storage.create_user(email=email)
    await storage.link_oauth_account(
        user.id, "google", sub=unique("g"), access_token="a-1", refresh_token="r-1"
    )
    return user


def _stored_oauth_row(dsn: str, user_id: uuid.UUID) -> tuple[Any, ...] | None:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT access_token_ciphertext, refresh_token_ciphertext, token_expires_at,"
            " tokens_version FROM kitium_auth.oauth_accounts WHERE user_id = %s",
            [user_id],
        ).fetchone()


async def test_update_oauth_tokens_stores_a_refresh_over_the_version_it_read(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    user = await _linked_with_tokens(storage, email, unique)
    read = await storage.get_oauth_tokens(user.id, "google")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    stored = await storage.update_oauth_tokens(
        user.id,
        "google",
        access_token="a-2",
        refresh_token="r-2",
        token_expires_at=expires,
        if_version=read.version,
    )
    assert stored is not None
    assert (stored.access_token, stored.refresh_token, stored.expires_at) == ("a-2", "r-2", expires)
    assert stored.version not in (0, read.version)
    assert await storage.get_oauth_tokens(user.id, "google") == stored
    row = _stored_oauth_row(dsn, user.id)
    assert row is not None and b"a-2" not in row[0] and b"r-2" not in row[1]
    # A refresh over the version read before it: refused, nothing written.
    assert (
        await storage.update_oauth_tokens(
            user.id, "google", access_token="a-3", refresh_token="r-3", if_version=read.version
        )
        is None
    )
    assert _stored_oauth_row(dsn, user.id) == row
    # Without if_version the write is unconditional; no refresh token clears the stored one.
    plain = await storage.update_oauth_tokens(
        user.id, "google", access_token="a-4", refresh_token=None
    )
    assert plain is not None and plain.version != stored.version and plain.expires_at is None
    assert await storage.get_oauth_tokens(user.id, "google") == plain
    # A re-link without tokens keeps them and their version; with tokens it counts one more.
    sub = (await storage.get_user(user.id)).oauth["google"].sub
    await storage.link_oauth_account(user.id, "google", sub=sub, name="relinked")
    assert (await storage.get_oauth_tokens(user.id, "google")) == plain
    await storage.link_oauth_account(user.id, "google", sub=sub, access_token="a-5")
    relinked = await storage.get_oauth_tokens(user.id, "google")
    assert relinked.access_token == "a-5" and relinked.version != plain.version
    # No link: None.
    assert (
        await storage.update_oauth_tokens(user.id, "github", access_token="a", refresh_token=None)
        is None
    )
    assert await storage.get_oauth_tokens(user.id, "github") is None
    # The user's other links keep their tokens.
    await storage.link_oauth_account(
        user.id, "github", sub=unique("gh"), access_token="gh-a", refresh_token="gh-r"
    )
    github = await storage.get_oauth_tokens(user.id, "github")
    assert await storage.update_oauth_tokens(
        user.id, "google", access_token="a-6", refresh_token="r-6"
    )
    assert await storage.get_oauth_tokens(user.id, "github") == github


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"if_version": -1}, "if_version"),
        ({"if_version": True}, "if_version"),
        ({"if_version": 2**63}, "if_version"),
        ({"if_version": "1"}, "if_version"),
        ({"access_token": None}, "access_token"),
        ({"access_token": ""}, "access_token"),
        ({"refresh_token": 7}, "refresh_token"),
        ({"token_expires_at": dt.datetime(2030, 1, 1)}, "token_expires_at"),
        ({"user_id": "not-a-uuid"}, "user_id"),
    ],
)
async def test_update_oauth_tokens_refuses_bad_input_and_writes_nothing(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    kwargs: dict[str, Any],
    field: str,
) -> None:
    user = await _linked_with_tokens(storage, email, unique)
    before = _stored_oauth_row(dsn, user.id)
    call: dict[str, Any] = {
        "user_id": user.id,
        "provider": "google",
        "access_token": "a-2",
        "refresh_token": "r-2",
        **kwargs,
    }
    with pytest.raises(ValidationError) as caught:
        await storage.update_oauth_tokens(**call)
    assert caught.value.field == field
    assert _stored_oauth_row(dsn, user.id) == before


@pytest.mark.parametrize(
    ("call", "marker"),
    [
        ("link_oauth_account", LINK),
        ("update_user", "UPDATE kitium_auth.users AS u"),
        ("mark_user_email_verified", "SET email_verified_at = coalesce"),
    ],
)
async def test_a_user_write_that_waited_for_the_users_lock_returns_the_user_as_it_then_was(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str, call: str, marker: str
) -> None:
    """Found in the fourth review: these statements wait for the user's row lock (held by a
    link or a change of the user), then returned the user's OAuth links as their snapshot from
    before the wait showed them (and link_oauth_account the user's other columns too): a link
    committed meanwhile was missing, and the record differed from the stored user. They read
    them after the lock (migration 0035)."""
    user = await storage.create_user(email=email)
    async with storage.transaction() as tx:
        await tx.link_oauth_account(user.id, "google", sub=unique("g"))
        await tx.update_user(user.id, name="renamed meanwhile")
        if call == "link_oauth_account":
            later = start(storage, call, user.id, "github", sub=unique("h"))
        elif call == "update_user":
            later = start(storage, call, user.id, picture="https://example.com/p.png")
        else:
            later = start(storage, call, user.id, email)
        assert await asyncio.to_thread(waiting, dsn, marker)
    returned = await later
    assert returned.name == "renamed meanwhile"
    assert "google" in returned.oauth
    assert returned == await storage.get_user(user.id)


async def test_a_refresh_read_before_an_unlink_and_relink_is_not_stored(
    storage: Any, email: str, unique: Callable[[str], str]
) -> None:
    """Found in review: versions counted from 0 for each link, so a worker's version read
    before the user unlinked and linked another account at the provider matched the new link,
    and the old account's refreshed tokens were stored on it. Versions never repeat now."""
    user = await _linked_with_tokens(storage, email, unique)
    stale = await storage.get_oauth_tokens(user.id, "google")
    assert await storage.unlink_oauth_account(user.id, "google")
    await storage.link_oauth_account(
        user.id, "google", sub=unique("other"), access_token="b-1", refresh_token="rb-1"
    )
    assert (
        await storage.update_oauth_tokens(
            user.id, "google", access_token="a-2", refresh_token="r-2", if_version=stale.version
        )
        is None
    )
    tokens = await storage.get_oauth_tokens(user.id, "google")
    assert (tokens.access_token, tokens.refresh_token) == ("b-1", "rb-1")


async def test_two_refreshes_of_one_version_store_exactly_one(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Two workers refreshed the same tokens: both updates wait on the link row, then run one
    after the other; the second finds the version moved and stores nothing (a plain UPDATE
    would let the later write replace the earlier refresh token, which a rotating provider
    has already replaced)."""
    user = await _linked_with_tokens(storage, email, unique)
    read = await storage.get_oauth_tokens(user.id, "google")
    calls = [
        (
            (user.id, "google"),
            {"access_token": f"a-{n}", "refresh_token": f"r-{n}", "if_version": read.version},
        )
        for n in ("x", "y")
    ]
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "UPDATE kitium_auth.oauth_accounts SET name = name WHERE user_id = %s", (user.id,)
        )
        watcher = release_when_waiting(dsn, holder, "AS seen", waiters=2)
        results = await race_each(storage, "update_oauth_tokens", calls)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    stored = [r for r in results if r is not None]
    assert len(stored) == 1 and results.count(None) == 1, results
    assert stored[0].version != read.version
    assert await storage.get_oauth_tokens(user.id, "google") == stored[0]


async def test_a_retry_queued_behind_its_own_first_attempt_reports_the_write(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the connection is lost while update_oauth_tokens waits for the link's
    row lock; the server still runs the first attempt, and the adapter's retry queues behind
    it. The retry read the link as of its snapshot (before the first attempt committed) and
    returned None, "no link or another write came first", for a write that was stored. Played
    by two calls with the same version waiting on one lock: both report the write."""
    user = await _linked_with_tokens(storage, email, unique)
    read = await storage.get_oauth_tokens(user.id, "google")
    monkeypatch.setattr(adapter_module(storage, "users"), "new_tokens_version", lambda: 5151)
    call = {"access_token": "a-2", "refresh_token": "r-2", "if_version": read.version}
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT 1 FROM kitium_auth.oauth_accounts WHERE user_id = %s FOR UPDATE", (user.id,)
        )
        watcher = release_when_waiting(dsn, holder, "recent_write_versions", waiters=2)
        results = await race_each(storage, "update_oauth_tokens", [((user.id, "google"), call)] * 2)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert [r.version if r else None for r in results] == [5151, 5151], results
    stored = await storage.get_oauth_tokens(user.id, "google")
    assert (stored.access_token, stored.version) == ("a-2", 5151)


async def test_a_retried_link_leaves_a_newer_email_and_name(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a recognised retry of link_oauth_account still wrote its email and
    name over a re-link's made in between. Nor does it write its tokens and their expiry."""
    user = await storage.create_user(email=email)
    sub = unique("g")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    later = soon + dt.timedelta(hours=1)
    first_attempt = _replayed(
        storage,
        monkeypatch,
        6161,
        storage.link_oauth_account,
        user.id,
        "google",
        sub=sub,
        email="old@example.com",
        name="Old",
        access_token="a",
        token_expires_at=soon,
    )

    first = await first_attempt()
    await storage.link_oauth_account(
        user.id, "google", sub=sub, email="new@example.com", name="New", access_token="b",
        refresh_token="rb", token_expires_at=later,
    )  # fmt: skip
    retried = await first_attempt()
    assert retried.id == first.id
    assert retried.oauth == (await storage.get_user(user.id)).oauth  # the link as it is now
    link = retried.oauth["google"]
    assert (link.email, link.name) == ("new@example.com", "New")
    tokens = await storage.get_oauth_tokens(user.id, "google")
    assert (tokens.access_token, tokens.refresh_token, tokens.expires_at) == ("b", "rb", later)


async def test_a_retried_link_keeps_the_key_id_of_the_tokens_it_keeps(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recognised retry keeps the stored tokens, and so their key id: an instance on an older
    keyring retrying its link after one on a newer keyring re-linked must not pair the newer
    ciphertext with its own key id (the tokens would no longer decrypt)."""
    newer = {**TEST_KEYS, "test-newer": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    user = await storage.create_user(email=email)
    sub = unique("g")
    first_attempt = _replayed(
        storage, monkeypatch, 7171, storage.link_oauth_account, user.id, "google", sub=sub,
        access_token="a",
    )  # fmt: skip
    await first_attempt()

    async def relink_then_retry(other: Any) -> None:
        await other.link_oauth_account(user.id, "google", sub=sub, access_token="b")
        await first_attempt()
        assert (await other.get_oauth_tokens(user.id, "google")).access_token == "b"

    if storage.kind == "sync":
        with PostgresStorageAdapter(dsn, max_size=2, encryption_keys=newer) as sync_newer:
            await relink_then_retry(AwaitableSync(sync_newer))
    else:
        async with AsyncPostgresStorageAdapter(
            dsn, max_size=2, encryption_keys=newer
        ) as async_newer:
            await relink_then_retry(async_newer)
    with psycopg.connect(dsn) as conn:
        key_id = conn.execute(
            "SELECT tokens_key_id FROM kitium_auth.oauth_accounts WHERE user_id = %s", [user.id]
        ).fetchone()
    assert key_id == ("test-newer",)


def _lease(dsn: str, user_id: uuid.UUID) -> tuple[Any, ...] | None:
    """The refresh lease columns of the user's google link."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT refresh_lease_until, refresh_lease_holder FROM kitium_auth.oauth_accounts"
            " WHERE user_id = %s AND provider = 'google'",
            [user_id],
        ).fetchone()


def _run_out_lease(dsn: str, user_id: uuid.UUID) -> None:
    """Make the held lease one that ran out a moment ago (the server's clock decides)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE kitium_auth.oauth_accounts SET refresh_lease_until = now() - interval '1 ms'"
            " WHERE user_id = %s",
            [user_id],
        )


async def test_one_of_many_claims_gets_the_refresh_lease(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Five workers claim the refresh at once: exactly one gets the tokens (with their
    version), the others None, while all five wait on the link row held by another
    transaction and then run one after the other."""
    user = await _linked_with_tokens(storage, email, unique)
    read = await storage.get_oauth_tokens(user.id, "google")
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "UPDATE kitium_auth.oauth_accounts SET name = name WHERE user_id = %s", (user.id,)
        )
        watcher = release_when_waiting(dsn, holder, "refresh_lease_holder =", waiters=5)
        calls = [((user.id, "google"), {"lease_seconds": 60}) for _ in range(5)]
        results = await race_each(storage, "claim_oauth_refresh", calls)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    claimed = [r for r in results if r is not None]
    assert claimed == [read] and results.count(None) == 4, results
    until, lease_holder = _lease(dsn, user.id) or (None, None)
    assert until is not None and lease_holder is not None
    assert until > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=50)


async def test_a_claim_that_waited_for_the_link_leases_from_when_it_holds_it(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in review: a claim that waited 1.5 s for the link's row (another transaction only
    locked it) computed its 1 s lease before the wait, so the lease was over when the claim
    returned and a second worker got the refresh at once. The lease now runs from when the
    claim holds the row: it outlasts the call, and the next claim gets None."""
    user = await _linked_with_tokens(storage, email, unique)
    claimed = await call_while_holding(
        storage,
        dsn,
        ("oauth_accounts", {"user_id": user.id, "provider": "google"}),
        "NO KEY UPDATE",
        lambda: storage.claim_oauth_refresh(user.id, "google", lease_seconds=1),
        waits_on="refresh_lease_holder =",
        linger=1.5,
    )
    assert claimed is not None and not isinstance(claimed, BaseException)
    until, _ = _lease(dsn, user.id) or (None, None)
    assert until is not None and until > dt.datetime.now(dt.UTC)
    assert await storage.claim_oauth_refresh(user.id, "google") is None


async def test_a_claim_leases_only_the_providers_link(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Claiming the refresh of the user's google link leaves the lease of its other links
    free: the next claim of the github link gets its tokens."""
    user = await _linked_with_tokens(storage, email, unique)
    await storage.link_oauth_account(
        user.id, "github", sub=unique("gh"), access_token="gh-a", refresh_token="gh-r"
    )
    assert await storage.claim_oauth_refresh(user.id, "google") is not None
    with psycopg.connect(dsn) as conn:
        github = conn.execute(
            "SELECT refresh_lease_until, refresh_lease_holder FROM kitium_auth.oauth_accounts"
            " WHERE user_id = %s AND provider = 'github'",
            [user.id],
        ).fetchone()
    assert github == (None, None)
    assert await storage.claim_oauth_refresh(user.id, "github") is not None


async def test_a_refresh_lease_ends_with_new_tokens_or_runs_out(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    user = await _linked_with_tokens(storage, email, unique)
    claimed = await storage.claim_oauth_refresh(user.id, "google")
    assert claimed == await storage.get_oauth_tokens(user.id, "google")
    assert await storage.claim_oauth_refresh(user.id, "google") is None  # held
    # The holder stores the refresh: the lease ends, the next claim gets the new tokens.
    stored = await storage.update_oauth_tokens(
        user.id, "google", access_token="a-2", refresh_token="r-2", if_version=claimed.version
    )
    assert stored is not None and _lease(dsn, user.id) == (None, None)
    again = await storage.claim_oauth_refresh(user.id, "google", lease_seconds=1)
    assert again == stored
    # A holder that never comes back: once its lease has run out, the next claim gets it.
    assert await storage.claim_oauth_refresh(user.id, "google") is None
    _run_out_lease(dsn, user.id)
    taken_over = await storage.claim_oauth_refresh(user.id, "google")
    assert taken_over == stored
    # A re-link with tokens ends the lease; one without tokens keeps it.
    sub = (await storage.get_user(user.id)).oauth["google"].sub
    held = _lease(dsn, user.id)
    await storage.link_oauth_account(user.id, "google", sub=sub, name="renamed")
    assert _lease(dsn, user.id) == held
    await storage.link_oauth_account(user.id, "google", sub=sub, access_token="a-3")
    assert _lease(dsn, user.id) == (None, None)
    # No link at that provider: None, and nothing is written.
    assert await storage.claim_oauth_refresh(user.id, "github") is None
    assert await storage.get_oauth_tokens(user.id, "github") is None


async def test_a_claim_that_waited_on_the_row_still_holds_its_whole_lease(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in review: the lease ran from now(), the start of the claim's statement. A claim
    that waited on the link row for longer than its lease wrote a lease that had already run
    out, and the next worker's claim got the tokens too. It runs from the time the row is
    reached: the second claim gets None."""
    user = await _linked_with_tokens(storage, email, unique)
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "UPDATE kitium_auth.oauth_accounts SET name = name WHERE user_id = %s", (user.id,)
        )

        def release_after_the_lease() -> None:
            watched = waiting(dsn, "refresh_lease_holder =")
            time.sleep(1.2)  # longer than the claim's lease (1 s) since its statement began
            holder.commit()
            release.seen = watched  # type: ignore[attr-defined]

        release = threading.Thread(target=release_after_the_lease)
        release.start()
        first = await storage.claim_oauth_refresh(user.id, "google", lease_seconds=1)
        release.join()
        assert release.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert first is not None
    assert await storage.claim_oauth_refresh(user.id, "google") is None


async def _token_write(
    storage: Any, user_id: uuid.UUID, method: str
) -> tuple[Callable[..., Awaitable[Any]], dict[str, Any]]:
    """``method`` (update_oauth_tokens or link_oauth_account) of the user's google link and
    the keyword arguments of a write of new tokens ("a-2", "r-2") through it."""
    call: dict[str, Any] = {"access_token": "a-2", "refresh_token": "r-2"}
    if method == "update_oauth_tokens":
        call["if_version"] = (await storage.get_oauth_tokens(user_id, "google")).version
    elif method == "link_oauth_account":
        call["sub"] = (await storage.get_user(user_id)).oauth["google"].sub
    return getattr(storage, method.removesuffix(UNCONDITIONAL)), call


UNCONDITIONAL = " without if_version"
TOKEN_WRITES = ["update_oauth_tokens", "update_oauth_tokens" + UNCONDITIONAL, "link_oauth_account"]


def _replayed(
    storage: Any,
    monkeypatch: pytest.MonkeyPatch,
    version: int,
    write: Callable[..., Awaitable[Any]],
    *args: Any,
    **kwargs: Any,
) -> Callable[[], Awaitable[Any]]:
    """``write(*args, **kwargs)`` with the version its first attempt drew, as the adapter's
    retry after a lost acknowledgement sends it: call it once for the first attempt, again for
    the retry."""

    async def attempt() -> Any:
        monkeypatch.setattr(adapter_module(storage, "users"), "new_tokens_version", lambda: version)
        try:
            return await write(*args, **kwargs)
        finally:
            monkeypatch.undo()

    return attempt


@pytest.mark.parametrize("method", TOKEN_WRITES)
async def test_a_retried_token_write_keeps_a_lease_taken_after_its_first_attempt(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """Found in review: the adapter's retry of a token write after a lost acknowledgement
    (played here by the same call again, with the version its first attempt drew) ended the
    lease another worker had taken since, letting a third worker refresh beside it
    (update_oauth_tokens, then link_oauth_account with tokens)."""
    user = await _linked_with_tokens(storage, email, unique)
    write, call = await _token_write(storage, user.id, method)
    first_attempt = _replayed(storage, monkeypatch, 4242, write, user.id, "google", **call)

    first = await first_attempt()
    claimed = await storage.claim_oauth_refresh(user.id, "google")  # another worker
    assert claimed is not None and claimed.version == 4242
    held = _lease(dsn, user.id)
    assert await first_attempt() == first
    assert _lease(dsn, user.id) == held
    assert await storage.claim_oauth_refresh(user.id, "google") is None
    # A new write (its own version) still ends the lease.
    await write(user.id, "google", **{k: v for k, v in call.items() if k != "if_version"})
    assert _lease(dsn, user.id) == (None, None)


@pytest.mark.parametrize("method", TOKEN_WRITES)
async def test_a_retried_token_write_leaves_the_newer_tokens_a_lease_holder_stored(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """Found in review: the adapter's retry of a token write after a lost acknowledgement
    (played here by the same call again, with the version its first attempt drew) wrote its
    tokens back over the ones a lease holder had refreshed and stored in between: with a
    provider that rotates refresh tokens, the link then held a replaced one. The retry finds
    its version among the link's recent ones and changes nothing; it reports its write as
    done."""
    user = await _linked_with_tokens(storage, email, unique)
    write, call = await _token_write(storage, user.id, method)
    first_attempt = _replayed(storage, monkeypatch, 4343, write, user.id, "google", **call)

    first = await first_attempt()
    claimed = await storage.claim_oauth_refresh(user.id, "google")  # another worker
    assert claimed is not None and claimed.version == 4343
    newer = await storage.update_oauth_tokens(
        user.id, "google", access_token="a-3", refresh_token="r-3", if_version=claimed.version
    )
    assert newer is not None
    assert await first_attempt() == first
    stored = await storage.get_oauth_tokens(user.id, "google")
    assert (stored.access_token, stored.refresh_token) == ("a-3", "r-3")
    assert stored.version == newer.version
    # The link keeps the last 8 versions written, newest first.
    for n in range(8):
        await storage.update_oauth_tokens(
            user.id, "google", access_token=f"x{n}", refresh_token="r"
        )
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT tokens_version, recent_write_versions FROM kitium_auth.oauth_accounts"
            " WHERE user_id = %s AND provider = 'google'",
            [user.id],
        ).fetchone()
    assert row is not None
    version, recent = row
    assert len(recent) == 8 and recent[0] == version
    assert newer.version not in recent  # the ninth write back has left the list


async def test_claim_oauth_refresh_refuses_a_transactions_view(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """A lease taken in a transaction is not seen until it commits, and other claims wait for
    the transaction instead of returning None: the claim must run on the adapter."""
    user = await _linked_with_tokens(storage, email, unique)
    async with storage.transaction() as tx:
        with pytest.raises(ValidationError) as caught:
            await tx.claim_oauth_refresh(user.id, "google")
        assert caught.value.field == "transaction"
        assert "claim_oauth_refresh" in str(caught.value)
    assert _lease(dsn, user.id) == (None, None)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"lease_seconds": 3601}, "lease_seconds"),
        ({"lease_seconds": 1.5}, "lease_seconds"),
        ({"lease_seconds": True}, "lease_seconds"),
        ({"lease_seconds": "30"}, "lease_seconds"),
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"provider": ""}, "provider"),
    ],
)
async def test_claim_oauth_refresh_refuses_bad_input_and_takes_no_lease(
    storage: Any,
    email: str,
    unique: Callable[[str], str],
    dsn: str,
    kwargs: dict[str, Any],
    field: str,
) -> None:
    user = await _linked_with_tokens(storage, email, unique)
    call: dict[str, Any] = {"user_id": user.id, "provider": "google", **kwargs}
    with pytest.raises(ValidationError) as caught:
        await storage.claim_oauth_refresh(**call)
    assert caught.value.field == field
    assert _lease(dsn, user.id) == (None, None)


async def test_create_returns_the_row_an_attempt_committed_after_the_retry_began(
    storage: Any, dsn: str, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried create whose first attempt the server commits only after the retry took its
    snapshot: the retry's insert waits on the id, finds it taken, and its statement cannot see
    the row. The adapter runs the statement once more and returns the stored row (played here
    by a second connection holding the same id)."""
    user_id = uuid.uuid4()
    monkeypatch.setattr(adapter_module(storage, "users"), "new_id", lambda: user_id)
    address = f"{unique('held')}@example.com"
    insert = "INSERT INTO kitium_auth.users (id, email) VALUES (%s, %s)"
    with committed_later(dsn, insert, [(user_id, address)]):
        user = await storage.create_user(email=address)
    assert (user.id, user.email) == (user_id, address)


async def test_one_address_in_two_unicode_spellings_is_one_user(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """``é`` as one code point (NFC) or as ``e`` plus a combining accent (NFD) is the same
    address: stored in NFC, found by either spelling, and taken for the other."""
    stem = unique("jose")
    composed, decomposed = f"{stem}\u00e9@example.com", f"{stem}e\u0301@example.com"
    user = await storage.create_user(email=decomposed)
    assert user.email == composed
    assert await storage.get_user_by_email(composed) == user
    assert await storage.get_user_by_email(decomposed) == user
    with pytest.raises(ConflictError):
        await storage.create_user(email=composed)


def _guide_example(name: str) -> Callable[..., Any]:
    """The function ``name`` from the Python blocks of docs/guide/users.md, as printed."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "guide" / "users.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", guide, flags=re.DOTALL):
        if f"def {name}(" in block:
            namespace: dict[str, Any] = {
                "needs_refresh": lambda expires_at: (
                    expires_at is None
                    or expires_at < dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
                ),
            }
            exec(compile(block, "docs/guide/users.md", "exec"), namespace)  # noqa: S102
            return cast(Callable[..., Any], namespace[name])
    raise AssertionError(f"no {name} in docs/guide/users.md")


class _Provider:
    """An OAuth client whose refresh takes a while, counts its calls, fails ``failures`` times
    first, and rotates the refresh token; its access tokens last ``lifetime`` (``None``: no
    expiry given, as RFC 6749's optional ``expires_in``)."""

    def __init__(
        self, failures: int = 0, lifetime: dt.timedelta | None = dt.timedelta(hours=1)
    ) -> None:
        self.failures, self.lifetime = failures, lifetime
        self.lock, self.used = threading.Lock(), list[str]()

    def refresh(self, refresh_token: str) -> Any:
        with self.lock:
            self.used.append(refresh_token)
            n = len(self.used)
        time.sleep(0.3)
        if n <= self.failures:
            raise ConnectionError("provider down")
        expires = None if self.lifetime is None else dt.datetime.now(dt.UTC) + self.lifetime
        return types.SimpleNamespace(
            access_token=f"a-new-{n}", refresh_token=f"{refresh_token}+{n}", expires_at=expires
        )


def _race_the_guide(
    storage: PostgresStorageAdapter,
    unique: Callable[[str], str],
    provider: _Provider,
    lease_seconds: int,
) -> tuple[Any, list[Any]]:
    """Four workers run the guide's fresh_tokens at once on a link whose tokens expired: the
    stored tokens after, and what each worker got (or raised)."""
    fresh_tokens = _guide_example("fresh_tokens")
    user = storage.create_user(email=f"{unique('guide')}@example.com")
    storage.link_oauth_account(
        user.id,
        "google",
        sub=unique("g"),
        access_token="a-old",
        refresh_token="r-old",
        token_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
    )
    barrier = threading.Barrier(4)

    def worker() -> Any:
        barrier.wait()
        return fresh_tokens(storage, user.id, "google", provider, lease_seconds=lease_seconds)

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = [f.exception() or f.result() for f in [pool.submit(worker) for _ in range(4)]]
    return storage.get_oauth_tokens(user.id, "google"), outcomes


@pytest.mark.parametrize("failures", [0, 1])
def test_the_guides_refresh_example_calls_the_provider_once_per_refresh(
    sync_adapter: PostgresStorageAdapter, unique: Callable[[str], str], failures: int
) -> None:
    """docs/guide/users.md's fresh_tokens, run as printed by four workers at once on expired
    tokens: the provider is called once and every worker gets the stored refresh. When the
    holder's call fails (its worker raises), the others wait for its lease to run out and one of
    them refreshes: two calls, and the waiters get fresh tokens, not the expired ones."""
    provider = _Provider(failures)
    stored, outcomes = _race_the_guide(sync_adapter, unique, provider, lease_seconds=1)
    assert stored is not None and stored.refresh_token == f"r-old+{failures + 1}"
    assert len(provider.used) == failures + 1
    failed = [o for o in outcomes if isinstance(o, ConnectionError)]
    assert len(failed) == failures
    assert [o for o in outcomes if not isinstance(o, ConnectionError)] == [stored] * (4 - failures)


@pytest.mark.parametrize("lifetime", [None, dt.timedelta(minutes=2)], ids=["no-expiry", "2min"])
def test_the_guides_refresh_calls_the_provider_once_when_new_tokens_still_need_refresh(
    sync_adapter: PostgresStorageAdapter,
    unique: Callable[[str], str],
    lifetime: dt.timedelta | None,
) -> None:
    """Found in the second review: when the provider's new tokens still "need refresh" (no
    expiry, or shorter-lived than the guide's 5-minute margin), the waiters re-read them,
    claimed the lease the holder had just ended and refreshed again, one after the other (four
    workers, four provider calls). The guide compares versions now."""
    provider = _Provider(lifetime=lifetime)
    stored, outcomes = _race_the_guide(sync_adapter, unique, provider, lease_seconds=5)
    assert provider.used == ["r-old"]
    assert stored is not None and stored.refresh_token == "r-old+1"
    assert outcomes == [stored] * 4

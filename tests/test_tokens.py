"""Issued bearer session tokens and API keys: digests only, verification, revocation."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from typing import Any

import psycopg
import pytest

from kitium_pg import IssuedApiKey, IssuedSession, NotFoundError, ValidationError

from .fix_holder import call_while_holding, replay_behind_open_attempt, two_calls_queued_on
from .fix_race import race, start


def _in(hours: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)


async def test_session_token_round_trip_and_digest_only(storage: Any, email: str, dsn: str) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1), plan="pro")
    assert isinstance(issued, IssuedSession)
    session_id, secret = issued.token.split(".")
    assert session_id == str(issued.session.id) and len(secret) >= 43
    assert issued.token not in repr(issued)
    assert await storage.validate_session_token(issued.token) == issued.session
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT token_hash FROM kitium_auth.sessions WHERE id = %s", [issued.session.id]
        ).fetchone()
    assert row is not None
    assert bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    assert secret.encode() not in bytes(row[0])


async def test_wrong_malformed_expired_and_revoked_tokens_are_none(
    storage: Any, email: str
) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    session_id, secret = issued.token.split(".")
    for bad in (
        f"{session_id}.{secret[:-1]}x",
        f"{session_id}.",
        session_id,
        "",
        "not-a-uuid.secret",
        f"{session_id}.\ud800",
        "x" * 10_000,
        None,
        42,
    ):
        assert await storage.validate_session_token(bad) is None
    plain = await storage.create_session(user_id=user.id, expires_at=_in(1))
    assert await storage.validate_session_token(f"{plain.id}.{secret}") is None
    expired = await storage.issue_session_token(user_id=user.id, expires_at=_in(-1))
    assert await storage.validate_session_token(expired.token) is None
    assert await storage.delete_session(issued.session.id) is True
    assert await storage.validate_session_token(issued.token) is None


async def test_a_session_token_has_one_spelling(storage: Any, email: str) -> None:
    """Only the string issued validates: the id part in another UUID spelling (upper case,
    braces, urn:uuid:, no hyphens) would make one session reachable under many token strings,
    and an application keying a deny-list or rate limit on the string could be bypassed."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    assert await storage.validate_session_token(issued.token) == issued.session
    session_id, secret = issued.token.split(".")
    hexed = session_id.replace("-", "")
    for spelling in (
        session_id.upper(),
        f"{{{session_id}}}",
        f"urn:uuid:{session_id}",
        hexed,
        f"{hexed[:4]}-{hexed[4:]}",
        f" {session_id}",
    ):
        assert spelling != session_id
        assert await storage.validate_session_token(f"{spelling}.{secret}") is None, spelling


async def test_rotating_a_session_token_keeps_the_session_and_kills_the_old_token(
    storage: Any, email: str
) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(
        user_id=user.id, expires_at=_in(1), plan="pro", metadata={"device": "phone"}
    )
    rotated = await storage.rotate_session_token(issued.token)
    assert isinstance(rotated, IssuedSession)
    assert rotated.session.id == issued.session.id and rotated.token != issued.token
    unchanged = ("user_id", "org_id", "plan", "entitlements", "metadata", "expires_at")
    for name in unchanged:
        assert getattr(rotated.session, name) == getattr(issued.session, name), name
    assert await storage.validate_session_token(issued.token) is None
    assert await storage.validate_session_token(rotated.token) == rotated.session
    assert await storage.rotate_session_token(issued.token) is None  # used up
    # Sliding expiry: the rotation moves it when asked.
    later = _in(5)
    slid = await storage.rotate_session_token(rotated.token, expires_at=later)
    assert slid is not None and slid.session.expires_at == later
    assert await storage.validate_session_token(slid.token) == slid.session


async def test_a_token_that_does_not_validate_does_not_rotate(storage: Any, email: str) -> None:
    """Wrong, malformed, tokenless, expired and revoked tokens give None and change nothing; a
    bad expires_at is a ValidationError, with the token left as it was."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    session_id, secret = issued.token.split(".")
    plain = await storage.create_session(user_id=user.id, expires_at=_in(1))
    expired = await storage.issue_session_token(user_id=user.id, expires_at=_in(-1))
    for bad in (
        f"{session_id}.{secret[:-1]}x",
        f"{session_id.upper()}.{secret}",
        f"{session_id}.",
        f"{session_id}.\ud800",
        f"{plain.id}.{secret}",
        expired.token,
        "x" * 10_000,
        None,
        42,
    ):
        assert await storage.rotate_session_token(bad) is None, bad
    for when in (dt.datetime(2030, 1, 1), "tomorrow"):
        with pytest.raises(ValidationError) as caught:
            await storage.rotate_session_token(issued.token, expires_at=when)
        assert caught.value.field == "expires_at"
    assert await storage.validate_session_token(issued.token) == issued.session
    assert await storage.delete_session(issued.session.id) is True
    assert await storage.rotate_session_token(issued.token) is None


async def test_a_rotation_to_a_past_expiry_changes_nothing(
    storage: Any, email: str, dsn: str
) -> None:
    """A new expires_at that has passed would give a token that never validates, and kill the
    presented one: the rotation returns None instead, and the session keeps its token and its
    expiry."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    stored = "SELECT token_hash, expires_at FROM kitium_auth.sessions WHERE id = %s"
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute(stored, [issued.session.id]).fetchone()
    for past in (_in(-1), dt.datetime(2000, 1, 1, tzinfo=dt.UTC)):
        assert await storage.rotate_session_token(issued.token, expires_at=past) is None
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(stored, [issued.session.id]).fetchone() == before
    found = await storage.validate_session_token(issued.token, consistency="primary")
    assert found == issued.session
    later = _in(2)
    rotated = await storage.rotate_session_token(issued.token, expires_at=later)
    assert rotated is not None and rotated.session.expires_at == later


async def test_concurrent_rotations_of_one_token_give_one_new_token(
    storage: Any, email: str
) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    results = await race(storage, 6, "rotate_session_token", issued.token)
    winners = [r for r in results if isinstance(r, IssuedSession)]
    assert len(winners) == 1 and results.count(None) == 5, results
    assert await storage.validate_session_token(winners[0].token) == winners[0].session
    assert await storage.validate_session_token(issued.token) is None


def _rotated_ago(dsn: str, session_id: Any, seconds: float) -> None:
    """Move the session's last rotation ``seconds`` into the past, as if time had passed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE kitium_auth.sessions SET token_rotated_at = token_rotated_at - %s"
            " WHERE id = %s",
            [dt.timedelta(seconds=seconds), session_id],
        )


async def _reuse_events(storage: Any, user_id: Any) -> list[Any]:
    page = await storage.list_events(principal_id=user_id, type="session.token_reused")
    return list(page.events)


async def test_a_rotated_out_token_presented_after_the_grace_ends_the_session(
    storage: Any, email: str, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Within the grace the old token only gets None; after it, the session ends for both
    holders and a session.token_reused event records it. The log names the session, never the
    token."""
    user = await storage.create_user(email=email)
    org = await storage.create_organization(name="Acme", plan="free")
    await storage.add_organization_member(org.id, user.id)
    issued = await storage.issue_session_token(user_id=user.id, org_id=org.id, expires_at=_in(1))
    rotated = await storage.rotate_session_token(issued.token)
    assert rotated is not None
    assert await storage.rotate_session_token(issued.token) is None  # within the 10 s grace
    assert await storage.validate_session_token(rotated.token, consistency="primary") is not None
    assert await _reuse_events(storage, user.id) == []
    _rotated_ago(dsn, issued.session.id, 11)
    with caplog.at_level(logging.WARNING, logger="kitium_pg"):
        assert await storage.rotate_session_token(issued.token) is None
    assert await storage.validate_session_token(rotated.token, consistency="primary") is None
    assert await storage.get_session(issued.session.id) is None
    [event] = await _reuse_events(storage, user.id)
    assert event.org_id is None and event.data["org_id"] == str(org.id)
    assert event.data["session_id"] == str(issued.session.id)
    assert dt.datetime.fromisoformat(event.data["rotated_at"]) < event.timestamp
    [warning] = [
        r for r in caplog.records if r.name == "kitium_pg" and r.levelno >= logging.WARNING
    ]
    message = warning.getMessage()
    assert str(issued.session.id) in message and "ended" in message
    for token in (issued.token, rotated.token):
        assert token.split(".")[1] not in message
    # Ended: the token is unknown now, and nothing more is recorded.
    assert await storage.rotate_session_token(issued.token) is None
    assert len(await _reuse_events(storage, user.id)) == 1


async def test_the_grace_is_the_callers_and_none_never_ends_a_session(
    storage: Any, email: str, dsn: str
) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    rotated = await storage.rotate_session_token(issued.token)
    assert rotated is not None
    _rotated_ago(dsn, issued.session.id, 3600)
    assert await storage.rotate_session_token(issued.token, reuse_grace=None) is None
    hour = dt.timedelta(hours=1, seconds=5)
    assert await storage.rotate_session_token(issued.token, reuse_grace=hour) is None
    assert await storage.validate_session_token(rotated.token, consistency="primary") is not None
    assert await _reuse_events(storage, user.id) == []
    assert await storage.rotate_session_token(issued.token, reuse_grace=dt.timedelta(0)) is None
    assert await storage.get_session(issued.session.id) is None
    assert len(await _reuse_events(storage, user.id)) == 1


async def test_only_the_token_rotated_out_last_is_recognised(storage: Any, email: str) -> None:
    """Two rotations on, the first token is unknown (as a wrong one is): no digest older than
    the last one replaced is kept."""
    user = await storage.create_user(email=email)
    first = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    second = await storage.rotate_session_token(first.token)
    assert second is not None
    third = await storage.rotate_session_token(second.token)
    assert third is not None
    none = dt.timedelta(0)
    assert await storage.rotate_session_token(first.token, reuse_grace=none) is None
    assert await storage.validate_session_token(third.token, consistency="primary") is not None
    assert await storage.rotate_session_token(second.token, reuse_grace=none) is None
    assert await storage.validate_session_token(third.token, consistency="primary") is None


async def test_concurrent_reuse_ends_the_session_once(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    rotated = await storage.rotate_session_token(issued.token)
    assert rotated is not None
    results = await race(
        storage, 6, "rotate_session_token", issued.token, reuse_grace=dt.timedelta(0)
    )
    assert results == [None] * 6, results
    assert await storage.get_session(issued.session.id) is None
    assert len(await _reuse_events(storage, user.id)) == 1


class _LyingTimedelta(dt.timedelta):
    """Says it is within any bound; its stored fields say five days."""

    def __le__(self, other: object) -> bool:
        return True

    def __ge__(self, other: object) -> bool:
        return True


@pytest.mark.parametrize(
    "grace",
    [
        dt.timedelta(seconds=-1),
        dt.timedelta(days=1, microseconds=1),
        _LyingTimedelta(days=5),
        10,
        10.0,
        "10s",
        True,
    ],
    ids=repr,
)
async def test_a_bad_reuse_grace_is_refused_and_changes_nothing(
    storage: Any, email: str, grace: object
) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    with pytest.raises(ValidationError) as caught:
        await storage.rotate_session_token(issued.token, reuse_grace=grace)
    assert caught.value.field == "reuse_grace"
    assert await storage.validate_session_token(issued.token, consistency="primary") is not None


async def test_api_key_issue_and_verify(storage: Any, email: str, dsn: str) -> None:
    user = await storage.create_user(email=email)
    issued = await storage.issue_api_key(user.id, ["read", "write"], prefix="live")
    assert isinstance(issued, IssuedApiKey)
    assert issued.key.startswith("live_") and issued.key not in repr(issued)
    assert issued.record.last_four == issued.key[-4:]
    assert issued.record.hash == hashlib.sha256(issued.key.encode()).hexdigest()
    verified = await storage.verify_api_key(issued.key)
    assert verified is not None and verified.id == issued.record.id
    assert verified.scopes == ("read", "write")
    assert verified.last_used_at is not None
    again = await storage.verify_api_key(issued.key)
    assert again is not None and again.last_used_at == verified.last_used_at  # once a minute
    with psycopg.connect(dsn) as conn:
        dump = conn.execute(
            "SELECT string_agg(t::text, '|') FROM kitium_auth.api_keys t WHERE principal_id = %s",
            [user.id],
        ).fetchone()
    assert dump is not None and issued.key not in dump[0]
    for bad in (issued.key + "x", "", "live_", None, "\ud800", "k" * 1000):
        assert await storage.verify_api_key(bad) is None
    assert await storage.get_api_key_by_hash(issued.record.hash) == again


async def test_api_keys_verify_until_they_expire_and_not_once_deleted(
    storage: Any, email: str
) -> None:
    user = await storage.create_user(email=email)
    expired = await storage.issue_api_key(user.id, [], expires_at=_in(-1))
    assert await storage.verify_api_key(expired.key) is None
    expiring = await storage.issue_api_key(user.id, [], expires_at=_in(60))
    stamped = await storage.verify_api_key(expiring.key)  # stamps last_used_at
    assert stamped is not None and stamped.id == expiring.record.id
    assert stamped.last_used_at is not None
    assert await storage.verify_api_key(expiring.key) == stamped  # read within the minute
    live = await storage.issue_api_key(user.id, [])
    assert await storage.delete_api_key(live.record.id) is True
    assert await storage.verify_api_key(live.key) is None


async def test_a_key_whose_row_is_locked_verifies_without_waiting(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: the check's once-a-minute stamp waited for a lock on the key's row, so
    while a transaction held it (an update_api_key, or a verify_api_key inside a
    transaction()), every check of the key failed at its statement timeout. The stamp now skips
    a locked row: the check answers at once with the key as stored, and the next check after
    the lock is gone stamps it."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_api_key(user.id, ["read"])
    assert issued.record.last_used_at is None  # the stamp is due
    with psycopg.connect(dsn) as holder:
        holder.execute(
            "SELECT FROM kitium_auth.api_keys WHERE id = %s FOR UPDATE", [issued.record.id]
        )
        held = await storage.with_statement_timeout(2000).verify_api_key(issued.key)
        assert held == issued.record  # unstamped: the row was not written
    stamped = await storage.verify_api_key(issued.key)
    assert stamped is not None and stamped.last_used_at is not None
    assert stamped.id == issued.record.id


@pytest.mark.parametrize("prefix", ["", "UPPER", "has space", "x" * 17])
async def test_bad_prefix_is_a_validation_error(storage: Any, email: str, prefix: str) -> None:
    from kitium_pg import ValidationError

    user = await storage.create_user(email=email)
    with pytest.raises(ValidationError) as caught:
        await storage.issue_api_key(user.id, [], prefix=prefix)
    assert caught.value.field == "prefix"


async def test_rotation_is_refused_inside_a_transaction(storage: Any, email: str) -> None:
    """Found in review: an application that rotated inside its own transaction and rolled back
    when it got ``None`` (its 401) undid what a reused token's rotation had done: the session
    stayed valid and no event was left. A transaction's view refuses the call before anything
    runs; on the adapter the reuse still ends the session."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    rotated = await storage.rotate_session_token(issued.token)
    assert rotated is not None
    with pytest.raises(ValidationError) as refused:
        async with storage.transaction() as tx:
            await tx.rotate_session_token(issued.token, reuse_grace=dt.timedelta(0))
    assert refused.value.field == "transaction"
    assert await storage.validate_session_token(rotated.token, consistency="primary") is not None
    assert await _reuse_events(storage, user.id) == []
    assert await storage.rotate_session_token(issued.token, reuse_grace=dt.timedelta(0)) is None
    assert await storage.get_session(issued.session.id) is None
    assert len(await _reuse_events(storage, user.id)) == 1


async def test_a_rotation_that_waited_for_its_session_gives_the_old_token_its_whole_grace(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: a rotation that waited 2.5 s for its session's row (an application's
    transaction held it) stamped the rotation at its statement's start, so the replaced token,
    presented again at once (a second tab), was already 2.5 s into its 2 s grace: the session
    was ended as a reuse. The rotation is stamped once the row is locked: within the grace the
    old token gets None and the session stays."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    grace = dt.timedelta(seconds=2)
    rotated = await call_while_holding(
        storage,
        dsn,
        ("sessions", {"id": issued.session.id}),
        "NO KEY UPDATE",
        lambda: storage.rotate_session_token(issued.token, reuse_grace=grace),
        waits_on="previous_token_hash",
        linger=2.5,
    )
    assert isinstance(rotated, IssuedSession)
    assert await storage.rotate_session_token(issued.token, reuse_grace=grace) is None
    assert await storage.validate_session_token(rotated.token, consistency="primary") is not None


async def test_a_rotation_whose_new_expiry_passed_while_it_waited_changes_nothing(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: a rotation asked to move the expiry 1 s ahead waited 1.5 s for the
    session's row, then rotated to an expiry already past: the new token never validated and
    the presented one was dead. It is judged once the row is locked: None, nothing changed."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    rotated = await call_while_holding(
        storage,
        dsn,
        ("sessions", {"id": issued.session.id}),
        "NO KEY UPDATE",
        lambda: storage.rotate_session_token(issued.token, expires_at=soon),
        waits_on="previous_token_hash",
        linger=1.5,
    )
    assert rotated is None
    assert await storage.validate_session_token(issued.token, consistency="primary") is not None


@pytest.mark.parametrize("binding", [False, True], ids=["update", "binding-to-an-org"])
async def test_an_update_that_waited_past_the_sessions_expiry_does_not_revive_it(
    storage: Any, email: str, dsn: str, binding: bool
) -> None:
    """Found in review: update_session(expires_at=...) waited 1.5 s for the row of a session
    expiring in 1 s, then slid the expiry of the session that had expired meanwhile: its token
    validated again. The expiry is judged once the row is locked: NotFoundError (an expired
    session is never revived), and the token stays refused. Binding the session to an
    organization at the same time (update_session_org) too."""
    user = await storage.create_user(email=email)
    org = await storage.create_organization(
        name="Bind", plan="team", members=[{"user_id": user.id}]
    )
    issued = await storage.issue_session_token(
        user_id=user.id, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    )
    changes: dict[str, Any] = {"expires_at": _in(1), **({"org_id": org.id} if binding else {})}
    updated = await call_while_holding(
        storage,
        dsn,
        ("sessions", {"id": issued.session.id}),
        "NO KEY UPDATE",
        lambda: storage.update_session(issued.session.id, **changes),
        waits_on="UPDATE kitium_auth.sessions AS s",
        linger=1.5,
    )
    assert isinstance(updated, NotFoundError)
    assert await storage.validate_session_token(issued.token, consistency="primary") is None


async def test_a_retried_rotation_that_waited_for_its_first_attempt_past_the_old_expiry_wins(
    storage: Any, email: str, dsn: str
) -> None:
    """The first attempt slides the expiry of a session about to expire and has not committed
    yet (its acknowledgement lost, its commit slow) when the adapter's retry, with the same new
    digest, starts and waits for the session's row; the old expiry passes meanwhile. Once the
    first attempt commits, the retry returns the rotated session: the session is judged as
    locked (its new expiry), not as the statement's snapshot had it (expired)."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(
        user_id=user.id, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    )
    secret = issued.token.partition(".")[2]
    params = {
        "id": issued.session.id,
        "presented_hash": hashlib.sha256(secret.encode()).digest(),
        "token_hash": hashlib.sha256(b"the new secret").digest(),
        "set_expires_at": True,
        "expires_at": _in(1),
        "reuse_grace": dt.timedelta(seconds=10),
        "presented_ago": dt.timedelta(0),
        "event_id": uuid.uuid4(),
    }
    row, again = await replay_behind_open_attempt(
        storage,
        dsn,
        "rotate_session_token",
        params,
        waits_on="previous_token_hash",
        linger=1.5,  # past the old expiry
    )
    assert row is not None  # rotated by the first attempt
    assert isinstance(again, list) and len(again) == 1 and again[0][0] is False, again


async def test_two_rotations_of_one_token_queued_behind_a_lock_are_no_reuse(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: two rotations of one token, both presented before either ran (queued
    behind another transaction's lock on the session), with no grace: the second, judging the
    reuse grace up to when it got the lock, took the first's rotation for an earlier one and
    ended the session as a reuse, killing the winner's new token. The grace runs to when the
    token was presented: one new token, the other call None, the session and its new token
    live, no reuse event."""
    user = await storage.create_user(email=email)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
    none = dt.timedelta(0)
    results = await two_calls_queued_on(
        dsn,
        ("sessions", {"id": issued.session.id}),
        lambda: start(storage, "rotate_session_token", issued.token, reuse_grace=none),
        "previous_token_hash",
        lambda: start(storage, "rotate_session_token", issued.token, reuse_grace=none),
    )
    winners = [r for r in results if isinstance(r, IssuedSession)]
    assert len(winners) == 1 and results.count(None) == 1, results
    assert await storage.validate_session_token(winners[0].token, consistency="primary")
    reused = await storage.list_events(principal_id=user.id, type="session.token_reused")
    assert reused.events == ()

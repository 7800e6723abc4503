"""Email verification tokens and their attempt counters, against both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from kitium_pg import ConflictError, EmailVerificationToken, NotFoundError, ValidationError

from .fix_holder import (
    call_while_holding,
    replay,
    replay_behind_open_attempt,
    two_calls_queued_on,
    unretried_adapter,
    waiting,
)
from .fix_race import race, race_each, start
from .fix_roles import schema as schema

RACERS = 32


CONSUME = "mark_email_verification_token_as_used"


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _in(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(**delta)


async def _token(storage: Any, email: str, **kwargs: Any) -> EmailVerificationToken:
    """Create a token for ``email`` with valid defaults; ``kwargs`` override them."""
    args: dict[str, Any] = {
        "email": email,
        "code_hash": _hash("123456"),
        "type": "email_verification",
        "expires_at": _in(minutes=15),
        **kwargs,
    }
    token: EmailVerificationToken = await storage.create_email_verification_token(**args)
    return token


async def test_create_and_get_round_trip(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    expires = _in(minutes=15)
    token = await _token(
        storage,
        email,
        type="password_reset",
        user_id=user.id,
        metadata={"ip": "203.0.113.7"},
        expires_at=expires,
    )
    assert isinstance(token, EmailVerificationToken)
    assert token.id.version == 7
    assert (token.email, token.type, token.user_id) == (email, "password_reset", user.id)
    assert token.code_hash == _hash("123456")
    assert token.code_hash not in repr(token)
    assert token.metadata == {"ip": "203.0.113.7"}
    assert token.used_at is None
    assert token.expires_at == expires
    assert token.expires_at.tzinfo is dt.UTC
    assert token.created_at.tzinfo is dt.UTC
    assert await storage.get_email_verification_token_by_id(token.id) == token
    assert await storage.get_email_verification_token_by_id(str(token.id)) == token


async def test_non_utc_expiry_is_stored_as_the_same_instant(storage: Any, email: str) -> None:
    tokyo = dt.timezone(dt.timedelta(hours=9))
    expires = dt.datetime.now(tokyo).replace(microsecond=0) + dt.timedelta(minutes=5)
    token = await _token(storage, email, expires_at=expires)
    assert token.expires_at == expires
    assert token.expires_at.tzinfo is dt.UTC


async def test_there_is_no_code_argument(storage: Any, email: str) -> None:
    with pytest.raises(TypeError):
        await _token(storage, email, code="123456")


async def test_lookups_by_email_newest_first_any_case(storage: Any, email: str) -> None:
    first = await _token(storage, email)
    second = await _token(storage, email.upper(), type="login")
    third = await _token(storage, email)
    await _token(storage, "other-" + email)
    assert await storage.get_email_verification_tokens(email) == [third, second, first]
    assert await storage.get_email_verification_tokens(email.upper()) == [third, second, first]
    assert await storage.get_email_verification_tokens(email, "email_verification") == [
        third,
        first,
    ]
    assert await storage.get_email_verification_tokens(email, type="login") == [second]
    assert await storage.get_email_verification_tokens(email, type="password_reset") == []


async def test_lookups_of_unknown_or_malformed_ids(storage: Any) -> None:
    assert await storage.get_email_verification_token_by_id(uuid.uuid4()) is None
    for bad in ("nope", "", "x" * 10_000, 42, None):
        assert await storage.get_email_verification_token_by_id(bad) is None
        assert await storage.get_email_verification_token_attempts(bad) == 0
    assert await storage.get_email_verification_tokens("nobody@example.com") == []
    assert await storage.get_email_verification_tokens("bad\x00@example.com") == []
    assert await storage.get_email_verification_tokens("") == []
    with pytest.raises(ValidationError) as caught:
        await storage.get_email_verification_tokens("a@example.com", type="Not A Type")
    assert caught.value.field == "type"


async def test_mark_as_used_consumes_once(storage: Any, email: str) -> None:
    token = await _token(storage, email)
    used = await storage.mark_email_verification_token_as_used(token.id)
    assert used.id == token.id
    assert used.used_at is not None
    assert used.used_at.tzinfo is dt.UTC
    assert used.used_at >= token.created_at
    assert used == await storage.get_email_verification_token_by_id(token.id)
    with pytest.raises(ConflictError) as caught:
        await storage.mark_email_verification_token_as_used(str(token.id))
    assert "already used or expired" in str(caught.value)
    assert caught.value.retryable is False
    # The failed attempt changed nothing.
    assert await storage.get_email_verification_token_by_id(token.id) == used


async def test_revoke_makes_every_pending_token_of_an_email_unusable(
    storage: Any, email: str
) -> None:
    """A new reset link revokes the earlier ones: one statement marks them used, whatever the
    letter case they were issued under; other types, other emails and used tokens stay."""
    resets = [
        await _token(storage, email, type="password_reset"),
        await _token(storage, email.upper(), type="password_reset"),
    ]
    verify = await _token(storage, email)
    other = await _token(storage, "other-" + email, type="password_reset")
    used = await _token(storage, email, type="password_reset")
    await storage.mark_email_verification_token_as_used(used.id)
    expired = await _token(storage, email, type="password_reset", expires_at=_in(seconds=-1))
    assert await storage.revoke_email_verification_tokens(email.upper(), "password_reset") == 2
    for token in resets:
        with pytest.raises(ConflictError):
            await storage.mark_email_verification_token_as_used(token.id)
    assert (await storage.mark_email_verification_token_as_used(verify.id)).id == verify.id
    assert (await storage.mark_email_verification_token_as_used(other.id)).id == other.id
    assert (await storage.get_email_verification_token_by_id(expired.id)).used_at is None
    assert await storage.revoke_email_verification_tokens(email) == 0  # nothing left pending
    assert await storage.revoke_email_verification_tokens("not an email") == 0
    with pytest.raises(ValidationError) as refused:
        await storage.revoke_email_verification_tokens(email, "Password Reset")
    assert refused.value.field == "type"


async def test_expired_token_cannot_be_used(storage: Any, email: str) -> None:
    token = await _token(storage, email, expires_at=_in(seconds=-1))
    with pytest.raises(ConflictError):
        await storage.mark_email_verification_token_as_used(token.id)
    stored = await storage.get_email_verification_token_by_id(token.id)
    assert stored is not None
    assert stored.used_at is None


async def test_a_token_expiring_during_a_transaction_cannot_be_used_in_it(
    storage: Any, email: str
) -> None:
    """Expiry is judged when the statement runs, not when the caller's transaction began."""
    token = await _token(storage, email, expires_at=_in(seconds=0.5))
    async with storage.transaction() as tx:
        assert await tx.get_email_verification_token_by_id(token.id) == token
        await asyncio.sleep(0.8)
        with pytest.raises(ConflictError):
            await tx.mark_email_verification_token_as_used(token.id)
    stored = await storage.get_email_verification_token_by_id(token.id)
    assert stored is not None and stored.used_at is None


async def test_mark_unknown_token(storage: Any) -> None:
    with pytest.raises(NotFoundError):
        await storage.mark_email_verification_token_as_used(uuid.uuid4())
    with pytest.raises(ValidationError) as caught:
        await storage.mark_email_verification_token_as_used("not-a-uuid")
    assert caught.value.field == "id"


async def test_racing_consumers_exactly_one_wins(storage: Any, email: str) -> None:
    token = await _token(storage, email)
    outcomes = await race(storage, RACERS, "mark_email_verification_token_as_used", token.id)
    winners = [o for o in outcomes if isinstance(o, EmailVerificationToken)]
    losers = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(winners) == 1, outcomes
    assert len(losers) == RACERS - 1, outcomes
    stored = await storage.get_email_verification_token_by_id(token.id)
    assert stored == winners[0]
    assert stored is not None
    assert stored.used_at is not None


async def test_retried_consume_recognises_its_own_win(storage: Any, email: str) -> None:
    # A retry after a lost acknowledgement re-sends the same statement with the same consumer:
    # it must win again (same row, used_at unchanged), while any other call loses.
    token = await _token(storage, email)
    params = {"id": token.id, "consumer": uuid.uuid4()}
    first = await replay(storage, CONSUME, params)
    again = await replay(storage, CONSUME, params)
    assert first is not None
    assert first[0] is True
    assert first[-2] is not None  # used_at
    assert again == first
    other = await replay(storage, CONSUME, {"id": token.id, "consumer": uuid.uuid4()})
    assert other[0] is False
    with pytest.raises(ConflictError):
        await storage.mark_email_verification_token_as_used(token.id)
    stored = await storage.get_email_verification_token_by_id(token.id)
    assert stored is not None
    assert stored.used_at == first[-2]


async def test_attempt_counter(storage: Any, email: str) -> None:
    token = await _token(storage, email)
    other = await _token(storage, email)
    assert await storage.get_email_verification_token_attempts(token.id) == 0
    assert await storage.increment_email_verification_token_attempts(token.id) == 1
    assert await storage.increment_email_verification_token_attempts(str(token.id)) == 2
    assert await storage.get_email_verification_token_attempts(token.id) == 2
    assert await storage.get_email_verification_token_attempts(other.id) == 2  # the address's
    with pytest.raises(NotFoundError):
        await storage.increment_email_verification_token_attempts(uuid.uuid4())
    with pytest.raises(ValidationError) as caught:
        await storage.increment_email_verification_token_attempts("nope")
    assert caught.value.field == "token_id"


async def test_the_attempt_count_refuses_a_transactions_view(storage: Any, email: str) -> None:
    """Found in review: counted in a transaction that then rolled back (after a wrong code),
    the attempt was undone, so a guess past the cap was free, 1,000 of them in the repro."""
    token = await _token(storage, email)
    async with storage.transaction() as tx:
        with pytest.raises(ValidationError) as caught:
            await tx.increment_email_verification_token_attempts(token.id)
        assert caught.value.field == "transaction"
        assert "increment_email_verification_token_attempts" in str(caught.value)
    assert await storage.get_email_verification_token_attempts(token.id) == 0


async def test_racing_increments_are_all_counted(storage: Any, email: str) -> None:
    token = await _token(storage, email)
    counts = await race(storage, RACERS, "increment_email_verification_token_attempts", token.id)
    assert sorted(counts) == list(range(1, RACERS + 1))  # each call saw its own increment
    assert await storage.get_email_verification_token_attempts(token.id) == RACERS


async def test_attempts_racing_on_an_addresss_tokens_are_all_counted(
    storage: Any, email: str
) -> None:
    """Found in review: each attempt read the counters of the address's other tokens as its
    statement began, so guesses on several tokens at once missed each other's (20 guesses on
    two tokens, and the counts returned repeated 1, 3, 13 and 16). Locked in token order, they
    serialise, with no deadlock."""
    tokens = [await _token(storage, email, type="password_reset") for _ in range(4)]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((tokens[n % 4].id,), {}) for n in range(RACERS)
    ]
    counts = await race_each(storage, "increment_email_verification_token_attempts", calls)
    assert sorted(counts) == list(range(1, RACERS + 1))
    assert await storage.get_email_verification_token_attempts(tokens[0].id) == RACERS


async def test_an_attempt_waits_for_one_on_another_token_of_the_address(
    storage: Any, email: str, dsn: str
) -> None:
    """Two first attempts, one on each of two new tokens of one address, while a third
    transaction holds the first token's counter: both wait (each token has its counter from
    its creation, so there is a row to wait for), and once it is released the later attempt
    counts the earlier one."""
    first, second = [await _token(storage, email, type="password_reset") for _ in range(2)]
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT FROM kitium_auth.email_verification_token_attempts WHERE token_id = %s"
            " FOR UPDATE",
            [first.id],
        )
        calls = [
            start(storage, "increment_email_verification_token_attempts", token.id)
            for token in (first, second)
        ]
        assert await asyncio.to_thread(waiting, dsn, "email_verification_token_attempts", 2)
        holder.commit()
        counts = [await call for call in calls]
    finally:
        holder.close()
    assert sorted(counts) == [1, 2]
    assert await storage.get_email_verification_token_attempts(second.id) == 2


async def test_an_attempt_that_waited_counts_one_on_a_token_sent_meanwhile(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: an attempt on token T1 waits for the counter of an older token T0,
    which another transaction holds; meanwhile T0 expires, a resend creates T2, and an attempt
    on T2 counts and commits (T1 and T2 are its address's unexpired tokens: 1). The waiting
    attempt then counted T0 and T1 only (T2 came after its statement began) and said 1 too: two
    attempts at the address, both told 1. It counts the others as committed once it holds its
    locks."""
    t0 = await _token(storage, email, expires_at=_in(seconds=1))
    t1 = await _token(storage, email)
    assert t0.id < t1.id  # the attempt on T1 locks T0's counter first, holding none of T1's
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT FROM kitium_auth.email_verification_token_attempts WHERE token_id = %s"
            " FOR UPDATE",
            [t0.id],
        )
        waiter = start(storage, "increment_email_verification_token_attempts", t1.id)
        assert await asyncio.to_thread(waiting, dsn, "email_verification_token_attempts")
        await asyncio.sleep(1.2)  # T0 expires
        t2 = await _token(storage, email)
        assert await storage.increment_email_verification_token_attempts(t2.id) == 1
        holder.commit()
        assert await waiter == 2
    finally:
        holder.close()
    assert await storage.get_email_verification_token_attempts(t1.id) == 2


async def test_delete_expired(storage: Any, email: str) -> None:
    expired = [await _token(storage, email, expires_at=_in(seconds=-5)) for _ in range(5)]
    live = await _token(storage, email)
    await storage.increment_email_verification_token_attempts(expired[0].id)
    deleted = await storage.delete_expired_email_verification_tokens(batch_size=2)
    assert deleted >= len(expired)  # tests share the database: others' expired rows go too
    for token in expired:
        assert await storage.get_email_verification_token_by_id(token.id) is None
    assert await storage.get_email_verification_token_attempts(expired[0].id) == 0
    assert await storage.get_email_verification_token_by_id(live.id) == live
    assert await storage.get_email_verification_tokens(email) == [live]
    with pytest.raises(ValidationError) as caught:
        await storage.delete_expired_email_verification_tokens(batch_size=0)
    assert caught.value.field == "batch_size"


async def test_deleting_the_user_deletes_its_tokens(storage: Any, email: str) -> None:
    """A reset link of a deleted account must not outlive it: once the address is registered
    again, it would otherwise be found by email and consumed for the new account."""
    user = await storage.create_user(email=email)
    token = await _token(storage, email, user_id=user.id, type="password_reset")
    userless = await _token(storage, email, type="password_reset")  # issued to no user
    await storage.delete_user(user.id)
    await storage.create_user(email=email)
    assert await storage.get_email_verification_token_by_id(token.id) is None
    assert await storage.get_email_verification_tokens(email, "password_reset") == [userless]
    with pytest.raises(NotFoundError):
        await storage.mark_email_verification_token_as_used(token.id)


async def test_unknown_user_is_not_found(storage: Any, email: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        await _token(storage, email, user_id=uuid.uuid4())
    assert "user_id_fkey" in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"expires_at": dt.datetime(2030, 1, 1)}, "expires_at"),  # naive
        ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
        ({"email": "no-at-sign"}, "email"),
        ({"email": "a\x00@example.com"}, "email"),
        ({"code_hash": "123456"}, "code_hash"),  # a code, not a digest
        ({"code_hash": "x" * 513}, "code_hash"),
        ({"type": "Email Verification"}, "type"),
        ({"type": ""}, "type"),
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"metadata": {"x": float("inf")}}, "metadata"),
        ({"metadata": "{}"}, "metadata"),
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(
    storage: Any, email: str, kwargs: dict[str, Any], field: str
) -> None:
    args = {"email": email, **kwargs}
    with pytest.raises(ValidationError) as caught:
        await _token(storage, **args)
    assert caught.value.field == field
    assert await storage.get_email_verification_tokens(email) == []


async def test_a_token_deleted_while_its_consumption_waits_is_not_found(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: a consumption that waited for the token's row while another
    transaction deleted it (the user deleted: migration 0009's cascade) fell back to reading
    the token with the statement's snapshot, still unused there, and raised ConflictError
    ("already used or expired") for a token never used. Now it is gone: NotFoundError."""
    import psycopg

    user = await storage.create_user(email=email)
    token = await _token(storage, email, user_id=user.id)
    holder = psycopg.connect(dsn)
    try:
        holder.execute("DELETE FROM kitium_auth.users WHERE id = %s", (user.id,))
        consuming = start(storage, "mark_email_verification_token_as_used", token.id)
        assert await asyncio.to_thread(waiting, dsn, "consumed_by = ")
        holder.commit()
        with pytest.raises(NotFoundError):
            await consuming
    finally:
        holder.close()


async def test_a_resend_does_not_reset_the_attempts_of_an_address(
    storage: Any, email: str, unique: Callable[[str], str]
) -> None:
    """Found in review: counted per token, every resend (revoke, then a new token) gave a
    guesser five new guesses at an address's 6-digit reset codes: 200 compared in 0.2 s. The
    count is the address's: every unexpired token of that email (any letter case) and type."""
    first = await _token(storage, email, type="password_reset")
    for expected in (1, 2, 3):
        assert await storage.increment_email_verification_token_attempts(first.id) == expected
    await storage.revoke_email_verification_tokens(email, "password_reset")
    resent = await _token(storage, email.upper(), type="password_reset")
    assert await storage.get_email_verification_token_attempts(resent.id) == 3
    assert await storage.increment_email_verification_token_attempts(resent.id) == 4
    # Other types, other addresses and expired tokens keep their own counts.
    verify = await _token(storage, email, type="email_verification")
    assert await storage.increment_email_verification_token_attempts(verify.id) == 1
    elsewhere = await _token(storage, f"{unique('x')}@example.com", type="password_reset")
    assert await storage.increment_email_verification_token_attempts(elsewhere.id) == 1
    stale = await _token(storage, email, type="email_change", expires_at=_in(seconds=-5))
    await storage.increment_email_verification_token_attempts(stale.id)
    fresh = await _token(storage, email, type="email_change")
    assert await storage.increment_email_verification_token_attempts(fresh.id) == 1
    # and so does the read of a count
    for token, count in ((resent, 4), (verify, 1), (elsewhere, 1), (fresh, 1)):
        assert await storage.get_email_verification_token_attempts(token.id) == count


async def test_a_new_address_ends_a_token_to_the_old_one_written_during_the_change(
    storage: Any, email: str, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in review: a token to the old address that a transaction committed while the
    address changed outlived the change (the change's trigger could not see it, and neither
    waited for the other). The token's creation locks its user FOR SHARE: the change waits
    for that transaction, then its trigger ends the token."""
    user = await storage.create_user(email=email)
    new_address = f"{unique('moved')}@example.com"
    async with storage.transaction() as tx:
        reset = await _token(tx, email, type="password_reset", user_id=user.id)
        change = start(storage, "update_user", user.id, email=new_address)
        assert await asyncio.to_thread(waiting, dsn, "UPDATE kitium_auth.users AS u")
    assert (await change).email == new_address
    with pytest.raises(ConflictError):
        await storage.mark_email_verification_token_as_used(reset.id)


async def test_a_new_address_ends_the_tokens_sent_to_the_old_one(
    storage: Any, email: str, unique: Callable[[str], str]
) -> None:
    """Found in review: a password reset token mailed to a user's address kept working after
    the user moved to another address, for whoever reads the old mailbox. Migration 0033's
    trigger marks the user's unused tokens sent to another address than the new one used; a
    change of letter case only, a token to the new address and a token naming no user stay, and
    so do the stamp of a token used before and an expired token (as the revoke leaves them)."""
    user = await storage.create_user(email=email)
    reset = await _token(storage, email, type="password_reset", user_id=user.id)
    used = await _token(storage, email, type="password_reset", user_id=user.id)
    used = await storage.mark_email_verification_token_as_used(used.id)
    expired = await _token(storage, email, user_id=user.id, expires_at=_in(seconds=-5))
    await storage.update_user(user.id, email=email.upper())  # letter case only
    new_address = f"{unique('moved')}@example.com"
    confirm = await _token(storage, new_address, type="email_change", user_id=user.id)
    unlinked = await _token(storage, email, type="email_verification")
    await storage.update_user(user.id, email=new_address)
    with pytest.raises(ConflictError):
        await storage.mark_email_verification_token_as_used(reset.id)
    assert (await storage.mark_email_verification_token_as_used(confirm.id)).used_at is not None
    assert (await storage.mark_email_verification_token_as_used(unlinked.id)).used_at is not None
    assert await storage.get_email_verification_token_by_id(used.id) == used
    assert await storage.get_email_verification_token_by_id(expired.id) == expired


@pytest.mark.parametrize(
    ("other", "marker"),
    [
        ("update_user", "UPDATE kitium_auth.users AS u"),
        ("delete_user", "DELETE FROM kitium_auth.users"),
    ],
)
async def test_a_revocation_and_a_change_of_the_users_address_do_not_deadlock(
    storage: Any, dsn: str, schema: str, other: str, marker: str
) -> None:
    """Found in the fourth review: revoke_email_verification_tokens marked an address's tokens
    newest first (its index), while a change of the user's address (migration 0033's trigger)
    or the user's deletion (the cascade) reached them oldest first, and the two deadlocked
    (hidden by the retry: a second's wait and a warning). Played without timing, on an adapter
    that does not retry and whose planner reads by plain index scans: a holder keeps the older
    token, the other call waits for it, then the revocation starts. The revocation now locks
    the tokens' users first, so it waits for the other call before it holds any token. In a
    schema of its own, where rows go in the order written."""
    async with unretried_adapter(storage.kind, dsn, schema=schema) as own:
        address = f"revoke-{uuid.uuid4().hex[:8]}@example.com"
        user = await own.create_user(email=address)
        older, newer = [
            await _token(own, address, user_id=user.id, type="password_reset") for _ in "ab"
        ]
        with psycopg.connect(dsn, autocommit=True) as observer:
            rows = observer.execute(
                f"SELECT id FROM {schema}.email_verification_tokens ORDER BY ctid".encode()
            ).fetchall()
        assert rows == [(older.id,), (newer.id,)]  # row order is not the email index's
        kwargs = {"email": f"moved-{address}"} if other == "update_user" else {}
        results = await two_calls_queued_on(
            dsn,
            ("email_verification_tokens", {"id": older.id}),
            lambda: start(own, other, user.id, **kwargs),
            marker.replace("kitium_auth", schema),
            lambda: start(own, "revoke_email_verification_tokens", address),
            schema=schema,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        for token in (older, newer):
            stored = await own.get_email_verification_token_by_id(token.id)
            assert stored is None or stored.used_at is not None


@pytest.mark.parametrize("then", ["mark_user_email_verified", "set_password_hash"])
async def test_a_revocation_waits_for_a_transaction_that_consumed_a_token_and_writes_its_user(
    storage: Any, dsn: str, then: str
) -> None:
    """Found in review of the lock-order fix above, which locked the tokens' users first: a
    revocation that held the user while waiting for a token a transaction had consumed
    deadlocked with that transaction's next write of the user (email-verification.md's
    "consume, then write what follows in a transaction"). The revocation locks only tokens."""
    async with unretried_adapter(storage.kind, dsn) as own:
        address = f"consumed-{uuid.uuid4().hex[:8]}@example.com"
        user = await own.create_user(email=address)
        token = await _token(own, address, user_id=user.id)
        async with own.transaction() as tx:
            assert (await tx.mark_email_verification_token_as_used(token.id)).used_at
            revocation = start(own, "revoke_email_verification_tokens", address)
            assert await asyncio.to_thread(waiting, dsn, "email_verification_tokens")
            if then == "mark_user_email_verified":
                assert await tx.mark_user_email_verified(user.id, address) is not None
            else:
                await tx.set_password_hash(user.id, "hash")
        assert await revocation == 0  # the token was used by then


@pytest.mark.parametrize(
    ("other", "marker"),
    [
        ("update_user", "UPDATE kitium_auth.users AS u"),
        ("delete_user", "DELETE FROM kitium_auth.users"),
    ],
)
async def test_a_transaction_that_consumed_a_token_and_writes_its_user_and_a_change_both_end(
    storage: Any, dsn: str, other: str, marker: str
) -> None:
    """A transaction consumes a token (locking it) and then writes its user, as
    email-verification.md shows; a change of the user's address or the user's deletion
    meanwhile locks the user and waits for the token (0033's trigger, 0009's cascade), and the
    transaction's write of the user then waits for it: a deadlock, which PostgreSQL ends by
    failing the call that waited first, the change, and the adapter runs that again once the
    transaction has committed. Both complete. (Found in review; locking the user before the
    token in the consume, the fix first tried, made resends and sign-ins in a transaction
    deadlock instead: see the two tests below.)"""
    address = f"consumer-{uuid.uuid4().hex[:8]}@example.com"
    user = await storage.create_user(email=address)
    token = await _token(storage, address, user_id=user.id)
    kwargs = {"email": f"moved-{address}"} if other == "update_user" else {}
    async with storage.transaction() as tx:
        assert (await tx.mark_email_verification_token_as_used(token.id)).used_at
        change = start(storage, other, user.id, **kwargs)
        assert await asyncio.to_thread(waiting, dsn, marker)
        await tx.set_password_hash(user.id, "argon2id$new-password-hash")
    outcome: Any = (await asyncio.gather(change, return_exceptions=True))[0]
    assert not isinstance(outcome, BaseException), outcome
    stored = await storage.get_user(user.id)
    assert stored is None if other == "delete_user" else stored.email == f"moved-{address}"


async def test_a_resend_in_a_transaction_does_not_deadlock_with_a_consume(
    storage: Any, dsn: str
) -> None:
    """A resend in one transaction (revoke the address's tokens, then create the new one, as
    the guide does), while the old token is consumed: the consume waits for the revoked token
    and then loses. Found in review of a consume that locked the token's user first: it held
    the user while it waited, the create's FOR SHARE of the user waited for it, a deadlock."""
    async with unretried_adapter(storage.kind, dsn) as own:
        address = f"resend-{uuid.uuid4().hex[:8]}@example.com"
        user = await own.create_user(email=address)
        old = await _token(own, address, user_id=user.id)
        async with own.transaction() as tx:
            assert await tx.revoke_email_verification_tokens(address) == 1
            consume = start(own, "mark_email_verification_token_as_used", old.id)
            assert await asyncio.to_thread(
                waiting, dsn, "UPDATE kitium_auth.email_verification_tokens AS t"
            )
            await _token(tx, address, user_id=user.id)
        outcome: Any = (await asyncio.gather(consume, return_exceptions=True))[0]
    assert isinstance(outcome, ConflictError) and outcome.code != "deadlock_detected", outcome


async def test_a_consume_does_not_wait_for_a_transaction_sharing_its_user(
    storage: Any, dsn: str
) -> None:
    """A transaction that holds the token's user FOR SHARE (one that issued a token for the
    user, or signed the user in with create_session_unless_deactivated) does not hold up a
    consume of the user's token. Found in review of a consume that locked the user (FOR NO
    KEY UPDATE): it waited for that lock, and two transactions that each issue a token and
    then consume one for the same user deadlocked."""
    async with unretried_adapter(storage.kind, dsn, statement_timeout_ms=2000) as own:
        address = f"pair-{uuid.uuid4().hex[:8]}@example.com"
        user = await own.create_user(email=address)
        token = await _token(own, address, user_id=user.id)
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT FROM kitium_auth.users WHERE id = %s FOR SHARE", [user.id])
            async with own.transaction() as tx:
                await _token(tx, address, user_id=user.id)
                consumed = await tx.mark_email_verification_token_as_used(token.id)
    assert consumed is not None and consumed.used_at is not None


async def test_a_consume_that_waited_past_the_tokens_expiry_loses(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: mark_email_verification_token_as_used waited 1.5 s for the row of a
    token expiring in 1 s (another transaction held it), then consumed the expired token, with
    a used_at from before its expiry. Expiry is judged once the row is locked: ConflictError
    (the token exists but has expired), and it stays unused."""
    token = await _token(storage, email, expires_at=_in(seconds=1))
    outcome = await call_while_holding(
        storage,
        dsn,
        ("email_verification_tokens", {"id": token.id}),
        "NO KEY UPDATE",
        lambda: storage.mark_email_verification_token_as_used(token.id),
        waits_on="consumed_by",
        linger=1.5,
    )
    assert isinstance(outcome, ConflictError)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT used_at FROM kitium_auth.email_verification_tokens WHERE id = %s", [token.id]
        ).fetchone()
    assert row == (None,)


async def test_a_retried_consume_that_waited_for_its_first_attempt_past_the_expiry_wins(
    storage: Any, email: str, dsn: str
) -> None:
    """The first attempt consumes the token just before it expires and has not committed yet
    (its acknowledgement lost, its commit slow) when the adapter's retry, with the same
    consumer, starts and waits for the token's row; the token expires meanwhile. Once the first
    attempt commits, the retry reports its win: whose consume it is, is read from the row as
    locked (a retry judged on the statement's snapshot saw an unused token, now expired, and
    reported ConflictError for the token its own call had consumed)."""
    token = await _token(storage, email, expires_at=_in(seconds=1))
    params = {"id": token.id, "consumer": uuid.uuid4()}
    row, again = await replay_behind_open_attempt(
        storage,
        dsn,
        "mark_email_verification_token_as_used",
        params,
        waits_on="consumed_by",
        linger=1.5,  # past the expiry
    )
    assert row is not None and row[0] is True  # consumed by the first attempt
    assert isinstance(again, tuple) and again[0] is True, again


async def test_an_attempt_does_not_lock_the_counters_of_the_addresss_other_types(
    storage: Any, email: str, dsn: str
) -> None:
    """An attempt locks the counters of its address's tokens of its own type only: while
    another transaction holds the counter of a verification token of the same address, an
    attempt at a reset code does not wait for it (a mutant run found the type's condition in
    the locks untested once migration 0041 counted through email_address_attempts)."""
    verify = await _token(storage, email, type="verify_email")
    reset = await _token(storage, email, type="password_reset")
    count = await call_while_holding(
        storage,
        dsn,
        ("email_verification_token_attempts", {"token_id": verify.id}),
        "UPDATE",
        lambda: storage.with_statement_timeout(3000).increment_email_verification_token_attempts(
            reset.id
        ),
        waits_on=None,
    )
    assert count == 1

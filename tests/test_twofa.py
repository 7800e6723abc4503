"""Two-factor devices (encrypted secrets), backup codes, challenges and the TOTP replay guard,
against both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter
from kitium_pg._base import UNSET
from kitium_pg.encryption import ENV_VAR
from kitium_pg.errors import EncryptionKeyError, NotFoundError, ValidationError
from kitium_pg.records import (
    BackupCode,
    TwoFactorAttempt,
    TwoFactorDevice,
    TwoFactorSession,
    User,
)

from .fix_disguised import Boundless
from .fix_holder import (
    call_while_holding,
    release_when_waiting,
    replay,
    replay_behind_open_attempt,
    waiting,
)
from .fix_metadata import check_metadata_patch
from .fix_race import race, race_each, start

RACERS = 32
SECRET = "JBSWY3DPEHPK3PXP-totp-seed"


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _in(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(**delta)


def target(storage: Any) -> Any:
    """The real adapter object behind ``storage`` (to reach its internals)."""
    return storage.adapter if storage.kind == "sync" else storage


async def _user(storage: Any, email: str) -> User:
    user: User = await storage.create_user(email=email)
    return user


async def _device(storage: Any, user: User, **kwargs: Any) -> TwoFactorDevice:
    args: dict[str, Any] = {"user_id": user.id, "method": "totp", "secret": SECRET, **kwargs}
    device: TwoFactorDevice = await storage.create_two_factor_device(**args)
    return device


async def _challenge(storage: Any, user: User, **kwargs: Any) -> TwoFactorSession:
    device = kwargs.pop("device", None) or await _device(storage, user)
    if "session_id" not in kwargs:
        pending = await storage.create_session(user_id=user.id, expires_at=_in(minutes=5))
        kwargs["session_id"] = pending.id
    args: dict[str, Any] = {
        "user_id": user.id,
        "device_id": device.id,
        "method": "totp",
        "expires_at": _in(minutes=5),
        **kwargs,
    }
    challenge: TwoFactorSession = await storage.create_two_factor_session(**args)
    return challenge


def _set_throttle(
    dsn: str, device_id: uuid.UUID, *, failures: int | None = None, until: str | None = "past"
) -> None:
    """Set a device's throttle directly: ``until`` is ``"past"`` (the throttle is over, as if
    its time had passed), ``"hour"`` (an hour from now) or ``None``; ``failures`` the count
    (kept when ``None``)."""
    at = {"past": "now() - interval '1 second'", "hour": "now() + interval '1 hour'"}
    sql = (
        "UPDATE kitium_auth.twofa_devices"
        " SET throttle_failures = coalesce(%s, throttle_failures),"
        f" throttled_until = {at[until] if until else 'NULL'} WHERE id = %s"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.encode(), [failures, device_id])


async def _attempt_waiting_on(
    storage: Any, dsn: str, method: str, args: tuple[Any, ...], write: str, row_id: uuid.UUID
) -> Any:
    """Run ``write`` (on ``row_id``) in a transaction left open, then ``method(*args)``, which
    must wait for it: the write commits once the call waits on its lock. Returns the call's
    outcome (or the exception it raised)."""
    holder = psycopg.connect(dsn)
    try:
        holder.execute(write.encode(), [row_id])
        watcher = release_when_waiting(dsn, holder, f"kitium_auth.{method}(")
        [outcome] = await race(storage, 1, method, *args)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    return outcome


def _db_now(dsn: str) -> dt.datetime:
    """The database clock now (bounds the time of a statement run between two readings)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    now: dt.datetime = row[0]
    return now


def _stored_secret(dsn: str, device_id: uuid.UUID) -> tuple[bytes | None, str | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT secret_ciphertext, secret_key_id FROM kitium_auth.twofa_devices WHERE id = %s",
            (device_id,),
        ).fetchone()
    assert row is not None
    return (None if row[0] is None else bytes(row[0])), row[1]


# -- devices ------------------------------------------------------------------------------------


async def test_device_round_trip(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(
        storage, user, name="Phone app", verified=True, metadata={"issuer": "kitium"}
    )
    assert isinstance(device, TwoFactorDevice)
    assert device.id.version == 7
    assert (device.user_id, device.method, device.name) == (user.id, "totp", "Phone app")
    assert device.verified is True
    assert device.secret == SECRET
    assert device.phone_number is None
    assert device.last_used_at is None
    assert (device.throttle_failures, device.throttled_until) == (0, None)
    assert device.metadata == {"issuer": "kitium"}
    assert device.created_at.tzinfo is dt.UTC
    assert await storage.get_two_factor_device(device.id) == device
    assert await storage.get_two_factor_device(str(device.id)) == device

    sms = await _device(storage, user, method="sms", phone_number="+15550100", secret=None)
    assert (sms.method, sms.phone_number, sms.secret, sms.verified) == (
        "sms",
        "+15550100",
        None,
        False,
    )
    assert sms.metadata == {}
    assert await storage.list_two_factor_devices(user.id) == [device, sms]
    assert await storage.list_two_factor_devices(str(user.id)) == [device, sms]


async def test_secret_is_stored_encrypted_and_hidden_from_repr(
    storage: Any, email: str, dsn: str
) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    ciphertext, key_id = _stored_secret(dsn, device.id)
    assert ciphertext is not None
    assert key_id == "test-new"  # the last configured key encrypts
    assert SECRET.encode() not in ciphertext
    assert len(ciphertext) >= len(SECRET) + 12 + 16  # nonce + tag
    assert SECRET not in repr(device)
    assert device.secret == SECRET
    # Each write encrypts afresh (new nonce): the same secret never yields the same bytes.
    other = await _device(storage, user)
    assert _stored_secret(dsn, other.id)[0] != ciphertext


async def test_ciphertext_moved_to_another_row_does_not_decrypt(
    storage: Any, email: str, dsn: str
) -> None:
    user = await _user(storage, email)
    first = await _device(storage, user)
    second = await _device(storage, user, secret="another-seed")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE kitium_auth.twofa_devices AS d"
            "   SET secret_ciphertext = s.secret_ciphertext, secret_key_id = s.secret_key_id"
            "  FROM kitium_auth.twofa_devices AS s WHERE d.id = %s AND s.id = %s",
            (second.id, first.id),
        )
    with pytest.raises(EncryptionKeyError):
        await storage.get_two_factor_device(second.id)
    assert await storage.get_two_factor_device(first.id) == first
    # An update of another field is saved; only the returned record cannot be built, and the
    # error says so rather than pass for a refused write.
    # Also for a call with a transaction-local setting, which commits a transaction of its own.
    for view, name in ((storage, "renamed"), (storage.with_statement_timeout(5000), "again")):
        with pytest.raises(EncryptionKeyError, match="the change is saved"):
            await view.update_two_factor_device(second.id, name=name, verified=True)
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT name, verified FROM kitium_auth.twofa_devices WHERE id = %s", [second.id]
            ).fetchone()
        assert row == (name, True)


async def test_without_keys_secrets_are_refused_and_nothing_is_written(
    storage: Any, email: str, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    user = await _user(storage, email)
    encrypted = await _device(storage, user)

    async def check(keyless: Any) -> None:
        with pytest.raises(EncryptionKeyError):
            await keyless.create_two_factor_device(user_id=user.id, method="totp", secret=SECRET)
        with pytest.raises(EncryptionKeyError):
            await keyless.update_two_factor_device(encrypted.id, secret="new-seed", name="x")
        with pytest.raises(EncryptionKeyError):  # reading a secret needs its key too
            await keyless.get_two_factor_device(encrypted.id)
        # A device without a secret needs no key.
        plain = await keyless.create_two_factor_device(user_id=user.id, method="email")
        assert plain.secret is None
        assert await keyless.get_two_factor_device(plain.id) == plain
        assert await keyless.delete_two_factor_device(plain.id) is True

    if storage.kind == "sync":
        with PostgresStorageAdapter(dsn, max_size=2) as sync_keyless:
            await check(AwaitableAdapter(sync_keyless))
    else:
        async with AsyncPostgresStorageAdapter(dsn, max_size=2) as async_keyless:
            await check(async_keyless)
    assert await storage.list_two_factor_devices(user.id) == [encrypted]
    assert _stored_secret(dsn, encrypted.id)[0] is not None


class AwaitableAdapter:
    """``await proxy.method(...)`` over a sync adapter (like conftest's proxy, minimal)."""

    def __init__(self, adapter: PostgresStorageAdapter) -> None:
        self.adapter = adapter

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self.adapter, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call


async def test_update_device(storage: Any, email: str, dsn: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user, name="old", metadata={"a": 1})
    used = _in(seconds=-30)
    updated = await storage.update_two_factor_device(
        device.id, name="new", verified=True, last_used_at=used, metadata={"b": 2}
    )
    assert (updated.name, updated.verified, updated.metadata) == ("new", True, {"b": 2})
    assert updated.last_used_at == used
    assert updated.secret == SECRET  # untouched
    assert updated.updated_at >= device.updated_at
    assert await storage.get_two_factor_device(device.id) == updated

    before = _stored_secret(dsn, device.id)
    rotated = await storage.update_two_factor_device(str(device.id), secret="rotated-seed")
    assert rotated.secret == "rotated-seed"
    assert rotated.name == "new"
    after = _stored_secret(dsn, device.id)
    assert after[0] != before[0]
    assert after[0] is not None
    assert b"rotated-seed" not in after[0]

    cleared = await storage.update_two_factor_device(
        device.id, secret=None, name=None, phone_number="+15550123", last_used_at=None
    )
    assert (cleared.secret, cleared.name, cleared.last_used_at) == (None, None, None)
    assert cleared.phone_number == "+15550123"
    assert _stored_secret(dsn, device.id) == (None, None)
    assert await storage.update_two_factor_device(device.id) == await storage.get_two_factor_device(
        device.id
    )
    assert await storage.update_two_factor_device(device.id, name=UNSET) is not None

    with pytest.raises(NotFoundError):
        await storage.update_two_factor_device(uuid.uuid4(), name="x")
    with pytest.raises(ValidationError) as caught:
        await storage.update_two_factor_device("nope", name="x")
    assert caught.value.field == "id"
    with pytest.raises(ValidationError) as caught:
        await storage.update_two_factor_device(device.id, verified="yes")
    assert caught.value.field == "verified"


async def test_update_patches_metadata_in_place(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    await check_metadata_patch(
        storage, "update_two_factor_device", "get_two_factor_device", device.id, verified=True
    )


async def test_delete_device_and_lookups_of_unknown_ids(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    challenge = await _challenge(storage, user, device=device)
    assert await storage.delete_two_factor_device(device.id) is True
    assert await storage.delete_two_factor_device(device.id) is False
    assert await storage.get_two_factor_device(device.id) is None
    assert await storage.get_two_factor_session(challenge.id) is None  # cascaded
    assert await storage.list_two_factor_devices(user.id) == []
    for bad in ("nope", "", "x" * 10_000, 42, None):
        assert await storage.get_two_factor_device(bad) is None
        assert await storage.delete_two_factor_device(bad) is False
        assert await storage.list_two_factor_devices(bad) == []
        assert await storage.get_backup_codes(bad) == []
        assert await storage.get_two_factor_session(bad) is None
    assert await storage.get_two_factor_session(uuid.uuid4()) is None


async def test_deleting_the_user_deletes_its_2fa_rows(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    challenge = await _challenge(storage, user, device=device)
    await storage.create_backup_codes(user.id, [_hash("a"), _hash("b")])
    assert await storage.delete_user(user.id) is True
    assert await storage.get_two_factor_device(device.id) is None
    assert await storage.get_two_factor_session(challenge.id) is None
    assert await storage.get_backup_codes(user.id) == []


async def test_a_challenge_names_the_challenged_users_own_device(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """A challenge for one user with another user's device is refused (nothing written): an
    application checking the code against the challenge's device would otherwise let the
    attacker's own authenticator pass the victim's challenge."""
    victim = await _user(storage, f"{unique('victim')}@example.com")
    attacker = await _user(storage, f"{unique('attacker')}@example.com")
    attackers_device = await _device(storage, attacker)
    with pytest.raises(NotFoundError) as caught:
        await _challenge(storage, victim, device=attackers_device)
    assert "twofa_sessions__device_owner_fkey" in str(caught.value)
    assert (await _challenge(storage, attacker, device=attackers_device)).user_id == attacker.id


async def test_unknown_user_is_not_found(storage: Any) -> None:
    with pytest.raises(NotFoundError):
        await storage.create_two_factor_device(user_id=uuid.uuid4(), method="sms")
    with pytest.raises(NotFoundError):
        await storage.create_backup_codes(uuid.uuid4(), [_hash("a")])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "webauthn"}, "method"),
        ({"method": "TOTP"}, "method"),
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"name": "x" * 256}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"verified": 1}, "verified"),
        ({"phone_number": "+1" * 17}, "phone_number"),
        ({"secret": ""}, "secret"),
        ({"secret": "\ud800"}, "secret"),
        ({"secret": b"bytes"}, "secret"),
        ({"metadata": {"x": float("nan")}}, "metadata"),
        ({"metadata": []}, "metadata"),
    ],
)
async def test_bad_device_input_is_a_validation_error_naming_the_field(
    storage: Any, email: str, kwargs: dict[str, Any], field: str
) -> None:
    user = await _user(storage, email)
    with pytest.raises(ValidationError) as caught:
        await _device(storage, user, **kwargs)
    assert caught.value.field == field
    assert await storage.list_two_factor_devices(user.id) == []


async def test_device_create_retry_returns_the_same_row(storage: Any, email: str) -> None:
    # A retry after a lost acknowledgement re-sends the insert with the same id and ciphertext.
    user = await _user(storage, email)
    device = await _device(storage, user, secret=None)
    params = {
        "id": device.id,
        "user_id": user.id,
        "method": "email",
        "name": "ignored on retry",
        "verified": True,
        "phone_number": None,
        "secret_ciphertext": None,
        "secret_key_id": None,
        "metadata": "{}",
    }
    row = await replay(storage, "create_two_factor_device", params)
    assert row[0] == device.id
    assert row[2] == "totp"  # the stored row, not the replayed values
    assert await storage.list_two_factor_devices(user.id) == [device]


# -- TOTP replay guard --------------------------------------------------------------------------


async def test_record_totp_step_accepts_only_newer_steps(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    step = int(dt.datetime.now(dt.UTC).timestamp()) // 30
    assert await storage.record_totp_step(device.id, step) is True
    used = await storage.get_two_factor_device(device.id)
    assert used is not None
    assert used.last_used_at is not None
    assert await storage.record_totp_step(device.id, step) is False  # replay
    assert await storage.record_totp_step(str(device.id), step - 1) is False  # older
    assert await storage.record_totp_step(device.id, step + 1) is True
    assert await storage.record_totp_step(device.id, 2**63 - 1) is True
    assert await storage.record_totp_step(device.id, 2**63 - 1) is False
    assert await storage.record_totp_step(uuid.uuid4(), step) is False
    # an int subclass whose comparisons pass any range is judged by the number it holds
    for bad_step in (-1, 2**63, 1.5, "1", True, Boundless(-5), Boundless(2**63)):
        with pytest.raises(ValidationError) as caught:
            await storage.record_totp_step(device.id, bad_step)
        assert caught.value.field == "step"
    assert await storage.record_totp_step(device.id, Boundless(step)) is False  # a replay
    with pytest.raises(ValidationError) as caught:
        await storage.record_totp_step("nope", step)
    assert caught.value.field == "device_id"


async def test_racing_totp_steps_exactly_one_accepted(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    outcomes = await race(storage, RACERS, "record_totp_step", device.id, 1_000_000)
    assert outcomes.count(True) == 1, outcomes
    assert outcomes.count(False) == RACERS - 1, outcomes


# -- backup codes -------------------------------------------------------------------------------


async def test_backup_codes_create_get_and_replace(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    other = await _user(storage, "other-" + email)
    hashes = [_hash(f"code-{n}") for n in range(10)]
    codes = await storage.create_backup_codes(user.id, hashes)
    assert all(isinstance(c, BackupCode) for c in codes)
    assert [c.code_hash for c in codes] == hashes  # in the order given
    assert all(c.user_id == user.id and not c.used and c.used_at is None for c in codes)
    assert all(c.code_hash not in repr(c) for c in codes)
    assert await storage.get_backup_codes(user.id) == codes
    assert await storage.get_backup_codes(str(user.id)) == codes
    other_codes = await storage.create_backup_codes(other.id, hashes[:2])  # same digests: fine
    assert await storage.mark_backup_code_used(codes[0].id) is True

    # Replacing removes every old code, used or not, and may reuse a digest.
    fresh = [hashes[1], *(_hash(f"fresh-{n}") for n in range(4))]
    replaced = await storage.create_backup_codes(user.id, iter(fresh))
    assert [c.code_hash for c in replaced] == fresh
    assert {c.id for c in replaced}.isdisjoint({c.id for c in codes})
    assert await storage.get_backup_codes(user.id) == replaced
    assert await storage.mark_backup_code_used(codes[1].id) is False  # gone
    assert await storage.consume_backup_code(user.id, hashes[2]) is None  # gone
    assert await storage.get_backup_codes(other.id) == other_codes  # untouched

    assert await storage.create_backup_codes(user.id, []) == []
    assert await storage.get_backup_codes(user.id) == []


async def test_backup_code_replace_retry_rewrites_the_same_set(storage: Any, email: str) -> None:
    # A retry after a lost acknowledgement deletes and re-inserts the same ids and digests in
    # one statement: the unique keys must not trip over the rows it is deleting.
    user = await _user(storage, email)
    hashes = [_hash(f"r-{n}") for n in range(3)]
    codes = await storage.create_backup_codes(user.id, hashes)
    params = {"user_id": user.id, "ids": [c.id for c in codes], "code_hashes": hashes}
    rows = await replay(storage, "create_backup_codes", params)
    assert [(r[0], r[2]) for r in rows] == [(c.id, c.code_hash) for c in codes]
    assert [c.id for c in await storage.get_backup_codes(user.id)] == [c.id for c in codes]


async def test_mark_backup_code_used_once(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    code, spare = await storage.create_backup_codes(user.id, [_hash("m1"), _hash("m2")])
    assert await storage.mark_backup_code_used(code.id) is True
    assert await storage.mark_backup_code_used(str(code.id)) is False
    assert await storage.consume_backup_code(user.id, code.code_hash) is None
    assert await storage.mark_backup_code_used(uuid.uuid4()) is False
    stored = await storage.get_backup_codes(user.id)
    assert stored[0].used
    assert stored[0].used_at is not None
    assert stored[0].used_at.tzinfo is dt.UTC
    assert stored[1] == spare
    with pytest.raises(ValidationError) as caught:
        await storage.mark_backup_code_used("nope")
    assert caught.value.field == "code_id"


async def test_consume_backup_code(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    other = await _user(storage, "other-" + email)
    first, second = await storage.create_backup_codes(user.id, [_hash("c1"), _hash("c2")])
    await storage.create_backup_codes(other.id, [_hash("c1")])
    used = await storage.consume_backup_code(user.id, _hash("c1"))
    assert used is not None
    assert used.id == first.id
    assert used.used_at is not None
    assert used.used_at >= first.created_at
    assert await storage.consume_backup_code(user.id, _hash("c1")) is None  # already used
    assert await storage.consume_backup_code(str(user.id), _hash("nope")) is None
    assert await storage.mark_backup_code_used(first.id) is False
    assert await storage.get_backup_codes(user.id) == [used, second]
    # The other user's identical digest is a different code, still unused.
    other_code = await storage.consume_backup_code(other.id, _hash("c1"))
    assert other_code is not None
    assert other_code.user_id == other.id
    assert await storage.consume_backup_code(uuid.uuid4(), _hash("c2")) is None
    with pytest.raises(ValidationError) as caught:
        await storage.consume_backup_code(user.id, "12345678")  # a code, not a digest
    assert caught.value.field == "code_hash"
    with pytest.raises(ValidationError) as caught:
        await storage.consume_backup_code("nope", _hash("c2"))
    assert caught.value.field == "user_id"


async def test_racing_backup_code_consumers_exactly_one_wins(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    by_id, by_hash = await storage.create_backup_codes(user.id, [_hash("x1"), _hash("x2")])
    marks = await race(storage, RACERS, "mark_backup_code_used", by_id.id)
    assert marks.count(True) == 1, marks
    assert marks.count(False) == RACERS - 1, marks
    consumed = await race(storage, RACERS, "consume_backup_code", user.id, by_hash.code_hash)
    winners = [c for c in consumed if isinstance(c, BackupCode)]
    assert len(winners) == 1, consumed
    assert consumed.count(None) == RACERS - 1, consumed
    stored = await storage.get_backup_codes(user.id)
    assert stored[1] == winners[0]
    assert all(c.used for c in stored)


async def test_retried_backup_code_consume_recognises_its_own_win(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    by_id, by_hash = await storage.create_backup_codes(user.id, [_hash("y1"), _hash("y2")])
    mark = {"id": by_id.id, "consumer": uuid.uuid4()}
    assert await replay(storage, "mark_backup_code_used", mark) == by_id.id
    assert await replay(storage, "mark_backup_code_used", mark) == by_id.id  # retry still wins
    assert await replay(storage, "mark_backup_code_used", {**mark, "consumer": uuid.uuid4()}) is (
        None
    )
    consume = {"user_id": user.id, "code_hash": by_hash.code_hash, "consumer": uuid.uuid4()}
    first = await replay(storage, "consume_backup_code", consume)
    again = await replay(storage, "consume_backup_code", consume)
    assert first is not None
    assert again == first  # same row, used_at unchanged
    assert await replay(storage, "consume_backup_code", {**consume, "consumer": uuid.uuid4()}) is (
        None
    )
    assert await storage.consume_backup_code(user.id, by_hash.code_hash) is None


@pytest.mark.parametrize(
    ("hashes", "field"),
    [
        (["short"], "code_hashes[0]"),
        ([_hash("a"), "x" * 513], "code_hashes[1]"),
        ([_hash("a"), _hash("a")], "code_hashes"),
        ("a-single-string-not-a-list", "code_hashes"),
        ([_hash(str(n)) for n in range(101)], "code_hashes"),
        ([42], "code_hashes[0]"),
        ([_hash("a") + "\x00"], "code_hashes[0]"),
    ],
)
async def test_bad_backup_codes_are_refused_and_keep_the_old_ones(
    storage: Any, email: str, hashes: Any, field: str
) -> None:
    user = await _user(storage, email)
    codes = await storage.create_backup_codes(user.id, [_hash("keep")])
    with pytest.raises(ValidationError) as caught:
        await storage.create_backup_codes(user.id, hashes)
    assert caught.value.field == field
    assert await storage.get_backup_codes(user.id) == codes


# -- challenges ---------------------------------------------------------------------------------


async def test_challenge_round_trip(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user, method="sms", secret=None)
    session_id = (await storage.create_session(user_id=user.id, expires_at=_in(minutes=5))).id
    tokyo = dt.timezone(dt.timedelta(hours=9))
    expires = dt.datetime.now(tokyo).replace(microsecond=0) + dt.timedelta(minutes=5)
    challenge = await _challenge(
        storage,
        user,
        device=device,
        session_id=str(session_id),
        method="sms",
        code_hash=_hash("123456"),
        max_attempts=3,
        expires_at=expires,
    )
    assert isinstance(challenge, TwoFactorSession)
    assert challenge.id.version == 7
    assert (challenge.user_id, challenge.session_id, challenge.device_id) == (
        user.id,
        session_id,
        device.id,
    )
    assert (challenge.method, challenge.code_hash) == ("sms", _hash("123456"))
    assert _hash("123456") not in repr(challenge)
    assert (challenge.attempt_count, challenge.max_attempts) == (0, 3)
    assert challenge.expires_at == expires
    assert challenge.expires_at.tzinfo is dt.UTC
    assert challenge.completed_at is None
    assert await storage.get_two_factor_session(challenge.id) == challenge
    assert await storage.get_two_factor_session(str(challenge.id)) == challenge
    defaults = await _challenge(storage, user, device=device, method="backup_code")
    assert (defaults.code_hash, defaults.max_attempts, defaults.method) == (
        None,
        5,
        "backup_code",
    )


async def test_complete_challenge_once(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    challenge = await _challenge(storage, user)
    assert await storage.complete_two_factor_session(challenge.id) is True
    assert await storage.complete_two_factor_session(str(challenge.id)) is False
    done = await storage.get_two_factor_session(challenge.id)
    assert done is not None
    assert done.completed_at is not None
    assert done.completed_at.tzinfo is dt.UTC
    assert await storage.increment_two_factor_attempts(challenge.id) is None  # completed
    assert await storage.complete_two_factor_session(uuid.uuid4()) is False
    with pytest.raises(ValidationError) as caught:
        await storage.complete_two_factor_session("nope")
    assert caught.value.field == "id"


async def test_expired_challenge_cannot_complete_or_count(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    challenge = await _challenge(storage, user, expires_at=_in(seconds=-1))
    assert await storage.complete_two_factor_session(challenge.id) is False
    assert await storage.increment_two_factor_attempts(challenge.id) is None
    assert await storage.get_two_factor_session(challenge.id) == challenge  # unchanged


async def test_attempts_stop_at_the_limit(storage: Any, email: str) -> None:
    # A backup-code challenge: code attempts would also meet the device's throttle.
    user = await _user(storage, email)
    challenge = await _challenge(storage, user, max_attempts=3, method="backup_code")
    assert await storage.increment_two_factor_attempts(challenge.id) == 1
    assert await storage.increment_two_factor_attempts(str(challenge.id)) == 2
    assert await storage.increment_two_factor_attempts(challenge.id) == 3
    assert await storage.increment_two_factor_attempts(challenge.id) is None
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None
    assert stored.attempt_count == 3
    # The attempt that reached the limit may still complete the challenge.
    assert await storage.complete_two_factor_session(challenge.id) is True
    assert await storage.increment_two_factor_attempts(uuid.uuid4()) is None
    with pytest.raises(ValidationError) as caught:
        await storage.increment_two_factor_attempts("nope")
    assert caught.value.field == "id"


async def test_racing_challenge_completions_exactly_one_wins(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    challenge = await _challenge(storage, user)
    outcomes = await race(storage, RACERS, "complete_two_factor_session", challenge.id)
    assert outcomes.count(True) == 1, outcomes
    assert outcomes.count(False) == RACERS - 1, outcomes


async def test_racing_attempts_never_pass_the_limit(storage: Any, email: str) -> None:
    # A backup-code challenge: code attempts would also meet the device's throttle.
    user = await _user(storage, email)
    challenge = await _challenge(storage, user, max_attempts=5, method="backup_code")
    outcomes = await race(storage, RACERS, "increment_two_factor_attempts", challenge.id)
    counts = [o for o in outcomes if o is not None]
    assert sorted(counts) == [1, 2, 3, 4, 5], outcomes
    assert outcomes.count(None) == RACERS - 5, outcomes
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None
    assert stored.attempt_count == 5


async def test_verify_counts_then_completes_on_the_right_code(
    storage: Any, email: str, dsn: str
) -> None:
    user = await _user(storage, email)
    challenge = await _challenge(
        storage, user, method="sms", code_hash=_hash("123456"), max_attempts=3
    )
    wrong = await storage.verify_two_factor_session(challenge.id, _hash("000000"))
    assert (wrong.verified, wrong.attempt_count, wrong.max_attempts) == (False, 1, 3)
    assert wrong.throttled is False
    assert wrong.throttled_until is not None  # the wrong code throttled the device
    assert wrong.attempts_left == 2
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None
    assert (stored.attempt_count, stored.completed_at) == (1, None)
    _set_throttle(dsn, challenge.device_id)  # its throttle is over
    right = await storage.verify_two_factor_session(str(challenge.id), _hash("123456"))
    assert right == TwoFactorAttempt(verified=True, attempt_count=2, max_attempts=3)
    assert right.attempts_left == 0
    done = await storage.get_two_factor_session(challenge.id)
    assert done is not None
    assert done.completed_at is not None
    assert done.attempt_count == 2
    # Completed: neither the right code nor complete_two_factor_session win again.
    assert await storage.verify_two_factor_session(challenge.id, _hash("123456")) is None
    assert await storage.complete_two_factor_session(challenge.id) is False
    assert await storage.get_two_factor_session(challenge.id) == done


async def test_a_right_code_writes_to_its_device_only_when_there_is_a_throttle_to_reset(
    storage: Any, email: str, dsn: str
) -> None:
    """A right code resets its device's failure count and throttle; on a device with neither
    it writes nothing to the device (its updated_at stays), so a sign-in does not rewrite the
    device row each time."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    calm = await _challenge(storage, user, device=device, method="sms", code_hash=_hash("1"))
    assert (await storage.verify_two_factor_session(calm.id, _hash("1"))).verified
    assert await storage.get_two_factor_device(device.id) == device
    _set_throttle(dsn, device.id, failures=3)  # three wrong codes, their throttle over
    throttled = await storage.get_two_factor_device(device.id)
    assert throttled is not None and throttled.throttle_failures == 3
    again = await _challenge(storage, user, device=device, method="sms", code_hash=_hash("2"))
    assert (await storage.verify_two_factor_session(again.id, _hash("2"))).verified
    reset = await storage.get_two_factor_device(device.id)
    assert reset is not None and (reset.throttle_failures, reset.throttled_until) == (0, None)
    assert reset.updated_at > throttled.updated_at


async def test_verify_never_compares_past_the_limit(storage: Any, email: str, dsn: str) -> None:
    """The attempt limit and the comparison are one statement: once the limit is reached, even
    the right code is refused and the challenge stays open (to expire)."""
    user = await _user(storage, email)
    challenge = await _challenge(
        storage, user, method="email", code_hash=_hash("424242"), max_attempts=2
    )
    for count in (1, 2):
        attempt = await storage.verify_two_factor_session(challenge.id, _hash(f"guess-{count}"))
        assert attempt is not None and not attempt.throttled
        assert (attempt.verified, attempt.attempt_count, attempt.max_attempts) == (False, count, 2)
        _set_throttle(dsn, challenge.device_id)  # the limit is under test, not the throttle
    assert await storage.verify_two_factor_session(challenge.id, _hash("424242")) is None
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None
    assert (stored.attempt_count, stored.completed_at) == (2, None)


async def test_verify_refuses_what_it_cannot_check(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    # Without a stored code (a TOTP challenge) there is nothing to compare: no attempt counted.
    totp = await _challenge(storage, user)
    assert await storage.verify_two_factor_session(totp.id, _hash("123456")) is None
    assert await storage.get_two_factor_session(totp.id) == totp
    expired = await _challenge(
        storage, user, method="sms", code_hash=_hash("1"), expires_at=_in(seconds=-1)
    )
    assert await storage.verify_two_factor_session(expired.id, _hash("1")) is None
    assert await storage.get_two_factor_session(expired.id) == expired
    assert await storage.verify_two_factor_session(uuid.uuid4(), _hash("1")) is None
    with pytest.raises(ValidationError) as caught:
        await storage.verify_two_factor_session("nope", _hash("1"))
    assert caught.value.field == "id"
    # A code where its digest belongs is refused before anything is sent.
    with pytest.raises(ValidationError) as caught:
        await storage.verify_two_factor_session(expired.id, "123456")
    assert caught.value.field == "code_hash"


async def test_racing_verifications_one_match_wins(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    right = await _challenge(storage, user, method="sms", code_hash=_hash("7"), max_attempts=100)
    outcomes = await race(storage, RACERS, "verify_two_factor_session", right.id, _hash("7"))
    assert [o.verified for o in outcomes if o is not None] == [True], outcomes
    device = await storage.get_two_factor_device(right.device_id)
    assert device is not None and (device.throttle_failures, device.throttled_until) == (0, None)


async def test_racing_wrong_codes_are_compared_one_at_a_time(
    storage: Any, email: str, dsn: str
) -> None:
    """Concurrent attempts on a device's challenges wait for each other on the device row: the
    first wrong code throttles the device (here for 2^9 s: nine failures came before), and every
    attempt that waited for it is refused without being compared or counted."""
    user = await _user(storage, email)
    device = await _device(storage, user, method="sms", secret=None)
    _set_throttle(dsn, device.id, failures=9)
    challenge = await _challenge(
        storage, user, device=device, method="sms", code_hash=_hash("7"), max_attempts=100
    )
    before = _db_now(dsn)
    outcomes = await race(storage, RACERS, "verify_two_factor_session", challenge.id, _hash("8"))
    after = _db_now(dsn)
    [counted] = [o for o in outcomes if isinstance(o, TwoFactorAttempt) and not o.throttled]
    assert (counted.verified, counted.attempt_count) == (False, 1)
    assert counted.throttled_until is not None
    wait = dt.timedelta(seconds=2**9)
    assert before + wait <= counted.throttled_until <= after + wait
    refusal = TwoFactorAttempt(
        verified=False,
        attempt_count=1,
        max_attempts=100,
        throttled=True,
        throttled_until=counted.throttled_until,
    )
    assert [o for o in outcomes if o is not counted] == [refusal] * (RACERS - 1), outcomes
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None and stored.attempt_count == 1
    throttled = await storage.get_two_factor_device(device.id)
    assert throttled is not None
    assert (throttled.throttle_failures, throttled.throttled_until) == (
        10,
        counted.throttled_until,
    )


async def test_racing_wrong_codes_never_pass_the_limit(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    challenge = await _challenge(storage, user, method="sms", code_hash=_hash("7"), max_attempts=1)
    outcomes = await race(storage, RACERS, "verify_two_factor_session", challenge.id, _hash("8"))
    counted = [o for o in outcomes if o is not None]
    assert [(o.attempt_count, o.throttled) for o in counted] == [(1, False)], outcomes
    assert outcomes.count(None) == RACERS - 1, outcomes


async def test_wrong_codes_throttle_the_device_across_challenges(
    storage: Any, email: str, dsn: str
) -> None:
    """A wrong code throttles the challenge's device, not just the challenge: until
    throttled_until every challenge of the device refuses codes without comparing or counting
    them (a new challenge does not get round it), the wait doubles with each consecutive wrong
    code, and a right code resets the device."""
    user = await _user(storage, email)
    device = await _device(storage, user, method="sms", secret=None)
    session = await storage.create_session(user_id=user.id, expires_at=_in(minutes=5))
    texted: dict[str, Any] = {"device": device, "session_id": session.id, "method": "sms"}
    first = await _challenge(storage, user, **texted, code_hash=_hash("111111"))
    before = _db_now(dsn)
    wrong = await storage.verify_two_factor_session(first.id, _hash("000000"))
    after = _db_now(dsn)
    assert wrong is not None
    assert (wrong.verified, wrong.throttled, wrong.attempt_count) == (False, False, 1)
    assert wrong.throttled_until is not None
    second = dt.timedelta(seconds=1)
    assert before + second <= wrong.throttled_until <= after + second
    throttled = await storage.get_two_factor_device(device.id)
    assert throttled is not None
    assert (throttled.throttle_failures, throttled.throttled_until) == (1, wrong.throttled_until)

    # Another challenge of the device: even the right code is refused, neither compared nor
    # counted, and the device is left as it was.
    other = await _challenge(storage, user, **texted, code_hash=_hash("222222"), max_attempts=3)
    refused = await storage.verify_two_factor_session(other.id, _hash("222222"))
    assert refused == TwoFactorAttempt(
        verified=False,
        attempt_count=0,
        max_attempts=3,
        throttled=True,
        throttled_until=wrong.throttled_until,
    )
    assert refused.attempts_left == 3
    assert await storage.get_two_factor_session(other.id) == other
    assert await storage.get_two_factor_device(device.id) == throttled

    # Once the throttle is over, a wrong code is compared again and the wait doubles.
    for failures in (2, 3):
        _set_throttle(dsn, device.id)
        before = _db_now(dsn)
        wrong = await storage.verify_two_factor_session(other.id, _hash("999999"))
        after = _db_now(dsn)
        assert wrong is not None and not wrong.throttled
        assert wrong.attempt_count == failures - 1
        assert wrong.throttled_until is not None
        wait = dt.timedelta(seconds=2 ** (failures - 1))
        assert before + wait <= wrong.throttled_until <= after + wait
        bumped = await storage.get_two_factor_device(device.id)
        assert bumped is not None
        assert (bumped.throttle_failures, bumped.throttled_until) == (
            failures,
            wrong.throttled_until,
        )
    _set_throttle(dsn, device.id)
    right = await storage.verify_two_factor_session(other.id, _hash("222222"))
    assert right == TwoFactorAttempt(verified=True, attempt_count=3, max_attempts=3)
    reset = await storage.get_two_factor_device(device.id)
    assert reset is not None
    assert (reset.throttle_failures, reset.throttled_until) == (0, None)
    # A refusal for another reason stays None: the challenge is done, whatever the device.
    _set_throttle(dsn, device.id, until="hour")
    assert await storage.verify_two_factor_session(other.id, _hash("222222")) is None
    assert await storage.verify_two_factor_session(uuid.uuid4(), _hash("222222")) is None


async def test_a_code_attempt_let_through_is_charged_to_the_device(
    storage: Any, email: str, dsn: str
) -> None:
    """For codes the application checks (TOTP): count_two_factor_attempt charges the device as
    for a wrong code before the code is checked, so each attempt doubles the wait, up to 15
    minutes, the count saturates rather than overflow, a throttle already set is never
    shortened; an accepted TOTP step clears the charge, a refused one (a replay) does not."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    challenge = await _challenge(storage, user, device=device, max_attempts=100)

    async def charged(wait: dt.timedelta) -> dt.datetime:
        _set_throttle(dsn, device.id)  # the last throttle is over: the attempt goes through
        before = _db_now(dsn)
        attempt = await storage.count_two_factor_attempt(challenge.id)
        after = _db_now(dsn)
        assert attempt is not None and not attempt.throttled
        stored: TwoFactorDevice | None = await storage.get_two_factor_device(device.id)
        assert stored is not None and stored.throttled_until is not None
        assert before + wait <= stored.throttled_until <= after + wait
        assert attempt.throttled_until == stored.throttled_until  # the throttle it set
        return stored.throttled_until

    await charged(dt.timedelta(seconds=1))
    await charged(dt.timedelta(seconds=2))
    _set_throttle(dsn, device.id, failures=10)
    await charged(dt.timedelta(minutes=15))  # 2^10 s, capped
    _set_throttle(dsn, device.id, failures=2**31 - 1)
    await charged(dt.timedelta(minutes=15))
    stored = await storage.get_two_factor_device(device.id)
    assert stored is not None and stored.throttle_failures == 2**31 - 1

    step = int(dt.datetime.now(dt.UTC).timestamp()) // 30
    assert await storage.record_totp_step(device.id, step) is True  # a right code
    reset = await storage.get_two_factor_device(device.id)
    assert reset is not None
    assert (reset.throttle_failures, reset.throttled_until) == (0, None)
    # A refused step (a replay) is no right code: the charge stays.
    assert await storage.count_two_factor_attempt(challenge.id) is not None
    assert await storage.record_totp_step(device.id, step) is False
    kept = await storage.get_two_factor_device(device.id)
    assert kept is not None and kept.throttle_failures == 1


async def test_concurrent_code_attempts_let_one_through_per_window(
    storage: Any, email: str
) -> None:
    """Guesses sent all at once, on several challenges of one device: the first counted is
    charged before anyone checks it, the others wait for the device's lock, find it throttled
    and are refused without being counted. (Charged only after the application's check, every
    one of them would have been let through and compared.)"""
    user = await _user(storage, email)
    device = await _device(storage, user)
    challenges = [await _challenge(storage, user, device=device) for _ in range(4)]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((challenges[i % 4].id,), {}) for i in range(RACERS)
    ]
    outcomes = await race_each(storage, "count_two_factor_attempt", calls)
    assert all(isinstance(o, TwoFactorAttempt) for o in outcomes), outcomes
    through = [o for o in outcomes if not o.throttled]
    assert len(through) == 1, outcomes
    stored = await storage.get_two_factor_device(device.id)
    assert stored is not None and stored.throttle_failures == 1
    counted = [await storage.get_two_factor_session(c.id) for c in challenges]
    assert sum(c.attempt_count for c in counted if c is not None) == 1


async def test_count_two_factor_attempt_refuses_while_the_device_is_throttled(
    storage: Any, email: str, dsn: str
) -> None:
    """The flow of codes the application checks: count (which charges the device), check,
    then record the step of a right code (which clears the charge). While the device is
    throttled, count_two_factor_attempt answers with the time to try again and
    increment_two_factor_attempts with None, and neither counts; backup-code attempts
    (backup_code=True, or a backup-code challenge) are counted whatever the throttle and
    charge nothing."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    session = await storage.create_session(user_id=user.id, expires_at=_in(minutes=5))
    challenge = await _challenge(storage, user, device=device, session_id=session.id)
    first = await storage.count_two_factor_attempt(challenge.id)
    after_first = await storage.get_two_factor_device(device.id)
    assert after_first is not None and after_first.throttled_until is not None
    assert first == TwoFactorAttempt(
        verified=False,
        attempt_count=1,
        max_attempts=5,
        throttled_until=after_first.throttled_until,  # the charge it set
    )
    assert first.attempts_left == 4
    _set_throttle(dsn, device.id, until="hour")  # as if the code was wrong and time stood
    charged = await storage.get_two_factor_device(device.id)
    assert charged is not None and charged.throttle_failures == 1
    until = charged.throttled_until
    refused = await storage.count_two_factor_attempt(challenge.id)
    assert refused == TwoFactorAttempt(
        verified=False, attempt_count=1, max_attempts=5, throttled=True, throttled_until=until
    )
    assert await storage.increment_two_factor_attempts(str(challenge.id)) is None
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None and stored.attempt_count == 1
    # Backup codes are checked against the user's codes, not the device: never throttled,
    # still counted, and they charge nothing.
    by_flag = await storage.count_two_factor_attempt(challenge.id, backup_code=True)
    assert by_flag == TwoFactorAttempt(verified=False, attempt_count=2, max_attempts=5)
    backup = await _challenge(
        storage, user, device=device, session_id=session.id, method="backup_code"
    )
    assert await storage.count_two_factor_attempt(backup.id) == TwoFactorAttempt(
        verified=False, attempt_count=1, max_attempts=5
    )
    assert await storage.increment_two_factor_attempts(backup.id) == 2
    unchanged = await storage.get_two_factor_device(device.id)
    assert unchanged == charged
    for flag in (1, "yes", None):
        with pytest.raises(ValidationError) as caught:
            await storage.count_two_factor_attempt(challenge.id, backup_code=flag)
        assert caught.value.field == "backup_code"

    _set_throttle(dsn, device.id)  # the throttle is over
    third = await storage.count_two_factor_attempt(challenge.id)
    assert third is not None and third.throttled_until is not None
    assert (third.verified, third.attempt_count, third.throttled) == (False, 3, False)
    step = int(dt.datetime.now(dt.UTC).timestamp()) // 30
    assert await storage.record_totp_step(device.id, step) is True  # a right code
    assert await storage.complete_two_factor_session(challenge.id) is True
    reset = await storage.get_two_factor_device(device.id)
    assert reset is not None
    assert (reset.throttle_failures, reset.throttled_until) == (0, None)

    # None, throttled or not, when no attempt can be made.
    _set_throttle(dsn, device.id, until="hour")
    assert await storage.count_two_factor_attempt(challenge.id) is None  # completed
    expired = await _challenge(
        storage, user, device=device, session_id=session.id, expires_at=_in(seconds=-1)
    )
    assert await storage.count_two_factor_attempt(expired.id) is None
    assert await storage.count_two_factor_attempt(uuid.uuid4()) is None
    with pytest.raises(ValidationError) as caught:
        await storage.count_two_factor_attempt("nope")
    assert caught.value.field == "id"


@pytest.mark.parametrize("method", ["verify_two_factor_session", "count_two_factor_attempt"])
async def test_an_attempt_waiting_on_a_concurrent_failure_sees_its_throttle(
    storage: Any, email: str, dsn: str, method: str
) -> None:
    """An attempt that starts while another transaction is throttling the device waits for
    it, then reads the throttle it set: it is refused, and (for verify_two_factor_session) the
    right code is never compared. A plain guarded statement would judge the throttle by its
    snapshot, from before the wait, and let the code through."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    code = {"method": "sms", "code_hash": _hash("5")} if method.startswith("verify") else {}
    challenge = await _challenge(storage, user, device=device, **code)
    args = (challenge.id, _hash("5")) if code else (challenge.id,)
    outcome = await _attempt_waiting_on(
        storage, dsn, method, args,
        "UPDATE kitium_auth.twofa_devices SET throttle_failures = throttle_failures + 1,"
        " throttled_until = now() + interval '1 hour' WHERE id = %s",
        device.id,
    )  # fmt: skip
    throttled = await storage.get_two_factor_device(device.id)
    assert throttled is not None and throttled.throttle_failures == 1
    assert outcome == TwoFactorAttempt(
        verified=False,
        attempt_count=0,
        max_attempts=5,
        throttled=True,
        throttled_until=throttled.throttled_until,
    )
    assert await storage.get_two_factor_session(challenge.id) == challenge


@pytest.mark.parametrize("method", ["verify_two_factor_session", "count_two_factor_attempt"])
async def test_an_attempt_waiting_on_a_concurrent_completion_counts_nothing(
    storage: Any, email: str, dsn: str, method: str
) -> None:
    """An attempt that starts while another transaction completes the challenge waits for it
    (the challenge's row lock), then finds the challenge completed: no row, nothing counted,
    nothing charged to the device. Read without the lock, the challenge looked open and the
    attempt was counted on a completed challenge and charged to its device."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    code = {"method": "sms", "code_hash": _hash("5")} if method.startswith("verify") else {}
    challenge = await _challenge(storage, user, device=device, **code)
    args = (challenge.id, _hash("6")) if code else (challenge.id,)
    outcome = await _attempt_waiting_on(
        storage, dsn, method, args,
        "UPDATE kitium_auth.twofa_sessions SET completed_at = statement_timestamp() WHERE id = %s",
        challenge.id,
    )  # fmt: skip
    assert outcome is None
    completed = await storage.get_two_factor_session(challenge.id)
    assert completed is not None and completed.completed_at is not None
    assert completed.attempt_count == 0
    assert await storage.get_two_factor_device(device.id) == device


async def test_a_wrong_code_waiting_on_a_concurrent_failure_bumps_after_it(
    storage: Any, email: str, dsn: str
) -> None:
    """Two wrong codes at once both count: the second waits for the first's row lock and
    bumps the row it left (here the first's throttle is already over, so the second is
    compared)."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    challenge = await _challenge(storage, user, device=device, method="sms", code_hash=_hash("5"))
    outcome = await _attempt_waiting_on(
        storage, dsn, "verify_two_factor_session", (challenge.id, _hash("6")),
        "UPDATE kitium_auth.twofa_devices SET throttle_failures = throttle_failures + 1,"
        " throttled_until = now() - interval '1 second' WHERE id = %s",
        device.id,
    )  # fmt: skip
    assert isinstance(outcome, TwoFactorAttempt), outcome
    assert (outcome.verified, outcome.throttled, outcome.attempt_count) == (False, False, 1)
    bumped = await storage.get_two_factor_device(device.id)
    assert bumped is not None
    assert (bumped.throttle_failures, bumped.throttled_until) == (2, outcome.throttled_until)


async def test_attempts_are_not_counted_inside_a_transaction(storage: Any, email: str) -> None:
    """Counting inside a caller's transaction would let a rollback (after a wrong guess) undo
    the count and the device's charge: every guess would be free. The three counting calls
    refuse a transaction's view, before anything runs, and the challenge and device stay as
    they were."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    challenge = await _challenge(storage, user, device=device)
    coded = await _challenge(storage, user, device=device, method="sms", code_hash=_hash("5"))
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("count_two_factor_attempt", (challenge.id,)),
        ("increment_two_factor_attempts", (challenge.id,)),
        ("verify_two_factor_session", (coded.id, _hash("5"))),
    ]
    for name, args in calls:
        async with storage.transaction() as tx:
            with pytest.raises(ValidationError) as caught:
                await getattr(tx, name)(*args)
            assert caught.value.field == "transaction"
            assert name in str(caught.value)
            assert await tx.get_two_factor_session(challenge.id) == challenge  # tx still usable
    with pytest.raises(ValidationError) as caught:
        async with storage.transaction() as tx:
            await tx.count_two_factor_attempt(challenge.id, backup_code=True)
    assert caught.value.field == "transaction"
    assert await storage.get_two_factor_session(challenge.id) == challenge
    assert await storage.get_two_factor_session(coded.id) == coded
    assert await storage.get_two_factor_device(device.id) == device
    # On the adapter itself they count (and charge) as usual.
    attempt = await storage.count_two_factor_attempt(challenge.id)
    assert attempt is not None and attempt.attempt_count == 1


async def test_retried_completion_recognises_its_own_win(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    challenge = await _challenge(storage, user)
    params = {"id": challenge.id, "consumer": uuid.uuid4()}
    assert await replay(storage, "complete_two_factor_session", params) == challenge.id
    done = await storage.get_two_factor_session(challenge.id)
    assert await replay(storage, "complete_two_factor_session", params) == challenge.id
    assert await storage.get_two_factor_session(challenge.id) == done  # completed_at kept
    other = {**params, "consumer": uuid.uuid4()}
    assert await replay(storage, "complete_two_factor_session", other) is None


async def test_a_retried_completion_wins_after_its_login_session_ended(
    storage: Any, email: str, dsn: str
) -> None:
    """A completion whose acknowledgement was lost is retried by the adapter with the same
    consumer; if the login session expired or was deleted in between, the retry still reports
    the first attempt's win (migration 0040: it checked the session; it used to report a loss
    for a challenge it had completed). Another consumer still loses."""
    user = await _user(storage, email)
    for ending in ("expired", "deleted"):
        challenge = await _challenge(storage, user)
        params = {"id": challenge.id, "consumer": uuid.uuid4()}
        assert await replay(storage, "complete_two_factor_session", params) == challenge.id
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE kitium_auth.sessions SET expires_at = statement_timestamp() WHERE id = %s"
                if ending == "expired"
                else "DELETE FROM kitium_auth.sessions WHERE id = %s",
                [challenge.session_id],
            )
        assert await replay(storage, "complete_two_factor_session", params) == challenge.id
        other = {**params, "consumer": uuid.uuid4()}
        assert await replay(storage, "complete_two_factor_session", other) is None


async def test_a_retried_completion_that_waited_for_its_first_attempt_wins(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: the first attempt completes the challenge and has not committed yet
    (its acknowledgement lost, its commit slow) when the adapter's retry, with the same
    consumer, starts and waits for the challenge's lock. Once the first attempt commits, the
    retry must report its win: it read the consumer from the statement's snapshot (none) and
    reported a loss."""
    user = await _user(storage, email)
    challenge = await _challenge(storage, user)
    params = {"id": challenge.id, "consumer": uuid.uuid4()}
    won, again = await replay_behind_open_attempt(
        storage,
        dsn,
        "complete_two_factor_session",
        params,
        waits_on="UPDATE kitium_auth.twofa_sessions AS t",
    )
    assert won == (challenge.id,)
    assert again == challenge.id


async def test_challenge_references_must_exist(storage: Any, email: str) -> None:
    user = await _user(storage, email)
    with pytest.raises(NotFoundError):
        await _challenge(storage, user, device=_Fake(uuid.uuid4()))
    device = await _device(storage, user)
    with pytest.raises(NotFoundError):
        await _challenge(storage, user, device=device, user_id=uuid.uuid4())


async def test_a_challenge_belongs_to_one_of_the_users_sessions_and_ends_with_it(
    storage: Any, email: str
) -> None:
    """Another user's session, or none at all, is refused (nothing written); and once the login
    session is gone ("log out everywhere", a password reset), its pending challenges can no
    longer be counted, verified or completed."""
    user = await _user(storage, email)
    other = await _user(storage, f"other-{email}")
    device = await _device(storage, user)
    theirs = await storage.create_session(user_id=other.id, expires_at=_in(minutes=5))
    for session_id in (theirs.id, uuid.uuid4()):
        with pytest.raises(NotFoundError, match="no session"):
            await _challenge(storage, user, device=device, session_id=session_id)
    assert await storage.list_user_sessions(user.id) == []
    totp = await _challenge(storage, user, device=device)
    texted = await _challenge(storage, user, device=device, method="sms", code_hash=_hash("9"))
    assert await storage.delete_user_sessions(user.id) == 2
    assert await storage.increment_two_factor_attempts(totp.id) is None
    assert await storage.complete_two_factor_session(totp.id) is False
    assert await storage.verify_two_factor_session(texted.id, _hash("9")) is None
    assert await storage.get_two_factor_session(texted.id) == texted  # unchanged, goes on expiry


@pytest.mark.parametrize(
    ("call", "marker"),
    [
        ("increment_two_factor_attempts", "count_two_factor_attempt("),
        ("verify_two_factor_session", "verify_two_factor_session("),
        ("complete_two_factor_session", "UPDATE kitium_auth.twofa_sessions"),
    ],
)
async def test_a_call_that_waited_for_the_challenge_sees_the_login_session_ended_meanwhile(
    storage: Any, email: str, dsn: str, call: str, marker: str
) -> None:
    """Found in the fourth review: the login session was checked in the statement that locks
    the challenge, as of that statement's start. A call that waited for the challenge's lock,
    held by the transaction that ended the session, still counted it live: the attempt was
    counted and charged, the code verified, the challenge completed. The session is now read
    once the challenge is locked (migration 0036)."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    texted = await _challenge(storage, user, device=device, method="sms", code_hash=_hash("9"))
    args = (texted.id, _hash("9")) if call == "verify_two_factor_session" else (texted.id,)
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT 1 FROM kitium_auth.twofa_sessions WHERE id = %s FOR UPDATE", [texted.id]
        )
        holder.execute("DELETE FROM kitium_auth.sessions WHERE id = %s", [texted.session_id])
        released = release_when_waiting(dsn, holder, marker)
        result = await getattr(storage, call)(*args)
        released.join()
    finally:
        holder.close()
    assert released.seen  # type: ignore[attr-defined]  # the call waited for the challenge
    assert result in (None, False)
    assert await storage.get_two_factor_session(texted.id) == texted  # not counted, not completed
    assert (await storage.get_two_factor_device(device.id)).throttled_until is None


async def test_a_challenge_ends_when_its_session_expires(
    storage: Any, email: str, dsn: str
) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    expired = await storage.create_session(user_id=user.id, expires_at=_in(seconds=-1))
    with pytest.raises(NotFoundError, match="no session"):
        await _challenge(storage, user, device=device, session_id=expired.id)
    pending = await storage.create_session(user_id=user.id, expires_at=_in(minutes=5))
    texted = await _challenge(
        storage, user, device=device, session_id=pending.id, method="sms", code_hash=_hash("9")
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE kitium_auth.sessions SET expires_at = now() - interval '1 second'"
            " WHERE id = %s",
            [pending.id],
        )
    assert await storage.verify_two_factor_session(texted.id, _hash("9")) is None
    assert await storage.increment_two_factor_attempts(texted.id) is None
    assert await storage.complete_two_factor_session(texted.id) is False
    assert await storage.get_two_factor_session(texted.id) == texted


async def test_delete_expired_two_factor_sessions_deletes_only_expired_challenges(
    storage: Any, email: str, dsn: str
) -> None:
    """Expired challenges go, completed or not, in batches; unexpired ones stay, completed ones
    included, so that a completion retried after a lost acknowledgement still finds its row."""
    await storage.delete_expired_two_factor_sessions()  # start from none (other tests leave some)
    user = await _user(storage, email)
    device = await _device(storage, user)
    session = await storage.create_session(user_id=user.id, expires_at=_in(hours=1))
    expired = [
        await _challenge(storage, user, device=device, session_id=session.id, expires_at=at)
        for at in (_in(seconds=-1), _in(minutes=-5), _in(days=-3))
    ]
    texted = await _challenge(
        storage, user, device=device, session_id=session.id, method="sms", code_hash=_hash("7")
    )
    assert await storage.verify_two_factor_session(texted.id, _hash("7")) is not None
    finished = await _challenge(storage, user, device=device, session_id=session.id)
    assert await storage.complete_two_factor_session(finished.id) is True
    with psycopg.connect(dsn, autocommit=True) as conn:  # both expire after completion
        conn.execute(
            "UPDATE kitium_auth.twofa_sessions SET expires_at = now() - interval '1 second'"
            " WHERE id = ANY(%s)",
            [[texted.id, finished.id]],
        )
    expired += [texted, finished]
    pending = await _challenge(storage, user, device=device, session_id=session.id)
    done = await _challenge(storage, user, device=device, session_id=session.id)
    consumer = uuid.uuid4()
    params = {"id": done.id, "consumer": consumer}
    assert await replay(storage, "complete_two_factor_session", params) == done.id
    completed = await storage.get_two_factor_session(done.id)

    totals: list[int] = []
    assert (
        await storage.delete_expired_two_factor_sessions(batch_size=2, progress=totals.append) == 5
    )
    assert totals == [2, 4, 5]
    for challenge in expired:
        assert await storage.get_two_factor_session(challenge.id) is None
    assert await storage.get_two_factor_session(pending.id) == pending
    assert await storage.get_two_factor_session(done.id) == completed
    # The completion, retried after its acknowledgement was lost, still finds its row.
    assert await replay(storage, "complete_two_factor_session", params) == done.id
    assert await storage.delete_expired_two_factor_sessions() == 0
    assert await storage.get_session(session.id) == session  # the login session stays


@pytest.mark.parametrize("batch_size", [0, -1, 100_001, 2.5, "10", True])
async def test_delete_expired_two_factor_sessions_checks_batch_size(
    storage: Any, batch_size: Any
) -> None:
    with pytest.raises(ValidationError) as caught:
        await storage.delete_expired_two_factor_sessions(batch_size=batch_size)
    assert caught.value.field == "batch_size"


async def test_delete_two_factor_session_cancels_a_challenge(storage: Any, email: str) -> None:
    """A "resend code" flow deletes the old challenge, so its code no longer verifies; the new
    one does."""
    user = await _user(storage, email)
    device = await _device(storage, user, method="sms", secret=None)
    session = await storage.create_session(user_id=user.id, expires_at=_in(minutes=5))
    first = await _challenge(
        storage, user, device=device, session_id=session.id, method="sms", code_hash=_hash("1")
    )
    assert await storage.delete_two_factor_session(first.id) is True
    assert await storage.delete_two_factor_session(str(first.id)) is False  # idempotent
    assert await storage.get_two_factor_session(first.id) is None
    second = await _challenge(
        storage, user, device=device, session_id=session.id, method="sms", code_hash=_hash("2")
    )
    assert await storage.verify_two_factor_session(first.id, _hash("1")) is None
    attempt = await storage.verify_two_factor_session(second.id, _hash("2"))
    assert attempt is not None and attempt.verified
    assert await storage.delete_two_factor_session(second.id) is True  # completed ones too
    assert await storage.get_session(session.id) == session  # the login session stays
    for bad in ("nope", "", "x" * 10_000, 42, None, uuid.uuid4()):
        assert await storage.delete_two_factor_session(bad) is False


class _Fake:
    def __init__(self, id: uuid.UUID) -> None:
        self.id = id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "push"}, "method"),
        ({"session_id": "nope"}, "session_id"),
        ({"user_id": 42}, "user_id"),
        ({"expires_at": dt.datetime(2030, 1, 1)}, "expires_at"),  # naive
        ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
        ({"code_hash": "123456"}, "code_hash"),  # a code, not a digest
        ({"code_hash": "x" * 513}, "code_hash"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
    ],
)
async def test_bad_challenge_input_is_a_validation_error_naming_the_field(
    storage: Any, email: str, kwargs: dict[str, Any], field: str
) -> None:
    user = await _user(storage, email)
    device = await _device(storage, user)
    with pytest.raises(ValidationError) as caught:
        await _challenge(storage, user, device=device, **kwargs)
    assert caught.value.field == field


async def test_concurrent_replacements_leave_exactly_one_set(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    sets = [[f"{n:02d}-{i}-{'h' * 20}" for i in range(5)] for n in range(8)]
    if storage.kind == "async":
        await asyncio.gather(*(storage.create_backup_codes(user.id, s) for s in sets))
    else:
        barrier = threading.Barrier(len(sets))

        def replace(codes: list[str]) -> None:
            barrier.wait()
            storage.adapter.create_backup_codes(user.id, codes)

        with ThreadPoolExecutor(len(sets)) as pool:
            list(pool.map(replace, sets))
    remaining = sorted(c.code_hash for c in await storage.get_backup_codes(user.id))
    assert remaining in [sorted(s) for s in sets]


async def test_backup_codes_for_an_unknown_user_are_not_found(storage: Any) -> None:
    with pytest.raises(NotFoundError):
        await storage.create_backup_codes(uuid.uuid4(), ["x" * 20])


async def test_a_backup_code_challenge_takes_no_code_hash(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: a ``backup_code`` challenge created with a ``code_hash`` let
    ``verify_two_factor_session`` compare it and charge the device for a miss, throttling its
    TOTP codes, where backup-code attempts never charge the device. Refused before anything is
    written."""
    user = await storage.create_user(email=email)
    device = await _device(storage, user)
    with pytest.raises(ValidationError) as refused:
        await _challenge(storage, user, device=device, method="backup_code", code_hash="a" * 64)
    assert refused.value.field == "code_hash"
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM kitium_auth.twofa_sessions WHERE user_id = %s", (user.id,)
        ).fetchone()
    assert row == (0,)


async def test_a_throttle_charged_after_a_lock_wait_runs_from_the_charge(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: a code let through after waiting 1.5 s for its device's lock set its
    1 s throttle from the statement's start (statement_timestamp()), already over when the call
    returned, and the next guess was compared at once. The throttle now runs from the time the
    call holds its rows (migration 0040): it outlasts the call, and the next guess is refused."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    first, second = [await _challenge(storage, user, device=device) for _ in "ab"]
    charged = await call_while_holding(
        storage,
        dsn,
        ("twofa_devices", {"id": device.id}),
        "NO KEY UPDATE",
        lambda: storage.count_two_factor_attempt(first.id),
        waits_on="count_two_factor_attempt(",
        linger=1.5,
    )
    returned = _db_now(dsn)
    assert not charged.throttled
    assert charged.throttled_until > returned
    assert (await storage.count_two_factor_attempt(second.id)).throttled


async def test_guesses_queued_behind_a_device_lock_are_compared_one_per_throttle_window(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: one guess waiting for the device's lock, a second sent 1.3 s later
    while the first still waited; once the lock was free both were let through, the first's
    throttle counted from a start 1.5 s back. The second is now refused (docs/security.md: a
    guess made while another is being counted is never compared)."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    first, second = [await _challenge(storage, user, device=device) for _ in "ab"]
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT FROM kitium_auth.twofa_devices WHERE id = %s FOR NO KEY UPDATE", [device.id]
        )
        one = start(storage, "count_two_factor_attempt", first.id)
        assert await asyncio.to_thread(waiting, dsn, "count_two_factor_attempt(")
        await asyncio.sleep(1.3)
        two = start(storage, "count_two_factor_attempt", second.id)
        assert await asyncio.to_thread(waiting, dsn, "count_two_factor_attempt(", 2)
        holder.commit()
        let_through, refused = await one, await two
    finally:
        holder.close()
    assert not let_through.throttled
    assert refused.throttled and refused.attempt_count == 0


@pytest.mark.parametrize("expiring", ["challenge", "login session"])
async def test_a_right_code_is_refused_once_what_it_answers_expired_during_its_wait(
    storage: Any, email: str, dsn: str, expiring: str
) -> None:
    """Found in review: a right code waited for its device's lock past the expiry of its
    challenge (or of the challenge's login session) and was accepted: expiry was judged at the
    statement's start. It is judged once the call holds its rows (migration 0040): no row, the
    challenge stays uncompleted."""
    user = await _user(storage, email)
    device = await _device(storage, user)
    soon = _in(seconds=1)
    extra: dict[str, Any] = {"expires_at": soon}
    if expiring == "login session":
        session = await storage.create_session(user_id=user.id, expires_at=soon)
        extra = {"session_id": session.id}
    challenge = await _challenge(
        storage, user, device=device, method="sms", code_hash=_hash("5"), **extra
    )
    attempt = await call_while_holding(
        storage,
        dsn,
        ("twofa_devices", {"id": device.id}),
        "NO KEY UPDATE",
        lambda: storage.verify_two_factor_session(challenge.id, _hash("5")),
        waits_on="verify_two_factor_session(",
        linger=2.0,
    )
    assert _db_now(dsn) > soon
    assert attempt is None
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None and stored.completed_at is None


async def test_a_completion_that_waited_past_the_challenges_expiry_loses(
    storage: Any, email: str, dsn: str
) -> None:
    """Found in review: complete_two_factor_session waited for the challenge's lock past its
    expiry and completed it. It now checks the challenge once locked, at that time (migration
    0040), and loses."""
    user = await _user(storage, email)
    challenge = await _challenge(storage, user, expires_at=_in(seconds=1))
    won = await call_while_holding(
        storage,
        dsn,
        ("twofa_sessions", {"id": challenge.id}),
        "NO KEY UPDATE",
        lambda: storage.complete_two_factor_session(challenge.id),
        waits_on="UPDATE kitium_auth.twofa_sessions",
        linger=2.0,
    )
    assert won is False
    stored = await storage.get_two_factor_session(challenge.id)
    assert stored is not None and stored.completed_at is None


async def test_increment_counts_backup_code_attempts_whatever_the_throttle(
    storage: Any, email: str
) -> None:
    """increment_two_factor_attempts on a challenge opened with method="backup_code" counts
    every attempt as a backup-code attempt, as count_two_factor_attempt does: while the
    device is throttled too, up to max_attempts (its docstring said such an attempt was
    refused: found in review)."""
    user = await storage.create_user(email=email)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    session = await storage.create_session(user_id=user.id, expires_at=expires)
    device = await storage.create_two_factor_device(user_id=user.id, method="totp")
    sms = await storage.create_two_factor_session(
        user_id=user.id,
        session_id=session.id,
        device_id=device.id,
        method="sms",
        code_hash="r" * 32,
        expires_at=expires,
    )
    backup = await storage.create_two_factor_session(
        user_id=user.id,
        session_id=session.id,
        device_id=device.id,
        method="backup_code",
        expires_at=expires,
        max_attempts=2,
    )
    wrong = await storage.verify_two_factor_session(sms.id, "w" * 32)
    assert wrong is not None and wrong.throttled_until is not None  # the device is throttled
    counts = [await storage.increment_two_factor_attempts(backup.id) for _ in range(3)]
    assert counts == [1, 2, None]

"""Keyring: AES-256-GCM with key ids, rotation order, env configuration, tamper detection."""

from __future__ import annotations

import base64
import secrets
import uuid

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kitium_pg import PostgresStorageAdapter, ValidationError
from kitium_pg.encryption import ENV_VAR, Keyring, generate_key
from kitium_pg.errors import EncryptionKeyError


def test_last_key_encrypts_and_every_key_decrypts() -> None:
    old, new = generate_key(), generate_key()
    row = uuid.uuid4()
    key_id, blob = Keyring({"old": old}).encrypt("seed", column="t.c", row_id=row)
    both = Keyring({"old": old, "new": new})
    assert key_id == "old" and both.current_key_id == "new"
    assert both.decrypt(key_id, blob, column="t.c", row_id=row) == "seed"
    assert both.encrypt("seed", column="t.c", row_id=row)[0] == "new"
    assert b"seed" not in blob


def test_moved_or_tampered_ciphertexts_do_not_decrypt() -> None:
    ring = Keyring({"k": secrets.token_bytes(32)})
    row = uuid.uuid4()
    _, blob = ring.encrypt("secret", column="t.c", row_id=row)
    with pytest.raises(EncryptionKeyError):
        ring.decrypt("k", blob, column="t.c", row_id=uuid.uuid4())
    with pytest.raises(EncryptionKeyError):
        ring.decrypt("k", blob, column="t.other", row_id=row)
    flipped = bytes([blob[0] ^ 1]) + blob[1:]
    with pytest.raises(EncryptionKeyError):
        ring.decrypt("k", flipped, column="t.c", row_id=row)
    with pytest.raises(EncryptionKeyError, match="not configured"):
        ring.decrypt("gone", blob, column="t.c", row_id=row)


def test_keys_from_the_environment() -> None:
    a, b = generate_key(), base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    ring = Keyring.from_env({ENV_VAR: f"2025:{a}, 2026:{b}"})
    assert ring is not None and ring.key_ids == ("2025", "2026") and ring.current_key_id == "2026"
    assert Keyring.from_env({}) is None
    with pytest.raises(ValidationError):
        Keyring.from_env({ENV_VAR: "no-colon"})
    assert a not in repr(ring)


@pytest.mark.parametrize(
    "keys",
    [{}, {"k": "short"}, {"k": b"x" * 31}, {"": generate_key()}, {"a:b": generate_key()}],
)
def test_bad_keys_are_validation_errors(keys: dict[str, str | bytes]) -> None:
    with pytest.raises(ValidationError) as caught:
        Keyring(keys)
    assert caught.value.field == "encryption_keys"


def test_a_secret_without_a_key_is_refused_and_nothing_is_written(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with PostgresStorageAdapter(dsn) as storage:
        user = storage.create_user()
        with pytest.raises(EncryptionKeyError, match=ENV_VAR):
            storage.link_oauth_account(user.id, "gh", sub=uuid.uuid4().hex, access_token="tok")
        assert storage.get_user(user.id) == user  # no link was written
        with psycopg.connect(dsn) as conn:
            count = conn.execute(
                "SELECT count(*) FROM kitium_auth.oauth_accounts WHERE user_id = %s", [user.id]
            ).fetchone()
        assert count == (0,)


def test_a_repeated_key_id_in_the_environment_is_refused() -> None:
    with pytest.raises(ValidationError, match="appears twice"):
        Keyring.from_env({ENV_VAR: f"k:{generate_key()},k:{generate_key()}"})


_GOOD = generate_key()


@pytest.mark.parametrize(
    "key",
    [
        0,
        1,
        None,
        1.5,
        True,
        ["k"],
        bytearray(32),
        b"\xff" * 44,  # not UTF-8
        "é" * 43,
        "!!!!" + _GOOD,  # the lenient decoder would skip the "!" and accept it
        _GOOD + "!!!!",
        _GOOD.rstrip("=") + "==",
        " " + _GOOD,
        _GOOD[:20] + "\n" + _GOOD[20:],
        _GOOD[:20] + "\x00" + _GOOD[21:],
        "+" * 43 + "=",  # standard base64, not urlsafe
        "/" * 43,
        base64.urlsafe_b64encode(secrets.token_bytes(33)).decode(),
        base64.urlsafe_b64encode(secrets.token_bytes(31)).decode(),
        "",
        "=" * 44,
        "A" * 10**6,
    ],
)
def test_malformed_keys_are_validation_errors_that_hide_the_key(key: object) -> None:
    with pytest.raises(ValidationError) as caught:
        Keyring({"k": key})  # type: ignore[dict-item]
    assert caught.value.field == "encryption_keys"
    if isinstance(key, str) and len(key) > 8:
        assert key not in str(caught.value)


@given(st.binary(min_size=32, max_size=32), st.booleans(), st.booleans())
def test_every_spelling_generate_key_can_write_is_accepted(
    raw: bytes, padded: bool, as_bytes: bool
) -> None:
    text = base64.urlsafe_b64encode(raw).decode()
    text = text if padded else text.rstrip("=")
    key = text.encode() if as_bytes else text
    row = uuid.uuid4()
    _, blob = Keyring({"k": key}).encrypt("seed", column="t.c", row_id=row)
    assert Keyring({"k": raw}).decrypt("k", blob, column="t.c", row_id=row) == "seed"


def test_whitespace_around_an_environment_key_is_ignored() -> None:
    ring = Keyring.from_env({ENV_VAR: f" a: {_GOOD} ,b:{generate_key()}\t"})
    assert ring is not None and ring.key_ids == ("a", "b")
    with pytest.raises(ValidationError) as caught:
        Keyring.from_env({ENV_VAR: f"a:{_GOOD[:10]} {_GOOD[10:]}"})
    assert caught.value.field == "encryption_keys"


@given(st.binary(max_size=40))
def test_short_or_forged_blobs_do_not_authenticate(blob: bytes) -> None:
    ring = Keyring({"k": _GOOD})
    with pytest.raises(EncryptionKeyError, match="does not authenticate"):
        ring.decrypt("k", blob, column="t.c", row_id=uuid.uuid4())


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 11, 12, 27])
def test_truncated_ciphertexts_do_not_authenticate(cut: int) -> None:
    ring = Keyring({"k": _GOOD})
    row = uuid.uuid4()
    _, blob = ring.encrypt("secret", column="t.c", row_id=row)
    with pytest.raises(EncryptionKeyError, match="does not authenticate"):
        ring.decrypt("k", blob[:cut], column="t.c", row_id=row)

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
    with pytest.raises(ValidationError, match="entries 1 and 3 have the same key id"):
        Keyring.from_env({ENV_VAR: f"k:{generate_key()},j:{generate_key()},k:{generate_key()}"})


def _shown(exc: BaseException) -> str:
    """Everything an error shows when printed or logged: its message, its repr, and the same
    for every exception it is chained to."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return " ".join(parts)


def _key_forms(key: str | bytes) -> list[str]:
    """The text forms a key could be printed in (itself, its bytes' repr, hex, base64)."""
    raw = key if isinstance(key, bytes) else base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
    forms = [raw.hex(), repr(raw)[2:-1], base64.b64encode(raw).decode()[:40]]
    forms.append(key if isinstance(key, str) else base64.urlsafe_b64encode(key).decode()[:40])
    if isinstance(key, str):
        forms.append(key.rstrip("="))
    return forms


_SWAPPED = generate_key()
_SWAPPED_STD = base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.mark.parametrize(
    "make",
    [
        # KEY:KID instead of KID:KEY in the environment, with and without the padding.
        lambda: Keyring.from_env({ENV_VAR: f"{_SWAPPED}:2026-01"}),
        lambda: Keyring.from_env({ENV_VAR: f"{_SWAPPED.rstrip('=')}:2026-01"}),
        lambda: Keyring.from_env({ENV_VAR: f"2025-12:{generate_key()},{_SWAPPED}:2026-01"}),
        # The same entry twice, written the wrong way round.
        lambda: Keyring.from_env({ENV_VAR: f"{_SWAPPED}:a,{_SWAPPED}:b"}),
        # {key: kid} instead of {kid: key}; a standard-base64 key; raw bytes as the id.
        lambda: Keyring({_SWAPPED: "2026-01"}),
        lambda: Keyring({"2025-12": generate_key(), _SWAPPED_STD: "2026-01"}),
        lambda: Keyring({base64.urlsafe_b64decode(_SWAPPED): b"2026-01"}),  # type: ignore[dict-item]
        lambda: Keyring({base64.urlsafe_b64decode(_SWAPPED): _SWAPPED}),  # type: ignore[dict-item]
    ],
)
def test_a_key_written_as_a_key_id_never_appears_in_the_error(make: object) -> None:
    """Key id and key swapped (``KEY:KID``, ``{key: kid}``, raw key bytes as the id): the
    error names the entry by position and shows no form of the key, in its message, its repr
    or the exceptions it is chained to."""
    with pytest.raises(ValidationError) as caught:
        make()  # type: ignore[operator]
    shown = _shown(caught.value)
    assert "entr" in str(caught.value)  # "entry 2: ..." or "entries 1 and 2 ..."
    for form in _key_forms(_SWAPPED) + _key_forms(_SWAPPED_STD):
        assert form not in shown, (form, shown)


def test_a_bytes_key_id_is_refused_without_being_printed() -> None:
    raw = secrets.token_bytes(32)
    with pytest.raises(ValidationError) as caught:
        Keyring({raw: generate_key()})  # type: ignore[dict-item]
    assert str(caught.value) == "encryption_keys: entry 1: the key id must be a string, not bytes"
    for form in _key_forms(raw):
        assert form not in _shown(caught.value)


@pytest.mark.parametrize(
    "key_id",
    [
        "2026-01",
        "k",
        "prod.eu-west-1/v2",
        "x" * 42,
        "x" * 44,
        "a" * 64,
        "é",
        "2026-01=" * 8,
    ],
)
def test_ordinary_key_ids_are_accepted(key_id: str) -> None:
    ring = Keyring({key_id: generate_key()})
    assert ring.key_ids == (key_id,)
    env = Keyring.from_env({ENV_VAR: f"{key_id}:{generate_key()}"})
    assert env is not None and env.key_ids == (key_id,)


@pytest.mark.parametrize(
    "key_id",
    [
        "customer-data-encryption-key-2026-rotation1",
        "projects/acme/locations/global/keyRings/k1a",
        generate_key(),
    ],
)
def test_a_key_shaped_id_may_name_an_older_key_only(key_id: str) -> None:
    """The encrypting key's id is stored in clear beside every new secret, so it must not be
    shaped like a key (an old key pasted as the new key's id would sit beside the rows it
    decrypts). An older, decrypt-only key may keep such an id, and it is never shown."""
    with pytest.raises(ValidationError) as caught:
        Keyring({"2026-01": generate_key(), key_id: generate_key()})
    assert str(caught.value).startswith("encryption_keys: entry 2: the key id of the encrypting")
    assert key_id not in str(caught.value)
    older = Keyring({key_id: generate_key(), "2026-01": generate_key()})
    assert older.key_ids == (key_id, "2026-01")
    assert key_id not in repr(older)
    with pytest.raises(EncryptionKeyError) as unreadable:
        older.decrypt(key_id, b"x" * 40, column="twofa_devices.secret", row_id=uuid.uuid4())
    assert key_id not in str(unreadable.value)
    with pytest.raises(EncryptionKeyError) as unknown:
        older.decrypt(key_id + "x", b"x" * 40, column="c", row_id=uuid.uuid4())
    assert "not configured" in str(unknown.value)


@pytest.mark.parametrize("key_id", ["", "a" * 65, "a:b", "a,b"])
def test_malformed_key_ids_are_named_by_position(key_id: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Keyring({"first": generate_key(), key_id: generate_key()})
    assert caught.value.field == "encryption_keys"
    assert str(caught.value).startswith("encryption_keys: entry 2: the key id ")
    if key_id:
        assert key_id not in str(caught.value)


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
    assert str(caught.value) == (
        "encryption_keys: entry 1: the key must be 32 bytes or their urlsafe base64"
    )


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

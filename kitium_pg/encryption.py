"""Encryption at rest for reversible secrets (2FA secrets, SSO client secrets and signing keys,
OAuth provider tokens), with AES-256-GCM from the ``cryptography`` package.

Each ciphertext is stored as ``nonce (12 bytes) || ciphertext+tag`` in a ``bytea`` column, with
the id of the key that made it in a text column beside it, so keys can rotate: the last key
configured encrypts, every configured key decrypts, and ``rotate_keys`` re-encrypts old rows.
The associated data binds a ciphertext to its table, column and row id, so a value copied onto
another row or column fails to decrypt instead of being accepted.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._validate import plain
from .errors import EncryptionKeyError, ValidationError

__all__ = ["ENV_VAR", "Keyring", "generate_key"]

ENV_VAR: Final = "KITIUM_PG_ENCRYPTION_KEYS"
_NONCE: Final = 12
_TAG: Final = 16


def generate_key() -> str:
    """A new random 256-bit key as urlsafe base64 (for ``encryption_keys`` or the env var)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


# 32 bytes in urlsafe base64: 43 characters, then the one padding character generate_key
# writes (optional, so keys copied without it still work).
_B64_KEY: Final = re.compile(r"[A-Za-z0-9_-]{43}=?")
_KEY_MESSAGE: Final = "the key must be 32 bytes or their urlsafe base64"


# A key id shaped like a key (32 bytes of base64, urlsafe or standard, with or without its
# padding) is almost certainly a key written where its id belongs ("KEY:KID", {key: kid}).
_KEY_SHAPED: Final = re.compile(r"[A-Za-z0-9_+/-]{43}=?")
_KEY_ID_MAX: Final = 64
_SWAPPED: Final = "the key id looks like a key: are the key id and the key swapped?"


def _key_id_problem(key_id: object, *, new: bool = False) -> str | None:
    """Why ``key_id`` cannot name a key, or ``None`` when it can. The answer never quotes the
    key id: a rejected one may be a key that was put in its place. A ``new`` id (``kitium-pg
    gen-key --key-id``) must also not be shaped like a key; a configured one may be, since
    values are stored under it (and a swapped entry fails on its key, which is then no key)."""
    if not isinstance(key_id, str):
        return f"the key id must be a string, not {type(key_id).__name__}"
    if not 0 < len(key_id) <= _KEY_ID_MAX:
        return f"the key id must be 1 to {_KEY_ID_MAX} characters long"
    if set(key_id) & set(":,"):
        return "the key id must not contain ':' or ','"
    if new and _KEY_SHAPED.fullmatch(key_id):
        return _SWAPPED
    return None


def shown_key_id(key_id: object, *, quoted: bool = True) -> str:
    """How a key id appears in a message or the CLI's output: as itself (``repr`` when
    ``quoted``), unless it may be a key."""
    if isinstance(key_id, str) and not _KEY_SHAPED.fullmatch(key_id):
        return repr(key_id) if quoted else key_id
    return "<an id shaped like a key, not shown>"


def _key_bytes(entry: int, key: object) -> bytes:
    """The 32 key bytes of ``key``: 32 raw ``bytes``, or their urlsafe base64 as ``str`` or
    ASCII ``bytes``. Anything else raises ``ValidationError("encryption_keys", ...)``, whose
    message names the key by its position ``entry`` (1-based), never by its id or its value."""
    if isinstance(key, bytes) and len(key) == 32:
        return key
    if isinstance(key, bytes):
        # Tested, not caught: a UnicodeDecodeError would carry the whole key (its .object) on
        # the ValidationError's __context__, for any error reporter that walks the chain.
        if not key.isascii():
            raise ValidationError("encryption_keys", f"entry {entry}: {_KEY_MESSAGE}")
        key = key.decode("ascii")
    # The pattern, not b64decode, decides: the decoder skips characters outside the alphabet,
    # so "!!!!" + key would decode to the key itself.
    if not isinstance(key, str) or not _B64_KEY.fullmatch(key):
        raise ValidationError("encryption_keys", f"entry {entry}: {_KEY_MESSAGE}")
    return base64.urlsafe_b64decode(key[:43] + "=")


class Keyring:
    """The configured encryption keys, in order; the last one encrypts.

    ``Keyring({"2026-01": key})``; keys are 32 raw bytes or their urlsafe base64. Key ids are
    short names: strings of at most 64 characters, without ``:`` or ``,``; the encrypting
    (last) key's id, stored in clear beside every new secret, must also not be shaped like a
    key (43 base64 characters), which older keys' ids may be, so that values stored under them
    stay readable. The key material never appears in ``repr`` or error messages: a key id and
    its key written the wrong way round fail on the key, errors name the entry, not the id, and
    an id shaped like a key is never shown. A malformed key id or key (wrong type or length,
    non-ASCII bytes, any character outside the urlsafe base64 alphabet) raises
    ``ValidationError("encryption_keys", ...)``, which names the entry by its position
    (``entry 2``), never by its key id, since a rejected key id may be a key.
    """

    def __init__(self, keys: Mapping[str, bytes | str]) -> None:
        if not isinstance(keys, Mapping) or not keys:
            raise ValidationError("encryption_keys", "must map at least one key id to a key")
        self._keys: dict[str, AESGCM] = {}
        entries: dict[str, int] = {}
        for entry, (given_id, key) in enumerate(keys.items(), start=1):
            # Checked and kept as its characters: a subclass may answer len() or set() for others.
            key_id = plain(given_id) if isinstance(given_id, str) else given_id
            problem = _key_id_problem(key_id)
            if problem is not None:
                raise ValidationError("encryption_keys", f"entry {entry}: {problem}")
            if key_id in entries:
                # Two entries one id (a mapping whose items() repeat it, or a str subclass
                # equal to no other id): one key would replace the other and strand its values.
                raise ValidationError(
                    "encryption_keys", f"entries {entries[key_id]} and {entry} have the same key id"
                )
            entries[key_id] = entry
            try:
                key_bytes = _key_bytes(entry, key)
            except ValidationError:
                if not _KEY_SHAPED.fullmatch(key_id):
                    raise
                raise ValidationError(
                    "encryption_keys", f"entry {entry}: {_KEY_MESSAGE}; {_SWAPPED}"
                ) from None
            self._keys[key_id] = AESGCM(key_bytes)
        self.current_key_id: str = list(self._keys)[-1]
        if _KEY_SHAPED.fullmatch(self.current_key_id):
            # The encrypting key's id is stored in clear beside every new secret: an id that
            # may be a key (an old key pasted as the new one's id) must not be. Older keys may
            # keep such ids, so that values stored under them stay readable.
            raise ValidationError(
                "encryption_keys",
                f"entry {len(self._keys)}: the key id of the encrypting (last) key looks like a"
                " key: are the key id and the key swapped?",
            )

    def __repr__(self) -> str:
        ids = ", ".join(shown_key_id(key_id) for key_id in self._keys)
        return f"Keyring(key_ids=[{ids}], current={shown_key_id(self.current_key_id)})"

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every configured key id, oldest first."""
        return tuple(self._keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring described by ``KITIUM_PG_ENCRYPTION_KEYS`` (``kid1:base64key,kid2:…``),
        or ``None`` when it is unset."""
        spec = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
        if not spec:
            return None
        keys: dict[str, str] = {}
        entries: dict[str, int] = {}  # key id -> its entry's position, from 1
        for entry, item in enumerate(spec.split(","), start=1):
            key_id, sep, key = item.strip().partition(":")
            if not sep:
                raise ValidationError(ENV_VAR, "must look like kid1:base64key,kid2:base64key")
            if key_id in keys:
                # A repeated id would silently replace the older key and strand its values. The
                # id is not quoted: with "KEY:KID" entries it would be the key itself.
                raise ValidationError(
                    ENV_VAR, f"entries {entries[key_id]} and {entry} have the same key id"
                )
            entries[key_id] = entry
            # Whitespace around a key is formatting (e.g. "kid: key"); inside one it is an error.
            keys[key_id] = key.strip()
        return cls(keys)

    @staticmethod
    def _aad(column: str, row_id: uuid.UUID) -> bytes:
        return f"kitium-pg:{column}:{row_id}".encode()

    def encrypt(self, plaintext: str, *, column: str, row_id: uuid.UUID) -> tuple[str, bytes]:
        """(key id, nonce || ciphertext) of ``plaintext`` for ``column`` (``table.column``) of
        row ``row_id``."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._keys[self.current_key_id].encrypt(
            nonce, plaintext.encode("utf-8"), self._aad(column, row_id)
        )
        return self.current_key_id, nonce + sealed

    def decrypt(self, key_id: str, blob: bytes, *, column: str, row_id: uuid.UUID) -> str:
        """The plaintext of ``blob``. Raises ``EncryptionKeyError`` when ``key_id`` is not
        configured or the value does not authenticate (wrong key, tampered or moved value)."""
        cipher = self._keys.get(key_id)
        shown = shown_key_id(key_id)
        if cipher is None:
            raise EncryptionKeyError(
                f"{column}: value of row {row_id} is encrypted with key {shown}, which is"
                " not configured"
            )
        # AESGCM raises ValueError (not InvalidTag) for a nonce under 8 bytes.
        if len(blob) < _NONCE + _TAG:
            raise EncryptionKeyError(
                f"{column}: value of row {row_id} (key {shown}) does not authenticate"
            )
        try:
            plain = cipher.decrypt(blob[:_NONCE], blob[_NONCE:], self._aad(column, row_id))
        except InvalidTag:
            raise EncryptionKeyError(
                f"{column}: value of row {row_id} (key {shown}) does not authenticate"
            ) from None
        return plain.decode("utf-8")

# WARNING: generated from kitium_pg/_async/users.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Users, password hashes and OAuth links (generated from the async source)."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .. import _validate as v
from .._base import UNSET, Consistency, Retry, Unset, metadata_patch_arg, new_id
from ..errors import ConflictError, NotFoundError
from ..records import OAuthTokens, User
from .core import Core


class Users(Core):
    """User methods of the sync adapter."""

    def create_user(
        self,
        *,
        email: str | None = None,
        email_verified_at: dt.datetime | None = None,
        name: str | None = None,
        picture: str | None = None,
        plan: str = "free",
        entitlements: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        password_hash: str | None = None,
    ) -> User:
        """Create a user and return it.

        ``email_verified_at`` (timezone-aware) records an address proven already, e.g. one an
        OAuth provider vouches for; it needs an ``email``. Raises ``ConflictError`` when another
        user has the same email in any letter case, and ``ValidationError`` for bad input.
        Retried on transient failures: the id is generated before the first attempt, so a retry
        after a lost acknowledgement returns the same row.
        """
        params = {
            "id": new_id(),
            "email": v.opt_email("email", email),
            "email_verified_at": v.opt_timestamp("email_verified_at", email_verified_at),
            "name": v.opt_text("name", name),
            "picture": v.opt_text("picture", picture, max_len=v.URL),
            "plan": v.text("plan", plan),
            "entitlements": v.strings("entitlements", entitlements),
            "metadata": v.json_text("metadata", metadata),
            "password_hash": v.opt_text("password_hash", password_hash, max_len=v.HASH),
        }
        user = self._written("create_user", params, User, retry=Retry.SAFE)
        return user

    def get_user(self, id: uuid.UUID | str, *, consistency: Consistency = "replica") -> User | None:
        """The user with this id, or ``None`` (also for a malformed id)."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        user_id = v.parse_uuid(id)
        if user_id is None:
            return None
        return self._one(
            "get_user",
            {"id": user_id},
            User,
            retry=Retry.SAFE,
            replica=replica,
        )

    def get_user_by_email(self, email: str, *, consistency: Consistency = "replica") -> User | None:
        """The user with this email in any letter case, or ``None``."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        key = v.lookup_email(email)
        if key is None:
            return None
        return self._one(
            "get_user_by_email",
            {"email": key},
            User,
            retry=Retry.SAFE,
            replica=replica,
        )

    def get_user_by_oauth(
        self, provider: str, sub: str, *, consistency: Consistency = "replica"
    ) -> User | None:
        """The user linked to OAuth identity (``provider``, ``sub``), or ``None``. Raises
        ``ValidationError`` for a ``provider`` or ``sub`` that ``link_oauth_account`` would
        refuse (not a string, empty, too long, with a NUL): no identity can be stored under it,
        and an empty value is more likely a caller's bug than a lookup."""
        params = {"provider": v.text("provider", provider), "subject": v.text("sub", sub)}
        return self._one(
            "get_user_by_oauth",
            params,
            User,
            retry=Retry.SAFE,
            replica=self._use_replica(consistency),
        )

    def update_user(
        self,
        id: uuid.UUID | str,
        *,
        email: str | Unset | None = UNSET,
        email_verified_at: dt.datetime | Unset | None = UNSET,
        name: str | Unset | None = UNSET,
        picture: str | Unset | None = UNSET,
        plan: str | Unset = UNSET,
        entitlements: Iterable[str] | Unset = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
    ) -> User:
        """Change the given fields of a user and return it (fields left out stay as they are).

        A new ``email`` (not the same address in another letter case) is unverified: its
        ``email_verified_at`` becomes ``None`` unless a new time is given in the same call (a
        trigger does it, for any writer). The time must differ from the stored one: the trigger
        cannot tell the stored time given again from the time left alone, and clears it then
        too. ``email_verified_at`` alone marks whatever address the row has when the statement
        runs: to record a proof of a given address, use ``mark_user_email_verified``, which
        checks it is still the user's.

        ``metadata`` replaces the whole object; ``metadata_patch`` edits it in the same statement
        (RFC 7396 JSON Merge Patch: its keys are set, nested objects merged, a ``None`` value
        removes its key), so concurrent patches of different keys all survive. Raises
        ``ValidationError`` naming ``metadata_patch`` when both are given, ``NotFoundError`` when
        there is no such user, ``ConflictError`` for an email another user has. Setting values
        and applying a merge patch are idempotent, so transient failures are retried.
        """
        params: dict[str, Any] = {"id": v.uuid_arg("id", id)}
        checks: dict[str, Any] = {
            "email": (email, lambda x: v.opt_email("email", x)),
            "email_verified_at": (
                email_verified_at,
                lambda x: v.opt_timestamp("email_verified_at", x),
            ),
            "name": (name, lambda x: v.opt_text("name", x)),
            "picture": (picture, lambda x: v.opt_text("picture", x, max_len=v.URL)),
            "plan": (plan, lambda x: v.text("plan", x)),
            "entitlements": (entitlements, lambda x: v.strings("entitlements", x)),
            "metadata": (metadata, lambda x: v.json_text("metadata", x)),
        }
        for field, (value, check) in checks.items():
            given = value is not UNSET
            params[f"set_{field}"] = given
            params[field] = check(value) if given else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        user = self._one("update_user", params, User, retry=Retry.SAFE)
        if user is None:
            raise NotFoundError(f"update_user: no user {params['id']}")
        return user

    def mark_user_email_verified(self, user_id: uuid.UUID | str, email: str) -> User | None:
        """Record that the user proved control of ``email`` (e.g. consumed the verification
        token sent there) and return the user; ``None``, changing nothing, when there is no
        such user or ``email`` is not the user's address any more (compared ignoring the case of
        ASCII letters only, as the trigger that clears the proof on a change of address does:
        ``É`` and ``é`` differ): an address changed since the token was sent is not marked
        verified. One guarded UPDATE, so it
        holds against a concurrent email change. Verifying again keeps the first time. Never
        raises for a malformed id or address (``None``). Retried on transient failures (it is
        idempotent)."""
        parsed = v.parse_uuid(user_id)
        key = v.lookup_email(email)
        if parsed is None or key is None:
            return None
        params = {"id": parsed, "email": key}
        return self._one("mark_user_email_verified", params, User, retry=Retry.SAFE)

    def delete_user(self, id: uuid.UUID | str) -> bool:
        """Delete a user with everything that belongs to it; ``True`` if a row was deleted.
        Idempotent: deleting a missing user returns ``False``. Retried on transient failures: a
        retry after a lost acknowledgement may report ``False`` for a user the first attempt
        deleted. The audit events naming the user stay (``delete_principal_events`` erases
        them)."""
        return self._delete_by_id("delete_user", id)

    def set_password_hash(self, user_id: uuid.UUID | str, password_hash: str | None) -> None:
        """Store (or clear, with ``None``) a user's password hash. Pass a hash from a password
        hashing function (argon2id, scrypt…), never a password. Raises ``NotFoundError``."""
        params = {
            "id": v.uuid_arg("user_id", user_id),
            "password_hash": v.opt_text("password_hash", password_hash, max_len=v.HASH),
        }
        if self._value("set_password_hash", params, retry=Retry.SAFE) is None:
            raise NotFoundError(f"set_password_hash: no user {params['id']}")

    def get_password_hash(self, user_id: uuid.UUID | str) -> str | None:
        """The user's password hash, or ``None`` (no hash, no such user, malformed id)."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return None
        row = self._run("get_password_hash", {"id": parsed}, retry=Retry.SAFE)
        return None if row is None else row[0]

    def link_oauth_account(
        self,
        user_id: uuid.UUID | str,
        provider: str,
        *,
        sub: str,
        email: str | None = None,
        name: str | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        token_expires_at: dt.datetime | None = None,
    ) -> User:
        """Link OAuth identity (``provider``, ``sub``) to a user and return the user.

        Provider tokens (``access_token``, ``refresh_token``) are stored encrypted (AES-256-GCM,
        ``EncryptionKeyError`` when no key is configured) and read back with
        ``get_oauth_tokens``. Linking the same identity to the same user again refreshes
        ``email`` and ``name``, and the tokens when new ones are given: both tokens together
        (they share one key id), so passing only ``access_token`` clears the stored refresh
        token. Raises ``ConflictError`` when the identity belongs to another user or the user
        already has a different identity at this provider, and ``NotFoundError`` when there is
        no user. The adapter's own retry after a lost acknowledgement recognises the write of
        its first attempt (by a version drawn before it, among the link's last 8 writes) and
        leaves the link as it is: an email, a name or tokens stored since stay.
        """
        params: dict[str, Any] = {
            "id": new_id(),
            "user_id": v.uuid_arg("user_id", user_id),
            "provider": v.text("provider", provider),
            "subject": v.text("sub", sub),
            "email": v.opt_text("email", email, max_len=v.EMAIL),
            "name": v.opt_text("name", name),
            "token_expires_at": v.opt_timestamp("token_expires_at", token_expires_at),
            "tokens_version": new_tokens_version(),
        }
        access = v.opt_text("access_token", access_token, max_len=v.LONG * 2)
        refresh = v.opt_text("refresh_token", refresh_token, max_len=v.LONG * 2)
        row_id = _oauth_row(params["user_id"], params["provider"])
        key_id = None
        access_blob = refresh_blob = None
        if access is not None or refresh is not None:
            key_id, access_blob = self._encrypt("oauth_accounts.access_token", row_id, access)
            refresh_key, refresh_blob = self._encrypt(
                "oauth_accounts.refresh_token", row_id, refresh
            )
            key_id = key_id or refresh_key
        params.update(
            access_token_ciphertext=access_blob,
            refresh_token_ciphertext=refresh_blob,
            tokens_key_id=key_id,
        )
        user = self._one("link_oauth_account", params, User, retry=Retry.SAFE)
        if user is None:
            raise ConflictError(
                f"link_oauth_account: the {v.shown(params['provider'])} identity is linked to"
                " another user"
            )
        return user

    def unlink_oauth_account(self, user_id: uuid.UUID | str, provider: str) -> bool:
        """Remove a user's link to ``provider``; ``True`` if there was one. Retried on transient
        failures (a retry after a lost acknowledgement may report ``False`` for a link the
        first attempt removed)."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return False
        params = {"user_id": parsed, "provider": v.text("provider", provider)}
        return self._exec("unlink_oauth_account", params, retry=Retry.SAFE) > 0

    def get_oauth_tokens(self, user_id: uuid.UUID | str, provider: str) -> OAuthTokens | None:
        """The decrypted provider tokens of a user's link to ``provider``, or ``None`` when there
        is no link. Raises ``EncryptionKeyError`` when their key is not configured."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return None
        provider = v.text("provider", provider)
        row = self._run(
            "get_oauth_tokens", {"user_id": parsed, "provider": provider}, retry=Retry.SAFE
        )
        return None if row is None else self._oauth_tokens(parsed, provider, row)

    def claim_oauth_refresh(
        self, user_id: uuid.UUID | str, provider: str, *, lease_seconds: int = 30
    ) -> OAuthTokens | None:
        """Take the lease on refreshing a user's tokens at ``provider`` for ``lease_seconds``
        (1 to 3600) and return the decrypted tokens with their ``version``; ``None`` when
        another worker holds an unexpired lease, or there is no link (``get_oauth_tokens``
        tells them apart).

        One guarded UPDATE: of any number of workers claiming at once, exactly one gets the
        tokens, so one calls the provider, which matters for providers that revoke the grant
        when a replaced refresh token is used again. The holder stores the result with
        ``update_oauth_tokens(..., if_version=tokens.version)``, which ends the lease (so does
        ``link_oauth_account`` with tokens). A holder that fails lets the lease run out: the
        next claim after ``lease_seconds`` (on the database server's clock) gets it. The
        others read the tokens again until the version moves or the lease runs out. The
        adapter's own retry after a lost acknowledgement recognises its own lease (by a
        number drawn before the first attempt) and returns the tokens. Raises
        ``ValidationError`` for bad input and on a transaction's view (naming ``transaction``:
        the other workers must see a lease when it is taken, and their claims would wait for
        the transaction instead of returning ``None``), and ``EncryptionKeyError`` when the
        tokens' key is not configured (the lease is then held until it runs out)."""
        self._outside_transaction("claim_oauth_refresh", "the other workers must see the lease")
        parsed = v.uuid_arg("user_id", user_id)
        provider = v.text("provider", provider)
        seconds = v.integer("lease_seconds", lease_seconds, minimum=1, maximum=3600)
        params = {
            "user_id": parsed,
            "provider": provider,
            "lease_seconds": seconds,
            "holder": new_tokens_version(),
        }
        row = self._run("claim_oauth_refresh", params, retry=Retry.SAFE)
        return None if row is None else self._oauth_tokens(parsed, provider, row)

    def _oauth_tokens(self, user_id: uuid.UUID, provider: str, row: tuple[Any, ...]) -> OAuthTokens:
        """The ``OAuthTokens`` of a row (access and refresh ciphertexts, key id, expiry,
        version) of the link of ``user_id`` at ``provider``."""
        access_blob, refresh_blob, key_id, expires_at, version = row
        row_id = _oauth_row(user_id, provider)
        return OAuthTokens(
            access_token=self._decrypt("oauth_accounts.access_token", row_id, key_id, access_blob),
            refresh_token=self._decrypt(
                "oauth_accounts.refresh_token", row_id, key_id, refresh_blob
            ),
            expires_at=expires_at,
            version=version,
        )

    def update_oauth_tokens(
        self,
        user_id: uuid.UUID | str,
        provider: str,
        *,
        access_token: str,
        refresh_token: str | None,
        token_expires_at: dt.datetime | None = None,
        if_version: int | None = None,
    ) -> OAuthTokens | None:
        """Store refreshed provider tokens on a user's link to ``provider`` and return them
        with their new ``version``; ``None`` when there is no link, or when ``if_version`` (a
        ``version`` read from ``get_oauth_tokens``) is given and the link's tokens are no longer
        that version (another refresh, or a re-link, wrote first: read the tokens again rather
        than call the provider with a replaced refresh token).

        Both tokens are replaced together (they share one key id): pass the refresh token the
        provider returned, or the one you refreshed with when it returned none; so is the
        expiry (``token_expires_at=None`` stores "unknown"). Encrypted like
        ``link_oauth_account``'s (``EncryptionKeyError`` without a key). One guarded UPDATE: of
        two refreshes of one link with the same ``if_version`` exactly one is stored. The
        adapter's own retry after a lost acknowledgement recognises its write by its version
        (drawn before the first attempt) among the link's last 8 and returns it without
        writing again, so tokens another worker stored in between stay; when the call raises
        ``UnavailableError`` instead, the write may have happened: read the tokens again.
        """
        parsed = v.uuid_arg("user_id", user_id)
        provider = v.text("provider", provider)
        access = v.text("access_token", access_token, max_len=v.LONG * 2)
        refresh = v.opt_text("refresh_token", refresh_token, max_len=v.LONG * 2)
        expires_at = v.opt_timestamp("token_expires_at", token_expires_at)
        if if_version is not None:
            if_version = v.integer("if_version", if_version, maximum=v.INT8_MAX)
        row_id = _oauth_row(parsed, provider)
        key_id, access_blob = self._encrypt("oauth_accounts.access_token", row_id, access)
        _, refresh_blob = self._encrypt("oauth_accounts.refresh_token", row_id, refresh)
        params = {
            "user_id": parsed,
            "provider": provider,
            "access_token_ciphertext": access_blob,
            "refresh_token_ciphertext": refresh_blob,
            "tokens_key_id": key_id,
            "token_expires_at": expires_at,
            "if_version": if_version,
            "tokens_version": new_tokens_version(),
        }
        row = self._run("update_oauth_tokens", params, retry=Retry.SAFE)
        if row is None:
            return None
        return OAuthTokens(
            access_token=access, refresh_token=refresh, expires_at=expires_at, version=row[0]
        )


def new_tokens_version() -> int:
    """A new version for a write of OAuth tokens (or a refresh lease's holder): random in
    [1, 2^63), so versions never repeat for a link (a stale ``if_version`` read before an
    unlink and re-link cannot match the new link's), and a retry of the same write can
    recognise it."""
    return secrets.randbelow(v.INT8_MAX) + 1


def _oauth_row(user_id: uuid.UUID, provider: str) -> uuid.UUID:
    """The id OAuth token ciphertexts are bound to: a link is unique per (user, provider), and
    its row id changes nothing when the same identity is linked again."""
    return uuid.uuid5(user_id, provider)

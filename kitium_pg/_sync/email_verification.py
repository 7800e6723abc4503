# WARNING: generated from kitium_pg/_async/email_verification.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Email verification token methods (generated from the async source)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from .. import _validate as v
from .._base import Retry, new_id
from ..errors import ConflictError, NotFoundError, ValidationError
from ..records import EmailVerificationToken
from .core import Core

MIN_CODE_HASH = 16
"""Shortest ``code_hash`` accepted (mirrors email_verification_tokens__code_hash_check)."""


def _consume_outcome(*, consumed: bool, **fields: Any) -> tuple[bool, EmailVerificationToken]:
    # Row factory of mark_email_verification_token_as_used: did this call win, and the token.
    return consumed, EmailVerificationToken(**fields)


class EmailVerification(Core):
    """Email verification token methods of the sync adapter."""

    def create_email_verification_token(
        self,
        *,
        email: str,
        code_hash: str,
        type: str,
        expires_at: dt.datetime,
        user_id: uuid.UUID | str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> EmailVerificationToken:
        """Store a token and return it. Only ``code_hash`` is stored: pass a digest of the code
        (HMAC-SHA-256, argon2id…), never the code itself.

        ``type`` is a machine name (``"email_verification"``, ``"password_reset"``…);
        ``expires_at`` must be timezone-aware. Raises ``ValidationError`` for bad input and
        ``NotFoundError`` when ``user_id`` is not a user. Retried on transient failures: the id
        is generated before the first attempt, so a retry returns the same row.
        """
        code_hash = v.text("code_hash", code_hash, max_len=v.HASH)
        if len(code_hash) < MIN_CODE_HASH:
            raise ValidationError(
                "code_hash", f"must be at least {MIN_CODE_HASH} characters (a digest, not a code)"
            )
        params = {
            "id": new_id(),
            "email": v.email("email", email),
            "code_hash": code_hash,
            "type": v.identifier("type", type),
            "user_id": v.opt_uuid_arg("user_id", user_id),
            "metadata": v.json_text("metadata", metadata),
            "expires_at": v.timestamp("expires_at", expires_at),
        }
        token = self._written(
            "create_email_verification_token", params, EmailVerificationToken, retry=Retry.SAFE
        )
        return token

    def get_email_verification_tokens(
        self, email: str, type: str | None = None
    ) -> list[EmailVerificationToken]:
        """The tokens of ``email`` in any letter case, newest first, used and expired ones
        included; only those of ``type`` when given. Empty for a malformed email."""
        key = v.lookup_email(email)
        if key is None:
            return []
        if type is None:
            return self._many(
                "get_email_verification_tokens",
                {"email": key},
                EmailVerificationToken,
                retry=Retry.SAFE,
            )
        params = {"email": key, "type": v.identifier("type", type)}
        return self._many(
            "get_email_verification_tokens_of_type",
            params,
            EmailVerificationToken,
            retry=Retry.SAFE,
        )

    def revoke_email_verification_tokens(self, email: str, type: str | None = None) -> int:
        """Mark every unused, unexpired token of ``email`` (any letter case) as used, only those
        of ``type`` when given, so that none of them can be consumed any more; returns how many
        were revoked (0 for a malformed email). For "a new link revokes the earlier ones": call
        it before creating the new token. One statement: a token created by another call after
        it is not revoked. Raises ``ValidationError`` for a malformed ``type``. Retried on
        transient failures (revoking twice leaves the same state; a retry after a lost
        acknowledgement may report a lower count)."""
        checked_type = v.opt_identifier("type", type)
        key = v.lookup_email(email)
        if key is None:
            return 0
        params = {"email": key, "type": checked_type}
        return self._exec("revoke_email_verification_tokens", params, retry=Retry.SAFE)

    def get_email_verification_token_by_id(
        self, id: uuid.UUID | str
    ) -> EmailVerificationToken | None:
        """The token with this id (used or expired alike), or ``None`` (also for a malformed
        id)."""
        token_id = v.parse_uuid(id)
        if token_id is None:
            return None
        return self._one(
            "get_email_verification_token_by_id",
            {"id": token_id},
            EmailVerificationToken,
            retry=Retry.SAFE,
        )

    def mark_email_verification_token_as_used(self, id: uuid.UUID | str) -> EmailVerificationToken:
        """Consume a token once and return it with ``used_at`` set.

        One guarded statement: of any number of concurrent callers exactly one wins; the others
        get ``ConflictError`` (as does any call for a token already used or expired).
        ``NotFoundError`` when there is no such token. Retried on transient failures: each call
        draws a consumer id before the first attempt and the statement records it, so a retry
        after a lost acknowledgement recognises its own win instead of reporting a conflict.
        """
        params = {"id": v.uuid_arg("id", id), "consumer": uuid.uuid4()}
        outcome: tuple[bool, EmailVerificationToken] | None = self._run(
            "mark_email_verification_token_as_used",
            params,
            retry=Retry.SAFE,
            make=_consume_outcome,
        )
        if outcome is None:
            raise NotFoundError(f"mark_email_verification_token_as_used: no token {params['id']}")
        consumed, token = outcome
        if not consumed:
            raise ConflictError(
                f"mark_email_verification_token_as_used: token {params['id']} is already used"
                " or expired",
                code="token_not_consumable",
            )
        return token

    def delete_expired_email_verification_tokens(
        self, *, batch_size: int = 1000, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete the expired tokens (with their attempt counters), ``batch_size`` rows per
        statement; returns how many were deleted. Rows another transaction holds locked at that
        moment are skipped and left for the next run. Idempotent and retried per batch (a
        batch retried after a lost acknowledgement is not counted)."""
        return self._delete_in_batches(
            "delete_expired_email_verification_tokens",
            {},
            batch_size=batch_size,
            progress=progress,
            resume=("after", "after_id"),
        )

    def get_email_verification_token_attempts(self, token_id: uuid.UUID | str) -> int:
        """How many attempts were counted against a token's address: its own and those of the
        other unexpired tokens of the same email (any letter case) and type, as
        ``increment_email_verification_token_attempts`` returns them (0 when none, or for an
        unknown or malformed id)."""
        parsed = v.parse_uuid(token_id)
        if parsed is None:
            return 0
        attempts = self._value(
            "get_email_verification_token_attempts", {"token_id": parsed}, retry=Retry.SAFE
        )
        return 0 if attempts is None else int(attempts)

    def increment_email_verification_token_attempts(self, token_id: uuid.UUID | str) -> int:
        """Count one attempt for a token and return the attempts counted against its address:
        this token's new count plus those of the other unexpired tokens of the same email (any
        letter case) and type. Compare it with your cap: a new token (a resend) does not give
        a new budget, which comes back as the address's tokens expire. Atomic: concurrent calls
        at one address wait for each other, and none loses or misses another's. Raises
        ``NotFoundError`` for an unknown token, and ``ValidationError`` (field
        ``transaction``) on a transaction's view: a transaction that
        rolls back (say, after a wrong code) would undo the count and make the guess free. Never
        retried by the adapter: after a lost acknowledgement a retry would count twice."""
        self._outside_transaction(
            "increment_email_verification_token_attempts", "a rollback would undo the count"
        )
        params = {"token_id": v.uuid_arg("token_id", token_id)}
        attempts = self._value(
            "increment_email_verification_token_attempts", params, retry=Retry.NEVER
        )
        return int(attempts)

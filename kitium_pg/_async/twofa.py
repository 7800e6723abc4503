"""Two-factor devices, backup codes and challenges (async source; the sync copy is generated)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from .. import _validate as v
from .._base import UNSET, Retry, Unset, metadata_patch_arg, new_id
from ..errors import EncryptionKeyError, NotFoundError, ValidationError, saved_but_unreadable
from ..records import BackupCode, TwoFactorAttempt, TwoFactorDevice, TwoFactorSession
from .core import AsyncCore

SECRET_COLUMN: Final = "twofa_devices.secret"  # noqa: S105 - a column name, not a secret
"""Encryption context (associated data) of device secrets."""

DEVICE_METHODS: Final = ("totp", "sms", "email")
CHALLENGE_METHODS: Final = ("totp", "sms", "email", "backup_code")
MIN_CODE_HASH: Final = 16
"""Shortest ``code_hash`` accepted (mirrors the code_hash CHECKs of the 2FA tables)."""
MAX_BACKUP_CODES: Final = 100
PHONE: Final = 32
"""Longest ``phone_number`` (mirrors twofa_devices__phone_number_check)."""
INT8_MAX: Final = 2**63 - 1


def _code_hash(field: str, value: object) -> str:
    # A digest of a code: refuse anything short enough to be the code itself.
    text = v.text(field, value, max_len=v.HASH)
    if len(text) < MIN_CODE_HASH:
        raise ValidationError(
            field, f"must be at least {MIN_CODE_HASH} characters (a digest, not a code)"
        )
    return text


# Attempt counting commits on its own: inside a caller's transaction that rolls back, the
# count and the device's charge would go with it, and the guess would be free.
_COUNTS_ALONE = "a rollback would undo the count and the throttle"


class AsyncTwoFactor(AsyncCore):
    """Two-factor device, backup code and challenge methods of the async adapter."""

    # -- devices -----------------------------------------------------------------------------

    def _device(
        self, *, secret_ciphertext: bytes | None, secret_key_id: str | None, **fields: Any
    ) -> TwoFactorDevice:
        # Row factory of the device queries: decrypts the secret (EncryptionKeyError when its
        # key is not configured or the ciphertext does not authenticate for this row).
        secret = self._decrypt(SECRET_COLUMN, fields["id"], secret_key_id, secret_ciphertext)
        return TwoFactorDevice(secret=secret, **fields)

    async def create_two_factor_device(
        self,
        *,
        user_id: uuid.UUID | str,
        method: str,
        name: str | None = None,
        verified: bool = False,
        phone_number: str | None = None,
        secret: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TwoFactorDevice:
        """Register a second factor (``method`` is ``"totp"``, ``"sms"`` or ``"email"``) and
        return it.

        ``secret`` (a TOTP seed) is stored only as AES-256-GCM ciphertext bound to the new
        row: ``EncryptionKeyError`` (before anything is written) when no encryption key is
        configured. Raises ``ValidationError`` for bad input and ``NotFoundError`` when
        ``user_id`` is not a user. Retried on transient failures: the id is generated (and the
        secret encrypted) before the first attempt, so a retry returns the same row.
        """
        device_id = new_id()
        params: dict[str, Any] = {
            "id": device_id,
            "user_id": v.uuid_arg("user_id", user_id),
            "method": v.choice("method", method, DEVICE_METHODS),
            "name": v.opt_text("name", name),
            "verified": v.expect_type("verified", verified, bool),
            "phone_number": v.opt_text("phone_number", phone_number, max_len=PHONE),
            "metadata": v.json_text("metadata", metadata),
        }
        key_id, ciphertext = self._encrypt(
            SECRET_COLUMN, device_id, v.opt_text("secret", secret, max_len=v.LONG)
        )
        params["secret_key_id"] = key_id
        params["secret_ciphertext"] = ciphertext
        device: TwoFactorDevice = await self._written(
            "create_two_factor_device", params, self._device, retry=Retry.SAFE
        )
        return device

    async def get_two_factor_device(self, id: uuid.UUID | str) -> TwoFactorDevice | None:
        """The device with this id (secret decrypted), or ``None`` (also for a malformed id)."""
        device_id = v.parse_uuid(id)
        if device_id is None:
            return None
        device: TwoFactorDevice | None = await self._run(
            "get_two_factor_device",
            {"id": device_id},
            retry=Retry.SAFE,
            make=self._device,
        )
        return device

    async def list_two_factor_devices(self, user_id: uuid.UUID | str) -> list[TwoFactorDevice]:
        """The devices of a user, oldest first (secrets decrypted); empty for an unknown or
        malformed id."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return []
        devices: list[TwoFactorDevice] = await self._run(
            "list_two_factor_devices",
            {"user_id": parsed},
            retry=Retry.SAFE,
            make=self._device,
        )
        return devices

    async def update_two_factor_device(
        self,
        id: uuid.UUID | str,
        *,
        name: str | Unset | None = UNSET,
        verified: bool | Unset = UNSET,
        phone_number: str | Unset | None = UNSET,
        secret: str | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
        last_used_at: dt.datetime | Unset | None = UNSET,
    ) -> TwoFactorDevice:
        """Change the given fields of a device and return it (fields left out stay as they
        are; ``secret=None`` removes the secret, a new one is encrypted like on create).

        Raises ``NotFoundError`` when there is no such device, and ``EncryptionKeyError``:
        before anything is written for a new secret without a configured key, or after the
        change is saved when the device's stored secret cannot be decrypted for the returned
        record (the message says which). ``metadata`` replaces the whole object;
        ``metadata_patch`` edits it in the same statement (RFC 7396 JSON Merge Patch: its keys
        are set, nested objects merged, a ``None`` value removes its key), so concurrent patches
        of different keys all survive; giving both is a ``ValidationError`` naming
        ``metadata_patch``. Setting values and applying a merge patch are idempotent, so
        transient failures are retried.
        """
        device_id = v.uuid_arg("id", id)
        params: dict[str, Any] = {"id": device_id}
        checks: dict[str, Any] = {
            "name": (name, lambda x: v.opt_text("name", x)),
            "verified": (verified, lambda x: v.expect_type("verified", x, bool)),
            "phone_number": (phone_number, lambda x: v.opt_text("phone_number", x, max_len=PHONE)),
            "metadata": (metadata, lambda x: v.json_text("metadata", x)),
            "last_used_at": (last_used_at, lambda x: v.opt_timestamp("last_used_at", x)),
        }
        for field, (value, check) in checks.items():
            given = value is not UNSET
            params[f"set_{field}"] = given
            params[field] = check(value) if given else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        params["set_secret"] = secret is not UNSET
        key_id, ciphertext = None, None
        if not isinstance(secret, Unset):
            key_id, ciphertext = self._encrypt(
                SECRET_COLUMN, device_id, v.opt_text("secret", secret, max_len=v.LONG)
            )
        params["secret_key_id"] = key_id
        params["secret_ciphertext"] = ciphertext
        try:
            device: TwoFactorDevice | None = await self._run(
                "update_two_factor_device", params, retry=Retry.SAFE, make=self._device
            )
        except EncryptionKeyError as exc:
            raise saved_but_unreadable("update_two_factor_device", exc) from exc
        if device is None:
            raise NotFoundError(f"update_two_factor_device: no device {device_id}")
        return device

    async def delete_two_factor_device(self, id: uuid.UUID | str) -> bool:
        """Delete a device with its pending challenges; ``True`` if a row was deleted.
        Idempotent: deleting a missing device returns ``False``. Retried on transient failures:
        a retry after a lost acknowledgement may report ``False`` for a device the first attempt
        deleted."""
        return await self._delete_by_id("delete_two_factor_device", id)

    async def record_totp_step(self, device_id: uuid.UUID | str, step: int) -> bool:
        """TOTP replay guard (RFC 6238 section 5.2): accept time step ``step`` for a device only
        when it is newer than the last accepted one, recording it (and ``last_used_at``). An
        accepted step is a right code: the same statement resets the device's throttle
        (``throttle_failures`` 0, ``throttled_until`` ``None``).

        ``True`` for the accepted step; ``False`` for a step already accepted or older, or an
        unknown device. One guarded statement: of concurrent calls with the same step exactly
        one gets ``True``. It does not look at the throttle: check the code only after
        ``count_two_factor_attempt`` (or ``increment_two_factor_attempts``) let the attempt
        through. Never retried by the adapter: after a lost acknowledgement a retry would find
        its own step recorded and report a replay.
        """
        params = {
            "id": v.uuid_arg("device_id", device_id),
            "step": v.integer("step", step, maximum=INT8_MAX),
        }
        return await self._value("record_totp_step", params, retry=Retry.NEVER) is not None

    # -- backup codes ------------------------------------------------------------------------

    async def create_backup_codes(
        self, user_id: uuid.UUID | str, code_hashes: Iterable[str]
    ) -> list[BackupCode]:
        """Replace a user's backup codes with ``code_hashes`` and return the new codes, in the
        order given. Pass digests of the codes (HMAC-SHA-256, argon2id…), never the codes.

        One statement (the ``replace_backup_codes`` function) locks the user, deletes the old
        codes (used or not) and inserts the new ones: no moment exists with both sets or
        neither, and of two concurrent replacements exactly one set survives. Raises
        ``ValidationError`` for bad or repeated digests and ``NotFoundError`` when ``user_id``
        is not a user (an empty ``code_hashes`` just removes the codes). Retried on transient
        failures: the ids are generated before the first attempt, so a retry rewrites the same
        set.
        """
        hashes = v.strings("code_hashes", code_hashes, max_items=MAX_BACKUP_CODES, max_len=v.HASH)
        hashes = [_code_hash(f"code_hashes[{i}]", h) for i, h in enumerate(hashes)]
        if len(set(hashes)) != len(hashes):
            raise ValidationError("code_hashes", "must not repeat a digest")
        params = {
            "user_id": v.uuid_arg("user_id", user_id),
            "ids": [new_id() for _ in hashes],  # time-ordered: the query returns them in order
            "code_hashes": hashes,
        }
        return await self._many("create_backup_codes", params, BackupCode, retry=Retry.SAFE)

    async def get_backup_codes(self, user_id: uuid.UUID | str) -> list[BackupCode]:
        """A user's backup codes, used ones included, in creation order; empty for an unknown
        or malformed id."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return []
        return await self._many(
            "get_backup_codes", {"user_id": parsed}, BackupCode, retry=Retry.SAFE
        )

    async def mark_backup_code_used(self, code_id: uuid.UUID | str) -> bool:
        """Consume a backup code by id: ``True`` for the one call that consumed it, ``False``
        when it was already used or does not exist.

        One guarded statement: of any number of concurrent callers exactly one gets ``True``.
        Retried on transient failures: each call draws a consumer id before the first attempt
        and the statement records it, so a retry after a lost acknowledgement still wins.
        """
        params = {"id": v.uuid_arg("code_id", code_id), "consumer": uuid.uuid4()}
        return await self._value("mark_backup_code_used", params, retry=Retry.SAFE) is not None

    async def consume_backup_code(
        self, user_id: uuid.UUID | str, code_hash: str
    ) -> BackupCode | None:
        """Find a user's unused backup code with this digest and consume it, in one guarded
        statement; returns the code (``used_at`` set), or ``None`` when the user has no unused
        code with this digest.

        Of concurrent callers with the same digest exactly one gets the code. Retried on
        transient failures: each call draws a consumer id before the first attempt, so a retry
        after a lost acknowledgement still gets the code it consumed.
        """
        params = {
            "user_id": v.uuid_arg("user_id", user_id),
            "code_hash": _code_hash("code_hash", code_hash),
            "consumer": uuid.uuid4(),
        }
        return await self._one("consume_backup_code", params, BackupCode, retry=Retry.SAFE)

    # -- challenges --------------------------------------------------------------------------

    async def create_two_factor_session(
        self,
        *,
        user_id: uuid.UUID | str,
        session_id: uuid.UUID | str,
        device_id: uuid.UUID | str,
        method: str,
        expires_at: dt.datetime,
        code_hash: str | None = None,
        max_attempts: int = 5,
    ) -> TwoFactorSession:
        """Open a 2FA challenge for login session ``session_id`` and return it.

        ``method`` is ``"totp"``, ``"sms"``, ``"email"`` or ``"backup_code"``; ``code_hash`` is
        a digest of the code sent (never the code), refused for ``"backup_code"`` (the
        application checks a backup code with ``consume_backup_code``, and its attempts never
        charge the device); ``expires_at`` must be timezone-aware;
        ``max_attempts`` is 1 to 100. Raises ``ValidationError`` for bad input and
        ``NotFoundError`` when the user or device does not exist, the device is not the user's
        (``twofa_sessions__device_owner_fkey``), or ``session_id`` is not one of the user's
        unexpired sessions. The challenge lives only as long as that session: once it expires
        or is deleted (``delete_session``, ``delete_user_sessions``), the challenge can no
        longer be counted, verified or completed; its row goes when it expires itself
        (``delete_expired_two_factor_sessions``). Retried on transient failures: the id is
        generated before the first attempt, so a retry returns the same row.
        """
        params = {
            "id": new_id(),
            "user_id": v.uuid_arg("user_id", user_id),
            "session_id": v.uuid_arg("session_id", session_id),
            "device_id": v.uuid_arg("device_id", device_id),
            "method": v.choice("method", method, CHALLENGE_METHODS),
            "code_hash": None if code_hash is None else _code_hash("code_hash", code_hash),
            "max_attempts": v.integer("max_attempts", max_attempts, minimum=1, maximum=100),
            "expires_at": v.timestamp("expires_at", expires_at),
        }
        if params["method"] == "backup_code" and params["code_hash"] is not None:
            # verify_two_factor_session would compare it and charge the device for a miss,
            # which backup-code attempts never do (found in review).
            raise ValidationError(
                "code_hash",
                "a backup_code challenge takes none: check the code with consume_backup_code"
                " and count it with count_two_factor_attempt",
            )
        challenge = await self._written(
            "create_two_factor_session",
            params,
            TwoFactorSession,
            retry=Retry.SAFE,
            refused=f"no session {params['session_id']} of user {params['user_id']}",
        )
        return challenge

    async def get_two_factor_session(self, id: uuid.UUID | str) -> TwoFactorSession | None:
        """The challenge with this id (completed or expired alike), or ``None`` (also for a
        malformed id)."""
        challenge_id = v.parse_uuid(id)
        if challenge_id is None:
            return None
        return await self._one(
            "get_two_factor_session", {"id": challenge_id}, TwoFactorSession, retry=Retry.SAFE
        )

    async def complete_two_factor_session(self, id: uuid.UUID | str) -> bool:
        """Mark a challenge completed: ``True`` for the one call that completed it, ``False``
        when it is already completed, expired, unknown, or its login session has ended or
        expired. Expiry and the login session are judged once the call holds the challenge,
        not before it waited for another transaction's lock on it.

        One guarded statement: of any number of concurrent callers exactly one gets ``True``.
        Retried on transient failures: each call draws a consumer id before the first attempt
        and the statement records it, so a retry after a lost acknowledgement still wins (also
        one that waited for its own first attempt, and one whose login session ended since).
        """
        params = {"id": v.uuid_arg("id", id), "consumer": uuid.uuid4()}
        return (
            await self._value("complete_two_factor_session", params, retry=Retry.SAFE) is not None
        )

    async def verify_two_factor_session(
        self, id: uuid.UUID | str, code_hash: str
    ) -> TwoFactorAttempt | None:
        """Count one attempt on a code challenge and complete it when ``code_hash`` (the digest
        of the code presented, made as for ``create_two_factor_session``) matches the stored one;
        the same call throttles the challenge's device (see ``TwoFactorDevice``): a wrong
        code bumps it, a right one resets it.

        Returns the attempt: ``verified`` is ``True`` for the one call that completed the
        challenge; after a wrong code ``throttled_until`` is when the device accepts the next
        one. While the device is throttled (by wrong codes on this or any other of its
        challenges), the attempt is refused: ``throttled`` is ``True``, the code was not
        compared, the attempt not counted, and ``throttled_until`` says when to try again.
        ``None`` when no attempt can be made: the limit is reached, or the challenge is
        completed, expired, unknown or was created without a ``code_hash`` (TOTP and
        backup-code challenges are checked by the application: ``count_two_factor_attempt``).
        One guarded call: an attempt past the limit or while the device is throttled is
        never compared, of concurrent callers with the right code exactly one is verified, and
        of concurrent codes the first compared and found wrong throttles the device, so the
        others, while that throttle lasts, are refused as throttled, not compared. Expiry and
        the throttle are judged once the call holds the device and the challenge, not before it
        waited for them. Raises
        ``ValidationError`` for a malformed id or digest, and (naming ``transaction``) on a
        transaction's view: the attempt and the throttle commit on their own, or a rollback
        would make the guess free. Never retried by the adapter: after a lost acknowledgement
        a retry would count twice.
        """
        self._outside_transaction("verify_two_factor_session", _COUNTS_ALONE)
        params = {"id": v.uuid_arg("id", id), "code_hash": _code_hash("code_hash", code_hash)}
        return await self._one(
            "verify_two_factor_session", params, TwoFactorAttempt, retry=Retry.NEVER
        )

    async def count_two_factor_attempt(
        self, id: uuid.UUID | str, *, backup_code: bool = False
    ) -> TwoFactorAttempt | None:
        """Count one attempt on an open challenge whose answer the application checks itself (a
        TOTP code; a backup code with ``backup_code=True``), before checking it.

        Returns the attempt (``verified`` is always ``False``: check the answer next; for a
        right TOTP code call ``record_totp_step``, which also clears the throttle, then
        ``complete_two_factor_session``). A code attempt let through is charged to the device
        as a wrong code in the same call, before it is checked, and a right code clears the
        charge: ``throttled_until`` is the throttle that charge set, when the next code is
        taken if this one is wrong. So however many guesses arrive at once, on however many of
        the device's challenges, one is let through per throttle window and the others wait for
        it and are refused. While the device is throttled a code attempt is refused:
        ``throttled`` is ``True``, nothing is counted, ``throttled_until`` says when to try
        again, and the code must not be checked. A backup-code attempt (``backup_code=True``,
        or any attempt on a challenge opened with ``method="backup_code"``) is counted against
        ``max_attempts`` whatever the throttle and charges nothing (``throttled_until`` is
        ``None``): backup codes are not the device's, and are the way back in while someone
        keeps the device throttled. ``None`` when no attempt can be made: the limit is reached,
        or the challenge is completed, expired or unknown.

        One guarded call: concurrent calls never pass the limit. Of concurrent backup-code
        attempts on a challenge with ``max_attempts=n`` exactly ``n`` are counted (1 to n); of
        concurrent code attempts, one per throttle window. Raises ``ValidationError`` for a
        malformed id or a ``backup_code`` that is not a bool, and on a transaction's view
        (naming ``transaction``): the count and the charge commit on their own, or a rollback
        after checking the code would undo them and make the guess free. Never retried by the
        adapter: after a lost acknowledgement a retry would count twice.
        """
        self._outside_transaction("count_two_factor_attempt", _COUNTS_ALONE)
        params = {
            "id": v.uuid_arg("id", id),
            "backup_code": v.expect_type("backup_code", backup_code, bool),
        }
        return await self._one(
            "count_two_factor_attempt", params, TwoFactorAttempt, retry=Retry.NEVER
        )

    async def increment_two_factor_attempts(self, id: uuid.UUID | str) -> int | None:
        """Count one code attempt on an open challenge and return the new count, or ``None``
        when the attempt is refused: the limit (``max_attempts``) is reached, the challenge is
        completed, expired or unknown, or its device is throttled. The older form of
        ``count_two_factor_attempt`` (code attempts only), which it is: an attempt let through
        is charged to the device until a right code clears it, and that method also says why
        an attempt was refused and when to try again.

        On a challenge opened with ``method="backup_code"`` every attempt is a backup-code
        attempt, as ``count_two_factor_attempt`` counts it: counted whatever the device's
        throttle, and charged to nothing but the challenge's ``max_attempts`` (found in review:
        this said otherwise).

        Atomic, and never past the limit: of concurrent calls one per throttle window gets a
        count (each charges the device), the rest ``None``. Raises ``ValidationError`` on a
        transaction's view (naming ``transaction``), as ``count_two_factor_attempt`` does.
        Never retried by the adapter: after a lost acknowledgement a retry would count twice.
        """
        self._outside_transaction("increment_two_factor_attempts", _COUNTS_ALONE)
        params = {"id": v.uuid_arg("id", id), "backup_code": False}
        attempt = await self._one(
            "count_two_factor_attempt", params, TwoFactorAttempt, retry=Retry.NEVER
        )
        return None if attempt is None or attempt.throttled else attempt.attempt_count

    async def delete_two_factor_session(self, id: uuid.UUID | str) -> bool:
        """Delete a challenge (completed, expired or not); ``True`` if a row was deleted. Use it
        to cancel a challenge, e.g. when a new code is sent ("resend code"), so that the old
        code can no longer be verified.

        Idempotent: deleting a missing challenge (or a malformed id) returns ``False``. Retried
        on transient failures, since deleting twice leaves the same state (a retry after a lost
        acknowledgement may report ``False`` for a challenge the first attempt deleted).
        """
        return await self._delete_by_id("delete_two_factor_session", id)

    async def delete_expired_two_factor_sessions(
        self, *, batch_size: int = 1000, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete the challenges whose ``expires_at`` has passed (by the database clock),
        completed or not, and return how many were deleted.

        A challenge that has not expired stays, even when completed (a retried
        ``complete_two_factor_session`` must still find it), or when its session was deleted
        (it can no longer be used, and goes once it expires). Runs one short statement per
        ``batch_size`` rows (earliest expiry first) so locks stay brief on a large table. Rows
        another transaction holds locked at that moment (another cleaner, a verification under
        way) are skipped rather than waited for, and left for the next run. Each batch is
        retried on transient failures, because deleting expired rows is idempotent (a batch
        retried after a lost acknowledgement is not counted). Raises ``ValidationError`` when
        ``batch_size`` is not between 1 and 100000.
        """
        return await self._delete_in_batches(
            "delete_expired_two_factor_sessions",
            {},
            batch_size=batch_size,
            progress=progress,
            resume=("after", "after_id"),
        )

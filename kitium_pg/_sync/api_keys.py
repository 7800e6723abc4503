# WARNING: generated from kitium_pg/_async/api_keys.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""API key methods (generated from the async source)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from .. import _validate as v
from .._base import UNSET, Consistency, Retry, Unset, metadata_patch_arg, new_id
from ..errors import NotFoundError, ValidationError
from ..records import ApiKey
from .core import Core

# Keep in step with the CHECK constraints of kitium_auth.api_keys.
_HASH_MIN: Final = 16
_PREFIX_MAX: Final = 64
_LAST_FOUR: Final = 4


def _hash(value: object) -> str:
    value = v.text("hash", value, max_len=v.HASH)
    if len(value) < _HASH_MIN:
        raise ValidationError("hash", f"must be at least {_HASH_MIN} characters (a digest)")
    return value


def _prefix(value: object) -> str:
    return v.text("prefix", value, max_len=_PREFIX_MAX)


def _last_four(value: object) -> str:
    value = v.text("last_four", value, max_len=_LAST_FOUR)
    if len(value) != _LAST_FOUR:
        raise ValidationError("last_four", f"must be exactly {_LAST_FOUR} characters")
    return value


class ApiKeys(Core):
    """API key methods of the sync adapter.

    The caller generates the key, shows it once, and passes only its digest as ``hash`` (for
    example ``sha256`` of the key, or an HMAC with a server-side pepper); the key itself never
    reaches this adapter. An expired key never authenticates: ``get_api_key_by_hash`` and
    ``get_api_keys_by_prefix_and_last_four`` skip it, while ``get_api_key`` and
    ``list_api_keys`` still show it until it is deleted.
    """

    def create_api_key(
        self,
        *,
        principal_id: uuid.UUID | str,
        hash: str,
        prefix: str,
        last_four: str,
        scopes: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        expires_at: dt.datetime | None = None,
    ) -> ApiKey:
        """Store a key's digest for a user and return the key record.

        ``hash`` is 16 to 512 characters, ``prefix`` 1 to 64, ``last_four`` exactly 4;
        ``expires_at`` (timezone-aware) or ``None`` for a key that does not expire. Raises
        ``ConflictError`` when another key has the same hash, ``NotFoundError`` when the
        principal does not exist, and ``ValidationError`` for bad input. Retried on transient
        failures: the id is generated before the first attempt, so a retry after a lost
        acknowledgement returns the same row (not a duplicate-hash conflict).
        """
        params = {
            "id": new_id(),
            "principal_id": v.uuid_arg("principal_id", principal_id),
            "hash": _hash(hash),
            "prefix": _prefix(prefix),
            "last_four": _last_four(last_four),
            "scopes": v.strings("scopes", scopes),
            "metadata": v.json_text("metadata", metadata),
            "expires_at": v.opt_timestamp("expires_at", expires_at),
        }
        key = self._written("create_api_key", params, ApiKey, retry=Retry.SAFE)
        return key

    def get_api_key(self, id: uuid.UUID | str) -> ApiKey | None:
        """The key with this id, expired or not, or ``None`` (unknown or malformed id). Check
        ``expires_at`` before trusting it; to authenticate use ``get_api_key_by_hash``."""
        key_id = v.parse_uuid(id)
        if key_id is None:
            return None
        return self._one("get_api_key", {"id": key_id}, ApiKey, retry=Retry.SAFE)

    def get_api_key_by_hash(
        self, hash: str, *, consistency: Consistency = "replica"
    ) -> ApiKey | None:
        """The unexpired key with this digest, or ``None`` (unknown, expired, or not a possible
        digest: nothing is queried then). This is the authentication lookup."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        try:
            digest = _hash(hash)
        except ValidationError:
            return None
        return self._one(
            "get_api_key_by_hash",
            {"hash": digest},
            ApiKey,
            retry=Retry.SAFE,
            replica=replica,
        )

    def get_api_keys_by_prefix_and_last_four(self, prefix: str, last_four: str) -> list[ApiKey]:
        """The unexpired keys with this prefix and last four characters, newest first (empty for
        input no key can have).

        This is the candidate lookup for schemes that cannot search by digest (a salted or slow
        hash of the key): the caller verifies the presented key against each candidate's
        ``hash``. Expired keys are left out for the same reason ``get_api_key_by_hash`` ignores
        them: an expired key must never authenticate, and filtering in SQL means no caller can
        forget the check. Use ``list_api_keys`` to show a principal's expired keys.
        """
        try:
            params = {"prefix": _prefix(prefix), "last_four": _last_four(last_four)}
        except ValidationError:
            return []
        return self._many("get_api_keys_by_prefix_and_last_four", params, ApiKey, retry=Retry.SAFE)

    def update_api_key(
        self,
        id: uuid.UUID | str,
        *,
        scopes: Iterable[str] | Unset = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
        expires_at: dt.datetime | Unset | None = UNSET,
        prefix: str | Unset = UNSET,
        last_four: str | Unset = UNSET,
    ) -> ApiKey:
        """Change the given fields of a key (expired or not) and return it; fields left out stay
        as they are, and ``expires_at=None`` makes the key non-expiring. The digest cannot change:
        rotate a key by creating a new one and deleting the old.

        ``metadata`` replaces the whole object; ``metadata_patch`` edits it in the same statement
        (RFC 7396 JSON Merge Patch: its keys are set, nested objects merged, a ``None`` value
        removes its key), so concurrent patches of different keys all survive; giving both is a
        ``ValidationError`` naming ``metadata_patch``. Raises ``NotFoundError`` when there is no
        such key. Setting values and applying a merge patch are idempotent, so transient failures
        are retried.
        """
        params: dict[str, Any] = {"id": v.uuid_arg("id", id)}
        checks: dict[str, Any] = {
            "scopes": (scopes, lambda x: v.strings("scopes", x)),
            "metadata": (metadata, lambda x: v.json_text("metadata", x)),
            "expires_at": (expires_at, lambda x: v.opt_timestamp("expires_at", x)),
            "prefix": (prefix, _prefix),
            "last_four": (last_four, _last_four),
        }
        for field, (value, check) in checks.items():
            given = value is not UNSET
            params[f"set_{field}"] = given
            params[field] = check(value) if given else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        key = self._one("update_api_key", params, ApiKey, retry=Retry.SAFE)
        if key is None:
            raise NotFoundError(f"update_api_key: no API key {params['id']}")
        return key

    def delete_api_key(self, id: uuid.UUID | str) -> bool:
        """Delete (revoke) a key; ``True`` if a row was deleted.

        Idempotent: deleting a missing key (or a malformed id) returns ``False``. Retried on
        transient failures, since deleting twice leaves the same state (a retry after a lost
        acknowledgement may report ``False`` for a key the first attempt deleted).
        """
        return self._delete_by_id("delete_api_key", id)

    def delete_user_api_keys(self, user_id: uuid.UUID | str) -> int:
        """Delete (revoke) every API key of a user, expired ones included (offboarding; the
        fastapi-users integration calls it when it deactivates a user); returns how many rows
        were deleted (0 for an unknown or malformed ``user_id``).

        Retried on transient failures, since deleting twice leaves the same state (a retry after
        a lost acknowledgement may report a lower count than the first attempt deleted).
        """
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return 0
        return self._exec("delete_user_api_keys", {"principal_id": parsed}, retry=Retry.SAFE)

    def list_api_keys(self, principal_id: uuid.UUID | str) -> list[ApiKey]:
        """All of a principal's keys, expired ones included, newest first (empty for an unknown
        or malformed id)."""
        parsed = v.parse_uuid(principal_id)
        if parsed is None:
            return []
        return self._many("list_api_keys", {"principal_id": parsed}, ApiKey, retry=Retry.SAFE)

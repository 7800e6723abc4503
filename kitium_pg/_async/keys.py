"""Re-encrypting stored secrets under the newest key (async source; the sync copy is generated).

``rotate_keys`` walks every encrypted column in batches: one read and one compare-and-swap
``unnest`` update per batch, whatever the batch size. Decryption happens here, in the client,
because the database never sees a key. Each update locks its rows in id order before writing
them (queries/keys.sql says why), so runs started at the same time wait for each other's
batches instead of deadlocking.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from .. import _validate as v
from .._base import Retry
from ..errors import ConflictError, EncryptionKeyError, PermissionDeniedError
from .core import AsyncCore

RotationProgress = Callable[[int, int], None]
_NIL = uuid.UUID(int=0)
_PASSES = 3  # walks over the secrets before giving up on values re-written under old keys

# (query finding stale values, query storing re-encrypted ones, column named in the AAD)
_SINGLE = (
    ("stale_twofa_secrets", "reencrypt_twofa_secrets", "twofa_devices.secret"),
    ("stale_sso_client_secrets", "reencrypt_sso_client_secrets", "sso_providers.client_secret"),
    ("stale_sso_signing_keys", "reencrypt_sso_signing_keys", "sso_providers.signing_key"),
)


class AsyncKeyRotation(AsyncCore):
    """Key rotation of the async adapter."""

    async def rotate_keys(
        self, *, batch_size: int = 500, progress: RotationProgress | None = None
    ) -> int:
        """Re-encrypt every secret that is not under the current (last configured) key; returns
        how many values were re-encrypted (a batch retried after a lost acknowledgement counts
        what its first attempt stored). When it returns, no stored secret is under another
        key. ``progress(done, total)`` is called after each batch.

        Safe to run while the application writes (compare-and-swap on the old key id and
        ciphertext: a value re-written meanwhile is never overwritten with its older plaintext)
        and to re-run after an interruption. A value a process still on an older keyring
        re-writes meanwhile is skipped, then taken by another pass (up to ``_PASSES``).

        Safe to run several times at once (two deploys starting it, an operator running
        ``kitium-pg rotate-keys`` twice): each batch's update locks its rows in id order, so
        concurrent runs wait for each other's batch rather than deadlock, and a value one run
        has re-encrypted fails the other's compare-and-swap. The runs share the work: each
        returns how many values it re-encrypted itself (together, every value that was stale),
        each returns only once no value is left under another key, and ``progress`` reports the
        run's own count against the total it found at the start, so it may end below that
        total.

        Raises ``EncryptionKeyError`` when no keys are configured or a value's key is missing;
        ``PermissionDeniedError`` when row-level security (the ``tenant_rls`` migration) hides
        rows from this role (run it as the schema owner); ``ConflictError`` (code
        ``stale_secrets``) when values are still under an older key after the last pass (a
        process with an older keyring keeps writing them: give every process the new keyring,
        then run it again)."""
        if self._keyring is None:
            raise EncryptionKeyError("rotate_keys needs encryption_keys (or the environment key)")
        size = v.integer("batch_size", batch_size, minimum=1, maximum=10_000)
        v.callback("progress", progress)
        if await self._value("secrets_hidden_by_row_security", {}, retry=Retry.SAFE):
            raise PermissionDeniedError(
                "rotate_keys: row-level security hides rows holding secrets from this role, so"
                " some would stay under the old key: run it as the role that applied tenant_rls"
                " (its owner_access policy shows it every row), usually the schema owner"
            )
        current = self._keyring.current_key_id
        total = int(await self._value("count_stale_secrets", {"key_id": current}, retry=Retry.SAFE))
        done = 0
        for _ in range(_PASSES):
            done = await self._rotation_pass(current, size, total, done, progress)
            left = int(
                await self._value("count_stale_secrets", {"key_id": current}, retry=Retry.SAFE)
            )
            if not left:
                return done
        raise ConflictError(
            f"rotate_keys: re-encrypted {done}, but {left} value(s) are still under an older key:"
            " a process with an older keyring wrote them meanwhile; give every process the new"
            " keyring, then run it again",
            code="stale_secrets",
        )

    async def _rotation_pass(
        self,
        current: str,
        size: int,
        total: int,
        done: int,
        progress: RotationProgress | None,
    ) -> int:
        """One keyset walk over every encrypted column; returns ``done`` plus the values it
        re-encrypted."""
        # Keyset over ids: a row is visited once per run even if a writer still using an old
        # keyring re-encrypts it under an old key meanwhile (the next run picks it up).
        for stale, update, column in _SINGLE:
            after = _NIL
            while rows := await self._run(
                stale, {"key_id": current, "after": after, "batch_size": size}, retry=Retry.SAFE
            ):
                after = rows[-1][0]
                blobs = []
                for row_id, key_id, blob in rows:
                    plain = self._decrypt(column, row_id, key_id, blob)
                    blobs.append(self._encrypt(column, row_id, plain)[1])
                done += await self._value(
                    update,
                    {
                        "ids": [r[0] for r in rows],
                        "old_key_ids": [r[1] for r in rows],
                        "old_ciphertexts": [r[2] for r in rows],
                        "key_id": current,
                        "ciphertexts": blobs,
                    },
                    retry=Retry.SAFE,
                )
                if progress:
                    progress(done, total)
        after = _NIL
        while rows := await self._run(
            "stale_oauth_tokens",
            {"key_id": current, "after": after, "batch_size": size},
            retry=Retry.SAFE,
        ):
            after = rows[-1][0]
            params: dict[str, Any] = {
                "ids": [],
                "old_key_ids": [],
                "old_access_ciphertexts": [],
                "old_refresh_ciphertexts": [],
                "key_id": current,
                "access_ciphertexts": [],
                "refresh_ciphertexts": [],
            }
            for row_id, user_id, provider, key_id, access, refresh in rows:
                aad_id = uuid.uuid5(user_id, provider)
                params["ids"].append(row_id)
                params["old_key_ids"].append(key_id)
                params["old_access_ciphertexts"].append(access)
                params["old_refresh_ciphertexts"].append(refresh)
                for name, blob in (("access", access), ("refresh", refresh)):
                    column = f"oauth_accounts.{name}_token"
                    plain = self._decrypt(column, aad_id, key_id, blob)
                    params[f"{name}_ciphertexts"].append(self._encrypt(column, aad_id, plain)[1])
            done += await self._value("reencrypt_oauth_tokens", params, retry=Retry.SAFE)
            if progress:
                progress(done, total)
        return done

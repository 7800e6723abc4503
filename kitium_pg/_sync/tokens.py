# WARNING: generated from kitium_pg/_async/tokens.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Bearer session tokens and API keys that kitium-pg issues and verifies (generated from the async source).

A session token is ``<session id>.<secret>`` and an API key ``<prefix>_<secret>``; both secrets
are 256 random bits (``secrets.token_urlsafe(32)``) and only their SHA-256 digests are stored. A
fast digest is right here, unlike for passwords: the secrets are random, not guessable, so a slow
hash would add latency to every request and no protection. Lookups go through an index on the
id (sessions) or the digest (API keys), then the digests are compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .. import _validate as v
from .._base import MAX_REUSE_GRACE, REUSE_GRACE, UNSET, Consistency, Retry, Unset, logger, new_id
from ..records import ApiKey, IssuedApiKey, IssuedSession, Session
from .api_keys import ApiKeys
from .sessions import NOT_A_MEMBER, Sessions, _session_insert


def _key_and_stamp_due(*, stamp_due: bool, **columns: Any) -> tuple[ApiKey, bool]:
    return ApiKey(**columns), stamp_due


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _presented(token: object) -> tuple[uuid.UUID, bytes] | None:
    """The session id and secret digest of a bearer token as issued, or ``None`` when it cannot
    be one (not text, too long, another spelling of the id, no secret, not encodable)."""
    if not isinstance(token, str) or len(token) > 200:
        return None
    session_id, _, secret = token.partition(".")
    parsed = v.parse_uuid(session_id)
    # Only the spelling the token was issued with: one token, one string (applications key
    # deny-lists, rate limits and caches on it).
    if parsed is None or str(parsed) != session_id or not secret:
        return None
    try:
        return parsed, _digest(secret)
    except UnicodeEncodeError:
        return None


def _rotation(*, reused: bool, **columns: Any) -> Session | None:
    """The rotated session, or ``None`` when the presented token was found reused (the row
    then holds no session)."""
    return None if reused else Session(**columns)


def _session_with_hash(*, token_hash: bytes, **columns: Any) -> tuple[Session, bytes]:
    return Session(**columns), bytes(token_hash)


class Tokens(Sessions, ApiKeys):
    """Token issue/verify methods of the sync adapter."""

    def issue_session_token(
        self,
        *,
        user_id: uuid.UUID | str,
        expires_at: dt.datetime,
        org_id: uuid.UUID | str | None = None,
        plan: str | None = None,
        entitlements: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> IssuedSession:
        """Create a session (same keywords as ``create_session``, ``event`` included: a sign-in
        in one statement) and return it with its bearer token. The token is shown once: only
        the SHA-256 digest of its secret is stored. Raises like ``create_session``; retry-safe
        for the same reason (ids made up front)."""
        secret = secrets.token_urlsafe(32)
        name, params = _session_insert(
            user_id,
            expires_at,
            org_id,
            plan,
            entitlements,
            metadata,
            event,
            token_hash=_digest(secret),
        )
        session = self._written(name, params, Session, retry=Retry.SAFE, refused=NOT_A_MEMBER)
        return IssuedSession(session=session, token=f"{session.id}.{secret}")

    def _issue_session_token_unless_deactivated(
        self, user_id: uuid.UUID, expires_at: dt.datetime
    ) -> IssuedSession:
        """The fastapi-users integration's login: ``issue_session_token`` for a session with no
        organization, judged under a lock that orders it with a deactivation (see the query).
        Raises ``NotFoundError`` when the user is deactivated there (``is_active`` false in its
        metadata) or gone. Retry-safe as ``issue_session_token``."""
        secret = secrets.token_urlsafe(32)
        params = {
            "id": new_id(),
            "user_id": user_id,
            "expires_at": v.timestamp("expires_at", expires_at),
            "token_hash": _digest(secret),
        }
        session = self._written(
            "create_session_unless_deactivated",
            params,
            Session,
            retry=Retry.SAFE,
            refused="the user is deactivated or does not exist",
        )
        return IssuedSession(session=session, token=f"{session.id}.{secret}")

    def validate_session_token(
        self, token: str, *, consistency: Consistency = "replica"
    ) -> Session | None:
        """The session a bearer token belongs to, or ``None`` when the token is malformed,
        unknown, expired or revoked (``delete_session``). One primary-key lookup, then a
        constant-time comparison of digests; never raises for hostile input."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        presented_token = _presented(token)
        if presented_token is None:
            return None
        parsed, presented = presented_token
        found = self._run(
            "get_session_for_token",
            {"id": parsed},
            retry=Retry.SAFE,
            make=_session_with_hash,
            replica=replica,
        )
        if found is None:
            return None
        session, stored = found
        return session if hmac.compare_digest(stored, presented) else None

    def rotate_session_token(
        self,
        token: str,
        *,
        expires_at: dt.datetime | Unset = UNSET,
        reuse_grace: dt.timedelta | None = REUSE_GRACE,
    ) -> IssuedSession | None:
        """Replace a session's bearer token with a new one and return the session with it; the
        presented token stops working. The session keeps its id, user and data; ``expires_at``
        (timezone-aware), when given, moves its expiry too (a sliding session). Rotate when the
        session's privileges change (after a second factor, a step-up, a password change),
        against session fixation: a token planted or seen before then is useless after it. To
        elevate a session, rotate first and then change it (``update_session`` by the session's
        id, a call of its own): the token from before the rotation then never holds the
        elevated session.

        Returns ``None``, changing nothing, for a token ``validate_session_token`` would not
        accept, for one another call rotated first (of two rotations of one token, exactly one
        gets a new token), and for an ``expires_at`` that has passed by the database clock (the
        new token would never validate; the presented one keeps working).

        Those guarantees (the presented token dead, the new one valid) hold for validations on
        the primary. ``validate_session_token`` reads a replica by default when ``replica_dsn``
        is configured, and a lagging replica still accepts the presented token and refuses the
        new one: validate rotated sessions with ``consistency="primary"`` (see
        docs/security.md, "Revocation and read replicas"). On the primary, requests still in
        flight with the old token fail validation.

        Reuse detection: the token this session's last rotation replaced, presented here again more
        than ``reuse_grace`` (default 10 s; ``None``: never) after that rotation (to when this call
        first presented it: a retry after a lost acknowledgement is judged as its first attempt
        was), ends the session, writes a ``session.token_reused`` auth event (principal: the user,
        no organization; data: ``session_id``, ``org_id``, ``rotated_at``), logs a warning and
        returns ``None``: two parties held the session's token, and one is not the user (RFC 9700,
        4.14.2). Within the grace the token only gets ``None``: a client that lost the answer to its
        own rotation, or a second tab rotating at the same moment, signs in again rather than ending
        everyone's session. Only the token replaced last is recognised; older ones are unknown, as a
        wrong one is.

        One statement; never raises for a hostile token (``ValidationError`` for a bad
        ``expires_at`` or ``reuse_grace``). Retried on transient failures: the new secret is
        drawn before the first attempt, and a retry after a lost acknowledgement finds the
        session already holding it. Raises ``ValidationError`` (field ``transaction``) on a
        transaction's view: an application that rolls back when it gets ``None`` would undo the
        end of a reused token's session and its event.
        """
        self._outside_transaction(
            "rotate_session_token", "a rollback would undo the end of a reused token's session"
        )
        moved = expires_at is not UNSET
        params: dict[str, Any] = {
            "set_expires_at": moved,
            "expires_at": v.timestamp("expires_at", expires_at) if moved else None,
            "reuse_grace": v.opt_duration("reuse_grace", reuse_grace, maximum=MAX_REUSE_GRACE),
        }
        presented = _presented(token)
        if presented is None:
            return None
        session_id, presented_hash = presented
        secret = secrets.token_urlsafe(32)
        params |= {
            "id": session_id,
            "presented_hash": presented_hash,
            "token_hash": _digest(secret),
            "event_id": new_id(),
            "presented_ago": dt.timedelta(0),
        }
        # No row: not a token that rotates; a row without a session: a reuse, which ended it.
        # A retry judges the reuse grace up to when the token was presented, at the first
        # attempt: judged at its own start, a retry after a lost acknowledgement ended the
        # session for a token presented within the grace (found in review).
        rows: list[Session | None] = self._run(
            "rotate_session_token",
            params,
            retry=Retry.SAFE,
            make=_rotation,
            since_first="presented_ago",
        )
        if not rows:
            return None
        [session] = rows
        if session is None:
            logger.warning(
                "kitium_pg rotate_session_token: a token rotated out of session %s more than"
                " reuse_grace ago was presented again; the session was ended",
                session_id,
                extra={"operation": "rotate_session_token", "session_id": str(session_id)},
            )
            return None
        return IssuedSession(session=session, token=f"{session.id}.{secret}")

    def issue_api_key(
        self,
        principal_id: uuid.UUID | str,
        scopes: Iterable[str] = (),
        *,
        prefix: str = "kpg",
        expires_at: dt.datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> IssuedApiKey:
        """Create an API key ``<prefix>_<secret>`` for a principal and return it with its record.
        The key is shown once: only its SHA-256 digest is stored. ``prefix`` is 1-16 characters
        of a-z, 0-9 and ``_ . : -``. Raises like ``create_api_key``."""
        prefix = v.identifier("prefix", prefix, max_len=16)
        key = f"{prefix}_{secrets.token_urlsafe(32)}"
        record = self.create_api_key(
            principal_id=principal_id,
            hash=hashlib.sha256(key.encode()).hexdigest(),
            prefix=prefix,
            last_four=key[-4:],
            scopes=scopes,
            metadata=metadata,
            expires_at=expires_at,
        )
        return IssuedApiKey(record=record, key=key)

    def verify_api_key(self, key: str, *, consistency: Consistency = "replica") -> ApiKey | None:
        """The record of an unexpired API key, or ``None`` (malformed, unknown or expired key).
        Updates ``last_used_at`` at most once a minute: in the same statement on the primary;
        with replicas, the lookup reads a replica and, when the stamp is due, a second
        statement sets it on the primary. Retry-safe: the only write sets a timestamp."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        if not isinstance(key, str) or not 0 < len(key) <= 200:
            return None
        try:
            digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        except UnicodeEncodeError:
            return None
        if replica and self._replicas:
            # A replica cannot stamp last_used_at: read there, and go to the primary only when
            # the stamp is due (at most once a minute per key).
            found = self._one(
                "get_api_key_to_verify",
                {"hash": digest},
                _key_and_stamp_due,
                retry=Retry.SAFE,
                replica=True,
            )
            if found is None:
                return None
            read, stamp_due = found
            if not stamp_due:
                return read if hmac.compare_digest(read.hash, digest) else None
        record = self._one("verify_api_key", {"hash": digest}, ApiKey, retry=Retry.SAFE)
        if record is None or not hmac.compare_digest(record.hash, digest):
            return None
        return record

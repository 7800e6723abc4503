"""Session methods (async source; the sync copy is generated)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import _validate as v
from .._base import UNSET, Consistency, Retry, Unset, metadata_patch_arg, new_id
from ..errors import NotFoundError
from ..records import Session
from .core import AsyncCore

#: Why an organization-bound session was not written (the insert's guard found no membership).
NOT_A_MEMBER = (
    "the user is not a member of the organization (or either does not exist, or is hidden from"
    " this tenant)"
)


class AsyncSessions(AsyncCore):
    """Session methods of the async adapter.

    A session whose ``expires_at`` has passed (by the database clock) is gone for every read and
    update; ``delete_expired_sessions`` removes such rows for good.
    """

    async def create_session(
        self,
        *,
        user_id: uuid.UUID | str,
        expires_at: dt.datetime,
        org_id: uuid.UUID | str | None = None,
        plan: str | None = None,
        entitlements: Iterable[str] = (),
        metadata: dict[str, Any] | None = None,
        event: Mapping[str, Any] | None = None,
    ) -> Session:
        """Create a session for a user and return it.

        ``expires_at`` must be timezone-aware. With ``event`` (a dict like an ``emit_events``
        item: ``type`` required; ``principal_id`` defaults to the user, ``data`` to ``{}``) the
        session and that audit event are written by one statement: both or neither, in one
        round trip (a sign-in). A session bound to an organization (``org_id``) needs the user's
        membership in it, and ends when the membership does (``remove_organization_member``,
        ``update_organization(members=...)``, deleting the organization). Raises
        ``NotFoundError`` when the user does not exist or, with ``org_id``, is not a member of
        that organization (nothing is written, no event either), and ``ValidationError`` for
        bad input. Retried on transient failures:
        the ids are generated before the first attempt, so a retry after a lost acknowledgement
        returns the same row and writes no second event.
        """
        name, params = _session_insert(
            user_id, expires_at, org_id, plan, entitlements, metadata, event
        )
        session = await self._written(name, params, Session, retry=Retry.SAFE, refused=NOT_A_MEMBER)
        return session

    async def get_session(
        self, id: uuid.UUID | str, *, consistency: Consistency = "replica"
    ) -> Session | None:
        """The unexpired session with this id, or ``None`` (unknown, expired or malformed id)."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        session_id = v.parse_uuid(id)
        if session_id is None:
            return None
        return await self._one(
            "get_session",
            {"id": session_id},
            Session,
            retry=Retry.SAFE,
            replica=replica,
        )

    async def update_session(
        self,
        id: uuid.UUID | str,
        *,
        org_id: uuid.UUID | str | Unset | None = UNSET,
        plan: str | Unset | None = UNSET,
        entitlements: Iterable[str] | Unset = UNSET,
        expires_at: dt.datetime | Unset = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
    ) -> Session:
        """Change the given fields of an unexpired session and return it (fields left out stay
        as they are).

        ``metadata`` replaces the whole object; ``metadata_patch`` edits it in the same statement
        (RFC 7396 JSON Merge Patch: its keys are set, nested objects merged, a ``None`` value
        removes its key), so concurrent patches of different keys all survive; giving both is a
        ``ValidationError`` naming ``metadata_patch``.

        Binding the session to an organization (``org_id``) needs the user's membership in it,
        as this caller sees it (under row-level security, through ``tenant(org_id)``);
        ``org_id=None`` unbinds it. Raises ``NotFoundError`` when there is no such membership
        (nothing changes), and when there is no such session or it has expired: an expired
        session is never revived, not even by moving ``expires_at`` forward. Setting values and
        applying a merge patch are idempotent, so transient failures are retried (a retry of a
        call that moved ``expires_at`` into the past finds the session expired and raises
        ``NotFoundError``; end a session with ``delete_session`` instead).
        """
        params: dict[str, Any] = {"id": v.uuid_arg("id", id)}
        checks: dict[str, Any] = {
            "org_id": (org_id, lambda x: v.opt_uuid_arg("org_id", x)),
            "plan": (plan, lambda x: v.opt_text("plan", x)),
            "entitlements": (entitlements, lambda x: v.strings("entitlements", x)),
            "expires_at": (expires_at, lambda x: v.timestamp("expires_at", x)),
            "metadata": (metadata, lambda x: v.json_text("metadata", x)),
        }
        for field, (value, check) in checks.items():
            given = value is not UNSET
            params[f"set_{field}"] = given
            params[field] = check(value) if given else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        # Binding to an organization takes the membership's locks first: a statement of its
        # own, so that every other update keeps a plan the server can cache.
        binds = params["set_org_id"] and params["org_id"] is not None
        name = "update_session_org" if binds else "update_session"
        session = await self._one(name, params, Session, retry=Retry.SAFE)
        if session is None:
            missing = f"no unexpired session {params['id']}"
            raise NotFoundError(
                f"update_session: {missing}" + (f", or {NOT_A_MEMBER}" if binds else "")
            )
        return session

    async def delete_session(self, id: uuid.UUID | str) -> bool:
        """Delete a session (expired or not); ``True`` if a row was deleted.

        Idempotent: deleting a missing session (or a malformed id) returns ``False``. Retried on
        transient failures, since deleting twice leaves the same state (a retry after a lost
        acknowledgement may report ``False`` for a session the first attempt deleted).
        """
        return await self._delete_by_id("delete_session", id)

    async def delete_expired_sessions(
        self, *, batch_size: int = 1000, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete the expired sessions and return how many were deleted.

        Runs one short statement per ``batch_size`` rows (earliest expiry first) so locks stay
        brief on a large table. Rows another transaction holds locked at that moment (another
        cleaner, or an open transaction updating or deleting them) are skipped rather than
        waited for, and left for the next run. Each batch is retried on transient failures,
        because deleting expired rows is idempotent (a batch retried after a lost
        acknowledgement is not counted: the count may be lower than what was deleted). Raises
        ``ValidationError`` when ``batch_size`` is not between 1 and 100000.
        """
        return await self._delete_in_batches(
            "delete_expired_sessions",
            {},
            batch_size=batch_size,
            progress=progress,
            resume=("after", "after_id"),
        )

    async def list_user_sessions(
        self,
        user_id: uuid.UUID | str,
        *,
        after: Session | None = None,
        limit: int | None = None,
    ) -> list[Session]:
        """A user's unexpired sessions, newest first (by ``created_at``, then ``id``), all of
        them, or a page with ``limit``; empty for an unknown or malformed id. For "signed-in
        devices" and "log out everywhere" screens.

        Pages: ``limit`` (1 to ``MAX_PAGE``, 1,000) is the most sessions returned, and ``after``
        is the last session of the previous page (a ``Session`` this method returned): the page
        holds the sessions strictly older than its (``created_at``, ``id``). Start with
        ``after=None``; a page shorter than ``limit`` is the last one. Pages are read by keyset,
        one backward range scan of the index ``sessions_user_id_created_at_id_idx`` (migration
        ``0030``) each, so sessions created or ended meanwhile never shift later pages: every
        session live throughout is listed once, and an ended session can still be ``after``.
        ``after`` without ``limit`` returns every older session. Raises ``ValidationError``
        naming ``limit`` (not an ``int`` in range) or ``after`` (not a ``Session``;
        ``after.created_at`` or ``after.id`` when that field is not a timezone-aware datetime
        or a UUID), before anything is sent, whatever ``user_id`` is.
        """
        return await self._listing(
            "list_user_sessions",
            "list_user_sessions_page",
            "user_id",
            user_id,
            Session,
            at="created_at",
            tie="id",
            after=after,
            limit=limit,
        )

    async def delete_user_sessions(
        self, user_id: uuid.UUID | str, *, except_session_id: uuid.UUID | str | None = None
    ) -> int:
        """Delete every session of a user, expired ones included ("log out everywhere"), or
        every one but ``except_session_id`` ("sign out other devices": the session the request
        came with stays); returns how many rows were deleted (0 for an unknown or malformed
        ``user_id``). Raises ``ValidationError`` for a malformed ``except_session_id``, rather
        than delete the session it meant to keep.

        Retried on transient failures, since deleting twice leaves the same state (a retry after
        a lost acknowledgement may report a lower count than the first attempt deleted).
        """
        keep = v.opt_uuid_arg("except_session_id", except_session_id)
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return 0
        params = {"user_id": parsed, "except_session_id": keep}
        return await self._exec("delete_user_sessions", params, retry=Retry.SAFE)


def _session_insert(
    user_id: uuid.UUID | str,
    expires_at: dt.datetime,
    org_id: uuid.UUID | str | None,
    plan: str | None,
    entitlements: Iterable[str],
    metadata: dict[str, Any] | None,
    event: Mapping[str, Any] | None,
    token_hash: bytes | None = None,
) -> tuple[str, dict[str, Any]]:
    """The query that creates a session (``create_session``, or ``create_session_with_event``
    when ``event`` is given) and its validated parameters; shared with
    ``issue_session_token``."""
    params = {
        "id": new_id(),
        "user_id": v.uuid_arg("user_id", user_id),
        "org_id": v.opt_uuid_arg("org_id", org_id),
        "plan": v.opt_text("plan", plan),
        "entitlements": v.strings("entitlements", entitlements),
        "metadata": v.json_text("metadata", metadata),
        "expires_at": v.timestamp("expires_at", expires_at),
        "token_hash": token_hash,
    }
    if event is None:
        return "create_session", params
    fields = v.event_keys("event", event, required=("type",))
    checked = v.event_fields(
        "event.",
        fields["type"],
        fields.get("principal_id", params["user_id"]),
        fields.get("data"),
        fields.get("org_id"),
        fields.get("timestamp"),
    )
    params.update({f"event_{key}": value for key, value in checked.items()}, event_id=new_id())
    return "create_session_with_event", params

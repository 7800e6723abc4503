"""Organization and membership methods (async source; the sync copy is generated)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .. import _validate as v
from .._base import UNSET, Retry, Unset, metadata_patch_arg, new_id
from ..errors import (
    ConflictError,
    InternalError,
    NotFoundError,
    SeatLimitError,
    ValidationError,
)
from ..records import Organization, OrganizationMember
from .core import AsyncCore

_MEMBER_KEYS = frozenset({"user_id", "role", "joined_at"})

MAX_MEMBERS = 10_000
"""Most members one ``create_organization`` or ``update_organization`` call may write."""


def _member_arrays(value: object) -> tuple[list[uuid.UUID], list[str]]:
    """``members`` as the parallel (user ids, roles) arrays the member queries unnest.

    Each item is an ``OrganizationMember`` (its ``joined_at`` is ignored: the database sets it)
    or a mapping with ``user_id`` and an optional ``role`` (default ``"member"``; a
    ``joined_at`` key is ignored too, so records turned into dicts can be passed back). A user
    listed twice is a ``ValidationError``, not a silent merge.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ValidationError("members", "must be a list of OrganizationMember records or dicts")
    ids: list[uuid.UUID] = []
    roles: list[str] = []
    seen: set[uuid.UUID] = set()
    for i, item in enumerate(value):
        if i >= MAX_MEMBERS:
            raise ValidationError("members", f"must have at most {MAX_MEMBERS} items")
        field = f"members[{i}]"
        if isinstance(item, OrganizationMember):
            user_id: object = item.user_id
            role: object = item.role
        elif isinstance(item, Mapping):
            v.refuse_unknown_keys(field, item, _MEMBER_KEYS)
            if "user_id" not in item:
                raise ValidationError(f"{field}.user_id", "is required")
            user_id = item["user_id"]
            role = item.get("role", "member")
        else:
            raise ValidationError(field, "must be an OrganizationMember or a dict")
        parsed = v.uuid_arg(f"{field}.user_id", user_id)
        if parsed in seen:
            raise ValidationError(f"{field}.user_id", "lists the same user twice")
        seen.add(parsed)
        ids.append(parsed)
        roles.append(v.identifier(f"{field}.role", role))
    return ids, roles


def _member_outcome(
    *, outcome: str, user_id: Any, role: Any, joined_at: Any
) -> tuple[str, OrganizationMember | None]:
    # Row factory of the guarded membership queries: what the call did, and the membership
    # (none when a seat limit refused a new member).
    if user_id is None:
        return outcome, None
    return outcome, OrganizationMember(user_id=user_id, role=role, joined_at=joined_at)


def _last_holder(name: str, org_id: uuid.UUID, role: str) -> ConflictError:
    return ConflictError(
        f"{name}: the user is the last member of organization {org_id} with role {role!r}"
        " (keep_last)",
        code="last_role_holder",
    )


class AsyncOrganizations(AsyncCore):
    """Organization and membership methods of the async adapter."""

    async def create_organization(
        self,
        *,
        name: str,
        plan: str,
        seats: int = 1,
        members: Iterable[OrganizationMember | Mapping[str, Any]] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Organization:
        """Create an organization with its members (one statement) and return it.

        ``members`` holds ``OrganizationMember`` records or dicts ``{"user_id": ..., "role":
        "member"}``. Raises ``NotFoundError`` when a member is not a user (nothing is written)
        and ``ValidationError`` for bad input. Retried on transient failures: the id is generated
        before the first attempt, so a retry after a lost acknowledgement returns the same row.
        """
        member_ids, member_roles = _member_arrays(members)
        params = {
            "id": new_id(),
            "name": v.text("name", name),
            "plan": v.text("plan", plan),
            "seats": v.integer("seats", seats),
            "metadata": v.json_text("metadata", metadata),
            "member_ids": member_ids,
            "member_roles": member_roles,
        }
        org = await self._written("create_organization", params, Organization, retry=Retry.SAFE)
        return org

    async def get_organization(self, id: uuid.UUID | str) -> Organization | None:
        """The organization with this id and its members, or ``None`` (also for a malformed
        id)."""
        org_id = v.parse_uuid(id)
        if org_id is None:
            return None
        return await self._one("get_organization", {"id": org_id}, Organization, retry=Retry.SAFE)

    async def update_organization(
        self,
        id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        plan: str | Unset = UNSET,
        seats: int | Unset = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
        members: Iterable[OrganizationMember | Mapping[str, Any]] | Unset = UNSET,
    ) -> Organization:
        """Change the given fields of an organization and return it (fields left out stay).

        ``members`` replaces the whole member set in the same statement: members listed again
        keep their ``joined_at`` and take the given role, the others are removed (with their
        roles in the organization, their sessions bound to it and their SSO sessions at its
        providers, as ``remove_organization_member`` removes them), new ones are added. The
        member set is not checked against ``seats`` nor guarded like ``keep_last``, and
        ``seats`` may be set below the member count (nobody is removed: the limit applies to
        later ``add_organization_member(..., within_seats=True)`` calls). Raises
        ``NotFoundError`` when there is no such organization or a new member is not a user
        (nothing is written then).
        ``metadata`` replaces the whole object; ``metadata_patch`` edits it in the same statement
        (RFC 7396 JSON Merge Patch: its keys are set, nested objects merged, a ``None`` value
        removes its key), so concurrent patches of different keys all survive; giving both is a
        ``ValidationError`` naming ``metadata_patch``. Setting values and applying a merge patch
        are idempotent, so transient failures are retried.
        """
        params: dict[str, Any] = {"id": v.uuid_arg("id", id)}
        checks: dict[str, Any] = {
            "name": (name, lambda x: v.text("name", x)),
            "plan": (plan, lambda x: v.text("plan", x)),
            "seats": (seats, lambda x: v.integer("seats", x)),
            "metadata": (metadata, lambda x: v.json_text("metadata", x)),
        }
        for field, (value, check) in checks.items():
            given = value is not UNSET
            params[f"set_{field}"] = given
            params[field] = check(value) if given else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        params["set_members"] = members is not UNSET
        member_ids, member_roles = _member_arrays(members) if members is not UNSET else ([], [])
        params["member_ids"] = member_ids
        params["member_roles"] = member_roles
        org = await self._one("update_organization", params, Organization, retry=Retry.SAFE)
        if org is None:
            raise NotFoundError(f"update_organization: no organization {params['id']}")
        return org

    async def delete_organization(self, id: uuid.UUID | str) -> bool:
        """Delete an organization and everything bound to it; ``True`` if a row was deleted.

        In the same statement its memberships, roles and role assignments go, its SSO providers
        with their domains, links and SSO sessions (a provider never outlives its organization
        as a shared one), and the sessions bound to it (``org_id``): such a session ends, rather
        than becoming unbound and valid for any organization. Its users stay. Idempotent:
        deleting a missing organization returns ``False``. Retried on transient failures: a
        retry after a lost acknowledgement may report ``False`` for an organization the first
        attempt deleted.
        """
        return await self._delete_by_id("delete_organization", id)

    async def add_organization_member(
        self,
        org_id: uuid.UUID | str,
        user_id: uuid.UUID | str,
        *,
        role: str = "member",
        within_seats: bool = False,
    ) -> OrganizationMember:
        """Add a user to an organization with ``role`` and return the membership.

        A user who is already a member stays as they are: the stored membership is returned
        unchanged, its role and ``joined_at`` kept (``role`` is not applied: an invitation
        accepted by an owner does not demote them; change roles with
        ``set_organization_member_role``). So the call is idempotent and retried on transient
        failures: a retry after a lost acknowledgement returns what the first attempt added.

        With ``within_seats=True`` a new member is refused with ``SeatLimitError`` (a
        ``ConflictError``, code ``seat_limit``; nothing written) when the organization already
        has ``seats`` members; an existing member is returned as usual, never refused. The
        membership changes of one organization run one after the other on its row, so
        concurrent guarded adds never take more seats than there are. Only guarded adds are
        limited: ``create_organization`` and ``update_organization(members=...)`` are not, and
        ``seats`` lowered below the member count removes nobody. The refusal is the adapter's
        answer, not a failed statement: a ``transaction()`` it happens in goes on.

        Raises ``NotFoundError`` when the organization or the user does not exist.
        """
        org = v.uuid_arg("org_id", org_id)
        params = {
            "org_id": org,
            "user_id": v.uuid_arg("user_id", user_id),
            "role": v.identifier("role", role),
            "within_seats": v.expect_type("within_seats", within_seats, bool),
        }
        result: tuple[str, OrganizationMember | None] | None = await self._run(
            "add_organization_member", params, retry=Retry.SAFE, make=_member_outcome
        )
        if result is None:  # the function returns a row for every outcome
            raise InternalError("add_organization_member: the write returned no row")
        outcome, member = result
        if outcome == "seat_limit":
            raise SeatLimitError(f"add_organization_member: organization {org} has no free seat")
        assert member is not None
        return member

    async def set_organization_member_role(
        self,
        org_id: uuid.UUID | str,
        user_id: uuid.UUID | str,
        role: str,
        *,
        keep_last: str | None = None,
    ) -> OrganizationMember:
        """Give a member another role and return the membership (``joined_at`` kept).

        ``keep_last`` names a role (``"owner"``) the organization must keep: taking it from the
        organization's last member holding it raises ``ConflictError`` (code
        ``last_role_holder``) and changes nothing (a ``transaction()`` it happens in goes on).
        The membership changes of one organization run one after the other on its row, so of
        two concurrent demotions (or removals) of its last two owners one is refused. Deleting
        a user is not guarded: it removes the user's memberships whatever their role.

        Setting the role a member already has writes nothing and always succeeds, so the call
        is idempotent and retried on transient failures. Raises ``NotFoundError`` when the user
        is not a member of the organization (or either does not exist). The member's RBAC role
        assignments (``assign_role_to_user``) are not changed.
        """
        org, user = v.uuid_arg("org_id", org_id), v.uuid_arg("user_id", user_id)
        new_role, last = v.identifier("role", role), v.opt_identifier("keep_last", keep_last)
        params = {"org_id": org, "user_id": user, "role": new_role, "keep_last": last}
        result: tuple[str, OrganizationMember | None] | None = await self._run(
            "set_organization_member_role", params, retry=Retry.SAFE, make=_member_outcome
        )
        if result is None:
            raise NotFoundError(
                f"set_organization_member_role: user {user} is not a member of organization {org}"
            )
        outcome, member = result
        if outcome == "last":
            assert last is not None
            raise _last_holder("set_organization_member_role", org, last)
        assert member is not None
        return member

    async def remove_organization_member(
        self, org_id: uuid.UUID | str, user_id: uuid.UUID | str, *, keep_last: str | None = None
    ) -> bool:
        """Remove a user from an organization; ``True`` if the user was a member.

        With the membership go, in the same statement, the roles it held there (so its
        permissions), the user's sessions bound to the organization (``org_id``): a removed
        member's login into the organization ends, and the user's SSO sessions at the
        organization's own SSO providers. The user's other sessions and SSO sessions, and their
        SSO links, stay. For a user who is not a member nothing changes (nor can a session be
        bound to an organization its user does not belong to: ``create_session`` refuses it).

        ``keep_last`` names a role (``"owner"``) the organization must keep: removing its last
        member holding it raises ``ConflictError`` (code ``last_role_holder``) and changes
        nothing (a ``transaction()`` it happens in goes on). The membership changes of one
        organization run one after the other on its row, so of two concurrent removals of its
        last two owners one is refused. A malformed id returns ``False``. Retried on transient
        failures: a retry after a lost acknowledgement may report ``False`` for a membership
        the first attempt removed."""
        last = v.opt_identifier("keep_last", keep_last)
        parsed_org, parsed_user = v.parse_uuid(org_id), v.parse_uuid(user_id)
        if parsed_org is None or parsed_user is None:
            return False
        params = {"org_id": parsed_org, "user_id": parsed_user, "keep_last": last}
        outcome = await self._value("remove_organization_member", params, retry=Retry.SAFE)
        if outcome == "last":
            assert last is not None
            raise _last_holder("remove_organization_member", parsed_org, last)
        return bool(outcome == "removed")

    async def get_organization_member(
        self, org_id: uuid.UUID | str, user_id: uuid.UUID | str
    ) -> OrganizationMember | None:
        """The user's membership of the organization (its role and when it joined), or ``None``
        (not a member, or a malformed id): the per-request membership check, one primary-key
        lookup however large the organization."""
        org, user = v.parse_uuid(org_id), v.parse_uuid(user_id)
        if org is None or user is None:
            return None
        return await self._one(
            "get_organization_member",
            {"org_id": org, "user_id": user},
            OrganizationMember,
            retry=Retry.SAFE,
        )

    async def list_organization_members(
        self,
        org_id: uuid.UUID | str,
        *,
        after: OrganizationMember | None = None,
        limit: int | None = None,
    ) -> list[OrganizationMember]:
        """The members of an organization in join order (by ``joined_at``, then ``user_id``),
        all of them, or a page with ``limit``; empty for an unknown or malformed id.

        Pages: ``limit`` (1 to ``MAX_PAGE``, 1,000) is the most members returned, and ``after``
        is the last member of the previous page (an ``OrganizationMember`` this method
        returned): the page holds the members strictly after its (``joined_at``, ``user_id``).
        Start with ``after=None``; a page shorter than ``limit`` is the last one (after a last
        page of exactly ``limit`` members the next page is empty). Pages are read by keyset,
        one index range scan each, so members added or removed meanwhile never shift later
        pages: every member there throughout is listed once (no duplicates, no gaps), and a
        member removed meanwhile can still be ``after``. The pages are read from the index
        ``organization_members_org_id_joined_at_user_id_idx`` (migration ``0024``). ``after``
        without ``limit`` returns every member after it. Raises ``ValidationError`` naming
        ``limit`` (not an ``int`` in range) or ``after`` (not an ``OrganizationMember``;
        ``after.joined_at`` or ``after.user_id`` when that field is not a timezone-aware
        datetime or a UUID), before anything is sent, whatever ``org_id`` is.
        """
        return await self._listing(
            "list_organization_members",
            "list_organization_members_page",
            "org_id",
            org_id,
            OrganizationMember,
            at="joined_at",
            after=after,
            limit=limit,
        )

    async def list_user_organizations(self, user_id: uuid.UUID | str) -> list[Organization]:
        """The organizations a user belongs to, in the order the user joined them (empty for an
        unknown or malformed id)."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return []
        return await self._many(
            "list_user_organizations", {"user_id": parsed}, Organization, retry=Retry.SAFE
        )

"""Role and permission methods (async source; the sync copy is generated)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .. import _validate as v
from .._base import (
    UNSET,
    Consistency,
    Retry,
    Unset,
    metadata_patch_arg,
    new_id,
)
from ..errors import NotFoundError, ValidationError
from ..records import Permission, Role, RoleAssignment
from .core import AsyncCore

MAX_PERMISSIONS = 1_000
"""Most permissions one role may grant."""

MAX_ROLE_IDS = 1_000
"""Most role ids one ``set_user_roles`` call may take."""

_PERMISSION_KEYS = frozenset({"name", "resource", "action", "description", "metadata"})


def _permissions_json(value: object) -> str:
    """``permissions`` as the jsonb array text stored in ``roles.permissions``.

    Each item is a ``Permission`` or a mapping with ``name`` and optional ``resource``,
    ``action``, ``description`` and ``metadata`` (other keys are refused, naming the item). Every
    stored object carries all five keys, so it reads back as the same ``Permission``. A name
    listed twice is a ``ValidationError``, not a silent merge.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ValidationError("permissions", "must be a list of Permission records or dicts")
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        if i >= MAX_PERMISSIONS:
            raise ValidationError("permissions", f"must have at most {MAX_PERMISSIONS} items")
        field = f"permissions[{i}]"
        if isinstance(item, Permission):
            fields: Mapping[str, Any] = {
                "name": item.name,
                "resource": item.resource,
                "action": item.action,
                "description": item.description,
                "metadata": item.metadata,
            }
        elif isinstance(item, Mapping):
            v.refuse_unknown_keys(field, item, _PERMISSION_KEYS)
            if "name" not in item:
                raise ValidationError(f"{field}.name", "is required")
            fields = item
        else:
            raise ValidationError(field, "must be a Permission or a dict")
        name = v.text(f"{field}.name", fields["name"])
        if name in seen:
            raise ValidationError(f"{field}.name", "lists the same permission twice")
        seen.add(name)
        metadata = fields.get("metadata")
        # Checked here so the error names the item; the whole array is serialised below.
        v.json_text(f"{field}.metadata", metadata)
        items.append(
            {
                "name": name,
                "resource": v.opt_text(f"{field}.resource", fields.get("resource")),
                "action": v.opt_text(f"{field}.action", fields.get("action")),
                "description": v.opt_text(
                    f"{field}.description", fields.get("description"), max_len=v.LONG
                ),
                "metadata": {} if metadata is None else metadata,
            }
        )
    return v.json_text("permissions", items, obj=False)


def _role_ids(value: object) -> list[uuid.UUID]:
    """``role_ids`` of ``set_user_roles`` as UUIDs, in the order given.

    A role listed twice is a ``ValidationError`` naming the second item, not a silent merge. At
    most ``MAX_ROLE_IDS + 1`` items are drawn, so an oversized or endless iterable is refused
    without being consumed.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ValidationError("role_ids", "must be a list of role ids")
    ids: list[uuid.UUID] = []
    seen: set[uuid.UUID] = set()
    for i, item in enumerate(value):
        if i >= MAX_ROLE_IDS:
            raise ValidationError("role_ids", f"must have at most {MAX_ROLE_IDS} items")
        field = f"role_ids[{i}]"
        parsed = v.uuid_arg(field, item)
        if parsed in seen:
            raise ValidationError(field, "lists the same role twice")
        seen.add(parsed)
        ids.append(parsed)
    return ids


class AsyncRbac(AsyncCore):
    """Role and permission methods of the async adapter."""

    async def create_role(
        self,
        *,
        org_id: uuid.UUID | str,
        name: str,
        description: str | None = None,
        is_system: bool = False,
        permissions: Iterable[Permission | Mapping[str, Any]] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Role:
        """Create a role of an organization and return it.

        ``permissions`` holds ``Permission`` records or dicts ``{"name": "users:read",
        "resource": ..., "action": ..., "description": ..., "metadata": {...}}`` (only ``name``
        is required; names must be distinct). Raises ``ConflictError`` when the organization
        already has a role of this name, ``NotFoundError`` when there is no such organization and
        ``ValidationError`` for bad input. Retried on transient failures: the id is generated
        before the first attempt, so a retry after a lost acknowledgement returns the same row.
        """
        params = {
            "id": new_id(),
            "org_id": v.uuid_arg("org_id", org_id),
            "name": v.text("name", name),
            "description": v.opt_text("description", description, max_len=v.LONG),
            "is_system": v.expect_type("is_system", is_system, bool),
            "permissions": _permissions_json(permissions),
            "metadata": v.json_text("metadata", metadata),
        }
        role = await self._written("create_role", params, Role, retry=Retry.SAFE)
        return role

    async def get_role(self, id: uuid.UUID | str) -> Role | None:
        """The role with this id, or ``None`` (also for a malformed id)."""
        role_id = v.parse_uuid(id)
        if role_id is None:
            return None
        return await self._one("get_role", {"id": role_id}, Role, retry=Retry.SAFE)

    async def update_role(
        self,
        id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        description: str | Unset | None = UNSET,
        permissions: Iterable[Permission | Mapping[str, Any]] | Unset = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
        is_system: bool | Unset = UNSET,
    ) -> Role:
        """Change the given fields of a role and return it (fields left out stay as they are).

        ``permissions`` replaces the whole list and ``metadata`` the whole object;
        ``metadata_patch`` edits the latter in the same statement (RFC 7396 JSON Merge Patch: its
        keys are set, nested objects merged, a ``None`` value removes its key), so concurrent
        patches of different keys all survive; giving both is a ``ValidationError`` naming
        ``metadata_patch``. Raises ``NotFoundError`` when there is no such role and
        ``ConflictError`` for a name another role of the organization has. Setting values and
        applying a merge patch are idempotent, so transient failures are retried.
        """
        params: dict[str, Any] = {"id": v.uuid_arg("id", id)}
        checks: dict[str, Any] = {
            "name": (name, lambda x: v.text("name", x)),
            "description": (description, lambda x: v.opt_text("description", x, max_len=v.LONG)),
            "permissions": (permissions, _permissions_json),
            "metadata": (metadata, lambda x: v.json_text("metadata", x)),
            "is_system": (is_system, lambda x: v.expect_type("is_system", x, bool)),
        }
        for field, (value, check) in checks.items():
            given = value is not UNSET
            params[f"set_{field}"] = given
            params[field] = check(value) if given else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        role = await self._one("update_role", params, Role, retry=Retry.SAFE)
        if role is None:
            raise NotFoundError(f"update_role: no role {params['id']}")
        return role

    async def delete_role(self, id: uuid.UUID | str) -> bool:
        """Delete a role and its assignments; ``True`` if a row was deleted. Idempotent:
        deleting a missing role returns ``False``. Retried on transient failures: a retry after
        a lost acknowledgement may report ``False`` for a role the first attempt deleted."""
        return await self._delete_by_id("delete_role", id)

    async def list_roles(self, org_id: uuid.UUID | str) -> list[Role]:
        """The roles of an organization, newest first (empty for an unknown or malformed id)."""
        parsed = v.parse_uuid(org_id)
        if parsed is None:
            return []
        return await self._many("list_roles", {"org_id": parsed}, Role, retry=Retry.SAFE)

    async def assign_role_to_user(
        self, user_id: uuid.UUID | str, role_id: uuid.UUID | str, org_id: uuid.UUID | str
    ) -> Role:
        """Give a member of an organization a role of that organization and return the role.

        Idempotent (one statement): assigning a role the user already holds changes nothing,
        and concurrent assignments of the same role leave one assignment without an error, so
        transient failures are retried. Raises ``NotFoundError`` when the user, the organization
        or the role does not exist, when the role belongs to another organization (the role
        does not exist *in* ``org_id``), and when the user is not a member of ``org_id``
        (``user_roles__member_fkey``); nothing is written then. The assignment lasts as long as
        the membership: removing the member removes it.
        """
        params = {
            "id": new_id(),
            "user_id": v.uuid_arg("user_id", user_id),
            "role_id": v.uuid_arg("role_id", role_id),
            "org_id": v.uuid_arg("org_id", org_id),
        }
        role = await self._one("assign_role_to_user", params, Role, retry=Retry.SAFE)
        if role is None:
            # No such organization (the insert wrote nothing), or the role vanished between
            # the insert's check and the read.
            raise NotFoundError(
                f"assign_role_to_user: no role {params['role_id']} in organization"
                f" {params['org_id']}"
            )
        return role

    async def revoke_role_from_user(
        self, user_id: uuid.UUID | str, role_id: uuid.UUID | str, org_id: uuid.UUID | str
    ) -> bool:
        """Take a role away from a user; ``True`` if the user held it. Idempotent, and retried
        on transient failures: a retry after a lost acknowledgement may report ``False`` for a
        role the first attempt took away."""
        parsed = [v.parse_uuid(x) for x in (user_id, role_id, org_id)]
        if None in parsed:
            return False
        params = dict(zip(("user_id", "role_id", "org_id"), parsed, strict=True))
        return await self._exec("revoke_role_from_user", params, retry=Retry.SAFE) > 0

    async def set_user_roles(
        self,
        user_id: uuid.UUID | str,
        org_id: uuid.UUID | str,
        role_ids: Iterable[uuid.UUID | str],
    ) -> list[Role]:
        """Make ``role_ids`` exactly the roles a member holds in an organization, and return
        those roles, oldest role first (the order of ``get_user_roles``, whatever the order of
        ``role_ids``).

        Roles the user already holds and that are listed again keep their assignment (and its
        ``assigned_at``), the missing ones are assigned, the others are taken away; an empty
        ``role_ids`` takes every role away. It is one statement (the ``set_user_roles``
        function, migration ``0017``): either the whole set is in place or nothing changed. It
        first locks the user's membership row, so replacements of the same user's roles in the
        same organization run one after the other, each reading what the previous one wrote:
        of two at the same time, the set of the later one is what stays, never a merge of both.
        ``assign_role_to_user`` and ``revoke_role_from_user`` do not wait for that lock: one
        running at the same time takes effect before or after the replacement, for its role.

        Raises ``NotFoundError`` and writes nothing when the user is not a member of the
        organization (or either does not exist; ``user_roles__member_fkey``), also for an empty
        ``role_ids``, and when a listed id is not a role of that organization
        (``user_roles__role_id_fkey``). Raises ``ValidationError`` for a malformed id (naming
        ``role_ids[i]``), a role listed twice (naming the second ``role_ids[i]``), and more
        than ``MAX_ROLE_IDS`` (1,000) ids. Setting a set is idempotent, so transient failures
        are retried: a retry after a lost acknowledgement finds the set in place and returns
        it. One exception: a listed role deleted between the first attempt (which committed)
        and its retry makes the retry raise ``NotFoundError`` though the first attempt's set was
        written (and then lost that role to the deletion's cascade).
        """
        user, org = v.uuid_arg("user_id", user_id), v.uuid_arg("org_id", org_id)
        ids = _role_ids(role_ids)
        params = {
            "user_id": user,
            "org_id": org,
            "role_ids": ids,
            # Only the roles not yet held use theirs; generated before the first attempt.
            "ids": [new_id() for _ in ids],
        }
        return await self._many("set_user_roles", params, Role, retry=Retry.SAFE)

    async def get_user_roles(self, user_id: uuid.UUID | str, org_id: uuid.UUID | str) -> list[Role]:
        """The roles a user holds in an organization, oldest role first (empty for unknown or
        malformed ids)."""
        parsed_user, parsed_org = v.parse_uuid(user_id), v.parse_uuid(org_id)
        if parsed_user is None or parsed_org is None:
            return []
        params = {"user_id": parsed_user, "org_id": parsed_org}
        return await self._many("get_user_roles", params, Role, retry=Retry.SAFE)

    async def get_role_users(
        self,
        role_id: uuid.UUID | str,
        *,
        after: RoleAssignment | None = None,
        limit: int | None = None,
    ) -> list[RoleAssignment]:
        """The users holding a role, one ``RoleAssignment`` each (with the role's organization
        and when the role was assigned), oldest assignment first (by ``assigned_at``, then
        ``user_id``), all of them, or a page with ``limit``; empty for an unknown or malformed
        id.

        Pages: ``limit`` (1 to ``MAX_PAGE``, 1,000) is the most assignments returned, and
        ``after`` is the last assignment of the previous page (a ``RoleAssignment`` this method
        returned; only its ``assigned_at`` and ``user_id`` are read): the page holds the
        assignments strictly after its (``assigned_at``, ``user_id``). Start with
        ``after=None``; a page shorter than ``limit`` is the last one (after a last page of
        exactly ``limit`` assignments the next page is empty). Pages are read by keyset, one
        index range scan each, so assignments made or revoked meanwhile never shift later
        pages: every assignment there throughout is listed once (no duplicates, no gaps), and
        an assignment revoked meanwhile can still be ``after``. The pages are read from the
        index ``user_roles_role_id_assigned_at_user_id_idx`` (migration ``0025``). ``after``
        without ``limit`` returns every assignment after it. Raises ``ValidationError`` naming
        ``limit`` (not an ``int`` in range) or ``after`` (not a ``RoleAssignment``;
        ``after.assigned_at`` or ``after.user_id`` when that field is not a timezone-aware
        datetime or a UUID), before anything is sent, whatever ``role_id`` is.
        """
        return await self._listing(
            "get_role_users",
            "get_role_users_page",
            "role_id",
            role_id,
            RoleAssignment,
            at="assigned_at",
            after=after,
            limit=limit,
        )

    async def get_user_permissions(
        self,
        user_id: uuid.UUID | str,
        org_id: uuid.UUID | str,
        *,
        consistency: Consistency = "replica",
    ) -> list[Permission]:
        """The distinct permissions a user holds in an organization through its roles, sorted
        by name (code-point order); empty for unknown or malformed ids.

        Permissions are distinct by name: when several of the user's roles define the same name
        differently, the definition of the oldest role (by ``created_at``, then id) is returned.
        """
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        parsed_user, parsed_org = v.parse_uuid(user_id), v.parse_uuid(org_id)
        if parsed_user is None or parsed_org is None:
            return []
        params = {"user_id": parsed_user, "org_id": parsed_org}
        return await self._many(
            "get_user_permissions",
            params,
            Permission,
            retry=Retry.SAFE,
            replica=replica,
        )

    async def has_permission(
        self,
        user_id: uuid.UUID | str,
        org_id: uuid.UUID | str,
        name: str,
        *,
        consistency: Consistency = "replica",
    ) -> bool:
        """Whether any role the user holds in the organization grants permission ``name``
        (exact, case-sensitive match). ``False`` for unknown or malformed ids and for a
        malformed name."""
        replica = self._use_replica(consistency)  # checked even for input that finds nothing
        parsed_user, parsed_org = v.parse_uuid(user_id), v.parse_uuid(org_id)
        if parsed_user is None or parsed_org is None:
            return False
        try:
            name = v.text("name", name)
        except ValidationError:
            return False
        params = {"user_id": parsed_user, "org_id": parsed_org, "name": name}
        return bool(await self._value("has_permission", params, retry=Retry.SAFE, replica=replica))

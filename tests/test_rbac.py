"""Roles, their assignment to users and the permissions they grant, against both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import psycopg
import pytest

from kitium_pg import ConflictError, NotFoundError, Organization, User, ValidationError
from kitium_pg.records import Permission, Role, RoleAssignment

from .fix_holder import call_while_holding, release_when_waiting, waiting
from .fix_metadata import check_metadata_patch
from .fix_paging import check_bad_paging_arguments, check_walks
from .fix_race import race, race_each, start

RACERS = 16


async def _org(storage: Any, name: str = "Acme") -> Organization:
    org: Organization = await storage.create_organization(name=name, plan="team")
    return org


async def _user(storage: Any, unique: Callable[[str], str], *member_of: Organization) -> User:
    """A new user, member of ``member_of`` (roles are assigned only to members)."""
    user: User = await storage.create_user(email=f"{unique('rbac')}@example.com")
    for org in member_of:
        await storage.add_organization_member(org.id, user.id)
    return user


async def _count_assignments(storage: Any, role_id: uuid.UUID) -> int:
    """Rows of user_roles for a role, read straight from the table (not through the API)."""
    pool = storage.adapter.pool if storage.kind == "sync" else storage.pool
    sql = "SELECT count(*) FROM kitium_auth.user_roles WHERE role_id = %s"
    if storage.kind == "sync":
        with pool.connection() as conn:
            row = conn.execute(sql, (role_id,)).fetchone()
    else:
        async with pool.connection() as conn:
            row = await (await conn.execute(sql, (role_id,))).fetchone()
    assert row is not None
    return int(row[0])


async def test_create_and_get_round_trip(storage: Any) -> None:
    org = await _org(storage)
    role = await storage.create_role(
        org_id=org.id,
        name="Billing admin",
        description="Manages invoices",
        is_system=True,
        permissions=[
            Permission(name="invoices:read", resource="invoices", action="read"),
            {"name": "invoices:write", "description": "Edit", "metadata": {"scope": ["eu", 1]}},
            {"name": 'it\'s 100% "quoted"'},
        ],
        metadata={"source": "seed"},
    )
    assert isinstance(role, Role)
    assert role.id.version == 7
    assert (role.org_id, role.name, role.description, role.is_system) == (
        org.id,
        "Billing admin",
        "Manages invoices",
        True,
    )
    assert role.permissions == (
        Permission(name="invoices:read", resource="invoices", action="read"),
        Permission(name="invoices:write", description="Edit", metadata={"scope": ["eu", 1]}),
        Permission(name='it\'s 100% "quoted"'),
    )
    assert role.metadata == {"source": "seed"}
    assert role.created_at.tzinfo is dt.UTC
    assert role.updated_at == role.created_at
    assert await storage.get_role(role.id) == role
    assert await storage.get_role(str(role.id)) == role


async def test_create_with_defaults(storage: Any) -> None:
    org = await _org(storage)
    role = await storage.create_role(org_id=str(org.id), name="viewer")
    assert (role.description, role.is_system, role.permissions, role.metadata) == (
        None,
        False,
        (),
        {},
    )
    assert await storage.get_role(role.id) == role


async def test_duplicate_name_in_an_org_is_a_conflict(storage: Any) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    first = await storage.create_role(org_id=org.id, name="admin")
    with pytest.raises(ConflictError) as caught:
        await storage.create_role(org_id=org.id, name="admin", permissions=[{"name": "x"}])
    assert caught.value.code == "unique_violation"
    assert "roles__name_key" in str(caught.value)
    # Names are unique per organization only.
    elsewhere = await storage.create_role(org_id=other.id, name="admin")
    assert elsewhere.id != first.id
    assert await storage.list_roles(org.id) == [first]


async def test_create_for_unknown_org_is_not_found(storage: Any) -> None:
    with pytest.raises(NotFoundError) as caught:
        await storage.create_role(org_id=uuid.uuid4(), name="admin")
    assert "roles__org_id_fkey" in str(caught.value)


async def test_lookups_of_unknown_or_malformed_ids(storage: Any) -> None:
    assert await storage.get_role(uuid.uuid4()) is None
    assert await storage.delete_role(uuid.uuid4()) is False
    assert await storage.list_roles(uuid.uuid4()) == []
    assert await storage.get_role_users(uuid.uuid4()) == []
    some = uuid.uuid4()
    for bad in ("nope", "", "x" * 10_000, 42, None):
        assert await storage.get_role(bad) is None
        assert await storage.delete_role(bad) is False
        assert await storage.list_roles(bad) == []
        assert await storage.get_user_roles(bad, some) == []
        assert await storage.get_user_roles(some, bad) == []
        assert await storage.get_role_users(bad) == []
        assert await storage.get_user_permissions(bad, some) == []
        assert await storage.get_user_permissions(some, bad) == []
        assert await storage.has_permission(bad, some, "x") is False
        assert await storage.has_permission(some, bad, "x") is False
        assert await storage.revoke_role_from_user(bad, some, some) is False
        assert await storage.revoke_role_from_user(some, bad, some) is False
        assert await storage.revoke_role_from_user(some, some, bad) is False
    assert await storage.has_permission(some, some, "") is False
    assert await storage.has_permission(some, some, 42) is False
    assert await storage.has_permission(some, some, "a\x00b") is False


async def test_update_changes_only_given_fields(storage: Any) -> None:
    org = await _org(storage)
    role = await storage.create_role(
        org_id=org.id,
        name="editor",
        description="Edits",
        permissions=[{"name": "docs:read"}],
        metadata={"a": 1},
    )
    renamed = await storage.update_role(role.id, name="writer", is_system=True)
    assert (renamed.name, renamed.is_system, renamed.description) == ("writer", True, "Edits")
    assert renamed.permissions == role.permissions
    assert renamed.metadata == {"a": 1}
    assert renamed.created_at == role.created_at
    assert renamed.updated_at >= role.updated_at
    replaced = await storage.update_role(
        str(role.id),
        description=None,
        permissions=[Permission(name="docs:write"), {"name": "docs:delete"}],
        metadata={},
    )
    assert (replaced.name, replaced.description, replaced.metadata) == ("writer", None, {})
    assert [p.name for p in replaced.permissions] == ["docs:write", "docs:delete"]
    emptied = await storage.update_role(role.id, permissions=[])
    assert emptied.permissions == ()
    assert await storage.get_role(role.id) == emptied
    untouched = await storage.update_role(role.id)  # nothing given: only updated_at moves
    assert attrs.evolve(untouched, updated_at=emptied.updated_at) == emptied


async def test_update_patches_metadata_in_place(storage: Any) -> None:
    org = await _org(storage)
    role = await storage.create_role(org_id=org.id, name="patched")
    await check_metadata_patch(storage, "update_role", "get_role", role.id, is_system=True)


async def test_update_errors(storage: Any) -> None:
    org = await _org(storage)
    await storage.create_role(org_id=org.id, name="taken")
    role = await storage.create_role(org_id=org.id, name="free")
    with pytest.raises(ConflictError):
        await storage.update_role(role.id, name="taken")
    assert await storage.get_role(role.id) == role
    with pytest.raises(NotFoundError):
        await storage.update_role(uuid.uuid4(), name="x")
    with pytest.raises(ValidationError) as caught:
        await storage.update_role("not-a-uuid", name="x")
    assert caught.value.field == "id"
    with pytest.raises(ValidationError) as caught:
        await storage.update_role(role.id, permissions=[{"name": "ok"}, {"nam": "typo"}])
    assert caught.value.field == "permissions[1]"
    with pytest.raises(ValidationError) as caught:
        await storage.update_role(role.id, is_system=1)
    assert caught.value.field == "is_system"
    with pytest.raises(TypeError):
        await storage.update_role(role.id, org_id=uuid.uuid4())  # a role never changes org
    assert await storage.get_role(role.id) == role


async def test_list_roles_newest_first(storage: Any) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    roles = [await storage.create_role(org_id=org.id, name=f"r{i}") for i in range(3)]
    await storage.create_role(org_id=other.id, name="r0")
    assert await storage.list_roles(org.id) == roles[::-1]
    assert await storage.list_roles(str(org.id)) == roles[::-1]


async def test_assign_is_idempotent_and_returns_the_role(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org = await _org(storage)
    user = await _user(storage, unique, org)
    reader = await storage.create_role(org_id=org.id, name="reader")
    writer = await storage.create_role(org_id=org.id, name="writer")
    assert await storage.assign_role_to_user(user.id, reader.id, org.id) == reader
    assert await storage.assign_role_to_user(str(user.id), str(reader.id), str(org.id)) == reader
    assert await _count_assignments(storage, reader.id) == 1
    assert await storage.assign_role_to_user(user.id, writer.id, org.id) == writer
    assert await storage.get_user_roles(user.id, org.id) == [reader, writer]  # oldest role first
    assert await storage.get_user_roles(user.id, uuid.uuid4()) == []
    assert await storage.revoke_role_from_user(user.id, reader.id, org.id) is True
    assert await storage.revoke_role_from_user(user.id, reader.id, org.id) is False
    assert await storage.get_user_roles(str(user.id), str(org.id)) == [writer]
    assert await _count_assignments(storage, reader.id) == 0


async def test_an_assignment_that_waited_for_another_returns_the_role_as_that_one_left_it(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in the fourth review: an assignment that waited for a concurrent assignment of the
    same role (its ON CONFLICT), made by a transaction that also changed the role, returned the
    role as its statement's snapshot showed it: the old name and permissions. It now reads the
    role locked, after the insert."""
    org = await _org(storage)
    user = await _user(storage, unique, org)
    role = await storage.create_role(
        org_id=org.id, name="editor", permissions=[{"name": "doc:read"}]
    )
    async with storage.transaction() as tx:
        await tx.assign_role_to_user(user.id, role.id, org.id)
        changed = await tx.update_role(
            role.id, name="publisher", permissions=[{"name": "doc:publish"}]
        )
        later = start(storage, "assign_role_to_user", user.id, role.id, org.id)
        assert await asyncio.to_thread(waiting, dsn, "INSERT INTO kitium_auth.user_roles")
    assert await later == changed == await storage.get_role(role.id)
    assert await _count_assignments(storage, role.id) == 1


async def test_assign_refuses_a_role_of_another_org_or_unknown_rows(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    user = await _user(storage, unique, org, other)
    foreign = await storage.create_role(org_id=other.id, name="admin")
    with pytest.raises(NotFoundError) as caught:
        await storage.assign_role_to_user(user.id, foreign.id, org.id)
    assert "user_roles__role_id_fkey" in str(caught.value)
    assert await _count_assignments(storage, foreign.id) == 0
    assert await storage.get_user_roles(user.id, org.id) == []
    assert await storage.get_user_roles(user.id, other.id) == []
    with pytest.raises(NotFoundError):
        await storage.assign_role_to_user(user.id, uuid.uuid4(), other.id)
    with pytest.raises(NotFoundError) as caught:
        await storage.assign_role_to_user(uuid.uuid4(), foreign.id, other.id)
    assert "user_roles__user_id_fkey" in str(caught.value)
    with pytest.raises(NotFoundError):
        await storage.assign_role_to_user(user.id, foreign.id, uuid.uuid4())
    assert await _count_assignments(storage, foreign.id) == 0
    # A user who is not a member of the organization gets no role in it.
    stranger = await _user(storage, unique, org)
    with pytest.raises(NotFoundError) as caught:
        await storage.assign_role_to_user(stranger.id, foreign.id, other.id)
    assert "user_roles__member_fkey" in str(caught.value)
    assert await _count_assignments(storage, foreign.id) == 0
    # Revoking in the wrong organization removes nothing.
    await storage.assign_role_to_user(user.id, foreign.id, other.id)
    assert await storage.revoke_role_from_user(user.id, foreign.id, org.id) is False
    assert await storage.get_user_roles(user.id, other.id) == [foreign]


@pytest.mark.parametrize("field", ["user_id", "role_id", "org_id"])
async def test_assign_with_malformed_id_names_the_field(storage: Any, field: str) -> None:
    args: dict[str, uuid.UUID | str] = {
        "user_id": uuid.uuid4(),
        "role_id": uuid.uuid4(),
        "org_id": uuid.uuid4(),
    }
    args[field] = "not-a-uuid"
    with pytest.raises(ValidationError) as caught:
        await storage.assign_role_to_user(args["user_id"], args["role_id"], args["org_id"])
    assert caught.value.field == field


async def test_sixteen_concurrent_assignments_leave_one_row(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org = await _org(storage)
    user = await _user(storage, unique, org)
    role = await storage.create_role(org_id=org.id, name="racer")
    results = await race(storage, RACERS, "assign_role_to_user", user.id, role.id, org.id)
    assert results == [role] * RACERS, results
    assert await _count_assignments(storage, role.id) == 1
    assert await storage.get_user_roles(user.id, org.id) == [role]


async def test_permissions_are_deduplicated_across_roles(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    user = await _user(storage, unique, org, other)
    older = await storage.create_role(
        org_id=org.id,
        name="older",
        permissions=[
            {"name": "users:write", "description": "from older", "metadata": {"v": 1}},
            {"name": "users:read", "resource": "users", "action": "read"},
        ],
    )
    newer = await storage.create_role(
        org_id=org.id,
        name="newer",
        permissions=[
            {"name": "users:read", "description": "from newer"},
            {"name": "billing:read"},
            {"name": "users:write", "description": "from newer"},
        ],
    )
    elsewhere = await storage.create_role(org_id=other.id, name="x", permissions=[{"name": "z"}])
    # Assign the newer role first: precedence follows role age, not assignment order.
    await storage.assign_role_to_user(user.id, newer.id, org.id)
    await storage.assign_role_to_user(user.id, older.id, org.id)
    await storage.assign_role_to_user(user.id, elsewhere.id, other.id)
    assert await storage.get_user_permissions(user.id, org.id) == [
        Permission(name="billing:read"),
        Permission(name="users:read", resource="users", action="read"),
        Permission(name="users:write", description="from older", metadata={"v": 1}),
    ]
    assert await storage.get_user_permissions(str(user.id), str(other.id)) == [Permission(name="z")]
    await storage.revoke_role_from_user(user.id, older.id, org.id)
    assert await storage.get_user_permissions(user.id, org.id) == [
        Permission(name="billing:read"),
        Permission(name="users:read", description="from newer"),
        Permission(name="users:write", description="from newer"),
    ]
    assert await storage.get_user_permissions(uuid.uuid4(), org.id) == []


async def test_has_permission(storage: Any, unique: Callable[[str], str]) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    user, stranger = await _user(storage, unique, org, other), await _user(storage, unique)
    role = await storage.create_role(
        org_id=org.id,
        name="ops",
        permissions=[
            {"name": "deploy:prod", "resource": "deploy", "action": "prod"},
            {"name": 'odd "name" %s'},
        ],
    )
    await storage.create_role(org_id=other.id, name="ops", permissions=[{"name": "other:only"}])
    assert await storage.has_permission(user.id, org.id, "deploy:prod") is False  # not assigned
    await storage.assign_role_to_user(user.id, role.id, org.id)
    assert await storage.has_permission(user.id, org.id, "deploy:prod") is True
    assert await storage.has_permission(str(user.id), str(org.id), 'odd "name" %s') is True
    assert await storage.has_permission(user.id, org.id, "deploy") is False  # exact name only
    assert await storage.has_permission(user.id, org.id, "Deploy:Prod") is False
    assert await storage.has_permission(user.id, org.id, "other:only") is False
    assert await storage.has_permission(user.id, other.id, "deploy:prod") is False
    assert await storage.has_permission(stranger.id, org.id, "deploy:prod") is False
    await storage.update_role(role.id, permissions=[{"name": "deploy:staging"}])
    assert await storage.has_permission(user.id, org.id, "deploy:prod") is False
    assert await storage.has_permission(user.id, org.id, "deploy:staging") is True
    await storage.revoke_role_from_user(user.id, role.id, org.id)
    assert await storage.has_permission(user.id, org.id, "deploy:staging") is False


async def test_deleting_a_role_removes_its_assignments(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org = await _org(storage)
    user = await _user(storage, unique, org)
    role = await storage.create_role(org_id=org.id, name="temp", permissions=[{"name": "p"}])
    await storage.assign_role_to_user(user.id, role.id, org.id)
    assert await storage.delete_role(role.id) is True
    assert await storage.delete_role(str(role.id)) is False
    assert await storage.get_role(role.id) is None
    assert await storage.get_user_roles(user.id, org.id) == []
    assert await storage.has_permission(user.id, org.id, "p") is False
    assert await _count_assignments(storage, role.id) == 0


async def test_deleting_the_org_or_user_cascades(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org = await _org(storage)
    user, leaver = await _user(storage, unique, org), await _user(storage, unique, org)
    role = await storage.create_role(org_id=org.id, name="member", permissions=[{"name": "p"}])
    await storage.assign_role_to_user(user.id, role.id, org.id)
    await storage.assign_role_to_user(leaver.id, role.id, org.id)
    assert await storage.delete_user(leaver.id) is True
    assert await _count_assignments(storage, role.id) == 1
    assert await storage.delete_organization(org.id) is True
    assert await storage.get_role(role.id) is None
    assert await storage.list_roles(org.id) == []
    assert await storage.get_user_roles(user.id, org.id) == []
    assert await storage.get_user_permissions(user.id, org.id) == []
    assert await _count_assignments(storage, role.id) == 0
    assert await storage.get_user(user.id) == user  # the user stays


async def test_leaving_the_organization_takes_the_roles_along(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Roles and permissions belong to a membership: removing the member, or replacing the
    member set without them, revokes them in the same statement."""
    org = await _org(storage)
    removed, replaced, stays = [await _user(storage, unique, org) for _ in range(3)]
    role = await storage.create_role(org_id=org.id, name="admin", permissions=[{"name": "all"}])
    for user in (removed, replaced, stays):
        await storage.assign_role_to_user(user.id, role.id, org.id)
        assert await storage.has_permission(user.id, org.id, "all", consistency="primary")
    assert await storage.remove_organization_member(org.id, removed.id) is True
    assert await storage.get_user_roles(removed.id, org.id) == []
    assert await storage.has_permission(removed.id, org.id, "all", consistency="primary") is False
    await storage.update_organization(org.id, members=[{"user_id": stays.id, "role": "member"}])
    assert await storage.get_user_permissions(replaced.id, org.id) == []
    assert await storage.has_permission(replaced.id, org.id, "all", consistency="primary") is False
    assert await storage.get_user_roles(stays.id, org.id) == [role]
    assert await _count_assignments(storage, role.id) == 1
    # Joining again does not bring the old roles back.
    await storage.add_organization_member(org.id, removed.id)
    assert await storage.get_user_roles(removed.id, org.id) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"org_id": "not-a-uuid"}, "org_id"),
        ({"org_id": None}, "org_id"),
        ({"name": ""}, "name"),
        ({"name": "x" * 256}, "name"),
        ({"name": 7}, "name"),
        ({"description": "d" * 8193}, "description"),
        ({"description": "a\x00b"}, "description"),
        ({"is_system": "yes"}, "is_system"),
        ({"is_system": 1}, "is_system"),
        ({"metadata": [1]}, "metadata"),
        ({"metadata": {"x": float("inf")}}, "metadata"),
        ({"permissions": "users:read"}, "permissions"),
        ({"permissions": {"name": "users:read"}}, "permissions"),
        ({"permissions": 42}, "permissions"),
        (
            {"permissions": [{"name": "a"}, {"name": "b"}, {"name": "c", "scope": "x"}]},
            "permissions[2]",
        ),
        ({"permissions": ["users:read"]}, "permissions[0]"),
        ({"permissions": [{"resource": "users"}]}, "permissions[0].name"),
        ({"permissions": [{"name": ""}]}, "permissions[0].name"),
        ({"permissions": [Permission(name=None)]}, "permissions[0].name"),  # type: ignore[arg-type]
        ({"permissions": [{"name": "a"}, {"name": "a", "action": "x"}]}, "permissions[1].name"),
        ({"permissions": [{"name": "a", "resource": 3}]}, "permissions[0].resource"),
        ({"permissions": [{"name": "a", "action": "x" * 256}]}, "permissions[0].action"),
        ({"permissions": [{"name": "a", "description": "\x00"}]}, "permissions[0].description"),
        ({"permissions": [{"name": "a", "metadata": ["x"]}]}, "permissions[0].metadata"),
        (
            {"permissions": [{"name": "a"}, Permission(name="b", metadata={"n": float("nan")})]},
            "permissions[1].metadata",
        ),
        ({"permissions": [{"name": str(i)} for i in range(1001)]}, "permissions"),
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    args = {"org_id": uuid.uuid4(), "name": "valid", **kwargs}
    with pytest.raises(ValidationError) as caught:
        await storage.create_role(**args)
    assert caught.value.field == field


async def test_deleting_a_role_waits_for_the_organization_row(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """update_organization(members=) and delete_role both cascade into user_roles, in
    different row orders: both take the organization's row first, so they run one after the
    other instead of deadlocking. A transaction holding that row, as update_organization's
    UPDATE does, makes delete_role wait (seen waiting on a lock) until it commits."""
    org = await _org(storage)
    member = await _user(storage, unique, org)
    role = await storage.create_role(org_id=org.id, name="gone", permissions=[{"name": "p"}])
    await storage.assign_role_to_user(member.id, role.id, org.id)
    holder = psycopg.connect(dsn)
    try:
        holder.execute("UPDATE kitium_auth.organizations SET name = name WHERE id = %s", (org.id,))
        watcher = release_when_waiting(dsn, holder, "kitium_auth.roles AS r")
        assert await storage.delete_role(role.id) is True
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert await storage.get_user_roles(member.id, org.id) == []


async def _set_assigned_at(storage: Any, role_id: uuid.UUID, when: dt.datetime) -> None:
    """Give every assignment of a role the same assigned_at, straight in the table."""
    pool = storage.adapter.pool if storage.kind == "sync" else storage.pool
    sql = "UPDATE kitium_auth.user_roles SET assigned_at = %s WHERE role_id = %s"
    if storage.kind == "sync":
        with pool.connection() as conn:
            conn.execute(sql, (when, role_id))
    else:
        async with pool.connection() as conn:
            await conn.execute(sql, (when, role_id))


async def test_get_role_users_lists_the_holders_oldest_assignment_first(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    users = [await _user(storage, unique, org, other) for _ in range(3)]
    role = await storage.create_role(org_id=org.id, name="auditor")
    unrelated = await storage.create_role(org_id=org.id, name="unrelated")
    elsewhere = await storage.create_role(org_id=other.id, name="auditor")
    order = [users[2], users[0], users[1]]  # assignment order, not user or creation order
    for user in order:
        await storage.assign_role_to_user(user.id, role.id, org.id)
    await storage.assign_role_to_user(users[1].id, unrelated.id, org.id)
    await storage.assign_role_to_user(users[0].id, elsewhere.id, other.id)
    holders = await storage.get_role_users(role.id)
    assert all(isinstance(h, RoleAssignment) for h in holders)
    assert [h.user_id for h in holders] == [u.id for u in order]
    assert {(h.role_id, h.org_id) for h in holders} == {(role.id, org.id)}
    assert all(h.assigned_at.tzinfo is dt.UTC for h in holders)
    assert [h.assigned_at for h in holders] == sorted(h.assigned_at for h in holders)
    assert await storage.get_role_users(str(role.id)) == holders
    assert [h.user_id for h in await storage.get_role_users(elsewhere.id)] == [users[0].id]
    # Re-assigning changes nothing; revoking and removing the member drop the holder.
    await storage.assign_role_to_user(order[0].id, role.id, org.id)
    assert await storage.get_role_users(role.id) == holders
    await storage.revoke_role_from_user(order[1].id, role.id, org.id)
    await storage.remove_organization_member(org.id, order[2].id)
    assert await storage.get_role_users(role.id) == [holders[0]]
    await storage.delete_role(role.id)
    assert await storage.get_role_users(role.id) == []


async def test_get_role_users_breaks_ties_by_user_id(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Assignments made at the same instant come by user id, not in the order they were made
    (assigned here from the highest user id down, then given one instant)."""
    org = await _org(storage)
    users = sorted([await _user(storage, unique, org) for _ in range(3)], key=lambda u: u.id)
    role = await storage.create_role(org_id=org.id, name="same-instant")
    for user in reversed(users):
        await storage.assign_role_to_user(user.id, role.id, org.id)
    when = dt.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    await _set_assigned_at(storage, role.id, when)
    holders = await storage.get_role_users(role.id)
    assert [h.user_id for h in holders] == [u.id for u in users]
    assert {h.assigned_at for h in holders} == {when}


async def test_set_user_roles_replaces_the_set_and_keeps_listed_assignments(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    user, bystander = await _user(storage, unique, org, other), await _user(storage, unique, org)
    a, b, c = [await storage.create_role(org_id=org.id, name=n) for n in ("a", "b", "c")]
    outside = await storage.create_role(org_id=other.id, name="a")
    for role in (a, b):
        await storage.assign_role_to_user(user.id, role.id, org.id)
        await storage.assign_role_to_user(bystander.id, role.id, org.id)
    await storage.assign_role_to_user(user.id, outside.id, other.id)
    [kept] = [h for h in await storage.get_role_users(b.id) if h.user_id == user.id]

    # Listed in another order than the roles' age: the result is oldest role first.
    assert await storage.set_user_roles(user.id, org.id, [c.id, str(b.id)]) == [b, c]
    assert await storage.get_user_roles(user.id, org.id) == [b, c]
    assert [h.user_id for h in await storage.get_role_users(a.id)] == [bystander.id]
    assert kept in await storage.get_role_users(b.id)  # not re-inserted: same assigned_at
    # Idempotent: the same set again changes nothing.
    assert await storage.set_user_roles(str(user.id), str(org.id), (b.id, c.id)) == [b, c]
    assert kept in await storage.get_role_users(b.id)
    # Other users, and the user's roles in other organizations, are left alone.
    assert await storage.get_user_roles(bystander.id, org.id) == [a, b]
    assert await storage.get_user_roles(user.id, other.id) == [outside]
    # An empty set takes every role away (and the permissions with them).
    assert await storage.set_user_roles(user.id, org.id, []) == []
    assert await storage.get_user_roles(user.id, org.id) == []
    assert await storage.set_user_roles(user.id, org.id, iter([a.id])) == [a]
    assert await storage.get_user_roles(user.id, other.id) == [outside]


async def test_set_user_roles_refuses_non_members_and_foreign_roles_writing_nothing(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, other = await _org(storage), await _org(storage, "Other")
    user, stranger = await _user(storage, unique, org), await _user(storage, unique, other)
    held, free = [await storage.create_role(org_id=org.id, name=n) for n in ("held", "free")]
    foreign = await storage.create_role(org_id=other.id, name="foreign")
    await storage.assign_role_to_user(user.id, held.id, org.id)

    async def refused(user_id: Any, org_id: Any, role_ids: list[Any], constraint: str) -> None:
        with pytest.raises(NotFoundError) as caught:
            await storage.set_user_roles(user_id, org_id, role_ids)
        assert constraint in str(caught.value)

    member_fkey, role_fkey = "user_roles__member_fkey", "user_roles__role_id_fkey"
    # Not a member (of this organization, or at all): refused even with nothing to assign.
    await refused(stranger.id, org.id, [], member_fkey)
    await refused(stranger.id, org.id, [held.id], member_fkey)
    await refused(user.id, other.id, [foreign.id], member_fkey)
    await refused(uuid.uuid4(), org.id, [], member_fkey)
    await refused(user.id, uuid.uuid4(), [], member_fkey)
    # A role of another organization, or none at all, next to valid ones: nothing is taken
    # away or added either.
    await refused(user.id, org.id, [free.id, foreign.id], role_fkey)
    await refused(user.id, org.id, [uuid.uuid4()], role_fkey)
    assert await storage.get_user_roles(user.id, org.id) == [held]
    assert await storage.get_user_roles(stranger.id, org.id) == []
    assert await _count_assignments(storage, free.id) == 0
    assert await _count_assignments(storage, foreign.id) == 0
    # A removed member's roles went with the membership; setting them is refused.
    assert await storage.remove_organization_member(org.id, user.id) is True
    await refused(user.id, org.id, [held.id], member_fkey)
    assert await _count_assignments(storage, held.id) == 0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"user_id": None}, "user_id"),
        ({"org_id": "not-a-uuid"}, "org_id"),
        ({"role_ids": None}, "role_ids"),
        ({"role_ids": 42}, "role_ids"),
        ({"role_ids": str(uuid.UUID(int=1))}, "role_ids"),  # one id, not a list
        ({"role_ids": uuid.UUID(int=1)}, "role_ids"),
        ({"role_ids": {"id": str(uuid.UUID(int=1))}}, "role_ids"),
        ({"role_ids": [uuid.UUID(int=1), "not-a-uuid"]}, "role_ids[1]"),
        ({"role_ids": [uuid.UUID(int=1), None]}, "role_ids[1]"),
        ({"role_ids": [uuid.UUID(int=1).bytes]}, "role_ids[0]"),
        (
            {"role_ids": [uuid.UUID(int=1), uuid.UUID(int=2), str(uuid.UUID(int=1)).upper()]},
            "role_ids[2]",
        ),
        ({"role_ids": [uuid.UUID(int=n) for n in range(1001)]}, "role_ids"),
    ],
)
async def test_set_user_roles_bad_input_names_the_field_and_writes_nothing(
    storage: Any, unique: Callable[[str], str], args: dict[str, Any], field: str
) -> None:
    org = await _org(storage)
    user = await _user(storage, unique, org)
    role = await storage.create_role(org_id=org.id, name="kept")
    await storage.assign_role_to_user(user.id, role.id, org.id)
    call = {"user_id": user.id, "org_id": org.id, "role_ids": [], **args}
    with pytest.raises(ValidationError) as caught:
        await storage.set_user_roles(call["user_id"], call["org_id"], call["role_ids"])
    assert caught.value.field == field
    assert await storage.get_user_roles(user.id, org.id) == [role]


async def test_set_user_roles_takes_up_to_the_limit(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """1,000 ids are accepted (the 1,001st is refused above): here all unknown roles, so the
    call gets as far as the database and is refused there."""
    org = await _org(storage)
    user = await _user(storage, unique, org)
    with pytest.raises(NotFoundError):
        await storage.set_user_roles(user.id, org.id, [uuid.uuid4() for _ in range(1000)])


async def test_concurrent_set_user_roles_leave_one_of_the_sets(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """Two replacements with overlapping sets, started while another transaction holds the
    user's membership row, both wait for it, then run one after the other: what stays is
    exactly the set of one of them (the later), never the union. (Without the lock taken
    first, the second DELETE would read a snapshot from before the first committed and miss
    its new assignment.)"""
    org = await _org(storage)
    user = await _user(storage, unique, org)
    old, a, shared, b = [
        await storage.create_role(org_id=org.id, name=n) for n in ("old", "a", "shared", "b")
    ]
    await storage.assign_role_to_user(user.id, old.id, org.id)
    sets = [[a, shared], [shared, b]]
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((user.id, org.id, [r.id for r in roles]), {}) for roles in sets
    ]
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT 1 FROM kitium_auth.organization_members"
            " WHERE org_id = %s AND user_id = %s FOR NO KEY UPDATE",
            (org.id, user.id),
        )
        watcher = release_when_waiting(dsn, holder, "set_user_roles", waiters=2)
        results = await race_each(storage, "set_user_roles", calls)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    assert results[0] == sets[0] and results[1] == sets[1], results  # each saw only its own
    stored = await storage.get_user_roles(user.id, org.id)
    assert stored in sets, stored
    assert await _count_assignments(storage, shared.id) == 1


def _deadlocks(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "held", ["its organization", "another role of its organization", "another organization's role"]
)
async def test_set_user_roles_waits_for_its_organization_and_for_no_role_it_does_not_set(
    storage: Any, dsn: str, unique: Callable[[str], str], held: str
) -> None:
    """set_user_roles locks the user, the organization, the roles it sets, then the membership.
    Its organization held (as delete_organization holds it), it waits there without holding the
    membership: a third transaction locks that at once (NOWAIT). A role it does not set it
    leaves alone, held as delete_role holds it: another role of the organization (the call
    succeeds), or another organization's role named in the call (refused at once,
    user_roles__role_id_fkey, rather than waiting on another tenant's row)."""
    org, other = await _org(storage), await _org(storage, "Other")
    user = await _user(storage, unique, org)
    role, unset = [await storage.create_role(org_id=org.id, name=n) for n in ("editor", "viewer")]
    foreign = await storage.create_role(org_id=other.id, name="foreign")
    if held == "its organization":
        roles = await call_while_holding(
            storage,
            dsn,
            ("organizations", {"id": org.id}),
            "UPDATE",
            lambda: storage.set_user_roles(user.id, org.id, [role.id]),
            waits_on="set_user_roles",
            free=[("organization_members", {"org_id": org.id, "user_id": user.id})],
        )
        assert roles == [role]
    elif held == "another role of its organization":
        roles = await call_while_holding(
            storage,
            dsn,
            ("roles", {"id": unset.id}),
            "UPDATE",
            lambda: storage.with_statement_timeout(3000).set_user_roles(user.id, org.id, [role.id]),
            waits_on=None,
        )
        assert roles == [role]
    else:
        with pytest.raises(NotFoundError, match="user_roles__role_id_fkey"):
            await call_while_holding(
                storage,
                dsn,
                ("roles", {"id": foreign.id}),
                "UPDATE",
                lambda: storage.with_statement_timeout(3000).set_user_roles(
                    user.id, org.id, [role.id, foreign.id]
                ),
                waits_on=None,
            )
        assert await storage.get_user_roles(user.id, org.id) == []


def test_set_user_roles_and_delete_user_take_their_locks_in_one_order(
    sync_adapter: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """set_user_roles locks the user's row before the membership row, as delete_user does
    (its cascade deletes the membership after it): a replacement and a delete of the same user,
    each in a transaction, finish one after the other. Locked the other way round (membership
    first, the user when the insert's reference check ran), the two deadlocked and the
    delete_user transaction was rolled back. A third transaction holding the old assignment
    makes the interleaving certain."""
    storage = sync_adapter
    org = storage.create_organization(name="Deadlock", plan="team")
    user = storage.create_user(email=f"{unique('dl')}@example.com")
    storage.add_organization_member(org.id, user.id)
    old = storage.create_role(org_id=org.id, name="old")
    new = storage.create_role(org_id=org.id, name="new")
    storage.assign_role_to_user(user.id, old.id, org.id)
    before = _deadlocks(dsn)
    outcome: dict[str, Any] = {}

    def replace() -> None:
        try:
            with storage.transaction() as tx:
                outcome["set"] = [r.name for r in tx.set_user_roles(user.id, org.id, [new.id])]
        except Exception as exc:
            outcome["set"] = exc

    def delete() -> None:
        try:
            with storage.transaction() as tx:
                outcome["delete"] = tx.delete_user(user.id)
        except Exception as exc:
            outcome["delete"] = exc

    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT 1 FROM kitium_auth.user_roles WHERE user_id = %s AND role_id = %s FOR SHARE",
            (user.id, old.id),
        )
        first = threading.Thread(target=replace)
        first.start()
        assert waiting(dsn, "set_user_roles")
        second = threading.Thread(target=delete)
        second.start()
        assert waiting(dsn, "DELETE FROM kitium_auth.users")
        holder.commit()
        first.join()
        second.join()
    finally:
        holder.close()
    assert outcome == {"set": ["new"], "delete": True}, outcome
    assert _deadlocks(dsn) == before
    assert storage.get_user(user.id, consistency="primary") is None


def test_set_user_roles_returns_the_set_asked_for(
    sync_adapter: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """An assign_role_to_user committed while a replacement runs (after its delete of the
    roles not listed took its snapshot) takes effect after it: the user holds both roles, and
    the replacement reports the set it was asked for, not one that matches neither order of the
    two calls."""
    storage = sync_adapter
    org = storage.create_organization(name="Returned", plan="team")
    user = storage.create_user(email=f"{unique('ret')}@example.com")
    storage.add_organization_member(org.id, user.id)
    old = storage.create_role(org_id=org.id, name="old")
    a = storage.create_role(org_id=org.id, name="a")
    b = storage.create_role(org_id=org.id, name="b")
    storage.assign_role_to_user(user.id, old.id, org.id)
    returned: list[Any] = []
    holder = psycopg.connect(dsn)
    try:
        # Holding the old assignment parks the replacement at its delete of it.
        holder.execute(
            "SELECT 1 FROM kitium_auth.user_roles WHERE user_id = %s AND role_id = %s FOR SHARE",
            (user.id, old.id),
        )
        worker = threading.Thread(
            target=lambda: returned.extend(storage.set_user_roles(user.id, org.id, [a.id]))
        )
        worker.start()
        assert waiting(dsn, "set_user_roles")
        assert storage.assign_role_to_user(user.id, b.id, org.id) == b
        holder.commit()
        worker.join()
    finally:
        holder.close()
    assert [r.name for r in returned] == ["a"]
    assert [r.name for r in storage.get_user_roles(user.id, org.id)] == ["a", "b"]


def test_set_user_roles_holds_the_roles_it_keeps(
    sync_adapter: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """A role the user already holds and that is listed again is locked by the replacement:
    a delete_role of it waits for the replacement, so the call never reports a role that was
    deleted while it ran (it returned fewer roles than asked for, as a success)."""
    storage = sync_adapter
    org = storage.create_organization(name="Kept", plan="team")
    user = storage.create_user(email=f"{unique('kept')}@example.com")
    storage.add_organization_member(org.id, user.id)
    editor = storage.create_role(org_id=org.id, name="editor")
    viewer = storage.create_role(org_id=org.id, name="viewer")
    storage.assign_role_to_user(user.id, editor.id, org.id)
    outcome: dict[str, Any] = {}
    holder = psycopg.connect(dsn)
    try:
        # Holding viewer's row parks the replacement once it has locked editor's.
        holder.execute("SELECT 1 FROM kitium_auth.roles WHERE id = %s FOR UPDATE", (viewer.id,))
        worker = threading.Thread(
            target=lambda: outcome.setdefault(
                "set", storage.set_user_roles(user.id, org.id, [editor.id, viewer.id])
            )
        )
        worker.start()
        assert waiting(dsn, "set_user_roles")
        deleter = threading.Thread(
            target=lambda: outcome.setdefault("delete", storage.delete_role(editor.id))
        )
        deleter.start()
        assert waiting(dsn, "DELETE FROM kitium_auth.roles")  # waits for the replacement
        holder.commit()
        worker.join()
        deleter.join()
    finally:
        holder.close()
    assert [r.name for r in outcome["set"]] == ["editor", "viewer"]
    assert outcome["delete"] is True
    assert [r.name for r in storage.get_user_roles(user.id, org.id)] == ["viewer"]


def test_assign_role_to_user_and_delete_organization_take_their_locks_in_one_order(
    sync_adapter: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """assign_role_to_user locks the organization's row before its reference checks lock the
    role, as delete_organization locks the organization before its cascade deletes the roles:
    the two finish one after the other (they deadlocked, and the delete_organization
    transaction was rolled back). A third transaction holding another member's row parks the
    delete after it has locked the organization."""
    storage = sync_adapter
    org = storage.create_organization(name="Assign", plan="team")
    user = storage.create_user(email=f"{unique('as')}@example.com")
    other = storage.create_user(email=f"{unique('as2')}@example.com")
    storage.add_organization_member(org.id, user.id)
    storage.add_organization_member(org.id, other.id)
    role = storage.create_role(org_id=org.id, name="r")
    before = _deadlocks(dsn)
    outcome: dict[str, Any] = {}

    def delete() -> None:
        try:
            with storage.transaction() as tx:
                outcome["delete"] = tx.delete_organization(org.id)
        except Exception as exc:
            outcome["delete"] = exc

    def assign() -> None:
        try:
            outcome["assign"] = storage.assign_role_to_user(user.id, role.id, org.id)
        except Exception as exc:
            outcome["assign"] = exc

    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT 1 FROM kitium_auth.organization_members"
            " WHERE org_id = %s AND user_id = %s FOR SHARE",
            (org.id, other.id),
        )
        first = threading.Thread(target=delete)
        first.start()
        assert waiting(dsn, "DELETE FROM kitium_auth.organizations")
        second = threading.Thread(target=assign)
        second.start()
        assert waiting(dsn, "INSERT INTO kitium_auth.user_roles")
        holder.commit()
        first.join()
        second.join()
    finally:
        holder.close()
    assert outcome["delete"] is True, outcome
    assert isinstance(outcome["assign"], NotFoundError), outcome
    assert _deadlocks(dsn) == before


async def _holders_with_ties(
    storage: Any, unique: Callable[[str], str]
) -> tuple[Organization, Role, Role, list[User]]:
    """A role held by 16 members: 6 assigned in one transaction (its one now()), 5 with
    set_user_roles one by one (with a second role, held by those 5 only), 5 in another
    transaction."""
    users = [await storage.create_user(email=f"{unique('page')}@example.com") for _ in range(16)]
    org = await storage.create_organization(
        name="Paged", plan="team", members=[{"user_id": u.id} for u in users]
    )
    role = await storage.create_role(org_id=org.id, name="reader")
    other = await storage.create_role(org_id=org.id, name="writer")
    async with storage.transaction() as tx:
        for user in users[:6]:
            await tx.assign_role_to_user(user.id, role.id, org.id)
    for user in users[6:11]:
        await storage.set_user_roles(user.id, org.id, [role.id, other.id])
    async with storage.transaction() as tx:
        for user in reversed(users[11:]):
            await tx.assign_role_to_user(user.id, role.id, org.id)
    return org, role, other, users


async def test_pages_list_every_holder_once_oldest_assignment_first(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Assignments made at the same instant come by user id, on whichever page the limit puts
    them: the pages of every size, one after the other, are the whole list."""
    org, role, other, users = await _holders_with_ties(storage, unique)
    whole = await check_walks(storage.get_role_users, role.id, "assigned_at")
    assert {a.user_id for a in whole} == {u.id for u in users}
    assert {(a.role_id, a.org_id) for a in whole} == {(role.id, org.id)}
    ties = [len([a for a in whole if a.assigned_at == t]) for t in {a.assigned_at for a in whole}]
    assert sorted(ties)[-2:] == [5, 6]  # two groups share one assigned_at each
    assert await storage.get_role_users(str(role.id), limit=3) == whole[:3]
    # An assignment revoked meanwhile (or of another role) still marks a place.
    gone = whole[7]
    assert await storage.revoke_role_from_user(gone.user_id, role.id, org.id) is True
    assert await storage.get_role_users(role.id, after=gone, limit=2) == whole[8:10]
    writers = await storage.get_role_users(other.id)
    assert [a.user_id for a in writers] == [u.id for u in users[6:11]]
    now = await storage.get_role_users(role.id)
    assert await storage.get_role_users(role.id, after=writers[0], limit=100) == [
        a for a in now if (a.assigned_at, a.user_id) > (writers[0].assigned_at, writers[0].user_id)
    ]
    for bad in ("nope", "", 42, None, uuid.uuid4()):
        assert await storage.get_role_users(bad, after=whole[0], limit=5) == []


async def test_assignments_made_or_revoked_while_paging_do_not_shift_later_pages(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Between pages, a role is assigned before the cursor (in a transaction that began before
    the first page was read: its assigned_at is the transaction's start), two assignments before
    the cursor are revoked, and one is made after everyone: an offset would repeat, then skip
    holders; the keyset lists each holder there throughout once, and the newcomer at the end."""
    org = await _org(storage, "Moving")
    late, *users = [await _user(storage, unique, org) for _ in range(8)]
    role = await storage.create_role(org_id=org.id, name="reader")
    async with storage.transaction() as tx:
        await tx.get_role(role.id)  # the transaction has begun: its now() is fixed
        for user in users[:6]:
            await storage.assign_role_to_user(user.id, role.id, org.id)
        first = await storage.get_role_users(role.id, limit=2)
        await tx.assign_role_to_user(late.id, role.id, org.id)
    now = await storage.get_role_users(role.id)
    assert [a.user_id for a in now[:3]] == [late.id, users[0].id, users[1].id]
    second = await storage.get_role_users(role.id, after=first[-1], limit=2)
    assert now[2:4] == [first[-1], second[0]]  # an offset of 2 repeats the first page's last
    for gone in first:
        assert await storage.revoke_role_from_user(gone.user_id, role.id, org.id) is True
    now = await storage.get_role_users(role.id)
    third = await storage.get_role_users(role.id, after=second[-1], limit=2)
    assert now[4:6] == third[1:]  # an offset of 4 skips the third page's first
    await storage.assign_role_to_user(users[6].id, role.id, org.id)
    fourth = await storage.get_role_users(role.id, after=third[-1], limit=2)
    listed = [a.user_id for page in (first, second, third, fourth) for a in page]
    assert listed == [u.id for u in users[:7]]


async def test_paging_arguments_are_checked_first(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, role, _, _ = await _holders_with_ties(storage, unique)
    assignment = (await storage.get_role_users(role.id))[0]
    member = await storage.get_organization_member(org.id, assignment.user_id)
    wrong = [
        attrs.asdict(assignment),
        (assignment.assigned_at, assignment.user_id),
        str(assignment.user_id),
        member,  # the other listing's record
        role,
        42,
    ]
    await check_bad_paging_arguments(
        storage.get_role_users, role.id, assignment, "assigned_at", wrong
    )
    # A RoleAssignment takes the user id as given: a malformed one is refused when it is used.
    odd = RoleAssignment(
        user_id="nope",  # type: ignore[arg-type]
        role_id=role.id,
        org_id=org.id,
        assigned_at=assignment.assigned_at,
    )
    with pytest.raises(ValidationError) as caught:
        await storage.get_role_users(role.id, after=odd, limit=5)
    assert caught.value.field == "after.user_id"

"""Organizations and their members, against both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from kitium_pg import (
    ConflictError,
    NotFoundError,
    Organization,
    OrganizationMember,
    SeatLimitError,
    User,
    ValidationError,
)

from .fix_holder import (
    call_while_holding,
    release_when_waiting,
    two_calls_queued_on,
    unretried_adapter,
    waiting,
)
from .fix_metadata import check_metadata_patch
from .fix_paging import check_bad_paging_arguments, check_walks
from .fix_race import race_each, race_methods, start
from .fix_roles import schema as schema


async def _users(storage: Any, unique: Callable[[str], str], n: int) -> list[User]:
    return [await storage.create_user(email=f"{unique('m')}@example.com") for _ in range(n)]


def _roles(org: Organization) -> dict[uuid.UUID, str]:
    return {m.user_id: m.role for m in org.members}


async def test_create_and_get_round_trip(storage: Any, unique: Callable[[str], str]) -> None:
    alice, bob = await _users(storage, unique, 2)
    joined = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    org = await storage.create_organization(
        name="Acme",
        plan="team",
        seats=5,
        members=[
            {"user_id": alice.id, "role": "owner"},
            OrganizationMember(user_id=bob.id, joined_at=joined),  # joined_at is set by the DB
        ],
        metadata={"region": "eu", "tags": ["a", 1, None]},
    )
    assert isinstance(org, Organization)
    assert org.id.version == 7
    assert (org.name, org.plan, org.seats) == ("Acme", "team", 5)
    assert org.metadata == {"region": "eu", "tags": ["a", 1, None]}
    assert _roles(org) == {alice.id: "owner", bob.id: "member"}
    assert all(isinstance(m.user_id, uuid.UUID) for m in org.members)
    assert all(m.joined_at.tzinfo is dt.UTC and m.joined_at > joined for m in org.members)
    assert [m.user_id for m in org.members] == sorted([alice.id, bob.id])  # same joined_at
    assert org.created_at.tzinfo is dt.UTC
    assert await storage.get_organization(org.id) == org
    assert await storage.get_organization(str(org.id)) == org


async def test_create_without_members_and_defaults(storage: Any) -> None:
    org = await storage.create_organization(name="Solo", plan="free")
    assert org.members == ()
    assert org.seats == 1
    assert org.metadata == {}
    assert await storage.get_organization(org.id) == org


async def test_create_with_unknown_member_writes_nothing(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    with pytest.raises(NotFoundError) as caught:
        await storage.create_organization(
            name="Ghosts", plan="free", members=[{"user_id": user.id}, {"user_id": uuid.uuid4()}]
        )
    assert "organization_members__user_id_fkey" in str(caught.value)
    assert await storage.list_user_organizations(user.id) == []


async def test_lookups_of_unknown_or_malformed_ids(storage: Any) -> None:
    assert await storage.get_organization(uuid.uuid4()) is None
    for bad in ("nope", "", "x" * 10_000, 42, None):
        assert await storage.get_organization(bad) is None
        assert await storage.delete_organization(bad) is False
        assert await storage.list_organization_members(bad) == []
        assert await storage.list_user_organizations(bad) == []
        assert await storage.remove_organization_member(bad, uuid.uuid4()) is False
    assert await storage.list_organization_members(uuid.uuid4()) == []


async def test_update_changes_only_given_fields(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    org = await storage.create_organization(
        name="Before", plan="free", seats=2, members=[{"user_id": user.id}], metadata={"a": 1}
    )
    updated = await storage.update_organization(org.id, name="After", seats=10)
    assert (updated.name, updated.plan, updated.seats) == ("After", "free", 10)
    assert updated.metadata == {"a": 1}
    assert updated.members == org.members  # untouched when members is not given
    assert updated.updated_at >= org.updated_at
    assert updated.created_at == org.created_at
    again = await storage.update_organization(str(org.id), plan="pro", metadata={})
    assert (again.name, again.plan, again.metadata) == ("After", "pro", {})
    assert await storage.get_organization(org.id) == again


async def test_update_patches_metadata_in_place(storage: Any) -> None:
    org = await storage.create_organization(name="Patched", plan="free")
    await check_metadata_patch(
        storage, "update_organization", "get_organization", org.id, plan="team"
    )


async def test_update_replaces_the_member_set(storage: Any, unique: Callable[[str], str]) -> None:
    alice, bob, carol, dave = await _users(storage, unique, 4)
    org = await storage.create_organization(
        name="Team",
        plan="team",
        members=[
            {"user_id": alice.id, "role": "owner"},
            {"user_id": bob.id},
            {"user_id": carol.id},
        ],
    )
    before = {m.user_id: m for m in org.members}
    # Keep alice (new role), drop bob and carol, add dave: one statement.
    updated = await storage.update_organization(
        org.id, members=[{"user_id": alice.id, "role": "admin"}, {"user_id": dave.id}]
    )
    assert _roles(updated) == {alice.id: "admin", dave.id: "member"}
    kept = next(m for m in updated.members if m.user_id == alice.id)
    assert kept.joined_at == before[alice.id].joined_at  # kept members keep their joined_at
    added = next(m for m in updated.members if m.user_id == dave.id)
    assert added.joined_at >= kept.joined_at
    assert [m.user_id for m in updated.members] == [alice.id, dave.id]  # join order
    # What the statement returned is what is stored.
    assert await storage.get_organization(org.id) == updated
    assert await storage.list_organization_members(org.id) == list(updated.members)
    assert await storage.list_user_organizations(bob.id) == []
    # Records from a previous read can be passed back as they are.
    assert (await storage.update_organization(org.id, members=updated.members)) == (
        await storage.get_organization(org.id)
    )
    emptied = await storage.update_organization(org.id, members=[])
    assert emptied.members == ()
    assert await storage.list_organization_members(org.id) == []


async def test_failed_member_replacement_changes_nothing(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    org = await storage.create_organization(
        name="Atomic", plan="free", members=[{"user_id": user.id}]
    )
    with pytest.raises(NotFoundError):
        await storage.update_organization(
            org.id, name="Changed", members=[{"user_id": uuid.uuid4()}]
        )
    assert await storage.get_organization(org.id) == org


async def test_update_unknown_organization(storage: Any) -> None:
    with pytest.raises(NotFoundError):
        await storage.update_organization(uuid.uuid4(), name="x")
    with pytest.raises(NotFoundError):
        await storage.update_organization(uuid.uuid4(), members=[])
    with pytest.raises(ValidationError) as caught:
        await storage.update_organization("not-a-uuid", name="x")
    assert caught.value.field == "id"
    with pytest.raises(TypeError):
        await storage.update_organization(uuid.uuid4(), owner="nope")  # not an updatable field


async def test_delete_is_idempotent_and_cascades(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    org = await storage.create_organization(
        name="Gone", plan="free", members=[{"user_id": user.id}]
    )
    assert await storage.delete_organization(org.id) is True
    assert await storage.delete_organization(org.id) is False
    assert await storage.get_organization(org.id) is None
    assert await storage.list_organization_members(org.id) == []
    assert await storage.list_user_organizations(user.id) == []
    assert await storage.get_user(user.id) == user  # the user stays


async def test_adding_an_existing_member_returns_it_unchanged(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Adding a member again keeps its role and joined_at: an owner who accepts an invitation
    as a member stays the owner, and a retried add returns what the first one wrote."""
    owner, user = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Club", plan="free", members=[{"user_id": owner.id, "role": "owner"}]
    )
    [stored_owner] = org.members
    member = await storage.add_organization_member(org.id, user.id)
    assert isinstance(member, OrganizationMember)
    assert (member.user_id, member.role) == (user.id, "member")
    assert member.joined_at.tzinfo is dt.UTC
    again = await storage.add_organization_member(str(org.id), str(user.id), role="admin")
    assert again == member
    assert await storage.add_organization_member(org.id, owner.id, role="member") == stored_owner
    assert await storage.add_organization_member(org.id, owner.id) == stored_owner
    assert await storage.list_organization_members(org.id) == [stored_owner, member]
    assert (await storage.get_organization(org.id)).members == (stored_owner, member)


async def test_get_organization_member_is_one_membership(
    storage: Any, email: str, unique: Callable[[str], str]
) -> None:
    """The per-request membership check reads one row, not the organization's member list."""
    user = await storage.create_user(email=email)
    stranger = await storage.create_user(email=unique("stranger") + "@example.com")
    org = await storage.create_organization(name="Club", plan="free")
    other = await storage.create_organization(name="Other", plan="free")
    admin = await storage.add_organization_member(org.id, user.id, role="admin")
    await storage.add_organization_member(other.id, stranger.id)
    assert await storage.get_organization_member(org.id, user.id) == admin
    assert await storage.get_organization_member(str(org.id), str(user.id).upper()) == admin
    assert await storage.get_organization_member(org.id, stranger.id) is None
    assert await storage.get_organization_member(other.id, user.id) is None
    for bad in ("nope", "", 42, None):
        assert await storage.get_organization_member(bad, user.id) is None
        assert await storage.get_organization_member(org.id, bad) is None
    assert await storage.remove_organization_member(org.id, user.id) is True
    assert await storage.get_organization_member(org.id, user.id) is None


async def test_add_member_to_unknown_org_or_user(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    org = await storage.create_organization(name="Strict", plan="free")
    with pytest.raises(NotFoundError) as caught:
        await storage.add_organization_member(uuid.uuid4(), user.id)
    assert "org_id_fkey" in str(caught.value)
    with pytest.raises(NotFoundError) as caught:
        await storage.add_organization_member(org.id, uuid.uuid4())
    assert "user_id_fkey" in str(caught.value)
    with pytest.raises(ValidationError) as bad:
        await storage.add_organization_member(org.id, user.id, role="Owner!")
    assert bad.value.field == "role"
    assert await storage.list_organization_members(org.id) == []


async def test_remove_member(storage: Any, unique: Callable[[str], str]) -> None:
    alice, bob = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Pair", plan="free", members=[{"user_id": alice.id}, {"user_id": bob.id}]
    )
    assert await storage.remove_organization_member(org.id, alice.id) is True
    assert await storage.remove_organization_member(org.id, alice.id) is False
    assert [m.user_id for m in await storage.list_organization_members(org.id)] == [bob.id]
    assert _roles(await storage.get_organization(org.id)) == {bob.id: "member"}


async def test_list_user_organizations_in_join_order(
    storage: Any, unique: Callable[[str], str]
) -> None:
    user, other = await _users(storage, unique, 2)
    first = await storage.create_organization(
        name="First", plan="free", members=[{"user_id": user.id}]
    )
    await storage.create_organization(name="Not mine", plan="free", members=[{"user_id": other.id}])
    second = await storage.create_organization(name="Second", plan="free")
    await storage.add_organization_member(second.id, other.id)
    await storage.add_organization_member(second.id, user.id, role="admin")
    orgs = await storage.list_user_organizations(user.id)
    assert [o.id for o in orgs] == [first.id, second.id]
    assert orgs[0] == await storage.get_organization(first.id)
    assert _roles(orgs[1]) == {other.id: "member", user.id: "admin"}  # every member is shown
    assert await storage.list_user_organizations(uuid.uuid4()) == []


async def test_deleting_a_user_removes_its_memberships(storage: Any, email: str) -> None:
    user = await storage.create_user(email=email)
    org = await storage.create_organization(
        name="Churn", plan="free", members=[{"user_id": user.id}]
    )
    assert await storage.delete_user(user.id) is True
    assert (await storage.get_organization(org.id)).members == ()


async def test_deleting_an_organization_deletes_its_sso_providers_and_bound_sessions(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """The organization's SSO providers go with it, with their domains, links and SSO sessions:
    they do not stay behind as shared providers (org_id NULL), which every organization lists
    and every tenant reads. Sessions bound to it end: they do not become unbound sessions, valid
    for any organization. Its users, their other sessions and other organizations' rows stay."""
    [user] = await _users(storage, unique, 1)
    org = await storage.create_organization(
        name="Going", plan="team", members=[{"user_id": user.id}]
    )
    other = await storage.create_organization(
        name="Staying", plan="team", members=[{"user_id": user.id}]
    )
    domain = f"{unique('going')}.example"
    provider = await storage.create_sso_provider(
        type="saml", name="Going IdP", org_id=org.id, client_secret="going-secret"
    )
    await storage.add_sso_provider_domain(provider.id, domain, verified=True)
    kept = await storage.create_sso_provider(type="oidc", name="Staying IdP", org_id=other.id)
    link = await storage.create_sso_link(
        user_id=user.id, provider_id=provider.id, provider_type="saml", provider_subject="s"
    )
    sso_session = await storage.create_sso_session(
        user_id=user.id,
        provider_id=provider.id,
        provider_type="saml",
        provider_subject="s",
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    bound = await storage.create_session(user_id=user.id, org_id=org.id, expires_at=expires)
    elsewhere = await storage.create_session(user_id=user.id, org_id=other.id, expires_at=expires)
    unbound = await storage.create_session(user_id=user.id, expires_at=expires)

    assert await storage.delete_organization(org.id) is True
    assert await storage.get_sso_provider(provider.id) is None
    assert provider.id not in [p.id for p in await storage.list_sso_providers(other.id)]
    assert provider.id not in [p.id for p in await storage.list_sso_providers()]
    assert await storage.get_sso_provider_by_domain(domain) is None
    assert await storage.get_sso_link(link.id) is None
    assert await storage.get_sso_session(sso_session.id) is None
    assert await storage.get_session(bound.id) is None
    assert await storage.get_session(elsewhere.id) == elsewhere
    assert await storage.get_session(unbound.id) == unbound
    assert await storage.get_sso_provider(kept.id) == kept
    assert await storage.get_user(user.id) == user


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 256}, "name"),
        ({"plan": "a\x00b"}, "plan"),
        ({"seats": -1}, "seats"),
        ({"seats": True}, "seats"),
        ({"seats": "3"}, "seats"),
        ({"metadata": [1]}, "metadata"),
        ({"metadata": {"x": float("nan")}}, "metadata"),
        ({"members": "not-a-list"}, "members"),
        ({"members": {"user_id": "x"}}, "members"),
        ({"members": [42]}, "members[0]"),
        ({"members": [{"role": "member"}]}, "members[0].user_id"),
        ({"members": [{"user_id": "not-a-uuid"}]}, "members[0].user_id"),
        ({"members": [{"user_id": uuid.UUID(int=1), "role": "Bad Role"}]}, "members[0].role"),
        ({"members": [{"user_id": uuid.UUID(int=1), "admin": True}]}, "members[0]"),
        (
            {"members": [{"user_id": uuid.UUID(int=1)}, {"user_id": str(uuid.UUID(int=1))}]},
            "members[1].user_id",
        ),
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(
    storage: Any, kwargs: dict[str, Any], field: str
) -> None:
    args = {"name": "Valid", "plan": "free", **kwargs}
    with pytest.raises(ValidationError) as caught:
        await storage.create_organization(**args)
    assert caught.value.field == field


async def test_concurrent_member_set_replacements_leave_one_set(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Eight replacements at once, each with a one-member set: the result is one caller's set
    (they run one after the other on the organization row), never a merge of several, and the
    last caller to run returned exactly the set that stayed (each round twice)."""
    users = [await storage.create_user(email=f"{unique('set')}@example.com") for _ in range(8)]
    org = await storage.create_organization(name="Sets", plan="team")
    for _ in range(2):
        calls = [((org.id,), {"members": [{"user_id": u.id, "role": "member"}]}) for u in users]
        results = await race_each(storage, "update_organization", calls)
        stored = [m.user_id for m in await storage.list_organization_members(org.id)]
        assert len(stored) == 1, stored
        assert [[m.user_id for m in r.members] for r in results].count(stored) >= 1
        assert all(len(r.members) == 1 for r in results)


def _later() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


async def test_within_seats_refuses_a_new_member_beyond_the_seats(
    storage: Any, unique: Callable[[str], str]
) -> None:
    alice, bob, carol = await _users(storage, unique, 3)
    org = await storage.create_organization(
        name="Seats", plan="team", seats=2, members=[{"user_id": alice.id, "role": "owner"}]
    )
    bob_member = await storage.add_organization_member(org.id, bob.id, within_seats=True)
    assert bob_member.role == "member"
    with pytest.raises(SeatLimitError) as caught:
        await storage.add_organization_member(org.id, carol.id, role="admin", within_seats=True)
    assert isinstance(caught.value, ConflictError)
    assert (caught.value.code, caught.value.retryable) == ("seat_limit", False)
    assert str(org.id) in str(caught.value)
    before = await storage.get_organization(org.id)
    assert [m.user_id for m in before.members] == [alice.id, bob.id]  # nothing written
    # An existing member is never over the limit: it is returned as it is.
    assert await storage.add_organization_member(org.id, bob.id, within_seats=True) == bob_member
    # Unguarded adds, and the member set, are not limited; lowering seats removes nobody.
    await storage.add_organization_member(org.id, carol.id)
    lowered = await storage.update_organization(org.id, seats=1)
    assert (lowered.seats, len(lowered.members)) == (1, 3)
    [dave] = await _users(storage, unique, 1)
    with pytest.raises(SeatLimitError):
        await storage.add_organization_member(org.id, dave.id, within_seats=True)
    # A user that does not exist is reported as such, seat or no seat.
    with pytest.raises(NotFoundError) as missing:
        await storage.add_organization_member(org.id, uuid.uuid4(), within_seats=True)
    assert "user_id_fkey" in str(missing.value)
    with pytest.raises(NotFoundError) as no_org:
        await storage.add_organization_member(uuid.uuid4(), bob.id, within_seats=True)
    assert "org_id_fkey" in str(no_org.value)
    with pytest.raises(ValidationError) as bad:
        await storage.add_organization_member(org.id, bob.id, within_seats="yes")
    assert bad.value.field == "within_seats"


async def test_an_organization_without_seats_takes_no_guarded_member(
    storage: Any, unique: Callable[[str], str]
) -> None:
    [user] = await _users(storage, unique, 1)
    org = await storage.create_organization(name="Seatless", plan="free", seats=0)
    with pytest.raises(SeatLimitError):
        await storage.add_organization_member(org.id, user.id, within_seats=True)
    assert await storage.list_organization_members(org.id) == []
    free = await storage.create_organization(name="One seat", plan="free", seats=1)
    member = await storage.add_organization_member(free.id, user.id, within_seats=True)
    assert await storage.list_organization_members(free.id) == [member]


async def test_set_member_role(storage: Any, unique: Callable[[str], str]) -> None:
    alice, bob, stranger = await _users(storage, unique, 3)
    org = await storage.create_organization(
        name="Roles", plan="team", members=[{"user_id": alice.id, "role": "owner"}]
    )
    bob_member = await storage.add_organization_member(org.id, bob.id)
    admin = await storage.set_organization_member_role(str(org.id), str(bob.id), "admin")
    assert isinstance(admin, OrganizationMember)
    assert (admin.user_id, admin.role, admin.joined_at) == (bob.id, "admin", bob_member.joined_at)
    assert await storage.get_organization_member(org.id, bob.id) == admin
    assert await storage.set_organization_member_role(org.id, bob.id, "admin") == admin  # again
    for org_id, user_id in (
        (org.id, stranger.id),
        (org.id, uuid.uuid4()),
        (uuid.uuid4(), bob.id),
    ):
        with pytest.raises(NotFoundError):
            await storage.set_organization_member_role(org_id, user_id, "admin")
    assert await storage.get_organization_member(org.id, stranger.id) is None
    for kwargs, field in (
        ({"org_id": "nope", "user_id": bob.id, "role": "admin"}, "org_id"),
        ({"org_id": org.id, "user_id": 42, "role": "admin"}, "user_id"),
        ({"org_id": org.id, "user_id": bob.id, "role": "Admin!"}, "role"),
        ({"org_id": org.id, "user_id": bob.id, "role": "x", "keep_last": "Owner!"}, "keep_last"),
        ({"org_id": org.id, "user_id": bob.id, "role": "x", "keep_last": 1}, "keep_last"),
    ):
        with pytest.raises(ValidationError) as caught:
            await storage.set_organization_member_role(**kwargs)
        assert caught.value.field == field
    assert await storage.list_organization_members(org.id) == [org.members[0], admin]


async def test_keep_last_refuses_to_take_the_role_from_its_last_holder(
    storage: Any, unique: Callable[[str], str]
) -> None:
    alice, bob = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Owners",
        plan="team",
        members=[{"user_id": alice.id, "role": "owner"}, {"user_id": bob.id}],
    )
    session = await storage.create_session(user_id=alice.id, org_id=org.id, expires_at=_later())
    with pytest.raises(ConflictError) as demoted:
        await storage.set_organization_member_role(org.id, alice.id, "admin", keep_last="owner")
    assert demoted.value.code == "last_role_holder" and not demoted.value.retryable
    assert "'owner'" in str(demoted.value)
    with pytest.raises(ConflictError) as removed:
        await storage.remove_organization_member(org.id, alice.id, keep_last="owner")
    assert removed.value.code == "last_role_holder" and "'owner'" in str(removed.value)
    assert await storage.get_organization(org.id) == org  # nothing written
    assert await storage.get_session(session.id) == session
    # Keeping the role it has, or a role the member does not hold, is no demotion.
    owner = org.members[0]
    assert (
        await storage.set_organization_member_role(org.id, alice.id, "owner", keep_last="owner")
        == owner
    )
    assert (
        await storage.remove_organization_member(org.id, uuid.uuid4(), keep_last="owner") is False
    )
    # With a second owner, the first may go.
    await storage.set_organization_member_role(org.id, bob.id, "owner")
    admin = await storage.set_organization_member_role(org.id, alice.id, "admin", keep_last="owner")
    assert admin.role == "admin"
    with pytest.raises(ConflictError):
        await storage.remove_organization_member(org.id, bob.id, keep_last="owner")
    assert await storage.remove_organization_member(org.id, alice.id, keep_last="owner") is True
    # Without keep_last nothing is guarded: the last owner may go.
    assert await storage.remove_organization_member(org.id, bob.id) is True
    assert await storage.list_organization_members(org.id) == []
    with pytest.raises(ValidationError) as bad:
        await storage.remove_organization_member(org.id, alice.id, keep_last="")
    assert bad.value.field == "keep_last"


async def test_removing_a_member_ends_its_sessions_bound_to_the_organization(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """The removed user's sessions bound to the organization are deleted with the membership;
    its other sessions and other members' sessions stay. A non-member has no membership to
    remove and no session bound to the organization (create_session refuses it)."""
    alice, bob, outsider = await _users(storage, unique, 3)
    org = await storage.create_organization(
        name="Bound", plan="team", members=[{"user_id": alice.id}, {"user_id": bob.id}]
    )
    other = await storage.create_organization(
        name="Elsewhere", plan="team", members=[{"user_id": alice.id}]
    )
    bound = [
        await storage.create_session(user_id=alice.id, org_id=org.id, expires_at=_later())
        for _ in range(2)
    ]
    kept = [
        await storage.create_session(user_id=alice.id, org_id=other.id, expires_at=_later()),
        await storage.create_session(user_id=alice.id, expires_at=_later()),
        await storage.create_session(user_id=bob.id, org_id=org.id, expires_at=_later()),
        await storage.create_session(user_id=outsider.id, expires_at=_later()),
    ]
    assert await storage.remove_organization_member(org.id, alice.id) is True
    for session in bound:
        assert await storage.get_session(session.id) is None
    for session in kept:
        assert await storage.get_session(session.id) == session
    assert await storage.remove_organization_member(org.id, outsider.id) is False
    assert await storage.get_session(kept[3].id) == kept[3]


async def test_replacing_the_member_set_ends_the_dropped_members_sessions(
    storage: Any, unique: Callable[[str], str]
) -> None:
    alice, bob, carol, dave = await _users(storage, unique, 4)
    org = await storage.create_organization(
        name="Replace",
        plan="team",
        members=[{"user_id": alice.id}, {"user_id": bob.id}, {"user_id": carol.id}],
    )
    other = await storage.create_organization(
        name="Other", plan="team", members=[{"user_id": bob.id}]
    )
    dropped = [
        await storage.create_session(user_id=u.id, org_id=org.id, expires_at=_later())
        for u in (bob, carol)
    ]
    kept = [
        await storage.create_session(user_id=alice.id, org_id=org.id, expires_at=_later()),
        await storage.create_session(user_id=bob.id, expires_at=_later()),
        await storage.create_session(user_id=bob.id, org_id=other.id, expires_at=_later()),
    ]
    await storage.update_organization(org.id, name="Renamed")  # members not given: no change
    for session in dropped + kept:
        assert await storage.get_session(session.id) == session
    updated = await storage.update_organization(
        org.id, members=[{"user_id": alice.id, "role": "owner"}, {"user_id": dave.id}]
    )
    assert _roles(updated) == {alice.id: "owner", dave.id: "member"}
    for session in dropped:
        assert await storage.get_session(session.id) is None
    for session in kept:
        assert await storage.get_session(session.id) == session


async def _sso_session_at(storage: Any, user: User, provider: Any, subject: str) -> Any:
    return await storage.create_sso_session(
        user_id=user.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject=subject,
        expires_at=_later(),
    )


@pytest.mark.parametrize("how", ["remove_organization_member", "update_organization"])
async def test_removing_a_member_ends_their_sso_sessions_at_the_organizations_providers(
    storage: Any, unique: Callable[[str], str], how: str
) -> None:
    """Migration 0037: with the membership go the member's SSO sessions at the organization's
    own providers, whether the member is removed or left out of a new member set. Their SSO
    sessions at another organization's provider and at a shared one stay, as do their SSO
    links, other members' SSO sessions, and a non-member's SSO session at the organization's
    provider, who belongs to another organization (a refused removal, of the last owner or of
    a non-member, writes nothing)."""
    alice, bob, outsider = await _users(storage, unique, 3)
    org = await storage.create_organization(
        name="Leaving",
        plan="team",
        members=[{"user_id": alice.id, "role": "owner"}, {"user_id": bob.id}],
    )
    other = await storage.create_organization(
        name="Staying", plan="team", members=[{"user_id": alice.id}, {"user_id": outsider.id}]
    )
    own, elsewhere, shared = [
        await storage.create_sso_provider(type="oidc", name=unique("idp"), org_id=org_id)
        for org_id in (org.id, other.id, None)
    ]
    link = await storage.create_sso_link(
        user_id=alice.id, provider_id=own.id, provider_type="oidc", provider_subject="alice"
    )
    ended = [await _sso_session_at(storage, alice, own, s) for s in ("alice", "alice-2")]
    kept = [
        await _sso_session_at(storage, alice, elsewhere, "alice"),
        await _sso_session_at(storage, alice, shared, "alice"),
        await _sso_session_at(storage, bob, own, "bob"),
        await _sso_session_at(storage, outsider, own, "outsider"),
    ]
    assert await storage.remove_organization_member(org.id, outsider.id) is False
    with pytest.raises(ConflictError):
        await storage.remove_organization_member(org.id, alice.id, keep_last="owner")
    for sso_session in ended + kept:
        assert await storage.get_sso_session(sso_session.id) == sso_session
    if how == "remove_organization_member":
        assert await storage.remove_organization_member(org.id, alice.id) is True
    else:
        updated = await storage.update_organization(org.id, members=[{"user_id": bob.id}])
        assert _roles(updated) == {bob.id: "member"}
    for sso_session in ended:
        assert await storage.get_sso_session(sso_session.id) is None
    for sso_session in kept:
        assert await storage.get_sso_session(sso_session.id) == sso_session
    stayed = await storage.get_sso_link(link.id)  # its last_auth_at moved with the sign-ins
    assert stayed is not None and stayed.user_id == alice.id


@pytest.mark.parametrize("how", ["remove_organization_member", "update_organization"])
async def test_a_removal_waits_for_the_users_deletion_before_it_holds_anything_of_theirs(
    storage: Any, unique: Callable[[str], str], dsn: str, how: str
) -> None:
    """delete_user locks the user's row and then reaches the memberships, sessions and SSO
    sessions by cascade; a removal holding the membership (or the SSO session) and waiting for
    the other would deadlock with it. The removal locks the user (FOR KEY SHARE) after the
    organization: while another transaction holds the user FOR UPDATE, the removal waits
    without holding the membership, the SSO session or the bound session (a third transaction
    locks each at once), then removes the member."""
    alice, bob = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Waits", plan="team", members=[{"user_id": alice.id}, {"user_id": bob.id}]
    )
    idp = await storage.create_sso_provider(type="oidc", name=unique("idp"), org_id=org.id)
    sso_session = await _sso_session_at(storage, alice, idp, "alice")
    bound = await storage.create_session(user_id=alice.id, org_id=org.id, expires_at=_later())

    def removal() -> Any:
        if how == "remove_organization_member":
            return storage.remove_organization_member(org.id, alice.id)
        return storage.update_organization(org.id, members=[{"user_id": bob.id}])

    done = await call_while_holding(
        storage,
        dsn,
        ("users", {"id": alice.id}),
        "UPDATE",  # what delete_user's DELETE takes
        removal,
        waits_on={
            "remove_organization_member": "remove_organization_member",
            "update_organization": "UPDATE kitium_auth.organizations",
        }[how],
        free=[
            ("organization_members", {"org_id": org.id, "user_id": alice.id}),
            ("sso_sessions", {"id": sso_session.id}),
            ("sessions", {"id": bound.id}),
        ],
    )
    assert done is True if how == "remove_organization_member" else done.members
    assert await storage.get_sso_session(sso_session.id) is None
    assert await storage.get_session(bound.id) is None


@pytest.mark.parametrize("how", ["remove_organization_member", "update_organization"])
async def test_a_removal_and_deleting_the_users_sso_sessions_do_not_deadlock(
    storage: Any, dsn: str, schema: str, how: str
) -> None:
    """Found in review: a removal deleted the member's SSO sessions in its join's order (by
    subject here, under index scans; provider by provider with several providers), and
    delete_user_sso_sessions in row order: over three sessions each held one the other wanted.
    The removal now locks them in row order first. Played without timing, on an adapter that
    does not retry and whose planner reads by plain index scans: a holder keeps the last
    session; the removal waits for it, then delete_user_sso_sessions starts. In a schema of its
    own, where rows go in the order written."""
    async with unretried_adapter(storage.kind, dsn, schema=schema) as own:
        alice, bob = [
            await own.create_user(email=f"{name}-{uuid.uuid4().hex[:8]}@example.com")
            for name in ("alice", "bob")
        ]
        org = await own.create_organization(
            name="Order", plan="team", members=[{"user_id": alice.id}, {"user_id": bob.id}]
        )
        idp = await own.create_sso_provider(type="oidc", name="idp", org_id=org.id)
        made = {
            subject: await _sso_session_at(own, alice, idp, subject) for subject in ("z", "a", "m")
        }
        with psycopg.connect(dsn, autocommit=True) as observer:
            rows = observer.execute(
                f"SELECT provider_subject FROM {schema}.sso_sessions WHERE user_id = %s"
                " ORDER BY ctid".encode(),
                [alice.id],
            ).fetchall()
        assert rows == [("z",), ("a",), ("m",)]  # row order is not subject order

        def removal() -> Any:
            if how == "remove_organization_member":
                return start(own, "remove_organization_member", org.id, alice.id)
            return start(own, "update_organization", org.id, members=[{"user_id": bob.id}])

        results = await two_calls_queued_on(
            dsn,
            ("sso_sessions", {"id": made["m"].id}),
            removal,
            {
                "remove_organization_member": "remove_organization_member",
                "update_organization": f"UPDATE {schema}.organizations",
            }[how],
            lambda: start(own, "delete_user_sso_sessions", alice.id),
            schema=schema,
        )
        assert not [r for r in results if isinstance(r, BaseException)], results
        for sso_session in made.values():
            assert await own.get_sso_session(sso_session.id) is None


async def test_a_member_set_replacement_locks_only_the_users_it_removes(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """update_organization(members=...) locks the users it removes, and their SSO sessions at
    the organization's providers, not those of the members it keeps: while another transaction
    holds a kept member's user row and SSO session there FOR UPDATE (as deleting them would),
    the replacement does not wait for them."""
    alice, bob = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Keeps", plan="team", members=[{"user_id": alice.id}, {"user_id": bob.id}]
    )
    idp = await storage.create_sso_provider(type="oidc", name=unique("idp"), org_id=org.id)
    kept = await _sso_session_at(storage, bob, idp, "bob")
    holder = psycopg.connect(dsn)
    try:
        holder.execute("SELECT FROM kitium_auth.users WHERE id = %s FOR UPDATE", [bob.id])
        holder.execute("SELECT FROM kitium_auth.sso_sessions WHERE id = %s FOR UPDATE", [kept.id])
        updated = await storage.with_statement_timeout(3000).update_organization(
            org.id, members=[{"user_id": bob.id}]
        )
    finally:
        holder.close()
    assert _roles(updated) == {bob.id: "member"}
    assert await storage.get_sso_session(kept.id) == kept


async def test_ending_sso_sessions_then_sessions_in_a_transaction_against_a_removal(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """An application's transaction that ends a user's SSO sessions and then their sessions
    (the order docs/guide/sso.md gives, which a single logout takes too) meets the member's
    removal without a deadlock: the removal waits for the SSO session the transaction deleted,
    holding no membership, so the transaction's logout (which locks the memberships FOR KEY
    SHARE) goes on and commits, and the removal then removes the member. Deleting the
    membership before the SSO sessions, the removal would hold it while waiting: a cycle."""
    [alice] = await _users(storage, unique, 1)
    org = await storage.create_organization(
        name="Cycle", plan="team", members=[{"user_id": alice.id}]
    )
    idp = await storage.create_sso_provider(type="oidc", name=unique("idp"), org_id=org.id)
    await _sso_session_at(storage, alice, idp, "alice")
    bound = await storage.create_session(user_id=alice.id, org_id=org.id, expires_at=_later())
    async with unretried_adapter(storage.kind, dsn) as own:
        async with own.transaction() as tx:
            await tx.delete_user_sso_sessions(alice.id)
            removal = start(own, "remove_organization_member", org.id, alice.id)
            assert await asyncio.to_thread(waiting, dsn, "remove_organization_member")
            await tx.delete_user_sessions(alice.id)
        assert await removal is True
    assert await storage.get_session(bound.id) is None
    assert await storage.list_organization_members(org.id) == []


async def test_a_refused_add_leaves_the_transaction_usable(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """A seat limit or keep_last refusal is the adapter's answer, not a failed statement: the
    transaction it happens in goes on and commits."""
    alice, bob = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Tx", plan="team", seats=1, members=[{"user_id": alice.id, "role": "owner"}]
    )
    async with storage.transaction() as tx:
        with pytest.raises(SeatLimitError):
            await tx.add_organization_member(org.id, bob.id, within_seats=True)
        with pytest.raises(ConflictError):
            await tx.remove_organization_member(org.id, alice.id, keep_last="owner")
        await tx.add_organization_member(org.id, bob.id)
    assert _roles(await storage.get_organization(org.id)) == {alice.id: "owner", bob.id: "member"}


async def test_a_membership_change_does_not_block_logins_into_the_organization(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """The membership functions hold the organization row FOR NO KEY UPDATE, which the
    reference check of a new session bound to the organization (FOR KEY SHARE) does not wait
    for. (Under FOR UPDATE the create_session below would wait for the holder's commit, and
    its statement timeout would fire.)"""
    alice, bob = await _users(storage, unique, 2)
    org = await storage.create_organization(
        name="Busy", plan="team", members=[{"user_id": alice.id}, {"user_id": bob.id}]
    )
    with psycopg.connect(dsn) as holder:
        holder.execute(
            "SELECT kitium_auth.remove_organization_member(%s, %s, NULL)", (org.id, bob.id)
        )
        session = await storage.with_statement_timeout(5000).create_session(
            user_id=alice.id, org_id=org.id, expires_at=_later()
        )
        holder.rollback()
    assert await storage.get_session(session.id) == session


def _owner_change(
    kind: str, org_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """A removal or a demotion of an owner that must leave the organization an owner."""
    if kind == "remove":
        return "remove_organization_member", (org_id, user_id), {"keep_last": "owner"}
    return "set_organization_member_role", (org_id, user_id, "member"), {"keep_last": "owner"}


@pytest.mark.parametrize(
    "calls",
    [("remove", "remove"), ("remove", "demote"), ("demote", "demote")],
    ids=lambda c: "-".join(c),
)
async def test_concurrent_changes_of_the_last_two_owners_leave_one(
    storage: Any, dsn: str, unique: Callable[[str], str], calls: tuple[str, str]
) -> None:
    """Both calls start while another transaction holds the organization row, so both wait
    for it, then run one after the other: the second sees the first's change and is refused.
    (A guard in one plain statement would read a snapshot from before the wait: both would
    see the other owner and both would go through, leaving no owner.)"""
    alice, bob, carol = await _users(storage, unique, 3)
    org = await storage.create_organization(
        name="Race",
        plan="team",
        members=[
            {"user_id": alice.id, "role": "owner"},
            {"user_id": bob.id, "role": "owner"},
            {"user_id": carol.id},
        ],
    )
    owners = zip(calls, (alice.id, bob.id), strict=True)
    racers = [_owner_change(kind, org.id, user_id) for kind, user_id in owners]
    holder = psycopg.connect(dsn)
    try:
        holder.execute("UPDATE kitium_auth.organizations SET name = name WHERE id = %s", (org.id,))
        watcher = release_when_waiting(dsn, holder, "organization_member", waiters=2)
        results = await race_methods(storage, racers)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    refused = [r for r in results if isinstance(r, ConflictError)]
    assert len(refused) == 1, results
    assert refused[0].code == "last_role_holder"
    assert [r for r in results if isinstance(r, BaseException)] == refused
    roles = _roles(await storage.get_organization(org.id))
    assert list(roles.values()).count("owner") == 1, roles


async def test_concurrent_guarded_adds_take_only_the_free_seats(
    storage: Any, dsn: str, unique: Callable[[str], str]
) -> None:
    """Five guarded adds wait together for the organization row, then run one after the
    other: with two free seats, exactly two get in and three get SeatLimitError."""
    owner, *users = await _users(storage, unique, 6)
    org = await storage.create_organization(
        name="Seat race", plan="team", seats=3, members=[{"user_id": owner.id, "role": "owner"}]
    )
    calls = [((org.id, u.id), {"within_seats": True}) for u in users]
    holder = psycopg.connect(dsn)
    try:
        holder.execute("UPDATE kitium_auth.organizations SET name = name WHERE id = %s", (org.id,))
        watcher = release_when_waiting(dsn, holder, "add_organization_member", waiters=len(calls))
        results = await race_each(storage, "add_organization_member", calls)
        watcher.join()
        assert watcher.seen  # type: ignore[attr-defined]
    finally:
        holder.close()
    added = [r for r in results if isinstance(r, OrganizationMember)]
    assert len(added) == 2, results
    assert all(isinstance(r, SeatLimitError) for r in results if r not in added), results
    members = await storage.list_organization_members(org.id)
    assert {m.user_id for m in members} == {owner.id} | {m.user_id for m in added}


async def _members_with_ties(
    storage: Any, unique: Callable[[str], str]
) -> tuple[Organization, list[User]]:
    """An organization whose 16 members joined in three ways: 6 with create_organization (one
    statement, one joined_at), 5 in one transaction (its one now()), and 5 one at a time."""
    users = await _users(storage, unique, 16)
    org = await storage.create_organization(
        name="Paged", plan="team", members=[{"user_id": u.id} for u in users[:6]]
    )
    async with storage.transaction() as tx:
        for user in users[6:11]:
            await tx.add_organization_member(org.id, user.id)
    for user in users[11:]:
        await storage.add_organization_member(org.id, user.id, role="admin")
    return org, users


async def test_pages_list_every_member_once_in_join_order(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Members who joined at the same instant come by user id, on whichever page the limit
    puts them: the pages of every size, one after the other, are the whole list."""
    org, users = await _members_with_ties(storage, unique)
    whole = await check_walks(storage.list_organization_members, org.id, "joined_at")
    assert {m.user_id for m in whole} == {u.id for u in users}
    ties = [len([m for m in whole if m.joined_at == t]) for t in {m.joined_at for m in whole}]
    assert sorted(ties)[-2:] == [5, 6]  # two groups share one joined_at each
    assert await storage.list_organization_members(str(org.id), limit=3) == whole[:3]
    # A member removed meanwhile (or of another organization) still marks a place.
    gone = whole[7]
    assert await storage.remove_organization_member(org.id, gone.user_id) is True
    assert await storage.list_organization_members(org.id, after=gone, limit=2) == whole[8:10]
    other = await storage.create_organization(name="Other", plan="team")
    assert await storage.list_organization_members(other.id, after=whole[0], limit=5) == []
    for bad in ("nope", "", 42, None, uuid.uuid4()):
        assert await storage.list_organization_members(bad, after=whole[0], limit=5) == []


async def test_members_joining_or_leaving_while_paging_do_not_shift_later_pages(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Between pages, a member joins before the cursor (in a transaction that began before the
    first page was read: its joined_at is the transaction's start), two members before the
    cursor leave, and one joins after everyone: an offset would repeat, then skip members; the
    keyset lists each member there throughout once, and the newcomer at the end."""
    late, *users = await _users(storage, unique, 8)
    org = await storage.create_organization(name="Moving", plan="team")
    async with storage.transaction() as tx:
        await tx.get_organization(org.id)  # the transaction has begun: its now() is fixed
        for user in users[:6]:
            await storage.add_organization_member(org.id, user.id)
        first = await storage.list_organization_members(org.id, limit=2)
        await tx.add_organization_member(org.id, late.id)
    now = await storage.list_organization_members(org.id)
    assert [m.user_id for m in now[:3]] == [late.id, users[0].id, users[1].id]
    second = await storage.list_organization_members(org.id, after=first[-1], limit=2)
    assert now[2:4] == [first[-1], second[0]]  # an offset of 2 repeats the first page's last
    for gone in first:
        assert await storage.remove_organization_member(org.id, gone.user_id) is True
    now = await storage.list_organization_members(org.id)
    third = await storage.list_organization_members(org.id, after=second[-1], limit=2)
    assert now[4:6] == third[1:]  # an offset of 4 skips the third page's first
    await storage.add_organization_member(org.id, users[6].id)
    fourth = await storage.list_organization_members(org.id, after=third[-1], limit=2)
    listed = [m.user_id for page in (first, second, third, fourth) for m in page]
    assert listed == [u.id for u in users[:7]]


async def test_paging_arguments_are_checked_first(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org, _ = await _members_with_ties(storage, unique)
    member = (await storage.list_organization_members(org.id))[0]
    role = await storage.create_role(org_id=org.id, name="viewer")
    await storage.assign_role_to_user(member.user_id, role.id, org.id)
    [assignment] = await storage.get_role_users(role.id)
    wrong = [
        {"user_id": member.user_id, "joined_at": member.joined_at},
        (member.joined_at, member.user_id),
        str(member.user_id),
        assignment,  # the other listing's record
        org,
        42,
    ]
    await check_bad_paging_arguments(
        storage.list_organization_members, org.id, member, "joined_at", wrong
    )


async def test_an_update_that_waited_for_an_add_returns_the_added_member(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in the third review: update_organization waited for the organization's lock,
    held by add_organization_member, then returned the members as its snapshot from before
    the wait showed them: the new name beside a member list without the member just added.
    It reads them after the lock (migration 0034)."""
    first, added = [await storage.create_user(email=f"{unique('m')}@example.com") for _ in "ab"]
    org = await storage.create_organization(
        name="Acme", plan="team", members=[{"user_id": first.id}]
    )
    async with storage.transaction() as tx:
        await tx.add_organization_member(org.id, added.id)
        renaming = start(storage, "update_organization", org.id, name="Acme Corp")
        assert await asyncio.to_thread(waiting, dsn, "UPDATE kitium_auth.organizations AS o")
    renamed = await renaming
    assert renamed.name == "Acme Corp"
    assert [m.user_id for m in renamed.members] == [first.id, added.id]
    assert renamed == await storage.get_organization(org.id)

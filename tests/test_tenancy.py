"""Tenant isolation: the optional tenant_rls migration, tenant() views, and the least-privilege
grants, tested by connecting as a non-owner application role."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

import attrs
import httpx
import psycopg
import pytest
from fastapi import Depends, FastAPI
from psycopg.conninfo import make_conninfo

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    NotFoundError,
    PermissionDeniedError,
    PostgresStorageAdapter,
    ValidationError,
)
from kitium_pg.integrations.fastapi import (
    OrgAccess,
    add_exception_handlers,
    require_permission,
    storage_lifespan,
)

from .fix_holder import waiting
from .fix_roles import POLICIES_BESIDE_TENANT_RLS, set_policies
from .fix_roles import login_role as login_role
from .fix_roles import owner_dsn as owner_dsn
from .fix_roles import schema as schema


@pytest.fixture(scope="module")
def tenancy(dsn: str) -> Iterator[dict[str, Any]]:
    """A schema with tenant_rls applied, two organizations with a role each (made by the owner),
    and a login role ``app_…`` holding only the generated grants (EXECUTE on the schema's
    functions revoked from PUBLIC)."""
    tag = uuid.uuid4().hex[:8]
    schema, role = f"tenancy_{tag}", f"app_{tag}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN".encode())
    owner = PostgresStorageAdapter(dsn, schema=schema, optional_migrations=["tenant_rls"])
    owner.connect()
    with psycopg.connect(dsn, autocommit=True) as admin:
        # as a hardened cluster does: the generated grants alone must let the role call the
        # schema's functions (found in review: they relied on PUBLIC's EXECUTE)
        admin.execute(f"REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC".encode())
    owner.grant_app_role(role)
    user = owner.create_user(email=f"member-{tag}@example.com")
    orgs, roles = [], []
    for name in ("alpha", "beta"):
        org = owner.create_organization(name=name, plan="team", members=[{"user_id": user.id}])
        orgs.append(org)
        roles.append(owner.create_role(org_id=org.id, name="admin", permissions=[{"name": "x"}]))
    yield {
        "schema": schema,
        "role": role,
        "app_dsn": make_conninfo(dsn, user=role),
        "user": user,
        "orgs": orgs,
        "roles": roles,
        "owner": owner,
    }
    owner.disconnect()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE".encode())
        admin.execute(f"DROP ROLE {role}".encode())


@pytest.fixture
def app(tenancy: dict[str, Any]) -> Iterator[PostgresStorageAdapter]:
    """The adapter as the application role (no migrations: it has no DDL rights)."""
    storage = PostgresStorageAdapter(tenancy["app_dsn"], schema=tenancy["schema"])
    storage.connect(migrate=False)
    yield storage
    storage.disconnect()


def test_reads_see_only_the_current_tenant(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    alpha, beta = tenancy["orgs"]
    as_alpha = app.tenant(alpha.id)
    found = as_alpha.get_organization(alpha.id)
    assert found is not None and found.name == "alpha"
    assert as_alpha.get_organization(beta.id) is None
    assert [r.id for r in as_alpha.list_roles(alpha.id)] == [tenancy["roles"][0].id]
    assert as_alpha.list_roles(beta.id) == []
    assert as_alpha.get_role(tenancy["roles"][1].id) is None
    assert app.get_organization(alpha.id) is None  # no tenant: fail closed
    assert app.tenant(beta.id).get_organization(beta.id) is not None


def test_cross_tenant_writes_fail(app: PostgresStorageAdapter, tenancy: dict[str, Any]) -> None:
    alpha, beta = tenancy["orgs"]
    as_alpha = app.tenant(alpha.id)
    with pytest.raises(PermissionDeniedError):
        as_alpha.create_role(org_id=beta.id, name="intruder")
    with pytest.raises(NotFoundError):
        as_alpha.update_organization(beta.id, name="taken over")
    assert as_alpha.delete_role(tenancy["roles"][1].id) is False
    owner_view = tenancy["owner"].get_organization(beta.id)
    assert owner_view is not None and owner_view.name == "beta"
    assert len(tenancy["owner"].list_roles(beta.id)) == 1


def test_tenant_writes_within_its_own_tenant_work(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    alpha = tenancy["orgs"][0]
    with app.tenant(alpha.id).transaction() as tx:
        role = tx.create_role(org_id=alpha.id, name=f"editor-{uuid.uuid4().hex[:6]}")
        tx.assign_role_to_user(tenancy["user"].id, role.id, alpha.id)
        assert tx.has_permission(tenancy["user"].id, alpha.id, "x") is False
    assert role in app.tenant(alpha.id).get_user_roles(tenancy["user"].id, alpha.id)


def test_set_user_roles_and_get_role_users_stay_within_the_tenant(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    """set_user_roles runs with the caller's rights (its function is not SECURITY DEFINER), as
    the other RBAC methods do: as alpha it sets and reads alpha's roles, but beta's membership
    is out of sight (NotFoundError, nothing written), and so are beta's role holders; without a
    tenant nothing is visible (fail closed)."""
    alpha, beta = tenancy["orgs"]
    owner: PostgresStorageAdapter = tenancy["owner"]
    user = tenancy["user"]
    tag = uuid.uuid4().hex[:6]
    mine = owner.create_role(org_id=alpha.id, name=f"set-{tag}")
    theirs = owner.create_role(org_id=beta.id, name=f"set-{tag}")
    owner.assign_role_to_user(user.id, theirs.id, beta.id)
    held_in_alpha = owner.get_user_roles(user.id, alpha.id)
    as_alpha = app.tenant(alpha.id)
    assert as_alpha.set_user_roles(user.id, alpha.id, [mine.id]) == [mine]
    assert owner.get_user_roles(user.id, alpha.id) == [mine]
    assert [a.user_id for a in as_alpha.get_role_users(mine.id)] == [user.id]
    with pytest.raises(NotFoundError) as caught:
        as_alpha.set_user_roles(user.id, beta.id, [])
    assert "user_roles__member_fkey" in str(caught.value)
    with pytest.raises(NotFoundError):  # another tenant's role in alpha's set
        as_alpha.set_user_roles(user.id, alpha.id, [theirs.id])
    assert as_alpha.get_role_users(theirs.id) == []
    assert app.get_role_users(mine.id) == []
    with pytest.raises(NotFoundError):
        app.set_user_roles(user.id, alpha.id, [])
    assert owner.get_user_roles(user.id, beta.id) == [theirs]
    assert [a.user_id for a in owner.get_role_users(theirs.id)] == [user.id]
    assert owner.get_user_roles(user.id, alpha.id) == [mine]
    assert owner.set_user_roles(user.id, alpha.id, [r.id for r in held_in_alpha]) == held_in_alpha


def test_the_app_role_has_no_ddl_and_events_are_append_only(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    alpha = tenancy["orgs"][0]
    app.tenant(alpha.id).emit_event(type="login", principal_id="p", data={}, org_id=str(alpha.id))
    with psycopg.connect(tenancy["app_dsn"]) as conn:
        for statement in (
            f"CREATE TABLE {tenancy['schema']}.evil (id int)",
            f"DELETE FROM {tenancy['schema']}.auth_events",
            f"UPDATE {tenancy['schema']}.auth_events SET type = 'x'",
            f"DROP TABLE {tenancy['schema']}.users",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement.encode())
            conn.rollback()


def test_grants_text_and_role_validation(tenancy: dict[str, Any]) -> None:
    text = tenancy["owner"].app_role_grants("billing_app")
    assert "TO billing_app" in text and f"{tenancy['schema']}.auth_events" in text
    assert "kitium_app" not in text
    with pytest.raises(ValidationError):
        tenancy["owner"].app_role_grants("x; DROP TABLE users")


@pytest.mark.parametrize(
    "role",
    [
        "public",
        "current_user",
        "current_role",
        "session_user",
        "none",
        "pg_monitor",
        # Python's ``$`` matches before a final newline; PostgreSQL reads the newline as
        # whitespace, so these would grant to public / the current user.
        "public\n",
        "current_user\n",
        "billing_app\n",
    ],
)
def test_grants_refuse_roles_that_are_not_one_application_role(
    tenancy: dict[str, Any], role: str
) -> None:
    """``public`` would give every role of the cluster the application's rights (password
    hashes included); the others name whoever runs the grant, or PostgreSQL's own roles."""
    with pytest.raises(ValidationError) as caught:
        tenancy["owner"].app_role_grants(role)
    assert caught.value.field == "role"
    with pytest.raises(ValidationError):
        tenancy["owner"].grant_app_role(role)


async def test_async_tenant_view(tenancy: dict[str, Any]) -> None:
    alpha, beta = tenancy["orgs"]
    app = AsyncPostgresStorageAdapter(tenancy["app_dsn"], schema=tenancy["schema"])
    await app.connect(migrate=False)
    try:
        as_beta = app.tenant(beta.id)
        assert (await as_beta.get_organization(beta.id)) is not None
        assert await as_beta.get_organization(alpha.id) is None
        with pytest.raises(PermissionDeniedError):
            await as_beta.create_role(org_id=alpha.id, name="intruder")
    finally:
        await app.disconnect()


def test_granting_to_a_missing_role_is_a_translated_error(tenancy: dict[str, Any]) -> None:
    from kitium_pg import KitiumPgError

    with pytest.raises(KitiumPgError) as caught:
        tenancy["owner"].grant_app_role("no_such_role_here")
    assert isinstance(caught.value.__cause__, psycopg.Error)


@pytest.fixture(scope="module")
def providers(tenancy: dict[str, Any]) -> dict[str, Any]:
    """A shared SSO provider (no organization) and one of beta's, each with a verified domain,
    made by the owner."""
    owner, beta = tenancy["owner"], tenancy["orgs"][1]
    tag = uuid.uuid4().hex[:6]
    shared = owner.create_sso_provider(type="oidc", name="Shared", client_id="shared")
    betas = owner.create_sso_provider(type="oidc", name="Beta's", client_id="b", org_id=beta.id)
    owner.add_sso_provider_domain(shared.id, f"shared-{tag}.example", verified=True)
    owner.add_sso_provider_domain(betas.id, f"beta-{tag}.example", verified=True)
    return {"shared": shared, "beta": betas, "tag": tag}


def test_shared_sso_providers_are_read_only_for_tenants(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any]
) -> None:
    alpha = tenancy["orgs"][0]
    as_alpha, shared, tag = app.tenant(alpha.id), providers["shared"], providers["tag"]
    seen = as_alpha.get_sso_provider(shared.id)
    assert seen is not None and [d.domain for d in seen.domains] == [f"shared-{tag}.example"]
    assert app.get_sso_provider_by_domain(f"x@shared-{tag}.example") is not None  # no tenant
    # Neither taken over (moved into the tenant, pointed elsewhere) nor deleted.
    with pytest.raises(NotFoundError):
        as_alpha.update_sso_provider(shared.id, org_id=alpha.id, idp_sso_url="https://evil.example")
    assert as_alpha.delete_sso_provider(shared.id) is False
    with pytest.raises(PermissionDeniedError):  # a tenant cannot create a shared one either
        as_alpha.create_sso_provider(type="oidc", name="Fake shared", client_id="f")
    # Its domains are the owner's to change.
    with pytest.raises(PermissionDeniedError):
        as_alpha.add_sso_provider_domain(shared.id, f"grab-{tag}.example")
    assert as_alpha.remove_sso_provider_domain(shared.id, f"shared-{tag}.example") is False
    unchanged = tenancy["owner"].get_sso_provider(shared.id)
    assert unchanged is not None and attrs.evolve(unchanged, domains=()) == shared
    assert [d.domain for d in unchanged.domains] == [f"shared-{tag}.example"]


def test_another_tenants_sso_provider_domains_are_out_of_reach(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any]
) -> None:
    alpha = tenancy["orgs"][0]
    as_alpha, betas, tag = app.tenant(alpha.id), providers["beta"], providers["tag"]
    assert as_alpha.get_sso_provider(betas.id) is None
    assert as_alpha.get_sso_provider_by_domain(f"x@beta-{tag}.example") is None
    with pytest.raises(PermissionDeniedError):
        as_alpha.add_sso_provider_domain(betas.id, f"planted-{tag}.example")
    with pytest.raises(NotFoundError):
        as_alpha.verify_sso_provider_domain(betas.id, f"beta-{tag}.example")
    assert as_alpha.remove_sso_provider_domain(betas.id, f"beta-{tag}.example") is False
    kept = tenancy["owner"].get_sso_provider(betas.id)
    assert kept is not None and [d.domain for d in kept.domains] == [f"beta-{tag}.example"]
    # A tenant's own provider and its domains are its to manage, created together (one
    # statement: the new provider is not in its snapshot, see sso_provider_is_foreign) or later.
    own = as_alpha.create_sso_provider(
        type="oidc", name="Alpha's", client_id="a", org_id=alpha.id, domains=[f"a1-{tag}.example"]
    )
    assert [d.domain for d in own.domains] == [f"a1-{tag}.example"]
    added = as_alpha.add_sso_provider_domain(own.id, f"alpha-{tag}.example", verified=True)
    assert added.verified_at is not None
    replaced = as_alpha.update_sso_provider(own.id, domains=[f"a2-{tag}.example"])
    assert replaced is not None and [d.domain for d in replaced.domains] == [f"a2-{tag}.example"]
    assert as_alpha.remove_sso_provider_domain(own.id, f"a2-{tag}.example") is True
    assert as_alpha.delete_sso_provider(own.id) is True
    # Without a tenant nothing is the role's to change, shared providers included.
    with pytest.raises(PermissionDeniedError):
        app.add_sso_provider_domain(providers["shared"].id, f"no-tenant-{tag}.example")


def test_a_transaction_runs_as_one_tenant(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    """tenant() (and with_statement_timeout()) on a transaction's view would change the
    setting for the rest of the transaction, the calls of the original view included: refused."""
    alpha, beta = tenancy["orgs"]
    with app.tenant(alpha.id).transaction() as tx:
        with pytest.raises(ValidationError) as caught:
            tx.tenant(beta.id)
        assert caught.value.field == "transaction"
        with pytest.raises(ValidationError):
            tx.with_statement_timeout(1000)
        assert tx.get_organization(beta.id) is None
        found = tx.get_organization(alpha.id)
        assert found is not None and found.name == "alpha"


def test_a_tenant_deleting_its_own_organization_leaves_no_shared_provider(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    """A tenant may delete its own organization; its SSO providers go with it. They used to stay
    as shared providers (org_id NULL), which no tenant may create: readable by every tenant,
    verified domains included, and removable by the owner only."""
    owner, alpha = tenancy["owner"], tenancy["orgs"][0]
    tag = uuid.uuid4().hex[:6]
    doomed = owner.create_organization(name="doomed", plan="team")
    as_doomed = app.tenant(doomed.id)
    own = as_doomed.create_sso_provider(
        type="oidc", name="Evil IdP", client_id="e", org_id=doomed.id
    )
    as_doomed.add_sso_provider_domain(own.id, f"evil-{tag}.example", verified=True)
    user = owner.create_user(email=f"doomed-{tag}@example.com")
    link = as_doomed.create_sso_link(
        user_id=user.id, provider_id=own.id, provider_type="oidc", provider_subject="s"
    )
    assert as_doomed.delete_organization(doomed.id) is True
    assert owner.get_sso_provider(own.id) is None
    assert owner.get_sso_link(link.id) is None
    assert own.id not in [p.id for p in owner.list_sso_providers()]
    assert own.id not in [p.id for p in app.tenant(alpha.id).list_sso_providers(alpha.id)]
    assert app.get_sso_provider_by_domain(f"x@evil-{tag}.example") is None


def test_another_tenants_sso_links_and_sessions_are_out_of_reach(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any]
) -> None:
    """Links and SSO sessions follow their provider, as its domains do: those on another
    tenant's provider are invisible (reads find nothing, deletes change nothing) and cannot be
    created (a reference is not checked by row-level security: without the policies a tenant read
    another's links, planted links and sessions on its provider and deleted its links). The
    tenant owning the provider manages them."""
    owner, (alpha, beta) = tenancy["owner"], tenancy["orgs"]
    as_alpha, as_beta, betas = app.tenant(alpha.id), app.tenant(beta.id), providers["beta"]
    tag = uuid.uuid4().hex[:6]
    bob = owner.create_user(email=f"bob-{tag}@example.com")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    base = {"user_id": bob.id, "provider_id": betas.id, "provider_type": "oidc"}
    link = owner.create_sso_link(**base, provider_subject="bob", provider_email="bob@b.example")
    sso_session = owner.create_sso_session(**base, provider_subject="bob", expires_at=expires)
    link = owner.get_sso_link(link.id)  # the session recorded its sign-in on the link
    assert link is not None and link.last_auth_at == sso_session.last_auth_at

    assert as_alpha.get_sso_link(link.id) is None
    assert as_alpha.get_user_sso_links(bob.id) == []
    assert as_alpha.get_sso_session(sso_session.id) is None
    assert app.get_sso_link(link.id) is None  # no tenant: fail closed
    with pytest.raises(PermissionDeniedError):
        as_alpha.create_sso_link(**base, provider_subject="planted")
    with pytest.raises(PermissionDeniedError):
        as_alpha.create_sso_session(**base, provider_subject="planted", expires_at=expires)
    assert as_alpha.delete_sso_link(link.id) is False
    assert owner.get_user_sso_links(bob.id) == [link]
    assert owner.get_sso_session(sso_session.id) == sso_session

    # Beta, whose provider it is, reads and manages them.
    assert as_beta.get_sso_link(link.id) == link
    assert as_beta.get_sso_session(sso_session.id) == sso_session
    planted = as_beta.create_sso_link(**base, provider_subject="planted")
    assert as_beta.create_sso_session(**base, provider_subject="planted", expires_at=expires)
    assert [x.id for x in as_beta.get_user_sso_links(bob.id)] == [planted.id, link.id]
    assert as_beta.delete_sso_link(link.id) is True
    assert [x.id for x in owner.get_user_sso_links(bob.id)] == [planted.id]


def test_links_and_sessions_on_a_shared_provider_are_read_only_for_tenants(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any]
) -> None:
    """Rows on a shared provider belong to no organization: every tenant, and a role without a
    tenant, reads them as it reads the provider; only the owner creates or deletes them."""
    owner, alpha = tenancy["owner"], tenancy["orgs"][0]
    as_alpha, shared = app.tenant(alpha.id), providers["shared"]
    tag = uuid.uuid4().hex[:6]
    ann = owner.create_user(email=f"ann-{tag}@example.com")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    base = {"user_id": ann.id, "provider_id": shared.id, "provider_type": "oidc"}
    link = owner.create_sso_link(**base, provider_subject="ann")
    sso_session = owner.create_sso_session(**base, provider_subject="ann", expires_at=expires)
    link = owner.get_sso_link(link.id)  # the session recorded its sign-in on the link
    assert link is not None
    for reader in (as_alpha, app):
        assert reader.get_sso_link(link.id) == link
        assert reader.get_user_sso_links(ann.id) == [link]
        assert reader.get_sso_session(sso_session.id) == sso_session
        with pytest.raises(PermissionDeniedError):
            reader.create_sso_link(**base, provider_subject="other")
        with pytest.raises(PermissionDeniedError):
            reader.create_sso_session(**base, provider_subject="other", expires_at=expires)
        assert reader.delete_sso_link(link.id) is False
    assert owner.get_user_sso_links(ann.id) == [link]


def test_a_tenant_ends_only_its_own_providers_sso_sessions(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any]
) -> None:
    """Logout (delete_sso_session, delete_sso_sessions, delete_user_sso_sessions, and
    delete_sso_link with the sessions it ends) follows the provider as reads do: a tenant ends
    the sessions of its own providers only, never another tenant's or a shared provider's,
    whatever ids, subjects or session tokens it names."""
    owner, (alpha, beta) = tenancy["owner"], tenancy["orgs"]
    as_alpha, as_beta = app.tenant(alpha.id), app.tenant(beta.id)
    betas, shared = providers["beta"], providers["shared"]
    tag = uuid.uuid4().hex[:6]
    cal = owner.create_user(email=f"cal-{tag}@example.com")
    alphas = owner.create_sso_provider(type="oidc", name="Alpha's", client_id="a", org_id=alpha.id)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

    def session(provider: Any, subject: str = "cal") -> Any:
        return owner.create_sso_session(
            user_id=cal.id,
            provider_id=provider.id,
            provider_type="oidc",
            provider_subject=subject,
            expires_at=expires,
            session_token=f"sid-{tag}",
        )

    at_beta, at_shared, at_alpha = session(betas), session(shared), session(alphas)
    beta_link = owner.create_sso_link(
        user_id=cal.id, provider_id=betas.id, provider_type="oidc", provider_subject="linked"
    )
    linked_at_beta = session(betas, "linked")
    foreign = [at_beta, at_shared, linked_at_beta]
    for provider, session_ in ((betas, at_beta), (shared, at_shared)):
        assert as_alpha.delete_sso_session(session_.id) is False
        logout = {"provider_id": provider.id, "session_token": f"sid-{tag}"}
        assert as_alpha.delete_sso_sessions(**logout) == []
        assert as_alpha.delete_sso_sessions(**logout, provider_subject="cal") == []
        assert as_alpha.delete_sso_sessions(provider_id=provider.id, provider_subject="cal") == []
    assert as_alpha.delete_sso_link(beta_link.id) is False
    assert app.delete_user_sso_sessions(cal.id) == 0  # no tenant: fail closed
    # Alpha's own: all of the user's sessions it may see are at alpha's provider.
    assert as_alpha.delete_user_sso_sessions(cal.id) == 1
    assert owner.get_sso_session(at_alpha.id) is None
    for kept in foreign:
        assert owner.get_sso_session(kept.id) == kept

    # Beta ends those of its provider, the link's included, but not the shared provider's.
    assert as_beta.delete_sso_link(beta_link.id) is True
    assert owner.get_sso_session(linked_at_beta.id) is None
    ended = as_beta.delete_sso_sessions(provider_id=betas.id, session_token=f"sid-{tag}")
    assert [s.id for s in ended] == [at_beta.id]
    assert as_beta.delete_user_sso_sessions(cal.id) == 0
    assert owner.get_sso_session(at_shared.id) == at_shared
    assert owner.delete_user_sso_sessions(cal.id) == 1


def test_a_tenants_logout_ends_the_app_sessions_of_the_users_it_signed_out(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any]
) -> None:
    """delete_sso_sessions(end_user_sessions=True) ends the application sessions of the users
    whose SSO sessions it ended: a tenant naming another tenant's or a shared provider ends no
    SSO session, so no application session either. A tenant ending its own provider's SSO
    session ends that user's application sessions bound to it or to no organization; the one
    bound to another organization stays."""
    owner, (alpha, beta) = tenancy["owner"], tenancy["orgs"]
    as_alpha, as_beta = app.tenant(alpha.id), app.tenant(beta.id)
    betas, shared = providers["beta"], providers["shared"]
    tag = uuid.uuid4().hex[:6]
    dan = owner.create_user(email=f"dan-{tag}@example.com")
    for org in (alpha, beta):
        owner.add_organization_member(org.id, dan.id)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    base = {"user_id": dan.id, "provider_type": "oidc", "provider_subject": "dan"}
    at_beta = owner.create_sso_session(
        **base, provider_id=betas.id, expires_at=expires, session_token=f"sid-{tag}"
    )
    at_shared = owner.create_sso_session(
        **base, provider_id=shared.id, expires_at=expires, session_token=f"sid-{tag}"
    )
    bound = {
        org: owner.create_session(user_id=dan.id, expires_at=expires, org_id=org).id
        for org in (alpha.id, beta.id, None)
    }
    sessions = set(bound.values())

    def left() -> set[Any]:
        return {s.id for s in owner.list_user_sessions(dan.id)}

    for view in (as_alpha, app):
        for provider in (betas, shared):
            logout = {"provider_id": provider.id, "end_user_sessions": True}
            assert view.delete_sso_sessions(**logout, session_token=f"sid-{tag}") == []
            assert view.delete_sso_sessions(**logout, provider_subject="dan") == []
    assert (
        as_beta.delete_sso_sessions(
            provider_id=shared.id, provider_subject="dan", end_user_sessions=True
        )
        == []
    )
    assert left() == sessions
    ended = as_beta.delete_sso_sessions(
        provider_id=betas.id, session_token=f"sid-{tag}", end_user_sessions=True
    )
    assert [s.id for s in ended] == [at_beta.id]
    assert left() == {bound[alpha.id]}  # beta's and the unbound one ended, alpha's stays
    assert owner.get_sso_session(at_shared.id) == at_shared


def test_a_tenants_log_out_everywhere_waits_for_a_removal_from_another_tenants_organization(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], dsn: str
) -> None:
    """delete_user_sessions locks the memberships the user's sessions rest on before it deletes
    any session, so a removal (which deletes the membership, then its sessions) and the logout
    wait for each other rather than deadlock. Through a tenant's view it locked only the
    memberships that tenant sees, and still deleted the sessions bound to other tenants'
    organizations: against a removal from one of those, a deadlock. The lock now sees every
    tenant's (migration 0039): while another transaction holds the user's membership of beta as
    a removal's DELETE would, alpha's logout waits, holding none of the user's sessions (a third
    transaction locks each at once), then ends them all."""
    owner, schema = tenancy["owner"], tenancy["schema"]
    alpha, beta = tenancy["orgs"]
    user = owner.create_user(email=f"fay-{uuid.uuid4().hex[:6]}@example.com")
    for org in (alpha, beta):
        owner.add_organization_member(org.id, user.id)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    sessions = [
        owner.create_session(user_id=user.id, expires_at=expires, org_id=org).id
        for org in (alpha.id, beta.id, None)
    ]
    outcome: dict[str, Any] = {}

    def log_out() -> None:
        try:
            outcome["deleted"] = app.tenant(alpha.id).delete_user_sessions(user.id)
        except Exception as exc:  # handed to the test
            outcome["deleted"] = exc

    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            f"SELECT FROM {schema}.organization_members WHERE org_id = %s AND user_id = %s"
            " FOR UPDATE".encode(),
            [beta.id, user.id],
        )
        thread = threading.Thread(target=log_out)
        thread.start()
        seen = waiting(dsn, f"DELETE FROM {schema}.sessions")
        if seen:
            with psycopg.connect(dsn) as probe:
                probe.execute(
                    f"SELECT FROM {schema}.sessions WHERE id = ANY(%s) FOR UPDATE NOWAIT".encode(),
                    [sessions],
                )
        holder.commit()
        thread.join(20)
    finally:
        holder.close()
    assert seen, "the logout did not wait for the membership of another tenant's organization"
    assert outcome == {"deleted": 3}
    assert owner.list_user_sessions(user.id) == []


# Module level: the routes' annotations are strings (postponed), resolved in these globals.
UNSCOPED_CHECK = require_permission("x")
SCOPED_CHECK = require_permission("x", tenant_scoped=True)


async def test_require_permission_under_row_level_security_needs_tenant_scoped(
    tenancy: dict[str, Any],
) -> None:
    """As the application role without a tenant, no role assignment is visible, so the
    dependency refuses everyone (403); ``tenant_scoped=True`` runs the check as the request's
    organization and grants what the user holds there, and only there."""
    alpha, beta = tenancy["orgs"]
    owner: PostgresStorageAdapter = tenancy["owner"]
    user = tenancy["user"]
    owner.assign_role_to_user(user.id, tenancy["roles"][0].id, alpha.id)  # "x" in alpha only
    token = owner.issue_session_token(
        user_id=user.id, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    ).token
    app = FastAPI(
        lifespan=storage_lifespan(tenancy["app_dsn"], schema=tenancy["schema"], migrate=False)
    )
    add_exception_handlers(app)

    @app.get("/plain")
    async def plain(access: Annotated[OrgAccess, Depends(UNSCOPED_CHECK)]) -> str:
        return str(access.org_id)

    @app.get("/scoped")
    async def scoped(access: Annotated[OrgAccess, Depends(SCOPED_CHECK)]) -> str:
        return str(access.org_id)

    auth = {"Authorization": f"Bearer {token}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            plain_alpha = await client.get("/plain", headers={**auth, "X-Org-Id": str(alpha.id)})
            scoped_alpha = await client.get("/scoped", headers={**auth, "X-Org-Id": str(alpha.id)})
            scoped_beta = await client.get("/scoped", headers={**auth, "X-Org-Id": str(beta.id)})
    assert plain_alpha.status_code == 403, plain_alpha.text
    assert scoped_alpha.status_code == 200 and scoped_alpha.json() == str(alpha.id)
    assert scoped_beta.status_code == 403


def test_a_session_is_bound_only_to_the_tenants_own_organization(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    """Binding a session to an organization reads the organization and the membership under
    row-level security: a tenant binds sessions to its own organization (for a member), not to
    another tenant's, and without a tenant no organization is visible, so none is bound (fail
    closed; before migration 0021 any caller could bind a session to any organization)."""
    alpha, beta = tenancy["orgs"]
    owner = tenancy["owner"]
    user = owner.create_user(email=f"erin-{uuid.uuid4().hex[:6]}@example.com")
    for org in (alpha, beta):
        owner.add_organization_member(org.id, user.id)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    bound = app.tenant(alpha.id).issue_session_token(
        user_id=user.id, org_id=alpha.id, expires_at=expires, event={"type": "login"}
    )
    assert bound.session.org_id == alpha.id
    for view in (app.tenant(alpha.id), app):
        with pytest.raises(NotFoundError):
            view.create_session(user_id=user.id, org_id=beta.id, expires_at=expires)
    with pytest.raises(NotFoundError):
        app.create_session(user_id=user.id, org_id=alpha.id, expires_at=expires)
    unbound = app.create_session(user_id=user.id, expires_at=expires)
    for view, org in ((app, alpha), (app.tenant(alpha.id), beta)):
        with pytest.raises(NotFoundError):
            view.update_session(unbound.id, org_id=org.id)
    assert app.tenant(beta.id).update_session(unbound.id, org_id=beta.id).org_id == beta.id
    sessions = {s.id: s.org_id for s in owner.list_user_sessions(user.id)}
    assert sessions == {bound.session.id: alpha.id, unbound.id: beta.id}


def test_a_reused_token_ends_an_organization_bound_session_without_a_tenant(
    app: PostgresStorageAdapter, tenancy: dict[str, Any]
) -> None:
    """Sessions are not tenant data: the application role rotates without a tenant, and a
    rotated-out token coming back ends the session there too. Its event names no organization
    (the session's is in its data), which row-level security lets any caller write."""
    alpha = tenancy["orgs"][0]
    owner = tenancy["owner"]
    user = owner.create_user(email=f"mallory-{uuid.uuid4().hex[:6]}@example.com")
    owner.add_organization_member(alpha.id, user.id)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    issued = app.tenant(alpha.id).issue_session_token(
        user_id=user.id, org_id=alpha.id, expires_at=expires
    )
    for view in (app, app.tenant(alpha.id)):
        rotated = view.rotate_session_token(issued.token)
        assert rotated is not None
        assert view.rotate_session_token(issued.token, reuse_grace=dt.timedelta(0)) is None
        assert owner.get_session(issued.session.id) is None
        issued = app.tenant(alpha.id).issue_session_token(
            user_id=user.id, org_id=alpha.id, expires_at=expires
        )
    events = owner.list_events(principal_id=user.id, type="session.token_reused").events
    assert [(e.org_id, e.data["org_id"]) for e in events] == [(None, str(alpha.id))] * 2


def test_the_sso_session_purge_refuses_a_role_row_security_keeps_rows_from(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], providers: dict[str, Any], dsn: str
) -> None:
    """Found in review: the application role without a tenant sees no tenant's SSO sessions
    and may not delete a shared provider's, so its purge (``kitium-pg delete-expired`` as that
    role) deleted nothing and said 0, every run. It now refuses, deleting nothing; a tenant
    purges its own providers' expired sessions, and the owner everyone's."""
    owner, (alpha, _beta) = tenancy["owner"], tenancy["orgs"]
    user = owner.create_user(email=f"purged-{uuid.uuid4().hex[:6]}@example.com")
    alphas = owner.create_sso_provider(type="oidc", name="Alpha's", client_id="a", org_id=alpha.id)
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)

    def session(provider: Any) -> Any:
        return owner.create_sso_session(
            user_id=user.id,
            provider_id=provider.id,
            provider_type="oidc",
            provider_subject="purged",
            expires_at=expired,
        )

    at_alpha, at_beta, at_shared = (
        session(alphas),
        session(providers["beta"]),
        session(providers["shared"]),
    )
    ids = [at_alpha.id, at_beta.id, at_shared.id]

    def left() -> list[uuid.UUID]:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                f"SELECT id FROM {tenancy['schema']}.sso_sessions WHERE id = ANY (%s)".encode(),
                [ids],
            ).fetchall()
        return [i for i in ids if (i,) in rows]

    with pytest.raises(PermissionDeniedError) as refused:
        app.delete_expired_sso_sessions()
    assert "tenant_rls" in str(refused.value)
    assert left() == ids
    assert app.tenant(alpha.id).delete_expired_sso_sessions() == 1
    assert left() == ids[1:]
    assert owner.delete_expired_sso_sessions() >= 2
    assert left() == []


# The policies beside tenant_rls's that must make the SSO session purge, run by the role that
# applied tenant_rls, refuse: those that keep rows from its reads, updates (it locks its batch
# FOR UPDATE, which UPDATE policies filter) or deletes; and only those.
PURGE_REFUSED = frozenset(
    {
        "a restrictive policy on updates only",
        "a restrictive policy on deletes only",
        "a restrictive policy that hides rows",
        "owner_access for reads only",
        "owner_access restrictive",
    }
)


@pytest.mark.parametrize("case", POLICIES_BESIDE_TENANT_RLS)
def test_the_sso_session_purge_by_the_owner_refuses_only_when_a_policy_hides_rows(
    dsn: str, schema: str, login_role: str, owner_dsn: str, case: str
) -> None:
    """The role that applied tenant_rls (here not a superuser) purges every tenant's expired
    SSO sessions: its owner_access policy shows it every row. Only a policy that keeps rows
    from its reads, updates (it locks its batch FOR UPDATE) or deletes makes it refuse, and
    then nothing is deleted (a WITH CHECK, or a policy on inserts, does not)."""
    refused = case in PURGE_REFUSED
    options: dict[str, Any] = {"schema": schema, "optional_migrations": ["tenant_rls"]}
    expired = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with PostgresStorageAdapter(owner_dsn, **options) as owner:
        user = owner.create_user()
        for n in range(2):
            org = owner.create_organization(name=f"Tenant {n}", plan="free")
            provider = owner.create_sso_provider(type="oidc", name=f"IdP {n}", org_id=org.id)
            owner.create_sso_session(
                user_id=user.id,
                provider_id=provider.id,
                provider_type="oidc",
                provider_subject="s",
                expires_at=expired,
            )
    set_policies(dsn, case, f"{schema}.sso_sessions", login_role)
    with PostgresStorageAdapter(owner_dsn, **options) as owner:
        if refused:
            with pytest.raises(PermissionDeniedError, match="row-level security hides"):
                owner.delete_expired_sso_sessions()
        else:
            assert owner.delete_expired_sso_sessions() == 2
    with psycopg.connect(dsn) as conn:
        left = conn.execute(f"SELECT count(*) FROM {schema}.sso_sessions".encode()).fetchone()
    assert left == ((2,) if refused else (0,))


def test_the_grants_hold_no_privilege_the_adapter_does_not_use(
    app: PostgresStorageAdapter, tenancy: dict[str, Any], dsn: str
) -> None:
    """Found in the fourth review: the grants gave UPDATE on user_roles and DELETE on
    email_verification_token_attempts, which no statement of the adapter uses (a counter goes
    with its token, by the foreign key's cascade, which runs as the table's owner). Both are
    gone, and the calls that write those tables work as the application role."""
    schema, role = tenancy["schema"], tenancy["role"]
    with psycopg.connect(dsn, autocommit=True) as admin:

        def can(table: str, privilege: str) -> bool:
            row = admin.execute(
                "SELECT has_table_privilege(%s, %s, %s)", [role, f"{schema}.{table}", privilege]
            ).fetchone()
            return row is not None and bool(row[0])

        assert not can("user_roles", "UPDATE")
        assert not can("email_verification_token_attempts", "DELETE")
        assert can("user_roles", "DELETE") and can("email_verification_token_attempts", "UPDATE")
        user = app.create_user(email=f"grants-{uuid.uuid4().hex[:8]}@example.com")

        def new_token(code_hash: str) -> Any:
            return app.create_email_verification_token(
                email=user.email or "",
                code_hash=code_hash,
                type="email_verification",
                expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
                user_id=user.id,
            )

        token = new_token("0" * 64)
        assert app.increment_email_verification_token_attempts(token.id) == 1
        assert app.increment_email_verification_token_attempts(token.id) == 2
        admin.execute(
            f"UPDATE {schema}.email_verification_tokens SET expires_at = now() - interval '1s'"
            " WHERE id = %s".encode(),
            [token.id],
        )
        assert app.delete_expired_email_verification_tokens() >= 1
        assert app.get_email_verification_token_attempts(token.id) == 0
        again = new_token("1" * 64)
        assert app.increment_email_verification_token_attempts(again.id) == 1
        assert app.delete_user(user.id) is True  # its tokens and their counters go with it
        row = admin.execute(
            f"SELECT count(*) FROM {schema}.email_verification_token_attempts"
            " WHERE token_id = %s".encode(),
            [again.id],
        ).fetchone()
        assert row == (0,)

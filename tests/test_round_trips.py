"""Deterministic performance: every single-entity method costs exactly one round trip, and
batch methods a number of round trips that does not grow with the batch."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import psycopg
import pytest

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    ConflictError,
    PostgresStorageAdapter,
    ValidationError,
)
from kitium_pg._base import Retry

from .roundtrips import count, round_trips, strays, traced

# psycopg prepares a statement the first time it runs more than ``prepare_threshold`` times on a
# connection, and preparing is a round trip of its own (Parse, then Bind/Execute): that one
# call costs 2 (pinned by test_preparing_a_statement_costs_one_extra_round_trip_once). The
# counting adapters turn preparation off so every count is the steady state, whatever order
# the tests run in and however often earlier tests ran a statement on the shared connection.
ONE_CONNECTION: dict[str, Any] = {"min_size": 1, "max_size": 1, "prepare_threshold": None}


@pytest.fixture(scope="module")
def sync_one(dsn: str, encryption_keys: dict[str, str]) -> Iterator[PostgresStorageAdapter]:
    with PostgresStorageAdapter(dsn, **ONE_CONNECTION, encryption_keys=encryption_keys) as adapter:
        yield adapter


@pytest.fixture(scope="module")
async def async_one(
    dsn: str, encryption_keys: dict[str, str]
) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    async with AsyncPostgresStorageAdapter(
        dsn, **ONE_CONNECTION, encryption_keys=encryption_keys
    ) as adapter:
        yield adapter


@pytest.fixture(params=["sync", "async"])
def one_conn(request: pytest.FixtureRequest) -> Any:
    """An adapter whose pool holds exactly one connection (so the trace sees everything)."""
    return request.getfixturevalue(f"{request.param}_one")


@pytest.fixture(params=["sync", "async"])
async def private_one(
    request: pytest.FixtureRequest, dsn: str, encryption_keys: dict[str, str]
) -> AsyncIterator[Any]:
    """A one-connection adapter on a schema of its own, so the expired rows other tests leave
    behind cannot change how many batches a cleanup takes."""
    schema = f"rt_{uuid.uuid4().hex}"
    options: dict[str, Any] = {
        **ONE_CONNECTION,
        "schema": schema,
        "encryption_keys": encryption_keys,
    }
    try:
        if request.param == "sync":
            with PostgresStorageAdapter(dsn, **options) as adapter:
                yield adapter
        else:
            async with AsyncPostgresStorageAdapter(dsn, **options) as async_adapter:
                yield async_adapter
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


def _later() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


def _earlier() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)


def _digest(text: str) -> str:
    """A realistic stored digest (64 hex characters) of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()


# Public methods that are not one statement on one entity, so the table below leaves them out.
# Anything else public must have a row in ``_calls``: a new method fails
# ``test_the_table_covers_every_public_method`` until its round trips are measured.
NOT_SINGLE_ENTITY = frozenset(
    {
        # Lifecycle and schema management: run once per process or deployment, not per request.
        "connect",
        "disconnect",
        "migrate",
        "rollback",
        "migration_status",
        "health_check",
        "grant_app_role",
        "app_role_grants",  # builds SQL text, no I/O
        # Views and transactions: they wrap other calls (the override cost is tested below).
        "transaction",
        "run_in_transaction",
        "with_statement_timeout",
        "tenant",
        # Maintenance walks: one read and one write per batch, for every encrypted column.
        "rotate_keys",
        # Batched cleanups: (rows // batch_size) + 1 statements, see
        # test_batched_cleanups_cost_one_statement_per_batch.
        "delete_expired_sessions",
        "delete_expired_email_verification_tokens",
        "delete_expired_two_factor_sessions",
        "delete_expired_sso_sessions",
        "prune_events",
        "delete_principal_events",
    }
)


def _calls(s: Any, ctx: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, call) for every single-entity method, in dependency order; ``ctx`` carries what
    earlier calls returned, under their names (``ctx["create_user"]`` is the user made first).
    A name may carry a ``[variant]`` suffix when one method has several query paths."""
    tag = uuid.uuid4().hex[:10]
    email = f"rt-{tag}@example.com"
    domain = f"rt-{tag}.example.com"
    other_domain = f"sso-{tag}.example.com"
    codes = [_digest(f"backup-{tag}-{n}") for n in range(4)]

    def user() -> uuid.UUID:
        return uuid.UUID(str(ctx["create_user"].id))

    def org() -> uuid.UUID:
        return uuid.UUID(str(ctx["create_organization"].id))

    def role() -> uuid.UUID:
        return uuid.UUID(str(ctx["create_role"].id))

    def provider() -> uuid.UUID:
        return uuid.UUID(str(ctx["create_sso_provider"].id))

    def device() -> uuid.UUID:
        return uuid.UUID(str(ctx["create_two_factor_device"].id))

    def sso_session() -> Any:
        """An SSO session of the user's linked identity, with a provider session token."""
        return s.create_sso_session(
            user_id=user(),
            provider_id=provider(),
            provider_type="oidc",
            provider_subject=f"sub-{tag}",
            expires_at=_later(),
            session_token=f"idp-session-{tag}",
        )

    return [
        # users
        ("create_user", lambda: s.create_user(email=email, password_hash=_digest("pw"))),
        ("get_user", lambda: s.get_user(user())),
        ("get_user_by_email", lambda: s.get_user_by_email(email.upper())),
        ("update_user", lambda: s.update_user(user(), name="Ada")),
        ("mark_user_email_verified", lambda: s.mark_user_email_verified(user(), email)),
        ("set_password_hash", lambda: s.set_password_hash(user(), _digest("pw2"))),
        ("get_password_hash", lambda: s.get_password_hash(user())),
        (
            "link_oauth_account",
            lambda: s.link_oauth_account(
                user(), "gh", sub=tag, access_token="gho_access", refresh_token="ghr_refresh"
            ),
        ),
        ("get_oauth_tokens", lambda: s.get_oauth_tokens(user(), "gh")),
        ("claim_oauth_refresh", lambda: s.claim_oauth_refresh(user(), "gh")),
        (
            "update_oauth_tokens",
            lambda: s.update_oauth_tokens(
                user(), "gh", access_token="gho_fresh", refresh_token="ghr_fresh"
            ),
        ),
        ("get_user_by_oauth", lambda: s.get_user_by_oauth("gh", tag)),
        ("unlink_oauth_account", lambda: s.unlink_oauth_account(user(), "gh")),
        # organizations
        (
            "create_organization",
            lambda: s.create_organization(
                name=f"org-{tag}", plan="team", seats=5, members=[{"user_id": user()}]
            ),
        ),
        ("get_organization", lambda: s.get_organization(org())),
        (
            "update_organization",
            lambda: s.update_organization(
                org(), name=f"org2-{tag}", members=[{"user_id": user(), "role": "owner"}]
            ),
        ),
        ("add_organization_member", lambda: s.add_organization_member(org(), user(), role="admin")),
        (
            "set_organization_member_role",
            lambda: s.set_organization_member_role(org(), user(), "admin", keep_last="member"),
        ),
        ("list_organization_members", lambda: s.list_organization_members(org())),
        (
            "list_organization_members[page]",
            lambda: s.list_organization_members(org(), limit=1),
        ),
        (
            "list_organization_members[after]",
            lambda: s.list_organization_members(
                org(), after=ctx["list_organization_members[page]"][0], limit=10
            ),
        ),
        ("get_organization_member", lambda: s.get_organization_member(org(), user())),
        ("list_user_organizations", lambda: s.list_user_organizations(user())),
        # rbac
        (
            "create_role",
            lambda: s.create_role(
                org_id=org(),
                name=f"role-{tag}",
                permissions=[{"name": "users:read", "resource": "users", "action": "read"}],
            ),
        ),
        ("get_role", lambda: s.get_role(role())),
        (
            "update_role",
            lambda: s.update_role(role(), permissions=[{"name": "users:read"}, {"name": "x:y"}]),
        ),
        ("list_roles", lambda: s.list_roles(org())),
        ("assign_role_to_user", lambda: s.assign_role_to_user(user(), role(), org())),
        ("get_user_roles", lambda: s.get_user_roles(user(), org())),
        ("get_user_permissions", lambda: s.get_user_permissions(user(), org())),
        ("has_permission", lambda: s.has_permission(user(), org(), "users:read")),
        ("revoke_role_from_user", lambda: s.revoke_role_from_user(user(), role(), org())),
        ("set_user_roles", lambda: s.set_user_roles(user(), org(), [role()])),
        ("get_role_users", lambda: s.get_role_users(role())),
        ("get_role_users[page]", lambda: s.get_role_users(role(), limit=1)),
        (
            "get_role_users[after]",
            lambda: s.get_role_users(role(), after=ctx["get_role_users[page]"][0], limit=10),
        ),
        # sessions and session tokens
        (
            "create_session",
            lambda: s.create_session(user_id=user(), expires_at=_later(), org_id=org()),
        ),
        (
            "create_session[event]",
            lambda: s.create_session(
                user_id=user(), expires_at=_later(), event={"type": "login", "data": {"ip": "::1"}}
            ),
        ),
        (
            "issue_session_token[event]",
            lambda: s.issue_session_token(
                user_id=user(), expires_at=_later(), event={"type": "login"}
            ),
        ),
        ("get_session", lambda: s.get_session(ctx["create_session"].id)),
        ("update_session", lambda: s.update_session(ctx["create_session"].id, plan="pro")),
        (
            "update_session[org]",
            lambda: s.update_session(ctx["create_session"].id, org_id=org(), plan="team"),
        ),
        ("list_user_sessions", lambda: s.list_user_sessions(user())),
        ("list_user_sessions[page]", lambda: s.list_user_sessions(user(), limit=1)),
        (
            "list_user_sessions[after]",
            lambda: s.list_user_sessions(user(), after=ctx["list_user_sessions[page]"][0]),
        ),
        ("issue_session_token", lambda: s.issue_session_token(user_id=user(), expires_at=_later())),
        (
            "validate_session_token",
            lambda: s.validate_session_token(ctx["issue_session_token"].token),
        ),
        (
            "rotate_session_token",
            lambda: s.rotate_session_token(ctx["issue_session_token[event]"].token),
        ),
        (
            "rotate_session_token[reused]",
            lambda: s.rotate_session_token(
                ctx["issue_session_token[event]"].token, reuse_grace=dt.timedelta(0)
            ),
        ),
        (
            "get_session[reused]",
            lambda: s.get_session(
                ctx["issue_session_token[event]"].session.id, consistency="primary"
            ),
        ),
        # API keys
        (
            "create_api_key",
            lambda: s.create_api_key(
                principal_id=user(), hash=_digest(f"key-{tag}"), prefix="rt", last_four="abcd"
            ),
        ),
        ("get_api_key", lambda: s.get_api_key(ctx["create_api_key"].id)),
        ("get_api_key_by_hash", lambda: s.get_api_key_by_hash(_digest(f"key-{tag}"))),
        (
            "get_api_keys_by_prefix_and_last_four",
            lambda: s.get_api_keys_by_prefix_and_last_four("rt", "abcd"),
        ),
        ("update_api_key", lambda: s.update_api_key(ctx["create_api_key"].id, scopes=["read"])),
        ("list_api_keys", lambda: s.list_api_keys(user())),
        ("issue_api_key", lambda: s.issue_api_key(user(), ["read"], expires_at=_later())),
        ("verify_api_key", lambda: s.verify_api_key(ctx["issue_api_key"].key)),
        ("delete_api_key", lambda: s.delete_api_key(ctx["create_api_key"].id)),
        ("delete_user_api_keys", lambda: s.delete_user_api_keys(user())),
        # email verification
        (
            "create_email_verification_token",
            lambda: s.create_email_verification_token(
                email=email,
                code_hash=_digest(f"code-{tag}"),
                type="email_verification",
                expires_at=_later(),
                user_id=user(),
            ),
        ),
        ("get_email_verification_tokens", lambda: s.get_email_verification_tokens(email)),
        (
            "revoke_email_verification_tokens",
            lambda: s.revoke_email_verification_tokens(email, "password_reset"),
        ),
        (
            "get_email_verification_tokens[type]",
            lambda: s.get_email_verification_tokens(email, "email_verification"),
        ),
        (
            "get_email_verification_token_by_id",
            lambda: s.get_email_verification_token_by_id(ctx["create_email_verification_token"].id),
        ),
        (
            "increment_email_verification_token_attempts",
            lambda: s.increment_email_verification_token_attempts(
                ctx["create_email_verification_token"].id
            ),
        ),
        (
            "get_email_verification_token_attempts",
            lambda: s.get_email_verification_token_attempts(
                ctx["create_email_verification_token"].id
            ),
        ),
        (
            "mark_email_verification_token_as_used",
            lambda: s.mark_email_verification_token_as_used(
                ctx["create_email_verification_token"].id
            ),
        ),
        # events
        (
            "emit_event",
            lambda: s.emit_event(
                type="login", principal_id=user(), data={"ip": "192.0.2.1"}, org_id=org()
            ),
        ),
        (
            "emit_events",
            lambda: s.emit_events(
                [{"type": "logout", "principal_id": user(), "data": {}, "org_id": org()}] * 3
            ),
        ),
        ("list_events", lambda: s.list_events(limit=10)),
        ("list_events[principal]", lambda: s.list_events(principal_id=user(), type="login")),
        ("list_events[org]", lambda: s.list_events(org_id=org(), limit=2)),
        (
            "list_events[after]",
            lambda: s.list_events(org_id=org(), limit=2, after=ctx["list_events[org]"].next_cursor),
        ),
        # SSO
        (
            "create_sso_provider",
            lambda: s.create_sso_provider(
                type="oidc",
                name=f"idp-{tag}",
                org_id=org(),
                client_id="client",
                client_secret="client-secret-value",
                scopes=["openid", "email"],
                redirect_uris=["https://app.example.com/callback"],
                domains=[domain],
            ),
        ),
        ("get_sso_provider", lambda: s.get_sso_provider(provider())),
        (
            "update_sso_provider",
            lambda: s.update_sso_provider(
                provider(), name=f"idp2-{tag}", client_secret="rotated-secret", domains=[domain]
            ),
        ),
        ("list_sso_providers", lambda: s.list_sso_providers()),
        ("list_sso_providers[org]", lambda: s.list_sso_providers(org())),
        ("add_sso_provider_domain", lambda: s.add_sso_provider_domain(provider(), other_domain)),
        (
            "verify_sso_provider_domain",
            lambda: s.verify_sso_provider_domain(provider(), other_domain),
        ),
        (
            "get_sso_provider_by_domain",
            lambda: s.get_sso_provider_by_domain(f"someone@{other_domain.upper()}"),
        ),
        ("remove_sso_provider_domain", lambda: s.remove_sso_provider_domain(provider(), domain)),
        (
            "create_sso_link",
            lambda: s.create_sso_link(
                user_id=user(),
                provider_id=provider(),
                provider_type="oidc",
                provider_subject=f"sub-{tag}",
                provider_email=email,
            ),
        ),
        ("get_sso_link", lambda: s.get_sso_link(ctx["create_sso_link"].id)),
        (
            "get_sso_link_by_subject",
            lambda: s.get_sso_link_by_subject(
                ctx["create_sso_link"].provider_id, ctx["create_sso_link"].provider_subject
            ),
        ),
        ("get_user_sso_links", lambda: s.get_user_sso_links(user())),
        ("create_sso_session", sso_session),
        ("get_sso_session", lambda: s.get_sso_session(ctx["create_sso_session"].id)),
        (
            "delete_sso_sessions[token]",
            lambda: s.delete_sso_sessions(
                provider_id=provider(),
                provider_subject=f"sub-{tag}",
                session_token=f"idp-session-{tag}",
            ),
        ),
        ("create_sso_session[by subject]", sso_session),
        (
            "delete_sso_sessions[subject]",
            lambda: s.delete_sso_sessions(provider_id=provider(), provider_subject=f"sub-{tag}"),
        ),
        ("create_user[signed out]", lambda: s.create_user()),
        (
            "create_sso_session[signed out]",
            lambda: s.create_sso_session(
                user_id=ctx["create_user[signed out]"].id,
                provider_id=provider(),
                provider_type="oidc",
                provider_subject=f"out-{tag}",
                expires_at=_later(),
                session_token=f"idp-out-{tag}",
            ),
        ),
        (
            "create_session[signed out]",
            lambda: s.create_session(
                user_id=ctx["create_user[signed out]"].id, expires_at=_later()
            ),
        ),
        (
            "delete_sso_sessions[end_user_sessions]",
            lambda: s.delete_sso_sessions(
                provider_id=provider(), session_token=f"idp-out-{tag}", end_user_sessions=True
            ),
        ),
        (
            "get_session[signed out]",
            lambda: s.get_session(ctx["create_session[signed out]"].id, consistency="primary"),
        ),
        ("create_sso_session[unlinked]", sso_session),
        ("delete_sso_link", lambda: s.delete_sso_link(ctx["create_sso_link"].id)),
        (
            "get_sso_session[unlinked]",
            lambda: s.get_sso_session(ctx["create_sso_session[unlinked]"].id),
        ),
        ("create_sso_session[by id]", sso_session),
        (
            "delete_sso_session",
            lambda: s.delete_sso_session(ctx["create_sso_session[by id]"].id),
        ),
        ("create_sso_session[by user]", sso_session),
        ("delete_user_sso_sessions", lambda: s.delete_user_sso_sessions(user())),
        ("delete_sso_provider", lambda: s.delete_sso_provider(provider())),
        # 2FA
        (
            "create_two_factor_device",
            lambda: s.create_two_factor_device(
                user_id=user(), method="totp", name="phone", secret="JBSWY3DPEHPK3PXP"
            ),
        ),
        ("get_two_factor_device", lambda: s.get_two_factor_device(device())),
        ("list_two_factor_devices", lambda: s.list_two_factor_devices(user())),
        (
            "update_two_factor_device",
            lambda: s.update_two_factor_device(device(), verified=True, secret="KRSXG5CTMVRXEZLU"),
        ),
        ("record_totp_step", lambda: s.record_totp_step(device(), 58_000_000)),
        ("create_backup_codes", lambda: s.create_backup_codes(user(), codes)),
        ("get_backup_codes", lambda: s.get_backup_codes(user())),
        (
            "mark_backup_code_used",
            lambda: s.mark_backup_code_used(ctx["create_backup_codes"][0].id),
        ),
        ("consume_backup_code", lambda: s.consume_backup_code(user(), codes[1])),
        (
            "create_two_factor_session",
            lambda: s.create_two_factor_session(
                user_id=user(),
                session_id=ctx["create_session"].id,
                device_id=device(),
                method="totp",
                expires_at=_later(),
                code_hash=_digest(f"otp-{tag}"),
            ),
        ),
        (
            "get_two_factor_session",
            lambda: s.get_two_factor_session(ctx["create_two_factor_session"].id),
        ),
        (
            "increment_two_factor_attempts",
            lambda: s.increment_two_factor_attempts(ctx["create_two_factor_session"].id),
        ),
        (
            "count_two_factor_attempt",
            lambda: s.count_two_factor_attempt(
                ctx["create_two_factor_session"].id, backup_code=True
            ),
        ),
        # The code counted above was charged to the device until a right one: this is it.
        ("record_totp_step[right code]", lambda: s.record_totp_step(device(), 58_000_001)),
        (
            "verify_two_factor_session",
            lambda: s.verify_two_factor_session(
                ctx["create_two_factor_session"].id, _digest(f"wrong-{tag}")
            ),
        ),
        (
            "complete_two_factor_session",
            lambda: s.complete_two_factor_session(ctx["create_two_factor_session"].id),
        ),
        (
            "delete_two_factor_session",
            lambda: s.delete_two_factor_session(ctx["create_two_factor_session"].id),
        ),
        ("delete_two_factor_device", lambda: s.delete_two_factor_device(device())),
        # teardown, each a measured call too
        ("delete_session", lambda: s.delete_session(ctx["create_session"].id)),
        ("delete_user_sessions", lambda: s.delete_user_sessions(user())),
        (
            "remove_organization_member",
            lambda: s.remove_organization_member(org(), user(), keep_last="owner"),
        ),
        ("delete_role", lambda: s.delete_role(role())),
        ("delete_organization", lambda: s.delete_organization(org())),
        ("delete_user", lambda: s.delete_user(user())),
    ]


def _method(name: str) -> str:
    return name.partition("[")[0]


async def test_every_single_entity_method_is_one_round_trip(one_conn: Any) -> None:
    ctx: dict[str, Any] = {}
    measured = {}
    for name, call in _calls(one_conn, ctx):
        trips, result = await round_trips(one_conn, call)
        ctx[name] = result
        measured[name] = trips
    assert measured == dict.fromkeys(measured, 1)
    # The calls did what they were asked (a silent no-op would also be one round trip).
    assert ctx["get_user"] == ctx["create_user"]
    assert ctx["get_password_hash"] == _digest("pw2")
    assert ctx["add_organization_member"].role == "owner"  # an existing member keeps its role
    assert ctx["set_organization_member_role"].role == "admin"
    assert ctx["remove_organization_member"] is True
    assert ctx["get_oauth_tokens"].access_token == "gho_access"
    assert ctx["claim_oauth_refresh"] == ctx["get_oauth_tokens"]
    assert ctx["update_oauth_tokens"].access_token == "gho_fresh"
    assert ctx["has_permission"] is True
    assert ctx["revoke_role_from_user"] is True
    assert ctx["set_user_roles"] == [ctx["update_role"]]  # assigned again
    assert [a.user_id for a in ctx["get_role_users"]] == [ctx["create_user"].id]
    assert ctx["get_role_users[page]"] == ctx["get_role_users"]
    assert ctx["get_role_users[after]"] == []
    assert ctx["list_organization_members[page]"] == ctx["list_organization_members"]
    assert len(ctx["list_organization_members[page]"]) == 1
    assert ctx["list_organization_members[after]"] == []
    assert ctx["list_user_sessions[page]"] == ctx["list_user_sessions"][:1]
    assert ctx["list_user_sessions[after]"] == ctx["list_user_sessions"][1:]
    assert len(ctx["list_user_sessions"]) >= 2
    assert ctx["mark_user_email_verified"].email_verified_at is not None
    assert ctx["validate_session_token"] == ctx["issue_session_token"].session
    assert ctx["rotate_session_token"].session.id == ctx["issue_session_token[event]"].session.id
    assert ctx["rotate_session_token[reused]"] is None  # and the session ended:
    assert ctx["get_session[reused]"] is None
    assert ctx["create_session[event]"].user_id == ctx["issue_session_token[event]"].session.user_id
    assert ctx["verify_api_key"].id == ctx["issue_api_key"].record.id
    assert ctx["get_email_verification_token_attempts"] == 1
    assert ctx["emit_events"] == 3
    assert len(ctx["list_events[org]"].events) == 2
    assert ctx["get_sso_provider_by_domain"].id == ctx["create_sso_provider"].id
    assert ctx["get_sso_provider"].client_secret == "client-secret-value"
    assert ctx["delete_sso_sessions[end_user_sessions]"] == [ctx["create_sso_session[signed out]"]]
    assert ctx["get_session[signed out]"] is None  # ended by the same statement
    assert ctx["record_totp_step"] is True
    assert ctx["mark_backup_code_used"] is True
    assert ctx["consume_backup_code"] is not None
    assert ctx["increment_two_factor_attempts"] == 1
    assert ctx["count_two_factor_attempt"].attempt_count == 2
    assert (
        ctx["verify_two_factor_session"].verified,
        ctx["verify_two_factor_session"].attempt_count,
    ) == (False, 3)
    assert ctx["complete_two_factor_session"] is True
    assert ctx["delete_two_factor_session"] is True
    for deleted in (
        "delete_api_key",
        "delete_sso_link",
        "delete_sso_session",
        "delete_sso_provider",
        "delete_user",
    ):
        assert ctx[deleted] is True, deleted
    for counted in (
        "delete_sso_sessions[token]",
        "delete_sso_sessions[subject]",
        "delete_user_sso_sessions",
        "delete_user_api_keys",
    ):
        ended = ctx[counted]
        assert (ended if isinstance(ended, int) else len(ended)) == 1, counted
    assert ctx["get_sso_session[unlinked]"] is None  # ended with the link


def _public_methods(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, callable) if not name.startswith("_")}


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
def test_the_table_covers_every_public_method(cls: type) -> None:
    listed = [_method(name) for name, _ in _calls(object(), {})]
    public = _public_methods(cls)
    assert public >= NOT_SINGLE_ENTITY, "the exclusion list names a method that is gone"
    assert set(listed) == public - NOT_SINGLE_ENTITY
    assert not set(listed) & NOT_SINGLE_ENTITY


async def test_statement_timeout_override_costs_one_extra_round_trip(one_conn: Any) -> None:
    user = (await round_trips(one_conn, lambda: one_conn.create_user()))[1]
    trips, found = await round_trips(
        one_conn, lambda: one_conn.with_statement_timeout(250).get_user(user.id)
    )
    assert found == user
    assert trips == 2


# What psycopg sent for a call with a statement timeout override before the call opened a
# transaction of its own (libpq trace, two calls): the settings and the statement in an implicit
# transaction, its Sync answered "idle", then the pipeline's closing Sync and a Flush.
_IMPLICIT_TRANSACTION_TRACE = """\
F\t60\tParse\t "" "select set_config('statement_timeout', '5000', true)" 0
F\t14\tBind\t "" "" 0 0 1 0
F\t9\tExecute\t "" 0
F\t16\tParse\t "" "select 1" 0
F\t14\tBind\t "" "" 0 0 1 0
F\t9\tExecute\t "" 0
F\t4\tSync
B\t13\tCommandComplete\t "SELECT 1"
B\t5\tReadyForQuery\t I
F\t4\tSync
F\t4\tFlush
B\t5\tReadyForQuery\t I
F\t16\tParse\t "" "select 1" 0
F\t14\tBind\t "" "" 0 0 1 0
F\t9\tExecute\t "" 0
F\t4\tSync
B\t5\tReadyForQuery\t I
"""


def test_strays_finds_what_follows_the_end_of_a_transaction() -> None:
    assert strays(_IMPLICIT_TRANSACTION_TRACE) == ["Sync", "Flush"]
    inside = _IMPLICIT_TRANSACTION_TRACE.replace("ReadyForQuery\t I", "ReadyForQuery\t T", 2)
    assert strays(inside) == []


# A call with a setting whose statement fails (libpq trace, shortened): the server answered the
# failed statement before psycopg had sent the pipeline's Sync, and psycopg read that answer
# while still sending. Timing alone decides whether the answer comes before or after the Sync.
_EARLY_ERROR_TRACE = """\
F\t14\tParse\t "" "BEGIN;" 0
F\t14\tBind\t "" "" 0 0 1 0
F\t9\tExecute\t "" 0
F\t20\tParse\t "" "INSERT ..." 0
F\t14\tBind\t "" "" 0 0 1 0
F\t9\tExecute\t "" 0
B\t4\tParseComplete
B\t10\tCommandComplete\t "BEGIN"
B\tNN\tErrorResponse\t S "ERROR" V "ERROR" C "23505"
F\t4\tSync
B\t5\tReadyForQuery\t E
F\t13\tQuery\t "ROLLBACK"
B\t13\tCommandComplete\t "ROLLBACK"
B\t5\tReadyForQuery\t I
"""

# COPY FROM STDIN: the client waits for CopyInResponse, then for the end of the copy.
_COPY_TRACE = """\
F\t30\tQuery\t "COPY t FROM STDIN"
B\t7\tCopyInResponse\t 0 0
F\t9\tCopyData\t 'a'
F\t4\tCopyDone
B\t13\tCommandComplete\t "COPY 1"
B\t5\tReadyForQuery\t I
"""


def test_count_takes_only_what_the_client_waited_for() -> None:
    """Round trips are replies to messages that ask for one: the same pipeline counts the same
    whether its early error arrives before or after its Sync, a Flush right after a Sync asks
    for nothing more, and a notice nobody asked for starts no round trip."""
    assert count(_EARLY_ERROR_TRACE) == 2  # the pipeline, then the ROLLBACK
    in_order = _EARLY_ERROR_TRACE.replace("F\t4\tSync\n", "")
    in_order = in_order.replace('F\t9\tExecute\t "" 0\nB', 'F\t9\tExecute\t "" 0\nF\t4\tSync\nB')
    assert in_order.index("Sync") < in_order.index("ErrorResponse")
    assert count(in_order) == 2
    assert count(_IMPLICIT_TRANSACTION_TRACE) == 3  # its Sync + Flush pair is one wait
    assert count(_COPY_TRACE) == 2
    notice = 'B\t40\tNoticeResponse\t S "NOTICE"\n'
    assert count(notice + _COPY_TRACE) == 2
    assert count("F\t4\tSync\nB\t4\tParseComplete\nF\t4\tFlush\nB\t5\tReadyForQuery\t I\n") == 1


def _with_settings(adapter: Any, settings: str) -> Any:
    view = adapter
    if settings in ("tenant", "both"):
        view = view.tenant(uuid.uuid4())
    if settings in ("timeout", "both"):
        view = view.with_statement_timeout(250)
    return view


@pytest.mark.parametrize("settings", ["timeout", "tenant", "both"])
async def test_a_call_with_settings_sends_nothing_after_its_transaction(
    one_conn: Any, settings: str
) -> None:
    """Outside ``transaction()``, a call with transaction-local settings (and every call with
    ``pgbouncer=True``) runs in a transaction of its own and sends nothing between the
    ReadyForQuery that ends it and the next statement: behind PgBouncer's transaction pooling,
    a Sync or Flush sent there would take a server connection of its own, and a bare Flush,
    which gets no answer, keeps that server linked to the client until its next statement
    (seen as a stalled pool in tests/test_pgbouncer.py). Also when the statement fails: the
    transaction is rolled back and the connection is usable."""
    user = (
        await round_trips(
            one_conn, lambda: one_conn.create_user(email=f"rt-{uuid.uuid4().hex}@x.org")
        )
    )[1]
    view = _with_settings(one_conn, settings)
    # round_trips also asserts that nothing strays after the transaction.
    trips, found = await round_trips(one_conn, lambda: view.get_user(user.id))
    assert (trips, found) == (2, user)
    trace, _, error = await traced(one_conn, lambda: view.create_user(email=user.email))
    assert isinstance(error, ConflictError)
    assert strays(trace) == []
    assert count(trace) == 2  # the pipeline, answered with the error; the ROLLBACK
    trips, found = await round_trips(one_conn, lambda: view.get_user(user.id))
    assert (trips, found) == (2, user)


@pytest.mark.parametrize(("settings", "expected"), [(0, 3), (1, 4), (2, 4)])
async def test_a_transaction_sends_its_settings_once_in_one_statement(
    one_conn: Any, settings: int, expected: int
) -> None:
    """BEGIN, one ``set_local_settings`` for all the transaction-local settings (tenant,
    timeout override) when there are any, the call, COMMIT: each a round trip of its own."""
    user = (await round_trips(one_conn, lambda: one_conn.create_user()))[1]
    view = one_conn
    if settings >= 1:
        view = view.tenant(uuid.uuid4())
    if settings >= 2:
        view = view.with_statement_timeout(250)

    if isinstance(one_conn, AsyncPostgresStorageAdapter):

        async def call() -> Any:
            async with view.transaction() as tx:
                return await tx.get_user(user.id)

    else:

        def call() -> Any:  # type: ignore[misc]
            with view.transaction() as tx:
                return tx.get_user(user.id)

    trips, found = await round_trips(one_conn, call)
    assert found == user
    assert trips == expected


async def test_a_transactions_settings_all_hold_inside_it_and_end_with_it(one_conn: Any) -> None:
    """The settings sent together when a transaction begins (a tenant and a timeout override)
    both hold for its calls, and neither outlives it on the pool's one connection."""
    org = uuid.uuid4()
    view = one_conn.tenant(org).with_statement_timeout(150)

    async def setting(adapter: Any, name: str) -> Any:
        return await _done(adapter._value("show_setting", {"name": name}, retry=Retry.NEVER))

    default_timeout = await setting(one_conn, "statement_timeout")
    if isinstance(one_conn, AsyncPostgresStorageAdapter):
        async with view.transaction() as tx:
            inside = (await setting(tx, "kitium.tenant"), await setting(tx, "statement_timeout"))
    else:
        with view.transaction() as tx:
            inside = (await setting(tx, "kitium.tenant"), await setting(tx, "statement_timeout"))
    assert inside == (str(org), "150ms")
    assert default_timeout != "150ms"
    # One connection: the one the transaction ran on.
    after = (await setting(one_conn, "kitium.tenant"), await setting(one_conn, "statement_timeout"))
    assert after == ("", default_timeout)


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
async def test_preparing_a_statement_costs_one_extra_round_trip_once(dsn: str, cls: type) -> None:
    """With the default ``prepare_threshold`` (5) the sixth run of a statement on a connection
    prepares it first: that call alone costs 2 round trips, every other call 1."""
    adapter = cls(dsn, min_size=1, max_size=1)
    await _done(adapter.connect())
    try:
        user = (await round_trips(adapter, adapter.create_user))[1]
        trips = [
            (await round_trips(adapter, lambda: adapter.get_user(user.id)))[0] for _ in range(9)
        ]
        assert trips == [1, 1, 1, 1, 1, 2, 1, 1, 1]
    finally:
        await _done(adapter.disconnect())


async def test_lookups_with_malformed_ids_make_no_round_trip(one_conn: Any) -> None:
    trips, found = await round_trips(one_conn, lambda: one_conn.get_user("not-a-uuid"))
    assert (trips, found) == (0, None)
    for method in ("list_organization_members", "get_role_users"):
        listing = getattr(one_conn, method)
        trips, found = await round_trips(one_conn, partial(listing, "not-a-uuid", limit=5))
        assert (trips, found) == (0, []), method


def _refused(call: Callable[[], Any]) -> Any:
    """The field the ``ValidationError`` of ``call`` names (awaited when it is a coroutine:
    round_trips awaits it)."""

    async def awaited(pending: Awaitable[Any]) -> str:
        try:
            await pending
        except ValidationError as exc:
            return exc.field
        raise AssertionError("accepted")

    try:
        result = call()
    except ValidationError as exc:
        return exc.field
    assert isinstance(result, Awaitable), "accepted"
    return awaited(result)


async def test_refused_paging_arguments_make_no_round_trip(one_conn: Any) -> None:
    """A bad ``limit`` or ``after`` is refused before anything is sent (it names the field)."""
    for method in ("list_organization_members", "get_role_users"):
        listing = getattr(one_conn, method)
        for kwargs, field in (
            ({"limit": 0}, "limit"),
            ({"limit": 1001}, "limit"),
            ({"after": "cursor", "limit": 5}, "after"),
            ({"after": {"user_id": uuid.uuid4()}}, "after"),
        ):
            call = partial(listing, uuid.uuid4(), **kwargs)
            trips, named = await round_trips(one_conn, partial(_refused, call))
            assert (trips, named) == (0, field), (method, kwargs)


async def _done(value: Any) -> Any:
    """``value``, awaited when it is awaitable: drives a call of either adapter, uncounted."""
    return await value if isinstance(value, Awaitable) else value


async def _users(adapter: Any, n: int) -> list[Any]:
    return [await _done(adapter.create_user()) for _ in range(n)]


@pytest.mark.parametrize("size", [1, 10, 1000])
async def test_emit_events_is_one_round_trip_whatever_the_batch(one_conn: Any, size: int) -> None:
    principal = f"rt-{uuid.uuid4().hex}"
    events = [{"type": "login", "principal_id": principal, "data": {"n": n}} for n in range(size)]
    trips, written = await round_trips(one_conn, lambda: one_conn.emit_events(events))
    assert (trips, written) == (1, size)


@pytest.mark.parametrize("size", [1, 10])
async def test_create_backup_codes_is_one_round_trip_whatever_the_batch(
    one_conn: Any, size: int
) -> None:
    [user] = await _users(one_conn, 1)
    hashes = [_digest(f"{user.id}-{n}") for n in range(size)]
    trips, codes = await round_trips(
        one_conn, lambda: one_conn.create_backup_codes(user.id, hashes)
    )
    assert trips == 1
    assert [c.code_hash for c in codes] == hashes


@pytest.mark.parametrize("size", [0, 50])
async def test_create_organization_is_one_round_trip_whatever_the_members(
    one_conn: Any, size: int
) -> None:
    members = [{"user_id": u.id} for u in await _users(one_conn, size)]
    trips, org = await round_trips(
        one_conn, lambda: one_conn.create_organization(name="rt", plan="team", members=members)
    )
    assert trips == 1
    assert len(org.members) == size


async def test_issue_and_validate_session_token_are_one_round_trip_each(one_conn: Any) -> None:
    [user] = await _users(one_conn, 1)
    issue_trips, issued = await round_trips(
        one_conn, lambda: one_conn.issue_session_token(user_id=user.id, expires_at=_later())
    )
    check_trips, session = await round_trips(
        one_conn, lambda: one_conn.validate_session_token(issued.token)
    )
    assert (issue_trips, check_trips) == (1, 1)
    assert session == issued.session


async def test_a_token_that_cannot_be_one_as_issued_costs_no_round_trip(one_conn: Any) -> None:
    """A token without a secret, without its dot, in another spelling of the session id, or
    not text is refused before anything is sent (found by mutation testing: without its
    no-secret check, ``<id>.`` cost a lookup that could find nothing)."""
    [user] = await _users(one_conn, 1)
    _, issued = await round_trips(
        one_conn, lambda: one_conn.issue_session_token(user_id=user.id, expires_at=_later())
    )
    session_id = str(issued.session.id)
    too_long = f"{session_id}." + "s" * 200  # past 200 characters: never issued
    for token in (f"{session_id}.", session_id, f"{session_id.upper()}.x", too_long, None):
        trips = await round_trips(
            one_conn, functools.partial(one_conn.validate_session_token, token)
        )
        assert trips == (0, None), token


async def test_issue_and_verify_api_key_are_one_round_trip_each(one_conn: Any) -> None:
    [user] = await _users(one_conn, 1)
    issue_trips, issued = await round_trips(one_conn, lambda: one_conn.issue_api_key(user.id))
    check_trips, record = await round_trips(one_conn, lambda: one_conn.verify_api_key(issued.key))
    assert (issue_trips, check_trips) == (1, 1)
    assert record.id == issued.record.id


async def _expire(adapter: Any, kind: str, rows: int) -> None:
    """Leave ``rows`` expired rows of ``kind`` in the adapter's (private) schema."""
    if kind == "sessions":
        [user] = await _users(adapter, 1)
        for _ in range(rows):
            await _done(adapter.create_session(user_id=user.id, expires_at=_earlier()))
    elif kind == "challenges":
        [user] = await _users(adapter, 1)
        device = await _done(adapter.create_two_factor_device(user_id=user.id, method="sms"))
        session = await _done(adapter.create_session(user_id=user.id, expires_at=_later()))
        for _ in range(rows):
            await _done(
                adapter.create_two_factor_session(
                    user_id=user.id,
                    session_id=session.id,
                    device_id=device.id,
                    method="sms",
                    expires_at=_earlier(),
                )
            )
    elif kind == "sso_sessions":
        [user] = await _users(adapter, 1)
        provider = await _done(adapter.create_sso_provider(type="oidc", name="rt"))
        for n in range(rows):
            await _done(
                adapter.create_sso_session(
                    user_id=user.id,
                    provider_id=provider.id,
                    provider_type="oidc",
                    provider_subject=f"rt-{n}",
                    expires_at=_earlier(),
                )
            )
    elif kind == "tokens":
        for n in range(rows):
            await _done(
                adapter.create_email_verification_token(
                    email=f"rt-{n}@example.com",
                    code_hash=_digest(f"code-{n}"),
                    type="email_verification",
                    expires_at=_earlier(),
                )
            )
    elif rows:
        old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
        principal = "rt-erased" if kind == "principal_events" else "p"
        events = [{"type": "t", "principal_id": principal, "data": {}, "timestamp": old}] * rows
        await _done(adapter.emit_events(events))


def _cleanup(adapter: Any, kind: str, batch_size: int) -> Callable[[], Any]:
    if kind == "sessions":
        return lambda: adapter.delete_expired_sessions(batch_size=batch_size)
    if kind == "tokens":
        return lambda: adapter.delete_expired_email_verification_tokens(batch_size=batch_size)
    if kind == "challenges":
        return lambda: adapter.delete_expired_two_factor_sessions(batch_size=batch_size)
    if kind == "sso_sessions":
        return lambda: adapter.delete_expired_sso_sessions(batch_size=batch_size)
    if kind == "principal_events":
        return lambda: adapter.delete_principal_events("rt-erased", batch_size=batch_size)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    return lambda: adapter.prune_events(before=before, batch_size=batch_size)


@pytest.mark.parametrize(
    "kind", ["sessions", "tokens", "challenges", "sso_sessions", "events", "principal_events"]
)
async def test_batched_cleanups_cost_one_statement_per_batch(private_one: Any, kind: str) -> None:
    batch_size = 3
    # 0 rows: one (empty) statement; 6: two full batches and the empty one that ends the walk;
    # 7: two full batches and a partial one.
    for rows in (0, 6, 7):
        await _expire(private_one, kind, rows)
        trips, deleted = await round_trips(private_one, _cleanup(private_one, kind, batch_size))
        assert deleted == rows
        # sso_sessions: first, whether row-level security would hide rows from the purge
        checks = 1 if kind == "sso_sessions" else 0
        assert trips == rows // batch_size + 1 + checks, (rows, trips)

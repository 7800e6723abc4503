"""Typed, frozen records returned by the adapters.

Rows are bound by column name (``Record(column=value, ...)``, one binder per query), so the field
names are the column names of ``queries/``. Instants are timezone-aware UTC; JSON columns come
back as plain dicts and lists (left out of ``hash``, so records stay hashable); digests and
other secrets are kept out of ``repr``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

__all__ = [
    "ApiKey",
    "AuthEvent",
    "BackupCode",
    "EmailVerificationToken",
    "EventPage",
    "HealthStatus",
    "IssuedApiKey",
    "IssuedSession",
    "OAuthLink",
    "OAuthTokens",
    "Organization",
    "OrganizationMember",
    "Permission",
    "Role",
    "RoleAssignment",
    "Session",
    "SsoDomain",
    "SsoLink",
    "SsoProvider",
    "SsoSession",
    "TwoFactorAttempt",
    "TwoFactorDevice",
    "TwoFactorSession",
    "User",
]


def _utc(value: dt.datetime) -> dt.datetime:
    # Connections run with TimeZone=UTC, but a caller-supplied pool may not: normalise anyway.
    return value if value.tzinfo is dt.UTC else value.astimezone(dt.UTC)


def _opt_utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else _utc(value)


def _parse_instant(value: dt.datetime | str) -> dt.datetime:
    return _utc(value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value))


def _opt_instant(value: dt.datetime | str | None) -> dt.datetime | None:
    return None if value is None else _parse_instant(value)


def _strs(value: Iterable[str] | None) -> tuple[str, ...]:
    return () if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class OAuthLink:
    """One linked OAuth identity of a user (unique per provider and subject)."""

    provider: str
    sub: str
    email: str | None = None
    name: str | None = None
    linked_at: dt.datetime = attrs.field(converter=_parse_instant)


@attrs.frozen(kw_only=True)
class OAuthTokens:
    """A linked identity's provider tokens, decrypted (they are stored encrypted)."""

    access_token: str | None = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    expires_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    #: Changes with every write of new tokens (an opaque number, never reused for the link; 0
    #: for tokens untouched since migration 0019); pass it to ``update_oauth_tokens`` as
    #: ``if_version`` to store a refresh only over what it refreshed.
    version: int = 0


def _oauth_links(value: Mapping[str, Any] | None) -> Mapping[str, OAuthLink]:
    if not value:
        return {}
    return {
        provider: link if isinstance(link, OAuthLink) else OAuthLink(**link)
        for provider, link in value.items()
    }


@attrs.frozen(kw_only=True)
class User:
    """A user. ``oauth`` maps provider name to the linked identity. ``email_verified_at`` is when
    the current address was proven (``None``: not yet). The password hash is never part of the
    record: read it with ``get_password_hash``."""

    id: uuid.UUID
    email: str | None
    email_verified_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    name: str | None
    picture: str | None
    plan: str
    entitlements: tuple[str, ...] = attrs.field(converter=_strs)
    metadata: dict[str, Any] = attrs.field(hash=False)
    oauth: Mapping[str, OAuthLink] = attrs.field(converter=_oauth_links, hash=False)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class Session:
    """A login session. ``get_session`` never returns an expired one."""

    id: uuid.UUID
    user_id: uuid.UUID
    org_id: uuid.UUID | None
    plan: str | None
    entitlements: tuple[str, ...] = attrs.field(converter=_strs)
    metadata: dict[str, Any] = attrs.field(hash=False)
    expires_at: dt.datetime = attrs.field(converter=_utc)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class ApiKey:
    """An API key. Only the digest of the key is stored (``hash``, kept out of ``repr``)."""

    id: uuid.UUID
    principal_id: uuid.UUID
    hash: str = attrs.field(repr=False)
    prefix: str
    last_four: str
    scopes: tuple[str, ...] = attrs.field(converter=_strs)
    metadata: dict[str, Any] = attrs.field(hash=False)
    expires_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    last_used_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    # Members aggregated with jsonb_agg carry their user_id as a string.
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


@attrs.frozen(kw_only=True)
class OrganizationMember:
    """A user's membership of an organization."""

    user_id: uuid.UUID = attrs.field(converter=_as_uuid)
    role: str = "member"
    joined_at: dt.datetime = attrs.field(converter=_parse_instant)


def _members(value: Iterable[Any] | None) -> tuple[OrganizationMember, ...]:
    if not value:
        return ()
    return tuple(m if isinstance(m, OrganizationMember) else OrganizationMember(**m) for m in value)


@attrs.frozen(kw_only=True)
class Organization:
    """An organization with its members (kept in their own table, shown here in join order)."""

    id: uuid.UUID
    name: str
    plan: str
    seats: int
    members: tuple[OrganizationMember, ...] = attrs.field(converter=_members)
    metadata: dict[str, Any] = attrs.field(hash=False)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class EmailVerificationToken:
    """An email verification (or reset, login…) token. Only ``code_hash`` is stored."""

    id: uuid.UUID
    email: str
    code_hash: str = attrs.field(repr=False)
    type: str
    user_id: uuid.UUID | None
    metadata: dict[str, Any] = attrs.field(hash=False)
    expires_at: dt.datetime = attrs.field(converter=_utc)
    used_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    created_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class AuthEvent:
    """One audit event."""

    id: uuid.UUID
    type: str
    principal_id: str
    org_id: str | None
    data: dict[str, Any] = attrs.field(hash=False)
    timestamp: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class EventPage:
    """A page of events, newest first; pass ``next_cursor`` as ``after`` for the next page
    (``None`` when there is no more)."""

    events: tuple[AuthEvent, ...]
    next_cursor: str | None


@attrs.frozen(kw_only=True)
class HealthStatus:
    """What ``health_check`` saw: status, round-trip latency, pool figures and migrations."""

    status: Literal["ok", "error"]
    latency_ms: float
    pool: Mapping[str, int] = attrs.field(hash=False)
    applied_migrations: tuple[str, ...]
    pending_migrations: tuple[str, ...]
    error: str | None = None
    replicas: tuple[Mapping[str, Any], ...] = attrs.field(default=(), hash=False)
    newer_migrations: tuple[str, ...] = ()
    """Applied migrations this version does not ship (a newer version applied them): no error,
    as in a rolling deploy whose older instances still serve."""


# -- RBAC ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Permission:
    """A permission a role grants (the reference's ``Permission``)."""

    name: str
    resource: str | None = None
    action: str | None = None
    description: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict, hash=False)


def _permissions(value: Iterable[Any] | None) -> tuple[Permission, ...]:
    if not value:
        return ()
    return tuple(p if isinstance(p, Permission) else Permission(**p) for p in value)


@attrs.frozen(kw_only=True)
class Role:
    """A role of an organization (names are unique per organization)."""

    id: uuid.UUID
    org_id: uuid.UUID
    name: str
    description: str | None
    is_system: bool
    permissions: tuple[Permission, ...] = attrs.field(converter=_permissions)
    metadata: dict[str, Any] = attrs.field(hash=False)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class RoleAssignment:
    """A user holding a role in the role's organization, since ``assigned_at``."""

    user_id: uuid.UUID
    role_id: uuid.UUID
    org_id: uuid.UUID
    assigned_at: dt.datetime = attrs.field(converter=_utc)


# -- SSO ----------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SsoDomain:
    """An email domain served by an SSO provider; only verified ones route logins."""

    domain: str
    verified_at: dt.datetime | None = attrs.field(converter=_opt_instant)


def _domains(value: Iterable[Any] | None) -> tuple[SsoDomain, ...]:
    if not value:
        return ()
    return tuple(d if isinstance(d, SsoDomain) else SsoDomain(**d) for d in value)


@attrs.frozen(kw_only=True)
class SsoProvider:
    """A SAML or OIDC identity provider. ``client_secret`` and ``signing_key`` are decrypted on
    read (they are stored encrypted) and kept out of ``repr``."""

    id: uuid.UUID
    type: Literal["saml", "oidc"]
    name: str
    org_id: uuid.UUID | None
    metadata_url: str | None
    client_id: str | None
    client_secret: str | None = attrs.field(repr=False)
    token_endpoint_auth_method: str | None
    idp_entity_id: str | None
    idp_sso_url: str | None
    idp_slo_url: str | None
    idp_certificate: str | None
    sp_entity_id: str | None
    sp_acs_url: str | None
    sp_slo_url: str | None
    signing_cert: str | None
    signing_key: str | None = attrs.field(repr=False)
    encryption_enabled: bool
    force_authn: bool
    scopes: tuple[str, ...] = attrs.field(converter=_strs)
    redirect_uris: tuple[str, ...] = attrs.field(converter=_strs)
    claim_mapping: dict[str, Any] = attrs.field(hash=False)
    attribute_mapping: dict[str, Any] = attrs.field(hash=False)
    metadata: dict[str, Any] = attrs.field(hash=False)
    domains: tuple[SsoDomain, ...] = attrs.field(converter=_domains)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class SsoLink:
    """A user's identity at an SSO provider (unique per provider and subject)."""

    id: uuid.UUID
    user_id: uuid.UUID
    provider_id: uuid.UUID
    provider_type: Literal["saml", "oidc"]
    provider_subject: str
    provider_email: str | None
    auto_provisioned: bool
    metadata: dict[str, Any] = attrs.field(hash=False)
    linked_at: dt.datetime = attrs.field(converter=_utc)
    last_auth_at: dt.datetime | None = attrs.field(converter=_opt_utc)


@attrs.frozen(kw_only=True)
class SsoSession:
    """An SSO login session. The provider session token is stored only as a digest."""

    id: uuid.UUID
    user_id: uuid.UUID
    provider_id: uuid.UUID
    provider_type: Literal["saml", "oidc"]
    provider_subject: str
    expires_at: dt.datetime = attrs.field(converter=_utc)
    linked_at: dt.datetime = attrs.field(converter=_utc)
    last_auth_at: dt.datetime | None = attrs.field(converter=_opt_utc)


# -- 2FA ----------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TwoFactorDevice:
    """A second factor. ``secret`` (a TOTP seed) is decrypted on read and kept out of ``repr``."""

    id: uuid.UUID
    user_id: uuid.UUID
    method: Literal["totp", "sms", "email"]
    name: str | None
    verified: bool
    phone_number: str | None
    secret: str | None = attrs.field(repr=False)
    last_used_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    throttle_failures: int = 0
    """Consecutive wrong codes since the last right one (see ``throttled_until``)."""
    throttled_until: dt.datetime | None = attrs.field(default=None, converter=_opt_utc)
    """Until when the device refuses code checks: 2^(n-1) seconds (at most 15 minutes) after
    the n-th consecutive wrong code; ``None`` once a right code reset it (or before any wrong
    one). A time in the past means the throttle is over."""
    metadata: dict[str, Any] = attrs.field(hash=False)
    created_at: dt.datetime = attrs.field(converter=_utc)
    updated_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class BackupCode:
    """One backup code (only its hash is stored)."""

    id: uuid.UUID
    user_id: uuid.UUID
    code_hash: str = attrs.field(repr=False)
    used_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    created_at: dt.datetime = attrs.field(converter=_utc)

    @property
    def used(self) -> bool:
        """Whether the code was consumed."""
        return self.used_at is not None


@attrs.frozen(kw_only=True)
class TwoFactorSession:
    """A pending 2FA challenge for a login session."""

    id: uuid.UUID
    user_id: uuid.UUID
    session_id: uuid.UUID
    device_id: uuid.UUID
    method: str
    code_hash: str | None = attrs.field(repr=False)
    attempt_count: int
    max_attempts: int
    expires_at: dt.datetime = attrs.field(converter=_utc)
    completed_at: dt.datetime | None = attrs.field(converter=_opt_utc)
    created_at: dt.datetime = attrs.field(converter=_utc)


@attrs.frozen(kw_only=True)
class TwoFactorAttempt:
    """One attempt on a challenge: counted (``verify_two_factor_session`` compares the code in
    the same call; after ``count_two_factor_attempt`` the application compares it), or
    refused because the challenge's device is throttled (``throttled``: nothing counted or
    compared)."""

    verified: bool
    """Whether the code matched: this attempt completed the challenge."""
    attempt_count: int
    """Attempts counted so far, this one included (unchanged by a throttled refusal)."""
    max_attempts: int
    throttled: bool = False
    """Whether the attempt was refused because the device is throttled: the code was not
    compared and the attempt not counted; try again after ``throttled_until``."""
    throttled_until: dt.datetime | None = attrs.field(default=None, converter=_opt_utc)
    """Until when the device refuses code checks: for a throttled refusal, when to try again;
    after a wrong code (``verify_two_factor_session``), the throttle it set; for a code attempt
    counted by ``count_two_factor_attempt``, the throttle its charge set (when the next code is
    taken if this one is wrong); otherwise (a right code, a backup-code attempt) ``None``."""

    @property
    def attempts_left(self) -> int:
        """Attempts still allowed (0 once the limit is reached or the challenge completed)."""
        return 0 if self.verified else self.max_attempts - self.attempt_count


# -- issued credentials -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class IssuedSession:
    """A new session and its bearer token ``<session id>.<secret>``. The token exists only
    here: the database keeps a SHA-256 digest of its secret part."""

    session: Session
    token: str = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class IssuedApiKey:
    """A new API key record and the key itself, which exists only here (the database keeps its
    SHA-256 digest)."""

    record: ApiKey
    key: str = attrs.field(repr=False)

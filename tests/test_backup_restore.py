"""Backup and restore: a ``pg_dump --schema`` of a schema holding every kind of record, restored
into a brand-new database, reads back identically through a fresh adapter (same schema, same
encryption keys): secrets decrypt, the issued session token and API key still authenticate,
and connecting applies no migration and reports no drift."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from kitium_pg import AsyncPostgresStorageAdapter, Permission, PostgresStorageAdapter
from kitium_pg.records import IssuedApiKey, IssuedSession
from tests.conftest import AwaitableSync, drive

from .fix_secrets import register, run_tool

FUTURE = dt.datetime(2031, 5, 17, 8, 30, 15, 123456, tzinfo=dt.UTC)
PAST = dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC)
PEPPER = b"backup-restore-pepper"


def _digest(code: str) -> str:
    return hmac.new(PEPPER, code.encode(), hashlib.sha256).hexdigest()


@dataclass
class Populated:
    """What the source schema holds: ids of every record, the secrets, and its snapshot."""

    schema: str
    ids: dict[str, Any]
    secrets: dict[str, str]
    originals: dict[str, Any]
    snapshot: dict[str, Any]
    applied: tuple[str, ...]
    tables: dict[str, list[str]]


def _table_rows(dsn: str, schema: str) -> dict[str, list[str]]:
    """Every row of every table of ``schema`` as text, sorted (the whole stored state)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,)
            )
        ]
        return {
            table: sorted(
                row[0]
                for row in conn.execute(f'SELECT t::text FROM "{schema}"."{table}" t'.encode())
            )
            for table in tables
        }


def _populate(storage: PostgresStorageAdapter, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write at least one record of every domain; returns (ids, originals as returned)."""
    s: dict[str, Any] = {}
    owner = storage.create_user(
        email=f"Owner-{tag}@Example.com",
        name="Ada Lovelace ✓",
        picture="https://example.com/ada.png",
        plan="pro",
        entitlements=["export", "sso"],
        metadata={"nested": {"list": [1, 2.5, None, True, "ü"]}, "big": 2**70, "f": 1e-7},
        password_hash=f"$argon2id$v=19$m=65536,t=3,p=4$backup-{tag}",
    )
    member = storage.create_user(email=f"member-{tag}@example.com", name="Grace")
    s["oauth_user"] = storage.link_oauth_account(
        owner.id,
        "github",
        sub=f"gh-{tag}",
        email=f"ada-{tag}@users.noreply.github.com",
        name="ada",
        access_token=f"gho_backup_access_{secrets.token_hex(16)}",
        refresh_token=f"ghr_backup_refresh_{secrets.token_hex(16)}",
        token_expires_at=FUTURE,
    )
    org = storage.create_organization(
        name="Analytical Engines",
        plan="team",
        seats=7,
        members=[{"user_id": owner.id, "role": "owner"}],
        metadata={"region": "eu"},
    )
    s["member"] = storage.add_organization_member(org.id, member.id, role="billing")
    s["session"] = storage.create_session(
        user_id=owner.id,
        expires_at=FUTURE,
        org_id=org.id,
        plan="pro",
        entitlements=["export"],
        metadata={"ip": "203.0.113.7"},
    )
    s["issued_session"] = storage.issue_session_token(
        user_id=member.id, expires_at=FUTURE, metadata={"device": "phone"}
    )
    raw_key = f"kpg_{secrets.token_urlsafe(24)}"
    s["raw_api_key"] = raw_key
    s["api_key"] = storage.create_api_key(
        principal_id=owner.id,
        hash=hashlib.sha256(raw_key.encode()).hexdigest(),
        prefix="kpg",
        last_four=raw_key[-4:],
        scopes=["read", "write"],
        metadata={"purpose": "ci"},
        expires_at=FUTURE,
    )
    s["issued_key"] = storage.issue_api_key(
        owner.id, ["read"], prefix="live", metadata={"env": "prod"}
    )
    s["email_code"] = f"{secrets.randbelow(10**6):06d}-{tag}"
    s["used_code"] = f"{secrets.randbelow(10**6):06d}-used-{tag}"
    s["email_token"] = storage.create_email_verification_token(
        email=f"owner-{tag}@example.com",
        code_hash=_digest(s["email_code"]),
        type="email_verification",
        expires_at=FUTURE,
        user_id=owner.id,
        metadata={"ua": "test"},
    )
    used = storage.create_email_verification_token(
        email=f"owner-{tag}@example.com",
        code_hash=_digest(s["used_code"]),
        type="password_reset",
        expires_at=FUTURE,
        user_id=owner.id,
    )
    s["used_token"] = storage.mark_email_verification_token_as_used(used.id)
    storage.increment_email_verification_token_attempts(s["email_token"].id)
    storage.increment_email_verification_token_attempts(s["email_token"].id)
    s["event"] = storage.emit_event(
        type="login", principal_id=owner.id, data={"ok": True}, org_id=org.id
    )
    storage.emit_events(
        [
            {"type": "logout", "principal_id": str(owner.id), "data": {"n": n}, "timestamp": PAST}
            for n in range(3)
        ]
        + [{"type": "audit", "principal_id": "system", "data": None, "org_id": "ext-org"}]
    )
    s["role"] = storage.create_role(
        org_id=org.id,
        name="admin",
        description="Everything",
        permissions=[
            Permission(name="users:read", resource="users", action="read"),
            {"name": "users:write", "description": "Write users", "metadata": {"risk": "high"}},
        ],
        metadata={"builtin": False},
    )
    s["assigned"] = storage.assign_role_to_user(owner.id, s["role"].id, org.id)
    domain = f"corp-{tag}.example.com"
    provider = storage.create_sso_provider(
        type="oidc",
        name="Okta",
        org_id=org.id,
        metadata_url="https://idp.example.com/.well-known/openid-configuration",
        client_id="client-id",
        client_secret=f"sso-client-secret-{secrets.token_hex(16)}",
        token_endpoint_auth_method="client_secret_post",
        idp_entity_id="https://idp.example.com",
        idp_sso_url="https://idp.example.com/sso",
        idp_certificate="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        sp_entity_id="https://sp.example.com",
        sp_acs_url="https://sp.example.com/acs",
        signing_cert="-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----",
        signing_key=(
            f"-----BEGIN PRIVATE KEY-----\n{secrets.token_urlsafe(48)}\n-----END PRIVATE KEY-----"
        ),
        force_authn=True,
        scopes=["openid", "email"],
        redirect_uris=["https://app.example.com/callback"],
        claim_mapping={"email": "mail"},
        attribute_mapping={"name": "displayName"},
        metadata={"tier": "gold"},
        domains=[domain, f"other-{tag}.example.com"],
    )
    storage.verify_sso_provider_domain(provider.id, domain)
    s["domain"] = domain
    s["provider_created"] = provider
    s["link"] = storage.create_sso_link(
        user_id=owner.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject=f"okta|{tag}",
        provider_email=f"ada@{domain}",
        auto_provisioned=True,
        metadata={"groups": ["eng"]},
        last_auth_at=PAST,
    )
    s["sso_session_token"] = f"sso-session-{secrets.token_hex(16)}"
    s["sso_session"] = storage.create_sso_session(
        user_id=owner.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject=f"okta|{tag}",
        expires_at=FUTURE,
        session_token=s["sso_session_token"],
    )
    # The session recorded its sign-in on the link: what a restore must bring back.
    s["link"] = storage.get_sso_link(s["link"].id)
    assert s["link"].last_auth_at == s["sso_session"].last_auth_at
    s["device"] = storage.create_two_factor_device(
        user_id=owner.id,
        method="totp",
        name="Phone",
        verified=True,
        secret=f"JBSWY3DPEHPK3PXP{secrets.token_hex(8).upper()}",
        metadata={"issuer": "kitium"},
    )
    assert storage.record_totp_step(s["device"].id, 58_000_000)
    s["backup_plain"] = [f"bkp-{secrets.token_hex(5)}" for _ in range(4)]
    s["backup_codes"] = storage.create_backup_codes(
        owner.id, [_digest(code) for code in s["backup_plain"]]
    )
    s["consumed"] = storage.consume_backup_code(owner.id, _digest(s["backup_plain"][0]))
    assert s["consumed"] is not None
    s["challenge"] = storage.create_two_factor_session(
        user_id=owner.id,
        session_id=s["session"].id,
        device_id=s["device"].id,
        method="totp",
        expires_at=FUTURE,
        code_hash=_digest(f"challenge-{tag}"),
        max_attempts=3,
    )
    assert storage.increment_two_factor_attempts(s["challenge"].id) == 1
    ids = {
        "owner": owner.id,
        "member": member.id,
        "org": org.id,
        "session": s["session"].id,
        "issued_session": s["issued_session"].session.id,
        "api_key": s["api_key"].id,
        "issued_key": s["issued_key"].record.id,
        "email_token": s["email_token"].id,
        "used_token": used.id,
        "role": s["role"].id,
        "provider": provider.id,
        "link": s["link"].id,
        "sso_session": s["sso_session"].id,
        "device": s["device"].id,
        "challenge": s["challenge"].id,
        "owner_email": f"owner-{tag}@example.com",
        "domain": domain,
        "gh_sub": f"gh-{tag}",
        "api_key_hash": s["api_key"].hash,
    }
    return ids, s


async def _snapshot(storage: Any, ids: Mapping[str, Any]) -> dict[str, Any]:
    """Every record the public read methods return for the populated ids."""
    owner, member, org = ids["owner"], ids["member"], ids["org"]
    snap: dict[str, Any] = {
        "owner": await storage.get_user(owner),
        "member": await storage.get_user(member),
        "by_email": await storage.get_user_by_email(ids["owner_email"].upper()),
        "by_oauth": await storage.get_user_by_oauth("github", ids["gh_sub"]),
        "password_hash": await storage.get_password_hash(owner),
        "oauth_tokens": await storage.get_oauth_tokens(owner, "github"),
        "session": await storage.get_session(ids["session"]),
        "issued_session": await storage.get_session(ids["issued_session"]),
        "owner_sessions": await storage.list_user_sessions(owner),
        "api_key": await storage.get_api_key(ids["api_key"]),
        "issued_key": await storage.get_api_key(ids["issued_key"]),
        "api_key_by_hash": await storage.get_api_key_by_hash(ids["api_key_hash"]),
        "api_keys": await storage.list_api_keys(owner),
        "org": await storage.get_organization(org),
        "org_members": await storage.list_organization_members(org),
        "member_orgs": await storage.list_user_organizations(member),
        "email_tokens": await storage.get_email_verification_tokens(ids["owner_email"]),
        "email_token": await storage.get_email_verification_token_by_id(ids["email_token"]),
        "used_token": await storage.get_email_verification_token_by_id(ids["used_token"]),
        "attempts": await storage.get_email_verification_token_attempts(ids["email_token"]),
        "owner_events": await storage.list_events(principal_id=owner),
        "all_events": await storage.list_events(limit=1000),
        "role": await storage.get_role(ids["role"]),
        "roles": await storage.list_roles(org),
        "user_roles": await storage.get_user_roles(owner, org),
        "permissions": await storage.get_user_permissions(owner, org),
        "can_write": await storage.has_permission(owner, org, "users:write"),
        "provider": await storage.get_sso_provider(ids["provider"]),
        "providers": await storage.list_sso_providers(),
        "org_providers": await storage.list_sso_providers(org),
        "by_domain": await storage.get_sso_provider_by_domain(f"someone@{ids['domain']}"),
        "link": await storage.get_sso_link(ids["link"]),
        "links": await storage.get_user_sso_links(owner),
        "sso_session": await storage.get_sso_session(ids["sso_session"]),
        "device": await storage.get_two_factor_device(ids["device"]),
        "devices": await storage.list_two_factor_devices(owner),
        "backup_codes": await storage.get_backup_codes(owner),
        "challenge": await storage.get_two_factor_session(ids["challenge"]),
    }
    missing = [name for name, value in snap.items() if value in (None, [], False, 0)]
    assert not missing, f"populated records not found: {missing}"
    return snap


@pytest.fixture(scope="module")
def source(dsn: str, encryption_keys: dict[str, str]) -> Iterator[Populated]:
    """A private schema holding every kind of record (written with the sync adapter)."""
    tag = uuid.uuid4().hex[:10]
    schema = f"backup_{tag}"
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=encryption_keys) as storage:
        ids, originals = _populate(storage, tag)
        snapshot = drive(_snapshot(AwaitableSync(storage), ids))
        applied = storage.migration_status().applied
    secret_values = {
        "access_token": snapshot["oauth_tokens"].access_token,
        "refresh_token": snapshot["oauth_tokens"].refresh_token,
        "client_secret": snapshot["provider"].client_secret,
        "signing_key": snapshot["provider"].signing_key,
        "totp_secret": snapshot["device"].secret,
        "session_token": originals["issued_session"].token,
        "api_key": originals["issued_key"].key,
        "raw_api_key": originals["raw_api_key"],
        "sso_session_token": originals["sso_session_token"],
        "email_code": originals["email_code"],
    }
    register(*secret_values.values(), label="backup/restore secret")
    register(*originals["backup_plain"], label="backup code")
    yield Populated(
        schema=schema,
        ids=ids,
        secrets=secret_values,
        originals=originals,
        snapshot=snapshot,
        applied=applied,
        tables=_table_rows(dsn, schema),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())


@pytest.fixture(scope="module")
def dump_file(dsn: str, source: Populated, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pg_dump --schema`` of the populated schema, custom format."""
    path = tmp_path_factory.mktemp("dump") / f"{source.schema}.dump"
    run_tool(
        "pg_dump",
        [f"--dbname={dsn}", f"--schema={source.schema}", "--format=custom", f"--file={path}"],
        dsn=dsn,
    )
    assert path.stat().st_size > 0
    return path


@pytest.fixture
def restored_dsn(dsn: str, dump_file: Path) -> Iterator[str]:
    """A brand-new database with the dump restored into it (one per test)."""
    name = f"restore_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    target = make_conninfo(dsn, dbname=name)
    try:
        run_tool("pg_restore", [f"--dbname={target}", "--exit-on-error", str(dump_file)], dsn=dsn)
        yield target
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def test_the_dump_is_of_the_schema_only(dsn: str, dump_file: Path, source: Populated) -> None:
    listing = run_tool("pg_restore", ["--list", str(dump_file)], dsn=dsn)
    assert f"SCHEMA - {source.schema}" in listing
    assert "kitium_auth" not in listing  # the shared schema of the other tests is left out


def _ledger(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            f'SELECT id, checksum, applied_at FROM "{schema}".auth_migrations ORDER BY id'.encode()
        ).fetchall()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_restored_database_reads_back_identically(
    kind: str,
    restored_dsn: str,
    source: Populated,
    dsn: str,
    encryption_keys: dict[str, str],
) -> None:
    # The stored state is byte-for-byte the source's, table by table.
    assert _table_rows(restored_dsn, source.schema) == source.tables
    options: dict[str, Any] = {"schema": source.schema, "encryption_keys": dict(encryption_keys)}
    if kind == "sync":
        sync_adapter = PostgresStorageAdapter(restored_dsn, **options)
        sync_adapter.connect(migrate=False)
        storage: Any = AwaitableSync(sync_adapter)
        closing: Any = sync_adapter
    else:
        async_adapter = AsyncPostgresStorageAdapter(restored_dsn, **options)
        await async_adapter.connect(migrate=False)
        storage = closing = async_adapter
    try:
        await _check_restored(storage, restored_dsn, source)
    finally:
        if kind == "sync":
            closing.disconnect()
        else:
            await closing.disconnect()
    # The source is untouched by all this.
    assert _table_rows(dsn, source.schema) == source.tables


async def _check_restored(storage: Any, restored_dsn: str, source: Populated) -> None:
    # Migrations: everything applied, nothing pending, no drift (status raises on drift).
    ledger = _ledger(restored_dsn, source.schema)
    state = await storage.migration_status()
    assert state.applied == source.applied and state.pending == ()
    await storage.connect()  # applies pending migrations, of which there are none
    assert await storage.migrate() == ()
    assert _ledger(restored_dsn, source.schema) == ledger
    health = await storage.health_check()
    assert health.status == "ok" and health.pending_migrations == ()

    # Every record reads back identically, secrets decrypted.
    snapshot = await _snapshot(storage, source.ids)
    assert snapshot.keys() == source.snapshot.keys()
    for name, value in source.snapshot.items():
        assert snapshot[name] == value, name
    originals = source.originals
    for name in ("role", "link", "sso_session", "api_key", "email_token", "used_token"):
        assert snapshot[name] == originals[name], name  # unchanged since they were written
    assert snapshot["used_token"].used_at is not None
    assert snapshot["oauth_tokens"].access_token == source.secrets["access_token"]
    assert snapshot["oauth_tokens"].access_token.startswith("gho_backup_access_")
    assert snapshot["oauth_tokens"].refresh_token == source.secrets["refresh_token"]
    assert snapshot["provider"].client_secret == source.secrets["client_secret"]
    assert snapshot["provider"].client_secret == originals["provider_created"].client_secret
    assert snapshot["provider"].signing_key == originals["provider_created"].signing_key
    assert snapshot["provider"].domains[0].verified_at is not None
    assert snapshot["by_domain"] == snapshot["provider"]
    assert snapshot["device"].secret == originals["device"].secret
    assert snapshot["device"].last_used_at is not None  # the TOTP step was recorded
    assert [c.used for c in snapshot["backup_codes"]] == [True, False, False, False]
    assert snapshot["challenge"].attempt_count == 1
    assert snapshot["attempts"] == 2
    assert snapshot["member_orgs"][0].members == snapshot["org"].members
    assert {m.role for m in snapshot["org_members"]} == {"owner", "billing"}
    assert [p.name for p in snapshot["permissions"]] == ["users:read", "users:write"]
    assert len(snapshot["owner_events"].events) == 4

    # The issued credentials still authenticate (and wrong ones still do not).
    issued_session: IssuedSession = originals["issued_session"]
    assert await storage.validate_session_token(issued_session.token) == issued_session.session
    assert await storage.validate_session_token(issued_session.token + "x") is None
    issued_key: IssuedApiKey = originals["issued_key"]
    verified = await storage.verify_api_key(issued_key.key)
    assert verified is not None and verified.id == issued_key.record.id
    assert await storage.verify_api_key(issued_key.key[:-1]) is None
    assert (
        await storage.get_api_key_by_hash(
            hashlib.sha256(originals["raw_api_key"].encode()).hexdigest()
        )
        == (source.snapshot["api_key"])
    )
    consumed = await storage.consume_backup_code(
        source.ids["owner"], _digest(originals["backup_plain"][1])
    )
    assert consumed is not None and consumed.used
    assert (
        await storage.consume_backup_code(
            source.ids["owner"], _digest(originals["backup_plain"][0])
        )
        is None
    )  # consumed before the dump, stays consumed

    # And the restored database takes new writes (its constraints and triggers came along).
    user = await storage.create_user(email=source.ids["owner_email"].replace("owner", "new"))
    assert await storage.get_user(user.id) == user

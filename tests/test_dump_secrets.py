"""A pg_dump of a populated database contains none of the secrets in plaintext: reversible
secrets are stored only as AES-256-GCM ciphertext, codes and keys only as digests. Each secret
is also looked for as hex and base64 (at every alignment), the encodings a careless column type
or a bytea dump would use."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from kitium_pg import PostgresStorageAdapter

from .fix_secrets import encodings, register, run_tool

FUTURE = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
PEPPER = b"dump-test-pepper"


def _digest(code: str) -> str:
    return hmac.new(PEPPER, code.encode(), hashlib.sha256).hexdigest()


def _distinct(stem: str) -> str:
    """A secret no dump could contain by chance."""
    return f"{stem}-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def populated(dsn: str, encryption_keys: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A private schema populated with distinctive secrets; yields the secrets (by name) and
    the values that must be in the dump (to show the dump holds the rows)."""
    schema = f"dumpsec_{uuid.uuid4().hex[:10]}"
    plain: dict[str, str] = {
        "totp_secret": base64.b32encode(secrets.token_bytes(20)).decode(),
        "sso_client_secret": _distinct("sso-client-secret"),
        "sso_signing_key_body": secrets.token_urlsafe(64),
        "oauth_access_token": _distinct("gho_access"),
        "oauth_refresh_token": _distinct("ghr_refresh"),
        "sso_session_token": _distinct("sso-session-index"),
        "email_code": _distinct("email-code"),
        "password": _distinct("correct horse battery staple"),
        "challenge_code": _distinct("otp-challenge"),
        "caller_api_key": f"kpg_{secrets.token_urlsafe(32)}",
    }
    backup_codes = [_distinct("backup") for _ in range(5)]
    signing_key = (
        f"-----BEGIN PRIVATE KEY-----\n{plain['sso_signing_key_body']}\n-----END PRIVATE KEY-----"
    )
    present: dict[str, str] = {}
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=encryption_keys) as storage:
        user = storage.create_user(
            email=f"dump-{uuid.uuid4().hex[:8]}@example.com",
            password_hash=f"$argon2id$v=19$m=65536,t=3,p=4${_digest(plain['password'])}",
        )
        storage.link_oauth_account(
            user.id,
            "github",
            sub="gh-dump",
            access_token=plain["oauth_access_token"],
            refresh_token=plain["oauth_refresh_token"],
            token_expires_at=FUTURE,
        )
        issued = storage.issue_session_token(user_id=user.id, expires_at=FUTURE)
        plain["session_token_secret"] = issued.token.partition(".")[2]
        key = storage.issue_api_key(user.id, ["read"], prefix="live")
        plain["issued_api_key"] = key.key
        plain["issued_api_key_secret"] = key.key.partition("_")[2]
        storage.create_api_key(
            principal_id=user.id,
            hash=hashlib.sha256(plain["caller_api_key"].encode()).hexdigest(),
            prefix="kpg",
            last_four=plain["caller_api_key"][-4:],
        )
        storage.create_email_verification_token(
            email=user.email or "",
            code_hash=_digest(plain["email_code"]),
            type="email_verification",
            expires_at=FUTURE,
            user_id=user.id,
        )
        device = storage.create_two_factor_device(
            user_id=user.id, method="totp", secret=plain["totp_secret"], verified=True
        )
        storage.create_backup_codes(user.id, [_digest(code) for code in backup_codes])
        assert storage.consume_backup_code(user.id, _digest(backup_codes[0])) is not None
        session = storage.create_session(user_id=user.id, expires_at=FUTURE)
        storage.create_two_factor_session(
            user_id=user.id,
            session_id=session.id,
            device_id=device.id,
            method="totp",
            expires_at=FUTURE,
            code_hash=_digest(plain["challenge_code"]),
        )
        provider = storage.create_sso_provider(
            type="oidc",
            name=f"dump-idp-{uuid.uuid4().hex[:8]}",
            client_id="client",
            client_secret=plain["sso_client_secret"],
            signing_key=signing_key,
        )
        storage.create_sso_session(
            user_id=user.id,
            provider_id=provider.id,
            provider_type="oidc",
            provider_subject="subject",
            expires_at=FUTURE,
            session_token=plain["sso_session_token"],
        )
        # Read back through the adapter: the secrets are really stored (encrypted).
        tokens = storage.get_oauth_tokens(user.id, "github")
        assert tokens is not None and tokens.refresh_token == plain["oauth_refresh_token"]
        found = storage.get_sso_provider(provider.id)
        assert found is not None and found.signing_key == signing_key
        assert storage.verify_api_key(key.key) is not None
        present = {
            "user id": str(user.id),
            "provider name": provider.name,
            "api key digest": hashlib.sha256(key.key.encode()).hexdigest(),
            "email code digest": _digest(plain["email_code"]),
        }
    named = {**plain, **{f"backup_code_{n}": code for n, code in enumerate(backup_codes)}}
    named["sso_signing_key"] = signing_key
    register(*named.values(), label="dump-test secret")
    yield {"schema": schema, "secrets": named, "present": present}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())


@pytest.fixture(scope="module")
def dump_text(dsn: str, populated: dict[str, Any]) -> str:
    """A plain-format pg_dump of the whole test database."""
    return run_tool("pg_dump", [f"--dbname={dsn}", "--format=plain"], dsn=dsn, timeout=300)


def test_the_dump_holds_the_populated_rows(dump_text: str, populated: dict[str, Any]) -> None:
    assert f"CREATE SCHEMA {populated['schema']};" in dump_text
    for label, value in populated["present"].items():
        assert value in dump_text, label


def test_the_dump_contains_no_secret_in_any_encoding(
    dump_text: str, populated: dict[str, Any], encryption_keys: dict[str, str]
) -> None:
    candidates = dict(populated["secrets"])
    candidates.update({f"encryption key {kid}": key for kid, key in encryption_keys.items()})
    leaked = {
        name: sorted(form for form in encodings(value) if form in dump_text)
        for name, value in candidates.items()
    }
    leaked = {name: forms for name, forms in leaked.items() if forms}
    assert not leaked, f"secrets found in the dump: {sorted(leaked)}"


def test_the_encodings_searched_for_would_find_a_plaintext_secret() -> None:
    """The search itself works: a secret stored as text, as bytea (hex) or base64 at any
    offset inside a longer value would be found."""
    secret = "sso-client-secret-0123456789abcdef"
    forms = encodings(secret)
    bytea = "\\x" + ("00" + secret.encode().hex()).upper()
    for k in range(3):
        blob = base64.b64encode(b"\x01" * k + secret.encode() + b"\x02").decode()
        assert any(form in blob for form in forms), k
        assert any(form in blob.replace("+", "-").replace("/", "_") for form in forms), k
    assert any(form in f"COPY ...\t{secret}\t..." for form in forms)
    assert any(form in bytea for form in forms)

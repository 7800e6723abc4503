"""The example service (examples/fastapi_app) end to end, in process (httpx ASGITransport)
against the real test database: sign-up, login, API keys, TOTP with backup codes, logout and
an organization with roles."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pyotp
import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI

from examples.fastapi_app.main import backup_code_digest, create_app, totp_step
from kitium_pg.encryption import ENV_VAR

# Cheap argon2id parameters keep the test fast; the service uses argon2-cffi's defaults.
FAST = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


@pytest.fixture
async def client(dsn: str, encryption_keys: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(dsn, encryption_keys=encryption_keys, password_hasher=FAST)
    async with serve(app) as client:
        yield client


def bearer(token: str, org_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if org_id is not None:
        headers["X-Org-Id"] = org_id
    return headers


async def signup_and_login(client: httpx.AsyncClient, email: str) -> str:
    r = await client.post("/signup", json={"email": email, "password": "correct horse"})
    assert r.status_code == 201, r.text
    r = await client.post("/login", json={"email": email, "password": "correct horse"})
    assert r.status_code == 200, r.text
    client.cookies.clear()  # each test request says explicitly how it authenticates
    token: str = r.json()["token"]
    return token


async def test_sign_up_login_logout(
    client: httpx.AsyncClient, unique: Callable[[str], str], dsn: str
) -> None:
    email = f"{unique('ada')}@example.com"
    r = await client.post(
        "/signup", json={"email": email, "password": "correct horse", "name": "Ada"}
    )
    assert r.status_code == 201
    user_id = r.json()["id"]
    assert r.json() == {"id": user_id, "email": email}
    r = await client.post("/signup", json={"email": email.upper(), "password": "another one"})
    assert r.status_code == 409 and r.json() == {"detail": "email already registered"}
    r = await client.post("/signup", json={"email": "no-at-sign", "password": "long enough"})
    assert r.status_code == 422 and r.json()["code"] == "validation"  # kitium-pg's check
    r = await client.post("/signup", json={"email": f"x{email}", "password": "short"})
    assert r.status_code == 422  # pydantic's check

    # The stored hash is argon2id, never the password.
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT password_hash FROM kitium_auth.users WHERE id = %s", [user_id]
        ).fetchone()
    assert row is not None and row[0].startswith("$argon2id$") and "correct horse" not in row[0]

    for wrong in (
        {"email": email, "password": "wrong horse"},
        {"email": "nobody@x.org", "password": "x"},
    ):
        r = await client.post("/login", json=wrong)
        assert r.status_code == 401 and r.json() == {"detail": "invalid email or password"}
        assert "set-cookie" not in r.headers

    r = await client.post("/login", json={"email": email.upper(), "password": "correct horse"})
    assert r.status_code == 200
    token = r.json()["token"]
    assert r.json()["user_id"] == user_id
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"session={token};") or cookie.startswith(f'session="{token}";')
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Max-Age=43200" in cookie

    # The cookie jar now holds the session: /me works by cookie, and by bearer token.
    r = await client.get("/me")
    assert r.status_code == 200
    assert r.json() == {
        "id": user_id,
        "email": email,
        "name": "Ada",
        "two_factor": False,
        "organizations": [],
    }
    client.cookies.clear()
    assert (await client.get("/me")).status_code == 401
    assert (await client.get("/me", headers=bearer(token))).status_code == 200

    r = await client.post("/logout", headers=bearer(token))
    assert r.status_code == 204
    assert 'session=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
    r = await client.get("/me", headers=bearer(token))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert (await client.post("/logout", headers=bearer(token))).status_code == 401


async def test_api_keys(client: httpx.AsyncClient, unique: Callable[[str], str]) -> None:
    token = await signup_and_login(client, f"{unique('keys')}@example.com")
    other = await signup_and_login(client, f"{unique('other')}@example.com")

    r = await client.post("/api-keys", headers=bearer(token), json={"scopes": ["reports:read"]})
    assert r.status_code == 201
    created = r.json()
    key = created["key"]
    assert key.startswith("example_") and created["last_four"] == key[-4:]
    assert (await client.post("/api-keys", json={})).status_code == 401

    r = await client.get("/whoami", headers={"X-API-Key": key})
    assert r.status_code == 200 and r.json()["scopes"] == ["reports:read"]
    me = (await client.get("/me", headers=bearer(token))).json()
    assert r.json()["principal_id"] == me["id"]

    listed = (await client.get("/api-keys", headers=bearer(token))).json()
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and listed[0]["last_used_at"] is not None

    # Another user cannot revoke it, nor see it.
    r = await client.delete(f"/api-keys/{created['id']}", headers=bearer(other))
    assert r.status_code == 404
    assert (await client.get("/api-keys", headers=bearer(other))).json() == []
    r = await client.delete(f"/api-keys/{created['id']}", headers=bearer(token))
    assert r.status_code == 204
    r = await client.get("/whoami", headers={"X-API-Key": key})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "ApiKey"
    r = await client.delete(f"/api-keys/{created['id']}", headers=bearer(token))
    assert r.status_code == 404


async def test_totp_enrollment_login_and_backup_codes(
    client: httpx.AsyncClient, unique: Callable[[str], str], dsn: str
) -> None:
    email = f"{unique('totp')}@example.com"
    token = await signup_and_login(client, email)
    r = await client.post("/2fa/totp", headers=bearer(token))
    assert r.status_code == 201
    enrolled = r.json()
    secret, device_id = enrolled["secret"], enrolled["device_id"]
    assert enrolled["otpauth_uri"].startswith("otpauth://totp/")
    totp = pyotp.TOTP(secret)

    # Stored encrypted: the secret is nowhere in the row.
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT secret_ciphertext FROM kitium_auth.twofa_devices WHERE id = %s", [device_id]
        ).fetchone()
    assert row is not None and secret.encode() not in bytes(row[0])

    # Not enforced until verified; a wrong code does not verify it.
    r = await client.post(
        "/2fa/totp/verify",
        headers=bearer(token),
        json={"device_id": device_id, "code": "000000" if totp.now() != "000000" else "111111"},
    )
    assert r.status_code == 400
    r = await client.post(
        "/2fa/totp/verify",
        headers=bearer(token),
        json={"device_id": str(uuid.uuid4()), "code": totp.now()},
    )
    assert r.status_code == 404
    r = await client.post(
        "/2fa/totp/verify", headers=bearer(token), json={"device_id": device_id, "code": totp.now()}
    )
    assert r.status_code == 200
    codes = r.json()["backup_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    with psycopg.connect(dsn) as conn:
        stored = [
            r[0]
            for r in conn.execute(
                "SELECT code_hash FROM kitium_auth.twofa_backup_codes b"
                " JOIN kitium_auth.users u ON u.id = b.user_id WHERE u.email = %s",
                [email],
            )
        ]
    assert sorted(stored) == sorted(backup_code_digest(c) for c in codes)
    assert not set(codes) & set(stored)
    assert (await client.get("/me", headers=bearer(token))).json()["two_factor"] is True

    async def challenge() -> str:
        r = await client.post("/login", json={"email": email, "password": "correct horse"})
        assert r.status_code == 200 and r.json()["two_factor_required"] is True
        assert "token" not in r.json() and "set-cookie" not in r.headers
        challenge_id: str = r.json()["challenge_id"]
        return challenge_id

    # The code of the next time step (this step's was spent verifying the device).
    next_code = totp.at(time.time() + 30)
    first = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": first, "code": next_code})
    assert r.status_code == 200 and "session=" in r.headers["set-cookie"]
    client.cookies.clear()
    second_token = r.json()["token"]
    assert (await client.get("/me", headers=bearer(second_token))).status_code == 200
    # A completed challenge cannot be answered again, and a code works only once.
    r = await client.post("/login/2fa", json={"challenge_id": first, "code": next_code})
    assert r.status_code == 401
    replay = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": replay, "code": next_code})
    assert r.status_code == 401 and r.json() == {"detail": "invalid or expired code"}

    # A backup code, once.
    r = await client.post(
        "/login/2fa", json={"challenge_id": replay, "backup_code": codes[0].lower()}
    )
    assert r.status_code == 200
    client.cookies.clear()
    again = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": again, "backup_code": codes[0]})
    assert r.status_code == 401
    # Neither or both factors: refused.
    r = await client.post("/login/2fa", json={"challenge_id": again})
    assert r.status_code == 401
    r = await client.post("/login/2fa", json={"challenge_id": str(uuid.uuid4()), "code": "123456"})
    assert r.status_code == 401

    # Five attempts per challenge: then even a good code is refused.
    limited = await challenge()
    for _ in range(5):
        r = await client.post(
            "/login/2fa", json={"challenge_id": limited, "backup_code": "AAAA-BBBB"}
        )
        assert r.status_code == 401
    r = await client.post("/login/2fa", json={"challenge_id": limited, "backup_code": codes[1]})
    assert r.status_code == 401
    fresh = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": fresh, "backup_code": codes[1]})
    assert r.status_code == 200
    client.cookies.clear()

    # Regenerating replaces the set: old unused codes stop working.
    r = await client.post("/2fa/backup-codes", headers=bearer(token))
    new_codes = r.json()["backup_codes"]
    assert r.status_code == 200 and not set(new_codes) & set(codes)
    old = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": old, "backup_code": codes[2]})
    assert r.status_code == 401
    new = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": new, "backup_code": new_codes[0]})
    assert r.status_code == 200
    client.cookies.clear()

    # A TOTP code is charged to the device before it is checked, so a wrong one throttles the
    # device on every challenge; while the throttle lasts (made an hour here, so the test does
    # not race the first second's window) a code is not even checked: 429 with Retry-After. A
    # backup code still gets in. (The replayed code above was charged too: end that first.)
    now = totp.timecode(dt.datetime.now(dt.UTC))
    valid = {totp.generate_otp(step) for step in range(now - 2, now + 3)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "UPDATE kitium_auth.twofa_devices SET throttled_until = now() - interval '1 second'"
            " WHERE id = %s RETURNING throttle_failures",
            [device_id],
        ).fetchone()
    assert row is not None
    failures = row[0]
    guessed = await challenge()
    r = await client.post("/login/2fa", json={"challenge_id": guessed, "code": wrong})
    assert r.status_code == 401
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "UPDATE kitium_auth.twofa_devices SET throttled_until = now() + interval '1 hour'"
            " WHERE id = %s RETURNING throttle_failures",
            [device_id],
        ).fetchone()
    assert row == (failures + 1,)
    for answered in (guessed, await challenge()):
        r = await client.post("/login/2fa", json={"challenge_id": answered, "code": wrong})
        assert r.status_code == 429, r.text
        assert 3500 <= int(r.headers["Retry-After"]) <= 3600
    r = await client.post("/login/2fa", json={"challenge_id": guessed, "backup_code": new_codes[1]})
    assert r.status_code == 200


def test_totp_step_window() -> None:
    totp = pyotp.TOTP(pyotp.random_base32())
    now = time.time()
    step = totp.timecode(now)
    assert totp_step(totp.secret, totp.at(now), at=now) == step
    assert totp_step(totp.secret, totp.at(now - 30), at=now) == step - 1
    assert totp_step(totp.secret, totp.at(now + 30), at=now) == step + 1
    assert totp_step(totp.secret, totp.at(now + 90), at=now) in (None, step + 3)  # collisions
    assert totp_step(totp.secret, "not a code", at=now) is None


async def test_organization_roles_and_permissions(
    client: httpx.AsyncClient, unique: Callable[[str], str]
) -> None:
    alice_email = f"{unique('alice')}@example.com"
    alice = await signup_and_login(client, alice_email)
    bob_email = f"{unique('bob')}@example.com"
    bob = await signup_and_login(client, bob_email)

    r = await client.post("/orgs", headers=bearer(alice), json={"name": "Acme"})
    assert r.status_code == 201
    org_id = r.json()["id"]
    assert set(r.json()["roles"]) == {"admin", "viewer"}
    assert (await client.get("/me", headers=bearer(alice))).json()["organizations"] == [org_id]

    r = await client.get("/reports", headers=bearer(alice, org_id))
    assert r.status_code == 200 and r.json() == {"org_id": org_id, "members": 1}
    r = await client.get("/reports", headers={"X-Org-Id": org_id})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = await client.get("/reports", headers=bearer(alice))
    assert r.status_code == 403  # which organization?
    r = await client.get("/reports", headers=bearer(bob, org_id))
    assert r.status_code == 403 and r.json() == {"detail": "missing permission 'reports:read'"}

    member = {"email": bob_email, "role": "viewer"}
    r = await client.post("/orgs/members", headers=bearer(bob, org_id), json=member)
    assert r.status_code == 403
    r = await client.post(
        "/orgs/members", headers=bearer(alice, org_id), json={"email": "nobody@example.com"}
    )
    assert r.status_code == 404
    r = await client.post("/orgs/members", headers=bearer(alice, org_id), json=member)
    assert r.status_code == 201 and r.json()["role"] == "viewer"

    r = await client.get("/reports", headers=bearer(bob, org_id))
    assert r.status_code == 200 and r.json()["members"] == 2
    # A viewer reads reports but does not manage members.
    r = await client.post(
        "/orgs/members", headers=bearer(bob, org_id), json={"email": bob_email, "role": "admin"}
    )
    assert r.status_code == 403
    # Promoted to admin, then demoted to viewer: nothing of admin stays.
    promote = {"email": bob_email, "role": "admin"}
    r = await client.post("/orgs/members", headers=bearer(alice, org_id), json=promote)
    assert r.status_code == 201 and r.json()["role"] == "admin"
    r = await client.post("/orgs/members", headers=bearer(alice, org_id), json=member)
    assert r.status_code == 201 and r.json()["role"] == "viewer"
    r = await client.post("/orgs/members", headers=bearer(bob, org_id), json=promote)
    assert r.status_code == 403
    r = await client.get("/reports", headers=bearer(bob, org_id))
    assert r.status_code == 200
    # The last admin cannot demote themselves: the organization would have no admin left.
    demote_self = {"email": alice_email, "role": "viewer"}
    r = await client.post("/orgs/members", headers=bearer(alice, org_id), json=demote_self)
    assert r.status_code == 409 and r.json()["code"] == "last_role_holder"
    r = await client.get("/reports", headers=bearer(alice, org_id))
    assert r.status_code == 200


async def test_healthz(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_password_hash_upgraded_on_login(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str]
) -> None:
    email = f"{unique('rehash')}@example.com"
    weak = create_app(dsn, encryption_keys=encryption_keys, password_hasher=FAST)
    async with serve(weak) as client:
        await signup_and_login(client, email)
    stronger = PasswordHasher(time_cost=2, memory_cost=8 * 1024, parallelism=1)
    app = create_app(dsn, encryption_keys=encryption_keys, password_hasher=stronger)
    async with serve(app) as client:
        r = await client.post("/login", json={"email": email, "password": "correct horse"})
        assert r.status_code == 200
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT password_hash FROM kitium_auth.users WHERE email = %s", [email]
        ).fetchone()
    assert row is not None and ",t=2," in row[0]


def test_ephemeral_key_warning(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger="examples.fastapi_app"):
        create_app(dsn, password_hasher=FAST)
    assert any("ephemeral encryption key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv(ENV_VAR, "k1:" + "A" * 43)
    with caplog.at_level(logging.WARNING, logger="examples.fastapi_app"):
        app: Any = create_app(dsn, password_hasher=FAST)
    assert app is not None and not caplog.records


async def test_adding_a_member_with_a_role_the_org_lacks_is_404(
    client: httpx.AsyncClient, dsn: str, unique: Callable[[str], str]
) -> None:
    alice = await signup_and_login(client, f"{unique('alice')}@example.com")
    bob_email = f"{unique('bob')}@example.com"
    await signup_and_login(client, bob_email)
    r = await client.post("/orgs", headers=bearer(alice), json={"name": "No viewers"})
    org_id = r.json()["id"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM kitium_auth.roles WHERE org_id = %s AND name = 'viewer'", (org_id,)
        )
    member = {"email": bob_email, "role": "viewer"}
    r = await client.post("/orgs/members", headers=bearer(alice, org_id), json=member)
    assert r.status_code == 404 and r.json() == {"detail": "no role with this name"}

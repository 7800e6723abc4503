"""An example authentication service on kitium-pg and FastAPI (one file, no framework magic).

Sign-up and login with argon2id password hashes, logout, API keys, TOTP two-factor
authentication with backup codes, and an organization with roles guarding a route. Run it with
``python -m examples.fastapi_app`` or ``python examples/fastapi_app/main.py``; README.md beside
this file walks through it with curl.

Configuration (environment): ``DATABASE_URL`` (else an embedded PostgreSQL in
``./.kitium-pg/data``), ``KITIUM_PG_ENCRYPTION_KEYS`` (else an ephemeral key, with a warning:
TOTP secrets then do not survive a restart), ``HOST`` / ``PORT`` (default 127.0.0.1:8000) and
``COOKIE_SECURE=1`` behind HTTPS.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at run time.
import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import secrets
import signal
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, FastAPI, HTTPException, Response, status
from pydantic import BaseModel, Field

from kitium_pg import ApiKey, ConflictError, Session, User
from kitium_pg.encryption import ENV_VAR, generate_key
from kitium_pg.integrations.fastapi import (
    SESSION_COOKIE,
    OrgAccess,
    Storage,
    add_exception_handlers,
    api_key_principal,
    current_session,
    require_permission,
    storage_lifespan,
)

logger = logging.getLogger("examples.fastapi_app")

SESSION_LIFETIME: Final = dt.timedelta(hours=12)
CHALLENGE_LIFETIME: Final = dt.timedelta(minutes=5)
BACKUP_CODES: Final = 10
ISSUER: Final = "kitium-pg example"
ROLES: Final[Mapping[str, tuple[str, ...]]] = {
    "admin": ("reports:read", "members:manage"),
    "viewer": ("reports:read",),
}
"""The roles every new organization gets, with their permissions."""

CurrentSession = Annotated[Session, Depends(current_session)]


# -- request bodies ---------------------------------------------------------------------------


class SignUp(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    password: str = Field(min_length=8, max_length=1024)
    name: str | None = Field(default=None, max_length=200)


class Login(BaseModel):
    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)


class SecondFactor(BaseModel):
    challenge_id: uuid.UUID
    code: str | None = Field(default=None, max_length=10)
    backup_code: str | None = Field(default=None, max_length=40)


class NewApiKey(BaseModel):
    scopes: list[str] = Field(default_factory=list, max_length=20)


class TotpCode(BaseModel):
    device_id: uuid.UUID
    code: str = Field(max_length=10)


class NewOrganization(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class NewMember(BaseModel):
    email: str = Field(max_length=320)
    role: Literal["admin", "viewer"] = "viewer"


# -- secrets: passwords, TOTP, backup codes -------------------------------------------------


class Passwords:
    """argon2id hashing (argon2-cffi), run in a thread: a hash takes tens of milliseconds."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()
        # Verified when the email is unknown, so both answers take as long.
        self._dummy = self.hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        try:
            return await asyncio.to_thread(self.hasher.verify, stored or self._dummy, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        return self.hasher.check_needs_rehash(stored)


def totp_step(secret: str, code: str, *, at: float | None = None) -> int | None:
    """The time step (current one, or one either side for clock drift) whose code is
    ``code``, or ``None``. The caller records the step with ``record_totp_step``, which refuses
    a step already used: a code works once."""
    totp = pyotp.TOTP(secret)
    now = totp.timecode(dt.datetime.now(dt.UTC) if at is None else at)
    code = code.strip()
    for step in (now, now - 1, now + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def new_backup_codes() -> list[str]:
    """Ten codes of 80 random bits each, as ``XXXX-XXXX-XXXX-XXXX`` (base32)."""
    codes = []
    for _ in range(BACKUP_CODES):
        raw = base64.b32encode(secrets.token_bytes(10)).decode()
        codes.append("-".join(raw[i : i + 4] for i in range(0, 16, 4)))
    return codes


def backup_code_digest(code: str) -> str:
    """What is stored for a backup code: SHA-256 of its normalized form. A fast digest is
    enough for 80 random bits (unlike passwords, they cannot be guessed)."""
    normalized = code.replace("-", "").replace(" ", "").upper()
    return hashlib.sha256(normalized.encode()).hexdigest()


# -- the application --------------------------------------------------------------------------


def _keys_from_env_or_ephemeral() -> dict[str, str] | None:
    if os.environ.get(ENV_VAR, "").strip():
        return None  # the adapter reads KITIUM_PG_ENCRYPTION_KEYS itself
    logger.warning(
        "%s is not set: using an ephemeral encryption key. TOTP secrets stored now cannot be"
        " read after a restart. Set %s=main:<key> (key: python -c 'from kitium_pg.encryption"
        " import generate_key; print(generate_key())').",
        ENV_VAR,
        ENV_VAR,
    )
    return {"ephemeral": generate_key()}


def create_app(
    dsn: str,
    *,
    encryption_keys: Mapping[str, str] | None = None,
    password_hasher: PasswordHasher | None = None,
    cookie_secure: bool = False,
) -> FastAPI:
    """The example service on database ``dsn``. ``encryption_keys`` default to
    ``KITIUM_PG_ENCRYPTION_KEYS``, else an ephemeral key (logged as a warning)."""
    keys = encryption_keys if encryption_keys is not None else _keys_from_env_or_ephemeral()
    options: dict[str, Any] = {} if keys is None else {"encryption_keys": dict(keys)}
    app = FastAPI(
        title="kitium-pg example service",
        lifespan=storage_lifespan(dsn, **options),
    )
    add_exception_handlers(app)
    passwords = Passwords(password_hasher)

    async def start_session(storage: Storage, user_id: uuid.UUID, response: Response) -> Any:
        expires_at = dt.datetime.now(dt.UTC) + SESSION_LIFETIME
        issued = await storage.issue_session_token(user_id=user_id, expires_at=expires_at)
        response.set_cookie(
            SESSION_COOKIE,
            issued.token,
            max_age=int(SESSION_LIFETIME.total_seconds()),
            httponly=True,
            secure=cookie_secure,
            samesite="lax",
        )
        return {"token": issued.token, "user_id": str(user_id), "expires_at": expires_at}

    # -- accounts -----------------------------------------------------------------------------

    @app.post("/signup", status_code=status.HTTP_201_CREATED)
    async def signup(body: SignUp, storage: Storage) -> dict[str, Any]:
        """Create a user with an argon2id password hash."""
        password_hash = await passwords.hash(body.password)
        try:
            user = await storage.create_user(
                email=body.email, name=body.name, password_hash=password_hash
            )
        except ConflictError:
            raise HTTPException(status.HTTP_409_CONFLICT, "email already registered") from None
        return {"id": str(user.id), "email": user.email}

    @app.post("/login")
    async def login(body: Login, storage: Storage, response: Response) -> Any:
        """Check the password; answer with a session token (also set as the ``session``
        cookie), or with a 2FA challenge when the user has a verified TOTP device."""
        user = await storage.get_user_by_email(body.email, consistency="primary")
        stored = await storage.get_password_hash(user.id) if user else None
        if not await passwords.verify(stored, body.password) or user is None or stored is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid email or password")
        if passwords.needs_rehash(stored):
            await storage.set_password_hash(user.id, await passwords.hash(body.password))
        devices = await storage.list_two_factor_devices(user.id)
        totp = next((d for d in devices if d.method == "totp" and d.verified), None)
        if totp is None:
            return await start_session(storage, user.id, response)
        # A placeholder session (its token is never issued) anchors the challenge.
        expires_at = dt.datetime.now(dt.UTC) + CHALLENGE_LIFETIME
        pending = await storage.create_session(
            user_id=user.id, expires_at=expires_at, metadata={"purpose": "2fa-pending"}
        )
        challenge = await storage.create_two_factor_session(
            user_id=user.id,
            session_id=pending.id,
            device_id=totp.id,
            method="totp",
            expires_at=expires_at,
            max_attempts=5,
        )
        return {"two_factor_required": True, "challenge_id": str(challenge.id)}

    @app.post("/login/2fa")
    async def login_second_factor(body: SecondFactor, storage: Storage, response: Response) -> Any:
        """Answer a 2FA challenge with a TOTP code or a backup code (each works once). Wrong
        TOTP codes throttle the device, on every challenge: 429 with ``Retry-After`` while it
        lasts."""
        refused = HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or expired code")
        challenge = await storage.get_two_factor_session(body.challenge_id)
        if challenge is None or (body.code is None) == (body.backup_code is None):
            raise refused
        # A TOTP code is charged to the device as a wrong one before it is checked (the right
        # code clears the charge): guesses sent at once are checked one at a time, each later
        # one finding the device throttled. A backup code is counted whatever the throttle (the
        # way back in while someone keeps guessing) and is not charged: 80 random bits each.
        attempt = await storage.count_two_factor_attempt(
            challenge.id, backup_code=body.backup_code is not None
        )
        if attempt is None:
            raise refused  # expired, completed, or out of attempts
        if attempt.throttled:
            assert attempt.throttled_until is not None
            wait = attempt.throttled_until - dt.datetime.now(dt.UTC)
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                "too many wrong codes: try again later",
                headers={"Retry-After": str(max(1, math.ceil(wait.total_seconds())))},
            )
        step = None
        if body.code is not None:
            device = await storage.get_two_factor_device(challenge.device_id)
            step = totp_step(device.secret, body.code) if device and device.secret else None
            if step is None:
                raise refused  # the charge stands: the device is throttled for a while
        # Using up the code and completing the challenge commit together: a completion that
        # fails (a concurrent submit won, the challenge expired) gives the code back.
        async with storage.transaction() as tx:
            if step is not None:
                accepted = await tx.record_totp_step(challenge.device_id, step)
            else:
                assert body.backup_code is not None
                digest = backup_code_digest(body.backup_code)
                accepted = await tx.consume_backup_code(challenge.user_id, digest) is not None
            if not accepted or not await tx.complete_two_factor_session(challenge.id):
                raise refused
        await storage.delete_session(challenge.session_id)
        return await start_session(storage, challenge.user_id, response)

    @app.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
    async def logout(session: CurrentSession, storage: Storage, response: Response) -> None:
        """Revoke the session and clear its cookie."""
        await storage.delete_session(session.id)
        response.delete_cookie(SESSION_COOKIE, httponly=True, secure=cookie_secure, samesite="lax")

    @app.get("/me")
    async def me(session: CurrentSession, storage: Storage) -> dict[str, Any]:
        """The signed-in user."""
        user = await storage.get_user(session.user_id)
        if user is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "the user no longer exists")
        devices = await storage.list_two_factor_devices(user.id)
        return {
            **_user_json(user),
            "two_factor": any(d.verified for d in devices),
            "organizations": [str(o.id) for o in await storage.list_user_organizations(user.id)],
        }

    # -- API keys -----------------------------------------------------------------------------

    @app.post("/api-keys", status_code=status.HTTP_201_CREATED)
    async def create_api_key(
        body: NewApiKey, session: CurrentSession, storage: Storage
    ) -> dict[str, Any]:
        """Issue an API key for the signed-in user (shown once)."""
        issued = await storage.issue_api_key(session.user_id, body.scopes, prefix="example")
        return {**_key_json(issued.record), "key": issued.key}

    @app.get("/api-keys")
    async def list_api_keys(session: CurrentSession, storage: Storage) -> list[dict[str, Any]]:
        """The signed-in user's API keys (never the keys themselves)."""
        return [_key_json(k) for k in await storage.list_api_keys(session.user_id)]

    @app.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def revoke_api_key(key_id: uuid.UUID, session: CurrentSession, storage: Storage) -> None:
        """Revoke one of the signed-in user's API keys."""
        record = await storage.get_api_key(key_id)
        if record is None or record.principal_id != session.user_id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such API key")
        await storage.delete_api_key(key_id)

    @app.get("/whoami")
    async def whoami(key: Annotated[ApiKey, Depends(api_key_principal)]) -> dict[str, Any]:
        """Authenticated by ``X-API-Key``: who the key belongs to and its scopes."""
        return {"principal_id": str(key.principal_id), "scopes": list(key.scopes)}

    # -- two-factor authentication -------------------------------------------------------------

    @app.post("/2fa/totp", status_code=status.HTTP_201_CREATED)
    async def enroll_totp(session: CurrentSession, storage: Storage) -> dict[str, Any]:
        """Start TOTP enrollment: a new secret (stored encrypted) and its otpauth:// URI for an
        authenticator app. The device counts once a code from it is verified."""
        user = await storage.get_user(session.user_id)
        secret = pyotp.random_base32()
        device = await storage.create_two_factor_device(
            user_id=session.user_id, method="totp", name="authenticator", secret=secret
        )
        uri = pyotp.TOTP(secret).provisioning_uri(
            name=(user.email if user else None) or str(session.user_id), issuer_name=ISSUER
        )
        return {"device_id": str(device.id), "secret": secret, "otpauth_uri": uri}

    @app.post("/2fa/totp/verify")
    async def verify_totp(
        body: TotpCode, session: CurrentSession, storage: Storage
    ) -> dict[str, Any]:
        """Confirm enrollment with a code: the device is verified and ten backup codes are
        issued (shown once; only their digests are stored)."""
        device = await storage.get_two_factor_device(body.device_id)
        if device is None or device.user_id != session.user_id or device.secret is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such device")
        step = totp_step(device.secret, body.code)
        if step is None or not await storage.record_totp_step(device.id, step):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid code")
        await storage.update_two_factor_device(device.id, verified=True)
        return {"verified": True, "backup_codes": await _new_backup_codes(storage, session)}

    @app.post("/2fa/backup-codes")
    async def regenerate_backup_codes(session: CurrentSession, storage: Storage) -> Any:
        """Replace the backup codes (the old ones stop working)."""
        return {"backup_codes": await _new_backup_codes(storage, session)}

    # -- organizations and roles ---------------------------------------------------------------

    @app.post("/orgs", status_code=status.HTTP_201_CREATED)
    async def create_org(
        body: NewOrganization, session: CurrentSession, storage: Storage
    ) -> dict[str, Any]:
        """Create an organization with roles ``admin`` and ``viewer``; the creator is admin."""
        async with storage.transaction() as tx:
            org = await tx.create_organization(
                name=body.name, plan="free", members=[{"user_id": session.user_id, "role": "admin"}]
            )
            roles = {}
            for name, permissions in ROLES.items():
                role = await tx.create_role(
                    org_id=org.id, name=name, permissions=[{"name": p} for p in permissions]
                )
                roles[name] = str(role.id)
            await tx.assign_role_to_user(session.user_id, roles["admin"], org.id)
        return {"id": str(org.id), "name": org.name, "roles": roles}

    @app.post("/orgs/members", status_code=status.HTTP_201_CREATED)
    async def add_member(
        body: NewMember,
        access: Annotated[OrgAccess, Depends(require_permission("members:manage"))],
        storage: Storage,
    ) -> dict[str, Any]:
        """Add a user (by email) to the organization in ``X-Org-Id`` with a role, or give a
        member another role (their other roles are revoked: a demoted admin keeps nothing of
        admin). The organization's last admin cannot be demoted: 409, nothing changed."""
        user = await storage.get_user_by_email(body.email, consistency="primary")
        if user is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no user with this email")
        roles = {r.name: r for r in await storage.list_roles(access.org_id)}
        role = roles.get(body.role)
        if role is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no role with this name")
        async with storage.transaction() as tx:
            member = await tx.add_organization_member(access.org_id, user.id, role=body.role)
            if member.role != body.role:  # already a member: adding keeps the role it has
                await tx.set_organization_member_role(
                    access.org_id, user.id, body.role, keep_last="admin"
                )
            for other in roles.values():
                if other.id != role.id:
                    await tx.revoke_role_from_user(user.id, other.id, access.org_id)
            await tx.assign_role_to_user(user.id, role.id, access.org_id)
        return {"org_id": str(access.org_id), "user_id": str(user.id), "role": body.role}

    @app.get("/reports")
    async def reports(
        access: Annotated[OrgAccess, Depends(require_permission("reports:read"))],
        storage: Storage,
    ) -> dict[str, Any]:
        """A permission-protected route: needs ``reports:read`` in the ``X-Org-Id``
        organization."""
        members = await storage.list_organization_members(access.org_id)
        return {"org_id": str(access.org_id), "members": len(members)}

    @app.get("/healthz")
    async def healthz(storage: Storage, response: Response) -> dict[str, Any]:
        """Readiness: 200 when the database answers and no migration is pending, else 503."""
        health = await storage.health_check()
        if health.status != "ok":
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": health.status, "latency_ms": health.latency_ms}

    return app


async def _new_backup_codes(storage: Storage, session: Session) -> list[str]:
    codes = new_backup_codes()
    await storage.create_backup_codes(session.user_id, [backup_code_digest(c) for c in codes])
    return codes


def _user_json(user: User) -> dict[str, Any]:
    return {"id": str(user.id), "email": user.email, "name": user.name}


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": str(key.id),
        "prefix": key.prefix,
        "last_four": key.last_four,
        "scopes": list(key.scopes),
        "last_used_at": key.last_used_at,
    }


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Start the service with uvicorn: on ``DATABASE_URL``, else on an embedded PostgreSQL."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dsn = os.environ.get("DATABASE_URL")
    embedded = None
    if not dsn:
        from kitium_pg.embedded import EmbeddedPostgres

        data_dir = Path(".kitium-pg/data")
        logger.info("DATABASE_URL is not set: starting an embedded PostgreSQL in %s", data_dir)
        embedded = EmbeddedPostgres(data_dir)
        dsn = embedded.start()
    app = create_app(dsn, cookie_secure=os.environ.get("COOKIE_SECURE") == "1")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: make that an exit that
    # runs the ``finally`` below (which stops the embedded server) instead of a kill.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(
            app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000"))
        )
    finally:
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    main()

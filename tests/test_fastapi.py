"""kitium_pg.integrations.fastapi against the real test database: one small app per test,
driven through httpx's ASGITransport (lifespan entered by hand), every status and header."""

# No ``from __future__ import annotations``: FastAPI must resolve the routes' annotations,
# some of which name local variables.
import asyncio
import copy
import datetime as dt
import gc
import json
import math
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, ClassVar

import httpx
import psycopg
import psycopg_pool
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError

from kitium_pg import (
    ApiKey,
    AsyncPostgresStorageAdapter,
    ConflictError,
    InternalError,
    KitiumPgError,
    NotFoundError,
    PermissionDeniedError,
    QueryTimeoutError,
    Session,
    UnavailableError,
    ValidationError,
)
from kitium_pg.encryption import ENV_VAR
from kitium_pg.integrations.fastapi import (
    STATE_ATTR,
    OrgAccess,
    Storage,
    add_exception_handlers,
    api_key_auth,
    api_key_principal,
    current_session,
    get_storage,
    open_storage,
    require_permission,
    session_auth,
    storage_lifespan,
)

with warnings.catch_warnings():
    # fastapi_users.db imports fastapi-users-db-sqlalchemy when that is installed, which warns
    # under SQLAlchemy 2.1 (warnings are errors here); nothing in these tests uses it.
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi_users import BaseUserManager, FastAPIUsers, UUIDIDMixin, schemas
    from fastapi_users import exceptions as fu_exceptions
    from fastapi_users.authentication import AuthenticationBackend, BearerTransport
    from fastapi_users.password import PasswordHelper

    from kitium_pg.integrations.fastapi_users import (
        UNUSABLE_HASH,
        EmailChanged,
        KitiumSessionStrategy,
        KitiumUser,
        KitiumUserDatabase,
        UnrepresentableOAuthUser,
        add_email_changed_handler,
    )

from .fix_disguised import Posing
from .fix_holder import release_when_waiting


class UserRead(schemas.BaseUser[uuid.UUID]):
    pass


class UserCreate(schemas.BaseUserCreate):
    pass


class UserUpdate(schemas.BaseUserUpdate):
    pass


def _in(hours: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=hours)


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give a client talking to it in process."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


def storage_of(app: FastAPI) -> AsyncPostgresStorageAdapter:
    adapter = getattr(app.state, STATE_ATTR)
    assert isinstance(adapter, AsyncPostgresStorageAdapter)
    return adapter


@pytest.fixture
def make_app(dsn: str, encryption_keys: dict[str, str]) -> Callable[[], FastAPI]:
    def make() -> FastAPI:
        app = FastAPI(
            lifespan=storage_lifespan(dsn, min_size=1, max_size=2, encryption_keys=encryption_keys)
        )

        @app.get("/me")
        async def me(session: Annotated[Session, Depends(current_session)]) -> dict[str, str]:
            return {"user_id": str(session.user_id), "session_id": str(session.id)}

        @app.get("/key")
        async def key(record: Annotated[ApiKey, Depends(api_key_principal)]) -> dict[str, Any]:
            return {"principal_id": str(record.principal_id), "scopes": list(record.scopes)}

        @app.get("/reports")
        async def reports(
            access: Annotated[OrgAccess, Depends(require_permission("reports:read"))],
        ) -> dict[str, str]:
            return {"org_id": str(access.org_id), "permission": access.permission}

        return app

    return make


# -- lifespan ---------------------------------------------------------------------------------


async def test_lifespan_opens_and_closes_the_adapter(make_app: Callable[[], FastAPI]) -> None:
    app = make_app()
    assert getattr(app.state, STATE_ATTR, None) is None
    async with serve(app):
        adapter = storage_of(app)
        assert (await adapter.health_check()).status == "ok"
    assert getattr(app.state, STATE_ATTR) is None
    assert adapter.pool.closed


async def test_open_storage_takes_an_adapter_and_refuses_options(
    dsn: str, encryption_keys: dict[str, str]
) -> None:
    app = FastAPI()
    adapter = AsyncPostgresStorageAdapter(dsn, max_size=2, encryption_keys=encryption_keys)
    async with open_storage(app, adapter, migrate=False) as opened:
        assert opened is adapter and getattr(app.state, STATE_ATTR) is adapter
    assert adapter.pool.closed
    with pytest.raises(TypeError, match="options"):
        async with open_storage(app, adapter, max_size=3):
            pass  # pragma: no cover


async def test_a_failed_start_closes_the_pool_it_opened(encryption_keys: dict[str, str]) -> None:
    """Found in review: a connect() that failed (nothing listening) left the adapter's pool
    open, reconnecting in the background, and an adapter built from a DSN out of anyone's
    reach; the start's error still reaches the caller."""
    unreachable = "postgresql://kitium@127.0.0.1:1/nowhere"
    adapter = AsyncPostgresStorageAdapter(
        unreachable, connect_timeout=1, encryption_keys=encryption_keys
    )
    with pytest.raises(UnavailableError):
        async with open_storage(FastAPI(), adapter):
            pass  # pragma: no cover
    assert adapter.pool.closed
    before = _open_pools()
    app = FastAPI(lifespan=storage_lifespan(unreachable, connect_timeout=1))
    with pytest.raises(UnavailableError):
        async with app.router.lifespan_context(app):
            pass  # pragma: no cover
    assert _open_pools() == before


def _open_pools() -> int:
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, psycopg_pool.AsyncConnectionPool) and not o.closed
    )


async def test_get_storage_without_lifespan_is_a_wiring_error() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x(storage: Annotated[AsyncPostgresStorageAdapter, Depends(get_storage)]) -> str:
        return repr(storage)  # pragma: no cover

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(RuntimeError, match="storage_lifespan"):
            await client.get("/x")


# -- current_session --------------------------------------------------------------------------


async def test_current_session_by_bearer_and_cookie(
    make_app: Callable[[], FastAPI], email: str
) -> None:
    app = make_app()
    async with serve(app) as client:
        storage = storage_of(app)
        user = await storage.create_user(email=email)
        issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
        expected = {"user_id": str(user.id), "session_id": str(issued.session.id)}

        r = await client.get("/me", headers={"Authorization": f"Bearer {issued.token}"})
        assert r.status_code == 200 and r.json() == expected
        assert "www-authenticate" not in r.headers
        r = await client.get("/me", headers={"Authorization": f"bearer {issued.token}"})
        assert r.status_code == 200  # the scheme is case-insensitive
        r = await client.get("/me", headers={"Cookie": f"session={issued.token}"})
        assert r.status_code == 200 and r.json() == expected


async def test_current_session_missing_credentials_is_401_bearer(
    make_app: Callable[[], FastAPI],
) -> None:
    async with serve(make_app()) as client:
        for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"}):
            r = await client.get("/me", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert r.json() == {"detail": "not authenticated"}
        r = await client.get("/me", headers={"Cookie": "session="})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


async def test_current_session_invalid_tokens_are_401_invalid_token(
    make_app: Callable[[], FastAPI], email: str
) -> None:
    app = make_app()
    async with serve(app) as client:
        storage = storage_of(app)
        user = await storage.create_user(email=email)
        issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
        expired = await storage.issue_session_token(user_id=user.id, expires_at=_in(-1))
        revoked = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
        assert await storage.delete_session(revoked.session.id)
        session_id, secret = issued.token.split(".")
        bad_tokens = [
            "garbage",
            f"{session_id}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}",
            f"{uuid.uuid4()}.{secret}",
            expired.token,
            revoked.token,
            "x" * 5000,
        ]
        for token in bad_tokens:
            for headers in ({"Authorization": f"Bearer {token}"}, {"Cookie": f"session={token}"}):
                r = await client.get("/me", headers=headers)
                assert r.status_code == 401, (token[:40], list(headers))
                assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
                assert r.json() == {"detail": "invalid or expired session"}
        # The header wins over the cookie: a bad bearer token is not rescued by a good cookie.
        r = await client.get(
            "/me",
            headers={"Authorization": "Bearer garbage", "Cookie": f"session={issued.token}"},
        )
        assert r.status_code == 401


async def test_session_auth_with_another_cookie(
    dsn: str, encryption_keys: dict[str, str], email: str
) -> None:
    sid = session_auth(cookie_name="sid")
    app = FastAPI(lifespan=storage_lifespan(dsn, max_size=2, encryption_keys=encryption_keys))

    @app.get("/me")
    async def me(session: Annotated[Session, Depends(sid)]) -> str:
        return str(session.user_id)

    async with serve(app) as client:
        storage = storage_of(app)
        user = await storage.create_user(email=email)
        issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
        assert (await client.get("/me", headers={"Cookie": f"sid={issued.token}"})).json() == str(
            user.id
        )
        r = await client.get("/me", headers={"Cookie": f"session={issued.token}"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


# -- api_key_principal ------------------------------------------------------------------------


async def test_api_key_principal(make_app: Callable[[], FastAPI], email: str) -> None:
    app = make_app()
    async with serve(app) as client:
        storage = storage_of(app)
        user = await storage.create_user(email=email)
        issued = await storage.issue_api_key(user.id, ["reports:read"])
        expired = await storage.issue_api_key(user.id, expires_at=_in(-1))
        revoked = await storage.issue_api_key(user.id)
        assert await storage.delete_api_key(revoked.record.id)

        r = await client.get("/key", headers={"X-API-Key": issued.key})
        assert r.status_code == 200
        assert r.json() == {"principal_id": str(user.id), "scopes": ["reports:read"]}
        assert "www-authenticate" not in r.headers

        r = await client.get("/key")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "ApiKey"
        assert r.json() == {"detail": "not authenticated"}
        r = await client.get("/key", headers={"X-API-Key": ""})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "ApiKey"
        # A session token is not an API key, and an API key is not a bearer session token.
        r = await client.get("/key", headers={"Authorization": f"Bearer {issued.key}"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "ApiKey"
        r = await client.get("/me", headers={"Authorization": f"Bearer {issued.key}"})
        assert r.status_code == 401

        for bad in (issued.key[:-1], "kpg_nope", expired.key, revoked.key, "k" * 500):
            r = await client.get("/key", headers={"X-API-Key": bad})
            assert r.status_code == 401, bad[:20]
            assert r.headers["WWW-Authenticate"] == "ApiKey"
            assert r.json() == {"detail": "invalid or expired API key"}


# -- require_permission -----------------------------------------------------------------------


async def test_require_permission(
    make_app: Callable[[], FastAPI], unique: Callable[[str], str]
) -> None:
    app = make_app()
    async with serve(app) as client:
        storage = storage_of(app)
        reader = await storage.create_user(email=f"{unique('reader')}@example.com")
        outsider = await storage.create_user(email=f"{unique('outsider')}@example.com")
        org = await storage.create_organization(
            name=unique("org"), plan="team", members=[{"user_id": reader.id}]
        )
        other = await storage.create_organization(
            name=unique("other"), plan="team", members=[{"user_id": reader.id}]
        )
        role = await storage.create_role(
            org_id=org.id, name="analyst", permissions=[{"name": "reports:read"}]
        )
        other_role = await storage.create_role(
            org_id=other.id, name="analyst", permissions=[{"name": "reports:write"}]
        )
        await storage.assign_role_to_user(reader.id, role.id, org.id)
        await storage.assign_role_to_user(reader.id, other_role.id, other.id)

        unbound = await storage.issue_session_token(user_id=reader.id, expires_at=_in(1))
        bound = await storage.issue_session_token(
            user_id=reader.id, org_id=org.id, expires_at=_in(1)
        )
        outsider_token = await storage.issue_session_token(user_id=outsider.id, expires_at=_in(1))

        def auth(token: str, org_id: object = None) -> dict[str, str]:
            headers = {"Authorization": f"Bearer {token}"}
            if org_id is not None:
                headers["X-Org-Id"] = str(org_id)
            return headers

        granted = {"org_id": str(org.id), "permission": "reports:read"}
        # Unauthenticated: 401 from the session dependency, before any permission check.
        r = await client.get("/reports", headers={"X-Org-Id": str(org.id)})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        r = await client.get("/reports", headers=auth("garbage", org.id))
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'

        # Organization from X-Org-Id (the session is bound to none).
        r = await client.get("/reports", headers=auth(unbound.token, org.id))
        assert r.status_code == 200 and r.json() == granted
        r = await client.get("/reports", headers=auth(unbound.token))
        assert r.status_code == 403 and "no organization" in r.json()["detail"]
        forbidden = [
            auth(unbound.token, other.id),  # holds a role there, but not this permission
            auth(unbound.token, uuid.uuid4()),  # unknown organization
            auth(unbound.token, "not-a-uuid"),  # malformed organization id
            auth(outsider_token.token, org.id),  # no role in the organization
        ]
        for headers in forbidden:
            r = await client.get("/reports", headers=headers)
            assert r.status_code == 403, headers
            assert r.json() == {"detail": "missing permission 'reports:read'"}
            assert "www-authenticate" not in r.headers

        # Organization from the session; a header naming another one is refused.
        r = await client.get("/reports", headers=auth(bound.token))
        assert r.status_code == 200 and r.json() == granted
        r = await client.get("/reports", headers=auth(bound.token, org.id))
        assert r.status_code == 200 and r.json() == granted
        r = await client.get("/reports", headers=auth(bound.token, other.id))
        assert r.status_code == 403 and "another organization" in r.json()["detail"]

        # Taking the role away takes the permission away at once.
        assert await storage.revoke_role_from_user(reader.id, role.id, org.id)
        r = await client.get("/reports", headers=auth(bound.token))
        assert r.status_code == 403


def test_require_permission_refuses_an_empty_name() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        require_permission("")


# -- error mapping and OpenAPI ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "body"),
    [
        (
            NotFoundError("update_user: no user x"),
            404,
            {"detail": "not_found", "code": "not_found"},
        ),
        (ConflictError("users_email_key"), 409, {"detail": "conflict", "code": "conflict"}),
        (
            ValidationError("email", "is not an email address"),
            422,
            {"detail": "email: is not an email address", "code": "validation"},
        ),
        (
            PermissionDeniedError("rls"),
            403,
            {"detail": "permission_denied", "code": "permission_denied"},
        ),
        (UnavailableError("db down"), 503, {"detail": "unavailable", "code": "unavailable"}),
        (QueryTimeoutError("slow"), 503, {"detail": "timeout", "code": "timeout"}),
        (InternalError("bug"), 500, {"detail": "internal", "code": "internal"}),
        # Transient causes (found in review: a deadlock was a 409, a failover's read-only
        # primary a 500, neither with Retry-After).
        (
            ConflictError("deadlock", code="deadlock_detected", retryable=True),
            503,
            {"detail": "deadlock_detected", "code": "deadlock_detected"},
        ),
        (
            ConflictError("serialization", code="serialization_failure", retryable=True),
            503,
            {"detail": "serialization_failure", "code": "serialization_failure"},
        ),
        (
            InternalError("read-only", code="read_only_sql_transaction", retryable=True),
            503,
            {"detail": "read_only_sql_transaction", "code": "read_only_sql_transaction"},
        ),
        # A misuse of a transaction is the route's bug: 500, and its text stays on the server.
        (
            ValidationError("transaction", "this transaction has ended"),
            500,
            {"detail": "validation", "code": "validation"},
        ),
    ],
)
async def test_exception_handlers(error: Exception, status: int, body: dict[str, str]) -> None:
    app = FastAPI()
    add_exception_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/boom")
    assert r.status_code == status and r.json() == body
    assert r.headers.get("Retry-After") == ("1" if status == 503 else None)


def test_openapi_declares_the_security_schemes(make_app: Callable[[], FastAPI]) -> None:
    schema = make_app().openapi()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["SessionToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A kitium-pg session token.",
    }
    assert (
        schemes["SessionCookie"]["in"] == "cookie" and schemes["SessionCookie"]["name"] == "session"
    )
    assert schemes["ApiKey"]["in"] == "header" and schemes["ApiKey"]["name"] == "X-API-Key"
    reports = schema["paths"]["/reports"]["get"]
    assert {"SessionToken": []} in reports["security"]
    assert any(p["name"] == "X-Org-Id" and p["in"] == "header" for p in reports["parameters"])


# -- fastapi-users ----------------------------------------------------------------------------


class UserManager(UUIDIDMixin, BaseUserManager[KitiumUser, uuid.UUID]):
    reset_password_token_secret = "test-reset-secret-0123456789abcdef"
    verification_token_secret = "test-verify-secret-0123456789abcdef"


class _ResetRecordingManager(UserManager):
    """Keeps the password-reset tokens it would mail, for the test to present."""

    tokens: ClassVar[list[str]] = []

    async def on_after_forgot_password(
        self, user: KitiumUser, token: str, request: Request | None = None
    ) -> None:
        self.tokens.append(token)


async def test_fastapi_users_database_contract(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    db = KitiumUserDatabase(async_adapter)
    email = f"{unique('fu')}@example.com"
    user = await db.create(
        {"email": email, "hashed_password": "$argon2id$fake", "is_verified": None, "name": "Ada"}
    )
    assert user.email == email and user.hashed_password == "$argon2id$fake"
    assert (user.is_active, user.is_superuser, user.is_verified) == (True, False, False)
    assert user.record.name == "Ada" and user.oauth_accounts == []
    assert await db.get(user.id) == user
    assert await db.get(uuid.uuid4()) is None
    assert await db.get_by_email(email.upper()) == user
    assert await db.get_by_email(f"{unique('nobody')}@example.com") is None
    assert await db.get_by_oauth_account("github", "42") is None

    new_email = f"{unique('fu2')}@example.com"
    updated = await db.update(
        user,
        {
            "email": new_email,
            "hashed_password": "$argon2id$other",
            "is_verified": True,
            "is_superuser": True,
            "plan": "pro",
        },
    )
    assert updated.email == new_email and updated.hashed_password == "$argon2id$other"
    assert (updated.is_active, updated.is_superuser, updated.is_verified) == (True, True, True)
    assert updated.record.plan == "pro" and updated.record.name == "Ada"
    assert updated.record.metadata == {"fastapi_users": {"is_active": True, "is_superuser": True}}
    assert updated.record.email_verified_at is not None  # is_verified is the column
    assert (await db.update(updated, {"is_active": False})).is_active is False
    with pytest.raises(ValueError, match="favourite_colour"):
        await db.update(updated, {"favourite_colour": "green"})

    linked = await db.add_oauth_account(
        updated,
        {
            "oauth_name": "github",
            "account_id": "42",
            "account_email": "ada@github.example",
            "access_token": "gho_access",
            "refresh_token": "ghr_refresh",
            "expires_at": 2_000_000_000,
        },
    )
    (account,) = linked.oauth_accounts
    assert (account.oauth_name, account.account_id, account.account_email) == (
        "github",
        "42",
        "ada@github.example",
    )
    assert (account.access_token, account.refresh_token, account.expires_at) == (
        "gho_access",
        "ghr_refresh",
        2_000_000_000,
    )
    assert await db.get_by_oauth_account("github", "42") == linked
    refreshed = await db.update_oauth_account(
        linked, account, {"access_token": "gho_new", "expires_at": None}
    )
    (account2,) = refreshed.oauth_accounts
    assert account2.id == account.id and account2.access_token == "gho_new"
    assert account2.refresh_token == "ghr_refresh"
    # A refresh stored meanwhile (update_oauth_tokens) survives an update of the email alone:
    # the tokens loaded with the user are not written back (found in review: they were).
    read = await async_adapter.get_oauth_tokens(user.id, "github")
    assert read is not None
    fresh = await async_adapter.update_oauth_tokens(
        user.id,
        "github",
        access_token="gho_rotated",
        refresh_token="ghr_rotated",
        if_version=read.version,
    )
    assert fresh is not None
    moved = await db.update_oauth_account(refreshed, account2, {"account_email": "ada@new.example"})
    (account3,) = moved.oauth_accounts
    assert account3.account_email == "ada@new.example"
    assert await async_adapter.get_oauth_tokens(user.id, "github") == fresh

    await db.delete(refreshed)
    assert await db.get(user.id) is None
    assert await db.get_by_oauth_account("github", "42") is None

    # A user stored without a password hash gets an unusable one: nothing verifies against it.
    bare = await async_adapter.create_user(email=f"{unique('bare')}@example.com")
    loaded = await db.get(bare.id)
    assert loaded is not None and loaded.hashed_password.startswith("$argon2")
    assert PasswordHelper().verify_and_update("", loaded.hashed_password)[0] is False


def _fastapi_users_app(
    dsn: str,
    encryption_keys: dict[str, str],
    *,
    database: type[KitiumUserDatabase] = KitiumUserDatabase,
    manager: type[UserManager] = UserManager,
) -> FastAPI:
    async def get_user_manager(storage: Storage) -> AsyncIterator[UserManager]:
        yield manager(database(storage))

    def get_strategy(storage: Storage) -> KitiumSessionStrategy:
        return KitiumSessionStrategy(storage, lifetime_seconds=600)

    backend = AuthenticationBackend(
        name="kitium",
        transport=BearerTransport(tokenUrl="auth/login"),
        get_strategy=get_strategy,
    )
    users = FastAPIUsers[KitiumUser, uuid.UUID](get_user_manager, [backend])
    app = FastAPI(lifespan=storage_lifespan(dsn, max_size=2, encryption_keys=encryption_keys))
    app.include_router(users.get_auth_router(backend), prefix="/auth")
    app.include_router(users.get_register_router(UserRead, UserCreate), prefix="/auth")
    app.include_router(users.get_reset_password_router(), prefix="/auth")
    app.include_router(users.get_users_router(UserRead, UserUpdate), prefix="/users")

    @app.get("/kitium-me")
    async def kitium_me(session: Annotated[Session, Depends(current_session)]) -> str:
        return str(session.user_id)

    return app


class _AddressMovesDuringUpdate(KitiumUserDatabase):
    """A user database whose next ``update`` is preceded by a change of the user's address: the
    change lands between the route's read of the user and its update, as a user changing their
    email while a superuser's PATCH runs."""

    moved_to: str | None = None

    async def update(self, user: KitiumUser, update_dict: dict[str, Any]) -> KitiumUser:
        if self.moved_to is not None:
            await self.storage.update_user(user.id, email=self.moved_to)
            type(self).moved_to = None
        return await super().update(user, update_dict)


@pytest.mark.parametrize("handlers", [True, False])
async def test_a_superusers_verify_patch_racing_an_email_change_is_a_409(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str], handlers: bool
) -> None:
    """PATCH /users/{id} with is_verified=true, the user's address changing after the route read
    the user: nothing is marked, and with add_email_changed_handler the answer is 409
    UPDATE_USER_EMAIL_CHANGED. Without it, fastapi-users' router lets EmailChanged through
    (a 500 in a served app): the handler is what maps it."""
    app = _fastapi_users_app(dsn, encryption_keys, database=_AddressMovesDuringUpdate)
    if handlers:
        add_email_changed_handler(app)
    admin, email = f"{unique('root')}@example.com", f"{unique('fu')}@example.com"
    async with serve(app) as client:
        storage = storage_of(app)
        for address in (admin, email):
            r = await client.post("/auth/register", json={"email": address, "password": "pw-1-x"})
            assert r.status_code == 201, r.text
        root = await storage.get_user_by_email(admin)
        assert root is not None
        await KitiumUserDatabase(storage).update(
            await _kitium_user(storage, root.id), {"is_superuser": True}
        )
        r = await client.post("/auth/login", data={"username": admin, "password": "pw-1-x"})
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        target = await storage.get_user_by_email(email)
        assert target is not None

        moved = f"{unique('moved')}@example.com"
        _AddressMovesDuringUpdate.moved_to = moved
        patch = client.patch(f"/users/{target.id}", headers=bearer, json={"is_verified": True})
        if handlers:
            r = await patch
            assert r.status_code == 409, r.text
            assert r.json()["detail"]["code"] == "UPDATE_USER_EMAIL_CHANGED"
        else:
            with pytest.raises(EmailChanged):
                await patch
        after = await storage.get_user(target.id, consistency="primary")
        assert after is not None and after.email == moved and after.email_verified_at is None

        # Without a race the same PATCH verifies the address the user has now.
        r = await client.patch(f"/users/{target.id}", headers=bearer, json={"is_verified": True})
        assert r.status_code == 200 and r.json()["is_verified"] is True, r.text


async def _kitium_user(storage: AsyncPostgresStorageAdapter, user_id: uuid.UUID) -> KitiumUser:
    loaded = await KitiumUserDatabase(storage).get(user_id)
    assert loaded is not None
    return loaded


async def test_fastapi_users_end_to_end(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str]
) -> None:
    app = _fastapi_users_app(dsn, encryption_keys)
    email = f"{unique('fu')}@example.com"
    async with serve(app) as client:
        r = await client.post("/auth/register", json={"email": email, "password": "pw-one-1"})
        assert r.status_code == 201, r.text
        user_id = r.json()["id"]
        assert r.json()["is_active"] is True and r.json()["is_superuser"] is False
        r = await client.post("/auth/register", json={"email": email.upper(), "password": "x"})
        assert r.status_code == 400 and r.json()["detail"] == "REGISTER_USER_ALREADY_EXISTS"

        login = {"username": email, "password": "pw-one-1"}
        r = await client.post("/auth/login", data=login)
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        r = await client.get("/users/me", headers=bearer)
        assert r.status_code == 200 and r.json()["email"] == email
        # The token is a kitium-pg session token: kitium's own dependency accepts it too.
        assert (await client.get("/kitium-me", headers=bearer)).json() == user_id

        r = await client.patch("/users/me", headers=bearer, json={"password": "pw-two-2"})
        assert r.status_code == 200
        r = await client.post("/auth/login", data=login)
        assert r.status_code == 400 and r.json()["detail"] == "LOGIN_BAD_CREDENTIALS"
        r = await client.post("/auth/login", data={**login, "password": "pw-two-2"})
        assert r.status_code == 200

        r = await client.post("/auth/logout", headers=bearer)
        assert r.status_code == 204
        assert (await client.get("/users/me", headers=bearer)).status_code == 401
        assert (await client.get("/kitium-me", headers=bearer)).status_code == 401
        r = await client.get("/users/me", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401


async def test_fastapi_users_oauth_callback(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    manager = UserManager(KitiumUserDatabase(async_adapter))
    email = f"{unique('oauth')}@example.com"
    account_id = unique("gh")
    created = await manager.oauth_callback(
        "github", "tok-1", account_id, email, 2_000_000_000, "ref-1"
    )
    assert created.email == email and created.is_verified is False
    assert [a.access_token for a in created.oauth_accounts] == ["tok-1"]
    again = await manager.oauth_callback("github", "tok-2", account_id, email, None, "ref-2")
    assert again.id == created.id
    assert [(a.access_token, a.refresh_token) for a in again.oauth_accounts] == [("tok-2", "ref-2")]
    # Another provider, same email: refused unless associate_by_email.
    with pytest.raises(fu_exceptions.UserAlreadyExists):
        await manager.oauth_callback("gitlab", "t", "7", email)
    both = await manager.oauth_callback("gitlab", "t", unique("gl"), email, associate_by_email=True)
    assert sorted(a.oauth_name for a in both.oauth_accounts) == ["github", "gitlab"]


@pytest.mark.parametrize(
    ("keys", "access_token", "expires_at"),
    [
        pytest.param(True, "tok", 10**12, id="expiry-past-9999"),
        pytest.param(True, "t" * 20_000, 2_000_000_000, id="access-token-too-long"),
        pytest.param(False, "tok", 2_000_000_000, id="adapter-without-keys"),
    ],
)
async def test_an_oauth_sign_up_whose_link_is_refused_leaves_no_user(
    dsn: str,
    encryption_keys: dict[str, str],
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    keys: bool,
    access_token: str,
    expires_at: int,
) -> None:
    """Found in review: fastapi-users' OAuth callback creates the user, then links the
    account; when kitium-pg refused the link, the user stayed, unlinked and holding the
    provider's address, and every later OAuth login of that person was refused
    (``UserAlreadyExists``: 400 OAUTH_USER_ALREADY_EXISTS). It is deleted again, and the
    next sign-up, with values kitium-pg takes, creates the user."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    async with AsyncPostgresStorageAdapter(
        dsn, max_size=2, encryption_keys=encryption_keys if keys else None
    ) as adapter:
        manager = UserManager(KitiumUserDatabase(adapter))
        email = f"{unique('oauth')}@example.com"
        account_id = unique("gh")
        with pytest.raises(KitiumPgError):
            await manager.oauth_callback("github", access_token, account_id, email, expires_at)
        assert await adapter.get_user_by_email(email, consistency="primary") is None
    async with AsyncPostgresStorageAdapter(
        dsn, max_size=2, encryption_keys=encryption_keys
    ) as adapter:
        manager = UserManager(KitiumUserDatabase(adapter))
        created = await manager.oauth_callback("github", "tok", account_id, email, None)
        assert created.email == email
        assert [a.account_id for a in created.oauth_accounts] == [account_id]


async def test_a_failed_association_leaves_a_user_who_signed_up_earlier(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """Found in review: one database instance shared by requests remembered every user it had
    created, and a later failed link of one (an association with an identity another user
    holds, the documented 409) deleted that user. Only the call right after a create can be
    its OAuth sign-up's link: here the association's request loads the user first, as every
    authenticated route does, and the user stays."""
    db = KitiumUserDatabase(async_adapter)  # shared, built once
    manager = UserManager(db)
    holder = await db.create({"email": f"{unique('holder')}@example.com", "hashed_password": "h"})
    account_id = unique("gh")
    await db.add_oauth_account(
        holder, {"oauth_name": "github", "account_id": account_id, "account_email": None}
    )
    email = f"{unique('registered')}@example.com"
    registered = await db.create({"email": email, "hashed_password": "h"})
    current = await db.get(registered.id)  # the next request's authentication
    assert current is not None
    with pytest.raises(ConflictError):
        await manager.oauth_associate_callback(current, "github", "tok", account_id, email, None)
    assert await async_adapter.get_user(registered.id, consistency="primary") is not None


async def test_only_a_taken_address_is_user_already_exists(
    async_adapter: AsyncPostgresStorageAdapter,
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``create`` answers ``UserAlreadyExists`` for the email's unique violation only: a
    deadlock that reached it (a ``ConflictError`` too, retryable) is raised as it is, and
    ``add_exception_handlers`` makes it a 503, not a 400 REGISTER_USER_ALREADY_EXISTS."""
    db = KitiumUserDatabase(async_adapter)
    email = f"{unique('taken')}@example.com"
    await db.create({"email": email, "hashed_password": "h"})
    with pytest.raises(fu_exceptions.UserAlreadyExists):
        await db.create({"email": email.upper(), "hashed_password": "h"})

    async def deadlocked(**fields: Any) -> Any:
        raise ConflictError("create_user: deadlock", code="deadlock_detected", retryable=True)

    monkeypatch.setattr(async_adapter, "create_user", deadlocked)
    with pytest.raises(ConflictError) as raised:
        await db.create({"email": f"{unique('free')}@example.com", "hashed_password": "h"})
    assert raised.value.code == "deadlock_detected"


# -- consistency ------------------------------------------------------------------------------


async def test_dependencies_read_the_primary_unless_told_otherwise(
    dsn: str, encryption_keys: dict[str, str], email: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revocation holds from the next request: the auth dependencies pass
    ``consistency="primary"`` to the adapter, whether or not it has replicas; an app may ask
    for replica reads per dependency. (The adapter's own replica routing is tested in
    tests/test_replicas.py.)"""
    app = FastAPI(
        lifespan=storage_lifespan(dsn, min_size=1, max_size=2, encryption_keys=encryption_keys)
    )
    seen: list[tuple[str, str]] = []

    @app.get("/primary")
    async def primary(
        access: Annotated[OrgAccess, Depends(require_permission("p"))],
        key: Annotated[ApiKey, Depends(api_key_principal)],
    ) -> dict[str, str]:
        return {}

    replica_session = session_auth(consistency="replica")

    @app.get("/replica")
    async def replica(
        access: Annotated[
            OrgAccess,
            Depends(require_permission("p", session=replica_session, consistency="replica")),
        ],
        key: Annotated[ApiKey, Depends(api_key_auth(consistency="replica"))],
    ) -> dict[str, str]:
        return {}

    async with serve(app) as client:
        storage = storage_of(app)
        user = await storage.create_user(email=email)
        org = await storage.create_organization(
            name="C", plan="team", members=[{"user_id": user.id}]
        )
        role = await storage.create_role(org_id=org.id, name="r", permissions=[{"name": "p"}])
        await storage.assign_role_to_user(user.id, role.id, org.id)
        issued = await storage.issue_session_token(
            user_id=user.id, org_id=org.id, expires_at=_in(1)
        )
        key = await storage.issue_api_key(user.id)
        for method in ("validate_session_token", "verify_api_key", "has_permission"):
            real = getattr(storage, method)

            def spy(*args: Any, _real: Any = real, _name: str = method, **kwargs: Any) -> Any:
                seen.append((_name, kwargs["consistency"]))
                return _real(*args, **kwargs)

            monkeypatch.setattr(storage, method, spy)
        headers = {"Authorization": f"Bearer {issued.token}", "X-API-Key": key.key}
        assert (await client.get("/primary", headers=headers)).status_code == 200
        assert sorted(seen) == [
            ("has_permission", "primary"),
            ("validate_session_token", "primary"),
            ("verify_api_key", "primary"),
        ]
        seen.clear()
        assert (await client.get("/replica", headers=headers)).status_code == 200
        assert sorted(seen) == [
            ("has_permission", "replica"),
            ("validate_session_token", "replica"),
            ("verify_api_key", "replica"),
        ]


@pytest.mark.parametrize("bad", ["eventual", "", None, "PRIMARY"])
def test_dependencies_refuse_an_unknown_consistency(bad: Any) -> None:
    for make in (
        lambda: session_auth(consistency=bad),
        lambda: api_key_auth(consistency=bad),
        lambda: require_permission("p", consistency=bad),
    ):
        with pytest.raises(ValidationError) as caught:
            make()
        assert caught.value.field == "consistency"


async def test_fastapi_users_is_verified_is_the_users_email_verified_at(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """fastapi-users' is_verified reads and writes email_verified_at: kitium's verification
    shows in fastapi-users and the other way round, an email change clears it, and a
    verification applied after the address changed (the token was for the old one) marks
    nothing and raises InvalidVerifyToken."""
    db = KitiumUserDatabase(async_adapter)
    email = f"{unique('fv')}@example.com"
    user = await db.create({"email": email, "hashed_password": "h"})
    assert user.is_verified is False
    await async_adapter.mark_user_email_verified(user.id, email)
    marked = await db.get(user.id)
    assert marked is not None and marked.is_verified is True
    moved = await db.update(marked, {"email": f"{unique('fv2')}@example.com"})
    assert moved.is_verified is False and moved.record.email_verified_at is None

    verified = await db.update(moved, {"is_verified": True})
    assert verified.is_verified is True
    assert (await db.update(verified, {"is_verified": False})).is_verified is False

    # The token was checked against the address `stale` holds; the address changed since.
    stale = await db.get(user.id)
    assert stale is not None
    await async_adapter.update_user(user.id, email=f"{unique('fv3')}@example.com")
    with pytest.raises(fu_exceptions.InvalidVerifyToken):
        await db.update(stale, {"is_verified": True, "is_superuser": True})
    after = await async_adapter.get_user(user.id, consistency="primary")
    assert after is not None and after.email_verified_at is None
    assert after.metadata["fastapi_users"]["is_superuser"] is False  # nothing written

    vouched = await db.create(
        {"email": f"{unique('fv4')}@example.com", "hashed_password": "h", "is_verified": True}
    )
    assert vouched.is_verified is True and vouched.record.email_verified_at is not None


async def test_fastapi_users_verifying_a_deleted_user_is_not_found(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """Found in review: is_verified=True alone for a user deleted after it was read raised
    EmailChanged (answered 409 "address changed"); it is NotFoundError, as with any other
    field."""
    db = KitiumUserDatabase(async_adapter)
    user = await db.create({"email": f"{unique('gone')}@example.com", "hashed_password": "h"})
    assert await async_adapter.delete_user(user.id)
    for update in ({"is_verified": True}, {"is_verified": True, "is_superuser": True}):
        with pytest.raises(NotFoundError):
            await db.update(user, update)


async def test_fastapi_users_concurrent_flag_updates_both_hold(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """Two updates of different flags at once: each merges into the stored metadata under the
    user row's lock, so neither overwrites the other (before, one was lost every time)."""
    db = KitiumUserDatabase(async_adapter)
    user = await db.create({"email": f"{unique('flags')}@example.com", "hashed_password": "h"})
    for _ in range(5):
        reset = await db.update(user, {"is_verified": False, "is_superuser": False})
        await asyncio.gather(
            db.update(reset, {"is_verified": True}), db.update(reset, {"is_superuser": True})
        )
        stored = await db.get(user.id)
        assert stored is not None and (stored.is_verified, stored.is_superuser) == (True, True)


@pytest.mark.parametrize("expires_at", [10**20, -(10**13), math.nan, math.inf, "1700000000", True])
async def test_fastapi_users_a_bad_oauth_expiry_is_refused_by_name(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str], expires_at: object
) -> None:
    """Found in review: the provider's ``expires_at`` went to ``datetime.fromtimestamp``
    unchecked, so the OAuth callback failed with OverflowError, ValueError or TypeError. (A
    user created earlier, by another request's database instance: one this instance has just
    created is an OAuth sign-up, which a refused link undoes.)"""
    user = await KitiumUserDatabase(async_adapter).create(
        {"email": f"{unique('exp')}@example.com", "hashed_password": "h"}
    )
    db = KitiumUserDatabase(async_adapter)
    account = {"oauth_name": "github", "account_id": unique("gh"), "access_token": "a"}
    with pytest.raises(ValidationError) as refused:
        await db.add_oauth_account(user, {**account, "expires_at": expires_at})
    assert refused.value.field == "expires_at"
    assert (await db.get(user.id)).oauth_accounts == []  # type: ignore[union-attr]
    linked = await db.add_oauth_account(user, {**account, "expires_at": 1_700_000_000.5})
    assert linked.oauth_accounts[0].expires_at == 1_700_000_000


async def test_fastapi_users_deactivating_a_user_ends_their_sessions_and_api_keys(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """kitium's own dependencies see sessions and API keys, not fastapi-users' flags: without
    this, a user deactivated through fastapi-users kept access through current_session and
    api_key_principal."""
    db = KitiumUserDatabase(async_adapter)
    user = await db.create({"email": f"{unique('eve')}@example.com", "hashed_password": "h"})
    issued = await async_adapter.issue_session_token(user_id=user.id, expires_at=_in(1))
    assert await async_adapter.validate_session_token(issued.token) is not None
    await db.update(user, {"is_verified": True})  # other flags leave the sessions alone
    assert await async_adapter.validate_session_token(issued.token) is not None
    key = await async_adapter.issue_api_key(user.id, ["read"])
    deactivated = await db.update(user, {"is_active": False})
    assert deactivated.is_active is False
    assert await async_adapter.validate_session_token(issued.token, consistency="primary") is None
    assert await async_adapter.list_user_sessions(user.id) == []
    # and their API keys (found in review: api_key_principal kept accepting them)
    assert await async_adapter.verify_api_key(key.key) is None
    assert await async_adapter.list_api_keys(user.id) == []


async def test_fastapi_users_null_leaves_a_field_as_it_is(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str]
) -> None:
    """Found in review: ``PATCH /users/me {"email": null}`` removed the user's address (500,
    after the write: the user was locked out and the address free to take), a superuser's
    ``{"is_active": null, ...}`` deactivated and un-verified the user, and ``{"password": null}``
    was a 500. Each is now "unchanged"."""
    app = _fastapi_users_app(dsn, encryption_keys)
    email = f"{unique('nulls')}@example.com"
    async with serve(app) as client:
        r = await client.post("/auth/register", json={"email": email, "password": "pw-one-1"})
        user_id = uuid.UUID(r.json()["id"])
        storage = storage_of(app)
        await storage.update_user(
            user_id,
            email_verified_at=dt.datetime.now(dt.UTC),
            metadata_patch={"fastapi_users": {"is_superuser": True}},
        )
        login = {"username": email, "password": "pw-one-1"}
        token = (await client.post("/auth/login", data=login)).json()["access_token"]
        bearer = {"Authorization": f"Bearer {token}"}
        for body in ({"email": None}, {"password": None}):
            r = await client.patch("/users/me", headers=bearer, json=body)
            assert r.status_code == 200, (body, r.text)
            assert r.json()["email"] == email
        flags = {"is_active": None, "is_verified": None, "is_superuser": None}
        r = await client.patch(f"/users/{user_id}", headers=bearer, json=flags)
        assert r.status_code == 200, r.text
        assert r.json()["is_active"] is True and r.json()["is_verified"] is True
        assert r.json()["is_superuser"] is True
        assert (await client.get("/users/me", headers=bearer)).status_code == 200
        assert (await client.post("/auth/login", data=login)).status_code == 200


async def test_fastapi_users_a_user_without_a_password_hash_gets_one_fixed_unusable_hash(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str]
) -> None:
    """Found in review: the placeholder hash of a user stored without one was made per database
    instance (one per request): an argon2 hash on the event loop at each request, a login that
    took visibly longer for such users, and a password-reset token that failed on the next
    request, whose instance had another hash. It is ``UNUSABLE_HASH`` in every instance, no
    password verifies it, and a reset works; a user without an email is no fastapi-users user."""
    app = _fastapi_users_app(dsn, encryption_keys, manager=_ResetRecordingManager)
    email = f"{unique('sso')}@example.com"
    async with serve(app) as client:
        storage = storage_of(app)
        sso_user = await storage.create_user(email=email)  # as an SSO sign-in makes one
        loaded = [await KitiumUserDatabase(storage).get(sso_user.id) for _ in range(2)]
        assert [u.hashed_password for u in loaded if u] == [UNUSABLE_HASH] * 2
        assert PasswordHelper().verify_and_update("", UNUSABLE_HASH) == (False, None)
        r = await client.post("/auth/login", data={"username": email, "password": ""})
        assert r.status_code in (400, 422)
        r = await client.post("/auth/forgot-password", json={"email": email})
        assert r.status_code == 202
        token = _ResetRecordingManager.tokens.pop()
        r = await client.post("/auth/reset-password", json={"token": token, "password": "new-pw-1"})
        assert r.status_code == 200, r.text
        r = await client.post("/auth/login", data={"username": email, "password": "new-pw-1"})
        assert r.status_code == 200
        nameless = await storage.create_user(name="no address")
        assert await KitiumUserDatabase(storage).get(nameless.id) is None
        issued = await storage.issue_session_token(user_id=nameless.id, expires_at=_in(1))
        r = await client.get("/users/me", headers={"Authorization": f"Bearer {issued.token}"})
        assert r.status_code == 401  # not a 500


@pytest.mark.parametrize("order", ["deactivated first", "deactivation in flight"])
async def test_fastapi_users_a_login_racing_a_deactivation_leaves_no_session(
    async_adapter: AsyncPostgresStorageAdapter,
    unique: Callable[[str], str],
    dsn: str,
    order: str,
) -> None:
    """Found in review (50 of 50 unforced races): fastapi-users checks ``is_active`` when it
    reads the user, then verifies the password; a deactivation (which deletes the sessions)
    committed meanwhile was followed by the login's session. The session is now written only
    while the user is active, judged on the user row locked against the deactivation: the
    login is refused as fastapi-users refuses an inactive user."""
    db = KitiumUserDatabase(async_adapter)
    user = await db.create({"email": f"{unique('late')}@example.com", "hashed_password": "h"})
    strategy = KitiumSessionStrategy(async_adapter)
    if order == "deactivated first":
        await db.update(user, {"is_active": False})
        with pytest.raises(HTTPException) as refused:
            await strategy.write_token(user)  # the user as read before the deactivation
    else:
        holder = psycopg.connect(dsn)
        holder.execute(
            "UPDATE kitium_auth.users SET metadata = jsonb_set(metadata,"
            " '{fastapi_users,is_active}', 'false') WHERE id = %s",
            (user.id,),
        )
        watcher = release_when_waiting(dsn, holder, "fastapi_users' -> 'is_active'")
        try:
            with pytest.raises(HTTPException) as refused:
                await strategy.write_token(user)
        finally:
            await asyncio.to_thread(watcher.join)
            holder.close()
        assert watcher.seen  # type: ignore[attr-defined]
    assert refused.value.status_code == 400
    assert refused.value.detail == "LOGIN_BAD_CREDENTIALS"
    assert await async_adapter.list_user_sessions(user.id) == []
    # An active user's login still gets a session; a deleted user's is refused alike.
    active = await db.create({"email": f"{unique('fine')}@example.com", "hashed_password": "h"})
    token = await strategy.write_token(active)
    assert await async_adapter.validate_session_token(token, consistency="primary") is not None
    await db.delete(active)
    with pytest.raises(HTTPException):
        await strategy.write_token(active)


@pytest.mark.parametrize(
    "stored",
    [True, False, None, 0, 1, "", "false", "yes", [], {}, "missing", "not an object"],
)
async def test_fastapi_users_a_login_and_the_user_agree_on_any_stored_flag(
    async_adapter: AsyncPostgresStorageAdapter,
    unique: Callable[[str], str],
    dsn: str,
    stored: object,
) -> None:
    """Found in review: ``is_active`` read with ``bool()`` made ``0`` or ``null`` inactive
    while the login's statement refused only ``false`` (and ``"false"`` was active to both). A
    flag is true only as JSON ``true``, or missing and true by default (``is_active``)."""
    db = KitiumUserDatabase(async_adapter)
    user = await db.create({"email": f"{unique('flag')}@example.com", "hashed_password": "h"})
    if stored == "not an object":
        flags: object = "is_active"
    elif stored == "missing":
        flags = {}
    else:
        flags = {"is_active": stored, "is_superuser": stored}
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE kitium_auth.users SET metadata = jsonb_build_object('fastapi_users', %s::jsonb)"
            " WHERE id = %s",
            (json.dumps(flags), user.id),
        )
    loaded = await db.get(user.id)
    assert loaded is not None
    active = stored is True or stored in ("missing", "not an object")
    assert loaded.is_active is active
    assert loaded.is_superuser is (stored is True)
    strategy = KitiumSessionStrategy(async_adapter)
    if active:
        assert await strategy.write_token(loaded)
    else:
        with pytest.raises(HTTPException):
            await strategy.write_token(loaded)
        assert await async_adapter.list_user_sessions(user.id) == []


async def test_fastapi_users_a_taken_email_is_user_already_exists(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """Also when the database, not the user manager's check, finds the email taken (a
    concurrent registration): fastapi-users answers REGISTER_USER_ALREADY_EXISTS, not a 409."""
    db = KitiumUserDatabase(async_adapter)
    email = f"{unique('taken')}@example.com"
    other = await db.create({"email": f"{unique('other')}@example.com", "hashed_password": "h"})
    await db.create({"email": email, "hashed_password": "h"})
    with pytest.raises(fu_exceptions.UserAlreadyExists):
        await db.create({"email": email.upper(), "hashed_password": "h"})
    with pytest.raises(fu_exceptions.UserAlreadyExists):
        await db.update(other, {"email": email})
    results = await asyncio.gather(
        *(db.create({"email": f"race-{email}", "hashed_password": "h"}) for _ in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, KitiumUser) for r in results) == 1
    assert sum(isinstance(r, fu_exceptions.UserAlreadyExists) for r in results) == 2


async def test_fastapi_users_strategy_without_lifetime(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    db = KitiumUserDatabase(async_adapter)
    user = await db.create({"email": f"{unique('forever')}@example.com", "hashed_password": "h"})
    token = await KitiumSessionStrategy(async_adapter, lifetime_seconds=None).write_token(user)
    session = await async_adapter.validate_session_token(token, consistency="primary")
    assert session is not None
    assert session.expires_at - dt.datetime.now(dt.UTC) > dt.timedelta(days=3649)


async def test_fastapi_users_an_address_kitium_refuses_is_a_422_with_or_without_handlers(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str]
) -> None:
    """An address pydantic's EmailStr accepts and kitium-pg refuses (U+0130 in the local part:
    lower() would make it another address) in a registration or a PATCH /users/me: 422, nothing
    written. Without add_exception_handlers it was kitium's ValidationError escaping the route
    (a 500; found in review); with them it is their 422."""
    for handlers in (False, True):
        app = _fastapi_users_app(dsn, encryption_keys)
        if handlers:
            add_exception_handlers(app)
        hostile = f"b\u0130b-{unique('')}@example.com"
        email = f"{unique('fu')}@example.com"
        async with serve(app) as client:
            r = await client.post("/auth/register", json={"email": hostile, "password": "pw-1-x"})
            assert r.status_code == 422, r.text
            if handlers:
                assert r.json()["code"] == "validation" and "email" in r.json()["detail"]
            else:  # FastAPI's answer to a value the request's schema refused
                assert [e["loc"] for e in r.json()["detail"]] == [["body", "email"]]

            r = await client.post("/auth/register", json={"email": email, "password": "pw-1-x"})
            assert r.status_code == 201, r.text
            r = await client.post("/auth/login", data={"username": email, "password": "pw-1-x"})
            bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
            r = await client.patch("/users/me", headers=bearer, json={"email": hostile})
            assert r.status_code == 422, r.text
            r = await client.get("/users/me", headers=bearer)
            assert r.status_code == 200 and r.json()["email"] == email

    # Outside a request it is a kitium-pg ValidationError naming the field, and also what
    # FastAPI answers 422 by itself.
    app = _fastapi_users_app(dsn, encryption_keys)
    async with serve(app):
        db = KitiumUserDatabase(storage_of(app))
        with pytest.raises(ValidationError) as caught:
            await db.create({"email": hostile, "hashed_password": "h"})
        assert caught.value.field == "email" and str(caught.value).startswith("email: ")
        assert isinstance(caught.value, RequestValidationError)
        # A refusal of a value the client did not send is not the client's: left as it was.
        user = await db.get_by_email(email)
        assert user is not None
        with pytest.raises(ValidationError) as caught:
            await db.update(user, {"hashed_password": "\x00"})
        assert not isinstance(caught.value, RequestValidationError)


@pytest.mark.parametrize(
    "stored", ["{}@localhost", "{}@intranet", "a..{}@example.com", ".{}@x.com"]
)
async def test_fastapi_users_a_user_whose_address_emailstr_refuses_is_no_fastapi_users_user(
    dsn: str, encryption_keys: dict[str, str], unique: Callable[[str], str], stored: str
) -> None:
    """kitium-pg stores addresses pydantic's EmailStr refuses (an application's own sign-up or
    SSO); fastapi-users' user schemas cannot carry them, and GET /users/me answered such a user
    with a 500 (response validation; found in review). Such a user is treated as one without
    an address: no fastapi-users user (401 on its routes, no password login), while kitium's
    own dependencies still accept its sessions. The user database does not store one either."""
    app = _fastapi_users_app(dsn, encryption_keys)
    address = stored.format(unique("ada"))
    async with serve(app) as client:
        storage = storage_of(app)
        user = await storage.create_user(email=address)
        await storage.set_password_hash(user.id, PasswordHelper().hash("pw-1-x"))
        issued = await storage.issue_session_token(user_id=user.id, expires_at=_in(1))
        bearer = {"Authorization": f"Bearer {issued.token}"}
        assert (await client.get("/users/me", headers=bearer)).status_code == 401
        assert (await client.get("/kitium-me", headers=bearer)).json() == str(user.id)
        r = await client.post("/auth/login", data={"username": address, "password": "pw-1-x"})
        assert r.status_code == 400 and r.json()["detail"] == "LOGIN_BAD_CREDENTIALS"
        db = KitiumUserDatabase(storage)
        assert await db.get(user.id) is None and await db.get_by_email(address) is None

        other = address.replace("@", "-2@")
        with pytest.raises(ValidationError) as caught:
            await db.create({"email": other, "hashed_password": "h"})
        assert caught.value.field == "email"
        assert await storage.get_user_by_email(other, consistency="primary") is None
        fine = await db.create({"email": f"{unique('fine')}@example.com", "hashed_password": "h"})
        with pytest.raises(ValidationError):
            await db.update(fine, {"email": other})
        assert (await _kitium_user(storage, fine.id)).email == fine.email


@pytest.mark.parametrize("address", [None, "{}@localhost"])
async def test_fastapi_users_oauth_login_of_an_identity_linked_to_an_unrepresentable_user(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str], address: str | None
) -> None:
    """An OAuth identity linked to a user fastapi-users cannot represent (no address, or one
    EmailStr refuses): get_by_oauth_account answered None, so the callback created a second user
    with the provider's address, failed to link the identity to it (ConflictError, a 500) and
    every later attempt was UserAlreadyExists: locked out (found in review). Now it raises a
    UserAlreadyExists naming the linked user (the route's 400 OAUTH_USER_ALREADY_EXISTS) and
    creates nothing."""
    manager = UserManager(KitiumUserDatabase(async_adapter))
    sub, email = unique("gh"), f"{unique('oauth')}@example.com"
    linked = await async_adapter.create_user(
        email=None if address is None else address.format(unique("ada"))
    )
    await async_adapter.link_oauth_account(linked.id, "github", sub=sub, email=email)
    for _ in range(2):
        with pytest.raises(fu_exceptions.UserAlreadyExists) as caught:
            await manager.oauth_callback("github", "tok", sub, email, None, None)
        assert getattr(caught.value, "user_id", None) == linked.id
        assert await async_adapter.get_user_by_email(email, consistency="primary") is None
    # An identity linked to no user is still "no such user".
    assert await KitiumUserDatabase(async_adapter).get_by_oauth_account("github", "nope") is None


async def test_fastapi_users_checks_the_characters_an_address_holds(
    async_adapter: AsyncPostgresStorageAdapter, unique: Callable[[str], str]
) -> None:
    """Found in review of the fix above: the EmailStr check's cache answered a str subclass
    equal to (and hashing as) one checked before with that one's entry, so create() stored an
    address EmailStr refuses and then failed to load the user it had committed."""
    db = KitiumUserDatabase(async_adapter)
    posing_as = unique("key")
    good = Posing(f"{unique('ada')}@example.com", poses_as=posing_as)
    fine = await db.create({"email": good, "hashed_password": "h"})
    refused = f"{unique('ada')}@localhost"
    with pytest.raises(ValidationError) as caught:
        await db.create({"email": Posing(refused, poses_as=posing_as), "hashed_password": "h"})
    assert caught.value.field == "email"
    assert await async_adapter.get_user_by_email(refused, consistency="primary") is None
    assert (await db.get(fine.id)) is not None


def test_unrepresentable_oauth_user_survives_a_copy() -> None:
    """Found in review of the fix above: rebuilt from its message (as pickle and copy rebuild
    an exception), the copy wrapped that message in another."""
    error = UnrepresentableOAuthUser(uuid.UUID(int=7))
    again = copy.deepcopy(error)
    assert (type(again), str(again), again.user_id) == (type(error), str(error), error.user_id)

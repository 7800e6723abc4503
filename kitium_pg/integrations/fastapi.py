"""FastAPI integration: an adapter for the application's lifetime and auth dependencies.

Install with ``pip install 'kitium-pg[fastapi]'``::

    from typing import Annotated

    from fastapi import Depends, FastAPI

    from kitium_pg import Session
    from kitium_pg.integrations.fastapi import (
        OrgAccess,
        current_session,
        require_permission,
        storage_lifespan,
    )

    app = FastAPI(lifespan=storage_lifespan("postgresql://app@db/app"))


    @app.get("/me")
    async def me(session: Annotated[Session, Depends(current_session)]) -> dict[str, str]:
        return {"user_id": str(session.user_id)}


    @app.get("/reports")
    async def reports(
        access: Annotated[OrgAccess, Depends(require_permission("reports:read"))],
    ) -> dict[str, str]:
        return {"org_id": str(access.org_id)}

Status codes and headers, the whole contract:

- ``current_session``: 401 with ``WWW-Authenticate: Bearer`` when the request has no bearer
  token and no ``session`` cookie; 401 with ``WWW-Authenticate: Bearer error="invalid_token"``
  when the token is malformed, unknown, expired or revoked.
- ``api_key_principal``: 401 with ``WWW-Authenticate: ApiKey`` when ``X-API-Key`` is missing
  or the key is malformed, unknown or expired.
- ``require_permission(n)``: 401 as ``current_session``; 403 when there is no organization
  (the session has no ``org_id`` and ``X-Org-Id`` is missing), when ``X-Org-Id`` names another
  organization than the session's, or when ``n`` is not granted there.

The three dependencies read the primary, also when the adapter has read replicas, so a logout, a
deleted key or a revoked role holds from the next request; ``session_auth``, ``api_key_auth`` and
``require_permission`` take ``consistency="replica"`` to trade that for replica reads.

``add_exception_handlers(app)`` maps the library's errors escaping a route to HTTP responses
(404, 409, 422, 403, 503 with ``Retry-After``); without it they are 500s like any exception.
"""

# No ``from __future__ import annotations``: FastAPI reads the dependencies' annotations at
# run time, and those of the closures below name local variables.
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Final

import attrs
from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.applications import Starlette

from .. import AsyncPostgresStorageAdapter
from .._base import Consistency
from .._validate import replica_allowed
from ..errors import (
    ConflictError,
    KitiumPgError,
    NotFoundError,
    PermissionDeniedError,
    QueryTimeoutError,
    UnavailableError,
    ValidationError,
)
from ..records import ApiKey, Session

__all__ = [
    "API_KEY_HEADER",
    "ORG_HEADER",
    "SESSION_COOKIE",
    "STATE_ATTR",
    "OrgAccess",
    "Storage",
    "add_exception_handlers",
    "api_key_auth",
    "api_key_principal",
    "current_session",
    "get_storage",
    "open_storage",
    "require_permission",
    "session_auth",
    "storage_lifespan",
]

STATE_ATTR: Final = "kitium_pg"
"""Name of the ``app.state`` attribute that holds the adapter."""
SESSION_COOKIE: Final = "session"
"""Cookie that ``current_session`` reads a session token from."""
API_KEY_HEADER: Final = "X-API-Key"
"""Header that ``api_key_principal`` reads an API key from."""
ORG_HEADER: Final = "X-Org-Id"
"""Header that names the organization when the session is not bound to one."""

_NOT_AUTHENTICATED: Final = "not authenticated"


# -- the adapter for the application's lifetime ---------------------------------------------


@asynccontextmanager
async def open_storage(
    app: Starlette,
    storage: str | AsyncPostgresStorageAdapter,
    *,
    migrate: bool = True,
    **options: Any,
) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    """Connect an adapter, store it as ``app.state.kitium_pg`` for the block, then disconnect.

    ``storage`` is a DSN (the adapter is built with ``options``, the keywords of
    ``AsyncPostgresStorageAdapter``) or an adapter you built (``options`` must then be empty).
    An adapter you built serves one start: it is disconnected at the end, and a disconnected
    adapter cannot connect again. Pass a DSN to start the application more than once (a test
    suite entering ``TestClient(app)`` in every test).
    ``migrate`` is passed to ``connect()``. For an application that has a lifespan of its own::

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with open_storage(app, dsn):
                yield  # ...and whatever else the application opens

    Raises what ``connect()`` raises (``UnavailableError``, ``MigrationError``): the
    application then fails to start instead of serving 500s.
    """
    if isinstance(storage, AsyncPostgresStorageAdapter):
        if options:
            raise TypeError("adapter options apply only when storage is a DSN")
        adapter = storage
    else:
        adapter = AsyncPostgresStorageAdapter(storage, **options)
    try:
        await adapter.connect(migrate=migrate)
    except BaseException:
        # A failed connect() leaves the pool open, reconnecting in the background, until
        # disconnect(): nobody else could close an adapter built here from a DSN (found in
        # review: its connections and worker tasks outlived the failed start).
        await adapter.disconnect()
        raise
    setattr(app.state, STATE_ATTR, adapter)
    try:
        yield adapter
    finally:
        setattr(app.state, STATE_ATTR, None)
        await adapter.disconnect()


def storage_lifespan(
    storage: str | AsyncPostgresStorageAdapter, *, migrate: bool = True, **options: Any
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """A lifespan for ``FastAPI(lifespan=...)`` that runs the application inside
    ``open_storage(app, storage, migrate=migrate, **options)``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_storage(app, storage, migrate=migrate, **options):
            yield

    return lifespan


def get_storage(request: Request) -> AsyncPostgresStorageAdapter:
    """Dependency: the application's adapter (``app.state.kitium_pg``).

    Raises ``RuntimeError`` (a 500) when the application was not started with
    ``storage_lifespan`` or ``open_storage``: a wiring mistake, not a client error.
    """
    adapter = getattr(request.app.state, STATE_ATTR, None)
    if not isinstance(adapter, AsyncPostgresStorageAdapter):
        raise RuntimeError(
            "no kitium-pg adapter on app.state: use FastAPI(lifespan=storage_lifespan(...))"
            " or open_storage(app, ...)"
        )
    return adapter


Storage = Annotated[AsyncPostgresStorageAdapter, Depends(get_storage)]
"""``storage: Storage`` in a route or dependency receives the adapter (``get_storage``)."""

# -- sessions ---------------------------------------------------------------------------------

_BEARER = HTTPBearer(
    auto_error=False, scheme_name="SessionToken", description="A kitium-pg session token."
)


def _unauthorized(detail: str, challenge: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": challenge}
    )


def session_auth(
    *, cookie_name: str = SESSION_COOKIE, consistency: Consistency = "primary"
) -> Callable[..., Awaitable[Session]]:
    """A ``current_session``-like dependency reading the token from cookie ``cookie_name``.

    The dependency returns the ``Session`` of the request's session token: the
    ``Authorization: Bearer <token>`` header when present, else the cookie. It checks the token
    with ``validate_session_token`` on the primary by default, so a logout or revocation holds
    from the next request; ``consistency="replica"`` lets it read a replica (when the adapter has
    one) and accepts that a revoked token works for as long as the replica lags. Raises
    ``HTTPException`` 401 with ``WWW-Authenticate: Bearer`` when there is no token, and with
    ``WWW-Authenticate: Bearer error="invalid_token"`` (RFC 6750) when the token is malformed,
    unknown, expired or revoked.
    """
    replica_allowed(consistency)  # refused here, when the app is built, not per request
    cookie = APIKeyCookie(
        name=cookie_name,
        auto_error=False,
        scheme_name="SessionCookie",
        description="A kitium-pg session token in a cookie.",
    )

    async def current_session(
        storage: Storage,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        cookie_token: Annotated[str | None, Depends(cookie)],
    ) -> Session:
        token = bearer.credentials if bearer is not None else cookie_token
        if not token:
            raise _unauthorized(_NOT_AUTHENTICATED, "Bearer")
        session = await storage.validate_session_token(token, consistency=consistency)
        if session is None:
            raise _unauthorized("invalid or expired session", 'Bearer error="invalid_token"')
        return session

    return current_session


current_session = session_auth()
"""Dependency: the ``Session`` of the request (bearer header, else ``session`` cookie).

401 with ``WWW-Authenticate: Bearer`` without a token; 401 with ``WWW-Authenticate: Bearer
error="invalid_token"`` for a malformed, unknown, expired or revoked one. See ``session_auth``.
"""

# -- API keys ---------------------------------------------------------------------------------

_API_KEY = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    scheme_name="ApiKey",
    description="A kitium-pg API key.",
)


def api_key_auth(*, consistency: Consistency = "primary") -> Callable[..., Awaitable[ApiKey]]:
    """An ``api_key_principal``-like dependency; ``consistency`` as in ``session_auth`` (the
    primary by default, so a deleted key stops working from the next request)."""
    replica_allowed(consistency)

    async def api_key_principal(
        storage: Storage, key: Annotated[str | None, Depends(_API_KEY)]
    ) -> ApiKey:
        if not key:
            raise _unauthorized(_NOT_AUTHENTICATED, "ApiKey")
        record = await storage.verify_api_key(key, consistency=consistency)
        if record is None:
            raise _unauthorized("invalid or expired API key", "ApiKey")
        return record

    return api_key_principal


api_key_principal = api_key_auth()
"""Dependency: the ``ApiKey`` record of the request's ``X-API-Key`` header, checked with
``verify_api_key`` on the primary (which also stamps ``last_used_at``, at most once a minute).
Its ``principal_id`` says who is calling, ``scopes`` what the key may do.

401 with ``WWW-Authenticate: ApiKey`` when the header is missing or the key is malformed,
unknown, expired or deleted. See ``api_key_auth``.
"""


# -- permissions ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class OrgAccess:
    """What ``require_permission`` returns: the session, the organization the permission was
    checked in, and the permission."""

    session: Session
    org_id: uuid.UUID
    permission: str


def require_permission(
    name: str,
    *,
    session: Callable[..., Awaitable[Session]] = current_session,
    consistency: Consistency = "primary",
    tenant_scoped: bool = False,
) -> Callable[..., Awaitable[OrgAccess]]:
    """A dependency granting access only to sessions whose user holds permission ``name``
    (exact match) in the request's organization, through its roles (``has_permission``).

    The organization is the session's ``org_id``; for a session bound to none, the
    ``X-Org-Id`` header. Returns an ``OrgAccess``. Raises ``HTTPException`` 401 (from
    ``session``, the session dependency, ``current_session`` by default) when the request is
    not authenticated, and 403 when no organization is given, when ``X-Org-Id`` names another
    organization than the session's, or when the permission is not granted there (a malformed
    or unknown organization id is simply not granted anything). The permission is checked on
    the primary by default, so a revoked role or a removed member is refused from the next
    request; ``consistency`` as in ``session_auth``. With the optional ``tenant_rls``
    migration and an application role, pass ``tenant_scoped=True``: the check then runs as
    the organization's tenant (``storage.tenant(org_id)``, one more round trip), since without
    a tenant that role sees no role assignment and every request would get 403.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("require_permission: name must be a non-empty string")
    replica_allowed(consistency)

    async def permission_check(
        storage: Storage,
        current: Annotated[Session, Depends(session)],
        org_header: Annotated[str | None, Header(alias=ORG_HEADER)] = None,
    ) -> OrgAccess:
        org_id = current.org_id
        if org_header is not None:
            requested = _parse_uuid(org_header)
            if org_id is not None and requested != org_id:
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    detail=f"the session is bound to another organization than {ORG_HEADER}",
                )
            if requested is None:
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN, detail=f"missing permission {name!r}"
                )
            org_id = requested
        if org_id is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"no organization: the session has none and {ORG_HEADER} is not set",
            )
        checker = storage.tenant(org_id) if tenant_scoped else storage
        if not await checker.has_permission(current.user_id, org_id, name, consistency=consistency):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"missing permission {name!r}")
        return OrgAccess(session=current, org_id=org_id, permission=name)

    return permission_check


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


# -- errors -----------------------------------------------------------------------------------

_STATUS: Final[Mapping[type[KitiumPgError], int]] = {
    NotFoundError: status.HTTP_404_NOT_FOUND,
    ConflictError: status.HTTP_409_CONFLICT,
    ValidationError: 422,  # Unprocessable Content (its constant was renamed across versions)
    PermissionDeniedError: status.HTTP_403_FORBIDDEN,
    UnavailableError: status.HTTP_503_SERVICE_UNAVAILABLE,
    QueryTimeoutError: status.HTTP_503_SERVICE_UNAVAILABLE,
}


async def _kitium_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KitiumPgError)
    # A transient cause (retryable: a deadlock, a serialization failure, a primary turned
    # read-only by a failover, as well as a database down or slow) is the server's to retry,
    # not a conflict with the client's data (409) nor a bug (500) (found in review).
    code = (
        status.HTTP_503_SERVICE_UNAVAILABLE
        if exc.retryable
        else next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
    )
    headers = {"Retry-After": "1"} if code == status.HTTP_503_SERVICE_UNAVAILABLE else None
    # Only a ValidationError's message is meant for the client (it names the bad field);
    # the others may name rows or servers, so the client gets the error code alone. A misuse
    # of a transaction (field "transaction") is the route's bug, not the client's: 500.
    misuse = isinstance(exc, ValidationError) and exc.field == "transaction"
    if misuse:
        code = 500
    detail = str(exc) if isinstance(exc, ValidationError) and not misuse else exc.code
    return JSONResponse({"detail": detail, "code": exc.code}, status_code=code, headers=headers)


def add_exception_handlers(app: FastAPI) -> None:
    """Answer ``KitiumPgError`` escaping a route with JSON ``{"detail", "code"}``:
    ``NotFoundError`` 404, ``ConflictError`` 409, ``ValidationError`` 422 (its message as
    detail; one about a misused transaction, field ``transaction``, is a 500 with its code
    alone), ``PermissionDeniedError`` 403, ``UnavailableError``, ``QueryTimeoutError`` and
    every other error whose cause is transient (``retryable``: a deadlock, a serialization
    failure, a primary turned read-only by a failover) 503 with ``Retry-After: 1``, anything
    else 500."""
    app.add_exception_handler(KitiumPgError, _kitium_error)

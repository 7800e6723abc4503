"""kitium-pg: PostgreSQL storage for authentication data.

Every statement lives in a named ``.sql`` file under ``queries/`` (loaded with aiosql), rows are
bound to frozen attrs records, and the same methods exist on a sync and an async adapter::

    from kitium_pg import PostgresStorageAdapter

    with PostgresStorageAdapter("postgresql://…") as storage:
        user = storage.create_user(email="ada@example.com")
"""

from ._async.adapter import AsyncPostgresStorageAdapter
from ._base import UNSET, MigrationState
from ._sync.adapter import PostgresStorageAdapter
from .errors import (
    ConflictError,
    InternalError,
    KitiumPgError,
    MigrationError,
    NotFoundError,
    QueryTimeoutError,
    UnavailableError,
    ValidationError,
)
from .records import (
    ApiKey,
    AuthEvent,
    EmailVerificationToken,
    EventPage,
    HealthStatus,
    IssuedApiKey,
    IssuedSession,
    OAuthLink,
    OAuthTokens,
    Organization,
    OrganizationMember,
    Session,
    User,
)

__all__ = [
    "UNSET",
    "ApiKey",
    "AsyncPostgresStorageAdapter",
    "AuthEvent",
    "ConflictError",
    "EmailVerificationToken",
    "EventPage",
    "HealthStatus",
    "InternalError",
    "IssuedApiKey",
    "IssuedSession",
    "KitiumPgError",
    "MigrationError",
    "MigrationState",
    "NotFoundError",
    "OAuthLink",
    "OAuthTokens",
    "Organization",
    "OrganizationMember",
    "PostgresStorageAdapter",
    "QueryTimeoutError",
    "Session",
    "UnavailableError",
    "User",
    "ValidationError",
]

__version__ = "0.1.0"

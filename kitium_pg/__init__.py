"""kitium-pg: PostgreSQL storage for authentication data.

Every statement lives in a named ``.sql`` file under ``queries/`` (loaded with aiosql), rows are
bound to frozen attrs records, and the same methods exist on a sync and an async adapter::

    from kitium_pg import PostgresStorageAdapter

    with PostgresStorageAdapter("postgresql://…") as storage:
        user = storage.create_user(email="ada@example.com")
"""

from ._async.adapter import AsyncPostgresStorageAdapter
from ._base import UNSET, MigrationState, Unset
from ._sync.adapter import PostgresStorageAdapter
from .errors import (
    ConflictError,
    EncryptionKeyError,
    InternalError,
    KitiumPgError,
    MigrationError,
    NotFoundError,
    PermissionDeniedError,
    QueryTimeoutError,
    SeatLimitError,
    UnavailableError,
    ValidationError,
)
from .records import (
    ApiKey,
    AuthEvent,
    BackupCode,
    EmailVerificationToken,
    EventPage,
    HealthStatus,
    IssuedApiKey,
    IssuedSession,
    OAuthLink,
    OAuthTokens,
    Organization,
    OrganizationMember,
    Permission,
    Role,
    RoleAssignment,
    Session,
    SsoDomain,
    SsoLink,
    SsoProvider,
    SsoSession,
    TwoFactorAttempt,
    TwoFactorDevice,
    TwoFactorSession,
    User,
)

__all__ = [
    "UNSET",
    "ApiKey",
    "AsyncPostgresStorageAdapter",
    "AuthEvent",
    "BackupCode",
    "ConflictError",
    "EmailVerificationToken",
    "EncryptionKeyError",
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
    "Permission",
    "PermissionDeniedError",
    "PostgresStorageAdapter",
    "QueryTimeoutError",
    "Role",
    "RoleAssignment",
    "SeatLimitError",
    "Session",
    "SsoDomain",
    "SsoLink",
    "SsoProvider",
    "SsoSession",
    "TwoFactorAttempt",
    "TwoFactorDevice",
    "TwoFactorSession",
    "UnavailableError",
    "Unset",
    "User",
    "ValidationError",
]

__version__ = "0.1.0"

"""The stack users pick instead of kitium-pg: SQLAlchemy 2 ORM models of the same tables
(psycopg sync, psycopg async, asyncpg).

Imported only when SQLAlchemy is installed (the ``bench`` extra). The models are declared
against the ``kitium_auth`` schema and pointed at the benchmark's schema with SQLAlchemy's
``schema_translate_map``. Each call opens an ORM ``Session`` (the per-request unit of work of a
web app), so reads run BEGIN … ROLLBACK and writes BEGIN … COMMIT around their statements.
"""

from __future__ import annotations

import datetime as dt
import hmac
import uuid
from typing import Any

import psycopg
from sqlalchemy import (
    ARRAY,
    DateTime,
    ForeignKey,
    LargeBinary,
    Text,
    and_,
    create_engine,
    delete,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    joinedload,
    mapped_column,
    relationship,
    sessionmaker,
)

from .seed import new_id
from .variants import (
    AsyncVariant,
    Login,
    NewBackupCodes,
    NewEvent,
    NewSession,
    NewUser,
    SyncVariant,
    key_digest,
    token_digest,
)

SCHEMA = "kitium_auth"
STALE_AFTER = dt.timedelta(minutes=1)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's declarative configuration
        dt.datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[str]: ARRAY(Text),
        bytes: LargeBinary,
        str: Text,
    }


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    email: Mapped[str | None]
    email_verified_at: Mapped[dt.datetime | None]
    name: Mapped[str | None]
    picture: Mapped[str | None]
    plan: Mapped[str] = mapped_column(server_default="free")
    entitlements: Mapped[list[str]] = mapped_column(server_default="{}")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default="{}")
    password_hash: Mapped[str | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    oauth_accounts: Mapped[list[OAuthAccountRow]] = relationship(lazy="raise")


class OAuthAccountRow(Base):
    __tablename__ = "oauth_accounts"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(f"{SCHEMA}.users.id"))
    provider: Mapped[str]
    subject: Mapped[str]
    email: Mapped[str | None]
    name: Mapped[str | None]
    linked_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID]
    org_id: Mapped[uuid.UUID | None]
    plan: Mapped[str | None]
    entitlements: Mapped[list[str]] = mapped_column(server_default="{}")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default="{}")
    expires_at: Mapped[dt.datetime]
    token_hash: Mapped[bytes | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    principal_id: Mapped[uuid.UUID]
    hash: Mapped[str]
    prefix: Mapped[str]
    last_four: Mapped[str]
    scopes: Mapped[list[str]] = mapped_column(server_default="{}")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default="{}")
    expires_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class AuthEventRow(Base):
    __tablename__ = "auth_events"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    type: Mapped[str]
    principal_id: Mapped[str]
    org_id: Mapped[str | None]
    data: Mapped[dict[str, Any]] = mapped_column(server_default="{}")
    timestamp: Mapped[dt.datetime] = mapped_column("timestamp", server_default=func.now())


class RoleRow(Base):
    __tablename__ = "roles"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    org_id: Mapped[uuid.UUID]
    name: Mapped[str]
    description: Mapped[str | None]
    is_system: Mapped[bool]
    permissions: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class UserRoleRow(Base):
    __tablename__ = "user_roles"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID]
    role_id: Mapped[uuid.UUID]
    org_id: Mapped[uuid.UUID]
    assigned_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class EmailTokenRow(Base):
    __tablename__ = "email_verification_tokens"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    email: Mapped[str]
    code_hash: Mapped[str]
    type: Mapped[str]
    user_id: Mapped[uuid.UUID | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", server_default="{}")
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]
    consumed_by: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class BackupCodeRow(Base):
    __tablename__ = "twofa_backup_codes"
    __table_args__ = {"schema": SCHEMA}  # noqa: RUF012

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID]
    code_hash: Mapped[str]
    used_at: Mapped[dt.datetime | None]
    consumed_by: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


def url_for(dsn: str, driver: str) -> URL:
    """A SQLAlchemy URL (``postgresql+<driver>``) for a libpq DSN, Unix sockets included."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(info.pop("host", "") or "")
    query: dict[str, str] = {}
    if host.startswith("/"):
        query["host"] = host
        host = ""
    port = info.pop("port", None)
    return URL.create(
        f"postgresql+{driver}",
        username=str(info.pop("user", "")) or None,
        password=str(info.pop("password", "")) or None,
        host=host or None,
        port=int(port) if port else None,
        database=str(info.pop("dbname", "")) or None,
        query=query,
    )


# -- operations, written the way the ORM's documentation suggests ------------------------------


def _session_by_id(x: uuid.UUID) -> Any:
    return select(SessionRow).where(SessionRow.id == x, SessionRow.expires_at > func.now())


def _session_for_token(sid: uuid.UUID) -> Any:
    return select(SessionRow).where(
        SessionRow.id == sid, SessionRow.expires_at > func.now(), SessionRow.token_hash.is_not(None)
    )


def _user_by_email(x: str) -> Any:
    return (
        select(UserRow)
        .options(joinedload(UserRow.oauth_accounts))
        .where(func.lower(UserRow.email) == func.lower(x))
    )


def _live_key(digest: str) -> Any:
    return select(ApiKeyRow).where(
        ApiKeyRow.hash == digest,
        or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > func.now()),
    )


def _roles_of(user_id: uuid.UUID, org_id: uuid.UUID) -> Any:
    return (
        select(RoleRow)
        .join(
            UserRoleRow,
            and_(UserRoleRow.role_id == RoleRow.id, UserRoleRow.org_id == RoleRow.org_id),
        )
        .where(UserRoleRow.user_id == user_id, UserRoleRow.org_id == org_id)
        .order_by(RoleRow.created_at, RoleRow.id)
    )


def _merge_permissions(roles: Any) -> list[dict[str, Any]]:
    # The oldest role defining a permission name wins, as in kitium-pg's query.
    merged: dict[str, dict[str, Any]] = {}
    for role in roles:
        for permission in role.permissions:
            merged.setdefault(permission["name"], permission)
    return [merged[name] for name in sorted(merged)]


def _new_user(x: NewUser) -> UserRow:
    return UserRow(
        id=new_id(),
        email=x.email,
        name=x.name,
        plan="free",
        entitlements=[],
        metadata_=x.metadata,
        password_hash=x.password_hash,
    )


def _new_session(x: NewSession) -> SessionRow:
    return SessionRow(
        id=new_id(),
        user_id=x.user_id,
        entitlements=[],
        metadata_=x.metadata,
        expires_at=x.expires_at,
    )


def _new_event(x: NewEvent) -> AuthEventRow:
    return AuthEventRow(id=new_id(), type=x.type, principal_id=str(x.principal_id), data=x.data)


def _event_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": new_id(),
            "type": e["type"],
            "principal_id": str(e["principal_id"]),
            "data": e["data"],
        }
        for e in events
    ]


def _stale(key: ApiKeyRow) -> bool:
    return key.last_used_at is None or key.last_used_at < dt.datetime.now(dt.UTC) - STALE_AFTER


_NOTES = {
    "get_user_by_email": "joinedload of the OAuth links (one LEFT JOIN) for the same data",
    "verify_api_key": "SELECT, then UPDATE last_used_at only when stale (never here: busy keys)",
    "get_user_permissions": "loads the user's roles, merges permissions in Python",
    "emit_events": "ORM bulk insert(AuthEvent) with a list of dicts (insertmanyvalues)",
    "create_backup_codes": "DELETE + add_all in one transaction (no user-row lock)",
    "mark_email_verification_token_as_used": "SELECT … FOR UPDATE, check, UPDATE, COMMIT",
}


class SQLAlchemySync(SyncVariant):
    """SQLAlchemy 2 ORM on psycopg 3 (sync), default engine and pool."""

    name = "sqlalchemy-psycopg"
    stack = "sqlalchemy"
    notes = _NOTES

    def __init__(self, dsn: str, schema: str) -> None:
        self.engine = create_engine(
            url_for(dsn, "psycopg"), execution_options={"schema_translate_map": {SCHEMA: schema}}
        )
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def op_get_session(self, x: uuid.UUID) -> Any:
        with self.session() as s:
            return s.scalars(_session_by_id(x)).first()

    def op_validate_session_token(self, x: str) -> Any:
        sid, _, secret = x.partition(".")
        with self.session() as s:
            row: SessionRow | None = s.scalars(_session_for_token(uuid.UUID(sid))).first()
        if row is None or row.token_hash is None:
            return None
        return row if hmac.compare_digest(row.token_hash, token_digest(secret)) else None

    def op_get_user_by_email(self, x: str) -> Any:
        with self.session() as s:
            return s.scalars(_user_by_email(x)).unique().first()

    def op_get_api_key_by_hash(self, x: str) -> Any:
        with self.session() as s:
            return s.scalars(_live_key(x)).first()

    def op_verify_api_key(self, x: str) -> Any:
        digest = key_digest(x)
        with self.session() as s:
            key: ApiKeyRow | None = s.scalars(_live_key(digest)).first()
            if key is None or not hmac.compare_digest(key.hash, digest):
                return None
            if _stale(key):
                key.last_used_at = dt.datetime.now(dt.UTC)
                s.commit()
            return key

    def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        with self.session() as s:
            return _merge_permissions(s.scalars(_roles_of(x[0], x[1])).all())

    def op_create_user(self, x: NewUser) -> Any:
        with self.session() as s:
            row = _new_user(x)
            s.add(row)
            s.commit()
            return row

    def op_create_session(self, x: NewSession) -> Any:
        with self.session() as s:
            row = _new_session(x)
            s.add(row)
            s.commit()
            return row

    def op_emit_event(self, x: NewEvent) -> Any:
        with self.session() as s:
            row = _new_event(x)
            s.add(row)
            s.commit()
            return row

    def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        rows = _event_rows(x)
        with self.session() as s:
            s.execute(insert(AuthEventRow), rows)
            s.commit()
        return len(rows)

    def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        with self.session() as s:
            s.execute(delete(BackupCodeRow).where(BackupCodeRow.user_id == x.user_id))
            codes = [
                BackupCodeRow(id=new_id(), user_id=x.user_id, code_hash=h) for h in x.code_hashes
            ]
            s.add_all(codes)
            s.commit()
            return codes

    def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        with self.session() as s:
            token = s.get(EmailTokenRow, x, with_for_update=True)
            now = dt.datetime.now(dt.UTC)
            if token is None or token.used_at is not None or token.expires_at <= now:
                raise RuntimeError(f"token {x} was not consumable")
            token.used_at = now
            token.consumed_by = uuid.uuid4()
            s.commit()
            return token

    def maint_delete_expired_sessions(self, batch_size: int) -> tuple[int, list[float]]:
        """One ORM bulk DELETE of every expired row (what the ORM docs show); ``batch_size``
        does not apply."""
        import time

        started = time.perf_counter()
        with self.session() as s:
            result: Any = s.execute(
                delete(SessionRow)
                .where(SessionRow.expires_at <= func.now())
                .execution_options(synchronize_session=False)
            )
            s.commit()
        return int(result.rowcount), [time.perf_counter() - started]


class SQLAlchemyAsync(AsyncVariant):
    """SQLAlchemy 2 ORM on an async driver (``AsyncSession``), default engine and pool."""

    stack = "sqlalchemy"
    notes = _NOTES

    def __init__(self, name: str, dsn: str, schema: str, driver: str) -> None:
        self.name = name
        self.engine = create_async_engine(
            url_for(dsn, driver), execution_options={"schema_translate_map": {SCHEMA: schema}}
        )
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()

    async def op_get_session(self, x: uuid.UUID) -> Any:
        async with self.session() as s:
            return (await s.scalars(_session_by_id(x))).first()

    async def op_validate_session_token(self, x: str) -> Any:
        sid, _, secret = x.partition(".")
        async with self.session() as s:
            row: SessionRow | None = (await s.scalars(_session_for_token(uuid.UUID(sid)))).first()
        if row is None or row.token_hash is None:
            return None
        return row if hmac.compare_digest(row.token_hash, token_digest(secret)) else None

    async def op_get_user_by_email(self, x: str) -> Any:
        async with self.session() as s:
            return (await s.scalars(_user_by_email(x))).unique().first()

    async def op_get_api_key_by_hash(self, x: str) -> Any:
        async with self.session() as s:
            return (await s.scalars(_live_key(x))).first()

    async def op_verify_api_key(self, x: str) -> Any:
        digest = key_digest(x)
        async with self.session() as s:
            key: ApiKeyRow | None = (await s.scalars(_live_key(digest))).first()
            if key is None or not hmac.compare_digest(key.hash, digest):
                return None
            if _stale(key):
                key.last_used_at = dt.datetime.now(dt.UTC)
                await s.commit()
            return key

    async def op_get_user_permissions(self, x: tuple[uuid.UUID, uuid.UUID]) -> Any:
        async with self.session() as s:
            return _merge_permissions((await s.scalars(_roles_of(x[0], x[1]))).all())

    async def op_create_user(self, x: NewUser) -> Any:
        async with self.session() as s:
            row = _new_user(x)
            s.add(row)
            await s.commit()
            return row

    async def op_create_session(self, x: NewSession) -> Any:
        async with self.session() as s:
            row = _new_session(x)
            s.add(row)
            await s.commit()
            return row

    async def op_emit_event(self, x: NewEvent) -> Any:
        async with self.session() as s:
            row = _new_event(x)
            s.add(row)
            await s.commit()
            return row

    async def op_emit_events(self, x: list[dict[str, Any]]) -> Any:
        rows = _event_rows(x)
        async with self.session() as s:
            await s.execute(insert(AuthEventRow), rows)
            await s.commit()
        return len(rows)

    async def op_create_backup_codes(self, x: NewBackupCodes) -> Any:
        async with self.session() as s:
            await s.execute(delete(BackupCodeRow).where(BackupCodeRow.user_id == x.user_id))
            codes = [
                BackupCodeRow(id=new_id(), user_id=x.user_id, code_hash=h) for h in x.code_hashes
            ]
            s.add_all(codes)
            await s.commit()
            return codes

    async def op_mark_email_verification_token_as_used(self, x: uuid.UUID) -> Any:
        async with self.session() as s:
            token = await s.get(EmailTokenRow, x, with_for_update=True)
            now = dt.datetime.now(dt.UTC)
            if token is None or token.used_at is not None or token.expires_at <= now:
                raise RuntimeError(f"token {x} was not consumable")
            token.used_at = now
            token.consumed_by = uuid.uuid4()
            await s.commit()
            return token

    async def op_login(self, x: Login) -> Any:
        """Both rows added to one unit of work and committed (BEGIN, 2 INSERTs, COMMIT)."""
        async with self.session() as s:
            session = _new_session(x.session)
            event = _new_event(x.event)
            s.add_all([session, event])
            await s.commit()
            return session, event

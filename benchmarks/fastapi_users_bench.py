"""fastapi-users' ``SQLAlchemyUserDatabase`` (fastapi-users-db-sqlalchemy) on a ``user`` table in
its own shape, in a schema of its own, seeded with the kitium users' emails.

Imported only when fastapi-users-db-sqlalchemy is installed (the ``bench`` extra).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi_users_db_sqlalchemy import SQLAlchemyBaseUserTableUUID, SQLAlchemyUserDatabase
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from .orm import url_for
from .variants import AsyncVariant

FASTAPI_USERS_SCHEMA = "fastapi_users"


class FastAPIUsersBase(DeclarativeBase):
    pass


class FastAPIUser(SQLAlchemyBaseUserTableUUID, FastAPIUsersBase):
    """fastapi-users' user model exactly as its docs declare it (table ``user``)."""

    __table_args__ = {"schema": FASTAPI_USERS_SCHEMA}  # noqa: RUF012


def create_fastapi_users_table(dsn: str, schema: str) -> None:
    """Create fastapi-users' ``user`` table (its own DDL: unique index on ``email``, nothing on
    ``lower(email)``) in ``schema``."""
    engine = create_engine(url_for(dsn, "psycopg"))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
            mapped = conn.execution_options(schema_translate_map={FASTAPI_USERS_SCHEMA: schema})
            FastAPIUsersBase.metadata.create_all(mapped, checkfirst=False)
    finally:
        engine.dispose()


_FASTAPI_SKIP = "fastapi-users' user database only stores users (no sessions, keys, events)"


class FastAPIUsers(AsyncVariant):
    """fastapi-users' ``SQLAlchemyUserDatabase.get_by_email`` on its own ``user`` table, with the
    ``get_user_db`` dependency its docs show (``async_sessionmaker``; asyncpg as in its docs, or
    psycopg 3 async)."""

    stack = "fastapi-users"
    skips = {
        op: _FASTAPI_SKIP
        for op in (
            "get_session",
            "validate_session_token",
            "get_api_key_by_hash",
            "verify_api_key",
            "get_user_permissions",
            "create_session",
            "emit_event",
            "emit_events",
            "create_backup_codes",
            "mark_email_verification_token_as_used",
        )
    } | {
        "create_user": "fastapi-users is compared on user lookups; its user row (email,"
        " hashed_password, three flags) is not kitium's, and SQLAlchemy's create_user is measured"
    }

    def __init__(self, name: str, dsn: str, schema: str, driver: str = "asyncpg") -> None:
        self.name = name
        self.engine = create_async_engine(
            url_for(dsn, driver),
            execution_options={"schema_translate_map": {FASTAPI_USERS_SCHEMA: schema}},
        )
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)

    async def close(self) -> None:
        await self.engine.dispose()

    async def op_get_user_by_email(self, x: str) -> Any:
        async with self.session() as session:
            users: SQLAlchemyUserDatabase[FastAPIUser, uuid.UUID] = SQLAlchemyUserDatabase(
                session, FastAPIUser
            )
            return await users.get_by_email(x)

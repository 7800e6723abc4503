"""A private schema, and a login role that is not a superuser and owns what it migrates there:
for the checks that refuse a role row-level security keeps rows from (rotate_keys, the SSO
session purge)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A private schema, so the test meets only its own rows."""
    name = f"roles_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE".encode())


@pytest.fixture
def login_role(dsn: str, schema: str) -> Iterator[str]:
    """A login role that is not a superuser; dropped (with what it owns, and the schema)
    after the test."""
    role = f"kpg_own_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER".encode())
    yield role
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())
        admin.execute(f"DROP OWNED BY {role}".encode())
        admin.execute(f"DROP ROLE {role}".encode())


@pytest.fixture
def owner_dsn(dsn: str, login_role: str) -> str:
    """A DSN of ``login_role``, allowed to create schemas: the owner of what it migrates."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        database = admin.execute("SELECT current_database()").fetchone()
        assert database is not None
        admin.execute(f'GRANT CREATE ON DATABASE "{database[0]}" TO {login_role}'.encode())
    return make_conninfo(dsn, user=login_role)

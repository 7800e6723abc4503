"""A private schema, a login role that is not a superuser and owns what it migrates there, and
the policies a DBA may set beside tenant_rls's: for the checks that refuse a role row-level
security keeps rows from (rotate_keys, the SSO session purge)."""

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


# Policies a DBA may set on a table beside tenant_rls's ({role}: the role that applied it). Each
# test of a check says which of them keep rows from its operation, and must make it refuse.
POLICIES_BESIDE_TENANT_RLS: dict[str, list[str]] = {
    "tenant_rls alone": [],
    "a restrictive policy that hides nothing": [
        "CREATE POLICY all_rows ON {table} AS RESTRICTIVE USING (true) WITH CHECK (true)"
    ],
    "a restrictive policy on inserts only": [
        "CREATE POLICY no_inserts ON {table} AS RESTRICTIVE FOR INSERT WITH CHECK (false)"
    ],
    "a restrictive policy on updates only": [
        "CREATE POLICY no_updates ON {table} AS RESTRICTIVE FOR UPDATE USING (false)"
    ],
    "a restrictive policy on deletes only": [
        "CREATE POLICY no_deletes ON {table} AS RESTRICTIVE FOR DELETE USING (false)"
    ],
    "a restrictive policy that hides rows": [
        "CREATE POLICY no_rows ON {table} AS RESTRICTIVE USING (id IS NULL)"
    ],
    "owner_access for reads only": [
        "DROP POLICY owner_access ON {table}",
        "CREATE POLICY owner_reads ON {table} FOR SELECT TO {role} USING (true)",
    ],
    "owner_access restrictive": [
        "DROP POLICY owner_access ON {table}",
        "CREATE POLICY owner_access ON {table} AS RESTRICTIVE TO {role}"
        " USING (true) WITH CHECK (true)",
    ],
    "owner_access with a WITH CHECK": [
        "DROP POLICY owner_access ON {table}",
        "CREATE POLICY owner_access ON {table} TO {role} USING (true) WITH CHECK (id IS NULL)",
    ],
}


def set_policies(dsn: str, case: str, table: str, role: str) -> None:
    """Set ``case``'s policies (``POLICIES_BESIDE_TENANT_RLS``) on ``table``, as a superuser."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        for statement in POLICIES_BESIDE_TENANT_RLS[case]:
            admin.execute(statement.format(table=table, role=role).encode())

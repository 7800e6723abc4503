"""Migrations: up/down/up on a fresh database, drift detection, concurrent migrators."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from kitium_pg import MigrationError, PostgresStorageAdapter
from kitium_pg._base import load_migrations, plan

from .fix_holder import committed_later


@pytest.fixture
def fresh_db(dsn: str) -> Iterator[str]:
    """A DSN for a brand-new, empty database (dropped afterwards)."""
    name = f"kpg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    yield make_conninfo(dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


def _tables(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema]
        ).fetchall()
    return {r[0] for r in rows}


def test_up_down_up_on_a_fresh_database(fresh_db: str) -> None:
    ids = tuple(m.id for m in load_migrations("kitium_auth"))
    with PostgresStorageAdapter(fresh_db) as storage:
        assert storage.migration_status().applied == ids
        assert {"users", "sessions", "auth_migrations"} <= _tables(fresh_db, "kitium_auth")
        assert storage.rollback(len(ids)) == tuple(reversed(ids))
        assert _tables(fresh_db, "kitium_auth") == {"auth_migrations"}
        assert storage.migration_status().pending == ids
        assert storage.migrate() == ids
        assert storage.migrate() == ()
        user = storage.create_user(email="up-down-up@example.com")
        assert storage.get_user(user.id) == user
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute(
            "SELECT checksum, applied_at, duration_ms FROM kitium_auth.auth_migrations"
            " WHERE id = %s",
            [ids[0]],
        ).fetchone()
    assert row is not None
    assert row[0] == load_migrations("kitium_auth")[0].checksum
    assert row[1].tzinfo is not None and row[2] >= 0


def test_status_creates_nothing(fresh_db: str) -> None:
    storage = PostgresStorageAdapter(fresh_db)
    storage.connect(migrate=False)
    try:
        state = storage.migration_status()
        assert state.applied == () and len(state.pending) >= 1
        assert _tables(fresh_db, "kitium_auth") == set()
        health = storage.health_check()
        assert health.status == "error" and health.pending_migrations == state.pending
    finally:
        storage.disconnect()


def test_a_changed_applied_migration_is_an_error_naming_the_file(dsn: str) -> None:
    schema = f"drift_{uuid.uuid4().hex[:10]}"
    first = load_migrations(schema)[0]
    with PostgresStorageAdapter(dsn, schema=schema) as storage:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"UPDATE {schema}.auth_migrations SET checksum = 'x' WHERE id = %s".encode(),
                [first.id],
            )
        with pytest.raises(MigrationError, match=first.path.name):
            storage.migrate()
        with pytest.raises(MigrationError, match=first.path.name):
            storage.migration_status()


def test_an_unknown_applied_migration_is_an_error(dsn: str) -> None:
    schema = f"unknown_{uuid.uuid4().hex[:10]}"
    with PostgresStorageAdapter(dsn, schema=schema) as storage:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {schema}.auth_migrations (id, checksum, duration_ms)"
                f" VALUES ('9999_future', 'x', 0)".encode()
            )
        with pytest.raises(MigrationError, match="9999_future"):
            storage.migrate()


async def test_async_adapter_migrates_a_separate_schema(dsn: str) -> None:
    from kitium_pg import AsyncPostgresStorageAdapter

    schema = f"amig_{uuid.uuid4().hex[:10]}"
    async with AsyncPostgresStorageAdapter(dsn, schema=schema) as storage:
        state = await storage.migration_status()
        assert state.pending == ()
        user = await storage.create_user(email="a@example.com")
        assert (await storage.get_user(user.id)) == user
    assert "users" in _tables(dsn, schema)


_CONNECT = """
import sys
from kitium_pg import PostgresStorageAdapter
with PostgresStorageAdapter(sys.argv[1], schema=sys.argv[2]) as storage:
    print(",".join(storage.migration_status().applied))
"""


@pytest.mark.slow
def test_eight_processes_connecting_at_once_apply_each_migration_once(fresh_db: str) -> None:
    schema = "kitium_auth"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONNECT, fresh_db, schema],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results: list[tuple[int, str, str]] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out.strip(), err))
    ids = ",".join(m.id for m in load_migrations(schema))
    assert [(code, out) for code, out, _ in results] == [(0, ids)] * 8, results
    with psycopg.connect(fresh_db) as conn:
        rows: list[Any] = conn.execute(
            "SELECT id, count(*) FROM kitium_auth.auth_migrations GROUP BY id"
        ).fetchall()
    assert {r[0]: r[1] for r in rows} == dict.fromkeys(ids.split(","), 1)


@pytest.mark.parametrize(
    ("mig_id", "shown"),
    [
        ("0001_core", "migrations/0001_core.sql"),
        ("tenant_rls", "migrations/optional/tenant_rls.sql"),
    ],
)
def test_drift_names_the_file_and_the_way_forward(mig_id: str, shown: str) -> None:
    with pytest.raises(MigrationError) as caught:
        plan(load_migrations("kitium_auth"), {mig_id: "edited"})
    message = str(caught.value)
    assert message.startswith(f"{shown} changed after it was applied")
    assert "roll it back with the kitium-pg version that applied it" in message
    assert "'Upgrading' in docs/operations.md" in message


def test_0004_waits_for_an_open_membership_removal_and_cleans_up_after_it(dsn: str) -> None:
    """A member removed by a transaction still open when 0004 starts: 0004 waits for it (its
    locks come first), then deletes the assignment that lost its membership, and 0005 validates.
    Without the locks the clean-up missed that row and 0005 failed on every attempt."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    with PostgresStorageAdapter(dsn, schema=schema) as storage:
        assert storage.rollback(steps=3) == (
            "0006_replace_member_and_domain_sets",
            "0005_validate_membership_and_device_owner",
            "0004_membership_and_device_owner",
        )
        user = storage.create_user()
        org = storage.create_organization(name="Locks", plan="team", members=[{"user_id": user.id}])
        role = storage.create_role(org_id=org.id, name="admin")
        storage.assign_role_to_user(user.id, role.id, org.id)
        remove = f"DELETE FROM {schema}.organization_members WHERE org_id = %s AND user_id = %s"
        try:
            with committed_later(dsn, remove, [(org.id, user.id)]):
                applied = storage.migrate()
            assert applied[:2] == (
                "0004_membership_and_device_owner",
                "0005_validate_membership_and_device_owner",
            )
            assert storage.get_user_roles(user.id, org.id) == []
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


def test_messages_name_migration_files_by_their_place_in_the_project() -> None:
    files = [m.file for m in load_migrations("kitium_auth", optional=["tenant_rls"])]
    assert files[0] == "migrations/0001_core.sql"
    assert files[-1] == "migrations/optional/tenant_rls.sql"
    root = Path(__file__).resolve().parent.parent
    assert all((root / f).is_file() for f in files)

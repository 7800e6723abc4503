"""Migrations: up/down/up on a fresh database, drift detection, concurrent migrators."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from kitium_pg import (
    InternalError,
    MigrationError,
    PostgresStorageAdapter,
    UnavailableError,
    ValidationError,
    _sql,
)
from kitium_pg._base import load_migrations, plan

from .fix_holder import committed_later
from .fix_plans import generic_plan_of, plan_of


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


def test_a_migration_a_newer_version_applied_keeps_an_older_one_ready(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: once a rolling deploy's new version had migrated, every older instance's
    health check said error (a readiness probe would take them all out at once) and an older
    instance could not restart (connect() raised). A migration this version does not ship is a
    newer version's: with nothing of this version's pending, connect() and migrate() apply
    nothing (and log it), status and health report it as ``newer`` and stay ok. With something
    of this version's pending it is still an error (this version would migrate below the newer
    one), and so is rolling it back."""
    schema = f"unknown_{uuid.uuid4().hex[:10]}"
    with PostgresStorageAdapter(dsn, schema=schema) as storage:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {schema}.auth_migrations (id, checksum, duration_ms)"
                f" VALUES ('9999_future', 'x', 0)".encode()
            )
        with caplog.at_level(logging.WARNING, logger="kitium_pg"):
            assert storage.migrate() == ()
        assert "9999_future" in caplog.text
        state = storage.migration_status()
        assert state.newer == ("9999_future",) and state.pending == ()
        health = storage.health_check()
        assert (health.status, health.newer_migrations) == ("ok", ("9999_future",))
        with pytest.raises(MigrationError, match="9999_future"):
            storage.rollback()
    with PostgresStorageAdapter(dsn, schema=schema) as restarted:  # connect() migrates
        assert restarted.health_check().status == "ok"
        last = restarted.migration_status().applied[-2]  # the newest shipped one
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DELETE FROM {schema}.auth_migrations WHERE id = %s".encode(), [last])
        with pytest.raises(MigrationError, match="9999_future"):
            restarted.migrate()


def test_an_older_version_that_waited_for_a_newer_ones_run_applies_nothing(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: a rolling deploy's older instance finds one of its migrations pending
    and waits for the migrators' lock, which a newer version holds while it applies that
    migration and one of its own. Once the lock is free nothing of the older version's is
    pending, which is no error (a warning, nothing applied), as when it found that without
    waiting; planned again under the lock it raised MigrationError for the newer one."""
    schema = f"waited_{uuid.uuid4().hex[:10]}"
    last = load_migrations(schema)[-1]
    key = f"kitium_pg.migrations.{schema}"
    with PostgresStorageAdapter(dsn, schema=schema) as storage:
        assert storage.rollback() == (last.id,)
    newer = psycopg.connect(dsn, autocommit=True)
    older = PostgresStorageAdapter(dsn, schema=schema)
    try:
        newer.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", [key])
        older.connect(migrate=False)
        outcome: list[object] = []
        waiter = threading.Thread(target=lambda: outcome.append(older.migrate()))
        with caplog.at_level(logging.WARNING, logger="kitium_pg"):
            waiter.start()
            time.sleep(0.5)
            assert not outcome  # waiting for the lock
            for mig_id, checksum in ((last.id, last.checksum), ("9999_newer", "x")):
                newer.execute(
                    f"INSERT INTO {schema}.auth_migrations (id, checksum, duration_ms)"
                    f" VALUES (%s, %s, 0)".encode(),
                    [mig_id, checksum],
                )
            newer.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", [key])
            waiter.join(10)
        assert outcome == [()]
        assert "9999_newer" in caplog.text
    finally:
        older.disconnect()
        newer.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


async def test_async_adapter_migrates_a_separate_schema(dsn: str) -> None:
    from kitium_pg import AsyncPostgresStorageAdapter

    schema = f"amig_{uuid.uuid4().hex[:10]}"
    async with AsyncPostgresStorageAdapter(dsn, schema=schema) as storage:
        state = await storage.migration_status()
        assert state.pending == ()
        user = await storage.create_user(email="a@example.com")
        assert (await storage.get_user(user.id)) == user
    assert "users" in _tables(dsn, schema)


def test_the_schema_keywords_are_the_servers_and_every_other_keyword_works(
    dsn: str, sync_adapter: PostgresStorageAdapter
) -> None:
    """``check_schema`` refuses every keyword this server will not take bare before a dot (so
    a newer server's new keyword fails here first); an unreserved keyword it accepts works as a
    schema for a table, a type in a function's signature and a call."""
    with psycopg.connect(dsn) as conn:
        keywords = conn.execute("SELECT word, catcode FROM pg_get_keywords()").fetchall()
        refused = {word for word, catcode in keywords if catcode != "U"}
        assert refused and refused <= _sql._KEYWORDS
        reserved = {word for word, catcode in keywords if catcode == "R"}
        assert reserved and reserved <= _sql.RESERVED_KEYWORDS
        # The role of the grants: only reserved words are refused; the grants run for the rest.
        grants = sync_adapter.app_role_grants  # its schema is migrated
        for word in sorted(refused):
            if word in reserved or word == "none":
                with pytest.raises(ValidationError, match=r"keyword|not an application role"):
                    grants(word)
            else:
                with conn.transaction(force_rollback=True):
                    conn.execute(f"CREATE ROLE {word}; {grants(word)}".encode())
        for word in sorted(refused):
            with pytest.raises(ValidationError, match="keyword"):
                _sql.check_schema(word)
        accepted = sorted(word for word, catcode in keywords if catcode == "U")
        assert len(accepted) > 200
        with conn.transaction(force_rollback=True):
            for word in accepted:
                schema = _sql.check_schema(word)
                conn.execute(
                    f"CREATE SCHEMA {schema};"
                    f" CREATE TABLE {schema}.t (x int);"
                    f" CREATE FUNCTION {schema}.f(a {schema}.t) RETURNS int"
                    f" LANGUAGE sql AS 'SELECT 1'".encode()
                )
                called = conn.execute(f"SELECT {schema}.f(NULL::{schema}.t)".encode()).fetchone()
                assert called == (1,)


def test_an_unreserved_keyword_is_a_working_schema(fresh_db: str) -> None:
    with PostgresStorageAdapter(fresh_db, schema="admin") as storage:
        user = storage.create_user(email="keyword@example.com")
        assert storage.get_user(user.id) == user
        assert storage.rollback(len(load_migrations("admin")))
    with pytest.raises(ValidationError, match="keyword"):
        PostgresStorageAdapter(fresh_db, schema="real")


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
        user = storage.create_user()  # with the newest schema, which the user queries need
        from_0006 = len(IDS) - IDS.index("0006_replace_member_and_domain_sets")
        assert storage.rollback(steps=from_0006 + 2)[-3:] == (
            "0006_replace_member_and_domain_sets",
            "0005_validate_membership_and_device_owner",
            "0004_membership_and_device_owner",
        )
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


ORG_CASCADE = "0007_org_delete_cascade_and_sso_provider_type"
ORG_CASCADE_VALID = "0008_validate_org_delete_cascade_and_sso_provider_type"
IDS = [m.id for m in load_migrations("kitium_auth")]


def _after(mig_id: str) -> int:
    """How many numbered migrations come after ``mig_id``."""
    return len(IDS) - 1 - IDS.index(mig_id)


def _migrate_through(storage: PostgresStorageAdapter, mig_id: str) -> tuple[str, ...]:
    """Apply every pending migration up to ``mig_id`` (the later ones applied, then rolled
    back); returns the ids applied up to it."""
    applied = storage.migrate()
    if _after(mig_id):  # rollback refuses 0 steps
        storage.rollback(steps=_after(mig_id))
    return applied[: len(applied) - _after(mig_id)]


def _constraints(dsn: str, schema: str) -> dict[str, tuple[str, bool]]:
    """Every constraint of ``schema``: ``table.name`` -> (definition, validated)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.conrelid::regclass::text || '.' || c.conname,"
            " pg_get_constraintdef(c.oid), c.convalidated"
            " FROM pg_constraint AS c WHERE c.connamespace = %s::regnamespace",
            [schema],
        ).fetchall()
    return {name: (definition, valid) for name, definition, valid in rows}


def test_0007_and_0008_up_down_up_correct_provider_types_and_restore_the_references(
    dsn: str,
) -> None:
    """0007 adds NOT VALID references (an organization's providers and bound sessions go with
    it; a link's or SSO session's provider_type is its provider's); 0008 sets the provider_type
    of older rows to their provider's type, a row committed by a transaction still open when
    0007 started included (0007 waits for it), and validates. Each down part gives back exactly
    the constraints the part before it left."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            user = storage.create_user()  # with the newest schema, which the user queries need
            storage.rollback(steps=_after(ORG_CASCADE_VALID))
            latest = _constraints(dsn, schema)
            assert storage.rollback(steps=2) == (ORG_CASCADE_VALID, ORG_CASCADE)
            before = _constraints(dsn, schema)
            for name in (
                "sso_providers.sso_providers__org_id_fkey",
                "sessions.sessions__org_id_fkey",
            ):
                assert "ON DELETE SET NULL" in before[f"{schema}.{name}"][0]
                assert "ON DELETE CASCADE" in latest[f"{schema}.{name}"][0]
            assert f"{schema}.sso_providers.sso_providers__id_type_key" not in before

            # Rows 0006 allowed: links and SSO sessions naming another type than their provider's.
            org = storage.create_organization(
                name="Old rows", plan="team", members=[{"user_id": user.id}]
            )
            saml = storage.create_sso_provider(type="saml", name="ADFS", org_id=org.id)
            mismatched: dict[str, Any] = {
                "user_id": user.id,
                "provider_id": saml.id,
                "provider_type": "oidc",
            }
            link = storage.create_sso_link(**mismatched, provider_subject="early")
            sso_session = storage.create_sso_session(
                **mismatched,
                provider_subject="early",
                expires_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
            )
            late = uuid.uuid4()
            insert = (
                f"INSERT INTO {schema}.sso_links (id, user_id, provider_id, provider_type,"
                " provider_subject) VALUES (%s, %s, %s, 'oidc', 'late')"
            )
            with committed_later(dsn, insert, [(late, user.id, saml.id)]):
                assert _migrate_through(storage, ORG_CASCADE_VALID) == (
                    ORG_CASCADE,
                    ORG_CASCADE_VALID,
                )
            assert _constraints(dsn, schema) == latest
            for found in (
                storage.get_sso_link(link.id),
                storage.get_sso_link(late),
                storage.get_sso_session(sso_session.id),
            ):
                assert found is not None and found.provider_type == "saml"

            assert storage.rollback() == (ORG_CASCADE_VALID,)
            unvalidated = {
                f"{schema}.{name}"
                for name in (
                    "sso_providers.sso_providers__org_id_fkey",
                    "sessions.sessions__org_id_fkey",
                    "sso_links.sso_links__provider_type_fkey",
                    "sso_sessions.sso_sessions__provider_type_fkey",
                )
            }
            assert _constraints(dsn, schema) == {
                name: (definition + " NOT VALID", False)
                if name in unvalidated
                else (definition, valid)
                for name, (definition, valid) in latest.items()
            }
            # Not yet validated, the references already act: the organization's provider and
            # bound session go with it.
            bound = storage.create_session(
                user_id=user.id, org_id=org.id, expires_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
            )
            assert storage.delete_organization(org.id) is True
            assert storage.get_sso_provider(saml.id) is None
            assert storage.get_sso_link(link.id) is None
            assert storage.get_session(bound.id) is None

            assert storage.rollback() == (ORG_CASCADE,)
            assert _constraints(dsn, schema) == before
            assert _migrate_through(storage, ORG_CASCADE_VALID) == (ORG_CASCADE, ORG_CASCADE_VALID)
            assert _constraints(dsn, schema) == latest
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


TWOFA_EXPIRY = "0011_twofa_challenges_expires_at_index"


def _twofa_indexes(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            [schema, "twofa_sessions"],
        ).fetchall()
    return {r[0] for r in rows}


def test_0011_up_down_up_adds_the_challenge_expiry_index(dsn: str) -> None:
    """0011 adds the index delete_expired_two_factor_sessions takes its batches by, and nothing
    else: no reference ties a challenge to its session (its cascade tripled the cost of purging
    expired sessions); down drops exactly that index, and the cleanup still works without it."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    past = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            # With the newest schema, which the adapter's user and device queries need.
            user = storage.create_user()
            device = storage.create_two_factor_device(user_id=user.id, method="totp")
            if _after(TWOFA_EXPIRY):  # 0 while it is the newest migration
                storage.rollback(steps=_after(TWOFA_EXPIRY))
            latest, constraints = _twofa_indexes(dsn, schema), _constraints(dsn, schema)
            assert "twofa_sessions_expires_at_idx" in latest
            assert storage.rollback() == (TWOFA_EXPIRY,)
            assert _twofa_indexes(dsn, schema) == latest - {"twofa_sessions_expires_at_idx"}
            assert _constraints(dsn, schema) == constraints

            session = storage.create_session(
                user_id=user.id, expires_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
            )
            challenge = storage.create_two_factor_session(
                user_id=user.id,
                session_id=session.id,
                device_id=device.id,
                method="totp",
                expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
            )
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    f"UPDATE {schema}.twofa_sessions SET expires_at = %s WHERE id = %s".encode(),
                    [past, challenge.id],
                )
            assert storage.delete_expired_two_factor_sessions() == 1
            assert _migrate_through(storage, TWOFA_EXPIRY) == (TWOFA_EXPIRY,)
            assert _twofa_indexes(dsn, schema) == latest
            assert _constraints(dsn, schema) == constraints
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


SSO_LOGOUT = "0012_sso_session_logout_indexes"
SSO_LOGOUT_INDEXES = {
    "sso_sessions_provider_id_provider_subject_idx": "(provider_id, provider_subject)",
    "sso_sessions_provider_id_session_token_hash_idx": (
        "(provider_id, session_token_hash) WHERE (session_token_hash IS NOT NULL)"
    ),
    "sso_sessions_expires_at_idx": "(expires_at)",
}


def _indexes(dsn: str, schema: str) -> dict[str, str]:
    """Every index of ``schema``'s sso_sessions: name -> definition."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = %s AND tablename = 'sso_sessions'",
            [schema],
        ).fetchall()
    return dict(rows)


def test_0012_up_down_up_adds_the_sso_logout_indexes(dsn: str) -> None:
    """0012 adds the indexes that serve single logout, by subject and by session token, and
    keeps sso_sessions_provider_id_idx; its down part drops exactly those three, after which the
    logout methods still work (reading more rows); up again restores them."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            # Written with the newest schema, which the adapter's user queries need.
            user = storage.create_user()
            provider = storage.create_sso_provider(type="saml", name="ADFS")
            if _after(SSO_LOGOUT):  # 0 while it is the newest migration
                storage.rollback(steps=_after(SSO_LOGOUT))
            latest = _indexes(dsn, schema)
            for name, columns in SSO_LOGOUT_INDEXES.items():
                assert latest[name].endswith(f"USING btree {columns}"), latest[name]
            assert "sso_sessions_provider_id_idx" in latest

            bound: dict[str, Any] = {
                "user_id": user.id,
                "provider_id": provider.id,
                "provider_type": "saml",
                "expires_at": dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
            }
            for n in range(4):
                storage.create_sso_session(**bound, provider_subject=f"s{n}", session_token=f"t{n}")
            by_subject = {
                "provider_id": provider.id,
                "provider_subject": "s1",
                "end_user_sessions": False,
            }
            by_token = {**by_subject, "session_token_hash": hashlib.sha256(b"t2").digest()}
            plans: dict[str, tuple[dict[str, Any], str]] = {
                "delete_sso_sessions_by_subject": (by_subject, "provider_subject_idx"),
                "delete_sso_sessions_by_token": (by_token, "session_token_hash_idx"),
                "delete_sso_link": ({"id": uuid.uuid4()}, "provider_subject_idx"),
            }
            for query, (params, index) in plans.items():
                assert f"sso_sessions_provider_id_{index}" in plan_of(dsn, schema, query, params)

            assert storage.rollback() == (SSO_LOGOUT,)
            assert _indexes(dsn, schema) == {
                name: definition
                for name, definition in latest.items()
                if name not in SSO_LOGOUT_INDEXES
            }
            assert (
                len(storage.delete_sso_sessions(provider_id=provider.id, session_token="t0")) == 1
            )
            assert (
                len(storage.delete_sso_sessions(provider_id=provider.id, provider_subject="s1"))
                == 1
            )

            assert _migrate_through(storage, SSO_LOGOUT) == (SSO_LOGOUT,)
            assert _indexes(dsn, schema) == latest
            assert (
                len(storage.delete_sso_sessions(provider_id=provider.id, session_token="t2")) == 1
            )
            assert storage.delete_user_sso_sessions(user.id) == 1
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


MEMBERSHIP_GUARDS = "0013_organization_membership_guards"
MEMBERSHIP_FUNCTIONS = {
    "add_organization_member(p_org_id uuid, p_user_id uuid, p_role text, p_within_seats boolean)",
    "set_organization_member_role(p_org_id uuid, p_user_id uuid, p_role text, p_keep_last text)",
    "remove_organization_member(p_org_id uuid, p_user_id uuid, p_keep_last text)",
}
REPLACE_MEMBERS = "replace_organization_members(p_org_id uuid, p_user_ids uuid[], p_roles text[])"


def _functions(dsn: str, schema: str) -> dict[str, str]:
    """Every function of ``schema``: ``name(arguments)`` -> its body."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',"
            " p.prosrc FROM pg_proc AS p WHERE p.pronamespace = %s::regnamespace",
            [schema],
        ).fetchall()
    return dict(rows)


def _body_in(mig_id: str, schema: str, function: str) -> str:
    """The body of ``function`` as migration ``mig_id``'s up part creates it."""
    [migration] = [m for m in load_migrations(schema) if m.id == mig_id]
    found = re.search(rf"FUNCTION {schema}\.{function}\(.*?\$\$(.*?)\$\$", migration.up, re.S)
    assert found is not None
    return found.group(1)


def test_0013_up_down_up_guards_memberships_and_restores_the_member_set_replacement(
    dsn: str,
) -> None:
    """0013 adds the guarded membership functions and makes replace_organization_members end
    the dropped members' sessions bound to the organization; its down part drops the three
    functions and gives replace_organization_members back its 0006 body (dropped members'
    sessions stay); up again restores 0013's."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    later = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            # With the newest schema, which the adapter's user queries need.
            alice, bob = storage.create_user(), storage.create_user()
            if _after(MEMBERSHIP_GUARDS):  # 0 while it is the newest migration
                storage.rollback(steps=_after(MEMBERSHIP_GUARDS))
            latest = _functions(dsn, schema)
            assert set(latest) >= MEMBERSHIP_FUNCTIONS
            assert latest[REPLACE_MEMBERS] == _body_in(
                MEMBERSHIP_GUARDS, schema, "replace_organization_members"
            )
            org = storage.create_organization(
                name="Guards", plan="team", members=[{"user_id": alice.id}, {"user_id": bob.id}]
            )

            def replace_members(*members: uuid.UUID) -> None:
                # The function update_organization calls, called directly: the adapter's
                # update_organization needs 0014, rolled back here.
                with psycopg.connect(dsn) as conn:
                    conn.execute(
                        f"SELECT {schema}.replace_organization_members"
                        "(%s, %s::uuid[], %s::text[])".encode(),
                        [org.id, list(members), ["member"] * len(members)],
                    )

            def dropped_session_stays() -> bool:
                session = storage.create_session(user_id=bob.id, org_id=org.id, expires_at=later)
                replace_members(alice.id)
                replace_members(alice.id, bob.id)
                return storage.get_session(session.id) is not None

            assert not dropped_session_stays()

            assert storage.rollback() == (MEMBERSHIP_GUARDS,)
            assert _functions(dsn, schema) == {
                **{f: body for f, body in latest.items() if f not in MEMBERSHIP_FUNCTIONS},
                REPLACE_MEMBERS: _body_in(
                    "0006_replace_member_and_domain_sets", schema, "replace_organization_members"
                ),
            }
            assert dropped_session_stays()

            assert _migrate_through(storage, MEMBERSHIP_GUARDS) == (MEMBERSHIP_GUARDS,)
            assert _functions(dsn, schema) == latest
            assert not dropped_session_stays()
            assert storage.remove_organization_member(org.id, bob.id, keep_last="owner") is True
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


MERGE_PATCH = "0014_jsonb_merge_patch"


def _function_kinds(dsn: str, schema: str) -> dict[str, tuple[str, str, bool]]:
    """Every function of ``schema``: signature -> (volatility, parallel safety, strict)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT p.oid::regprocedure::text, p.provolatile, p.proparallel, p.proisstrict"
            " FROM pg_proc AS p WHERE p.pronamespace = %s::regnamespace",
            [schema],
        ).fetchall()
    return {name: (volatile, parallel, strict) for name, volatile, parallel, strict in rows}


def _stored_metadata(dsn: str, schema: str, user_id: uuid.UUID) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT metadata FROM {schema}.users WHERE id = %s".encode(), [user_id]
        ).fetchone()
    assert row is not None
    return row[0]


def test_0014_up_down_up_adds_the_merge_patch_function(dsn: str) -> None:
    """0014 adds jsonb_merge_patch, IMMUTABLE and PARALLEL SAFE, not STRICT (a NULL patch keeps
    the target: the update queries pass NULL when no patch is given), and nothing else; down
    drops exactly it and leaves the rows alone; up again restores it, and metadata_patch works."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    function = f"{schema}.jsonb_merge_patch(jsonb,jsonb)"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            # With the newest schema, which the adapter's user queries need.
            user = storage.create_user(metadata={"a": 1, "b": {"c": 2}})
            if _after(MERGE_PATCH):  # 0 while it is the newest migration
                storage.rollback(steps=_after(MERGE_PATCH))
            latest, constraints = _function_kinds(dsn, schema), _constraints(dsn, schema)
            assert latest[function] == ("i", "s", False)

            assert storage.rollback() == (MERGE_PATCH,)
            assert _function_kinds(dsn, schema) == {
                name: kind for name, kind in latest.items() if name != function
            }
            assert _constraints(dsn, schema) == constraints
            assert _stored_metadata(dsn, schema, user.id) == {"a": 1, "b": {"c": 2}}

            assert _migrate_through(storage, MERGE_PATCH) == (MERGE_PATCH,)
            assert _function_kinds(dsn, schema) == latest
            storage.migrate()  # the newest schema again
            patched = storage.update_user(user.id, metadata_patch={"b": {"c": None, "d": 3}})
            assert patched.metadata == {"a": 1, "b": {"d": 3}}
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


def test_messages_name_migration_files_by_their_place_in_the_project() -> None:
    files = [m.file for m in load_migrations("kitium_auth", optional=["tenant_rls"])]
    assert files[0] == "migrations/0001_core.sql"
    assert files[-1] == "migrations/optional/tenant_rls.sql"
    root = Path(__file__).resolve().parent.parent
    assert all((root / f).is_file() for f in files)


def test_a_migrator_waits_for_another_past_its_statement_timeout(dsn: str) -> None:
    """Another process holding the migration lock for longer than the statement timeout:
    connect() waits for it (a rolling deploy's new instances), instead of failing with a
    timeout."""
    schema = f"wait_{uuid.uuid4().hex[:10]}"
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            [f"kitium_pg.migrations.{schema}"],
        )
        timer = threading.Timer(1.0, holder.commit)
        timer.start()
        started = time.monotonic()
        with PostgresStorageAdapter(dsn, schema=schema, statement_timeout_ms=200) as storage:
            waited = time.monotonic() - started
            assert storage.migration_status().pending == ()
        timer.join()
        assert waited >= 0.9  # it did wait for the holder, five times its statement timeout
    finally:
        holder.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


def test_an_application_role_uses_the_with_form_on_a_migrated_schema(dsn: str) -> None:
    """With nothing pending, connect() only reads the ledger: a role without DDL rights (the
    one docs/operations.md recommends) can use ``with Adapter(dsn) as storage``."""
    role = f"kpg_app_{uuid.uuid4().hex[:8]}"
    with PostgresStorageAdapter(dsn, max_size=1) as owner:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {role} LOGIN".encode())
        owner.grant_app_role(role)
    try:
        with PostgresStorageAdapter(make_conninfo(dsn, user=role), max_size=1) as app:
            user = app.create_user()
            assert app.get_user(user.id) == user
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}".encode())
            admin.execute(f"DROP ROLE {role}".encode())


def test_an_application_role_waiting_for_a_migrator_connects_once_it_is_done(dsn: str) -> None:
    """A rolling deploy: an instance running as the application role finds an optional
    migration pending and waits for the migrator's lock (polling for it); once the migrator
    has applied it, nothing is pending and the instance connects (it creates nothing: the
    ledger exists)."""
    schema = f"appwait_{uuid.uuid4().hex[:10]}"
    role = f"kpg_app_{uuid.uuid4().hex[:8]}"
    with PostgresStorageAdapter(dsn, schema=schema, max_size=1) as owner:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {role} LOGIN".encode())
        owner.grant_app_role(role)
    (rls,) = [m for m in load_migrations(schema, optional=["tenant_rls"]) if m.id == "tenant_rls"]
    outcome: list[object] = []

    def connect_as_the_application() -> None:
        app = PostgresStorageAdapter(
            make_conninfo(dsn, user=role),
            schema=schema,
            max_size=1,
            optional_migrations=["tenant_rls"],
        )
        try:
            app.connect()
            outcome.append(app.migration_status().pending)
        except Exception as exc:  # reported below
            outcome.append(exc)
        finally:
            app.disconnect()

    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            [f"kitium_pg.migrations.{schema}"],
        )
        waiter = threading.Thread(target=connect_as_the_application)
        waiter.start()
        # Watched from a connection of its own: in the holder's transaction, pg_stat_activity
        # would show the snapshot of its first read for the whole transaction.
        with psycopg.connect(dsn, autocommit=True) as watcher:
            deadline = time.monotonic() + 10
            while not watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE usename = %s"
                " AND query LIKE '%%pg_try_advisory_lock%%'",
                [role],
            ).fetchone():
                assert time.monotonic() < deadline, "the application never polled for the lock"
                time.sleep(0.02)
        holder.execute(rls.up.encode())
        ledger = f"{schema}.auth_migrations (id, checksum, duration_ms)"
        holder.execute(f"INSERT INTO {ledger} VALUES (%s, %s, 0)".encode(), [rls.id, rls.checksum])
        holder.commit()
        waiter.join(timeout=30)
        assert outcome == [()], outcome
    finally:
        holder.close()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())
            admin.execute(f"DROP OWNED BY {role}".encode())
            admin.execute(f"DROP ROLE {role}".encode())


def test_migrate_and_rollback_on_a_closed_adapter_are_unavailable(dsn: str) -> None:
    storage = PostgresStorageAdapter(dsn, max_size=1)
    with pytest.raises(UnavailableError):
        storage.migrate()
    with pytest.raises(UnavailableError):
        storage.rollback()


def test_a_connection_lost_during_a_migration_is_unavailable_not_a_migration_error(
    dsn: str,
) -> None:
    """The migration's backend dies while it waits on a lock: a transient failure (exit 3 in
    the CLI, run it again), not a broken migration file (MigrationError, exit 4)."""
    schema = f"lost_{uuid.uuid4().hex[:10]}"
    later = [m.id for m in load_migrations(schema) if m.id > "0003"]
    with PostgresStorageAdapter(dsn, schema=schema, max_size=1) as storage:
        assert len(storage.rollback(steps=len(later))) == len(later)
    locker = psycopg.connect(dsn)
    try:
        locker.execute(f"LOCK TABLE {schema}.user_roles IN ACCESS EXCLUSIVE MODE".encode())
        storage = PostgresStorageAdapter(dsn, schema=schema, max_size=1)
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                storage.connect()
            except BaseException as exc:  # handed to the test
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        with psycopg.connect(dsn, autocommit=True) as admin:
            for _ in range(200):
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND position(%s in query) > 0",
                    [f"{schema}.user_roles"],
                ).fetchall()
                if killed:
                    break
                time.sleep(0.05)
        thread.join(30)
        storage.disconnect()
        assert killed
        assert len(outcome) == 1
        assert isinstance(outcome[0], UnavailableError), outcome[0]
        assert not isinstance(outcome[0], MigrationError)
    finally:
        locker.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


EMAIL_VERIFIED = "0015_user_email_verified_at"
EMAIL_VERIFIED_VALID = "0016_validate_user_email_verified_at"


def _user_columns(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'users'",
            [schema],
        ).fetchall()
    return {name for (name,) in rows}


def _verified_check(dsn: str, schema: str) -> tuple[str, bool] | None:
    """users__email_verified_at_check's definition and whether it is validated, if it exists."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT pg_get_constraintdef(c.oid), c.convalidated FROM pg_constraint AS c"
            " WHERE c.conrelid = %s::regclass AND c.conname = 'users__email_verified_at_check'",
            [f"{schema}.users"],
        ).fetchone()
    return None if row is None else (row[0], row[1])


def test_0015_and_0016_add_users_email_verified_at(dsn: str) -> None:
    """0015 adds a nullable users.email_verified_at (existing users start unverified) with a
    NOT VALID check that only an address is verified, 0016 validates the check; each down part
    gives back what the part before it left, 0015's drops only that column."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    check = "CHECK (((email_verified_at IS NULL) OR (email IS NOT NULL)))"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            verified_at = dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
            ada = storage.create_user(email="ada@example.com", email_verified_at=verified_at)
            assert ada.email_verified_at == verified_at
            with pytest.raises(ValidationError) as caught:  # the check, from update_user
                storage.update_user(
                    ada.id, email=None, email_verified_at=verified_at + dt.timedelta(days=1)
                )
            assert caught.value.field == "email_verified_at"
            latest = _user_columns(dsn, schema)
            assert _verified_check(dsn, schema) == (check, True)
            if _after(EMAIL_VERIFIED_VALID):
                storage.rollback(steps=_after(EMAIL_VERIFIED_VALID))
            assert storage.rollback() == (EMAIL_VERIFIED_VALID,)
            assert _verified_check(dsn, schema) == (f"{check} NOT VALID", False)
            assert storage.rollback() == (EMAIL_VERIFIED,)
            assert _user_columns(dsn, schema) == latest - {"email_verified_at"}
            assert _verified_check(dsn, schema) is None
            with psycopg.connect(dsn) as conn:
                left = conn.execute(
                    "SELECT count(*) FROM pg_proc WHERE pronamespace = %s::regnamespace"
                    " AND proname = 'users_email_verified_at_follows_email'",
                    [schema],
                ).fetchone()
            assert left == (0,)  # the trigger's function went with it
            assert storage.migrate()[:2] == (EMAIL_VERIFIED, EMAIL_VERIFIED_VALID)
            assert _user_columns(dsn, schema) == latest
            assert _verified_check(dsn, schema) == (check, True)
            again = storage.get_user(ada.id)
            assert again is not None and again.email_verified_at is None
            assert again.email == "ada@example.com"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


DEVICE_THROTTLE = "0018_twofa_device_throttle"
THROTTLE_COLUMNS = {
    "throttle_failures": ("integer", "NO", "0"),
    "throttled_until": ("timestamp with time zone", "YES", None),
}


def _device_columns(dsn: str, schema: str) -> dict[str, tuple[str, str, str | None]]:
    """Every column of ``schema``'s twofa_devices: name -> (type, nullable, default)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'twofa_devices'",
            [schema],
        ).fetchall()
    return {name: (kind, nullable, default) for name, kind, nullable, default in rows}


def test_0018_up_down_up_adds_the_device_throttle(dsn: str) -> None:
    """0018 adds twofa_devices.throttle_failures (NOT NULL DEFAULT 0) and throttled_until
    (nullable); its down part drops exactly those two, keeping the devices; up again gives
    every existing device a clear throttle."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    later = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            # With the newest schema, which the adapter's user and device queries need.
            user = storage.create_user()
            device = storage.create_two_factor_device(user_id=user.id, method="sms")
            login = storage.create_session(user_id=user.id, expires_at=later)
            challenge = storage.create_two_factor_session(
                user_id=user.id,
                session_id=login.id,
                device_id=device.id,
                method="sms",
                code_hash="0" * 64,
                expires_at=later,
            )
            wrong = storage.verify_two_factor_session(challenge.id, "1" * 64)
            assert wrong is not None and wrong.throttled_until is not None  # a throttled device
            if _after(DEVICE_THROTTLE):  # 0 while it is the newest migration
                storage.rollback(steps=_after(DEVICE_THROTTLE))
            latest = _device_columns(dsn, schema)
            for name, column in THROTTLE_COLUMNS.items():
                assert latest[name] == column
            assert storage.rollback() == (DEVICE_THROTTLE,)
            assert _device_columns(dsn, schema) == {
                name: column for name, column in latest.items() if name not in THROTTLE_COLUMNS
            }
            assert _migrate_through(storage, DEVICE_THROTTLE) == (DEVICE_THROTTLE,)
            assert _device_columns(dsn, schema) == latest
            again = storage.get_two_factor_device(device.id)
            assert again is not None
            assert (again.user_id, again.method) == (user.id, "sms")
            assert (again.throttle_failures, again.throttled_until) == (0, None)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


USER_ROLE_SETS = "0017_set_user_roles"
SET_USER_ROLES = "set_user_roles(p_user_id uuid, p_org_id uuid, p_role_ids uuid[], p_ids uuid[])"


def test_0017_up_down_up_adds_set_user_roles(dsn: str) -> None:
    """0017 adds only the set_user_roles function (get_role_users is served by
    user_roles_role_id_idx, from 0002, which its plan shows); its down part drops exactly that
    function, after which the other RBAC methods still work; up again restores it."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            # With the newest schema, which the adapter's user queries need.
            user = storage.create_user()
            org = storage.create_organization(
                name="Sets", plan="team", members=[{"user_id": user.id}]
            )
            reader, writer = (storage.create_role(org_id=org.id, name=n) for n in ("r", "w"))
            if _after(USER_ROLE_SETS):  # 0 while it is the newest migration
                storage.rollback(steps=_after(USER_ROLE_SETS))
            latest, constraints = _functions(dsn, schema), _constraints(dsn, schema)
            assert SET_USER_ROLES in latest
            assert storage.set_user_roles(user.id, org.id, [writer.id, reader.id]) == [
                reader,
                writer,
            ]
            plan = plan_of(dsn, schema, "get_role_users", {"role_id": reader.id})
            assert "user_roles_role_id_idx" in plan, plan

            assert storage.rollback() == (USER_ROLE_SETS,)
            assert _functions(dsn, schema) == {
                f: body for f, body in latest.items() if f != SET_USER_ROLES
            }
            assert _constraints(dsn, schema) == constraints
            with pytest.raises(InternalError):
                storage.set_user_roles(user.id, org.id, [])
            assert storage.get_user_roles(user.id, org.id) == [reader, writer]
            assert [a.user_id for a in storage.get_role_users(writer.id)] == [user.id]
            assert storage.revoke_role_from_user(user.id, writer.id, org.id) is True

            assert _migrate_through(storage, USER_ROLE_SETS) == (USER_ROLE_SETS,)
            assert _functions(dsn, schema) == latest
            assert storage.set_user_roles(user.id, org.id, [writer.id]) == [writer]
            assert storage.get_role_users(reader.id) == []
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


OAUTH_VERSION = "0019_oauth_tokens_version"


def test_0019_up_down_up_adds_the_oauth_tokens_version(dsn: str) -> None:
    """0019 adds oauth_accounts.tokens_version (existing links start at 0, which a guarded
    refresh can name); its down part drops only that column."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    try:
        keys = {"k": base64.b64encode(b"k" * 32).decode()}
        with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=keys) as storage:
            user = storage.create_user()  # with the newest schema, which the user queries need
            storage.link_oauth_account(user.id, "gh", sub="s", access_token="a", refresh_token="r")
            tokens = storage.get_oauth_tokens(user.id, "gh")
            assert tokens is not None and tokens.version != 0
            storage.rollback(steps=_after(OAUTH_VERSION) + 1)
            with psycopg.connect(dsn) as conn:
                columns = {
                    row[0]
                    for row in conn.execute(
                        "SELECT column_name FROM information_schema.columns"
                        " WHERE table_schema = %s AND table_name = 'oauth_accounts'",
                        [schema],
                    )
                }
            assert "tokens_version" not in columns and "tokens_key_id" in columns
            assert storage.migrate()[0] == OAUTH_VERSION
            again = storage.get_oauth_tokens(user.id, "gh")
            assert again is not None and (again.access_token, again.version) == ("a", 0)
            stored = storage.update_oauth_tokens(
                user.id, "gh", access_token="a2", refresh_token="r2", if_version=0
            )
            assert stored is not None and stored.version != 0
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


SESSION_INDEX = "0020_sessions_org_id_user_id_index"
SESSION_MEMBER = "0021_session_membership"
SESSION_MEMBER_VALID = "0022_validate_session_membership"
SESSION_OLD_INDEX = "0023_drop_sessions_org_id_index"


def _session_indexes(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'sessions'",
            [schema],
        ).fetchall()
    return {r[0] for r in rows}


def test_0020_and_0023_replace_the_org_id_index_by_a_partial_one_on_both_columns(
    dsn: str,
) -> None:
    """0020 builds sessions_org_id_user_id_idx (org_id, user_id) WHERE org_id IS NOT NULL for
    the membership cascade; 0023 drops sessions_org_id_idx, which it supersedes; each down part
    gives back what was there."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            head = _session_indexes(dsn, schema)
            if _after(SESSION_OLD_INDEX):
                storage.rollback(steps=_after(SESSION_OLD_INDEX))
            latest = _session_indexes(dsn, schema)
            assert "sessions_org_id_user_id_idx" in latest
            assert "sessions_org_id_idx" not in latest
            assert storage.rollback() == (SESSION_OLD_INDEX,)
            assert _session_indexes(dsn, schema) == latest | {"sessions_org_id_idx"}
            assert storage.rollback(steps=3) == (
                SESSION_MEMBER_VALID,
                SESSION_MEMBER,
                SESSION_INDEX,
            )
            assert _session_indexes(dsn, schema) == (latest | {"sessions_org_id_idx"}) - {
                "sessions_org_id_user_id_idx"
            }
            assert storage.migrate()[:4] == (
                SESSION_INDEX,
                SESSION_MEMBER,
                SESSION_MEMBER_VALID,
                SESSION_OLD_INDEX,
            )
            assert _session_indexes(dsn, schema) == head
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


def test_0021_and_0022_bind_sessions_to_memberships(dsn: str) -> None:
    """0021 adds sessions__member_fkey NOT VALID: from then on no session can be bound to an
    organization without its user's membership, and a removal ends the bound sessions by
    cascade; 0022 deletes the older sessions that break it (and only those) and validates it.
    Each down part gives back what the part before it left."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    fkey = f"{schema}.sessions.sessions__member_fkey"
    definition = (
        f"FOREIGN KEY (org_id, user_id) REFERENCES {schema}.organization_members(org_id, user_id)"
        " ON DELETE CASCADE"
    )
    later = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    insert = (
        f"INSERT INTO {schema}.sessions (id, user_id, org_id, expires_at) VALUES (%s, %s, %s, %s)"
    )
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            alice, bob = storage.create_user(), storage.create_user()
            org = storage.create_organization(
                name="Members", plan="team", members=[{"user_id": alice.id}]
            )
            assert _constraints(dsn, schema)[fkey] == (definition, True)
            storage.rollback(steps=_after(SESSION_MEMBER) + 1)
            assert fkey not in _constraints(dsn, schema)
            # Sessions the older schema allowed: one bound to an organization its user is not in.
            rows = {
                "member": (uuid.uuid4(), alice.id, org.id, later),
                "outsider": (uuid.uuid4(), bob.id, org.id, later),
                "unbound": (uuid.uuid4(), bob.id, None, later),
            }
            with psycopg.connect(dsn, autocommit=True) as conn:
                for row in rows.values():
                    conn.execute(insert.encode(), row)
            assert storage.migrate()[:2] == (SESSION_MEMBER, SESSION_MEMBER_VALID)
            assert _constraints(dsn, schema)[fkey] == (definition, True)
            assert storage.get_session(rows["outsider"][0]) is None
            for kept in ("member", "unbound"):
                assert storage.get_session(rows[kept][0]) is not None
            if _after(SESSION_MEMBER_VALID):
                storage.rollback(steps=_after(SESSION_MEMBER_VALID))
            assert storage.rollback() == (SESSION_MEMBER_VALID,)
            assert _constraints(dsn, schema)[fkey] == (definition + " NOT VALID", False)
            # Not yet validated, the reference already acts on every write.
            with (
                psycopg.connect(dsn, autocommit=True) as conn,
                pytest.raises(psycopg.errors.ForeignKeyViolation),
            ):
                conn.execute(insert.encode(), (uuid.uuid4(), bob.id, org.id, later))
            assert storage.rollback() == (SESSION_MEMBER,)
            assert fkey not in _constraints(dsn, schema)
            assert storage.migrate()[:2] == (SESSION_MEMBER, SESSION_MEMBER_VALID)
            assert _constraints(dsn, schema)[fkey] == (definition, True)
            # A removal ends the member's bound session by cascade.
            assert storage.remove_organization_member(org.id, alice.id) is True
            assert storage.get_session(rows["member"][0]) is None
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())


MEMBER_ORDER = "0024_organization_members_org_id_joined_at_index"
HOLDER_ORDER = "0025_user_roles_role_id_assigned_at_index"
HOLDER_OLD_INDEX = "0026_drop_user_roles_role_id_index"
MEMBER_ORDER_IDX = "organization_members_org_id_joined_at_user_id_idx"
HOLDER_ORDER_IDX = "user_roles_role_id_assigned_at_user_id_idx"


def _table_indexes(dsn: str, schema: str, table: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            [schema, table],
        ).fetchall()
    return {r[0] for r in rows}


def _page_plans(dsn: str, schema: str, org_id: uuid.UUID, role_id: uuid.UUID) -> dict[str, str]:
    """Generic plans of the two paged listings, for a page after a keyset."""
    keyset = {"after_user_id": uuid.UUID(int=0), "page_size": 2}
    when = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    return {
        "members": generic_plan_of(
            dsn,
            schema,
            "list_organization_members_page",
            {"org_id": org_id, "after_joined_at": when, **keyset},
        ),
        "holders": generic_plan_of(
            dsn,
            schema,
            "get_role_users_page",
            {"role_id": role_id, "after_assigned_at": when, **keyset},
        ),
    }


def test_0024_to_0026_read_each_page_by_one_index_range_scan(dsn: str) -> None:
    """0024 and 0025 index organization_members (org_id, joined_at, user_id) and user_roles
    (role_id, assigned_at, user_id): the generic plan of a page is one range scan of the new
    index, the keyset an index condition, and no sort; 0026 drops user_roles_role_id_idx, which
    0025's index supersedes (a role's delete still cascades to its assignments). Each down part
    gives back what was there, after which pages are still right, read by a sort."""
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            users = [storage.create_user() for _ in range(5)]
            org = storage.create_organization(
                name="Pages", plan="team", members=[{"user_id": u.id} for u in users]
            )
            role, doomed = (storage.create_role(org_id=org.id, name=n) for n in ("r", "d"))
            for user in users:
                storage.set_user_roles(user.id, org.id, [role.id, doomed.id])
            members = storage.list_organization_members(org.id)
            holders = storage.get_role_users(role.id)
            if _after(HOLDER_OLD_INDEX):
                storage.rollback(steps=_after(HOLDER_OLD_INDEX))
            latest = {
                t: _table_indexes(dsn, schema, t) for t in ("organization_members", "user_roles")
            }
            assert MEMBER_ORDER_IDX in latest["organization_members"]
            assert HOLDER_ORDER_IDX in latest["user_roles"]
            assert "user_roles_role_id_idx" not in latest["user_roles"]
            plans = _page_plans(dsn, schema, org.id, role.id)
            for name, index, at in (
                ("members", MEMBER_ORDER_IDX, "joined_at"),
                ("holders", HOLDER_ORDER_IDX, "assigned_at"),
            ):
                plan = plans[name]
                assert f"Index Scan using {index}" in plan, plan
                assert "Sort" not in plan, plan
                condition = next(line for line in plan.splitlines() if "Index Cond" in line)
                assert f"ROW({at}, user_id) >" in condition, plan
            assert storage.delete_role(doomed.id) is True  # cascades through the new index
            assert storage.get_role_users(doomed.id) == []

            assert storage.rollback() == (HOLDER_OLD_INDEX,)
            assert _table_indexes(dsn, schema, "user_roles") == latest["user_roles"] | {
                "user_roles_role_id_idx"
            }
            assert storage.rollback(steps=2) == (HOLDER_ORDER, MEMBER_ORDER)
            assert _table_indexes(dsn, schema, "user_roles") == (
                latest["user_roles"] | {"user_roles_role_id_idx"}
            ) - {HOLDER_ORDER_IDX}
            assert _table_indexes(dsn, schema, "organization_members") == (
                latest["organization_members"] - {MEMBER_ORDER_IDX}
            )
            for plan in _page_plans(dsn, schema, org.id, role.id).values():
                assert "Sort" in plan, plan
            assert (
                storage.list_organization_members(org.id, after=members[1], limit=2)
                == (members[2:4])
            )
            assert storage.get_role_users(role.id, after=holders[1], limit=2) == holders[2:4]

            assert storage.migrate()[:3] == (MEMBER_ORDER, HOLDER_ORDER, HOLDER_OLD_INDEX)
            assert {
                t: _table_indexes(dsn, schema, t) for t in ("organization_members", "user_roles")
            } == latest
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())

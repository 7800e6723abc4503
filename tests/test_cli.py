"""The ``kitium-pg`` command line, run in-process with click's CliRunner against the test
database. Each test works in a schema of its own (``cli_<hex>``), dropped afterwards."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from kitium_pg import MigrationError
from kitium_pg._base import load_migrations
from kitium_pg.cli import EXIT_MIGRATION, EXIT_UNAVAILABLE, cli
from kitium_pg.embedded import EmbeddedPostgres

MIGRATIONS = [m.id for m in load_migrations("kitium_auth")]


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A schema name no other test uses; whatever the test created in it is dropped."""
    name = f"cli_{uuid.uuid4().hex}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def run(*args: str) -> Result:
    # Wide and colourless, so tables do not wrap and text assertions see plain words.
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "DATABASE_URL": None})
    return runner.invoke(cli, list(args), catch_exceptions=False)


def db(dsn: str, schema: str, *args: str) -> Result:
    return run("--dsn", dsn, "--schema", schema, *args)


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
    }
    assert as_json(db(dsn, schema, "--json", "status")) == {
        "schema": schema,
        "applied": MIGRATIONS,
        "pending": [],
    }
    health = as_json(db(dsn, schema, "--json", "health"))
    assert health["status"] == "ok"
    assert health["pending_migrations"] == []
    assert health["latency_ms"] >= 0
    printed = as_json(run("--schema", schema, "--json", "sql"))
    assert [m["id"] for m in printed["migrations"]] == MIGRATIONS
    assert all(schema in m["sql"] for m in printed["migrations"])


def test_rollback_then_status_shows_pending(dsn: str, schema: str) -> None:
    assert db(dsn, schema, "migrate").exit_code == 0
    rolled = db(dsn, schema, "rollback")
    assert rolled.exit_code == 0, rolled.output
    assert f"rolled back 1: {MIGRATIONS[-1]}" in rolled.stdout

    status = as_json(db(dsn, schema, "--json", "status"))
    assert status["pending"] == [MIGRATIONS[-1]]
    assert status["applied"] == MIGRATIONS[:-1]
    table = db(dsn, schema, "status")
    assert f"{len(MIGRATIONS) - 1} applied, 1 pending" in table.stdout

    rest = as_json(db(dsn, schema, "--json", "rollback", "--steps", str(len(MIGRATIONS) + 5)))
    assert rest["rolled_back"] == list(reversed(MIGRATIONS[:-1]))
    assert as_json(db(dsn, schema, "--json", "status"))["pending"] == MIGRATIONS
    assert "nothing to roll back" in db(dsn, schema, "rollback").stdout


def test_status_and_health_create_nothing(dsn: str, schema: str) -> None:
    status = as_json(db(dsn, schema, "--json", "status"))
    assert status == {"schema": schema, "applied": [], "pending": MIGRATIONS}
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


def test_help_states_the_exit_codes() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for line in (
        "0  success",
        "1  operation failed",
        "2  usage error",
        "3  database unavailable",
        "4  migration problem",
    ):
        assert line in result.stdout
    for command in ("migrate", "status", "rollback", "sql", "health", "demo"):
        assert command in result.stdout
        assert run(command, "--help").exit_code == 0


def test_demo_runs_every_domain(dsn: str, schema: str) -> None:
    result = db(dsn, schema, "demo")
    assert result.exit_code == 0, result.output
    for section in (
        "Health",
        "Users",
        "Sessions",
        "API keys",
        "Organizations",
        "Email verification",
        "Events",
        "done",
    ):
        assert section in result.stdout
    assert "ConflictError" in result.stdout
    assert "ada (owner), grace (admin)" in result.stdout
    # It can run again on the same database (unique emails per run).
    assert db(dsn, schema, "demo").exit_code == 0

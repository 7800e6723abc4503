"""tools/sql_mutants.py, the mutation testing of queries/ and of the functions and constraints
migrations/ creates: which mutants it makes (its runs are too long for CI; docs/sql-mutants.md
gives the runs' outcomes)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sql_mutants", ROOT / "tools/sql_mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SAMPLE = """\
-- A file comment: AND x IS NULL here is no code.

-- name: consume(id, consumer)^
-- Consume once (a comment: FOR UPDATE is no code either).
UPDATE t
   SET used_at = coalesce(used_at, statement_timestamp())
 WHERE id = :id AND (used_at IS NULL OR consumed_by = :consumer)
   AND expires_at > statement_timestamp()
   AND n BETWEEN 1 AND 3
RETURNING id;

-- name: purge(batch_size)^
WITH batch AS (
  SELECT id FROM t WHERE expires_at <= now() ORDER BY expires_at DESC LIMIT :batch_size
     FOR UPDATE SKIP LOCKED
)
INSERT INTO u (id) SELECT id FROM batch ON CONFLICT (id) DO NOTHING;
"""


def test_mutants_change_one_code_line_each_and_never_a_comment(
    tool: ModuleType, tmp_path: Path
) -> None:
    (tmp_path / "sample.sql").write_text(SAMPLE)
    made = {(m.query, m.line, m.operator, m.after.strip()) for m in tool.mutants(tmp_path)}
    assert made == {
        ("consume", 6, "statement_timestamp() -> now()", "SET used_at = coalesce(used_at, now())"),
        ("consume", 7, "drop condition", "WHERE id = :id"),
        ("consume", 7, "drop condition", "WHERE id = :id AND (used_at IS NULL)"),
        ("consume", 7, "IS NULL -> IS NOT NULL",
         "WHERE id = :id AND (used_at IS NOT NULL OR consumed_by = :consumer)"),
        ("consume", 8, "drop condition", ""),
        ("consume", 8, "statement_timestamp() -> now()", "AND expires_at > now()"),
        ("purge", 14, "DESC -> ASC",
         "SELECT id FROM t WHERE expires_at <= now() ORDER BY expires_at LIMIT :batch_size"),
        ("purge", 14, "drop LIMIT",
         "SELECT id FROM t WHERE expires_at <= now() ORDER BY expires_at DESC"),
        ("purge", 15, "drop row lock", ""),
        ("purge", 15, "drop SKIP LOCKED", "FOR UPDATE"),
        ("purge", 17, "drop ON CONFLICT DO NOTHING", "INSERT INTO u (id) SELECT id FROM batch;"),
    }  # fmt: skip
    # BETWEEN's AND is no condition of its own: line 9 is left alone


def test_every_shipped_query_file_has_tests_and_its_mutants_keep_their_parentheses(
    tool: ModuleType,
) -> None:
    """Each queries/ file names the test files its mutants run (which exist), and no mutant
    unbalances a line's parentheses (a mutant the server refuses to parse tests nothing)."""
    files = {path.name for path in (ROOT / "queries").glob("*.sql")}
    assert set(tool.DOMAIN_TESTS) == files
    for name in {t for tests in tool.DOMAIN_TESTS.values() for t in tests} | set(tool.COMMON_TESTS):
        assert (ROOT / "tests" / name).is_file(), name
    made = tool.mutants(ROOT / "queries")
    assert len(made) > 300
    _check_parentheses_kept(made)


SAMPLE_MIGRATIONS = {
    "0001_first.sql": """\
CREATE FUNCTION kitium_auth.claim(p_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE t SET used_at = now() WHERE id = p_id AND used_at IS NULL;
  RETURN FOUND;
END;
$$;

CREATE FUNCTION kitium_auth.newest(p_user uuid) RETURNS uuid
LANGUAGE sql STABLE AS $fn$
  SELECT id FROM t WHERE user_id = p_user ORDER BY created_at DESC LIMIT 1
$fn$;

-- migrate:down
DROP FUNCTION kitium_auth.newest(uuid);
DROP FUNCTION kitium_auth.claim(uuid);
""",
    "0002_second.sql": """\
CREATE OR REPLACE FUNCTION kitium_auth.claim(p_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  -- a comment: AND x IS NULL here is no code
  UPDATE t SET used_at = statement_timestamp() WHERE id = p_id AND used_at IS NULL;
  RETURN FOUND;
END;
$$;

DO $$ BEGIN PERFORM 1 WHERE true AND false; END $$;

-- migrate:down
CREATE OR REPLACE FUNCTION kitium_auth.claim(p_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE t SET used_at = now() WHERE id = p_id AND used_at IS NOT NULL;
  RETURN FOUND;
END;
$$;
""",
}


def test_function_mutants_come_from_the_last_definition_of_each_function(
    tool: ModuleType, tmp_path: Path
) -> None:
    """A function redefined by a later migration is mutated there (its first body no longer
    runs); a down part, a DO block and comments give no mutant."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    for name, text in SAMPLE_MIGRATIONS.items():
        (folder / name).write_text(text)
    made = {
        (m.folder, m.file, m.query, m.line, m.operator, m.after.strip())
        for m in tool.function_mutants(folder)
    }
    claim = "UPDATE t SET used_at = statement_timestamp() WHERE id = p_id"
    newest = "SELECT id FROM t WHERE user_id = p_user ORDER BY created_at"
    assert made == {
        ("migrations", "0002_second.sql", "claim", 5, "drop condition", f"{claim};"),
        ("migrations", "0002_second.sql", "claim", 5, "IS NULL -> IS NOT NULL",
         f"{claim} AND used_at IS NOT NULL;"),
        ("migrations", "0002_second.sql", "claim", 5, "statement_timestamp() -> now()",
         "UPDATE t SET used_at = now() WHERE id = p_id AND used_at IS NULL;"),
        ("migrations", "0001_first.sql", "newest", 11, "DESC -> ASC", f"{newest} LIMIT 1"),
        ("migrations", "0001_first.sql", "newest", 11, "drop LIMIT", f"{newest} DESC"),
    }  # fmt: skip


def test_every_shipped_function_has_tests_and_its_mutants_keep_their_parentheses(
    tool: ModuleType,
) -> None:
    """Each function the migrations create (the optional ones too) names the test files its
    mutants run, which exist; no name is left over; no mutant unbalances a line."""
    made = tool.function_mutants(ROOT / "migrations")
    created = {
        match.group(1)
        for path in (ROOT / "migrations").glob("**/*.sql")
        for match in tool.CREATE_FUNCTION.finditer(path.read_text())
    }
    assert created == set(tool.FUNCTION_TESTS)
    assert {m.query for m in made} <= created
    assert {m.folder for m in made} == {"migrations"}
    for name in {t for tests in tool.FUNCTION_TESTS.values() for t in tests}:
        assert (ROOT / "tests" / name).is_file(), name
    assert len(made) > 50
    _check_parentheses_kept(made)


def _check_parentheses_kept(made: list[Any]) -> None:
    """No mutant changes its line's balance of parentheses (the server would refuse it)."""
    for mutant in made:
        before = mutant.before.split("--", 1)[0]
        assert before.count("(") - before.count(")") == (
            mutant.after.count("(") - mutant.after.count(")")
        ), mutant.describe()


SAMPLE_SCHEMA = {
    "0001_tables.sql": """\
CREATE TABLE kitium_auth.t (
  id      uuid PRIMARY KEY,
  user_id uuid NOT NULL,
  email   text,
  kind    text NOT NULL, -- a comment: CHECK (false) here is no code
  CONSTRAINT t__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE SET NULL,
  CONSTRAINT t__kind_check CHECK (kind IN ('a', 'b')),
  CONSTRAINT t__email_key UNIQUE (user_id, email),
  CONSTRAINT t__id_user_id_key UNIQUE (id, user_id),
  CONSTRAINT t__email_check
    CHECK (email IS NULL OR char_length(email) <= 320)
);
CREATE UNIQUE INDEX t__lower_email_key ON kitium_auth.t (lower(email))
  WHERE email IS NOT NULL;
CREATE INDEX t_kind_idx ON kitium_auth.t (kind) WHERE kind IS NOT NULL;

CREATE FUNCTION kitium_auth.f() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  ALTER TABLE kitium_auth.t ADD CONSTRAINT t__in_a_body CHECK (true);
END;
$$;

-- migrate:down
ALTER TABLE kitium_auth.t ADD CONSTRAINT t__in_a_down_part CHECK (kind IS NULL);
""",
    "0002_replace.sql": """\
ALTER TABLE kitium_auth.t DROP CONSTRAINT t__user_id_fkey;
ALTER TABLE kitium_auth.t
  ADD CONSTRAINT t__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE NOT VALID;
ALTER TABLE kitium_auth.t DROP CONSTRAINT t__kind_check;
""",
    "0003_validate.sql": """\
ALTER TABLE kitium_auth.t VALIDATE CONSTRAINT t__user_id_fkey;
""",
}


def test_schema_mutants_come_from_where_each_constraint_was_last_added(
    tool: ModuleType, tmp_path: Path
) -> None:
    """A constraint added again later is mutated there, one dropped later not at all, and one
    validated later where it was added; a plain index, a function body, a down part and
    comments give no mutant."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    for name, text in SAMPLE_SCHEMA.items():
        (folder / name).write_text(text)
    made = {
        (m.file, m.query, m.table, m.line, m.operator, m.after.strip())
        for m in tool.schema_mutants(folder)
    }
    first, fkey = "0001_tables.sql", "t__user_id_fkey"
    assert made == {
        ("0002_replace.sql", fkey, "t", 4, "drop referential action",
         "REFERENCES kitium_auth.users (id) NOT VALID;"),
        (first, "t__email_key", "t", 9, "UNIQUE -> UNIQUE (…, id)",
         "CONSTRAINT t__email_key UNIQUE (user_id, email, id),"),
        (first, "t__email_check", "t", 12, "drop condition", "CHECK (email IS NULL)"),
        (first, "t__email_check", "t", 12, "IS NULL -> IS NOT NULL",
         "CHECK (email IS NOT NULL OR char_length(email) <= 320)"),
        (first, "t__email_check", "t", 12, "CHECK -> CHECK (true)", "CHECK (true)"),
        (first, "t__lower_email_key", "t", 14, "unique index -> plain",
         "CREATE INDEX t__lower_email_key ON kitium_auth.t (lower(email))"),
        (first, "t__lower_email_key", "t", 14, "lower(x) -> x",
         "CREATE UNIQUE INDEX t__lower_email_key ON kitium_auth.t (email)"),
        (first, "t__lower_email_key", "t", 15, "IS NOT NULL -> IS NULL", "WHERE email IS NULL;"),
        (first, "t__lower_email_key", "t", 15, "drop index predicate", ";"),
    }  # fmt: skip


def test_every_shipped_table_has_tests_and_its_schema_mutants_keep_their_parentheses(
    tool: ModuleType,
) -> None:
    """Each table the migrations create names the queries/ file whose tests its mutants run;
    the schema tests exist; no mutant unbalances a line."""
    created = {
        match.group(1)
        for path in (ROOT / "migrations").glob("*.sql")
        for match in re.finditer(r"^CREATE TABLE kitium_auth\.(\w+)", path.read_text(), re.M)
    }
    assert created == set(tool.TABLE_QUERIES)
    assert set(tool.TABLE_QUERIES.values()) <= set(tool.DOMAIN_TESTS)
    for name in tool.SCHEMA_TESTS:
        assert (ROOT / "tests" / name).is_file(), name
    made = tool.schema_mutants(ROOT / "migrations")
    assert {m.table for m in made} == created
    assert len(made) > 100
    _check_parentheses_kept(made)

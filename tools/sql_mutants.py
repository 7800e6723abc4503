"""Mutation testing of queries/, of the functions migrations/ creates and of the tables'
constraints: for each guard taken out of a query, a function or the schema, does some test fail?

A mutant is one line of one query, or of one function's body, changed: a condition dropped
from a WHERE, ON or CASE test (``AND x`` or ``OR x`` removed), ``IS NULL`` and ``IS NOT NULL``
swapped, a row lock removed (``FOR UPDATE``, ``FOR KEY SHARE``…, with its ``SKIP LOCKED``),
``SKIP LOCKED`` alone removed, ``statement_timestamp()`` turned into ``now()``, an
``ON CONFLICT … DO NOTHING`` removed, a ``LIMIT`` removed, a ``DESC`` removed. In a table's
constraint or unique index (``--schema``): a ``CHECK`` made ``CHECK (true)`` (or a condition of
it dropped, or ``IS NULL`` swapped), a reference's ``ON DELETE``/``ON UPDATE`` action removed,
a ``UNIQUE`` constraint widened by the row's ``id`` (so it refuses nothing), a unique index made
plain, its predicate or its ``lower()`` removed.

A query's mutant runs the test files of its query's domain (``DOMAIN_TESTS``) and
``COMMON_TESTS`` on a copy of the checkout, against a fresh database cloned from a migrated
template on an embedded server. A function's mutant, made in the last migration that defines
the function (an earlier definition no longer runs), runs the tests ``FUNCTION_TESTS`` names
and ``COMMON_TESTS`` against an empty database, which the copy's adapter migrates from the
mutated file. A schema mutant, made in the migration that last adds its constraint or index
(one a later migration drops gives none), runs the tests of its table's domain
(``TABLE_QUERIES``), ``SCHEMA_TESTS`` and ``COMMON_TESTS`` the same way. A mutant some test
fails on is killed; one that aiosql or the server refuses is invalid (any test that runs it
fails, which tests nothing), as is a schema mutant the migrations cannot apply; the others
survive and are listed.

    python tools/sql_mutants.py --list                    # the mutants, not run
    python tools/sql_mutants.py                           # every mutant
    python tools/sql_mutants.py --file twofa.sql --report out.md
    python tools/sql_mutants.py --functions               # those of migrations/ only
    python tools/sql_mutants.py --schema                  # the tables' constraints only
    python tools/sql_mutants.py --survivors-of out.log    # what an earlier run left

A survivor is a guard no test depends on: either a missing test or a guard that changes
nothing a caller can see (say a lock a later step of the same statement takes anyway);
docs/sql-mutants.md keeps the verdicts. Exits 0 when the baseline passes, whatever survives;
2 when the baseline fails (nothing is then measured).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosql
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kitium_pg.embedded import EmbeddedPostgres  # noqa: E402

# The test files that exercise each queries/ file; a mutant runs those of its file, then
# COMMON_TESTS (retries after a lost acknowledgement, round trips, caller transactions, purges).
COMMON_TESTS = ("test_lost_ack.py", "test_round_trips.py", "test_transactions.py", "test_purges.py")
DOMAIN_TESTS: dict[str, tuple[str, ...]] = {
    "api_keys.sql": ("test_api_keys.py", "test_tokens.py", "test_tenancy.py", "test_replicas.py"),
    "chaos.sql": ("test_chaos.py",),
    "diagnostics.sql": ("test_cli.py", "test_sso.py"),
    "email_verification.sql": ("test_email_verification.py", "test_tenancy.py"),
    "events.sql": ("test_events.py", "test_sessions.py", "test_tenancy.py"),
    "grants.sql": ("test_cli.py", "test_migrate.py"),
    "keys.sql": ("test_key_rotation.py", "test_cli.py", "test_encryption.py"),
    "migrations.sql": ("test_migrate.py", "test_migrate_concurrently.py", "test_cli.py"),
    "organizations.sql": ("test_organizations.py", "test_tenancy.py", "test_sessions.py"),
    "rbac.sql": ("test_rbac.py", "test_tenancy.py"),
    "sessions.sql": (
        "test_sessions.py",
        "test_tokens.py",
        "test_tenancy.py",
        "test_replicas.py",
        "test_fastapi.py",
    ),
    "sso.sql": ("test_sso.py", "test_tenancy.py"),
    "tokens.sql": (
        "test_tokens.py",
        "test_api_keys.py",
        "test_sessions.py",
        "test_replicas.py",
        "test_fastapi.py",
    ),
    "twofa.sql": ("test_twofa.py", "test_tenancy.py"),
    "users.sql": ("test_users.py", "test_tenancy.py", "test_organizations.py", "test_fastapi.py"),
}

# The test files that exercise each function migrations/ creates (run with COMMON_TESTS).
_MEMBERSHIP_TESTS = DOMAIN_TESTS["organizations.sql"]
_TWOFA_TESTS = DOMAIN_TESTS["twofa.sql"]
_EMAIL_TESTS = ("test_users.py", "test_email_verification.py")
FUNCTION_TESTS: dict[str, tuple[str, ...]] = {
    "set_updated_at": ("test_users.py", "test_organizations.py", "test_sso.py"),
    "replace_backup_codes": _TWOFA_TESTS,
    "count_two_factor_attempt": _TWOFA_TESTS,
    "verify_two_factor_session": _TWOFA_TESTS,
    "add_organization_member": _MEMBERSHIP_TESTS,
    "set_organization_member_role": _MEMBERSHIP_TESTS,
    "remove_organization_member": _MEMBERSHIP_TESTS,
    "replace_organization_members": _MEMBERSHIP_TESTS,
    "replace_sso_provider_domains": DOMAIN_TESTS["sso.sql"],
    "organization_member_list": _MEMBERSHIP_TESTS,
    "user_oauth_map": DOMAIN_TESTS["users.sql"],
    "twofa_login_session_live": _TWOFA_TESTS,
    "twofa_challenge_live": _TWOFA_TESTS,
    "sso_provider_domain_list": DOMAIN_TESTS["sso.sql"],
    "sso_provider_is_foreign": ("test_tenancy.py", "test_sso.py"),
    "jsonb_merge_patch": ("test_merge_patch.py", "test_users.py", "test_organizations.py"),
    "set_user_roles": DOMAIN_TESTS["rbac.sql"],
    "users_email_verified_at_follows_email": _EMAIL_TESTS,
    "users_email_change_revokes_tokens": _EMAIL_TESTS,
    "auth_event_written": ("test_tokens.py", "test_lost_ack.py"),
    "lock_user_session_memberships": ("test_sessions.py", "test_tenancy.py"),
    "email_address_attempts": ("test_email_verification.py",),
}

# The queries/ file whose domain holds each table: a schema mutant runs its DOMAIN_TESTS, then
# SCHEMA_TESTS and COMMON_TESTS.
TABLE_QUERIES: dict[str, str] = {
    "users": "users.sql",
    "oauth_accounts": "users.sql",
    "organizations": "organizations.sql",
    "organization_members": "organizations.sql",
    "sessions": "sessions.sql",
    "api_keys": "api_keys.sql",
    "email_verification_tokens": "email_verification.sql",
    "email_verification_token_attempts": "email_verification.sql",
    "auth_events": "events.sql",
    "roles": "rbac.sql",
    "user_roles": "rbac.sql",
    "sso_providers": "sso.sql",
    "sso_provider_domains": "sso.sql",
    "sso_links": "sso.sql",
    "sso_sessions": "sso.sql",
    "twofa_devices": "twofa.sql",
    "twofa_backup_codes": "twofa.sql",
    "twofa_sessions": "twofa.sql",
}
SCHEMA_TESTS = ("test_constraints.py",)

CREATE_FUNCTION = re.compile(r"^CREATE (?:OR REPLACE )?FUNCTION kitium_auth\.(\w+)", re.MULTILINE)
BODY_OPENS = re.compile(r"\bAS (\$\w*\$)\s*$")
LOCK_CLAUSE = re.compile(
    r"\s+FOR (?:NO KEY UPDATE|UPDATE|KEY SHARE|SHARE)(?:\s+OF\s+\w+)?(?:\s+SKIP LOCKED|\s+NOWAIT)?"
)
SKIP_LOCKED = re.compile(r"\s+SKIP LOCKED")
IS_NULL = re.compile(r"\bIS NULL\b")
IS_NOT_NULL = re.compile(r"\bIS NOT NULL\b")
STATEMENT_TIME = re.compile(r"\bstatement_timestamp\(\)")
DO_NOTHING = re.compile(r"\s*ON CONFLICT\s*(?:\([^()]*\))?\s*DO NOTHING")
LIMIT = re.compile(r"\s+LIMIT\s+(?:\d+|:\w+|\(:\w+\))")
DESC = re.compile(r"\s+DESC\b")
INVALID = "aiosql, the server or the migrations refuse it"
# Schema statements: what a line of a migration's up part adds, drops or continues.
TABLE_OPENS = re.compile(r"^(?:CREATE|ALTER) TABLE (?:ONLY )?kitium_auth\.(\w+)")
CONSTRAINT_OPENS = re.compile(r"(?<!DROP )(?<!VALIDATE )(?<!RENAME )\bCONSTRAINT (\w+)")
CONSTRAINT_DROPPED = re.compile(r"\bDROP CONSTRAINT (?:IF EXISTS )?(\w+)")
UNIQUE_INDEX_OPENS = re.compile(r"^CREATE UNIQUE INDEX (?:CONCURRENTLY )?(?:IF NOT EXISTS )?(\w+)")
INDEX_TABLE = re.compile(r"\bON kitium_auth\.(\w+)")
INDEX_DROPPED = re.compile(r"\bDROP INDEX (?:CONCURRENTLY )?(?:IF EXISTS )?(?:kitium_auth\.)?(\w+)")
BLOCK_OPENS = re.compile(r"(?:\bAS|^DO) (\$\w*\$)")
CHECK = re.compile(r"\bCHECK \(")
REFERENTIAL_ACTION = re.compile(
    r"\s+ON (?:DELETE|UPDATE) (?:CASCADE|SET NULL|SET DEFAULT|RESTRICT)"
)
UNIQUE_COLUMNS = re.compile(r"\bUNIQUE \(([^()]*)\)")
PREDICATE = re.compile(r"\s*\bWHERE\b.*?(?=;?\s*$)")
LOWER = re.compile(r"\blower\((\w+)\)")


@dataclass(frozen=True)
class Mutant:
    file: str
    query: str
    line: int  # 1-based, in the file
    operator: str
    before: str
    after: str
    variant: int = 1  # the n-th mutant of this line by this operator
    folder: str = "queries"  # or migrations, migrations/optional (then query is a function)
    table: str = ""  # a schema mutant's table (then query is the constraint or the index)

    def describe(self) -> str:
        nth = f" #{self.variant}" if self.variant > 1 else ""
        where = self.file if self.folder == "queries" else f"{self.folder}/{self.file}"
        return f"{where}:{self.line} {self.query} [{self.operator}{nth}]"


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _depths(line: str) -> list[int]:
    """Parenthesis depth before each character of ``line``."""
    depth, out = 0, []
    for char in line:
        out.append(depth)
        depth += {"(": 1, ")": -1}.get(char, 0)
    return out


def _dropped_conditions(line: str) -> Iterator[str]:
    """``line`` with one ``AND <condition>`` or ``OR <condition>`` taken out, for each
    condition that ends within the line (at the next AND, OR, THEN, ELSE or END at its depth, at
    the parenthesis that closes its group, or at the end of the line)."""
    if "BETWEEN" in line:
        return
    depths = _depths(line)
    stop = len(line.rstrip().rstrip(";").rstrip())
    for match in re.finditer(r"\b(?:AND|OR)\b", line):
        depth = depths[match.start()]
        end = stop
        for pos in range(match.end(), stop):
            if line[pos] == ")" and depths[pos] == depth:
                end = pos
                break
            if depths[pos] == depth and re.match(r"\s(?:AND|OR|THEN|ELSE|END)\b", line[pos:]):
                end = pos
                break
        condition = line[match.end() : end]
        if condition.strip() and _balanced(condition):
            yield line[: match.start()].rstrip() + line[end:]


def _line_mutants(line: str) -> Iterator[tuple[str, str]]:
    code = line.split("--", 1)[0]
    if not code.strip():
        return
    yield from _condition_mutants(code)
    for pattern, name in (
        (LOCK_CLAUSE, "drop row lock"),
        (SKIP_LOCKED, "drop SKIP LOCKED"),
        (DO_NOTHING, "drop ON CONFLICT DO NOTHING"),
        (LIMIT, "drop LIMIT"),
        (DESC, "DESC -> ASC"),
    ):
        for match in pattern.finditer(code):
            yield name, code[: match.start()] + code[match.end() :]
    for match in STATEMENT_TIME.finditer(code):
        yield (
            "statement_timestamp() -> now()",
            code[: match.start()] + "now()" + code[match.end() :],
        )


def _condition_mutants(code: str) -> Iterator[tuple[str, str]]:
    """A condition dropped from ``code``, or one ``IS NULL`` / ``IS NOT NULL`` swapped."""
    for mutated in _dropped_conditions(code):
        yield "drop condition", mutated
    for match in IS_NOT_NULL.finditer(code):
        yield "IS NOT NULL -> IS NULL", code[: match.start()] + "IS NULL" + code[match.end() :]
    for match in IS_NULL.finditer(code):
        yield "IS NULL -> IS NOT NULL", code[: match.start()] + "IS NOT NULL" + code[match.end() :]


def mutants(queries_dir: Path) -> list[Mutant]:
    """Every mutant of every query, in file and line order."""
    found: list[Mutant] = []
    for path in sorted(queries_dir.glob("*.sql")):
        query = ""
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            name = re.match(r"--\s*name:\s*(\w+)", line)
            if name:
                query = name.group(1)
                continue
            if query:
                found.extend(_mutants_of_line(path, query, number, line, "queries"))
    return found


def _mutants_of_line(
    path: Path,
    query: str,
    number: int,
    line: str,
    folder: str,
    made: Iterable[tuple[str, str]] | None = None,
    table: str = "",
) -> Iterator[Mutant]:
    """The mutants of one line of ``query`` (or function, or ``table``'s constraint) in
    ``path``: ``made`` (``_line_mutants`` of the line by default), numbered per operator; none
    for a comment."""
    counts: dict[str, int] = {}
    for operator, after in _line_mutants(line) if made is None else made:
        if after.rstrip() != line.split("--", 1)[0].rstrip():
            counts[operator] = counts.get(operator, 0) + 1
            yield Mutant(
                path.name, query, number, operator, line, after, counts[operator], folder, table
            )


def function_mutants(migrations_dir: Path) -> list[Mutant]:
    """Every mutant of every function the migrations (optional ones included) create, each
    made in the up part of the last migration that defines the function, in name order."""
    latest: dict[str, tuple[Path, list[tuple[int, str]]]] = {}
    paths = [*sorted(migrations_dir.glob("*.sql")), *sorted(migrations_dir.glob("optional/*.sql"))]
    for path in paths:
        up = path.read_text().split("\n-- migrate:down", 1)[0]
        function, closing = "", ""
        body: list[tuple[int, str]] = []
        for number, line in enumerate(up.splitlines(), start=1):
            if closing and line.startswith(closing):
                latest[function] = (path, body)
                function, closing = "", ""
            elif closing:
                body.append((number, line))
            elif created := CREATE_FUNCTION.match(line):
                function = created.group(1)
            elif function and (opens := BODY_OPENS.search(line)):
                closing, body = opens.group(1), []
    found: list[Mutant] = []
    for function, (path, body) in sorted(latest.items()):
        folder = path.parent.relative_to(migrations_dir.parent).as_posix()
        for number, line in body:
            found.extend(_mutants_of_line(path, function, number, line, folder))
    return found


def schema_mutants(migrations_dir: Path) -> list[Mutant]:
    """Every mutant of every constraint and unique index the migrations (not the optional
    ones) add, each made in the up part of the migration that last adds it (none for one a
    later up part drops), in name order."""
    latest: dict[str, tuple[Path, str, list[tuple[int, str]]]] = {}
    for path in sorted(migrations_dir.glob("*.sql")):
        up = path.read_text().split("\n-- migrate:down", 1)[0]
        table, closing, name = "", "", ""
        lines: list[tuple[int, str]] = []
        for number, line in enumerate(up.splitlines(), start=1):
            code = line.split("--", 1)[0].rstrip()
            if closing:  # a function body or a DO block: no schema there
                closing = "" if code.lstrip().startswith(closing) else closing
                continue
            if name and code.lstrip().startswith(")"):  # the table's last constraint ended
                latest[name], name = (path, table, lines), ""
            if opens := BLOCK_OPENS.search(code):
                closing = "" if opens.group(1) in code[opens.end() :] else opens.group(1)
                continue
            if opened := TABLE_OPENS.match(code):
                table = opened.group(1)
            for dropped in (*CONSTRAINT_DROPPED.finditer(code), *INDEX_DROPPED.finditer(code)):
                latest.pop(dropped.group(1), None)
            if opened := CONSTRAINT_OPENS.search(code) or UNIQUE_INDEX_OPENS.match(code):
                name, lines = opened.group(1), []
            if name:
                lines.append((number, line))
                if on := INDEX_TABLE.search(code):
                    table = on.group(1)
                if code.endswith((",", ";")):
                    latest[name], name = (path, table, lines), ""
    found: list[Mutant] = []
    for name, (path, table, lines) in sorted(latest.items()):
        index = bool(UNIQUE_INDEX_OPENS.match(lines[0][1]))
        checked = any(CHECK.search(line) for _, line in lines)
        for number, line in lines:
            made = _schema_line_mutants(line, index=index, checked=checked)
            found.extend(_mutants_of_line(path, name, number, line, "migrations", made, table))
    return found


def _schema_line_mutants(line: str, *, index: bool, checked: bool) -> Iterator[tuple[str, str]]:
    """The mutants of one line of a constraint (``checked``: a CHECK) or of a unique index."""
    code = line.split("--", 1)[0].rstrip()
    if checked or (index and "WHERE" in code):
        yield from _condition_mutants(code)
    if check := CHECK.search(code):
        depths = _depths(code)
        end = next(
            (pos for pos in range(check.end(), len(code)) if code[pos] == ")" and depths[pos] == 1),
            None,
        )
        if end is not None and depths[check.end() - 1] == 0:  # the whole test on this line
            yield "CHECK -> CHECK (true)", code[: check.end()] + "true" + code[end:]
    for match in REFERENTIAL_ACTION.finditer(code):
        yield "drop referential action", code[: match.start()] + code[match.end() :]
    for match in UNIQUE_COLUMNS.finditer(code):
        # with the primary key among its columns a unique constraint refuses nothing (one that
        # holds it already is there for a reference, not for uniqueness)
        if "id" not in [column.strip() for column in match.group(1).split(",")]:
            yield "UNIQUE -> UNIQUE (…, id)", code[: match.end(1)] + ", id" + code[match.end(1) :]
    if index:
        if code.startswith("CREATE UNIQUE INDEX"):
            yield "unique index -> plain", code.replace("CREATE UNIQUE INDEX", "CREATE INDEX", 1)
        for match in PREDICATE.finditer(code):
            if match.group().strip():
                yield "drop index predicate", code[: match.start()] + code[match.end() :]
        for match in LOWER.finditer(code):
            yield "lower(x) -> x", code[: match.start()] + match.group(1) + code[match.end() :]


def _migrates(copy: Path, conninfo: str, optional: bool) -> tuple[bool, str]:
    """Whether the copy's adapter migrates an empty database (with tenant_rls when the mutant is
    in an optional migration); else whether the server refused the mutant's syntax, or the
    error's last line."""
    script = (
        "import sys\nfrom kitium_pg import PostgresStorageAdapter\n"
        "with PostgresStorageAdapter(sys.argv[1], optional_migrations=sys.argv[2:]): pass\n"
    )
    command = [sys.executable, "-c", script, conninfo, *(["tenant_rls"] if optional else [])]
    env = dict(os.environ, PYTHONPATH=str(copy))
    done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    if done.returncode == 0:
        return True, ""
    if "syntax error" in done.stderr:
        return False, INVALID
    return False, "migration failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]


def _parses(conninfo: str, text: str, query: str) -> bool:
    """Whether aiosql loads ``query`` of queries file ``text`` and the server can parse it (a
    mutant that cannot be is counted apart: any test that runs it fails, which tests nothing)."""
    try:
        statement = getattr(aiosql.from_str(text, "psycopg"), query).sql
    except aiosql.SQLParseException:  # e.g. a declared parameter the mutant no longer uses
        return False
    numbers: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

    statement = re.sub(r"%\((\w+)\)s", number, statement).replace("%%", "%")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        result = conn.pgconn.prepare(b"", statement.encode())
        return result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) != b"42601"


def _run_tests(
    copy: Path, dsn: str, tests: tuple[str, ...], keyword: str | None, timeout: float
) -> tuple[bool, str]:
    env = dict(os.environ, KITIUM_PG_TEST_DSN=dsn, PYTHONPATH=str(copy))
    env.pop("CI", None)
    command = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
        *(["-k", keyword] if keyword else []), *[f"tests/{name}" for name in tests],
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, "timed out"
    lines = done.stdout.strip().splitlines() or ["(no output)"]
    # the tests that failed and the last error, to tell a mutant's failure from a flaky test's
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")][-1:]
    return done.returncode == 0, "; ".join([lines[-1], *failed, *errors])


def _copy_checkout(into: Path) -> Path:
    copy = into / "checkout"
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument(
        "--file", action="append", help="only this queries/ or migrations/ file (repeatable)"
    )
    parser.add_argument(
        "--query",
        action="append",
        help="only this query, function, constraint or index (repeatable)",
    )
    parser.add_argument("--line", action="append", type=int, help="only this line (repeatable)")
    parser.add_argument("--operator", action="append", help="only this operator (repeatable)")
    parser.add_argument(
        "--functions", action="store_true", help="only the functions migrations/ creates"
    )
    parser.add_argument(
        "--schema",
        action="store_true",
        help="only the constraints and unique indexes of migrations/",
    )
    parser.add_argument(
        "--survivors-of",
        type=Path,
        help="only the mutants an earlier run's output lists as SURVIVED",
    )
    parser.add_argument(
        "--skip-operator", action="append", default=[], help="not this operator (repeatable)"
    )
    parser.add_argument(
        "--tests", nargs="+", help="run these test files instead of the domain's and the common"
    )
    parser.add_argument("--also", action="append", default=[], help="run this test file too")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for every run")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    parser.add_argument("--report", type=Path, help="write the survivors here as Markdown")
    args = parser.parse_args()

    again = None
    if args.survivors_of:
        survived = re.compile(r"\bSURVIVED (.+?\])")
        again = {m.group(1) for m in survived.finditer(args.survivors_of.read_text())}
    selected = [
        m
        for m in [
            *([] if args.functions or args.schema else mutants(ROOT / "queries")),
            *([] if args.schema else function_mutants(ROOT / "migrations")),
            *([] if args.functions else schema_mutants(ROOT / "migrations")),
        ]
        if (not args.file or m.file in args.file)
        and (not args.query or m.query in args.query)
        and (not args.line or m.line in args.line)
        and (not args.operator or m.operator in args.operator)
        and m.operator not in args.skip_operator
        and (again is None or m.describe() in again)
    ]
    if args.list:
        for mutant in selected:
            print(f"{mutant.describe()}\n  - {mutant.before.strip()}\n  + {mutant.after.strip()}")
        print(f"{len(selected)} mutants")
        return 0

    # SIGTERM ends the run like Ctrl-C, so the server below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="sql-mutants-") as scratch:
        copies = [_copy_checkout(Path(scratch) / f"job{job}") for job in range(args.jobs)]
        server = EmbeddedPostgres(Path(scratch) / "data")
        base = server.start()
        # Each run of the tests holds pools of its own: the 2FA tests' run peaked at 55 client
        # connections, so two runs side by side could pass the default 100 and be refused
        # one, which would look like a kill (CI's PostgreSQL 15 allows 200).
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(
                f"ALTER SYSTEM SET max_connections = {150 * args.jobs}"
            )  # a tool: DBA-facing SQL stays in queries/
        server.restart()
        try:
            return _run(args, selected, copies, base)
        finally:
            server.stop()


def _database(base: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(base, dbname=name)


def _tests_for(args: argparse.Namespace, mutants: list[Mutant]) -> tuple[str, ...]:
    if args.tests:
        return tuple(args.tests)
    chosen = [t for m in mutants for t in _tests_of(m)]
    return tuple(dict.fromkeys((*chosen, *args.also, *COMMON_TESTS)))


def _tests_of(mutant: Mutant) -> tuple[str, ...]:
    if mutant.table:
        return (*DOMAIN_TESTS[TABLE_QUERIES[mutant.table]], *SCHEMA_TESTS)
    if mutant.folder == "queries":
        return DOMAIN_TESTS[mutant.file]
    return FUNCTION_TESTS[mutant.query]


def _run(args: argparse.Namespace, selected: list[Mutant], copies: list[Path], base: str) -> int:
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(
            "CREATE DATABASE mutants_template"
        )  # a tool: DBA-facing SQL stays in queries/
    template = _database(base, "mutants_template")
    baseline_tests = _tests_for(args, selected)
    started = time.monotonic()
    passed, tail = _run_tests(copies[0], template, baseline_tests, args.keyword, args.timeout * 4)
    print(f"baseline {' '.join(baseline_tests)}: {tail} ({time.monotonic() - started:.0f} s)")
    if not passed:
        return 2
    free: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for copy in copies:
        free.put(copy)
    results: dict[int, tuple[bool, str]] = {}
    lock = threading.Lock()

    def run_one(number: int, mutant: Mutant) -> None:
        copy = free.get()
        path = copy / mutant.folder / mutant.file
        original = path.read_text()
        lines = original.splitlines(keepends=True)
        lines[mutant.line - 1] = mutant.after.rstrip() + "\n"
        path.write_text("".join(lines))
        name = f"mutant_{number}"
        database = _database(base, name)
        in_migrations = mutant.folder != "queries"
        with psycopg.connect(base, autocommit=True) as admin:
            # a mutant of migrations/ needs an empty database, which the copy migrates
            admin.execute(
                f"CREATE DATABASE {name}" if in_migrations
                else f"CREATE DATABASE {name} TEMPLATE mutants_template"
            )  # a tool: DBA-facing SQL stays in queries/  # fmt: skip
        t0 = time.monotonic()
        try:
            tests = _tests_for(args, [mutant])
            if in_migrations:
                valid, tail = _migrates(copy, database, mutant.folder.endswith("optional"))
                # a constraint the migrations cannot add is no schema at all
                tail = INVALID if mutant.table and not valid else tail
            else:
                valid, tail = _parses(database, path.read_text(), mutant.query), INVALID
            if valid:
                passed, tail = _run_tests(copy, database, tests, args.keyword, args.timeout)
            else:
                passed = False
        finally:
            path.write_text(original)
            free.put(copy)
            with psycopg.connect(base, autocommit=True) as admin:
                admin.execute(
                    f"DROP DATABASE {name} WITH (FORCE)"
                )  # a tool: DBA-facing SQL stays in queries/
        with lock:
            results[number] = (passed, tail)
            verdict = "SURVIVED" if passed else "invalid" if tail == INVALID else "killed"
            print(f"[{len(results)}/{len(selected)}] {verdict:8} {mutant.describe()} "
                  f"({time.monotonic() - t0:.0f} s) {tail}", flush=True)  # fmt: skip

    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        for future in [pool.submit(run_one, n, m) for n, m in enumerate(selected, start=1)]:
            future.result()
    finally:
        # on Ctrl-C (or SIGTERM) the mutants not started are dropped; the running ones end
        pool.shutdown(cancel_futures=True)
    survivors = [(m, results[n][1]) for n, m in enumerate(selected, start=1) if results[n][0]]
    invalid = [m for n, m in enumerate(selected, start=1) if results[n][1] == INVALID]
    killed = len(selected) - len(survivors) - len(invalid)
    print(
        f"{killed} killed, {len(survivors)} survived, {len(invalid)} invalid (aiosql, the server"
        f" or the migrations refuse them) of {len(selected)}"
    )
    for mutant in invalid:
        print(f"INVALID {mutant.describe()}\n  + {mutant.after.strip()}")
    for mutant, _ in survivors:
        print(
            f"SURVIVED {mutant.describe()}\n  - {mutant.before.strip()}\n  + {mutant.after.strip()}"
        )
    if args.report:
        args.report.write_text(_report(selected, survivors, killed, invalid))
    return 0


def _report(
    selected: list[Mutant], survivors: list[tuple[Mutant, str]], killed: int, invalid: list[Mutant]
) -> str:
    out = [
        f"{killed} killed, {len(survivors)} survived, {len(invalid)} invalid of {len(selected)}"
        " mutants.",
        "",
    ]
    for mutant, tail in survivors:
        out += [
            f"- `{mutant.describe()}` ({tail})",
            "  ```diff",
            f"  - {mutant.before.strip()}",
            f"  + {mutant.after.strip()}",
            "  ```",
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""``kitium-pg``: apply, inspect and roll back migrations, check health, run the demo.

Every command uses the sync ``PostgresStorageAdapter``. The database is ``--dsn``, else the
``DATABASE_URL`` environment variable, else an embedded PostgreSQL kept in ``./.kitium-pg/data``
(the ``embedded`` extra). Failures print one line on stderr and exit with a documented code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, NoReturn

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict
from rich.console import Console
from rich.table import Table

from . import __version__, _sql
from ._base import Migration, load_migrations, redact_dsn
from ._sync.adapter import PostgresStorageAdapter
from .errors import KitiumPgError, MigrationError, UnavailableError, ValidationError

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # any KitiumPgError not listed below
EXIT_USAGE: Final = 2  # click's own usage errors (bad option, unknown command, bad value)
EXIT_UNAVAILABLE: Final = 3  # UnavailableError: the database cannot be reached
EXIT_MIGRATION: Final = 4  # MigrationError: malformed, changed, unknown or failing migration

EMBEDDED_DATA_DIR: Final = Path(".kitium-pg") / "data"

EPILOG: Final = """\b
Database: --dsn, else $DATABASE_URL, else an embedded PostgreSQL started in
./.kitium-pg/data (needs the 'embedded' extra; stopped when the command exits).
\b
Exit codes:
  0  success
  1  operation failed (any other kitium-pg error; health: error status)
  2  usage error (bad option or argument)
  3  database unavailable (UnavailableError)
  4  migration problem (MigrationError; health: migrations pending)
"""

_HINTS: Final[dict[type[KitiumPgError], str]] = {
    UnavailableError: "is the server running and the DSN right?",
    MigrationError: "see `kitium-pg status` and `kitium-pg sql`",
    ValidationError: "check the argument named above",
}


class _Context:
    """What the group's options resolve to, shared by the commands."""

    def __init__(self, dsn: str | None, schema: str, as_json: bool, connect_timeout: float):
        self.dsn = dsn
        self.schema = schema
        self.as_json = as_json
        self.connect_timeout = connect_timeout
        self.out = Console(highlight=False)
        # In JSON mode stdout carries only the JSON document; progress goes to stderr.
        self.info = Console(stderr=True, highlight=False) if as_json else self.out
        self.secrets = _passwords(dsn) if dsn else []

    def redact(self, text: str) -> str:
        """``text`` on one line, without any password of the DSN in use."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return " ".join(redact_dsn(text).split())

    def resolve_dsn(self) -> str:
        if self.dsn:
            try:
                conninfo_to_dict(self.dsn)
            except psycopg.ProgrammingError as exc:
                raise click.BadParameter(
                    f"not a PostgreSQL connection string: {self.redact(self.dsn)!r}",
                    param_hint="--dsn / DATABASE_URL",
                ) from exc
            return self.dsn
        from .embedded import EmbeddedPostgres

        try:
            dsn = EmbeddedPostgres(EMBEDDED_DATA_DIR).start()
        except (OSError, subprocess.SubprocessError) as exc:
            raise UnavailableError(
                f"the embedded PostgreSQL in ./{EMBEDDED_DATA_DIR} did not start"
                f" ({type(exc).__name__}; its log is ./{EMBEDDED_DATA_DIR}/log)"
            ) from exc
        except RuntimeError as exc:  # the 'embedded' extra is not installed
            raise UnavailableError(str(exc)) from exc
        click.echo(
            f"kitium-pg: no --dsn or DATABASE_URL given: started an embedded PostgreSQL in"
            f" ./{EMBEDDED_DATA_DIR} (stopped when this command exits)",
            err=True,
        )
        return dsn

    @contextmanager
    def storage(self) -> Iterator[PostgresStorageAdapter]:
        """A connected adapter that has not migrated anything (each command decides),
        disconnected afterwards."""
        dsn = self.resolve_dsn()
        storage = PostgresStorageAdapter(
            dsn,
            schema=self.schema,
            min_size=1,
            max_size=2,
            connect_timeout=self.connect_timeout,
            pool_timeout=self.connect_timeout,
            application_name="kitium-pg-cli",
        )
        storage.connect(migrate=False)
        try:
            yield storage
        finally:
            storage.disconnect()

    def emit_json(self, document: Any) -> None:
        click.echo(json.dumps(document, indent=2, default=str))

    def progress(self, verb: str) -> Callable[[str, str], None]:
        def report(migration_id: str, direction: str) -> None:
            self.info.print(f"  {verb} {migration_id} ({direction}) …", markup=False)

        return report


def _passwords(dsn: str) -> list[str]:
    # The passwords a DSN carries (URL and key=value forms), to keep them out of messages.
    found = re.findall(r"://[^:/@]*:([^@]+)@", dsn)
    found += re.findall(r"password\s*=\s*'?([^\s'&]+)", dsn, flags=re.I)
    return [secret for secret in found if secret]


def _check_schema(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return _sql.check_schema(value)
    except ValidationError as exc:
        raise click.BadParameter(str(exc).removeprefix("schema: ")) from exc


def _exit_code(error: KitiumPgError) -> int:
    if isinstance(error, UnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(error, MigrationError):
        return EXIT_MIGRATION
    return EXIT_FAILED


def _fail(state: _Context | None, error: KitiumPgError) -> NoReturn:
    """Print ``error`` as one actionable line on stderr (and as JSON on stdout in JSON mode),
    then exit with its code."""
    redact = state.redact if state else (lambda text: " ".join(redact_dsn(text).split()))
    message = redact(str(error))
    hint = next((h for cls, h in _HINTS.items() if isinstance(error, cls)), None)
    line = f"error: {message}" + (f" — {hint}" if hint else "") + f" ({type(error).__name__})"
    code = _exit_code(error)
    if state is not None and state.as_json:
        state.emit_json(
            {
                "error": {
                    "type": type(error).__name__,
                    "code": error.code,
                    "message": message,
                    "exit_code": code,
                }
            }
        )
    click.echo(line, err=True)
    raise click.exceptions.Exit(code)


class _Group(click.Group):
    """Turns kitium-pg errors raised by any command into one stderr line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KitiumPgError as error:
            _fail(ctx.find_object(_Context), error)


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dsn",
    envvar="DATABASE_URL",
    show_envvar=True,
    metavar="DSN",
    help="PostgreSQL connection string (postgresql://user:pass@host/db or key=value form).",
)
@click.option(
    "--schema",
    default=_sql.DEFAULT_SCHEMA,
    show_default=True,
    callback=_check_schema,
    metavar="NAME",
    help="Schema that holds the kitium-pg tables.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout instead."
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.5),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Give up connecting after this long (exit code 3).",
)
@click.version_option(__version__, "--version", prog_name="kitium-pg")
@click.pass_context
def cli(
    ctx: click.Context, dsn: str | None, schema: str, as_json: bool, connect_timeout: float
) -> None:
    """Manage the kitium-pg schema in PostgreSQL: migrate, inspect, roll back, check health,
    and run a demo of every domain."""
    # Library and driver log lines would break the "one line per error" promise; keep them
    # quiet unless the embedding application configured logging itself.
    if not logging.getLogger().handlers:
        logging.getLogger().addHandler(logging.NullHandler())
    ctx.obj = _Context(dsn, schema, as_json, connect_timeout)


@cli.command(short_help="Apply pending migrations.")
@click.pass_obj
def migrate(state: _Context) -> None:
    """Apply pending migrations, one transaction each, and print what was applied.

    Safe to run from several processes at once: each migration is applied exactly once.
    """
    with state.storage() as storage:
        state.info.print(f"migrating schema {state.schema}", markup=False)
        applied = storage.migrate(progress=state.progress("applying"))
        status = storage.migration_status()
    if state.as_json:
        state.emit_json(
            {
                "schema": state.schema,
                "applied_now": applied,
                "applied": status.applied,
                "pending": status.pending,
            }
        )
        return
    if applied:
        state.out.print(f"applied {len(applied)}: {', '.join(applied)}", markup=False)
    else:
        state.out.print(
            f"nothing to apply: all {len(status.applied)} migrations are applied", markup=False
        )


@cli.command(short_help="Show applied and pending migrations.")
@click.pass_obj
def status(state: _Context) -> None:
    """Show applied and pending migrations. Reads only: creates nothing in the database."""
    known = load_migrations(state.schema)
    with state.storage() as storage:
        current = storage.migration_status()
    applied = set(current.applied)
    if state.as_json:
        state.emit_json(
            {"schema": state.schema, "applied": current.applied, "pending": current.pending}
        )
        return
    table = Table(title=f"migrations in schema {state.schema}", title_justify="left")
    table.add_column("migration", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("file", no_wrap=True)
    for migration in known:
        done = migration.id in applied
        table.add_row(
            migration.id,
            "[green]applied[/]" if done else "[yellow]pending[/]",
            migration.path.name,
        )
    state.out.print(table)
    state.out.print(f"{len(current.applied)} applied, {len(current.pending)} pending")


@cli.command(short_help="Undo the newest applied migrations.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many of the newest applied migrations to undo.",
)
@click.pass_obj
def rollback(state: _Context, steps: int) -> None:
    """Undo the newest applied migrations (their down parts), newest first."""
    with state.storage() as storage:
        undone = storage.rollback(steps, progress=state.progress("rolling back"))
    if state.as_json:
        state.emit_json({"schema": state.schema, "rolled_back": undone})
    elif undone:
        state.out.print(f"rolled back {len(undone)}: {', '.join(undone)}", markup=False)
    else:
        state.out.print("nothing to roll back: no migration is applied", markup=False)


def _select(migrations: Sequence[Migration], wanted: str | None) -> list[Migration]:
    if wanted is None:
        return list(migrations)
    key = wanted.removeprefix("migrations/").removesuffix(".sql")
    found = [m for m in migrations if key in (m.id, m.id.split("_", 1)[0])]
    if not found:
        known = ", ".join(m.id for m in migrations) or "none"
        raise click.BadParameter(
            f"no migration {wanted!r} (known: {known})", param_hint="MIGRATION_ID"
        )
    return found


@cli.command(short_help="Print migration SQL (no database needed).")
@click.option("--down", is_flag=True, help="Print the down (rollback) parts, newest first.")
@click.argument("migration_id", required=False, metavar="[MIGRATION_ID]")
@click.pass_obj
def sql(state: _Context, down: bool, migration_id: str | None) -> None:
    """Print migration SQL for a DBA to review (no database needed).

    MIGRATION_ID is an id such as 0001_core, or just its number (0001); without it, every
    migration is printed in the order it would run. The SQL is written for --schema. It is
    what `migrate` executes, without the bookkeeping: SQL run by hand is not recorded in the
    schema's auth_migrations table, so `migrate` would try to apply it again.
    """
    chosen = _select(load_migrations(state.schema), migration_id)
    if down:
        chosen.reverse()
    direction = "down" if down else "up"
    if state.as_json:
        state.emit_json(
            {
                "schema": state.schema,
                "direction": direction,
                "migrations": [
                    {"id": m.id, "checksum": m.checksum, "sql": (m.down if down else m.up).strip()}
                    for m in chosen
                ],
            }
        )
        return
    for migration in chosen:
        body = (migration.down if down else migration.up).strip()
        click.echo(f"-- {migration.id} ({direction}), from {migration.path.name}")
        click.echo(f"-- sha256 of the file: {migration.checksum}")
        click.echo(f"{body}\n")


@cli.command(short_help="Check latency, pool and migration state.")
@click.pass_obj
def health(state: _Context) -> None:
    """Check round-trip latency, pool figures and migration state.

    Exits 0 when the status is ok, 4 when migrations are pending, 1 on any other error
    status, and 3 when the database cannot be reached.
    """
    with state.storage() as storage:
        result = storage.health_check()
    if state.as_json:
        state.emit_json(
            {
                "status": result.status,
                "latency_ms": result.latency_ms,
                "pool": dict(result.pool),
                "applied_migrations": result.applied_migrations,
                "pending_migrations": result.pending_migrations,
                "error": result.error,
            }
        )
    else:
        table = Table(title=f"health of schema {state.schema}", title_justify="left")
        table.add_column("check", no_wrap=True)
        table.add_column("value")
        colour = "green" if result.status == "ok" else "red"
        table.add_row("status", f"[{colour}]{result.status}[/]")
        table.add_row("latency", f"{result.latency_ms:.2f} ms")
        for name, value in sorted(result.pool.items()):
            table.add_row(f"pool {name}", str(value))
        table.add_row("applied migrations", ", ".join(result.applied_migrations) or "none")
        table.add_row("pending migrations", ", ".join(result.pending_migrations) or "none")
        if result.error:
            table.add_row("error", state.redact(result.error))
        state.out.print(table)
    if result.status != "ok":
        pending = bool(result.pending_migrations)
        hint = " — run `kitium-pg migrate`" if pending else ""
        error = state.redact(result.error or "unknown")
        click.echo(f"error: health check failed: {error}{hint}", err=True)
        raise click.exceptions.Exit(EXIT_MIGRATION if pending else EXIT_FAILED)


@cli.command(short_help="Walk through every domain, print a report.")
@click.pass_obj
def demo(state: _Context) -> None:
    """Apply migrations, then walk through every domain and print what happened.

    Creates demo users, sessions, API keys, an organization, tokens and events with unique
    emails, so it can run again on the same database. Human-readable only (no --json).
    """
    if state.as_json:
        raise click.UsageError("demo prints a human-readable report only; drop --json")
    from .demo import run

    with state.storage() as storage:
        applied = storage.migrate(progress=state.progress("applying"))
        if applied:
            state.out.print(f"applied {len(applied)}: {', '.join(applied)}", markup=False)
        run(storage, state.out)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kitium-pg`` script."""
    try:
        cli.main(args=argv, prog_name="kitium-pg")
    except Exception as exc:  # a bug: still one line, never a traceback
        message = " ".join(redact_dsn(str(exc)).split())
        click.echo(
            f"error: unexpected {type(exc).__name__}: {message} — this is a bug in kitium-pg"
            " (set KITIUM_PG_TRACEBACK=1 to see where)",
            err=True,
        )
        if os.environ.get("KITIUM_PG_TRACEBACK"):
            raise
        sys.exit(EXIT_FAILED)

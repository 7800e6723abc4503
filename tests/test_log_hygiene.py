"""Log hygiene: no secret, token, hash or DSN password ever reaches a log record.

``tests/fix_secrets.py`` captures the ``kitium_pg``, ``psycopg`` and ``psycopg.pool`` loggers at
DEBUG for the whole test session and checks every record against the secrets tests register when
the session ends. The test here exercises the paths most likely to leak (constraint violations,
missing rows, retries after a killed connection, statement timeouts, unreachable primaries and
replicas, encryption-key errors, key rotation) with registered secrets as arguments, then runs
the same check on everything captured so far.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.conninfo
import pytest
from psycopg.conninfo import make_conninfo

from kitium_pg import (
    AsyncPostgresStorageAdapter,
    ConflictError,
    EncryptionKeyError,
    KitiumPgError,
    NotFoundError,
    PostgresStorageAdapter,
    QueryTimeoutError,
    UnavailableError,
    ValidationError,
)
from kitium_pg._base import redact_dsn
from kitium_pg.encryption import generate_key
from kitium_pg.errors import scrubbed
from kitium_pg.metrics import CompositeObserver
from tests.conftest import AwaitableSync

from .fix_secrets import REGISTRY, LogCollector, SecretRegistry, register, session_collector

FUTURE = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)


def _secret(stem: str) -> str:
    value = f"{stem}-{secrets.token_hex(12)}"
    register(value, label=stem)
    return value


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A private schema (the test locks its tables)."""
    name = f"hygiene_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'.encode())


@asynccontextmanager
async def _adapter(kind: str, dsn: str, **options: Any) -> AsyncIterator[Any]:
    """A connected adapter of ``kind``, as an awaitable proxy for the sync one."""
    if kind == "sync":
        with PostgresStorageAdapter(dsn, **options) as sync_adapter:
            yield AwaitableSync(sync_adapter)
    else:
        async with AsyncPostgresStorageAdapter(dsn, **options) as async_adapter:
            yield async_adapter


def _terminate(dsn: str, application_name: str) -> int:
    """Kill the server side of every connection of ``application_name``; returns how many."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return len(rows)


def _texts() -> list[str]:
    return list(session_collector().texts)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_failures_and_retries_at_debug_log_no_secret(
    kind: str, dsn: str, schema: str
) -> None:
    password = _secret("dsn-password")
    app = f"hygiene-{uuid.uuid4().hex[:8]}"
    secret_dsn = make_conninfo(dsn, password=password, application_name=app)
    old_key, new_key = generate_key(), generate_key()
    register(old_key, new_key, label="local encryption key")
    password_hash = _secret("$argon2id$v=19$m=65536,t=3,p=4$hash")
    email = f"hygiene-{uuid.uuid4().hex[:8]}@example.com"
    options: dict[str, Any] = {
        "schema": schema,
        "max_size": 1,
        "application_name": app,
        "max_retries": 3,
    }
    async with _adapter(kind, secret_dsn, encryption_keys={"old": old_key}, **options) as old:
        # Writes that carry every kind of secret.
        user = await old.create_user(email=email, password_hash=password_hash)
        await old.link_oauth_account(
            user.id,
            "github",
            sub="gh-hygiene",
            access_token=_secret("gho_access"),
            refresh_token=_secret("ghr_refresh"),
            token_expires_at=FUTURE,
        )
        provider = await old.create_sso_provider(
            type="oidc",
            name="idp",
            client_secret=_secret("sso-client-secret"),
            signing_key=_secret("-----BEGIN PRIVATE KEY-----signing"),
        )
        device = await old.create_two_factor_device(
            user_id=user.id, method="totp", secret=_secret("JBSWY3DPEHPK3PXP")
        )
    keys = {"old": old_key, "new": new_key}
    async with _adapter(kind, secret_dsn, encryption_keys=keys, **options) as storage:
        # Key rotation (decrypts and re-encrypts every secret).
        assert await storage.rotate_keys(batch_size=1, progress=lambda done, total: None) == 4
        issued = await storage.issue_session_token(user_id=user.id, expires_at=FUTURE)
        register(issued.token, issued.token.partition(".")[2], label="session token")
        key = await storage.issue_api_key(user.id, ["read"])
        register(key.key, hashlib.sha256(key.key.encode()).hexdigest(), label="api key")
        assert await storage.validate_session_token(issued.token) is not None
        assert await storage.validate_session_token(issued.token[:-2]) is None
        assert await storage.verify_api_key(key.key) is not None
        codes = [_secret("backup-code") for _ in range(3)]
        digests = [hashlib.sha256(code.encode()).hexdigest() for code in codes]
        register(*digests, label="backup code digest")
        await storage.create_backup_codes(user.id, digests)
        assert await storage.consume_backup_code(user.id, digests[0]) is not None
        email_code_hash = hashlib.sha256(_secret("email-code").encode()).hexdigest()
        register(email_code_hash, label="email code digest")
        token = await storage.create_email_verification_token(
            email=email, code_hash=email_code_hash, type="email_verification", expires_at=FUTURE
        )
        await storage.mark_email_verification_token_as_used(token.id)

        # Failures the database reports (each is logged, at INFO or WARNING, with its SQLSTATE).
        with pytest.raises(ConflictError):
            await storage.create_user(email=email.upper(), password_hash=password_hash)
        with pytest.raises(ConflictError):
            await storage.mark_email_verification_token_as_used(token.id)
        with pytest.raises(NotFoundError):
            await storage.issue_session_token(user_id=uuid.uuid4(), expires_at=FUTURE)
        with pytest.raises(NotFoundError):
            await storage.create_api_key(
                principal_id=uuid.uuid4(), hash=key.record.hash[::-1], prefix="x", last_four="abcd"
            )
        with pytest.raises(ConflictError):
            await storage.create_api_key(
                principal_id=user.id, hash=key.record.hash, prefix="x", last_four="abcd"
            )
        with pytest.raises(ValidationError):
            await storage.set_password_hash(user.id, password_hash + "\x00")

        # A killed connection: the retry-safe call fails once, then succeeds on a new one.
        assert _terminate(dsn, app) >= 1
        assert await storage.get_password_hash(user.id) == password_hash
        assert _terminate(dsn, app) >= 1
        await storage.set_password_hash(user.id, password_hash)

        # A statement timeout while another transaction holds the table.
        with psycopg.connect(dsn) as locker:
            locker.execute(f'LOCK TABLE "{schema}".users IN ACCESS EXCLUSIVE MODE'.encode())
            with pytest.raises(QueryTimeoutError):
                await storage.with_statement_timeout(200).set_password_hash(user.id, password_hash)
            locker.rollback()

        health = await storage.health_check()
        assert health.status == "ok"

    # Encryption-key failures: no key to write with, a key that does not match.
    async with _adapter(
        kind, secret_dsn, encryption_keys={"other": generate_key()}, **options
    ) as s:
        with pytest.raises(EncryptionKeyError):
            await s.get_oauth_tokens(user.id, "github")
        with pytest.raises(EncryptionKeyError):
            await s.get_sso_provider(provider.id)
        with pytest.raises(EncryptionKeyError):
            await s.get_two_factor_device(device.id)

    # Unreachable replica (with a password in its DSN): reads fall back to the primary.
    replica = f"postgresql://kitium:{_secret('replica-password')}@127.0.0.1:1/kitium"
    async with _adapter(kind, secret_dsn, replica_dsn=replica, **options) as with_replica:
        assert await with_replica.get_password_hash(user.id) == password_hash
        assert await with_replica.get_user(user.id) == await with_replica.get_user(
            user.id, consistency="primary"
        )

    # An unreachable primary with a password in its DSN.
    unreachable = f"postgresql://kitium:{_secret('unreachable-password')}@127.0.0.1:1/kitium"
    if kind == "sync":
        sync_adapter = PostgresStorageAdapter(
            unreachable, connect_timeout=1, pool_timeout=1, min_size=1
        )
        with pytest.raises(UnavailableError) as caught:
            sync_adapter.connect()
        sync_adapter.disconnect()
    else:
        async_adapter = AsyncPostgresStorageAdapter(
            unreachable, connect_timeout=1, pool_timeout=1, min_size=1
        )
        with pytest.raises(UnavailableError) as caught:
            await async_adapter.connect()
        await async_adapter.disconnect()
    assert not REGISTRY.found_in(str(caught.value))

    # What was exercised is in the capture...
    texts = _texts()
    assert any("failed (unique_violation" in t for t in texts)
    assert any("failed (foreign_key_violation" in t for t in texts)
    assert any("failed (statement_timeout" in t for t in texts)
    assert any("@replica0 failed" in t for t in texts)
    retried = [t for t in texts if "get_password_hash ok" in t and "'attempt': 2" in t]
    assert retried, "the call after the killed connection was not retried"
    assert any(t.startswith("DEBUG psycopg connection attempt") for t in texts)
    assert any(" psycopg.pool " in t for t in texts)
    # ...and no registered secret appears in any record captured this session so far.
    leaks = session_collector().leaks(REGISTRY)
    assert not leaks, [(name, labels) for name, labels, _ in leaks]


def test_the_capture_would_catch_a_leak() -> None:
    """The check itself works: a secret logged in a message, in ``extra`` fields, in an
    argument or in a traceback is found, in plain text or encoded."""
    registry = SecretRegistry()
    registry.add("planted-secret-0123456789", label="planted")
    registry.add("short", label="ignored")  # too short to search for
    collector = LogCollector()
    logger = logging.getLogger("tests.hygiene.planted")
    logger.propagate = False
    logger.addHandler(collector)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("nothing to see")
        assert collector.leaks(registry) == []
        logger.debug("value %s", "planted-secret-0123456789")
        logger.info("clean", extra={"params": {"token": b"planted-secret-0123456789".hex()}})
        try:
            raise RuntimeError("planted-secret-0123456789")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(collector)
    leaks = collector.leaks(registry)
    assert len(leaks) == 3 and all(labels == ["planted"] for _, labels, _ in leaks)


def test_the_session_capture_is_active_at_debug() -> None:
    collector = session_collector()
    for name in ("kitium_pg", "psycopg", "psycopg.pool"):
        logger = logging.getLogger(name)
        assert collector in logger.handlers
        assert logger.isEnabledFor(logging.DEBUG)
    assert len(REGISTRY) > 0  # at least the encryption keys of the run


DSN_FORMS = [
    "postgresql://kitium:{pw}@127.0.0.1:1/kitium",
    "postgresql://127.0.0.1:1/kitium?user=kitium&password={pw}",
    "host=127.0.0.1 port=1 user=kitium password={pw}",
    "host=127.0.0.1 port=1 user=kitium password='{pw}'",
    "host=127.0.0.1 port=1 user=kitium password='{pw} with spaces'",
    "host=127.0.0.1 port=1 user=kitium password = '{pw} with spaces' dbname=kitium",
]


def _failed_connect(dsn: str) -> tuple[PostgresStorageAdapter, UnavailableError]:
    """An adapter for ``dsn`` (a server that refuses it) and the error its connect() raised."""
    adapter = PostgresStorageAdapter(dsn, connect_timeout=1, pool_timeout=1, min_size=1)
    try:
        with pytest.raises(UnavailableError) as caught:
            adapter.connect()
    finally:
        adapter.disconnect()
    return adapter, caught.value


@pytest.mark.parametrize("form", DSN_FORMS)
def test_a_dsn_password_is_never_shown(form: str) -> None:
    """The adapter's repr and its connection error (both end up in application logs) never
    show any part of the DSN's password, whatever the DSN syntax libpq accepts."""
    password = f"pw-{secrets.token_hex(8)}"
    dsn = form.format(pw=password)
    register(password, label="dsn password")
    adapter, error = _failed_connect(dsn)
    shown = f"{adapter!r} {error}"
    assert password not in shown
    assert "with spaces" not in shown, shown


# Malformed DSNs: libpq reads an unquoted password only up to its first space, then complains
# about the rest ("missing "=" after "<rest>""), quoting it; a URI password with an unencoded
# "@" leaves its second half in the host name. {a} and {b} are the two halves of a password.
MALFORMED_DSN_FORMS = [
    "host=127.0.0.1 port=1 user=kitium password={a} {b}",
    "host=127.0.0.1 port=1 user=kitium password={a} {b} dbname=kitium",
    "host=127.0.0.1 port=1 user=kitium password={a} x{b}=y{b} dbname=kitium",
    "host=127.0.0.1 port=1 user=kitium password={a}={b} dbname=kitium",
    "host=127.0.0.1 port=1 user=kitium password='{a} {b}",
    "host=127.0.0.1 port=1 user=kitium password={a}&{b} dbname=kitium",
    "postgresql://kitium:{a} {b}@127.0.0.1:1/kitium",
    "postgresql://kitium:{a}@{b}@127.0.0.1:1/kitium",
    "postgresql://kitium:{a}%zz{b}@127.0.0.1:1/kitium",
    "postgresql://127.0.0.1:1/kitium?user=kitium&password={a} {b}",
    "postgresql://127.0.0.1:1/kitium?user=kitium&password={a}={b}",
]


def _halves() -> tuple[str, str]:
    a, b = f"pw-{secrets.token_hex(6)}", f"TOP{secrets.token_hex(6)}"
    register(a, b, label="half of a malformed DSN's password")
    return a, b


@pytest.mark.parametrize("form", MALFORMED_DSN_FORMS)
def test_no_part_of_a_malformed_dsn_password_is_shown(
    form: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed DSN (an unquoted password with a space, an unencoded "@" in a URI
    password...): one libpq cannot parse is refused by the constructor (``ValidationError``
    naming ``dsn``, at once), one it parses fails to connect with ``UnavailableError``. Neither
    error (message, repr, the exceptions it chains to), nor the adapter's repr, nor any log
    line (the adapter's, psycopg's, psycopg-pool's) shows any part of the password."""
    caplog.set_level(logging.DEBUG)
    for name in ("psycopg", "psycopg.pool"):
        caplog.set_level(logging.DEBUG, logger=name)
    a, b = _halves()
    dsn = form.format(a=a, b=b)
    shown: list[str] = []
    if not _parses(dsn):
        with pytest.raises(ValidationError) as refused:
            PostgresStorageAdapter(dsn)
        assert refused.value.field == "dsn"
        error: BaseException = refused.value
    else:
        adapter, error = _failed_connect(dsn)
        shown.append(repr(adapter))
        assert "127.0.0.1" in f"{adapter!r} {error}"  # the DSN is still recognisable
    shown += [str(error), repr(error)]
    cause = error.__cause__ or error.__context__
    while cause is not None:
        shown += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    shown.append(caplog.text)
    for part in (a, b):
        assert not [text for text in shown if part in text], part


def _parses(dsn: str) -> bool:
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return False
    return True


@pytest.mark.parametrize("form", [*MALFORMED_DSN_FORMS, *DSN_FORMS])
def test_redact_dsn_hides_the_whole_password_of_any_dsn(form: str) -> None:
    """``redact_dsn`` on the DSN itself, on libpq's error about it, and on a message built
    from both (then redacted again, as the CLI does): no part of the password is left, and
    the rest of the DSN and of the message still is."""
    a, b = f"pw-{secrets.token_hex(6)}", f"TOP{secrets.token_hex(6)}"
    dsn = form.format(a=a, b=b, pw=a)
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
        libpq = "connection refused"
    except psycopg.ProgrammingError as exc:
        libpq = str(exc).strip()
    display = redact_dsn(dsn)
    message = f"cannot connect to {display}: {redact_dsn(libpq)}"
    for text in (display, message, redact_dsn(message)):
        assert a not in text and b not in text, text
    assert "127.0.0.1" in display and "***" in display
    assert redact_dsn(message) == message  # a second pass takes nothing more away
    assert message.endswith(redact_dsn(libpq))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host=h password=secret dbname=d", "host=h password=*** dbname=d"),
        ("host=h password=two words dbname=d", "host=h password=*** dbname=d"),
        ("host=h password=two words", "host=h password=***"),
        ("password = 'a b\\' c' user=u", "password = *** user=u"),
        ("host=h password=a&b user=u", "host=h password=*** user=u"),
        ("host=h sslpassword=x user=u", "host=h sslpassword=*** user=u"),
        ("postgresql://u:p@ss@h:5/d", "postgresql://u:***@h:5/d"),
        ("postgresql://u:two words@h/d", "postgresql://u:***@h/d"),
        # An IAM token as password, past the bound of the ordinary form: hidden to the space.
        (f"postgresql://u:{'T' * 5000}@h/d and more", "postgresql://u:*** and more"),
        (
            "postgresql://u@h/d?sslmode=require&password=x&user=v",
            "postgresql://u@h/d?sslmode=require&password=***&user=v",
        ),
        ("postgresql://h:5432/d", "postgresql://h:5432/d"),
        (
            "cannot connect to host=h password=***: refused",
            "cannot connect to host=h password=***: refused",
        ),
        (
            'missing "=" after "half" in connection info string',
            'missing "=" after "…" in connection info string',
        ),
        ('invalid connection option "half"', 'invalid connection option "…"'),
        ("failed to resolve host 'half@h': no", "failed to resolve host '…@h': no"),
        (
            'password authentication failed for user "u"',
            'password authentication failed for user "u"',
        ),
    ],
)
def test_redact_dsn_examples(text: str, expected: str) -> None:
    assert redact_dsn(text) == expected


def _printed(error: BaseException) -> str:
    """What a traceback of ``error`` shows: the whole chain, as ``logger.exception`` prints it."""
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_refused_write_traceback_quotes_no_value(kind: str, dsn: str, schema: str) -> None:
    """The chained cause keeps the server's class and SQLSTATE, not its DETAIL line: a unique
    violation's ``Key (hash)=(…)`` and a check violation's ``Failing row contains (…)``, which
    holds the password hash."""
    digest = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    password_hash = _secret("$argon2id$v=19$refused-row")
    async with _adapter(kind, dsn, schema=schema) as storage:
        user = await storage.create_user(email=f"u-{uuid.uuid4().hex[:8]}@example.com")
        key = {"principal_id": user.id, "hash": digest, "prefix": "live", "last_four": "abcd"}
        await storage.create_api_key(**key)
        with pytest.raises(ConflictError) as duplicate:
            await storage.create_api_key(**key)
        # U+0958 is excluded from composition: NFC doubles its length, past the column's limit.
        with pytest.raises(ValidationError) as too_long:
            await storage.create_user(
                email="\u0958" * 200 + "@example.com", password_hash=password_hash
            )
    cause = duplicate.value.__cause__
    assert isinstance(cause, psycopg.errors.UniqueViolation)
    assert cause.sqlstate == "23505"
    assert "api_keys__hash_key" in str(cause)
    assert digest not in _printed(duplicate.value)
    assert isinstance(too_long.value.__cause__, psycopg.errors.CheckViolation)
    assert password_hash not in _printed(too_long.value)
    for error in (duplicate.value, too_long.value):
        assert error.__context__ is None
        reached = _reachable(error)
        assert digest not in reached and password_hash not in reached


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_translated_error_keeps_no_driver_exception_as_its_context(
    kind: str, dsn: str, schema: str
) -> None:
    """Found in review: raised inside the ``except`` block that caught the driver's exception,
    a translated error also kept that exception itself as ``__context__``, DETAIL line and
    all. The other places that translate: a transaction's start, a migration command."""
    async with _adapter(kind, dsn, schema=schema, max_size=1, pool_timeout=0.2) as storage:
        with pytest.raises(KitiumPgError) as refused:
            await storage.grant_app_role("no_such_role_here")
        async with storage.transaction():
            with pytest.raises(UnavailableError) as busy:
                async with storage.transaction():
                    pass
    for error in (refused.value, busy.value):
        assert error.__context__ is None
        assert error.__cause__ is not None and error.__suppress_context__


def _reachable(error: BaseException) -> str:
    """The text of every exception ``error`` reaches by ``__cause__`` and ``__context__``:
    an error reporter may walk either, whatever ``__suppress_context__`` says."""
    seen: list[BaseException] = []
    stack = [error]
    while stack:
        item = stack.pop()
        if any(item is s for s in seen):
            continue
        seen.append(item)
        stack += [e for e in (item.__cause__, item.__context__) if e is not None]
    return "\n".join(f"{e!s} {e!r}" for e in seen)


async def test_a_data_exception_cause_keeps_only_its_sqlstate(dsn: str) -> None:
    """A class 22 message quotes the input (``invalid input syntax for type uuid: "…"``)."""
    value = _secret("not-a-uuid")
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute("SELECT %s::text::uuid", (value,))
    assert value in str(caught.value)
    cleaned = scrubbed(caught.value)
    assert type(cleaned) is type(caught.value)
    assert cleaned.sqlstate == caught.value.sqlstate == "22P02"
    assert value not in _printed(cleaned)
    assert cleaned.__traceback__ is caught.value.__traceback__


class _BrokenObserver:
    def start(self, operation: str) -> object:
        return None

    def finish(self, token: object, operation: str, duration_s: float, error: object) -> None:
        raise RuntimeError("exporter down")


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("combined", [False, True], ids=["alone", "composite"])
async def test_a_failing_observer_log_quotes_no_value(
    kind: str, combined: bool, dsn: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The observer fails while the call's error (and the application's own exception
    around the call) is being handled: its log has its own traceback, not theirs."""
    digest = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
    around = _secret("application-exception")
    observer = CompositeObserver(_BrokenObserver()) if combined else _BrokenObserver()
    async with _adapter(kind, dsn, schema=schema, observer=observer) as storage:
        user = await storage.create_user(email=f"u-{uuid.uuid4().hex[:8]}@example.com")
        key = {"principal_id": user.id, "hash": digest, "prefix": "live", "last_four": "abcd"}
        await storage.create_api_key(**key)
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        try:
            raise LookupError(around)
        except LookupError:
            with pytest.raises(ConflictError):
                await storage.create_api_key(**key)
    failures = [r for r in caplog.records if "observer" in r.getMessage()]
    assert failures and all(r.exc_info for r in failures)
    assert "exporter down" in caplog.text
    assert digest not in caplog.text
    assert around not in caplog.text


def test_a_scrubbed_error_keeps_a_sqlstate_psycopg_has_no_class_for(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute("DO $$ BEGIN RAISE EXCEPTION 'odd' USING ERRCODE = 'XY123'; END $$")
    assert caught.value.sqlstate == "XY123"
    assert scrubbed(caught.value).sqlstate == "XY123"
    assert str(scrubbed(scrubbed(caught.value))) == "odd"


def test_a_server_error_with_an_empty_message_is_scrubbed_of_its_detail(dsn: str) -> None:
    """A trigger may raise with an empty message and the row in DETAIL: str() of the error then
    starts with the DETAIL line, which the copy must not take for a message."""
    secret = _secret("detail-only")
    raise_it = f"DO $$ BEGIN RAISE EXCEPTION '' USING DETAIL = '{secret}'; END $$"
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
        conn.execute(raise_it.encode())
    assert secret in str(caught.value)
    assert secret not in _printed(scrubbed(caught.value))
    assert str(scrubbed(caught.value)) == "SQLSTATE P0001"


def test_a_refused_input_is_kept_by_no_exception_in_the_chain() -> None:
    """Found in review: a key read from a file with its newline (non-ASCII bytes) was refused
    by a ValidationError raised inside the ``except UnicodeDecodeError`` block, ``from None``:
    that hides the decoding error from a traceback, yet keeps it as ``__context__``, and its
    ``.object`` (printed by its ``repr``) is the whole key. The same for a lone surrogate in a
    text argument or a JSON document, and for a malformed event cursor."""
    from kitium_pg import _validate
    from kitium_pg._async.events import decode_cursor
    from kitium_pg.encryption import Keyring

    key = secrets.token_bytes(31) + "é".encode()
    surrogate = _secret("text") + "\ud800"
    cursor = _secret("cursor").replace("-", "é")
    refusals: list[tuple[Any, str, str]] = [
        (lambda: Keyring({"k1": key}), "encryption_keys", key.hex()),
        (lambda: _validate.text("name", surrogate), "name", surrogate[:20]),
        (lambda: _validate.json_text("metadata", {"note": surrogate}), "metadata", surrogate[:20]),
        (lambda: decode_cursor(cursor), "after", cursor[:20]),
    ]
    for refuse, field, value in refusals:
        with pytest.raises(ValidationError) as refused:
            refuse()
        assert refused.value.field == field
        assert refused.value.__context__ is None
        assert value not in _reachable(refused.value).replace("\\x", "")
    # The key's bytes as repr would print them, for the one refusal that held bytes.
    with pytest.raises(ValidationError) as refused:
        Keyring({"k1": key})
    assert repr(key)[2:-1] not in _reachable(refused.value)


def test_a_dsn_libpq_cannot_parse_is_kept_by_no_exception_in_the_chain() -> None:
    """libpq quotes the part of a connection string it could not parse (``missing "=" after
    "…"``), maybe a password: the CLI's refusal neither shows it nor keeps libpq's error as
    its context."""
    import click

    from kitium_pg.cli import _Context

    password = _secret("pw")
    dsn = f"host=x password=a {password}"
    with pytest.raises(psycopg.ProgrammingError) as libpq:
        psycopg.conninfo.conninfo_to_dict(dsn)
    assert password in str(libpq.value)  # what is at stake
    with pytest.raises(click.BadParameter) as refused:
        _Context(dsn, "kitium_auth", False, 5.0).resolve_dsn()
    assert refused.value.__context__ is None
    assert password not in _reachable(refused.value)


class _LoudKey:
    """A mapping key whose ``str`` and ``repr`` raise: the message must not call them."""

    def __str__(self) -> str:
        raise RuntimeError("str called")

    def __repr__(self) -> str:
        raise RuntimeError("repr called")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_key_or_name_the_caller_passed_is_shown_escaped_and_cut(
    kind: str, dsn: str, schema: str
) -> None:
    """Found in review: ``members=`` and ``permissions=`` quoted unknown keys whole (a 5,000
    character key, or one holding a newline that forges a log line), a key whose ``str``
    raised escaped as RuntimeError, and ``link_oauth_account``'s conflict quoted the provider
    as given. Each is shown as its escaped ``repr``, at most 40 characters (a non-string key by
    its type), as audit events' keys were."""
    long_key, forged = "k" * 5000, "x\nCRITICAL forged"
    async with _adapter(kind, dsn, schema=schema) as storage:
        ada, bob = await storage.create_user(), await storage.create_user()
        org = await storage.create_organization(name="org", plan="team")
        refused = []
        for key in (long_key, forged, _LoudKey()):
            for method, given in (
                ("create_organization", {"plan": "t", "members": [{"user_id": ada.id, key: 1}]}),
                ("create_role", {"org_id": org.id, "permissions": [{"name": "x", key: 1}]}),
            ):
                with pytest.raises(ValidationError) as caught:
                    await getattr(storage, method)(name="n", **given)
                refused.append(caught.value)
        await storage.link_oauth_account(ada.id, forged, sub="same-subject")
        with pytest.raises(ConflictError) as taken:
            await storage.link_oauth_account(bob.id, forged, sub="same-subject")
    for error in [*refused, taken.value]:
        message = str(error)
        assert "\n" not in message and len(message) < 300, message
    assert [e.field for e in refused] == ["members[0]", "permissions[0]"] * 3
    assert "'x\\nCRITICAL forged'" in str(taken.value)
    assert "<_LoudKey>" in str(refused[-1])

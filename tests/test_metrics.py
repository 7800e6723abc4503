"""kitium_pg.metrics: Prometheus counters, histograms and pool gauges, OpenTelemetry spans and
the composite observer, for ok and failing calls on both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg_pool
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from kitium_pg import AsyncPostgresStorageAdapter, ConflictError, PostgresStorageAdapter
from kitium_pg.metrics import CompositeObserver, OpenTelemetryObserver, PrometheusObserver
from kitium_pg.observe import Observer

from .conftest import AwaitableSync

Factory = Callable[[Observer], Any]


@pytest.fixture(params=["sync", "async"])
async def observed(
    request: pytest.FixtureRequest, dsn: str, encryption_keys: dict[str, str]
) -> AsyncIterator[Factory]:
    """``observed(observer)``: a connected adapter of the parametrized kind using ``observer``
    (the sync one behind the awaitable proxy), closed after the test."""
    opened: list[Any] = []

    async def make(observer: Observer) -> Any:
        if request.param == "sync":
            adapter = PostgresStorageAdapter(
                dsn, max_size=2, encryption_keys=encryption_keys, observer=observer
            )
            adapter.connect()
            opened.append(adapter)
            return AwaitableSync(adapter)
        aio = AsyncPostgresStorageAdapter(
            dsn, max_size=2, encryption_keys=encryption_keys, observer=observer
        )
        await aio.connect()
        opened.append(aio)
        return aio

    yield make
    for adapter in opened:
        if isinstance(adapter, AsyncPostgresStorageAdapter):
            await adapter.disconnect()
        else:
            adapter.disconnect()


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_prometheus_counts_ok_and_error_calls(
    observed: Callable[[Observer], Any], email: str
) -> None:
    registry = CollectorRegistry()
    storage = await observed(PrometheusObserver(registry))

    user = await storage.create_user(email=email)
    assert await storage.get_user(user.id) == user
    assert await storage.get_user(uuid.uuid4()) is None
    with pytest.raises(ConflictError) as conflict:
        await storage.create_user(email=email.upper())
    code = conflict.value.code  # the specific code: "unique_violation"
    assert code == "unique_violation"

    assert _sample(registry, "kitium_pg_operations_total", operation="get_user", outcome="ok") == 2
    assert (
        _sample(registry, "kitium_pg_operations_total", operation="create_user", outcome="ok") == 1
    )
    assert (
        _sample(registry, "kitium_pg_operations_total", operation="create_user", outcome=code) == 1
    )
    count = "kitium_pg_operation_duration_seconds_count"
    assert _sample(registry, count, operation="get_user") == 2
    assert _sample(registry, count, operation="create_user") == 2
    total = _sample(registry, "kitium_pg_operation_duration_seconds_sum", operation="get_user")
    assert 0 < total < 60
    # Validation happens before any statement: nothing is observed for it.
    with pytest.raises(ValueError, match="email"):
        await storage.create_user(email="not an email")
    assert _sample(registry, count, operation="create_user") == 2


async def test_prometheus_namespace_and_buckets(
    observed: Callable[[Observer], Any],
) -> None:
    registry = CollectorRegistry()
    storage = await observed(PrometheusObserver(registry, "auth", buckets=(0.5, 60.0)))
    await storage.get_user(uuid.uuid4())
    assert _sample(registry, "auth_operations_total", operation="get_user", outcome="ok") == 1
    bucket = "auth_operation_duration_seconds_bucket"
    assert _sample(registry, bucket, operation="get_user", le="60.0") == 1
    assert _sample(registry, bucket, operation="get_user", le="+Inf") == 1
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusObserver(registry, "auth")


async def test_prometheus_pool_metrics(observed: Callable[[Observer], Any]) -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    storage = await observed(observer)
    adapter = getattr(storage, "adapter", storage)  # the sync adapter behind the proxy
    observer.watch_pool(adapter)
    with pytest.raises(ValueError, match="already watched"):
        observer.watch_pool(adapter)
    observer.watch_pool(adapter, name="second")

    pool = {"pool": "kitium-pg"}
    assert _sample(registry, "kitium_pg_pool_max_size", **pool) == 2
    assert _sample(registry, "kitium_pg_pool_min_size", **pool) == 1
    assert 1 <= _sample(registry, "kitium_pg_pool_size", **pool) <= 2
    assert _sample(registry, "kitium_pg_pool_requests_waiting", **pool) == 0
    before = _sample(registry, "kitium_pg_pool_requests_total", **pool)
    for _ in range(3):
        await storage.get_user(uuid.uuid4())
    assert _sample(registry, "kitium_pg_pool_requests_total", **pool) == before + 3
    # The pool counts usage in whole milliseconds per checkout, and a lookup can take less:
    # hold one connection for 20 ms so the counter must move.
    used = _sample(registry, "kitium_pg_pool_usage_seconds_total", **pool)
    if isinstance(adapter.pool, psycopg_pool.AsyncConnectionPool):
        async with adapter.pool.connection():
            await asyncio.sleep(0.02)
    else:
        await asyncio.to_thread(_hold_a_connection, adapter.pool, 0.02)
    assert _sample(registry, "kitium_pg_pool_usage_seconds_total", **pool) >= used + 0.02
    assert _sample(registry, "kitium_pg_pool_max_size", pool="second") == 2

    observer.unwatch_pool("second")
    assert registry.get_sample_value("kitium_pg_pool_max_size", {"pool": "second"}) is None
    assert _sample(registry, "kitium_pg_pool_max_size", **pool) == 2


def _hold_a_connection(pool: psycopg_pool.ConnectionPool[Any], seconds: float) -> None:
    with pool.connection():
        time.sleep(seconds)


def _tracing() -> tuple[InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


def _spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_opentelemetry_spans(observed: Callable[[Observer], Any], email: str) -> None:
    exporter, provider = _tracing()
    tracer = provider.get_tracer("test")
    storage = await observed(OpenTelemetryObserver(tracer))

    with tracer.start_as_current_span("request") as parent:
        user = await storage.create_user(email=email)
    await storage.get_user(user.id)
    with pytest.raises(ConflictError):
        await storage.create_user(email=email)

    (lookup,) = _spans(exporter, "kitium_pg.get_user")
    assert lookup.kind is SpanKind.CLIENT
    assert dict(lookup.attributes or {}) == {"db.system": "postgresql", "db.operation": "get_user"}
    assert lookup.status.status_code is StatusCode.UNSET
    assert lookup.end_time is not None and lookup.start_time is not None
    assert lookup.end_time >= lookup.start_time

    created, failed = _spans(exporter, "kitium_pg.create_user")
    assert created.parent is not None
    assert created.parent.span_id == parent.get_span_context().span_id
    assert created.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "unique_violation"
    assert dict(failed.attributes or {}) == {
        "db.system": "postgresql",
        "db.operation": "create_user",
        "error.type": "ConflictError",
        "kitium_pg.error_code": "unique_violation",
    }
    assert email not in str(failed.to_json())  # no exception message, no parameters


async def test_opentelemetry_default_tracer_without_sdk(
    observed: Callable[[Observer], Any],
) -> None:
    # The global tracer provider is the API's no-op one here: spans cost little and record
    # nothing, and the adapter works as usual.
    observer = OpenTelemetryObserver()
    storage = await observed(observer)
    assert await storage.get_user(uuid.uuid4()) is None
    token = observer.start("x")
    observer.finish(token, "x", 0.0, None)


async def test_composite_observer(observed: Callable[[Observer], Any], email: str) -> None:
    registry = CollectorRegistry()
    exporter, provider = _tracing()
    composite = CompositeObserver(
        PrometheusObserver(registry), OpenTelemetryObserver(provider.get_tracer("test"))
    )
    storage = await observed(composite)
    await storage.create_user(email=email)
    with pytest.raises(ConflictError):
        await storage.create_user(email=email)
    assert (
        _sample(
            registry,
            "kitium_pg_operations_total",
            operation="create_user",
            outcome="unique_violation",
        )
        == 1
    )
    statuses = [s.status.status_code for s in _spans(exporter, "kitium_pg.create_user")]
    assert statuses == [StatusCode.UNSET, StatusCode.ERROR]


class _Recorder:
    """Records every start and finish, with a fresh token per start."""

    def __init__(self) -> None:
        self.started: list[tuple[str, object]] = []
        self.finished: list[tuple[str, object, str | None]] = []

    def start(self, operation: str) -> object:
        token = object()
        self.started.append((operation, token))
        return token

    def finish(self, token: object, operation: str, duration_s: float, error: object) -> None:
        self.finished.append((operation, token, type(error).__name__ if error else None))


class _BrokenStart:
    def __init__(self) -> None:
        self.finished = 0

    def start(self, operation: str) -> object:
        raise RuntimeError("exporter down")

    def finish(self, token: object, operation: str, duration_s: float, error: object) -> None:
        self.finished += 1  # never called: its start failed


class _BrokenFinish:
    def start(self, operation: str) -> object:
        return None

    def finish(self, token: object, operation: str, duration_s: float, error: object) -> None:
        raise RuntimeError("exporter down")


@pytest.mark.parametrize("broken", [_BrokenStart, _BrokenFinish])
def test_composite_observer_isolates_a_failing_observer(
    broken: type[_BrokenStart | _BrokenFinish], caplog: pytest.LogCaptureFixture
) -> None:
    """A failing observer listed first takes nothing down: the others still get every start
    and every finish, with their own tokens, and the failure is logged (never re-raised)."""
    first, recorder, last = broken(), _Recorder(), _Recorder()
    composite = CompositeObserver(first, recorder, last)
    token = composite.start("get_user")
    composite.finish(token, "get_user", 0.01, None)
    assert [op for op, _ in recorder.started] == ["get_user"]
    assert recorder.finished == [("get_user", recorder.started[0][1], None)]
    assert last.finished == [("get_user", last.started[0][1], None)]
    if isinstance(first, _BrokenStart):
        assert first.finished == 0
    method = "start" if broken is _BrokenStart else "finish"
    assert f"observer {broken.__name__} failed in {method}(get_user)" in caplog.text
    # A token that is not what start() returned (the adapter passes None when start itself
    # failed) finishes nothing and raises nothing.
    composite.finish(None, "get_user", 0.01, None)
    assert len(recorder.finished) == 1


@pytest.mark.parametrize("broken", [_BrokenStart, _BrokenFinish])
async def test_a_failing_observer_in_a_composite_spares_the_others(
    observed: Callable[[Observer], Any],
    email: str,
    broken: type[_BrokenStart | _BrokenFinish],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    exporter, provider = _tracing()
    recorder = _Recorder()
    storage = await observed(
        CompositeObserver(
            broken(),
            recorder,
            PrometheusObserver(registry),
            OpenTelemetryObserver(provider.get_tracer("test")),
        )
    )
    user = await storage.create_user(email=email)
    assert await storage.get_user(user.id) == user
    with pytest.raises(ConflictError):
        await storage.create_user(email=email)
    ours = [(op, token) for op, token, _ in recorder.finished]
    assert ours == recorder.started  # every start got its finish, with its own token
    assert [op for op, _, _ in recorder.finished][-3:] == ["create_user", "get_user", "create_user"]
    assert recorder.finished[-1][2] == "ConflictError"
    assert _sample(registry, "kitium_pg_operations_total", operation="get_user", outcome="ok") == 1
    assert len(_spans(exporter, "kitium_pg.get_user")) == 1  # the span was ended
    assert len(_spans(exporter, "kitium_pg.create_user")) == 2
    assert f"observer {broken.__name__} failed" in caplog.text


async def test_no_observer_is_the_default(dsn: str) -> None:
    adapter = AsyncPostgresStorageAdapter(dsn)
    assert adapter._observer is None


async def test_a_failing_observer_never_fails_the_call(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    from kitium_pg import AsyncPostgresStorageAdapter

    class Broken:
        def start(self, operation: str) -> object:
            raise RuntimeError("exporter down")

        def finish(self, token: object, operation: str, duration_s: float, error: object) -> None:
            raise RuntimeError("exporter down")

    async with AsyncPostgresStorageAdapter(dsn, observer=Broken()) as storage:
        user = await storage.create_user()
        assert await storage.get_user(user.id) == user
    assert "observer failed" in caplog.text


async def test_a_cancelled_call_still_finishes_its_observation(dsn: str) -> None:
    import asyncio

    from kitium_pg import AsyncPostgresStorageAdapter

    seen: list[tuple[str, object]] = []

    class Recorder:
        def start(self, operation: str) -> object:
            return operation

        def finish(self, token: object, operation: str, duration_s: float, error: object) -> None:
            seen.append((operation, type(error).__name__ if error else None))

    async with AsyncPostgresStorageAdapter(dsn, observer=Recorder()) as storage:
        task = asyncio.create_task(storage.get_user("00000000-0000-0000-0000-000000000001"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen[-1] == ("get_user", "CancelledError")


async def test_the_operations_reported_are_those_docs_integrations_metrics_lists(
    observed: Callable[[Observer], Any], email: str
) -> None:
    """The table of docs/integrations/metrics.md: a method whose statements are named otherwise
    reports their names, one per statement (found in review: health_check's
    ``list_invalid_indexes`` and ``issue_session_token(event=…)`` were missing from it)."""
    recorder = _Recorder()
    storage = await observed(recorder)
    user = await storage.create_user(email=email)
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    issued = await storage.issue_session_token(user_id=user.id, expires_at=expires_at)
    calls: dict[str, Callable[[], Any]] = {
        "issue_api_key": lambda: storage.issue_api_key(user.id, ["read"]),
        "issue_session_token": lambda: storage.issue_session_token(
            user_id=user.id, expires_at=expires_at
        ),
        "issue_session_token(event=…)": lambda: storage.issue_session_token(
            user_id=user.id, expires_at=expires_at, event={"type": "login"}
        ),
        "validate_session_token": lambda: storage.validate_session_token(issued.token),
        "create_session(event=…)": lambda: storage.create_session(
            user_id=user.id, expires_at=expires_at, event={"type": "login"}
        ),
        "health_check": storage.health_check,
    }
    reported: dict[str, list[str]] = {}
    for name, call in calls.items():
        recorder.finished.clear()
        await call()
        reported[name] = [operation for operation, _, _ in recorder.finished]
    assert reported == {
        "issue_api_key": ["create_api_key"],
        "issue_session_token": ["create_session"],
        "issue_session_token(event=…)": ["create_session_with_event"],
        "validate_session_token": ["get_session_for_token"],
        "create_session(event=…)": ["create_session_with_event"],
        "health_check": [
            "ping",
            "ledger_exists",
            "list_applied_migrations",
            "list_invalid_indexes",
        ],
    }


async def test_a_call_the_transaction_refuses_is_not_observed(
    observed: Callable[[Observer], Any], email: str
) -> None:
    """Found in the fourth review: after a caught failure inside transaction(), every later
    call on it was refused (no statement of its own ran) and yet counted as its operation
    failing with the first call's code (reads counted as unique violations), and a call after
    the block as a validation failure: metrics and spans showed operations that never ran.
    They are refused before the observer hears of them, as arguments refused by the checks."""
    recorder = _Recorder()
    storage = await observed(recorder)
    user = await storage.create_user(email=email)
    before = len(recorder.finished)
    with pytest.raises(ConflictError):
        async with storage.transaction() as tx:
            with pytest.raises(ConflictError):
                await tx.create_user(email=email.upper())
            for _ in range(3):
                with pytest.raises(ConflictError, match="not run, the transaction is aborted"):
                    await tx.get_user(user.id)
    with pytest.raises(ValueError, match="transaction"):
        await tx.get_user(user.id)
    seen = [(operation, error) for operation, _, error in recorder.finished[before:]]
    assert [s for s in seen if s[0] == "create_user"] == [("create_user", "ConflictError")]
    assert [operation for operation, _ in seen if operation != "create_user"] in (
        [],
        ["set_local_settings"],  # behind PgBouncer the block sets its timeout first
    )
    assert len(recorder.started) == len(recorder.finished)

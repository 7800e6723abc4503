"""Ready-made observers (``kitium_pg.observe.Observer``) for Prometheus and OpenTelemetry.

Install with ``pip install 'kitium-pg[metrics]'`` (prometheus-client and opentelemetry-api; this
module imports them only when an observer is built, so it imports without them)::

    from kitium_pg import AsyncPostgresStorageAdapter
    from kitium_pg.metrics import CompositeObserver, OpenTelemetryObserver, PrometheusObserver

    prometheus = PrometheusObserver()            # metrics in prometheus_client's default registry
    storage = AsyncPostgresStorageAdapter(
        dsn, observer=CompositeObserver(prometheus, OpenTelemetryObserver())
    )
    prometheus.watch_pool(storage)               # pool gauges, read at scrape time

An adapter without an observer pays nothing for this: it tests ``observer is None`` once per
call and does not read the clock (``benchmarks/observer_overhead.py`` measures it).

Prometheus metrics (``namespace`` defaults to ``kitium_pg``):

- ``kitium_pg_operations_total{operation, outcome}``: statements per operation, where the
  operation is the query's name in ``queries/*.sql`` (one adapter method may run several, see
  ``kitium_pg.observe``); ``outcome`` is ``ok``
  or the ``code`` of the error raised (``unique_violation``, ``foreign_key_violation``,
  ``statement_timeout``, ``pool_timeout``, ``connection_lost``…; see ``kitium_pg.errors``).
- ``kitium_pg_operation_duration_seconds{operation}``: latency histogram of each statement,
  its pool wait and automatic retries included.
- with ``watch_pool``, per pool (label ``pool``): gauges ``kitium_pg_pool_size``,
  ``_pool_available``, ``_pool_min_size``, ``_pool_max_size``, ``_pool_requests_waiting`` and
  counters ``_pool_requests_total``, ``_pool_requests_queued_total``,
  ``_pool_requests_errors_total``, ``_pool_requests_wait_seconds_total``,
  ``_pool_usage_seconds_total``, ``_pool_returns_bad_total``, ``_pool_connections_total``,
  ``_pool_connections_seconds_total``, ``_pool_connections_errors_total``,
  ``_pool_connections_lost_total`` (psycopg-pool's ``get_stats()``; the counters restart if
  someone calls the pool's ``pop_stats()``).

OpenTelemetry: one span per statement (operation), named ``kitium_pg.<operation>``, kind
``CLIENT``, with attributes ``db.system="postgresql"`` and ``db.operation=<operation>``; a failed
operation gets status ``ERROR`` (description: the error code) and attributes ``error.type`` (the
exception class) and ``kitium_pg.error_code``. The span is a child of the span current when the
call starts. The exception itself is not recorded: messages may name rows or values.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._base import observe_finish, observe_start
from .errors import KitiumPgError
from .observe import Observer

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["CompositeObserver", "OpenTelemetryObserver", "PrometheusObserver"]

DEFAULT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Latency buckets in seconds: sub-millisecond primary-key lookups up to statement timeouts."""

# psycopg-pool stats: key -> (metric suffix, help, scale); gauges, then monotonic counters.
_POOL_GAUGES: Final[dict[str, tuple[str, str, float]]] = {
    "pool_size": ("pool_size", "Connections open (in use or idle).", 1),
    "pool_available": ("pool_available", "Idle connections ready for use.", 1),
    "pool_min": ("pool_min_size", "Configured minimum pool size.", 1),
    "pool_max": ("pool_max_size", "Configured maximum pool size.", 1),
    "requests_waiting": ("pool_requests_waiting", "Requests waiting for a connection.", 1),
}
_POOL_COUNTERS: Final[dict[str, tuple[str, str, float]]] = {
    "requests_num": ("pool_requests", "Connection requests.", 1),
    "requests_queued": ("pool_requests_queued", "Requests that had to wait in a queue.", 1),
    "requests_errors": ("pool_requests_errors", "Requests that failed (timeout, error).", 1),
    "requests_wait_ms": ("pool_requests_wait_seconds", "Time spent waiting in the queue.", 1e-3),
    "usage_ms": ("pool_usage_seconds", "Time connections were in use by clients.", 1e-3),
    "returns_bad": ("pool_returns_bad", "Connections returned in a bad state.", 1),
    "connections_num": ("pool_connections", "Connection attempts to the server.", 1),
    "connections_ms": ("pool_connections_seconds", "Time spent connecting.", 1e-3),
    "connections_errors": ("pool_connections_errors", "Failed connection attempts.", 1),
    "connections_lost": ("pool_connections_lost", "Connections found broken.", 1),
}


class _HasPool(Protocol):
    # Either adapter: its ``pool`` is a psycopg-pool pool, sync or async.
    @property
    def pool(self) -> Any: ...


def _missing(package: str, extra: str) -> ImportError:
    return ImportError(f"{package} is not installed: pip install 'kitium-pg[{extra}]'")


class PrometheusObserver:
    """Counts every adapter operation and times it, with prometheus-client.

    ``registry`` is a ``prometheus_client.CollectorRegistry`` (``None``: the default
    ``REGISTRY``); ``namespace`` prefixes every metric name; ``buckets`` are the latency
    histogram's upper bounds in seconds. Metric names are listed in the module docstring.
    Registering two observers with the same namespace in one registry raises ``ValueError``
    (prometheus-client refuses duplicate metrics).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "kitium_pg",
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        try:
            import prometheus_client
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise _missing("prometheus-client", "metrics") from exc
        self.registry: CollectorRegistry = (
            prometheus_client.REGISTRY if registry is None else registry
        )
        self.namespace = namespace
        self.operations = prometheus_client.Counter(
            "operations",
            "kitium-pg adapter operations by outcome (ok or the error code).",
            ["operation", "outcome"],
            namespace=namespace,
            registry=self.registry,
        )
        self.duration = prometheus_client.Histogram(
            "operation_duration_seconds",
            "kitium-pg adapter operation latency in seconds, retries included.",
            ["operation"],
            namespace=namespace,
            registry=self.registry,
            buckets=tuple(buckets),
        )
        # Label children cached per key: .labels() takes a lock and builds a tuple each call.
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}
        self._pools: dict[str, _HasPool] = {}
        self._pools_lock = threading.Lock()
        self._collector: _PoolCollector | None = None

    def start(self, operation: str) -> None:
        """Nothing to do before an operation (the adapter measures the duration)."""
        return None

    def finish(
        self, token: object, operation: str, duration_s: float, error: BaseException | None
    ) -> None:
        """Count the operation under its outcome and observe its duration."""
        key = (operation, "ok" if error is None else _code(error))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.operations.labels(*key)
        counter.inc()
        histogram = self._histograms.get(operation)
        if histogram is None:
            histogram = self._histograms[operation] = self.duration.labels(operation)
        histogram.observe(duration_s)

    def watch_pool(self, adapter: _HasPool, *, name: str | None = None) -> None:
        """Export ``adapter.pool.get_stats()`` (sync or async adapter) as the pool metrics,
        labelled ``pool=name`` (default: the pool's name, ``kitium-pg``). The figures are read
        when the registry is scraped, so watching costs nothing between scrapes. Raises
        ``ValueError`` when a pool of that name is already watched (pass ``name=``)."""
        label = name if name is not None else str(getattr(adapter.pool, "name", "kitium-pg"))
        with self._pools_lock:
            if label in self._pools:
                raise ValueError(f"a pool named {label!r} is already watched: pass name=")
            self._pools[label] = adapter
            if self._collector is None:
                self._collector = _PoolCollector(self.namespace, self._pools, self._pools_lock)
                self.registry.register(self._collector)

    def unwatch_pool(self, name: str = "kitium-pg") -> None:
        """Stop exporting the pool watched under ``name`` (no error when there is none)."""
        with self._pools_lock:
            self._pools.pop(name, None)


class _PoolCollector:
    """A prometheus-client custom collector reading psycopg-pool's stats at scrape time."""

    def __init__(self, namespace: str, pools: Mapping[str, _HasPool], lock: threading.Lock):
        self._prefix = f"{namespace}_" if namespace else ""
        self._pools = pools
        self._lock = lock

    def describe(self) -> Iterable[Metric]:
        # Names only (no samples): lets the registry check for duplicates without a scrape.
        return list(self._families({}))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            stats = {label: dict(a.pool.get_stats()) for label, a in self._pools.items()}
        return list(self._families(stats))

    def _families(self, stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for key, (suffix, doc, scale) in _POOL_GAUGES.items():
            gauge = GaugeMetricFamily(self._prefix + suffix, doc, labels=["pool"])
            for label, values in stats.items():
                gauge.add_metric([label], values.get(key, 0) * scale)
            yield gauge
        for key, (suffix, doc, scale) in _POOL_COUNTERS.items():
            counter = CounterMetricFamily(self._prefix + suffix, doc, labels=["pool"])
            for label, values in stats.items():
                counter.add_metric([label], values.get(key, 0) * scale)
            yield counter


class OpenTelemetryObserver:
    """One OpenTelemetry span per adapter operation (see the module docstring for its name
    and attributes).

    ``tracer`` defaults to ``opentelemetry.trace.get_tracer("kitium_pg")``, which follows the
    globally configured tracer provider (spans are no-ops until an SDK is configured). Needs
    opentelemetry-api (``ImportError`` otherwise).
    """

    def __init__(self, tracer: Tracer | None = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise _missing("opentelemetry-api", "metrics") from exc
        from . import __version__

        self.tracer: Tracer = (
            tracer if tracer is not None else trace.get_tracer("kitium_pg", __version__)
        )
        self._client = trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status

    def start(self, operation: str) -> Span:
        """Start the operation's span (a child of the current span, not made current)."""
        return self.tracer.start_span(
            f"kitium_pg.{operation}",
            kind=self._client,
            attributes={"db.system": "postgresql", "db.operation": operation},
        )

    def finish(
        self, token: object, operation: str, duration_s: float, error: BaseException | None
    ) -> None:
        """Mark the span failed when ``error`` is set, and end it."""
        span: Span = token  # type: ignore[assignment]
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_attribute("kitium_pg.error_code", _code(error))
            span.set_status(self._status(self._error, _code(error)))
        span.end()


class CompositeObserver:
    """Fans each call out to several observers, in order: ``start`` returns the tuple of their
    tokens and ``finish`` hands each observer its own.

    Each observer is isolated from the others: an exception raised by one observer's ``start``
    or ``finish`` is logged on the ``kitium_pg`` logger (the observer's class and the operation
    name, never the call's parameters) and the other observers still get theirs. An observer
    whose ``start`` raised is not given a ``finish`` for that call.
    """

    def __init__(self, *observers: Observer) -> None:
        self.observers: tuple[Observer, ...] = observers

    def start(self, operation: str) -> tuple[object, ...]:
        """``start`` of every observer (``_FAILED`` in place of the token of one that raised)."""
        return tuple(
            observe_start(observer, operation, failed=_FAILED, who=_who(observer))
            for observer in self.observers
        )

    def finish(
        self, token: object, operation: str, duration_s: float, error: BaseException | None
    ) -> None:
        """``finish`` of every observer whose ``start`` succeeded, with the token it returned.
        A ``token`` that is not what ``start`` returned (the adapter passes ``None`` when
        ``start`` itself failed) finishes nothing: no observer's start is known to have run."""
        if not isinstance(token, tuple) or len(token) != len(self.observers):
            return
        for observer, own in zip(self.observers, token, strict=True):
            if own is not _FAILED:
                observe_finish(observer, own, operation, duration_s, error, who=_who(observer))


# The token CompositeObserver keeps for an observer whose start() raised.
_FAILED: Final = object()


def _who(observer: Observer) -> str:
    # How a failing observer is named in the log (the adapter's own is just "observer").
    return f"observer {type(observer).__name__}"


def _code(error: BaseException) -> str:
    """The outcome label of a failed call: the error's code, or ``cancelled`` when the call
    was interrupted (task cancellation, KeyboardInterrupt)."""
    return error.code if isinstance(error, KitiumPgError) else "cancelled"

"""What an observer costs per call: ``get_user`` with ``observer=None``, with a no-op observer
and with ``PrometheusObserver`` (plus ``OpenTelemetryObserver`` on the API's no-op tracer).

    python benchmarks/observer_overhead.py [--dsn DSN] [--rounds 30] [--calls 200] [--async]

Each variant has its own adapter (pool of one connection) on the same database. The variants
run interleaved: every round runs ``--calls`` calls of each, in a rotating order, so drift
(caches, CPU frequency, other load) hits them alike. Printed: the median over rounds of the
mean time per call, and its ratio to ``observer=None``. Without ``--dsn`` / ``DATABASE_URL`` an
embedded PostgreSQL is started in a temporary folder. Timings depend on the machine: nothing
asserts on them; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter
from kitium_pg.errors import KitiumPgError
from kitium_pg.metrics import OpenTelemetryObserver, PrometheusObserver


class NoopObserver:
    """An observer that does nothing: the cost of the hook itself (clock reads, two calls)."""

    def start(self, operation: str) -> None:
        return None

    def finish(
        self, token: object, operation: str, duration_s: float, error: KitiumPgError | None
    ) -> None:
        return None


def _observers() -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    return {
        "observer=None": None,
        "no-op observer": NoopObserver(),
        "PrometheusObserver": PrometheusObserver(CollectorRegistry()),
        "OpenTelemetryObserver (no SDK)": OpenTelemetryObserver(),
    }


def _report(samples: dict[str, list[float]], calls: int) -> None:
    base = statistics.median(samples["observer=None"])
    print(f"get_user, {calls} calls per round, {len(samples['observer=None'])} rounds")
    print(f"{'variant':32} {'µs/call (median)':>17} {'ratio':>7}")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:32} {median * 1e6:17.1f} {median / base:7.3f}")


def run_sync(dsn: str, rounds: int, calls: int) -> dict[str, list[float]]:
    adapters = {
        name: PostgresStorageAdapter(dsn, min_size=1, max_size=1, observer=observer)
        for name, observer in _observers().items()
    }
    for adapter in adapters.values():
        adapter.connect()
    try:
        first = next(iter(adapters.values()))
        user = first.create_user(email=f"bench-{uuid.uuid4().hex[:12]}@example.com")
        samples: dict[str, list[float]] = {name: [] for name in adapters}
        names = list(adapters)
        for name in names:  # warm-up: prepared statements, pool connection
            for _ in range(calls):
                adapters[name].get_user(user.id)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                get_user: Callable[..., Any] = adapters[name].get_user
                started = time.perf_counter()
                for _ in range(calls):
                    get_user(user.id)
                samples[name].append((time.perf_counter() - started) / calls)
        first.delete_user(user.id)
        return samples
    finally:
        for adapter in adapters.values():
            adapter.disconnect()


async def run_async(dsn: str, rounds: int, calls: int) -> dict[str, list[float]]:
    adapters = {
        name: AsyncPostgresStorageAdapter(dsn, min_size=1, max_size=1, observer=observer)
        for name, observer in _observers().items()
    }
    for adapter in adapters.values():
        await adapter.connect()
    try:
        first = next(iter(adapters.values()))
        user = await first.create_user(email=f"bench-{uuid.uuid4().hex[:12]}@example.com")
        samples: dict[str, list[float]] = {name: [] for name in adapters}
        names = list(adapters)
        for name in names:
            for _ in range(calls):
                await adapters[name].get_user(user.id)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                get_user = adapters[name].get_user
                started = time.perf_counter()
                for _ in range(calls):
                    await get_user(user.id)
                samples[name].append((time.perf_counter() - started) / calls)
        await first.delete_user(user.id)
        return samples
    finally:
        for adapter in adapters.values():
            await adapter.disconnect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--async", dest="use_async", action="store_true", help="async adapter")
    args = parser.parse_args()
    server = None
    dsn = args.dsn
    if not dsn:
        from kitium_pg.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(os.path.join(tempfile.mkdtemp(prefix="kitium-bench-"), "data"))
        dsn = server.start()
    try:
        if args.use_async:
            samples = asyncio.run(run_async(dsn, args.rounds, args.calls))
        else:
            samples = run_sync(dsn, args.rounds, args.calls)
        print("adapter:", "async" if args.use_async else "sync")
        _report(samples, args.calls)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()

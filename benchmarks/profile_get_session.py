"""Where the microseconds of ``get_session`` go, sync and async.

Measures, interleaved like ``run.py``, the full call next to its pieces: pool checkout and
return, the query on a held connection the way the adapter runs it (reused tuple cursor,
automatic prepare, record built by the adapter's row binder) and the raw floor (tuple rows,
``prepare=True``), cursor creation, building the ``Session`` record, argument validation and
the per-call log line. The adapter's own work (a stub cursor in place of psycopg and the
server) is measured twice: back to back, and right after a real query, where it runs with the
caches a real call leaves. Then the async adapter next to psycopg's async floor and raw asyncpg
(when installed), with its own work measured without a server. Then runs the sync call under
cProfile and prints the functions with the most own time. Optional: ``--py-spy PATH``
samples it with py-spy (needs the py-spy binary).

    python benchmarks/profile_get_session.py [--dsn DSN] [--rows 10000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib.util
import io
import os
import pstats
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg.rows import dict_row

from benchmarks import cpus, log, seed
from benchmarks.run import Candidate, measure
from benchmarks.variants import RawAsyncpg, connection_kwargs
from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter, Session, _sql
from kitium_pg import _validate as v
from kitium_pg._async import core as async_core
from kitium_pg._base import log_call
from kitium_pg._sync import core as sync_core


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/profile_get_session.py",
        description="Break the cost of get_session into its parts, sync and async (interleaved"
        " ablation, then cProfile). Starts an embedded PostgreSQL unless --dsn is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dsn", help="PostgreSQL to use (a fresh schema is created and dropped)")
    parser.add_argument("--rows", type=int, default=10_000, help="users and sessions to seed")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=300, help="calls per piece per round")
    parser.add_argument("--profile-calls", type=int, default=5000, help="calls under cProfile")
    parser.add_argument(
        "--cpu-layout",
        choices=cpus.LAYOUTS,
        default="split",
        help="where the client and the server run while the pieces are timed (see"
        " benchmarks/cpus.py); a --dsn server that is not a local process is left unpinned",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="also record py-spy collapsed stacks to this path and print the top frames",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with (
        seed.scratch(args.dsn, "kitium_prof", args.rows, 7) as (dsn, schema, data),
        asyncio.Runner() as runner,
    ):
        _profile(args, runner, dsn, schema, data)
    return 0


def _profile(
    args: argparse.Namespace,
    runner: asyncio.Runner,
    dsn: str,
    schema: str,
    data: seed.Dataset,
) -> None:
    rng = random.Random(3)
    ids = data.session_ids
    sql = _sql.queries(schema)["get_session"].sql

    def some_ids(n: int) -> list[Any]:
        return [ids[rng.randrange(len(ids))] for _ in range(n)]

    storage = PostgresStorageAdapter(dsn, schema=schema)
    storage.connect(migrate=False)
    held = psycopg.connect(dsn, **connection_kwargs())
    reused_auto = held.cursor()
    reused_tuples = held.cursor()
    sample = held.cursor(row_factory=dict_row).execute(sql, {"id": ids[0]}).fetchone()
    assert sample is not None
    # The adapter's row binder for this query (cached: the same function the adapter calls).
    bind_row = _sql.binder(
        _sql.queries(schema)["get_session"], reused_auto.execute(sql, {"id": ids[0]})
    )

    def bind(row: Any) -> Session:
        return bind_row(Session, row)

    reused_auto.fetchall()
    pool = storage.pool

    def full(x: Any) -> Any:
        return storage.get_session(x)

    # L: a second adapter whose one pooled connection's reusable cursor is replaced by a stub
    # that returns a stored row without touching the server: everything the adapter does per
    # call (validation, dispatch, pool checkout and return, record) and nothing psycopg does.
    stubbed = PostgresStorageAdapter(dsn, schema=schema, min_size=1, max_size=1)
    stubbed.connect(migrate=False)
    stubbed.get_session(ids[0])
    stub_conn = stubbed.pool.getconn()
    stubbed.pool.putconn(stub_conn)
    real_cursor = getattr(stub_conn, sync_core.REUSED_CURSOR)
    stored_row = real_cursor.execute(sql, {"id": ids[0]}).fetchone()
    setattr(stub_conn, sync_core.REUSED_CURSOR, cast(Any, _StubCursor(real_cursor, stored_row)))

    def adapter_only(x: Any) -> Any:
        return stubbed.get_session(x)

    def checkout(x: Any) -> Any:
        conn = pool.getconn()
        pool.putconn(conn)
        return True

    def checkout_cm(x: Any) -> Any:
        with pool.connection():
            return True

    def reused_cursor_auto(x: Any) -> Any:
        reused_auto.execute(sql, {"id": x})
        return reused_auto.fetchone()

    def reused_cursor_records(x: Any) -> Any:
        reused_auto.execute(sql, {"id": x})
        row = reused_auto.fetchone()
        return None if row is None else bind(row)

    def reused_cursor_tuples(x: Any) -> Any:
        reused_tuples.execute(sql, {"id": x}, prepare=True)
        return reused_tuples.fetchone()

    pooled_cursors: dict[Any, Any] = {}

    def inline_path(x: Any) -> Any:
        conn = pool.getconn()
        try:
            cur = pooled_cursors.get(conn)
            if cur is None:
                cur = pooled_cursors[conn] = conn.cursor()
            cur.execute(sql, {"id": x})
            row = cur.fetchone()
            return None if row is None else bind(row)
        finally:
            pool.putconn(conn)

    def cursor_only(x: Any) -> Any:
        with held.cursor():
            return True

    sample_row = tuple(sample.values())

    def record_only(x: Any) -> Any:
        return bind(sample_row)

    def validation_only(x: Any) -> Any:
        return v.parse_uuid(x)

    def log_only(x: Any) -> Any:
        log_call("get_session", time.perf_counter(), 1)
        return True

    def after_floor(piece: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``piece`` right after one real floor query, so that it runs with the caches the
        way a real call leaves them; the pair is timed and F subtracted."""

        def run(x: Any) -> Any:
            reused_tuples_after.execute(sql, {"id": x}, prepare=True)
            reused_tuples_after.fetchone()
            return piece(x)

        return run

    reused_tuples_after = held.cursor()
    pieces: list[tuple[str, Callable[[Any], Any]]] = [
        ("A full storage.get_session(id)", full),
        ("B pool getconn + putconn (no query)", checkout),
        ("C pool.connection() enter + exit (no query)", checkout_cm),
        ("D held conn, REUSED cursor, tuple rows, automatic prepare", reused_cursor_auto),
        ("E D + Session record (the adapter's row binder)", reused_cursor_records),
        ("F held conn, REUSED cursor, tuple rows, prepare=True (floor)", reused_cursor_tuples),
        ("G cursor create + close (no query; the adapter reuses one)", cursor_only),
        ("K B + E inline: the adapter's path without its dispatch", inline_path),
        ("L the adapter's own work: A with a stub cursor (no psycopg, no server)", adapter_only),
        ("H Session record from a stored row by the binder (attrs init, converters)", record_only),
        ("I argument validation (parse_uuid)", validation_only),
        ("J log_call with DEBUG off", log_only),
        ("FL F, then L", after_floor(adapter_only)),
        ("FB F, then B", after_floor(checkout)),
        ("FH F, then H", after_floor(record_only)),
    ]
    for _, fn in pieces:  # past psycopg's prepare threshold on every connection
        for x in some_ids(10):
            fn(x)
    with psycopg.connect(dsn, autocommit=True) as conn:
        postmaster = cpus.find_postmaster(conn)
    with cpus.pinned(cpus.plan(args.cpu_layout), postmaster, dsn) as applied:
        samples = measure(
            runner,
            [Candidate(label, False, fn, some_ids) for label, fn in pieces],
            rounds=args.rounds,
            calls=args.calls,
            warmup=20,
            batch_seconds=0.3,
        )
    print(f"CPU layout: {cpus.summary(applied)} (see cpu_layout.md).\n")
    med = {label.split()[0]: s.median_us for label, s in samples.items()}
    print("## get_session, kitium-sync: the pieces (median µs per call, interleaved)\n")
    print("| piece | median µs | p95 µs |\n|---|---|---|")
    for label, s in samples.items():
        if not label.startswith("F") or label.startswith("F "):
            print(f"| {label} | {s.median_us:.1f} | {s.p95_us:.1f} |")
    overhead = med["A"] - med["F"]
    print(
        f"\nOverhead of the full call over the floor (A - F): {overhead:.1f} µs"
        f" ({med['A'] / med['F']:.2f}x).\n"
        f"- pool checkout + return (B): {med['B']:.1f} µs"
        f" (pool.connection() context, C: {med['C']:.1f} µs)\n"
        f"- automatic vs explicit prepare (D - F): {med['D'] - med['F']:.1f} µs\n"
        f"- Session record by the row binder (E - D): {med['E'] - med['D']:.1f} µs;"
        f" the record alone (H): {med['H']:.1f} µs\n"
        f"- validation (I): {med['I']:.2f} µs; logging (J): {med['J']:.2f} µs\n"
        f"- remainder (dispatch, retry loop, observer hook, cursor lookup):"
        f" {overhead - med['B'] - (med['E'] - med['F']) - med['I'] - med['J']:.1f} µs\n"
        f"- (not on the adapter's path: a cursor per call would add G = {med['G']:.1f} µs)\n"
        f"- the adapter's own work with the server and psycopg stubbed out (L):"
        f" {med['L']:.1f} µs\n"
        f"- the adapter's dispatch (A - K): {med['A'] - med['K']:.1f} µs;"
        f" its path inlined over the floor (K - F): {med['K'] - med['F']:.1f} µs\n"
    )
    print(
        "A and K run on the pool's connection, D, E and F on a held one: their differences also"
        " carry the connection-to-connection spread, about a µs or two with the layout pinned"
        " (cpu_layout.md). B, G, H, I, J and L need no server and hold from run to run.\n"
    )
    print("## The adapter's own work in place\n")
    print(
        "L, B and H again, each right after one real floor query F on a held connection: the"
        " pair is timed and F's median subtracted. Run back to back, a piece finds its code and"
        " data in the CPU caches; right after a query, psycopg, libpq and the kernel have been"
        " through them, as in a real call.\n"
    )
    print("| piece | alone, back to back (µs) | right after a real query (µs) |\n|---|---|---|")
    for piece, name in (("L", "the adapter's own work"), ("B", "pool"), ("H", "record")):
        print(f"| {piece} {name} | {med[piece]:.1f} | {med['F' + piece] - med['F']:.1f} |")
    print(
        f"\nThe full call's overhead over the floor (A - F) is {overhead:.1f} µs; the adapter's"
        f" own work in place (FL - F) is {med['FL'] - med['F']:.1f} µs. Subtracting F carries"
        " F's spread, a µs or so either way.\n"
    )
    _async_pieces(args, runner, dsn, schema, some_ids, stored_row, postmaster)
    profiler = cProfile.Profile()
    batch = some_ids(args.profile_calls)
    profiler.enable()
    for x in batch:
        storage.get_session(x)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    by_package: dict[str, float] = {}
    raw_stats: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, own, _, _) in raw_stats.items():
        by_package[_package(filename)] = by_package.get(_package(filename), 0.0) + own
    total_own = sum(by_package.values())
    print("## cProfile: own time by package (share of the profiled time)\n")
    print("| package | µs per call | share |\n|---|---|---|")
    for package, own in sorted(by_package.items(), key=lambda kv: -kv[1]):
        per_call = own / args.profile_calls * 1e6
        print(f"| {package} | {per_call:.1f} | {own / total_own:.1%} |")
    print()
    stats.print_stats(25)
    print(f"## cProfile of {args.profile_calls} full calls (own time; cProfile inflates)\n")
    print("```")
    print(out.getvalue().strip())
    print("```")
    if args.py_spy:
        _py_spy(args.py_spy, storage, some_ids(args.profile_calls * 4))
    held.close()
    storage.disconnect()
    setattr(stub_conn, sync_core.REUSED_CURSOR, real_cursor)
    stubbed.disconnect()


def _async_pieces(
    args: argparse.Namespace,
    runner: asyncio.Runner,
    dsn: str,
    schema: str,
    some_ids: Callable[[int], list[Any]],
    stored_row: Any,
    postmaster: int | None,
) -> None:
    """Where kitium-async's distance to asyncpg goes: the full call, psycopg's async floor and
    raw asyncpg (when installed) side by side, and the adapter's own work measured without a
    server (and the async pool's share of it). Only the figures that hold from run to run: an
    in-place breakdown like the sync one moved by ±10 µs between runs under asyncio."""
    sql = _sql.queries(schema)["get_session"].sql
    storage = AsyncPostgresStorageAdapter(dsn, schema=schema)
    runner.run(storage.connect(migrate=False))
    pool = storage.pool
    held = runner.run(psycopg.AsyncConnection.connect(dsn, **connection_kwargs()))
    reused_tuples = held.cursor()
    stubbed = AsyncPostgresStorageAdapter(dsn, schema=schema, min_size=1, max_size=1)
    runner.run(stubbed.connect(migrate=False))
    runner.run(stubbed.get_session(some_ids(1)[0]))
    stub_conn = runner.run(stubbed.pool.getconn())
    runner.run(stubbed.pool.putconn(stub_conn))
    real_cursor = getattr(stub_conn, async_core.REUSED_CURSOR)
    setattr(
        stub_conn, async_core.REUSED_CURSOR, cast(Any, _AsyncStubCursor(real_cursor, stored_row))
    )

    async def full(x: Any) -> Any:
        return await storage.get_session(x)

    async def checkout(x: Any) -> Any:
        conn = await pool.getconn()
        await pool.putconn(conn)
        return True

    async def reused_cursor_tuples(x: Any) -> Any:
        await reused_tuples.execute(sql, {"id": x}, prepare=True)
        return await reused_tuples.fetchone()

    async def adapter_only(x: Any) -> Any:
        return await stubbed.get_session(x)

    reused_tuples_after = held.cursor()

    def after_floor(piece: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``piece`` right after one real floor query (as in the sync section)."""

        async def run(x: Any) -> Any:
            await reused_tuples_after.execute(sql, {"id": x}, prepare=True)
            await reused_tuples_after.fetchone()
            return await piece(x)

        return run

    pieces: list[tuple[str, Callable[[Any], Any]]] = [
        ("A full await storage.get_session(id)", full),
        (
            "F held conn, REUSED cursor, tuple rows, prepare=True (psycopg floor)",
            reused_cursor_tuples,
        ),
        ("L the adapter's own work: A with a stub cursor (no psycopg, no server)", adapter_only),
        ("B async pool getconn + putconn (no query)", checkout),
        ("FL F, then L (the adapter's own work in place)", after_floor(adapter_only)),
        ("FB F, then B (the async pool in place)", after_floor(checkout)),
    ]
    asyncpg = None
    if importlib.util.find_spec("asyncpg") is not None:
        asyncpg = RawAsyncpg(dsn, schema)
        runner.run(asyncpg.open())
        pieces.append(("R raw asyncpg, prepared statement (asyncpg floor)", asyncpg.op_get_session))
    for _, fn in pieces:  # past psycopg's prepare threshold on every connection
        for x in some_ids(10):
            runner.run(fn(x))
    with cpus.pinned(cpus.plan(args.cpu_layout), postmaster, dsn):
        samples = measure(
            runner,
            [Candidate(label, True, fn, some_ids) for label, fn in pieces],
            rounds=args.rounds,
            calls=args.calls,
            warmup=20,
            batch_seconds=0.3,
        )
    med = {label.split()[0]: s.median_us for label, s in samples.items()}
    print("## get_session, kitium-async (median µs per call, interleaved)\n")
    print("| piece | median µs | p95 µs |\n|---|---|---|")
    for label, s in samples.items():
        print(f"| {label} | {s.median_us:.1f} | {s.p95_us:.1f} |")
    print(
        f"\nOver the psycopg async floor (A - F): {med['A'] - med['F']:.1f} µs"
        f" ({med['A'] / med['F']:.2f}x); the adapter's own work without a server (L):"
        f" {med['L']:.1f} µs, {med['B']:.1f} µs of it the async pool (B). Right after a real"
        f" query: the adapter's own work (FL - F) {med['FL'] - med['F']:.1f} µs, the async pool"
        f" (FB - F) {med['FB'] - med['F']:.1f} µs."
    )
    if "R" in med:
        print(
            f"Against raw asyncpg (R): kitium-async A ÷ R = {med['A'] / med['R']:.2f}x, of which"
            f" psycopg's async floor F ÷ R = {med['F'] / med['R']:.2f}x and kitium A ÷ F ="
            f" {med['A'] / med['F']:.2f}x."
        )
    print()
    if asyncpg is not None:
        runner.run(asyncpg.close())
    setattr(stub_conn, async_core.REUSED_CURSOR, real_cursor)
    runner.run(stubbed.disconnect())
    runner.run(held.close())
    runner.run(storage.disconnect())


class _AsyncStubCursor:
    """``_StubCursor`` for the async adapter."""

    closed = False
    rowcount = 1

    def __init__(self, real: Any, row: Any) -> None:
        self.description = real.description
        self.row = row

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> _AsyncStubCursor:
        return self

    async def fetchone(self) -> Any:
        return self.row


class _StubCursor:
    """Answers the adapter's cursor calls with one stored row (profile piece L)."""

    closed = False
    rowcount = 1

    def __init__(self, real: Any, row: Any) -> None:
        self.description = real.description
        self.row = row

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> _StubCursor:
        return self

    def fetchone(self) -> Any:
        return self.row


def _package(filename: str) -> str:
    """Which package a profiled function belongs to (for the own-time summary)."""
    for marker, name in (
        ("attrs generated", "kitium_pg records (attrs __init__)"),
        ("kitium_pg/records", "kitium_pg records (attrs __init__)"),
        ("kitium_pg", "kitium_pg"),
        ("psycopg_pool", "psycopg_pool"),
        ("psycopg", "psycopg"),
        ("/json/", "json (jsonb columns)"),
    ):
        if marker in filename:
            return name
    if filename.startswith("~") or filename == "":
        return "builtins (C)"
    return "other Python"


def _py_spy(path: Path, storage: PostgresStorageAdapter, batch: list[Any]) -> None:
    """Record this process with py-spy (collapsed stacks, idle time included) while it runs
    ``batch`` get_session calls, then print the frames with the most own samples."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [binary, "record", "--format", "raw", "--idle", "--rate", "1000"]
    spy = subprocess.Popen(
        [*command, "-o", str(path), "--pid", str(os.getpid())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.5)
    for x in batch:
        storage.get_session(x)
    spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
    spy.wait(timeout=60)
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "get_session" not in stack:
            continue
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + int(count)
        total += int(count)
    print(f"\n## py-spy: own samples inside get_session ({total} samples, idle included)\n")
    print("| frame | share |\n|---|---|")
    for frame, samples in sorted(own.items(), key=lambda kv: -kv[1])[:20]:
        print(f"| `{frame}` | {samples / total:.1%} |")
    log(f"py-spy collapsed stacks: {path}")


if __name__ == "__main__":
    sys.exit(main())

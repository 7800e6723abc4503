"""Where the benchmark's client and the PostgreSQL server run: CPU affinity (Linux).

On a small machine the latency of one round trip depends above all on where the client and its
server backend run. On one CPU the hand-over is direct (about 25 µs per ``get_session`` here);
on two, each side must wake the other CPU (about 70 µs). The scheduler settles each connection
differently, so two variants on two connections may differ 3x while running the same statement
with the same driver (``benchmarks/results/cpu_layout.md``). A ratio between variants measured
that way measures the scheduler. Pinning every server process to one set of CPUs and the client
to another gives every connection the same path.

Layouts: ``split`` (client on the first CPU, server on the others: each side has its own CPU,
as when the database is another machine), ``shared`` (both on the first CPU), ``os`` (no
pinning).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import log

LAYOUTS = ("split", "shared", "os")


@dataclass(frozen=True)
class Layout:
    """The CPUs of the client process and of every server process."""

    name: str
    client: frozenset[int]
    server: frozenset[int]

    def describe(self) -> dict[str, Any]:
        return {
            "layout": self.name,
            "client_cpus": sorted(self.client),
            "server_cpus": sorted(self.server),
        }


def plan(name: str) -> Layout | None:
    """The layout ``name`` on the CPUs this process may use; ``None`` for ``os``, for ``split``
    on one CPU, and where CPU affinity does not exist (not Linux)."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown CPU layout {name!r} (one of {', '.join(LAYOUTS)})")
    ordered = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if name == "os" or not ordered or (name == "split" and len(ordered) < 2):
        return None
    first = frozenset(ordered[:1])
    if name == "shared":
        return Layout(name, first, first)
    return Layout(name, first, frozenset(ordered[1:]))


def summary(applied: dict[str, Any]) -> str:
    """One line for what ``pinned`` yielded: ``split, client on CPU 0, server on CPU 1``."""
    if applied["layout"] == "os":
        return f"not pinned ({applied['reason']})"
    client = ",".join(map(str, applied["client_cpus"]))
    server = ",".join(map(str, applied["server_cpus"]))
    line = f"{applied['layout']}, client on CPU {client}, server on CPU {server}"
    beside = len(applied.get("with_client_cpus", ()))
    if beside:
        line += f" but {beside} backend{'s' if beside > 1 else ''} with the client"
    return line


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[1])


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _parent(int(entry)) == parent:
            found.append(int(entry))
    return found


def find_postmaster(conn: psycopg.Connection[Any]) -> int | None:
    """The local process id of the server ``conn`` talks to, or ``None`` when it is not a
    process of this machine that this user may see (its backend is not a child of the pid in
    the data directory's ``postmaster.pid``)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        row = conn.execute("SELECT current_setting('data_directory'), pg_backend_pid()").fetchone()
    except psycopg.Error:
        return None
    assert row is not None
    data_directory, backend = row
    try:
        pid = int(Path(data_directory, "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if _parent(backend) == pid else None


def _server_processes(postmaster: int) -> list[int]:
    return [postmaster, *_children(postmaster)]


def _client_threads() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


def _set(pids: list[int], cpus: frozenset[int] | set[int]) -> int:
    done = 0
    for pid in pids:
        try:
            os.sched_setaffinity(pid, cpus)
            done += 1
        except ProcessLookupError:  # exited meanwhile
            continue
    return done


@contextmanager
def pinned(
    layout: Layout | None, postmaster: int | None, dsn: str, *, with_client: Sequence[int] = ()
) -> Iterator[dict[str, Any]]:
    """Pin the server (the postmaster, every process it has forked, and through inheritance
    every backend it forks meanwhile) and every thread of this process per ``layout``, and the
    backends ``with_client`` (process ids) beside the client; restore the CPUs they had on
    exit. Yields a description of what was applied, including the CPUs a backend forked
    afterwards reports; raises ``RuntimeError`` if they are not the layout's. With no layout or
    no local server, pins nothing and says why."""
    if layout is None or postmaster is None:
        why = "no layout" if layout is None else "the server is not a local process"
        yield {"layout": "os", "reason": why}
        return
    server_before = os.sched_getaffinity(postmaster)
    client_before = os.sched_getaffinity(0)
    try:
        pinned_server = _set(_server_processes(postmaster), layout.server)
        _set(_client_threads(), layout.client)
        _set(list(with_client), layout.client)
    except PermissionError as exc:
        _set(_server_processes(postmaster), server_before)
        _set(_client_threads(), client_before)
        log(f"CPU layout {layout.name} not applied: {exc}")
        yield {"layout": "os", "reason": f"not permitted: {exc}"}
        return
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            backend_cpus = sorted(os.sched_getaffinity(row[0]))
        if backend_cpus != sorted(layout.server):
            raise RuntimeError(
                f"CPU layout {layout.name}: a new backend runs on CPUs {backend_cpus},"
                f" not {sorted(layout.server)}"
            )
        applied = {
            **layout.describe(),
            "server_processes": pinned_server,
            "new_backend_cpus": backend_cpus,
        }
        if with_client:
            applied["with_client_cpus"] = [sorted(os.sched_getaffinity(p)) for p in with_client]
        yield applied
    finally:
        _set(_server_processes(postmaster), server_before)
        _set(_client_threads(), client_before)

"""Failover with a multi-host DSN: the adapter follows a promoted standby on its own.

The DSN lists the primary's and the standby's sockets with ``target_session_attrs=read-write``:
libpq tries them in order and keeps the first that accepts writes. The standby is synchronous
(``synchronous_standby_names``, ``synchronous_commit=on``), so every write the adapter
acknowledged is on the standby when the primary dies. A thread keeps creating users and records
the id of each one acknowledged; the primary is stopped (immediate mode: a crash, no shutdown
checkpoint), the standby promoted with ``pg_ctl promote``, and the writes resume without any
action on the adapter. Every acknowledged id is then read back from the new primary.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from kitium_pg import KitiumPgError, PostgresStorageAdapter

from .conftest import TEST_KEYS
from .fix_replication import ReplicatedPair

pytestmark = pytest.mark.slow

RESUME_BOUND_S = 30.0


@pytest.fixture
def pair() -> Iterator[ReplicatedPair]:
    """A fresh migrated primary with a synchronous standby (the test consumes it)."""
    replicated = ReplicatedPair.create()
    try:
        with PostgresStorageAdapter(replicated.primary.dsn, max_size=1, encryption_keys=TEST_KEYS):
            pass
        replicated.make_standby_synchronous()
        yield replicated
    finally:
        replicated.close()


def multi_host(pair: ReplicatedPair, *, url: bool = False) -> str:
    hosts = f"{pair.primary.socket_dir},{pair.standby.socket_dir}"
    if url:
        return f"postgresql://postgres@/postgres?host={hosts}&port=5432,5432&target_session_attrs=read-write"
    return (
        f"host={hosts} port=5432,5432 user=postgres dbname=postgres target_session_attrs=read-write"
    )


def connected_socket(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return conn.info.host


class Writer(threading.Thread):
    """Creates users in a loop; ``acked`` holds (time acknowledged, id) of each success."""

    def __init__(self, storage: PostgresStorageAdapter) -> None:
        super().__init__(name="failover-writer", daemon=True)
        self.storage = storage
        self.acked: list[tuple[float, uuid.UUID]] = []
        self.failures: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                user = self.storage.create_user(email=f"fo-{uuid.uuid4().hex[:12]}@example.com")
            except KitiumPgError as exc:
                self.failures.append((time.monotonic(), exc.code))
                time.sleep(0.02)
                continue
            self.acked.append((time.monotonic(), user.id))
            time.sleep(0.005)

    def wait_acks(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert self.is_alive(), "the writer thread died"
            assert time.monotonic() < deadline, f"only {len(self.acked)} writes in {timeout} s"
            time.sleep(0.01)


def test_writes_resume_on_the_promoted_standby_with_no_acknowledged_write_lost(
    pair: ReplicatedPair,
) -> None:
    for form in (multi_host(pair), multi_host(pair, url=True)):
        assert connected_socket(form) == str(pair.primary.socket_dir)
    storage = PostgresStorageAdapter(
        multi_host(pair),
        min_size=2,
        max_size=4,
        connect_timeout=2.0,
        pool_timeout=5.0,
        encryption_keys=TEST_KEYS,
    )
    storage.connect(migrate=False)
    writer = Writer(storage)
    try:
        writer.start()
        writer.wait_acks(50, timeout=30)
        stopping = time.monotonic()
        pair.primary.stop("immediate")
        stopped = time.monotonic()
        acked_before = len(writer.acked)
        pair.standby.promote()
        promoted = time.monotonic()
        deadline = stopped + RESUME_BOUND_S
        while not any(at > stopped for at, _ in writer.acked[acked_before:]):
            assert time.monotonic() < deadline, (
                f"writes did not resume within {RESUME_BOUND_S} s:"
                f" {writer.failures[-5:]}\n{pair.standby.log()[-3000:]}"
            )
            time.sleep(0.01)
        resumed = next(at for at, _ in writer.acked[acked_before:] if at > stopped)
        writer.wait_acks(len(writer.acked) + 20, timeout=10)  # and keep going
    finally:
        writer.stop.set()
        writer.join(30)
        storage.disconnect()
    codes = sorted({code for _, code in writer.failures})
    print(
        f"failover: resumed writes after {resumed - stopping:.1f} s"
        f" (primary stopped in {stopped - stopping:.2f} s, standby promoted"
        f" {promoted - stopping:.2f} s after the stop began); {len(writer.acked)} writes"
        f" acknowledged, {len(writer.failures)} failed meanwhile ({', '.join(codes) or 'none'})"
    )
    assert resumed - stopping < RESUME_BOUND_S
    # The new primary: writable, reached by the same DSN, and holding every acknowledged id.
    assert pair.standby.value("SELECT pg_is_in_recovery()") is False
    assert connected_socket(multi_host(pair)) == str(pair.standby.socket_dir)
    ids = [user_id for _, user_id in writer.acked]
    found = pair.standby.query("SELECT id FROM kitium_auth.users WHERE id = ANY(%s)", [ids])
    missing = set(ids) - {row[0] for row in found}
    assert not missing, f"{len(missing)} acknowledged writes lost: {sorted(missing)[:5]}"

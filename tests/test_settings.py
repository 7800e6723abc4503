"""Adapter settings: every hostile value is a ValidationError naming the setting, before I/O."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter, ValidationError
from kitium_pg._base import (
    APPLICATION_NAME_BYTES,
    MAX_POOL_SIZE,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    STATEMENT_TIMEOUT_MAX_MS,
    Settings,
)

# The adapters' defaults (kitium_pg/_async/core.py).
DEFAULTS: dict[str, Any] = {
    "min_size": 1,
    "max_size": 10,
    "idle_timeout": 30.0,
    "statement_timeout_ms": 5000,
    "max_retries": 2,
    "connect_timeout": 10.0,
    "pool_timeout": 10.0,
    "schema": "kitium_auth",
    "application_name": "kitium-pg",
    "prepare_threshold": 5,
}
# Nothing listens here: a constructor that tried to connect would fail differently.
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"

NAN, INF = float("nan"), float("inf")
NOT_INTS = [NAN, INF, -INF, 1.5, 2.0, True, False, "1", b"1", None, [1]]
NOT_SECONDS = [NAN, INF, -INF, 0, 0.0, -1, -0.5, True, "1", None, MAX_TIMEOUT_S + 1, 10**400]

HOSTILE: list[tuple[str, object]] = [
    *(("min_size", bad) for bad in [*NOT_INTS, -1, MAX_POOL_SIZE + 1, 10**9]),
    *(("max_size", bad) for bad in [*NOT_INTS, 0, -1, MAX_POOL_SIZE + 1, 10**9]),
    *(
        (name, bad)
        for name in ("idle_timeout", "connect_timeout", "pool_timeout")
        for bad in NOT_SECONDS
    ),
    *(("statement_timeout_ms", bad) for bad in [*NOT_INTS, -1, STATEMENT_TIMEOUT_MAX_MS + 1]),
    *(("max_retries", bad) for bad in [*NOT_INTS, -1, MAX_RETRIES + 1, 10**9]),
    *(
        ("application_name", bad)
        for bad in [None, 1, b"kitium", "a\x00b", "\ud800", "x" * 64, "é" * 32, "x" * 10**6]
    ),
    *(("prepare_threshold", bad) for bad in [NAN, 1.5, True, "5", -1, 2**31]),
]


def build(**overrides: object) -> Settings:
    return Settings.build(**{**DEFAULTS, **overrides})


@pytest.mark.parametrize(("name", "value"), HOSTILE)
def test_hostile_settings_are_refused_naming_the_setting(name: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        build(**{name: value})
    assert caught.value.field == name


@pytest.mark.parametrize(("name", "value"), HOSTILE[::7])
@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
def test_adapters_refuse_hostile_settings_before_connecting(
    cls: type[PostgresStorageAdapter] | type[AsyncPostgresStorageAdapter], name: str, value: object
) -> None:
    with pytest.raises(ValidationError) as caught:
        cls(UNREACHABLE, **{name: value})  # type: ignore[arg-type]
    assert caught.value.field == name


def test_min_size_above_max_size_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        build(min_size=3, max_size=2)
    assert caught.value.field == "min_size"


@pytest.mark.parametrize(
    "overrides",
    [
        {"min_size": 0, "max_size": 1},
        {"min_size": MAX_POOL_SIZE, "max_size": MAX_POOL_SIZE},
        {"statement_timeout_ms": 0},
        {"statement_timeout_ms": STATEMENT_TIMEOUT_MAX_MS},
        {"max_retries": 0},
        {"max_retries": MAX_RETRIES},
        {"idle_timeout": 1, "connect_timeout": 0.5, "pool_timeout": MAX_TIMEOUT_S},
        {"application_name": ""},
        {"application_name": "x" * APPLICATION_NAME_BYTES},
        {"application_name": "é" * 31},  # 62 bytes
        {"prepare_threshold": None},
        {"prepare_threshold": 0},
    ],
)
def test_edge_values_are_accepted_unchanged(overrides: dict[str, object]) -> None:
    settings = build(**overrides)
    for name, value in overrides.items():
        assert getattr(settings, name) == value


@given(st.one_of(st.floats(), st.integers(-(10**20), 10**20)))
def test_a_timeout_is_accepted_exactly_when_finite_and_in_range(value: float) -> None:
    ok = math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S
    for name in ("idle_timeout", "connect_timeout", "pool_timeout"):
        if ok:
            assert getattr(build(**{name: value}), name) == value
        else:
            with pytest.raises(ValidationError) as caught:
                build(**{name: value})
            assert caught.value.field == name


@given(st.text(max_size=80))
def test_application_name_is_accepted_exactly_when_postgresql_keeps_it_whole(name: str) -> None:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        encoded = None
    if encoded is not None and len(encoded) <= APPLICATION_NAME_BYTES and "\x00" not in name:
        assert build(application_name=name).application_name == name
    else:
        with pytest.raises(ValidationError) as caught:
            build(application_name=name)
        assert caught.value.field == "application_name"


@given(st.integers(-(2**40), 2**40))
def test_statement_timeout_is_accepted_exactly_within_the_int4_range(value: int) -> None:
    if 0 <= value <= STATEMENT_TIMEOUT_MAX_MS:
        settings = build(statement_timeout_ms=value)
        assert settings.connection_kwargs("dbname=x")["options"].startswith(
            f"-c statement_timeout={value} "
        )
    else:
        with pytest.raises(ValidationError) as caught:
            build(statement_timeout_ms=value)
        assert caught.value.field == "statement_timeout_ms"


@pytest.mark.parametrize(
    "value",
    ["tenant_rls", b"tenant_rls", 7, None, [1], ["nope"], itertools.repeat("tenant_rls")],
    ids=["str", "bytes", "int", "None", "int-item", "unknown", "endless"],
)
@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
def test_optional_migrations_are_a_short_list_of_known_ids(cls: type, value: object) -> None:
    """An endless iterable is refused after one item more than could be valid, not read whole
    (the test would hang otherwise)."""
    with pytest.raises(ValidationError) as caught:
        cls(UNREACHABLE, optional_migrations=value)
    assert caught.value.field == "optional_migrations"


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
def test_optional_migrations_may_be_any_iterable_read_once(cls: type) -> None:
    adapter = cls(UNREACHABLE, optional_migrations=(name for name in ["tenant_rls"]))
    assert adapter._settings.optional_migrations == ("tenant_rls",)


def test_the_dsns_options_else_pgoptions_come_before_the_adapters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq takes PGOPTIONS when the DSN has no options; the adapter's options keyword would
    replace both, so they are put first (the adapter's own settings follow and win)."""
    ours = (
        "-c statement_timeout=5000 -c TimeZone=UTC"
        " -c default_transaction_isolation=read\\ committed -c DateStyle=ISO"
    )
    monkeypatch.delenv("PGOPTIONS", raising=False)
    assert build().connection_kwargs("dbname=x")["options"] == ours
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=42")
    assert build().connection_kwargs("dbname=x")["options"] == f"-c lock_timeout=42 {ours}"
    dsn = "dbname=x options='-c search_path=a'"
    assert build().connection_kwargs(dsn)["options"] == f"-c search_path=a {ours}"
    assert "options" not in build(pgbouncer=True).connection_kwargs(dsn)


def test_the_adapters_application_name_is_a_fallback() -> None:
    """libpq uses fallback_application_name only when neither the DSN, PGAPPNAME nor a service
    file names the application: the adapter's name must not replace theirs."""
    kwargs = build(application_name="billing").connection_kwargs("dbname=x")
    assert kwargs["fallback_application_name"] == "billing"
    assert "application_name" not in kwargs


def test_tcp_notices_a_dead_peer_within_about_three_connect_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keepalives and tcp_user_timeout follow connect_timeout (the server's statement timeout
    cannot fire while it is unreachable, and the system's keepalive defaults take two hours);
    the DSN's own values win."""
    monkeypatch.delenv("PGSERVICE", raising=False)
    kwargs = build(connect_timeout=10.0).connection_kwargs("dbname=x")
    assert {k: v for k, v in kwargs.items() if k.startswith(("keepalives", "tcp_"))} == {
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    short = build(connect_timeout=1.0).connection_kwargs("dbname=x")
    assert (short["keepalives_idle"], short["keepalives_interval"]) == (1, 1)
    assert short["tcp_user_timeout"] == 3000
    theirs = build().connection_kwargs("dbname=x keepalives=0 tcp_user_timeout=5")
    assert "keepalives" not in theirs and "tcp_user_timeout" not in theirs
    assert theirs["keepalives_idle"] == 10


def test_a_service_keeps_its_own_tcp_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyword argument replaces what a pg_service.conf service sets (its keepalives=0
    included), and the service file cannot be read as libpq reads it: none is set then."""
    monkeypatch.delenv("PGSERVICE", raising=False)
    liveness = {"keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count"}
    liveness.add("tcp_user_timeout")
    assert not liveness & build().connection_kwargs("service=auth dbname=x").keys()
    monkeypatch.setenv("PGSERVICE", "auth")
    assert not liveness & build().connection_kwargs("dbname=x").keys()


@pytest.mark.parametrize("cls", [PostgresStorageAdapter, AsyncPostgresStorageAdapter])
def test_a_reconnection_chain_gives_up_after_the_longer_of_the_two_timeouts(cls: type) -> None:
    """psycopg-pool's default (300 s) let its back-off grow to minutes during an outage, and
    calls kept failing for about as long after the database was back; each chain now ends
    after max(pool_timeout, connect_timeout), and the next waiting call starts a new one."""
    adapter = cls("dbname=x", pool_timeout=4.0, connect_timeout=2.0, replica_dsn="dbname=y")
    assert adapter.pool.reconnect_timeout == 4.0
    assert [r.reconnect_timeout for r in adapter._replicas] == [4.0]
    assert cls("dbname=x").pool.reconnect_timeout == 10.0

"""Smoke test of ``benchmarks/run.py --quick``: it runs against the test database (in a fresh
schema of its own, dropped afterwards), exits 0, and prints one ``bench:`` line for every
(operation, variant) it claims. Variants whose optional packages (the ``bench`` extra) are not
installed are skipped here, as the script itself skips them. Nothing asserts on timings.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"

OPERATIONS = (
    "get_session",
    "validate_session_token",
    "get_user_by_email",
    "get_api_key_by_hash",
    "verify_api_key",
    "get_user_permissions",
    "create_user",
    "create_session",
    "emit_event",
    "emit_events",
    "create_backup_codes",
    "mark_email_verification_token_as_used",
)
# Always run: kitium-pg and the raw psycopg floor need nothing beyond kitium-pg's dependencies.
CORE_VARIANTS = ("kitium-sync", "kitium-async", "raw-psycopg", "raw-psycopg-async")
# Need the bench extra: variant -> modules it imports.
OPTIONAL_VARIANTS = {
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
BENCH_LINE = re.compile(r"^bench: op=(\S+) variant=(\S+) us=(\d+\.\d) ratio_raw=(\d+\.\d\d|n/a)$")


@dataclass
class QuickRun:
    returncode: int
    stdout: str
    stderr: str
    out: Path
    lines: list[tuple[str, str]]
    results: dict[str, Any]


@pytest.fixture(scope="module")
def quick(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """One ``--quick`` run for the whole module (its results go to a temporary folder, so the
    committed benchmarks/results stay as they are)."""
    out = tmp_path_factory.mktemp("bench")
    proc = _run_quick(out, "--dsn", dsn, "--cpu-layout", "split")
    lines = []
    for line in proc.stdout.splitlines():
        if line.startswith("bench:"):
            match = BENCH_LINE.match(line)
            assert match, f"malformed bench line: {line!r}"
            lines.append((match.group(1), match.group(2)))
    json_path = out / "latest.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    return QuickRun(proc.returncode, proc.stdout, proc.stderr, out, lines, results)


def _run_quick(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``benchmarks/run.py --quick --out OUT ARGS...``, its output captured."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def test_quick_run_exits_zero_and_writes_its_report(quick: QuickRun) -> None:
    assert quick.returncode == 0, quick.stderr[-5000:]
    assert "# kitium-pg benchmark" in quick.stdout
    assert (quick.out / "latest.md").read_text().startswith("# kitium-pg benchmark")
    assert quick.results["config"]["quick"] is True
    # The bench lines come last, one per claimed (operation, variant) and no other.
    tail = quick.stdout.rstrip("\n").splitlines()[-len(quick.lines) :]
    assert all(line.startswith("bench: ") for line in tail)
    counts = Counter(quick.lines)
    assert [pair for pair, n in counts.items() if n > 1] == []
    claimed = {(op, variant) for op, variant in quick.results["claimed"]}
    assert set(quick.lines) == claimed


def test_latencies_are_measured_with_the_cpu_layout_applied(quick: QuickRun) -> None:
    # The test server is a local process (embedded, or KITIUM_PG_TEST_DSN on this machine):
    # the run pins it and itself apart, and checks a backend forked meanwhile inherits it.
    assert quick.returncode == 0, quick.stderr[-5000:]
    assert quick.results["config"]["cpu_layout"] == "split"
    applied = quick.results["cpu_layout"]
    # No no-flush entry: with --dsn that section is not measured (see the no-flush tests).
    assert set(applied) == {"ops", "login", "delete", "scaling"}
    cpus = sorted(os.sched_getaffinity(0))
    embedded = not os.environ.get("KITIUM_PG_TEST_DSN")
    for name, section in applied.items():
        if section["layout"] == "os":
            # Only a server elsewhere (or a one-CPU machine) may leave it unpinned.
            assert not embedded or len(cpus) < 2, section
            continue
        assert section["client_cpus"] == cpus[:1]
        assert section["server_cpus"] == cpus[1:]
        assert section["new_backend_cpus"] == cpus[1:]
        assert section["server_processes"] >= 2  # the postmaster and at least one backend
        # During a purge the concurrent reader's backend runs beside the client, and only it.
        assert section.get("with_client_cpus") == ([cpus[:1]] if name == "delete" else None)


@pytest.mark.parametrize("variant", CORE_VARIANTS)
def test_core_variant_measures_every_operation(quick: QuickRun, variant: str) -> None:
    assert quick.returncode == 0, quick.stderr[-5000:]
    assert quick.results["variants"][variant]["available"]
    missing = [op for op in OPERATIONS if (op, variant) not in quick.lines]
    assert missing == []
    if variant != "raw-psycopg-async":  # the purge runs once per stack
        assert ("delete_expired_sessions", variant) in quick.lines
        # Each purge ran next to a timed get_session reader, and before it the same reader idle.
        purge = quick.results["delete"]["measured"][variant]
        assert purge["rows"] == purge["expected_rows"]
        for phase in ("reader_idle", "reader_during"):
            reader = purge[phase]
            assert reader["n"] >= 1
            assert 0 < reader["median_us"] <= reader["p95_us"] <= reader["max_us"]


@pytest.mark.parametrize("variant", sorted(OPTIONAL_VARIANTS))
def test_optional_variant(quick: QuickRun, variant: str) -> None:
    assert quick.returncode == 0, quick.stderr[-5000:]
    info = quick.results["variants"][variant]
    missing = _missing(OPTIONAL_VARIANTS[variant])
    if missing:
        # The script must say why the variant is absent, and claim nothing for it.
        assert not info["available"]
        assert "not installed" in info["reason"]
        assert f"variant {variant} skipped" in quick.stderr
        assert all(v != variant for _, v in quick.lines)
        pytest.skip(f"{variant}: {', '.join(missing)} not installed (pip install '.[bench]')")
    assert info["available"], info["reason"]
    # Every operation is either measured (with its bench line) or skipped with a reason.
    for op in OPERATIONS:
        section = quick.results["ops"][op]
        if variant in section["measured"]:
            assert (op, variant) in quick.lines
        else:
            assert section["skipped"][variant]
    assert any(v == variant for _, v in quick.lines)


def test_chart_when_matplotlib_is_installed(quick: QuickRun) -> None:
    assert quick.returncode == 0, quick.stderr[-5000:]
    if _missing(("matplotlib",)):
        assert "no chart" in (quick.out / "latest.md").read_text()
        pytest.skip("matplotlib not installed (pip install '.[bench]')")
    assert (quick.out / "latest.png").stat().st_size > 10_000


def test_sign_in_section_measures_each_form(quick: QuickRun) -> None:
    """The sign-in section runs kitium-async's three forms, psycopg's pipelined floor and the
    adapter's one statement on psycopg (what the sign-in costs on that driver without the
    adapter), and asyncpg's forms when it is installed."""
    assert quick.returncode == 0, quick.stderr[-5000:]
    measured = quick.results["login"]["measured"]
    expected = {
        "kitium-async",
        "kitium-async-tx",
        "kitium-async-no-tx",
        "raw-psycopg-async",
        "raw-psycopg-async-one-statement",
    }
    if not _missing(("asyncpg",)):
        expected |= {"raw-asyncpg", "raw-asyncpg-tx", "raw-asyncpg-one-statement"}
    assert expected <= set(measured)
    assert all(m["median_us"] > 0 and m["note"] for m in measured.values())


def test_async_variants_run_on_asyncio_by_default(quick: QuickRun) -> None:
    assert quick.returncode == 0, quick.stderr[-5000:]
    assert quick.results["config"]["loop"] == "asyncio"
    assert quick.results["machine"]["event_loop"].startswith("asyncio.")


def test_loop_uvloop_runs_the_async_variants_on_uvloop(dsn: str, tmp_path: Path) -> None:
    """``--loop uvloop`` (uvicorn's loop whenever it is installed) runs the async variants on
    uvloop's event loop, and the report names the loop they ran on."""
    if _missing(("uvloop",)):
        pytest.skip("uvloop not installed (pip install '.[bench]')")
    out = tmp_path / "bench"
    variants = ("kitium-async", "raw-psycopg-async")
    proc = _run_quick(
        out,
        *("--dsn", dsn, "--loop", "uvloop", "--sections", "ops", "--ops", "get_session"),
        *("--variants", ",".join(variants)),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((out / "latest.json").read_text())
    assert results["config"]["loop"] == "uvloop"
    assert results["machine"]["event_loop"] == "uvloop.Loop"
    assert set(results["ops"]["get_session"]["measured"]) == set(variants)
    assert "| event loop of the async variants | uvloop.Loop |" in (out / "latest.md").read_text()


def test_no_flush_section_needs_the_benchmarks_own_server(quick: QuickRun) -> None:
    # With --dsn the run must not touch a server-wide setting: the section says why it is absent.
    assert quick.returncode == 0, quick.stderr[-5000:]
    assert "--dsn" in quick.results["no_flush"]["skipped"]
    assert (
        "## Writes without the commit flush\n\nNot run: " in (quick.out / "latest.md").read_text()
    )


def test_no_flush_section_on_the_embedded_server(tmp_path: Path) -> None:
    """Without --dsn the run starts its own server, measures the writes again with
    synchronous_commit off (the run itself checks the server took the setting), and reports
    them beside the durable figures."""
    out = tmp_path / "bench"
    ops = ("create_user", "emit_event", "mark_email_verification_token_as_used")
    variants = ("kitium-sync", "raw-psycopg")
    proc = _run_quick(
        out,
        *("--sections", "ops,no-flush", "--ops", ",".join(ops)),
        *("--variants", ",".join(variants), "--scale-max", "1000"),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((out / "latest.json").read_text())
    no_flush = results["no_flush"]
    assert no_flush["setting"] == "synchronous_commit=off"
    assert set(no_flush["ops"]) == set(ops)
    for op in ops:
        measured = no_flush["ops"][op]["measured"]
        assert set(measured) == set(variants)
        assert measured["raw-psycopg"]["ratio_raw"] == 1.0
        assert all(m["n"] >= 2 and m["median_us"] > 0 for m in measured.values())
    assert "no-flush" in results["cpu_layout"]
    report = (out / "latest.md").read_text()
    assert "## Writes without the commit flush\n\nThe write operations once more" in report
    # The durable table is still there, and the bench lines cover only it.
    assert set(results["ops"]) == set(ops)
    assert sorted(results["claimed"]) == sorted([op, v] for op in ops for v in variants)


def test_scaling_on_the_embedded_server_measures_cold_then_warm(tmp_path: Path) -> None:
    """The run's own server takes --shared-buffers; the scaling section measures the curve as
    seeded, then with the tables prewarmed into shared buffers, and counts the pages a lookup
    touches; the flat-scaling check is made on the warm curve."""
    out = tmp_path / "bench"
    proc = _run_quick(
        out,
        *("--sections", "scaling", "--variants", "kitium-sync"),
        *("--scale-max", "100000", "--shared-buffers", "256"),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads((out / "latest.json").read_text())
    assert results["machine"]["postgresql_settings"]["shared_buffers"] == "256MB"
    assert results["config"]["shared_buffers_mb"] == 256
    scaling = results["scaling"]
    assert "warm_skipped" not in scaling
    assert set(scaling["states"]) == {"cold", "warm"}
    for curves in scaling["states"].values():
        assert set(curves) == {"get_user_by_email", "get_session"}
        for curve in curves.values():
            assert set(curve) == {"1000", "10000", "100000"}
            for point in curve.values():
                assert point["median_us"] > 0
                # A lookup reads at least an index page and a heap page.
                assert point["pages"]["hit"] + point["pages"]["read"] >= 2
    # The seed leaves the 10^5-row heaps partly outside shared buffers (COPY's ring of buffers);
    # prewarming loads every page, and no lookup then reads one from outside.
    assert scaling["resident"]["cold"] < 1.0
    assert scaling["resident"]["warm"] == 1.0
    warm = scaling["states"]["warm"]
    assert all(p["pages"]["read"] == 0 for c in warm.values() for p in c.values())
    assert "Not judged: flat scaling on the cold curve" in (out / "latest.md").read_text()
    checks = [t for t in results["targets"] if t["target"].startswith("flat scaling")]
    assert [t["subject"].endswith("(warm)") for t in checks] == [True, True]
    assert "get_user_by_email (cold)" in (out / "latest.md").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ("--shared-buffers", "0"),
        ("--shared-buffers", "15"),
        ("--shared-buffers", str(2**40)),
        ("--dsn", "postgresql://localhost/x", "--shared-buffers", "256"),
    ],
)
def test_shared_buffers_out_of_range_or_with_dsn_is_a_usage_error(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    # Refused before any server starts (0 was once taken for "the default").
    proc = _run_quick(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--shared-buffers" in proc.stderr


def test_scaling_with_dsn_says_why_there_is_no_warm_curve(quick: QuickRun) -> None:
    # The test database has no pg_prewarm, and a --dsn run installs no extension.
    assert quick.returncode == 0, quick.stderr[-5000:]
    scaling = quick.results["scaling"]
    if "warm" in scaling["states"]:
        pytest.skip("the test database has pg_prewarm installed")
    assert "pg_prewarm is not installed" in scaling["warm_skipped"]
    assert "Warm curve not measured: pg_prewarm" in (quick.out / "latest.md").read_text()


def test_profile_script_prints_every_piece(dsn: str) -> None:
    """``benchmarks/profile_get_session.py``, a few calls per piece: it exits 0 and prints a
    figure for every piece it names, in place ones included (the README quotes this profile)."""
    proc = subprocess.run(
        [
            *(sys.executable, str(ROOT / "benchmarks" / "profile_get_session.py"), "--dsn", dsn),
            *("--rows", "300", "--rounds", "2", "--calls", "5", "--profile-calls", "30"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    figure = r"(-?\d+\.\d)"

    def pieces(heading: str) -> str:
        """The one-letter pieces of the table under ``heading`` that carry two figures."""
        section = proc.stdout.split(heading, 1)[1].split("\n## ", 1)[0]
        rows = re.findall(rf"^\| ([A-Z]) [^|]+ \| {figure} \| {figure} \|$", section, re.M)
        return "".join(piece for piece, _, _ in rows)

    assert pieces("## get_session, kitium-sync") == "ABCDEFGKLHIJ"
    assert pieces("## The adapter's own work in place") == "LBH"
    assert pieces("## get_session, kitium-async") in ("AFLB", "AFLBR")  # R needs asyncpg
    assert re.search(rf"own work in place \(FL - F\) is {figure} µs", proc.stdout)
    assert re.search(
        rf"own work \(FL - F\) {figure} µs, the async pool \(FB - F\) {figure}", proc.stdout
    )
    assert "## cProfile of 30 full calls" in proc.stdout


async def test_the_pipelined_sign_in_floor_is_one_round_trip(dsn: str) -> None:
    """raw-psycopg-async's sign-in is the floor kitium's one-statement sign-in is compared
    with: BEGIN, two inserts and COMMIT must cost one round trip, and commit both rows."""
    from benchmarks.variants import Login, NewEvent, NewSession, RawPsycopgAsync
    from kitium_pg import AsyncPostgresStorageAdapter
    from tests.roundtrips import count

    schema = f"bench_login_{os.urandom(5).hex()}"
    try:
        async with AsyncPostgresStorageAdapter(dsn, schema=schema) as storage:
            user = await storage.create_user()
            variant = RawPsycopgAsync(dsn, schema)
            await variant.open()
            try:
                login = Login(
                    session=NewSession(
                        user_id=user.id,
                        expires_at=dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
                        metadata={},
                    ),
                    event=NewEvent(type="login", principal_id=user.id, data={}),
                )
                await variant.op_login(login)  # prepares the statements
                with tempfile.TemporaryFile("w+") as out:
                    variant.conn.pgconn.trace(out.fileno())
                    variant.conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
                    session_row, event_row = await variant.op_login(login)
                    variant.conn.pgconn.untrace()
                    out.seek(0)
                    assert count(out.read()) == 1
            finally:
                await variant.close()
            assert await storage.get_session(session_row[0]) is not None
            page = await storage.list_events(principal_id=user.id)
            assert event_row[0] in [e.id for e in page.events]
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())


def test_the_readme_table_is_the_committed_run() -> None:
    """README's per-operation table is generated from benchmarks/results/latest.json: a new run
    committed without the README (or the reverse) fails here."""
    from benchmarks.report import readme_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = readme.split("<!-- bench-table:start -->\n", 1)[1].split("\n<!-- bench-table:end -->")[
        0
    ]
    results = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    assert shown == readme_table(results)
    assert f"checkout {results['machine']['git_commit']}" in readme

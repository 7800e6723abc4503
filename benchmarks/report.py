"""Turning a run's measurements into ratios, target checks, Markdown, JSON, a chart and the
``bench:`` lines."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import cpus, log
from .variants import HOT_PATHS, SINGLE_ROW

SYNC_BASELINE = "raw-psycopg"
ASYNC_BASELINE = "raw-psycopg-async"
KITIUM = ("kitium-sync", "kitium-async")
STACK_PAIRS = (
    ("kitium-sync", "sqlalchemy-psycopg"),
    ("kitium-async", "sqlalchemy-asyncpg"),
    ("kitium-async", "sqlalchemy-psycopg-async"),
    ("kitium-async", "fastapi-users"),
    ("kitium-async", "fastapi-users+lower-idx"),
    ("kitium-async", "fastapi-users-psycopg"),
    ("kitium-async", "fastapi-users-psycopg+lower-idx"),
)
TARGET_RAW_RATIO = 1.15
TARGET_STACK_FACTOR = 3.0
TARGET_ASYNCPG_RATIO = 1.3
TARGET_EVENTS_PER_S = 20_000
TARGET_SCALING_RATIO = 1.3
TARGET_BATCH_MS = 100.0
# "Concurrent get_session calls keep their latency while the purge runs": their median during
# the purge at most this many times their median just before it, with nothing else running.
TARGET_READER_RATIO = 1.5
# The asyncpg target is on single-row lookups (get_user_permissions reads many rows).
SINGLE_ROW_LOOKUPS = tuple(op for op in HOT_PATHS if op in SINGLE_ROW)

# The name of each target, as the checks and the report spell it.
RAW_TARGET = f"≤{TARGET_RAW_RATIO}× raw psycopg (single-row op)"
STACK_TARGET = f"≥{TARGET_STACK_FACTOR:g}× faster than the SQLAlchemy stack"
ASYNCPG_TARGET = f"kitium-async within {TARGET_ASYNCPG_RATIO}× of asyncpg (single-row lookup)"
SIGN_IN_TARGET = "sign-in faster than raw asyncpg (factor > 1)"
EVENTS_TARGET = f"emit_events ≥ {TARGET_EVENTS_PER_S:,} events/s"
SCALING_TARGET = f"flat scaling (slowest ÷ fastest size ≤ {TARGET_SCALING_RATIO})"
BATCH_TARGET = f"delete batches < {TARGET_BATCH_MS:g} ms"
READER_TARGET = f"get_session during the purge ≤ {TARGET_READER_RATIO:g}× idle (median)"
READER_P95_TARGET = f"get_session during the purge ≤ {TARGET_READER_RATIO:g}× idle (p95)"
TARGETS = (
    RAW_TARGET,
    STACK_TARGET,
    ASYNCPG_TARGET,
    SIGN_IN_TARGET,
    EVENTS_TARGET,
    SCALING_TARGET,
    BATCH_TARGET,
    READER_TARGET,
    READER_P95_TARGET,
)


# -- derived figures ---------------------------------------------------------------------------


def derive(results: dict[str, Any]) -> None:
    """Add ratios, kitium-vs-stack factors, throughput and target checks to ``results``."""
    no_flush = results.get("no_flush", {}).get("ops", {})
    for section in (*results.get("ops", {}).values(), *no_flush.values()):
        measured = section["measured"]
        for m in measured.values():
            base = ASYNC_BASELINE if m["is_async"] else SYNC_BASELINE
            floor = measured.get(base)
            m["baseline"] = base
            m["ratio_raw"] = m["median_us"] / floor["median_us"] if floor else None
    login = results.get("login")
    if login:
        floor = login["measured"].get(ASYNC_BASELINE)
        for m in login["measured"].values():
            m["baseline"] = ASYNC_BASELINE
            m["ratio_raw"] = m["median_us"] / floor["median_us"] if floor else None
    delete = results.get("delete")
    if delete:
        floor = delete["measured"].get(SYNC_BASELINE)
        for m in delete["measured"].values():
            m["baseline"] = SYNC_BASELINE
            m["ratio_raw"] = m["total_s"] / floor["total_s"] if floor else None
            if m.get("reader_idle") and m.get("reader_during"):
                m["reader_ratio"] = m["reader_during"]["median_us"] / m["reader_idle"]["median_us"]
                m["reader_p95_ratio"] = m["reader_during"]["p95_us"] / m["reader_idle"]["p95_us"]
    results["kitium_vs_stack"] = _stack_factors(results.get("ops", {}))
    if no_flush:
        results["no_flush"]["kitium_vs_stack"] = _stack_factors(no_flush)
    events = results.get("ops", {}).get("emit_events", {}).get("measured", {})
    results["emit_events_per_s"] = {
        name: 1000 / (m["median_us"] / 1e6) for name, m in events.items()
    }
    scaling = results.get("scaling")
    if scaling:
        scaling["max_over_min"] = {}
        for state, curves in scaling["states"].items():
            ratios = scaling["max_over_min"][state] = {}
            for op, curve in curves.items():
                medians = [point["median_us"] for point in curve.values()]
                for point in curve.values():
                    point["vs_smallest"] = point["median_us"] / medians[0]
                ratios[op] = max(medians) / min(medians)
    results["targets"] = list(_targets(results))


def _stack_factors(ops: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per operation and (kitium, stack) pair: the stack's median ÷ kitium's."""
    stack: dict[str, dict[str, float]] = {}
    for op, section in ops.items():
        measured = section["measured"]
        for ours, theirs in STACK_PAIRS:
            if ours in measured and theirs in measured:
                factor = measured[theirs]["median_us"] / measured[ours]["median_us"]
                stack.setdefault(op, {})[f"{ours} vs {theirs}"] = factor
    return stack


def _check(target: str, subject: str, value: float | None, limit: float, *, at_most: bool) -> Any:
    if value is None:
        return None
    ok = value <= limit if at_most else value >= limit
    return {"target": target, "subject": subject, "value": value, "limit": limit, "ok": ok}


def _targets(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    ops = results.get("ops", {})
    for op in SINGLE_ROW:
        measured = ops.get(op, {}).get("measured", {})
        for name in KITIUM:
            if name in measured:
                found = _check(
                    RAW_TARGET,
                    f"{op} {name}",
                    measured[name].get("ratio_raw"),
                    TARGET_RAW_RATIO,
                    at_most=True,
                )
                if found:
                    yield found
    for op, factors in results.get("kitium_vs_stack", {}).items():
        for pair, factor in factors.items():
            yield {
                "target": STACK_TARGET,
                "subject": f"{op} {pair}",
                "value": factor,
                "limit": TARGET_STACK_FACTOR,
                "ok": factor >= TARGET_STACK_FACTOR,
            }
    for op in SINGLE_ROW_LOOKUPS:
        measured = ops.get(op, {}).get("measured", {})
        if "kitium-async" in measured and "raw-asyncpg" in measured:
            ratio = measured["kitium-async"]["median_us"] / measured["raw-asyncpg"]["median_us"]
            yield {
                "target": ASYNCPG_TARGET,
                "subject": op,
                "value": ratio,
                "limit": TARGET_ASYNCPG_RATIO,
                "ok": ratio <= TARGET_ASYNCPG_RATIO,
            }
    login = results.get("login", {}).get("measured", {})
    if "kitium-async" in login:
        for theirs in ("raw-asyncpg", "raw-asyncpg-tx"):
            if theirs in login:
                factor = login[theirs]["median_us"] / login["kitium-async"]["median_us"]
                yield {
                    "target": SIGN_IN_TARGET,
                    "subject": f"kitium-async vs {theirs}",
                    "value": factor,
                    "limit": 1.0,
                    "ok": factor > 1.0,
                }
    for name, rate in results.get("emit_events_per_s", {}).items():
        if name in KITIUM:
            yield {
                "target": EVENTS_TARGET,
                "subject": name,
                "value": rate,
                "limit": TARGET_EVENTS_PER_S,
                "ok": rate >= TARGET_EVENTS_PER_S,
            }
    scaling = results.get("scaling")
    if scaling:
        state = _judged_state(scaling)
        for op, ratio in scaling["max_over_min"][state].items():
            yield {
                "target": SCALING_TARGET,
                "subject": f"{op} kitium-sync {scaling['sizes'][0]}…{scaling['sizes'][-1]} rows"
                f" ({state})",
                "value": ratio,
                "limit": TARGET_SCALING_RATIO,
                "ok": ratio <= TARGET_SCALING_RATIO,
            }
    delete = results.get("delete")
    if delete:
        for name in KITIUM:
            m = delete["measured"].get(name)
            if m and m["longest_batch_ms"] is not None:
                yield {
                    "target": BATCH_TARGET,
                    "subject": f"delete_expired_sessions {name} (batch {delete['batch_size']})",
                    "value": m["longest_batch_ms"],
                    "limit": TARGET_BATCH_MS,
                    "ok": m["longest_batch_ms"] < TARGET_BATCH_MS,
                }
            for key, target, what in (
                ("reader_ratio", READER_TARGET, "median"),
                ("reader_p95_ratio", READER_P95_TARGET, "p95"),
            ):
                if m and key in m:
                    yield {
                        "target": target,
                        "subject": f"delete_expired_sessions {name}: concurrent get_session {what}",
                        "value": m[key],
                        "limit": TARGET_READER_RATIO,
                        "ok": m[key] <= TARGET_READER_RATIO,
                    }


# -- Markdown ----------------------------------------------------------------------------------


def _us(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    variants = [v for v, info in results["variants"].items() if info["available"]]
    missing = {
        v: info["reason"] for v, info in results["variants"].items() if not info["available"]
    }
    out: list[str] = ["# kitium-pg benchmark", ""]
    mode = "quick smoke run" if cfg["quick"] else "full run"
    out.append(
        f"{m['date_utc']}, {mode}: {cfg['users']:,} users, {cfg['sessions']:,} sessions,"
        f" {cfg['api_keys']:,} API keys; {cfg['rounds']} interleaved rounds of at most"
        f" {cfg['calls']} calls per variant (after {cfg['warmup']} warm-up calls); run took"
        f" {cfg['duration_s']:.0f} s."
    )
    out.append("")
    out.append("## Machine")
    out.append("")
    load = m.get("load_average") or []
    load_end = m.get("load_average_end") or []
    pg_settings = ", ".join(f"{k}={v}" for k, v in sorted(m["postgresql_settings"].items()))
    out += _table(
        ["what", "value"],
        [
            ["CPU", f"{m['cpu_model']}, {m['cores']} cores"],
            ["OS", m["platform"]],
            ["Python", m["python"]],
            ["PostgreSQL", f"{m['postgresql']} ({m['server']}, {m['connection']}); {pg_settings}"],
            ["libpq", str(m["libpq"])],
            [
                "load average (1/5/15 min)",
                f"start {' / '.join(f'{x:.2f}' for x in load)}; end"
                f" {' / '.join(f'{x:.2f}' for x in load_end)}",
            ],
            ["CPU layout while measuring latencies", _layout(results)],
            # Runs before --loop existed all ran on asyncio's own loop, and did not record it.
            ["event loop of the async variants", m.get("event_loop", "asyncio (not recorded)")],
            ["kitium-pg checkout", str(m.get("git_commit"))],
            [
                "packages",
                ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v is not None),
            ],
        ],
    )
    out.append("")
    if missing:
        out.append("**Variants not run** (optional packages missing; kitium and raw psycopg ran):")
        out += [f"- {name}: {reason}" for name, reason in missing.items()]
        out.append("")
    ops = results.get("ops", {})
    if ops:
        out += _ops_tables(results, variants)
    login = results.get("login")
    if login:
        out += ["## Sign-in: async create_session + emit_event", ""]
        out.append(
            "kitium-async writes both rows with one statement (`create_session(event=…)`: one"
            " round trip, one commit, atomic). Ratio is to raw-psycopg-async, which queues BEGIN,"
            " both INSERTs and COMMIT in one psycopg pipeline (one round trip, one commit)."
        )
        out.append("")
        rows = [
            [
                label,
                _us(r["median_us"]),
                _us(r["p95_us"]),
                _x(r.get("ratio_raw")),
                r["note"],
            ]
            for label, r in login["measured"].items()
        ]
        rows += [[label, "skip", "", "", reason] for label, reason in login["skipped"].items()]
        out += _table(["variant", "median µs", "p95 µs", "÷ pipelined floor", "how"], rows)
        out.append("")
    delete = results.get("delete")
    if delete:
        out += _delete_table(delete)
    scaling = results.get("scaling")
    if scaling:
        out += _scaling_table(scaling)
    if results.get("no_flush"):
        out += _no_flush_tables(results["no_flush"], variants)
    out += _targets_section(results)
    out += _method()
    return "\n".join(out) + "\n"


def readme_table(results: dict[str, Any]) -> str:
    """The per-operation table README.md shows between its ``bench-table`` markers: medians of
    kitium and of the floors and the SQLAlchemy stack on the same driver, with the ratios the
    targets are about (tests/test_benchmarks.py checks that README holds this run's table)."""
    ops = results.get("ops", {})
    header = [
        "operation",
        "kitium-sync µs",
        "÷ raw psycopg",
        "kitium-async µs",
        "÷ raw psycopg async",
        "÷ raw asyncpg",
        "SQLAlchemy (psycopg) µs",
        "SQLAlchemy ÷ kitium-sync",
    ]
    rows = []
    for op, section in ops.items():
        m = section["measured"]
        us = {name: _us(v["median_us"]) for name, v in m.items()}
        pairs = (
            ("kitium-sync", SYNC_BASELINE),
            ("kitium-async", ASYNC_BASELINE),
            ("kitium-async", "raw-asyncpg"),
            ("sqlalchemy-psycopg", "kitium-sync"),
        )
        ratios = [
            _x(m[a]["median_us"] / m[b]["median_us"]) if a in m and b in m else "—"
            for a, b in pairs
        ]
        rows.append(
            [
                f"`{op}`",
                us.get("kitium-sync", "—"),
                ratios[0],
                us.get("kitium-async", "—"),
                ratios[1],
                ratios[2],
                us.get("sqlalchemy-psycopg", "—"),
                ratios[3],
            ]
        )
    return "\n".join(_table(header, rows))


def _ops_tables(results: dict[str, Any], variants: list[str]) -> list[str]:
    ops = results["ops"]
    out = ["## Per-operation latency: median µs (p95 µs)", ""]
    skip_reasons: dict[str, int] = {}

    def skip_mark(reason: str) -> str:
        if reason not in skip_reasons:
            skip_reasons[reason] = len(skip_reasons) + 1
        return f"skip[{skip_reasons[reason]}]"

    rows = []
    for op, section in ops.items():
        row = [op]
        for v in variants:
            m = section["measured"].get(v)
            if m:
                row.append(f"{_us(m['median_us'])} ({_us(m['p95_us'])})")
            else:
                row.append(skip_mark(section["skipped"].get(v, "not measured")))
        rows.append(row)
    out += _table(["operation", *variants], rows)
    out.append("")
    if skip_reasons:
        out += [f"skip[{n}]: {reason}" for reason, n in skip_reasons.items()]
        out.append("")
    out += [
        "## Ratio to the raw-driver floor",
        "",
        "Sync variants ÷ raw-psycopg, async variants ÷ raw-psycopg-async (same SQL, one reused"
        " cursor, prepared, tuple rows).",
        "",
    ]
    rows = []
    for op, section in ops.items():
        row = [op]
        for v in variants:
            m = section["measured"].get(v)
            row.append(_x(m.get("ratio_raw")) if m else "—")
        rows.append(row)
    out += _table(["operation", *variants], rows)
    out.append("")
    factors = _stack_table(ops, results.get("kitium_vs_stack", {}))
    if factors:
        out += [
            "## kitium vs the SQLAlchemy stack",
            "",
            "How many times faster kitium is (their median ÷ kitium's median).",
            "",
            *factors,
        ]
    rates = results.get("emit_events_per_s", {})
    if rates:
        out += ["## emit_events throughput (batches of 1,000)", ""]
        out += _table(["variant", "events/s"], [[v, f"{rate:,.0f}"] for v, rate in rates.items()])
        out.append("")
    notes = {
        (v, op): m["note"]
        for op, section in ops.items()
        for v, m in section["measured"].items()
        if m.get("note")
    }
    if notes:
        out += ["How the SQLAlchemy variants do it (same result data as kitium):", ""]
        seen: set[str] = set()
        for (_, op), note in notes.items():
            if op not in seen:
                seen.add(op)
                out.append(f"- {op}: {note}")
        out.append("")
    return out


def _no_flush_tables(no_flush: dict[str, Any], variants: list[str]) -> list[str]:
    out = ["## Writes without the commit flush", ""]
    if "skipped" in no_flush:
        return [*out, f"Not run: {no_flush['skipped']}.", ""]
    out.append(
        "The write operations once more, with the server's `synchronous_commit` set to `off`"
        " for the time (ALTER SYSTEM, then reset): a commit no longer waits for its WAL flush,"
        " so what is left is the work of the client library and of the server. This is not a"
        " setting to run an auth store with; it shows how much of each write above is the"
        " disk. The targets are checked on the durable run above only."
    )
    out.append("")
    ops = no_flush["ops"]
    shown = [v for v in variants if any(v in section["measured"] for section in ops.values())]
    rows = []
    for op, section in ops.items():
        row = [op]
        for v in shown:
            m = section["measured"].get(v)
            row.append(f"{_us(m['median_us'])} ({_x(m.get('ratio_raw'))})" if m else "—")
        rows.append(row)
    out.append("Median µs (÷ the raw-driver floor):")
    out.append("")
    out += _table(["operation", *shown], rows)
    out.append("")
    factors = _stack_table(ops, no_flush.get("kitium_vs_stack", {}))
    if factors:
        out += [
            "How many times faster kitium is than the SQLAlchemy stack, without the flush:",
            "",
            *factors,
        ]
    return out


def _stack_table(ops: Iterable[str], stack: dict[str, dict[str, float]]) -> list[str]:
    """The kitium-vs-stack factors of ``ops``: a column per (kitium, stack) pair that was
    measured, then a blank line; nothing when no pair was."""
    pairs = [
        p for p in (f"{a} vs {b}" for a, b in STACK_PAIRS) if any(p in f for f in stack.values())
    ]
    if not pairs:
        return []
    rows = [[op, *[_x(stack.get(op, {}).get(p)) for p in pairs]] for op in ops]
    return [*_table(["operation", *pairs], rows), ""]


def _delete_table(delete: dict[str, Any]) -> list[str]:
    out = [
        f"## delete_expired_sessions over {delete['expired']:,} expired rows",
        "",
        f"kitium and raw psycopg delete in statements of {delete['batch_size']:,} rows (the"
        " adapter's loop; durations per statement from its `progress` callback); SQLAlchemy runs"
        " one bulk DELETE. Each variant purges its own freshly seeded rows (live rows stay)."
        " raw-psycopg+any-array (run only while the adapter's statement uses `id IN"
        " (subquery)`) chooses the batch by `id = ANY (ARRAY(subquery))`, which pins a"
        " primary-key index scan per batch; `IN` leaves the planner free to pick a hash"
        " semi-join over a sequential scan of the whole table, and it does on mid-sized tables.",
        "",
        "While each purge runs, a thread of the benchmark calls kitium-sync `get_session` on"
        " live sessions back to back on a connection of its own, as an application keeps"
        " serving requests; the same reader just before the purge, with nothing else running,"
        " gives the idle figures. The reader and its backend share the client's CPU and the"
        " purge's backend runs with the rest of the server, so the two differ by what the"
        " purge's statements do to the reads (locks, buffers, WAL), not by CPU placement.",
        "",
    ]
    rows = []
    for name, m in delete["measured"].items():
        rows.append(
            [
                name,
                f"{m['rows']:,}",
                f"{m['total_s']:.2f}",
                f"{m['rows_per_s']:,.0f}",
                str(m["batches"]),
                f"{m['longest_batch_ms']:.1f}",
                f"{m['median_batch_ms']:.1f}",
                f"{m['first_batch_ms']:.1f} / {m['last_batch_ms']:.1f}",
                _x(m.get("ratio_raw")),
                _reader(m),
            ]
        )
    out += _table(
        [
            "variant",
            "rows",
            "total s",
            "rows/s",
            "statements",
            "longest ms",
            "median ms",
            "first / last ms",
            "÷ raw-psycopg",
            "concurrent get_session µs: idle → during (median; p95)",
        ],
        rows,
    )
    out.append("")
    skipped = sorted(set(delete["skipped"]))
    if skipped:
        reasons = {delete["skipped"][v] for v in skipped}
        for reason in reasons:
            names = ", ".join(v for v in skipped if delete["skipped"][v] == reason)
            out.append(f"Not run for {names}: {reason}.")
        out.append("")
    return out


def _reader(m: dict[str, Any]) -> str:
    if "reader_ratio" not in m:
        return "—"
    idle, during = m["reader_idle"], m["reader_during"]
    return (
        f"{_us(idle['median_us'])} → {_us(during['median_us'])} ({m['reader_ratio']:.2f}×);"
        f" {_us(idle['p95_us'])} → {_us(during['p95_us'])}"
    )


def _resident(scaling: dict[str, Any]) -> str:
    shares = {
        state: share for state, share in scaling.get("resident", {}).items() if share is not None
    }
    if not shares:
        return ""
    listed = "; ".join(f"{state} {share:.1%}" for state, share in shares.items())
    return f"Share of those pages in shared buffers before each curve (pg_buffercache): {listed}."


def _judged_state(scaling: dict[str, Any]) -> str:
    """The state the flat-scaling target is checked on: warm when it was measured (the
    index's cost, with every size in memory), else cold."""
    return "warm" if "warm" in scaling["states"] else "cold"


def _scaling_table(scaling: dict[str, Any]) -> list[str]:
    sizes = scaling["sizes"]
    out = [
        "## Scaling (kitium-sync, median µs by table size)",
        "",
        "Each size is its own schema with that many users and sessions; sizes are interleaved."
        " **cold**: the tables as the seed left them: the indexes and the small tables in"
        " shared buffers, the large heaps only partly (COPY writes a table through a small ring"
        " of buffers, its indexes through the shared pool), the rest in the OS page cache;"
        " **warm**: every page of them loaded into shared buffers first (pg_prewarm), as on a"
        f" server whose memory holds them. {_resident(scaling)} In brackets, the pages one call"
        " touches / of them, the pages it brings into shared buffers from outside (means over"
        " the EXPLAIN (ANALYZE, BUFFERS) of fresh inputs): a B-tree one level deeper is one page"
        " more. The flat-scaling target is checked on the"
        f" {_judged_state(scaling)} curve.",
        "",
    ]
    if scaling.get("warm_skipped"):
        out += [f"Warm curve not measured: {scaling['warm_skipped']}.", ""]
    rows = []
    for state, curves in scaling["states"].items():
        for op, curve in curves.items():
            row = [f"{op} ({state})"]
            for n in sizes:
                point = curve[str(n)]
                pages = point.get("pages")
                cell = _us(point["median_us"])
                touched = pages["hit"] + pages["read"] if pages else 0
                row.append(f"{cell} [{touched:.1f} / {pages['read']:.1f}]" if pages else cell)
            row.append(_x(scaling["max_over_min"][state][op]))
            rows.append(row)
    out += _table(["operation", *[f"{n:,} rows" for n in sizes], "slowest ÷ fastest"], rows)
    out.append("")
    return out


def _targets_section(results: dict[str, Any]) -> list[str]:
    targets = results.get("targets", [])
    if not targets:
        return []
    misses = [t for t in targets if not t["ok"]]
    out = [
        "## Targets",
        "",
        f"{len(targets) - len(misses)} of {len(targets)} checks met.",
        "",
    ]
    checked = {t["target"] for t in targets}
    unchecked = [target for target in TARGETS if target not in checked]
    if unchecked:
        out += [
            "Not checked (the variants or sections they need did not run; see above):",
            "",
            *(f"- {target}" for target in unchecked),
            "",
        ]
    if misses:
        out += ["Missed:", ""]
        out += _table(
            ["target", "subject", "value", "limit"],
            [[t["target"], t["subject"], f"{t['value']:,.2f}", f"{t['limit']:,g}"] for t in misses],
        )
        out.append("")
    scaling = results.get("scaling")
    if scaling and _judged_state(scaling) == "warm":
        cold = scaling["max_over_min"]["cold"]
        out += [
            "Not judged: flat scaling on the cold curve (large heaps partly outside shared"
            " buffers), "
            + ", ".join(f"{op} {ratio:.2f}×" for op, ratio in cold.items())
            + " (see Scaling).",
            "",
        ]
    return out


def _layout(results: dict[str, Any]) -> str:
    applied = results.get("cpu_layout") or {}
    if not applied:
        return f"{results['config'].get('cpu_layout', 'os')} (no section pinned)"
    return "; ".join(f"{section}: {cpus.summary(a)}" for section, a in applied.items())


def _method() -> list[str]:
    return [
        "## Method",
        "",
        "- Every operation's variants run interleaved: in round r each variant runs one batch,"
        " in an order rotated by r, so noise from the (shared) machine hits all alike. Medians"
        " and p95 are over all timed calls; inputs are drawn at random from the seeded rows"
        " before each batch (outside the timing).",
        "- Latencies are measured with the client and every server process pinned to"
        " CPUs of their own (`--cpu-layout split`, see the machine table): left to the"
        " scheduler, one connection's backend may share the client's CPU and another's not,"
        " and the same statement then runs 25 µs on one connection and 70 µs on the other"
        " (benchmarks/results/cpu_layout.md), which would put the scheduler's choice into"
        " every ratio.",
        "- raw-psycopg / raw-psycopg-async execute the adapter's own SQL text"
        " (`kitium_pg._sql.queries()[name].sql`) on ONE reused cursor with `prepare=True` and"
        " tuple rows, with the adapter's session settings; raw-asyncpg runs the same SQL with"
        " `$n` placeholders as prepared statements (jsonb left as text, asyncpg's default)."
        " Raw writes still generate the UUIDv7 ids and serialise JSON, as any caller must.",
        "- SQLAlchemy variants use ORM models of the same tables (schema_translate_map onto"
        " the benchmark schema) with default engines and one ORM Session per call, so a read is"
        " BEGIN, SELECT, ROLLBACK and a write BEGIN, INSERT … RETURNING, COMMIT.",
        "- fastapi-users runs `SQLAlchemyUserDatabase.get_by_email` (lower(email) ="
        " lower(:email)) on its own `user` table as its DDL ships (a unique index on email only,"
        " so a sequential scan), and on a copy with an added `lower(email)` index; on asyncpg as"
        " its docs show, and on psycopg 3 async (`fastapi-users-psycopg…`).",
        "- verify_api_key: seeded keys carry a `last_used_at` a day ahead, so every variant"
        " takes the read-only branch (a busy key stamped within the minute).",
        "- twofa_backup_codes is seeded (10 codes for every fifth user) and analyzed: on an"
        " empty table the plan `replace_backup_codes` caches per connection is a sequential"
        " scan, and create_backup_codes then slows down with every code written.",
        "- Writes commit one by one with `synchronous_commit=on`: their latency includes a WAL"
        " flush, which is most of it (the no-flush section measures them without it).",
        "",
    ]


# -- chart -------------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> bool:
    """Bar chart of medians per operation per variant, the scaling curve and the login
    comparison; ``False`` when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = results.get("ops", {})
    variants = [v for v, info in results["variants"].items() if info["available"]]
    fig = plt.figure(figsize=(17, 11), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2))
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, len(variants))
    cmap = plt.get_cmap("tab20")
    for i, v in enumerate(variants):
        xs, ys = [], []
        for k, section in enumerate(ops.values()):
            m = section["measured"].get(v)
            if m:
                xs.append(k + (i - (len(variants) - 1) / 2) * width)
                ys.append(m["median_us"])
        bars.bar(xs, ys, width=width, label=v, color=cmap(i % 20))
    bars.set_xticks(range(len(ops)), list(ops), rotation=20, ha="right")
    bars.set_yscale("log")
    bars.set_ylabel("median µs per call (log)")
    bars.set_title("Median latency per operation and variant")
    bars.legend(ncol=5, fontsize="small")
    bars.grid(axis="y", which="both", alpha=0.3)
    scaling = results.get("scaling")
    curve_ax = fig.add_subplot(grid[1, 0])
    if scaling:
        sizes = scaling["sizes"]
        for state, curves in scaling["states"].items():
            for op, curve in curves.items():
                curve_ax.plot(
                    sizes,
                    [curve[str(n)]["median_us"] for n in sizes],
                    marker="o",
                    linestyle="-" if state == "warm" else "--",
                    label=f"{op} ({state})",
                )
        curve_ax.set_xscale("log")
        curve_ax.set_ylim(bottom=0)
        curve_ax.set_xlabel("rows in users / sessions")
        curve_ax.set_ylabel("median µs per call")
        curve_ax.set_title("Scaling, kitium-sync")
        curve_ax.legend()
        curve_ax.grid(alpha=0.3)
    login_ax = fig.add_subplot(grid[1, 1])
    login = results.get("login")
    if login:
        labels = list(login["measured"])
        login_ax.barh(labels, [login["measured"][label]["median_us"] for label in labels])
        login_ax.invert_yaxis()
        login_ax.set_xlabel("median µs per login (create_session + emit_event)")
        login_ax.set_title("Async login")
        login_ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- output ------------------------------------------------------------------------------------


def bench_lines(results: dict[str, Any]) -> list[str]:
    """One ``bench:`` line per measured (operation, variant); ``us`` is the median µs per call
    (for delete_expired_sessions, the whole purge)."""
    lines = []

    def line(op: str, variant: str, us: float, ratio: float | None) -> str:
        shown = "n/a" if ratio is None else f"{ratio:.2f}"
        return f"bench: op={op} variant={variant} us={us:.1f} ratio_raw={shown}"

    for op, section in results.get("ops", {}).items():
        for v, m in section["measured"].items():
            lines.append(line(op, v, m["median_us"], m.get("ratio_raw")))
    if results.get("login"):
        for v, m in results["login"]["measured"].items():
            lines.append(line("login", v, m["median_us"], m.get("ratio_raw")))
    if results.get("delete"):
        for v, m in results["delete"]["measured"].items():
            lines.append(line("delete_expired_sessions", v, m["total_s"] * 1e6, m.get("ratio_raw")))
    return lines


def finish(results: dict[str, Any], out_dir: Path) -> None:
    """Derive, write ``latest.md``/``.json``/``.png`` into ``out_dir``, print the Markdown and
    then the ``bench:`` lines."""
    derive(results)
    lines = bench_lines(results)
    results["claimed"] = [[part.split("=", 1)[1] for part in line.split()[1:3]] for line in lines]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    png = out_dir / "latest.png"
    if chart(results, png):
        text += "\n![medians, scaling curve and login](latest.png)\n"
    else:
        text += "\n(no chart: matplotlib is not installed)\n"
        log("chart skipped: matplotlib is not installed")
    tmp_md, tmp_json = out_dir / "latest.md.tmp", out_dir / "latest.json.tmp"
    tmp_md.write_text(text, encoding="utf-8")
    tmp_json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_md, out_dir / "latest.md")
    os.replace(tmp_json, out_dir / "latest.json")
    print(text)
    for line in lines:
        print(line)

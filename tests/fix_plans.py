"""Query plans of the adapter's statements, for the tests that pin an index or a keyset bound."""

from __future__ import annotations

import re
from typing import Any

import psycopg

from kitium_pg import _sql


def plan_of(dsn: str, schema: str, query: str, params: dict[str, Any]) -> str:
    """The plan of ``query`` (its statement, parameters inlined), sequential and bitmap scans off
    so that the test's few rows are read the way a large table's would be."""
    sql = _sql.queries(schema)[query].sql
    with psycopg.connect(dsn, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        rows = conn.execute(f"EXPLAIN (COSTS OFF) {sql}".encode(), params).fetchall()
        conn.rollback()
    return "\n".join(row[0] for row in rows)


def generic_plan_of(dsn: str, schema: str, query: str, params: dict[str, Any]) -> str:
    """The generic plan of ``query`` (the plan psycopg's prepared statement settles on, whatever
    the values: ``plan_cache_mode = force_generic_plan``), prepared with ``$n`` parameters and
    explained for ``params``; sequential and bitmap scans off as in ``plan_of``."""
    names: list[str] = []

    def positional(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", positional, _sql.queries(schema)[query].sql).replace("%%", "%")
    arguments = ", ".join(["%s"] * len(names))
    with psycopg.connect(dsn, cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        conn.execute(f"PREPARE generic_plan AS {sql}".encode())
        rows = conn.execute(
            f"EXPLAIN (COSTS OFF) EXECUTE generic_plan({arguments})".encode(),
            [params[name] for name in names],
        ).fetchall()
        conn.rollback()
    return "\n".join(row[0] for row in rows)

"""Lint of queries/ and migrations/: the conventions a DBA review relies on, and the traps of
aiosql + psycopg (see shared reference aiosql-psycopg.md)."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path
from typing import Any, cast

import pytest

from kitium_pg import Permission, _sql

ROOT = Path(__file__).resolve().parent.parent
QUERY_FILES = sorted((ROOT / "queries").glob("*.sql"))
NAME_RE = re.compile(r"^-- name: (\w+)(?:\(([\w, ]*)\)([\^$!]?)|#)$")
TABLE_REF_RE = re.compile(
    r"(?<!DISTINCT )\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?!kitium_auth\.|pg_catalog\.)"
    r"([a-z_]+)\b(?!\s*\()"
)  # (IS [NOT] DISTINCT FROM compares values: what follows it is no table)
# Names that may follow FROM/JOIN without a schema: CTE names and set-returning functions.
LOCAL_NAMES = {
    "inserted",
    "clock",
    "swapped",
    "due",
    "challenge",
    "link",
    "existing",
    "target",
    "consumed",
    "upd",
    "batch",
    "unnest",
    "members",
    "new_members",
    "kept",
    "input",
    "rows",
    "source",
    "deleted",
    "removed",
    "updated",
    "given",
    "picked",
    "touched",
    "ins",
    "del",
    "added",
    "org",
    "m",
    "events",
    "lateral",
    "applying",
    "parents",
    "ended",
    "rotated",
    "reached",
    "owner",
    "owners",
    "member",
    "written",
    "locked",
    "address",
    "counters",
}


def _blocks(path: Path) -> list[tuple[str, list[str]]]:
    blocks: list[tuple[str, list[str]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("-- name:"):
            blocks.append((line, []))
        elif blocks:
            blocks[-1][1].append(line)
    return blocks


@pytest.mark.parametrize("path", QUERY_FILES, ids=lambda p: p.name)
def test_every_query_is_named_documented_and_explicit(path: Path) -> None:
    blocks = _blocks(path)
    assert blocks, f"{path.name} has no queries"
    for header, body in blocks:
        match = NAME_RE.match(header)
        assert match, f"{path.name}: malformed header {header!r} (declare the parameter list)"
        name = match.group(1)
        assert body and body[0].startswith("-- ") and len(body[0]) > 10, (
            f"{path.name}:{name}: the line after the name must state the query's purpose"
        )
        sql = "\n".join(line for line in body if not line.lstrip().startswith("--"))
        comments = "\n".join(line for line in body if line.lstrip().startswith("--"))
        assert not re.search(r"(SELECT|RETURNING)\s+\*", sql, re.I), f"{name}: list columns"
        assert not re.search(r"(?<!%)%(?!%)", sql.replace("%%", "")), f"{name}: write % as %%"
        assert not re.search(r"(?<!:):[a-z_]\w*", comments), f"{name}: no :word in comments"
        assert not re.search(r"\bE'", sql), f"{name}: no E'' escapes"
        for table in TABLE_REF_RE.findall(sql):
            assert table in LOCAL_NAMES, f"{name}: qualify {table!r} with kitium_auth."


def test_every_query_is_used_and_every_used_query_exists() -> None:
    # The async adapter (the sync one is generated from it) and the package's other modules
    # (the demo's diagnostics).
    source = "\n".join(
        p.read_text() for p in (ROOT / "kitium_pg").rglob("*.py") if "_sync" not in p.parts
    )
    used = set(re.findall(r"_(?:one|many|value|exec|run|delete_in_batches)\(\s*\"(\w+)\"", source))
    used |= set(re.findall(r"_queries\[\"(\w+)\"\]", source))
    defined = set(_sql.queries())
    assert used - defined == set(), "queries referenced in code but missing from queries/"
    # Names picked at run time (e.g. one query per filter) appear as string literals.
    named = {literal for literal in re.findall(r"\"(\w+)\"", source) if literal in defined}
    assert defined - used - named == set(), "queries defined in queries/ but never used"


def test_queries_load_for_another_schema_without_the_default_qualifier() -> None:
    for query in _sql.queries("tenant_x").values():
        assert "kitium_auth" not in query.sql


def test_migrations_have_up_and_down_and_no_search_path_dependence() -> None:
    for path in sorted((ROOT / "migrations").glob("*.sql")):
        text = path.read_text()
        assert text.count("-- migrate:up") == 1 and text.count("-- migrate:down") == 1
        assert re.match(r"^\d{4}_[a-z0-9_]+\.sql$", path.name)
        assert "TIMESTAMP " not in text.upper().replace("TIMESTAMPTZ", ""), "use timestamptz"
        for table in re.findall(r"CREATE TABLE (?!kitium_auth\.)(\w+)", text):
            pytest.fail(f"{path.name}: unqualified table {table}")


class _Described:
    """Stands in for a cursor holding a result: only its column names are read."""

    def __init__(self, *names: str) -> None:
        self.description = [type("Column", (), {"name": name})() for name in names]


def _query(name: str) -> _sql.Query:
    # A distinct SQL text per test: binders are cached by SQL text.
    return _sql.Query(name, f"SELECT /* {name} */ 1", _sql.Shape.ONE)


def test_binder_builds_what_the_keyword_call_builds() -> None:
    query = _query("binder_same")
    row: tuple[Any, ...] = ("perm.read", "docs", None, "read docs", {"level": 1})
    names = ("name", "resource", "action", "description", "metadata")
    bind = _sql.binder(query, cast(Any, _Described(*names)))
    assert bind(Permission, row) == Permission(**dict(zip(names, row, strict=True)))
    assert bind(dict, row) == dict(zip(names, row, strict=True))
    # Cached per query: the names are read off the first result only.
    assert _sql.binder(query, cast(Any, _Described("ignored"))) is bind


def test_binder_cache_does_not_grow_with_bound_methods() -> None:
    """Adapter views (transactions, tenant views) bind rows with bound methods of their own:
    the cache is per query, so views neither add entries nor stay referenced by it."""

    class View:
        def make(self, **columns: Any) -> dict[str, Any]:
            return columns

    query = _query("binder_bound_methods")
    names = ("name", "resource")
    before = len(_sql._BINDERS)
    views = [View() for _ in range(50)]
    for view in views:
        assert _sql.binder(query, cast(Any, _Described(*names)))(view.make, ("a", "b")) == {
            "name": "a",
            "resource": "b",
        }
    assert len(_sql._BINDERS) == before + 1
    collected = weakref.ref(views[0])
    del view, views
    gc.collect()
    assert collected() is None


@pytest.mark.parametrize(
    "names",
    [
        ("id", "x-y"),
        ("id", "class"),
        ("id", "id"),
        ("a = 1); import os; (b",),
        ("1st",),
        ("id", "make"),
        ("row",),
    ],
)
def test_binder_compiles_only_distinct_identifiers(names: tuple[str, ...]) -> None:
    query = _query(f"binder_refuses_{abs(hash(names))}")
    with pytest.raises(RuntimeError, match="unusable result column names"):
        _sql.binder(query, cast(Any, _Described(*names)))
    assert query.sql not in _sql._BINDERS

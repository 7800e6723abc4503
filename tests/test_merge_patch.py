"""kitium_auth.jsonb_merge_patch (migration 0014), the RFC 7396 JSON Merge Patch behind the
update methods' ``metadata_patch``: against a Python model of the RFC, its Appendix A examples,
and the SQL NULL cases the queries rely on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from kitium_pg import PostgresStorageAdapter

from .conftest import examples


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2, MergePatch(Target, Patch), written from the RFC's pseudocode."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


@pytest.fixture(scope="module")
def conn(dsn: str, sync_adapter: PostgresStorageAdapter) -> Iterator[psycopg.Connection[Any]]:
    """A plain connection to the migrated test database (``sync_adapter`` migrated it)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


def _sql_merge(conn: psycopg.Connection[Any], target: Any, patch: Any) -> str | None:
    """The function's result as JSON text (``None`` for SQL NULL; JSON null is ``'null'``)."""
    row = conn.execute(
        "SELECT kitium_auth.jsonb_merge_patch(%s, %s)::text", (Jsonb(target), Jsonb(patch))
    ).fetchone()
    assert row is not None
    merged: str | None = row[0]
    return merged


# RFC 7396 Appendix A: original, patch, result.
APPENDIX_A = [
    ('{"a":"b"}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"b"}', '{"b":"c"}', '{"a":"b","b":"c"}'),
    ('{"a":"b"}', '{"a":null}', "{}"),
    ('{"a":"b","b":"c"}', '{"a":null}', '{"b":"c"}'),
    ('{"a":["b"]}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"c"}', '{"a":["b"]}', '{"a":["b"]}'),
    ('{"a":{"b":"c"}}', '{"a":{"b":"d","c":null}}', '{"a":{"b":"d"}}'),
    ('{"a":[{"b":"c"}]}', '{"a":[1]}', '{"a":[1]}'),
    ('["a","b"]', '["c","d"]', '["c","d"]'),
    ('{"a":"b"}', '["c"]', '["c"]'),
    ('{"a":"foo"}', "null", "null"),
    ('{"a":"foo"}', '"bar"', '"bar"'),
    ('{"e":null}', '{"a":1}', '{"e":null,"a":1}'),
    ("[1,2]", '{"a":"b","c":null}', '{"a":"b"}'),
    ("{}", '{"a":{"bb":{"ccc":null}}}', '{"a":{"bb":{}}}'),
]


@pytest.mark.parametrize(("original", "patch", "result"), APPENDIX_A)
def test_rfc_7396_appendix_a(
    conn: psycopg.Connection[Any], original: str, patch: str, result: str
) -> None:
    merged = _sql_merge(conn, json.loads(original), json.loads(patch))
    assert merged is not None
    assert json.loads(merged) == json.loads(result)


def test_sql_null_target_is_absent_and_sql_null_patch_keeps_the_target(
    conn: psycopg.Connection[Any],
) -> None:
    def merge(target: str | None, patch: str | None) -> Any:
        row = conn.execute(
            "SELECT kitium_auth.jsonb_merge_patch(%s::jsonb, %s::jsonb)::text", (target, patch)
        ).fetchone()
        assert row is not None
        return row[0]

    assert merge(None, '{"a": 1, "b": null}') == '{"a": 1}'
    assert merge(None, "[1]") == "[1]"
    assert merge('{"a": 1}', None) == '{"a": 1}'
    assert merge("[1]", None) == "[1]"
    assert merge(None, None) is None
    # JSON null is a patch like any other non-object: it replaces the target.
    assert merge('{"a": 1}', "null") == "null"


KEYS = st.sampled_from(["a", "b", "c", "", "é", "%s", "a.b"])  # few: targets and patches meet
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0.5, -2.25, 1e-3]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4),  # no NUL in jsonb
)
JSON = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=20,
)
OBJECTS = st.dictionaries(KEYS, JSON, max_size=5)


@settings(max_examples=examples(300), deadline=None)
@given(target=st.one_of(OBJECTS, JSON), patch=st.one_of(OBJECTS, JSON))
def test_agrees_with_the_rfc_model_and_is_idempotent(
    conn: psycopg.Connection[Any], target: Any, patch: Any
) -> None:
    """Any target (objects, arrays, scalars, JSON null) and any patch (nested objects with nulls
    in them, arrays, scalars): the function's result is the model's, and applying the patch to
    that result again changes nothing (so a retried update is safe)."""
    merged = _sql_merge(conn, target, patch)
    assert merged is not None
    expected = merge_patch(target, patch)
    assert json.loads(merged) == expected
    again = _sql_merge(conn, json.loads(merged), patch)
    assert again is not None and json.loads(again) == expected

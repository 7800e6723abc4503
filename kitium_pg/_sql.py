"""Where the SQL comes from: ``queries/*.sql`` loaded by aiosql, ``migrations/*.sql`` read as text.

aiosql parses the named queries (``-- name: get_user(id)^``) and converts ``:name`` to psycopg's
``%(name)s``; we keep its parsed SQL and operator and execute it ourselves with a typed row
factory (aiosql's ``record_class`` is deprecated and unsafe with dict rows). The SQL files are
written against the schema ``kitium_auth``; an adapter configured with another schema gets a
copy with that qualifier rewritten, so no statement ever depends on ``search_path``.
"""

from __future__ import annotations

import enum
import functools
import keyword
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import aiosql
import attrs
from aiosql.types import SQLOperationType
from psycopg import AsyncCursor, Cursor

from ._validate import plain
from .errors import ValidationError

T = TypeVar("T")

DEFAULT_SCHEMA: Final = "kitium_auth"
_SCHEMA_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_QUALIFIER_RE: Final = re.compile(rf"\b{DEFAULT_SCHEMA}\b")
# PostgreSQL's keywords (pg_get_keywords(), PostgreSQL 15 to 18) that cannot stand bare where
# the adapter writes a name into SQL text: reserved ones (catcode R) nowhere, so not as the role
# of `GRANT ... TO role`; column-name and type-or-function ones (C, T) not before the dot of a
# qualified name either, so not as the schema: `real.users` or `user.users` is a syntax error.
# A test compares both sets with the server's.
RESERVED_KEYWORDS: Final = frozenset(
    """
    all analyse analyze and any array as asc asymmetric both case cast check collate column
    constraint create current_catalog current_date current_role current_time
    current_timestamp current_user default deferrable desc distinct do else end except false
    fetch for foreign from grant group having in initially intersect into lateral leading
    limit localtime localtimestamp not null offset on only or order placing primary
    references returning select session_user some symmetric system_user table then to
    trailing true union unique user using variadic when where window with
    """.split()  # noqa: SIM905 (as pg_get_keywords() lists them; literal lists are long)
)
_KEYWORDS: Final = RESERVED_KEYWORDS | frozenset(
    """
    authorization between bigint binary bit boolean char character coalesce collation
    concurrently cross current_schema dec decimal exists extract float freeze full greatest
    grouping ilike inner inout int integer interval is isnull join json json_array
    json_arrayagg json_exists json_object json_objectagg json_query json_scalar
    json_serialize json_table json_value least left like merge_action national natural nchar
    none normalize notnull nullif numeric out outer overlaps overlay position precision real
    right row setof similar smallint substring tablesample time timestamp treat trim values
    varchar verbose xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces
    xmlparse xmlpi xmlroot xmlserialize xmltable
    """.split()  # noqa: SIM905
)


class Shape(enum.Enum):
    """What a query returns, from its aiosql operator."""

    MANY = "many"  # no suffix: all rows
    ONE = "one"  # ^: first row or None
    VALUE = "value"  # $: first column of the first row, or None
    EXEC = "exec"  # !: row count
    SCRIPT = "script"  # #: several statements, no parameters


# Keyed by aiosql's own operation types (the suffix of ``-- name:``); the others (``<!``,
# ``*!``) are not used in queries/ and are skipped.
_SHAPES: Final = {
    SQLOperationType.SELECT: Shape.MANY,
    SQLOperationType.SELECT_ONE: Shape.ONE,
    SQLOperationType.SELECT_VALUE: Shape.VALUE,
    SQLOperationType.INSERT_UPDATE_DELETE: Shape.EXEC,
    SQLOperationType.SCRIPT: Shape.SCRIPT,
}


@attrs.frozen
class Query:
    """One named statement: its name, psycopg-ready SQL text and result shape."""

    name: str
    sql: str
    shape: Shape


def data_dir(name: str) -> Path:
    """The ``queries`` or ``migrations`` folder: inside the installed wheel, else the checkout."""
    packaged = resources.files("kitium_pg") / name
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"kitium_pg: cannot find the {name}/ folder (broken installation)")


def check_schema(schema: str) -> str:
    """``schema`` if it is a plain lowercase identifier that is not an SQL keyword (it is written
    into SQL text unquoted); else ``ValidationError`` naming ``schema``."""
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ValidationError("schema", "must match [a-z_][a-z0-9_]* (at most 63 characters)")
    schema = plain(schema)  # a subclass may answer == or hash() for another name
    if schema == "information_schema" or schema.startswith("pg_"):
        # PostgreSQL's own schemas: pg_* cannot be created, and pg_dump leaves
        # information_schema out, so the auth data would be missing from every backup.
        raise ValidationError("schema", f"{schema!r} is reserved for PostgreSQL's own objects")
    if schema in _KEYWORDS:
        raise ValidationError("schema", f"{schema!r} is an SQL keyword PostgreSQL will not parse")
    return schema


def in_schema(sql: str, schema: str) -> str:
    """``sql`` with the ``kitium_auth`` qualifier replaced by ``schema``."""
    return sql if schema == DEFAULT_SCHEMA else _QUALIFIER_RE.sub(schema, sql)


def statements(sql: str) -> tuple[str, ...]:
    """The statements of ``sql`` in order, each with its terminating semicolon and without its
    comments (``pg_stat_activity`` and the server log then show the statement itself), for the
    migration parts that run outside a transaction, one statement at a time: PostgreSQL runs
    several statements sent together in one transaction, where ``CREATE INDEX CONCURRENTLY`` is
    refused. sqlparse splits them: it knows quoted strings, dollar quoting and comments."""
    import sqlparse  # only migrations that run outside a transaction need it

    code = (_without_comments(s) for s in sqlparse.split(sql, strip_semicolon=False))
    return tuple(c for c in code if c)


def _without_comments(sql: str) -> str:
    """``sql`` with its comments removed and its ends stripped (sqlparse)."""
    import sqlparse

    return str(sqlparse.format(sql, strip_comments=True)).strip()


@functools.cache
def _parsed() -> dict[str, Query]:
    loaded = aiosql.from_path(data_dir("queries"), "psycopg")
    found: dict[str, Query] = {}
    for name in loaded.available_queries:
        fn = getattr(loaded, name)
        shape = _SHAPES.get(fn.operation)
        if name.endswith("_cursor") or shape is None:
            continue
        found[name] = Query(name, fn.sql, shape)
    return found


_BINDERS: dict[str, Callable[[Callable[..., Any], Sequence[Any]], Any]] = {}


def binder(
    query: Query, cursor: Cursor[Any] | AsyncCursor[Any]
) -> Callable[[Callable[..., T], Sequence[Any]], T]:
    """The function ``bind(make, row)`` that turns one result row of ``query`` into
    ``make(column=value, ...)``, built from the column names on ``cursor`` (which holds its
    result) the first time and cached per query: a named query's explicit column list never
    changes, so the names are read once, not off every result. ``make`` is an argument, not
    part of the cache key: a bound method of a short-lived adapter view would otherwise add an
    entry (and keep the view alive) for every view.

    It is generated, as ``collections.namedtuple`` and attrs' own ``__init__`` are: one keyword
    call taking the values by position, which spares the dict that ``make(**dict(zip(...)))``
    builds for every row (a third of the cost of a record; benchmarks/results/
    profile_get_session.md). Only plain identifiers are ever compiled: a result column whose
    name is not one, or appears twice, raises ``RuntimeError``.
    """
    bind = _BINDERS.get(query.sql)
    if bind is None:
        names = tuple(column.name for column in cursor.description or ())
        unusable = sorted(
            {
                n
                for n in names
                if not n.isidentifier()
                or keyword.iskeyword(n)
                or n in ("make", "row")  # the generated function's own parameters
                or names.count(n) > 1
            }
        )
        if unusable:
            raise RuntimeError(f"query {query.name}: unusable result column names {unusable}")
        arguments = ", ".join(f"{name}=row[{i}]" for i, name in enumerate(names))
        namespace: dict[str, Any] = {}
        exec(f"def bind(make, row):\n    return make({arguments})\n", namespace)  # noqa: S102
        bind = _BINDERS[query.sql] = namespace["bind"]
    return cast("Callable[[Callable[..., T], Sequence[Any]], T]", bind)


@functools.cache
def queries(schema: str = DEFAULT_SCHEMA) -> dict[str, Query]:
    """Every named query, for ``schema``."""
    check_schema(schema)
    return {
        name: attrs.evolve(query, sql=in_schema(query.sql, schema))
        for name, query in _parsed().items()
    }

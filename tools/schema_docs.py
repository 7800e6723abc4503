"""Write docs/schema.md: the schema reference, read from a live database after the migrations.

    python tools/schema_docs.py            # embedded PostgreSQL in a temporary folder
    python tools/schema_docs.py --check    # exit 1 when docs/schema.md is not current
    python tools/schema_docs.py --dsn postgresql://...  # a database of yours (migrated first)

The page lists every table of the schema with its columns (type, nullability, default), indexes
and constraints, the functions, and a mermaid ER diagram drawn from the foreign keys. Only the
default migrations are applied (optional ones such as ``tenant_rls`` are left out), so the
output depends on ``migrations/`` alone; on a database of yours, optional migrations already
applied there would show up. Nothing in the output depends on the run (no dates, no OIDs).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kitium_pg import PostgresStorageAdapter  # noqa: E402

DEFAULT_OUTPUT = ROOT / "docs" / "schema.md"


@dataclass
class Column:
    name: str
    type: str
    not_null: bool
    default: str | None
    generated: bool


@dataclass
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    target: str
    target_columns: tuple[str, ...]
    definition: str


@dataclass
class Table:
    name: str
    columns: list[Column] = field(default_factory=list)
    indexes: list[tuple[str, str]] = field(default_factory=list)
    constraints: list[tuple[str, str, str]] = field(default_factory=list)
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    unique_sets: list[frozenset[str]] = field(default_factory=list)
    primary_key: tuple[str, ...] = ()


_KINDS = {"p": "primary key", "u": "unique", "f": "foreign key", "c": "check", "x": "exclusion"}


def read_schema(conn: psycopg.Connection[Any], schema: str) -> tuple[list[Table], list[str]]:
    """Tables (with columns, indexes, constraints, foreign keys) and function signatures."""
    tables: list[Table] = []
    rows = conn.execute(
        """
        SELECT c.oid, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY c.relname
        """,
        [schema],
    ).fetchall()
    for oid, name in rows:
        table = Table(name)
        for col in conn.execute(
            """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attgenerated <> ''
            FROM pg_attribute a
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
            """,
            [oid],
        ):
            table.columns.append(Column(*col))
        table.indexes = [
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                """
                SELECT i.relname, pg_get_indexdef(i.oid)
                FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                WHERE x.indrelid = %s ORDER BY i.relname
                """,
                [oid],
            )
        ]
        for unique_cols in conn.execute(
            """
            SELECT array_agg(a.attname::text ORDER BY a.attname)
            FROM pg_index x
            JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY (x.indkey)
            WHERE x.indrelid = %s AND x.indisunique AND x.indpred IS NULL
            GROUP BY x.indexrelid
            """,
            [oid],
        ):
            table.unique_sets.append(frozenset(unique_cols[0]))
        for conname, contype, definition, cols, target, target_cols in conn.execute(
            """
            SELECT c.conname, c.contype, pg_get_constraintdef(c.oid),
                   ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n
                         ORDER BY k.i),
                   t.relname,
                   ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                         JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n
                         ORDER BY k.i)
            FROM pg_constraint c LEFT JOIN pg_class t ON t.oid = c.confrelid
            WHERE c.conrelid = %s AND c.contype IN ('p', 'u', 'f', 'c', 'x')
            ORDER BY c.conname
            """,
            [oid],
        ):
            table.constraints.append((conname, _KINDS[contype], definition))
            if contype == "p":
                table.primary_key = tuple(cols)
            if contype == "f":
                table.foreign_keys.append(
                    ForeignKey(conname, tuple(cols), target, tuple(target_cols), definition)
                )
        tables.append(table)
    functions = [
        f"{r[0]}({r[1]}) returns {r[2]}"
        for r in conn.execute(
            """
            SELECT p.proname, pg_get_function_identity_arguments(p.oid),
                   pg_get_function_result(p.oid)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = %s ORDER BY p.proname, 2
            """,
            [schema],
        )
    ]
    return tables, functions


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _mermaid_type(sql_type: str) -> str:
    text = sql_type.replace("timestamp with time zone", "timestamptz")
    text = re.sub(r"\(.*?\)", "", text).replace("[]", "_array")
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def er_diagram(tables: list[Table]) -> list[str]:
    """Mermaid ``erDiagram`` lines: each table with its columns, one edge per foreign key."""
    lines = ["```mermaid", "erDiagram"]
    by_name = {t.name: t for t in tables}
    for table in tables:
        fk_cols = {c for fk in table.foreign_keys for c in fk.columns}
        lines.append(f"    {table.name} {{")
        for col in table.columns:
            keys = []
            if col.name in table.primary_key:
                keys.append("PK")
            if col.name in fk_cols:
                keys.append("FK")
            suffix = f" {','.join(keys)}" if keys else ""
            lines.append(f"        {_mermaid_type(col.type)} {col.name}{suffix}")
        lines.append("    }")
    for table in tables:
        for fk in table.foreign_keys:
            if fk.target not in by_name:
                continue
            columns = {c.name: c for c in table.columns}
            optional = any(not columns[c].not_null for c in fk.columns)
            one = frozenset(fk.columns) in table.unique_sets
            parent = "|o" if optional else "||"
            child = "o|" if one else "o{"
            label = ", ".join(fk.columns)
            lines.append(f'    {fk.target} {parent}--{child} {table.name} : "{label}"')
    lines.append("```")
    return lines


def render(schema: str, applied: tuple[str, ...], tables: list[Table], functions: list[str]) -> str:
    out = [
        "# Schema reference",
        "",
        "<!-- Generated by tools/schema_docs.py from a live database; do not edit by hand. -->",
        "",
        f"The `{schema}` schema after migrations {', '.join(f'`{m}`' for m in applied)}, read"
        " from PostgreSQL's catalogs by `python tools/schema_docs.py` (CI checks that this page"
        " is current). The optional `tenant_rls` migration is not applied here. Every name is"
        " qualified with the schema in the queries; the schema name is configurable.",
        "",
        "## Entity relationships",
        "",
        "Foreign keys, drawn from the referenced table to the referencing one (`||`: required,"
        " `|o`: optional; `o{`: many, `o|`: at most one).",
        "",
        *er_diagram(tables),
        "",
        "## Tables",
        "",
        ", ".join(f"[`{t.name}`](#{t.name})" for t in tables),
        "",
    ]
    for table in tables:
        out += [
            f"### {table.name}",
            "",
            "| column | type | null | default |",
            "| --- | --- | --- | --- |",
        ]
        for col in table.columns:
            default = col.default or ""
            if col.generated and default:
                default = f"generated: {default}"
            out.append(
                f"| `{col.name}` | `{_cell(col.type)}` | {'no' if col.not_null else 'yes'} |"
                f" {f'`{_cell(default)}`' if default else ''} |"
            )
        out += ["", "Indexes:", ""]
        out += [f"- `{name}`: `{_cell(defn)}`" for name, defn in table.indexes] or ["- none"]
        out += ["", "Constraints:", ""]
        out += [
            f"- `{name}` ({kind}): `{_cell(defn)}`" for name, kind, defn in table.constraints
        ] or ["- none"]
        out.append("")
    out += ["## Functions", ""]
    out += [f"- `{_cell(sig)}`" for sig in functions] or ["- none"]
    out.append("")
    return "\n".join(out)


def generate(dsn: str, schema: str) -> str:
    """Migrate the database at ``dsn`` and return the page."""
    with PostgresStorageAdapter(dsn, schema=schema, min_size=1, max_size=1) as storage:
        applied = storage.migration_status().applied
    with psycopg.connect(dsn) as conn:
        tables, functions = read_schema(conn, schema)
    return render(schema, applied, tables, functions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="database to read (default: a fresh embedded PostgreSQL)")
    parser.add_argument("--schema", default="kitium_auth")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if --output differs, write nothing"
    )
    args = parser.parse_args(argv)
    server = None
    dsn = args.dsn
    if not dsn:
        from kitium_pg.embedded import EmbeddedPostgres

        server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="kitium-schema-")) / "data")
        dsn = server.start()
    try:
        page = generate(dsn, args.schema)
    finally:
        if server is not None:
            server.stop()
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != page:
            print(f"{args.output} is not current: run python tools/schema_docs.py", file=sys.stderr)
            return 1
        print(f"{args.output} is current")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    print(f"wrote {args.output} ({page.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

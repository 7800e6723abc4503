"""Realistic seed data for the benchmarks, written with COPY (one statement per table).

Ids are UUIDv7 like the adapter's own, secrets are deterministic functions of the row number (so
the benchmark can present valid session tokens and API keys without storing them anywhere but in
memory), and every table is VACUUM ANALYZEd after seeding so plans match a settled database.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import uuid_utils
import uuid_utils.compat

from . import log

DOMAINS = ("example.com", "example.org", "mail.example.net", "corp.example.io", "example.dev")
FIRST = (
    "ada",
    "alan",
    "grace",
    "edsger",
    "barbara",
    "donald",
    "margaret",
    "ken",
    "linus",
    "frances",
)
ORGS_PER_1000_USERS = 1
ROLES_PER_ORG = 5
USERS_WITH_ROLES = 20_000
PERMISSION_NAMES = (
    "users:read",
    "users:write",
    "billing:read",
    "billing:write",
    "sessions:revoke",
    "keys:create",
    "keys:delete",
    "audit:read",
    "org:admin",
    "reports:export",
    "settings:write",
    "members:invite",
)


def new_id() -> uuid.UUID:
    """A UUIDv7 (the adapter's id scheme, so index locality matches production)."""
    return uuid_utils.compat.uuid7()


def session_secret(i: int) -> str:
    """The secret half of seeded session ``i``'s bearer token."""
    digest = hashlib.sha256(b"bench-session-%d" % i).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def api_key(i: int) -> str:
    """Seeded API key ``i`` (``kpg_<secret>``, the shape ``issue_api_key`` produces)."""
    digest = hashlib.sha256(b"bench-key-%d" % i).digest()
    return "kpg_" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def email_for(i: int, rng: random.Random) -> str:
    """A plausible, unique address for seeded user ``i``."""
    return f"{rng.choice(FIRST)}.{i}.{rng.randrange(16**4):04x}@{DOMAINS[i % len(DOMAINS)]}"


@dataclass
class Dataset:
    """What was seeded into one schema, for the benchmark's inputs."""

    schema: str
    user_ids: list[uuid.UUID] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    org_ids: list[uuid.UUID] = field(default_factory=list)
    session_ids: list[uuid.UUID] = field(default_factory=list)
    session_secrets: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    api_key_hashes: list[str] = field(default_factory=list)
    role_members: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)
    token_ids: list[uuid.UUID] = field(default_factory=list)
    tokens_used: int = 0

    def next_token(self) -> uuid.UUID:
        """An email verification token no call has consumed yet."""
        if self.tokens_used >= len(self.token_ids):
            raise RuntimeError("the seeded email verification tokens ran out; seed more")
        token = self.token_ids[self.tokens_used]
        self.tokens_used += 1
        return token


def copy_rows(
    conn: psycopg.Connection[Any],
    table: str,
    columns: Sequence[tuple[str, str]],
    rows: Iterable[Sequence[Any]],
) -> int:
    """COPY ``rows`` into ``table`` in binary format; ``columns`` are (name, PostgreSQL type)
    pairs (jsonb values are Python objects, uuids may be ``uuid_utils`` UUIDs)."""
    count = 0
    names = ", ".join(name for name, _ in columns)
    statement = f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)"
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types([kind for _, kind in columns])
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


@contextmanager
def bulk_load(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Skip foreign-key triggers while loading rows that are consistent by construction
    (``session_replication_role = replica``, which needs superuser; without it the load just
    runs the checks)."""
    try:
        conn.execute("SET session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        yield
        return
    try:
        yield
    finally:
        conn.execute("SET session_replication_role = DEFAULT")


def vacuum(conn: psycopg.Connection[Any], schema: str, tables: Iterable[str]) -> None:
    """VACUUM ANALYZE the tables (the connection must be in autocommit)."""
    for table in tables:
        conn.execute(f"VACUUM (ANALYZE) {schema}.{table}")


def seed_users(
    conn: psycopg.Connection[Any], data: Dataset, n: int, rng: random.Random, *, oauth: bool = True
) -> None:
    """``n`` users (10% with a linked Google identity when ``oauth``)."""
    now = dt.datetime.now(dt.UTC)
    rows: list[tuple[Any, ...]] = []
    for i in range(n):
        uid = new_id()
        email = email_for(i, rng)
        data.user_ids.append(uid)
        data.emails.append(email)
        pro = i % 7 == 0
        rows.append(
            (
                uid,
                email,
                f"{email.split('.', 1)[0].title()} User {i}",
                None if i % 3 else f"https://img.example.com/u/{i}.png",
                "pro" if pro else "free",
                ["export", "sso"] if pro else [],
                {"signup": "web", "locale": "en"},
                "$argon2id$v=19$m=65536,t=3,p=4$" + hashlib.sha256(uid.bytes).hexdigest(),
                now - dt.timedelta(days=rng.randrange(1, 900)),
            )
        )
    copy_rows(
        conn,
        f"{data.schema}.users",
        (
            ("id", "uuid"),
            ("email", "text"),
            ("name", "text"),
            ("picture", "text"),
            ("plan", "text"),
            ("entitlements", "text[]"),
            ("metadata", "jsonb"),
            ("password_hash", "text"),
            ("created_at", "timestamptz"),
        ),
        rows,
    )
    if oauth:
        copy_rows(
            conn,
            f"{data.schema}.oauth_accounts",
            (
                ("id", "uuid"),
                ("user_id", "uuid"),
                ("provider", "text"),
                ("subject", "text"),
                ("email", "text"),
                ("name", "text"),
            ),
            (
                (uuid_utils.uuid7(), uid, "google", f"g-{i}", data.emails[i], None)
                for i, uid in enumerate(data.user_ids)
                if i % 10 == 0
            ),
        )


def seed_orgs_and_roles(conn: psycopg.Connection[Any], data: Dataset, rng: random.Random) -> None:
    """Organizations (one per 1000 users), five roles each with 4-8 permissions, and two roles
    for each of the first 20,000 users in their organization."""
    n_orgs = max(2, len(data.user_ids) // 1000 * ORGS_PER_1000_USERS)
    data.org_ids = [new_id() for _ in range(n_orgs)]
    copy_rows(
        conn,
        f"{data.schema}.organizations",
        (("id", "uuid"), ("name", "text"), ("plan", "text"), ("seats", "int4")),
        ((oid, f"Org {k}", "team", 50) for k, oid in enumerate(data.org_ids)),
    )
    roles: dict[uuid.UUID, list[uuid.UUID]] = {}
    role_rows: list[tuple[Any, ...]] = []
    for oid in data.org_ids:
        roles[oid] = []
        for r in range(ROLES_PER_ORG):
            rid = new_id()
            roles[oid].append(rid)
            perms = [
                {
                    "name": name,
                    "resource": name.split(":")[0],
                    "action": name.split(":")[1],
                    "description": f"may {name.split(':')[1]} {name.split(':')[0]}",
                    "metadata": {},
                }
                for name in rng.sample(PERMISSION_NAMES, rng.randrange(4, 9))
            ]
            role_rows.append((rid, oid, f"role-{r}", None, r == 0, perms))
    copy_rows(
        conn,
        f"{data.schema}.roles",
        (
            ("id", "uuid"),
            ("org_id", "uuid"),
            ("name", "text"),
            ("description", "text"),
            ("is_system", "bool"),
            ("permissions", "jsonb"),
        ),
        role_rows,
    )
    member_rows: list[tuple[Any, ...]] = []
    for i, uid in enumerate(data.user_ids[:USERS_WITH_ROLES]):
        oid = data.org_ids[i % n_orgs]
        data.role_members.append((uid, oid))
        for rid in rng.sample(roles[oid], 2):
            member_rows.append((new_id(), uid, rid, oid))
    copy_rows(
        conn,
        f"{data.schema}.user_roles",
        (("id", "uuid"), ("user_id", "uuid"), ("role_id", "uuid"), ("org_id", "uuid")),
        member_rows,
    )


def seed_sessions(
    conn: psycopg.Connection[Any], data: Dataset, n: int, rng: random.Random, *, tokens: bool = True
) -> None:
    """``n`` live sessions (expiring within 30 days) of random users; each carries a bearer
    token digest when ``tokens``."""
    now = dt.datetime.now(dt.UTC)
    rows: list[tuple[Any, ...]] = []
    users = data.user_ids
    orgs = data.org_ids
    for i in range(n):
        sid = new_id()
        secret = session_secret(i)
        data.session_ids.append(sid)
        data.session_secrets.append(secret)
        rows.append(
            (
                sid,
                users[rng.randrange(len(users))],
                orgs[i % len(orgs)] if orgs and i % 4 == 0 else None,
                None,
                [],
                {"ip": f"198.51.100.{i % 250}", "user_agent": "Mozilla/5.0 (bench)"},
                now + dt.timedelta(seconds=rng.randrange(3600, 30 * 86400)),
                hashlib.sha256(secret.encode("ascii")).digest() if tokens else None,
            )
        )
    copy_rows(
        conn,
        f"{data.schema}.sessions",
        (
            ("id", "uuid"),
            ("user_id", "uuid"),
            ("org_id", "uuid"),
            ("plan", "text"),
            ("entitlements", "text[]"),
            ("metadata", "jsonb"),
            ("expires_at", "timestamptz"),
            ("token_hash", "bytea"),
        ),
        rows,
    )


def seed_expired_sessions(
    conn: psycopg.Connection[Any], schema: str, users: Sequence[uuid.UUID], n: int, seed: int
) -> float:
    """``n`` sessions that expired within the last 30 days; returns the seconds COPY took."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    with bulk_load(conn):
        _copy_expired(conn, schema, users, n, rng, now)
    return time.perf_counter() - started


def _copy_expired(
    conn: psycopg.Connection[Any],
    schema: str,
    users: Sequence[uuid.UUID],
    n: int,
    rng: random.Random,
    now: dt.datetime,
) -> None:
    metadata = {"ip": "198.51.100.7"}
    copy_rows(
        conn,
        f"{schema}.sessions",
        (
            ("id", "uuid"),
            ("user_id", "uuid"),
            ("metadata", "jsonb"),
            ("expires_at", "timestamptz"),
            ("created_at", "timestamptz"),
        ),
        (
            (
                uuid_utils.uuid7(),
                users[rng.randrange(len(users))],
                metadata,
                expiry,
                expiry - dt.timedelta(days=1),
            )
            for expiry in (
                now - dt.timedelta(seconds=rng.randrange(60, 30 * 86400)) for _ in range(n)
            )
        ),
    )


def seed_api_keys(conn: psycopg.Connection[Any], data: Dataset, n: int, rng: random.Random) -> None:
    """``n`` API keys of random users. ``last_used_at`` is set a day ahead: every verification
    then takes the read-only branch of ``verify_api_key`` (a busy key already stamped within
    the minute), the same for every variant however long the run lasts."""
    now = dt.datetime.now(dt.UTC)
    ahead = now + dt.timedelta(days=1)
    rows: list[tuple[Any, ...]] = []
    for i in range(n):
        key = api_key(i)
        digest = hashlib.sha256(key.encode("ascii")).hexdigest()
        data.api_keys.append(key)
        data.api_key_hashes.append(digest)
        rows.append(
            (
                new_id(),
                data.user_ids[rng.randrange(len(data.user_ids))],
                digest,
                "kpg",
                key[-4:],
                ["read", "write"] if i % 2 else ["read"],
                {"label": f"ci key {i}"},
                None if i % 5 else now + dt.timedelta(days=365),
                ahead,
            )
        )
    copy_rows(
        conn,
        f"{data.schema}.api_keys",
        (
            ("id", "uuid"),
            ("principal_id", "uuid"),
            ("hash", "text"),
            ("prefix", "text"),
            ("last_four", "text"),
            ("scopes", "text[]"),
            ("metadata", "jsonb"),
            ("expires_at", "timestamptz"),
            ("last_used_at", "timestamptz"),
        ),
        rows,
    )


def seed_backup_codes(conn: psycopg.Connection[Any], data: Dataset, rng: random.Random) -> None:
    """Ten backup-code digests for every fifth user. Besides being realistic, this gives the
    table statistics: on an empty, freshly analyzed table the plan that
    ``replace_backup_codes`` caches per connection is a sequential scan, which then gets slower
    with every code written (see the benchmark report)."""
    now = dt.datetime.now(dt.UTC)
    copy_rows(
        conn,
        f"{data.schema}.twofa_backup_codes",
        (("id", "uuid"), ("user_id", "uuid"), ("code_hash", "text"), ("created_at", "timestamptz")),
        (
            (uuid_utils.uuid7(), uid, f"{rng.getrandbits(256):064x}", now)
            for uid in data.user_ids[::5]
            for _ in range(10)
        ),
    )


def seed_tokens(conn: psycopg.Connection[Any], data: Dataset, n: int, rng: random.Random) -> None:
    """``n`` unused email verification tokens (the consume-once benchmark uses each once)."""
    now = dt.datetime.now(dt.UTC)
    rows: list[tuple[Any, ...]] = []
    for i in range(n):
        tid = new_id()
        data.token_ids.append(tid)
        k = rng.randrange(len(data.user_ids))
        rows.append(
            (
                tid,
                data.emails[k],
                hashlib.sha256(tid.bytes).hexdigest(),
                "email_verification",
                data.user_ids[k],
                now + dt.timedelta(hours=1 + i % 24),
            )
        )
    copy_rows(
        conn,
        f"{data.schema}.email_verification_tokens",
        (
            ("id", "uuid"),
            ("email", "text"),
            ("code_hash", "text"),
            ("type", "text"),
            ("user_id", "uuid"),
            ("expires_at", "timestamptz"),
        ),
        rows,
    )


def seed_main(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    users: int,
    sessions: int,
    api_keys: int,
    tokens: int,
    seed: int,
) -> Dataset:
    """Seed every table the benchmarked operations read or write; returns the dataset."""
    rng = random.Random(seed)
    data = Dataset(schema)
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("users", lambda: seed_users(conn, data, users, rng)),
        ("organizations and roles", lambda: seed_orgs_and_roles(conn, data, rng)),
        ("sessions", lambda: seed_sessions(conn, data, sessions, rng)),
        ("api keys", lambda: seed_api_keys(conn, data, api_keys, rng)),
        ("email verification tokens", lambda: seed_tokens(conn, data, tokens, rng)),
        ("backup codes", lambda: seed_backup_codes(conn, data, rng)),
    )
    with bulk_load(conn):
        for label, step in steps:
            started = time.perf_counter()
            step()
            log(f"seeded {label} in {time.perf_counter() - started:.1f} s")
    vacuum(
        conn,
        schema,
        (
            "users",
            "oauth_accounts",
            "organizations",
            "roles",
            "user_roles",
            "sessions",
            "api_keys",
            "email_verification_tokens",
            "auth_events",
            "twofa_backup_codes",
        ),
    )
    return data


def seed_scaling(conn: psycopg.Connection[Any], schema: str, n: int, seed: int) -> Dataset:
    """``n`` users and ``n`` sessions (the tables the scaling curve reads)."""
    rng = random.Random(seed)
    data = Dataset(schema)
    with bulk_load(conn):
        seed_users(conn, data, n, rng, oauth=True)
        seed_sessions(conn, data, n, rng, tokens=False)
    vacuum(conn, schema, ("users", "oauth_accounts", "sessions"))
    return data


def seed_fastapi_users(
    conn: psycopg.Connection[Any], schema: str, emails: Sequence[str], *, lower_index: bool
) -> None:
    """Fill fastapi-users' ``user`` table (its shipped shape, created by SQLAlchemy) with the
    same emails as the kitium users; ``lower_index`` adds the ``lower(email)`` index its
    ``get_by_email`` needs and does not ship."""
    with bulk_load(conn):
        _copy_fastapi_users(conn, schema, emails)
    if lower_index:
        conn.execute(f'CREATE INDEX user_lower_email_idx ON {schema}."user" (lower(email))')
    vacuum(conn, schema, ('"user"',))


def _copy_fastapi_users(conn: psycopg.Connection[Any], schema: str, emails: Sequence[str]) -> None:
    copy_rows(
        conn,
        f'{schema}."user"',
        (
            ("id", "uuid"),
            ("email", "varchar"),
            ("hashed_password", "varchar"),
            ("is_active", "bool"),
            ("is_superuser", "bool"),
            ("is_verified", "bool"),
        ),
        (
            (
                uuid_utils.uuid7(),
                email,
                "$argon2id$v=19$m=65536,t=3,p=4$" + "x" * 64,
                True,
                False,
                True,
            )
            for email in emails
        ),
    )


@contextmanager
def scratch(dsn: str | None, name: str, rows: int, seed: int) -> Iterator[tuple[str, str, Dataset]]:
    """A migrated schema seeded with ``rows`` users and sessions (``seed_scaling``), for the
    single-purpose scripts. With ``dsn``: a fresh schema ``<name>_<random>`` there, dropped on
    exit; without: schema ``name`` in an embedded server started in a temporary folder, stopped
    and removed on exit. Yields ``(dsn, schema, data)``."""
    from kitium_pg import PostgresStorageAdapter

    server: Any = None
    data_dir = None
    if dsn:
        schema = f"{name}_{secrets.token_hex(3)}"
    else:
        from kitium_pg.embedded import EmbeddedPostgres

        data_dir = tempfile.mkdtemp(prefix=f"{name.replace('_', '-')}-")
        server = EmbeddedPostgres(Path(data_dir) / "data")
        dsn = server.start()
        schema = name
    try:
        with PostgresStorageAdapter(dsn, schema=schema):
            pass  # connect() applies the migrations
        with psycopg.connect(dsn, autocommit=True) as conn:
            data = seed_scaling(conn, schema, rows, seed)
        log(f"seeded {rows} users and sessions in {schema}")
        yield dsn, schema, data
    finally:
        if server is None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        else:
            server.stop()
        if data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

"""Every purge of expired rows (sessions, email tokens, 2FA challenges, SSO sessions, events),
against both adapters: what they share beyond the batching each domain's tests check."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from kitium_pg import PostgresStorageAdapter

from .conftest import open_adapter


async def _expired_sessions(storage: Any, user: Any) -> list[uuid.UUID]:
    return [
        (await storage.create_session(user_id=user.id, expires_at=_in_an_hour())).id
        for _ in range(2)
    ]


async def _expired_tokens(storage: Any, user: Any) -> list[uuid.UUID]:
    made = [
        await storage.create_email_verification_token(
            email=user.email, code_hash=uuid.uuid4().hex * 2, type="verify_email",
            expires_at=_in_an_hour(),
        )
        for _ in range(2)
    ]  # fmt: skip
    return [token.id for token in made]


async def _expired_challenges(storage: Any, user: Any) -> list[uuid.UUID]:
    device = await storage.create_two_factor_device(
        user_id=user.id, method="totp", secret="JBSWY3DPEHPK3PXP"
    )
    login = await storage.create_session(user_id=user.id, expires_at=_in_an_hour())
    made = [
        await storage.create_two_factor_session(
            user_id=user.id, device_id=device.id, session_id=login.id, method="totp",
            expires_at=_in_an_hour(),
        )
        for _ in range(2)
    ]  # fmt: skip
    return [challenge.id for challenge in made]


async def _expired_sso_sessions(storage: Any, user: Any) -> list[uuid.UUID]:
    provider = await storage.create_sso_provider(type="oidc", name=f"purge-{uuid.uuid4().hex}")
    bound = {"user_id": user.id, "provider_id": provider.id, "provider_type": "oidc"}
    await storage.create_sso_link(**bound, provider_subject="s")
    made = [
        await storage.create_sso_session(**bound, provider_subject="s", expires_at=_in_an_hour())
        for _ in range(2)
    ]
    return [session.id for session in made]


async def _old_events(storage: Any, user: Any) -> list[uuid.UUID]:
    long_ago = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    made = [
        await storage.emit_event(
            type="purge.test", principal_id=user.id, data=None, timestamp=long_ago
        )
        for _ in range(2)
    ]
    return [event.id for event in made]


def _in_an_hour() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


# table: (what makes two of its rows (live ones, backdated here, but for events, made old),
# the purge call, given the adapter and a batch_size or none)
PURGES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "sessions": (_expired_sessions, lambda s, **kw: s.delete_expired_sessions(**kw)),
    "email_verification_tokens": (
        _expired_tokens, lambda s, **kw: s.delete_expired_email_verification_tokens(**kw)
    ),
    "twofa_sessions": (
        _expired_challenges, lambda s, **kw: s.delete_expired_two_factor_sessions(**kw)
    ),
    "sso_sessions": (_expired_sso_sessions, lambda s, **kw: s.delete_expired_sso_sessions(**kw)),
    "auth_events": (
        _old_events,
        lambda s, **kw: s.prune_events(before=dt.datetime(2001, 1, 2, tzinfo=dt.UTC), **kw),
    ),
}  # fmt: skip


@pytest.mark.parametrize("table", list(PURGES))
async def test_a_purge_skips_rows_another_transaction_holds_and_takes_them_later(
    storage: Any, email: str, dsn: str, table: str
) -> None:
    """A purge does not wait for a row another transaction holds locked (a session being
    updated, a challenge being completed): it skips it, deletes the rest, and a later run takes
    it. Waiting would stall the cleaner behind any long transaction, and its own locks on the
    rows it took would then stall the callers behind it. The purge runs with a 3 s statement
    timeout: had it waited for the held row, it would fail with ``QueryTimeoutError``."""
    make, purge = PURGES[table]
    user = await storage.create_user(email=email)
    held, free = await make(storage, user)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if table != "auth_events":
            conn.execute(
                f"UPDATE kitium_auth.{table} SET expires_at = now() - interval '1 second'"
                " WHERE id = ANY(%s)",
                [[held, free]],
            )
        with psycopg.connect(dsn) as holder:
            holder.execute(f"SELECT FROM kitium_auth.{table} WHERE id = %s FOR UPDATE", [held])
            assert await purge(storage.with_statement_timeout(3000)) >= 1
            left = conn.execute(
                f"SELECT id FROM kitium_auth.{table} WHERE id = ANY(%s)", [[held, free]]
            ).fetchall()
            assert left == [(held,)]
            holder.rollback()
        assert await purge(storage) >= 1
        assert conn.execute(
            f"SELECT count(*) FROM kitium_auth.{table} WHERE id = ANY(%s)", [[held, free]]
        ).fetchone() == (0,)


@pytest.fixture
async def away_from_utc(storage: Any, dsn: str) -> AsyncIterator[Any]:
    """An adapter of ``storage``'s kind whose sessions run in Asia/Kolkata, as a caller's role
    or PgBouncer's server may (``pgbouncer=True`` sends no ``TimeZone`` of its own; connected
    directly here). (Its DateStyle must be ISO: the adapter refuses another behind PgBouncer,
    see test_core.)"""
    zoned = make_conninfo(dsn, options="-c TimeZone=Asia/Kolkata")
    async with open_adapter(storage.kind, zoned, migrate=False, pgbouncer=True) as adapter:
        yield adapter


@pytest.mark.parametrize("table", list(PURGES))
async def test_a_purge_resumes_where_it_stopped_in_any_session_time_zone(
    storage: Any, away_from_utc: Any, email: str, dsn: str, table: str
) -> None:
    """Found in review: each batch handed the next the expiry it reached as the text of a
    timestamptz, which names the session's zone; under the SQL DateStyle by abbreviation, and
    PostgreSQL 15 read Asia/Kolkata's 'IST' back as Israel's, 3.5 hours later, so the next
    batch started past expired rows (PostgreSQL 18 reads a zone's own abbreviation right: this
    fails only on older servers, which CI runs too). The key now goes as UTC without a zone.
    Rows an hour apart, one per batch: every one is deleted. (The adapter now refuses a
    DateStyle other than ISO behind PgBouncer, so here the session's zone alone differs.)"""
    make, purge = PURGES[table]
    user = await storage.create_user(email=email)
    made = [row for _ in range(3) for row in await make(storage, user)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        if table == "auth_events":  # append-only: made old, emitted again an hour apart
            made = [
                (
                    await storage.emit_event(
                        type="purge.test",
                        principal_id=user.id,
                        data=None,
                        timestamp=dt.datetime(2001, 1, 1, tzinfo=dt.UTC) - dt.timedelta(hours=n),
                    )
                ).id
                for n in range(6)
            ]
        else:
            for hours, row in enumerate(made, start=1):
                conn.execute(
                    f"UPDATE kitium_auth.{table} SET expires_at = now() - %s WHERE id = %s",
                    [dt.timedelta(hours=hours), row],
                )
        assert await purge(away_from_utc, batch_size=1) >= len(made)
        assert conn.execute(
            f"SELECT count(*) FROM kitium_auth.{table} WHERE id = ANY(%s)", [made]
        ).fetchone() == (0,)


# Per table: its purge, and the columns and values of a row expired by the generated series
# (%s: the user's id; the expiry follows).
TIED = {
    "sessions": ("delete_expired_sessions", "id, user_id", "gen_random_uuid(), %s"),
    "email_verification_tokens": (
        "delete_expired_email_verification_tokens",
        "id, user_id, email, code_hash, type",
        "gen_random_uuid(), %s, 'tied@example.com', repeat('c', 64), 'verify_email'",
    ),
}


@pytest.mark.parametrize("table", sorted(TIED))
@pytest.mark.parametrize("spread", ["one expiry", "distinct expiries"])
def test_a_purge_reads_each_index_entry_about_once_while_a_snapshot_is_open(
    dsn: str, spread: str, table: str
) -> None:
    """Found in review: the purges resumed each batch at the expiry the last one reached, and
    while an older snapshot is open (pg_dump, a long report) the entries of deleted rows stay
    in the index: with many rows sharing one expiry, every batch walked all of those deleted
    before it (88,500 entries read for 3,000 sessions in batches of 100). The key is (expiry,
    id) now (migrations 0042 to 0045), and each batch starts just past the last row the one
    before reached: here the adapter's statement, run batch by batch as the adapter runs it,
    reads about one entry per row, counted by pg_stat_user_indexes (resuming from the batch's
    first row instead read two)."""
    schema = f"tied_{uuid.uuid4().hex[:10]}"
    rows, batch = 3000, 100
    with PostgresStorageAdapter(dsn, schema=schema) as storage:
        user = storage.create_user()
        purge, columns, values = TIED[table]
        statement = storage._queries[purge].sql.encode()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {schema}.{table} ({columns}, expires_at)"
                f" SELECT {values}, now() - interval '1 hour'"
                " - CASE WHEN %s THEN interval '0' ELSE n * interval '1 second' END"
                " FROM generate_series(1, %s) AS n".encode(),
                [user.id, spread == "one expiry", rows],
            )
            index = f"{schema}.{table}_expires_at_id_idx"
            counter = (
                "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelid = %s::regclass"
            )
            with psycopg.connect(dsn) as snapshot:  # an older snapshot, kept open
                snapshot.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                snapshot.execute(f"SELECT count(*) FROM {schema}.{table}".encode())
                # The plan a pooled connection settles on (see
                # test_each_purge_batch_scans_from_where_the_last_one_stopped).
                conn.execute("SET plan_cache_mode = force_generic_plan")
                conn.execute("SELECT pg_stat_force_next_flush()")
                before = conn.execute(counter, [index]).fetchone()
                params: dict[str, Any] = {"after": None, "after_id": None, "batch_size": batch}
                deleted = 0
                while True:
                    done, taken, params["after"], params["after_id"] = conn.execute(
                        statement, params, prepare=True
                    ).fetchone() or (0, 0, None, None)
                    deleted += done
                    if taken < batch:
                        break
                conn.execute("SELECT pg_stat_force_next_flush()")
                after = conn.execute(counter, [index]).fetchone()
        assert deleted == rows
        assert before is not None and after is not None
        assert after[0] - before[0] <= rows + rows // 5, (before, after)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE".encode())

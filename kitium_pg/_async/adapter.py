"""``AsyncPostgresStorageAdapter``: the async public adapter (source of the generated sync one)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Self

import psycopg
import psycopg_pool

from .._base import Retry
from ..errors import KitiumPgError, translate
from ..records import HealthStatus
from .api_keys import AsyncApiKeys
from .email_verification import AsyncEmailVerification
from .events import AsyncEvents
from .keys import AsyncKeyRotation
from .migrate import AsyncMigrations
from .organizations import AsyncOrganizations
from .rbac import AsyncRbac
from .sessions import AsyncSessions
from .sso import AsyncSso
from .tokens import AsyncTokens
from .twofa import AsyncTwoFactor
from .users import AsyncUsers


class AsyncPostgresStorageAdapter(
    AsyncTokens,
    AsyncUsers,
    AsyncSessions,
    AsyncApiKeys,
    AsyncOrganizations,
    AsyncEmailVerification,
    AsyncEvents,
    AsyncRbac,
    AsyncSso,
    AsyncTwoFactor,
    AsyncKeyRotation,
    AsyncMigrations,
):
    """Async storage for auth data on PostgreSQL (psycopg 3 + psycopg-pool).

    ``AsyncPostgresStorageAdapter(dsn, *, min_size=1, max_size=10, idle_timeout=30.0,
    statement_timeout_ms=None, max_retries=2, connect_timeout=10.0, pool_timeout=10.0,
    schema="kitium_auth", application_name="kitium-pg", prepare_threshold=5,
    encryption_keys=None, optional_migrations=(), pgbouncer=False, replica_dsn=None,
    observer=None)``.

    ``statement_timeout_ms`` (5000 when not given) is set on the connections the adapter opens,
    at no per-call cost. ``dsn`` may also be a psycopg-pool ``AsyncConnectionPool`` you own (its
    connections should be autocommit, at READ COMMITTED, PostgreSQL's default isolation
    level, which the guarded statements need); its connections keep their own settings, and a
    ``statement_timeout_ms`` given with it is applied per call instead (a transaction-local
    ``set_config`` with each statement, in a transaction of its own: a second round trip, for
    the COMMIT), so configure the
    timeout on your pool (``kwargs={"options": "-c statement_timeout=5000"}``) or the role
    where you can. ``encryption_keys`` (else ``KITIUM_PG_ENCRYPTION_KEYS``) encrypt stored secrets;
    ``pgbouncer=True`` avoids session state for transaction pooling; ``replica_dsn`` (one DSN or
    several) serves the read-only hot paths; ``observer`` receives per-operation metrics (see
    ``kitium_pg.observe``). Use it as ``async with AsyncPostgresStorageAdapter(dsn) as
    storage: ...`` or call ``connect()`` and ``disconnect()``.
    """

    async def connect(self, *, migrate: bool = True) -> None:
        """Open the pool and (by default) apply pending migrations. Idempotent; safe when many
        processes call it at once. Raises ``UnavailableError`` when the database cannot be
        reached within ``connect_timeout`` (call ``connect()`` again later: the pool stays open
        and keeps trying in the background until ``disconnect()``), ``MigrationError`` on
        migration drift, and ``ValidationError`` (field ``dsn``) when the primary's
        ``DateStyle`` is not ISO behind PgBouncer (``pgbouncer=True``: on the connections it
        opens directly the adapter sets ISO itself)."""
        await self._open_pool()
        if migrate:
            await self.migrate()

    async def disconnect(self) -> None:
        """Close the pool (a pool passed in by the caller is left open)."""
        await self._close_pool()

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            await self.disconnect()  # the block never runs: nothing may keep connecting
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def health_check(self) -> HealthStatus:
        """Round-trip latency, pool figures and migration state; never raises.

        ``status`` is ``"ok"`` when the database answered and no migration is pending (a
        newer version's migrations, ``newer_migrations``, are no error: a rolling deploy's
        older instances stay ready).
        """
        started = time.perf_counter()
        stats = {k: int(val) for k, val in self._pool.get_stats().items()}
        try:
            await self._value("ping", {}, retry=Retry.NEVER)
            latency_ms = (time.perf_counter() - started) * 1000
            state = await self.migration_status()
        except (KitiumPgError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            error = translate(exc, operation="health_check")
            return HealthStatus(
                status="error",
                latency_ms=(time.perf_counter() - started) * 1000,
                pool=stats,
                applied_migrations=(),
                pending_migrations=(),
                error=str(error),
            )
        return HealthStatus(
            status="ok" if not state.pending else "error",
            latency_ms=round(latency_ms, 3),
            pool=stats,
            applied_migrations=state.applied,
            pending_migrations=state.pending,
            error=None if not state.pending else "pending migrations",
            replicas=await self._replica_health(),
            newer_migrations=state.newer,
        )

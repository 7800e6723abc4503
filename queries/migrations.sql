-- Migration ledger. The runner (kitium_pg/_async/migrate.py) executes each migration file's
-- up or down part in its own transaction, after lock_migrations.

-- name: lock_migrations()$
-- Serialise migrators (processes and threads) until the end of the current transaction.
SELECT true FROM pg_advisory_xact_lock(hashtextextended('kitium_pg.migrations.kitium_auth', 0));

-- name: ensure_ledger#
-- Create the schema and the ledger if they are missing (runs under lock_migrations).
CREATE SCHEMA IF NOT EXISTS kitium_auth;
CREATE TABLE IF NOT EXISTS kitium_auth.auth_migrations (
  id          text PRIMARY KEY,
  checksum    text NOT NULL,
  applied_at  timestamptz NOT NULL DEFAULT now(),
  duration_ms double precision NOT NULL
);

-- name: ledger_exists()$
-- Whether the ledger table exists yet (status and health must not create anything).
SELECT to_regclass('kitium_auth.auth_migrations') IS NOT NULL;

-- name: list_applied_migrations()
-- Every applied migration with its checksum, in the order they were applied.
SELECT id, checksum FROM kitium_auth.auth_migrations ORDER BY applied_at, id;

-- name: record_migration(id, checksum, duration_ms)!
-- Record one applied migration.
INSERT INTO kitium_auth.auth_migrations (id, checksum, duration_ms)
VALUES (:id, :checksum, :duration_ms);

-- name: forget_migration(id)!
-- Remove a rolled-back migration from the ledger.
DELETE FROM kitium_auth.auth_migrations WHERE id = :id;

-- name: set_local_setting(name, value)$
-- Set a run-time setting (statement_timeout, kitium.tenant) until the end of the transaction.
SELECT set_config(:name, :value, true);

-- name: ping()$
-- One round trip to the server (health checks).
SELECT 1;

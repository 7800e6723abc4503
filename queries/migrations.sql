-- Migration ledger. The runner (kitium_pg/_async/migrate.py) holds try_lock_migrations' lock
-- for its whole run and executes each migration file's up or down part in its own transaction,
-- or, for a part marked transaction:false, one statement at a time.

-- name: try_lock_migrations()$
-- Take the migrators' lock for this session if it is free (true), else false at once. Waiters
-- poll between statements, outside any transaction: a blocked waiter would hold a snapshot
-- that CREATE INDEX CONCURRENTLY waits out, a deadlock with the run it waits for.
SELECT pg_try_advisory_lock(hashtextextended('kitium_pg.migrations.kitium_auth', 0));

-- name: unlock_migrations()$
-- Release the migrators' lock this session holds (false when it held none).
SELECT pg_advisory_unlock(hashtextextended('kitium_pg.migrations.kitium_auth', 0));

-- name: ensure_ledger#
-- Create the schema and the ledger if they are missing (runs under try_lock_migrations' lock).
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

-- name: list_invalid_indexes()
-- The names of the schema's indexes that a failed or cancelled CREATE INDEX CONCURRENTLY left
-- invalid: no query uses them, yet writes keep them up to date until they are dropped. An index
-- a build in progress shows in pg_stat_progress_create_index is left out (it is invalid until
-- the build ends); that view hides other roles' builds from a role without pg_read_all_stats.
SELECT i.relname
  FROM pg_catalog.pg_index AS x
  JOIN pg_catalog.pg_class AS i ON i.oid = x.indexrelid
  JOIN pg_catalog.pg_namespace AS n ON n.oid = i.relnamespace
 WHERE n.nspname = 'kitium_auth' AND NOT x.indisvalid
   AND NOT EXISTS (
         SELECT FROM pg_catalog.pg_stat_progress_create_index AS p
          WHERE p.index_relid = x.indexrelid
       )
 ORDER BY i.relname;

-- name: migrators_lock_taken()$
-- Whether another session holds try_lock_migrations' lock (a migration is running), from
-- pg_locks, which every role sees: a single-bigint advisory lock is (classid, objid) = its
-- high and low 32 bits, objsubid 1.
SELECT EXISTS (
  SELECT FROM pg_catalog.pg_locks AS l
   CROSS JOIN (SELECT hashtextextended('kitium_pg.migrations.kitium_auth', 0) AS key) AS k
   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
     AND l.database = (
           SELECT d.oid FROM pg_catalog.pg_database AS d WHERE d.datname = current_database()
         )
     AND l.classid = CAST((k.key >> 32) & 4294967295 AS oid)
     AND l.objid = CAST(k.key & 4294967295 AS oid)
     AND l.pid <> pg_backend_pid()
);

-- name: set_session_setting(name, value)$
-- Set a run-time setting for the rest of the session (the migrators' timeouts).
SELECT set_config(:name, :value, false);

-- name: show_setting(name)$
-- A run-time setting's current value (to put it back after set_session_setting); NULL when
-- this server has no such setting (transaction_timeout before PostgreSQL 17).
SELECT current_setting(:name, true);

-- name: set_local_settings(names, values)$
-- Set run-time settings (statement_timeout, kitium.tenant) until the transaction ends, all in one statement.
SELECT count(set_config(setting.name, setting.value, true))
  FROM unnest(CAST(:names AS text[]), CAST(:values AS text[])) AS setting (name, value);

-- name: begin_transaction()!
-- Open a transaction for a statement and its set_local_settings (committed by the driver).
BEGIN;

-- name: ping()$
-- One round trip to the server (health checks).
SELECT 1;

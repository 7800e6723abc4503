-- The chaos harness (kitium_pg/chaos.py, `kitium-pg chaos`): fault injection and the read-back of
-- its ledger. Not used by the adapter's methods; they run on the harness's own connections, so
-- what they check never goes through the code under test.

-- name: chaos_terminate_backends(all_clients, app)$
-- Terminate the client backends of this database (all of them, or the run's own by application
-- name); returns how many were terminated.
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
  FROM pg_catalog.pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
   AND datname = current_database()
   AND (:all_clients OR application_name = :app);

-- name: chaos_lock_timeout#
-- Bound how long the injector itself may wait for the locks it takes.
SET lock_timeout = '5s';

-- name: chaos_lock_users(ids)
-- Hold row locks on the hot users until the injector's transaction ends.
SELECT id
  FROM kitium_auth.users
 WHERE id = ANY (:ids)
   FOR UPDATE;

-- name: chaos_lock_sessions_table#
-- Hold an ACCESS EXCLUSIVE lock on sessions until the injector's transaction ends.
LOCK TABLE kitium_auth.sessions IN ACCESS EXCLUSIVE MODE;

-- name: chaos_session_count(id)$
-- How many session rows have this id, expired or not (an acknowledged session must have one).
SELECT count(*)
  FROM kitium_auth.sessions
 WHERE id = :id;

-- name: chaos_stored_events(ids)
-- Which of these event ids are stored.
SELECT id
  FROM kitium_auth.auth_events
 WHERE id = ANY (:ids);

-- name: chaos_batch_event_seqs(type, principal_like)
-- The seq of every stored batch event of a run (its principals start with the run's id).
SELECT data ->> 'seq'
  FROM kitium_auth.auth_events
 WHERE type = :type AND principal_id LIKE :principal_like;

-- Extra rows per natural key: every create of a run carries a unique "chaos" key (per call, not
-- per attempt) in its metadata or data; users also have their email.

-- name: chaos_duplicate_users_by_email(like)$
-- Users of the run that share an email (case-insensitively) with another.
SELECT count(*) - count(DISTINCT lower(email))
  FROM kitium_auth.users
 WHERE metadata ->> 'chaos' LIKE :like;

-- name: chaos_duplicate_users_by_key(like)$
-- Users of the run written more than once for one call.
SELECT count(*) - count(DISTINCT metadata ->> 'chaos')
  FROM kitium_auth.users
 WHERE metadata ->> 'chaos' LIKE :like;

-- name: chaos_duplicate_sessions(like)$
-- Sessions of the run written more than once for one call.
SELECT count(*) - count(DISTINCT metadata ->> 'chaos')
  FROM kitium_auth.sessions
 WHERE metadata ->> 'chaos' LIKE :like;

-- name: chaos_duplicate_api_keys(like)$
-- API keys of the run written more than once for one call.
SELECT count(*) - count(DISTINCT metadata ->> 'chaos')
  FROM kitium_auth.api_keys
 WHERE metadata ->> 'chaos' LIKE :like;

-- name: chaos_duplicate_email_tokens(like)$
-- Email verification tokens of the run written more than once for one call.
SELECT count(*) - count(DISTINCT metadata ->> 'chaos')
  FROM kitium_auth.email_verification_tokens
 WHERE metadata ->> 'chaos' LIKE :like;

-- name: chaos_duplicate_events(like)$
-- Events of the run written more than once (same type, principal and seq).
SELECT count(*) - count(DISTINCT (type, principal_id, data ->> 'seq'))
  FROM kitium_auth.auth_events
 WHERE principal_id LIKE :like;

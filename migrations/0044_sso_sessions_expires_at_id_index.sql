-- An index on sso_sessions (expires_at, id) in place of sso_sessions_expires_at_idx, so that
-- delete_expired_sso_sessions resumes each batch after the last row it reached, not at its expiry.
--
-- The purge deletes the earliest expired rows a batch at a time and starts each batch's index
-- scan where the last one stopped, so that while an older snapshot is open elsewhere (pg_dump, a
-- long report) a batch does not walk the index entries of the rows the batches before it
-- deleted, which that snapshot keeps from being marked dead. The key was the expiry alone: when
-- many expired rows share one expiry (ended together by one UPDATE, an expiry rounded to the day,
-- a bulk import), every batch started at that expiry and walked every entry deleted so far, about
-- N^2 / (2 * batch_size) entries for N rows (88,500 entries read to purge 3,000 rows in batches of
-- 100, found in review). With the id as a tie-breaker the key is unique, and each batch starts
-- past the last row it reached. The new index leads with expires_at, so it serves every
-- expiry range the old one did (migration 0046 drops sso_sessions_expires_at_idx, from migration 0012).
--
-- Built CONCURRENTLY, so this part runs outside a transaction (transaction:false), one statement
-- at a time. Locks: SHARE UPDATE EXCLUSIVE on sso_sessions while the index is built: every read and
-- write of sso_sessions goes on; the build waits for the transactions writing it, then for every
-- transaction with an older snapshot, to end. A build that fails half-way (a cancel, a lost
-- connection) leaves an invalid index behind, which this part drops first when it runs again
-- (the old index stays until migration 0046, so the table always has one on its expiry).
-- No lock_timeout: waiting for these locks blocks no read or write (only other schema changes and
-- VACUUM of sso_sessions), and a setting made here would outlive the part.

-- migrate:up transaction:false

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sso_sessions_expires_at_id_idx;

-- Not IF NOT EXISTS: that would keep an invalid index left by a failed build; it is dropped
-- above instead.
-- squawk-ignore require-lock-timeout, prefer-robust-stmts
CREATE INDEX CONCURRENTLY sso_sessions_expires_at_id_idx
  ON kitium_auth.sso_sessions (expires_at, id);

-- migrate:down transaction:false

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sso_sessions_expires_at_id_idx;

-- Drop the (expires_at) indexes that migrations 0042 to 0045 replaced with (expires_at, id) ones.
--
-- A migration of its own, after the builds: had each build dropped its old index too, a run
-- interrupted after that drop and then run again (its ledger row not written) would drop the
-- new, valid index to build it again, and leave the table without an index on its expiry until
-- the build ended (found in review). Here the old indexes go only once every new one is in
-- place, and running this again drops nothing that is still needed.
--
-- DROP INDEX CONCURRENTLY, one statement at a time outside a transaction (transaction:false):
-- each waits for the transactions using its index, and blocks no read or write. No lock_timeout:
-- waiting blocks nothing, and a setting made here would outlive the part. The down part builds
-- each old index again CONCURRENTLY (dropping an invalid one a failed build left first), before
-- migrations 0045 to 0042 drop the new ones.

-- migrate:up transaction:false

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sessions_expires_at_idx;

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.twofa_sessions_expires_at_idx;

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sso_sessions_expires_at_idx;

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.email_verification_tokens_expires_at_idx;

-- migrate:down transaction:false

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sessions_expires_at_idx;

-- squawk-ignore require-lock-timeout, prefer-robust-stmts
CREATE INDEX CONCURRENTLY sessions_expires_at_idx
  ON kitium_auth.sessions (expires_at);

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.twofa_sessions_expires_at_idx;

-- squawk-ignore require-lock-timeout, prefer-robust-stmts
CREATE INDEX CONCURRENTLY twofa_sessions_expires_at_idx
  ON kitium_auth.twofa_sessions (expires_at);

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sso_sessions_expires_at_idx;

-- squawk-ignore require-lock-timeout, prefer-robust-stmts
CREATE INDEX CONCURRENTLY sso_sessions_expires_at_idx
  ON kitium_auth.sso_sessions (expires_at);

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.email_verification_tokens_expires_at_idx;

-- squawk-ignore require-lock-timeout, prefer-robust-stmts
CREATE INDEX CONCURRENTLY email_verification_tokens_expires_at_idx
  ON kitium_auth.email_verification_tokens (expires_at);

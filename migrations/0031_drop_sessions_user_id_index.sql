-- Drops sessions_user_id_idx (user_id), superseded by 0030's
-- sessions_user_id_created_at_id_idx, which it leads: every lookup of sessions by user_id is
-- served by the newer index (list_user_sessions, delete_user_sessions, the logout of
-- delete_sso_sessions_by_subject, the cascade of sessions__user_id_fkey), and the older one cost
-- an entry for every login.
--
-- Dropped CONCURRENTLY, outside a transaction (transaction:false): SHARE UPDATE EXCLUSIVE on
-- sessions while the drop waits for the transactions using the index to end; reads and writes go
-- on. Its down part builds the index again in the same way (0030 says how; a failed build is
-- dropped first when it runs again). No lock_timeout, for 0030's reasons.

-- migrate:up transaction:false

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sessions_user_id_idx;

-- migrate:down transaction:false

-- squawk-ignore require-lock-timeout
DROP INDEX CONCURRENTLY IF EXISTS kitium_auth.sessions_user_id_idx;

-- Not IF NOT EXISTS: that would keep an invalid index left by a failed build.
-- squawk-ignore require-lock-timeout, prefer-robust-stmts
CREATE INDEX CONCURRENTLY sessions_user_id_idx ON kitium_auth.sessions (user_id);

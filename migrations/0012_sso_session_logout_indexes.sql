-- Indexes for ending SSO sessions from the identity provider's side (single logout), and for
-- deleting expired ones in batches.
--
-- SAML Single Logout names the session to end by the NameID (provider_subject) and, usually, a
-- SessionIndex; OIDC back-channel logout by the sub claim and/or the sid claim. The adapter stores
-- the SessionIndex / sid as session_token_hash (its SHA-256 digest), and delete_sso_sessions
-- looks sessions up by (provider_id, provider_subject) or (provider_id, session_token_hash);
-- delete_sso_link ends the unlinked identity's sessions by (provider_id, provider_subject) too.
-- Only sso_sessions_provider_id_idx served these lookups: every logout read all of the provider's
-- sessions (one provider can hold nearly all of them), checked under EXPLAIN on 200,000
-- sessions, 160,000 of them at one provider: a scan of the whole table (about 20 ms) instead of
-- an index scan of the matching rows (under 0.1 ms), with custom and with generic plans.
--
-- * sso_sessions_provider_id_provider_subject_idx (provider_id, provider_subject): the sessions
--   of one identity at one provider.
-- * sso_sessions_provider_id_session_token_hash_idx (provider_id, session_token_hash), partial
--   (WHERE session_token_hash IS NOT NULL): the session with one provider session token. Sessions
--   recorded without a token are never looked up by it and stay out of the index.
-- * sso_sessions_expires_at_idx (expires_at): delete_expired_sso_sessions takes the earliest
--   expired sessions a batch at a time, as delete_expired_sessions does with sessions_expires_at_idx;
--   without it every batch would read the whole table.
--
-- sso_sessions_provider_id_idx is kept. The first index, which starts with provider_id, could
-- serve the provider's cascade (ON DELETE and ON UPDATE) in its place, but dropping it takes an
-- ACCESS EXCLUSIVE lock on sso_sessions, and rolling this migration back would have to build it
-- again; it costs one index entry per SSO session written.
--
-- Locks: CREATE INDEX takes SHARE on sso_sessions until this transaction commits: reads go on
-- (get_sso_session answers), writes (create_sso_session, logouts, unlinks, deletes of users or
-- providers) wait while the three indexes are built, one scan of the table each. The indexes are
-- built in place because the migration runs in a transaction, where CREATE INDEX CONCURRENTLY
-- cannot run. That is acceptable here: the table holds one row per SSO login, the build reads
-- it at memory speed (about 0.25 s for the 200,000 sessions above, the first two indexes), and only SSO
-- logins wait meanwhile; lock_timeout below bounds the wait for the lock itself, so the
-- migration gives up rather than queue (and block) traffic behind a long transaction.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-creation
CREATE INDEX sso_sessions_provider_id_provider_subject_idx
  ON kitium_auth.sso_sessions (provider_id, provider_subject);
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX sso_sessions_provider_id_session_token_hash_idx
  ON kitium_auth.sso_sessions (provider_id, session_token_hash)
  WHERE session_token_hash IS NOT NULL;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX sso_sessions_expires_at_idx ON kitium_auth.sso_sessions (expires_at);

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Takes ACCESS EXCLUSIVE on sso_sessions for an instant once granted (nothing is scanned).
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.sso_sessions_expires_at_idx;
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.sso_sessions_provider_id_session_token_hash_idx;
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.sso_sessions_provider_id_provider_subject_idx;

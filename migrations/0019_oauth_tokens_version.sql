-- A version number on a linked identity's provider tokens, for refreshing them safely.
--
-- An OAuth refresh is read, call the provider, write: two workers refreshing one link at once
-- both read the same refresh token, and with a provider that rotates refresh tokens the later
-- write can store a token the provider has already replaced (or revoked: reuse of a rotated
-- refresh token revokes the whole family at several providers), signing the user out of that
-- provider for good. update_oauth_tokens(..., if_version=) writes new tokens only while the
-- link still holds the version the caller read (one guarded UPDATE); the loser re-reads the
-- winner's tokens instead of calling the provider again. Every write of new tokens
-- (update_oauth_tokens, link_oauth_account with tokens) adds one; re-encryption under a new
-- key (rotate-keys) changes no token and keeps it.
--
-- A bigint NOT NULL column with a constant default: PostgreSQL 11+ stores the default in the
-- catalog, no table rewrite; existing links start at version 0.
-- Locks: ACCESS EXCLUSIVE on oauth_accounts for that moment (lock_timeout bounds the wait).

-- migrate:up

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts
  ADD COLUMN tokens_version bigint NOT NULL DEFAULT 0;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts DROP COLUMN tokens_version;

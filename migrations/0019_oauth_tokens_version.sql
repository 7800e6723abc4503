-- A version on a linked identity's provider tokens, for refreshing them safely.
--
-- An OAuth refresh is read, call the provider, write. Without a guard the last write wins, even
-- when it stores what refreshing older tokens gave: a background job that read the tokens before
-- the user re-linked (new consent, new scopes, maybe another account) or before another
-- worker's refresh overwrites the newer tokens; with a provider that rotates refresh tokens, with
-- one the provider has already replaced. update_oauth_tokens(..., if_version=) writes new tokens
-- only while the link still holds the version the caller read (one guarded UPDATE); the loser
-- re-reads the winner's tokens.
--
-- The version is an opaque number the adapter draws at random for each write of new tokens
-- (update_oauth_tokens, link_oauth_account with tokens), not a counter: a counter restarts with
-- a new link, so a version read before an unlink and a re-link would match the new link's. A
-- retry of a write after a lost acknowledgement sets the same version again and recognises its
-- own write by it. Re-encryption under a new key (rotate-keys) changes no token and keeps it.
-- Existing links start at 0. During a rolling deploy, instances of the previous version write
-- tokens (link_oauth_account) without changing the version: a guarded refresh can then be
-- stored over a re-link those instances made.
--
-- A bigint NOT NULL column with a constant default: PostgreSQL 11+ stores the default in the
-- catalog, no table rewrite.
-- Locks: ACCESS EXCLUSIVE on oauth_accounts for that moment (lock_timeout bounds the wait).

-- migrate:up

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts
  ADD COLUMN tokens_version bigint NOT NULL DEFAULT 0;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts DROP COLUMN tokens_version;

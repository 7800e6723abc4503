-- A lease on refreshing a linked identity's provider tokens, so one worker calls the provider.
--
-- 0019's version guard decides which refresh is stored, not who calls the provider: two
-- workers reading the same expiring tokens both send the same refresh token. Providers that
-- rotate refresh tokens with reuse detection revoke the whole grant when a replaced refresh
-- token comes back, and the user must consent again. claim_oauth_refresh sets a lease in one
-- guarded UPDATE (only where none is held, or the one held has run out) and returns the tokens
-- to the one worker that got it; the others get no row and wait for its result.
-- update_oauth_tokens and link_oauth_account with tokens end the lease (new tokens are there).
--
-- refresh_lease_holder is an opaque random number the adapter draws per claim: a retry of the
-- claim after a lost acknowledgement recognises its own lease by it instead of taking it for
-- another worker's. Both columns are NULL while no lease is held; nullable columns without a
-- default: no table rewrite.
-- Locks: ACCESS EXCLUSIVE on oauth_accounts for that moment (lock_timeout bounds the wait).

-- migrate:up

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts
  ADD COLUMN refresh_lease_until timestamptz,
  ADD COLUMN refresh_lease_holder bigint;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts
  DROP COLUMN refresh_lease_until,
  DROP COLUMN refresh_lease_holder;

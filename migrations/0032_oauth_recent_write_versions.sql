-- The versions of a linked identity's last writes, so that a retried write recognises itself
-- after another write has replaced it.
--
-- The adapter retries link_oauth_account and update_oauth_tokens after a lost
-- acknowledgement; each call carries a version drawn at random before its first attempt (0019).
-- A retry recognised its own write only while that version was still the link's tokens_version:
-- when a refresh-lease holder had stored newer tokens in between (claim_oauth_refresh, then
-- update_oauth_tokens), the retry wrote its older tokens back over them, and with a provider
-- that rotates refresh tokens the link then held one the provider had already replaced (found in
-- review). Both writes now add their version here, newest first, the last 8 kept (a re-link
-- without tokens too: it writes the email and name), and write nothing when they find their own
-- version in the list. A retry comes within seconds (the adapter's back-off), where 8 writes to
-- one link would take 8 refreshes or re-links.
--
-- NULL for links not written since this migration; instances of the previous version write
-- without adding to it, which only keeps their writes from being recognised by retries of their
-- own (as before). A nullable column without a default: no table rewrite.
-- Locks: ACCESS EXCLUSIVE on oauth_accounts for that moment (lock_timeout bounds the wait).

-- migrate:up

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts ADD COLUMN recent_write_versions bigint[];

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.oauth_accounts DROP COLUMN recent_write_versions;

-- Users, their password hashes and their OAuth links.
-- Every user-returning query yields the columns of kitium_pg.records.User; the oauth column
-- aggregates the user's rows of oauth_accounts (one index lookup on user_id). A statement that
-- may wait for the user's row lock reads them with kitium_auth.user_oauth_map (migration 0035),
-- whose query takes its snapshot after the wait: a subquery's is the statement's, from before.

-- name: create_user(id, email, email_verified_at, name, picture, plan, entitlements, metadata, password_hash)^
-- Insert a user; a retry with the same id returns the row the first attempt wrote.
WITH inserted AS (
  INSERT INTO kitium_auth.users
    (id, email, email_verified_at, name, picture, plan, entitlements, metadata, password_hash)
  VALUES
    (:id, :email, :email_verified_at, :name, :picture, :plan, :entitlements, :metadata::jsonb,
     :password_hash)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, email, email_verified_at, name, picture, plan, entitlements, metadata,
            created_at, updated_at
)
SELECT id, email, email_verified_at, name, picture, plan, entitlements, metadata,
       '{}'::jsonb AS oauth, created_at, updated_at
  FROM inserted
UNION ALL
SELECT u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
       u.metadata,
       (SELECT coalesce(jsonb_object_agg(o.provider, jsonb_build_object(
                'provider', o.provider, 'sub', o.subject, 'email', o.email,
                'name', o.name, 'linked_at', o.linked_at)), '{}'::jsonb)
          FROM kitium_auth.oauth_accounts AS o WHERE o.user_id = u.id) AS oauth,
       u.created_at, u.updated_at
  FROM kitium_auth.users AS u
 WHERE u.id = :id
 LIMIT 1;

-- name: get_user(id)^
-- Fetch one user by id.
SELECT u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
       u.metadata,
       (SELECT coalesce(jsonb_object_agg(o.provider, jsonb_build_object(
                'provider', o.provider, 'sub', o.subject, 'email', o.email,
                'name', o.name, 'linked_at', o.linked_at)), '{}'::jsonb)
          FROM kitium_auth.oauth_accounts AS o WHERE o.user_id = u.id) AS oauth,
       u.created_at, u.updated_at
  FROM kitium_auth.users AS u
 WHERE u.id = :id;

-- name: get_user_by_email(email)^
-- Fetch one user by email, ignoring case (served by the unique index users__email_key).
SELECT u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
       u.metadata,
       (SELECT coalesce(jsonb_object_agg(o.provider, jsonb_build_object(
                'provider', o.provider, 'sub', o.subject, 'email', o.email,
                'name', o.name, 'linked_at', o.linked_at)), '{}'::jsonb)
          FROM kitium_auth.oauth_accounts AS o WHERE o.user_id = u.id) AS oauth,
       u.created_at, u.updated_at
  FROM kitium_auth.users AS u
 WHERE lower(u.email) = lower(:email);

-- name: get_user_by_oauth(provider, subject)^
-- Fetch the user linked to an OAuth identity (served by oauth_accounts__sub_key).
SELECT u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
       u.metadata,
       (SELECT coalesce(jsonb_object_agg(o.provider, jsonb_build_object(
                'provider', o.provider, 'sub', o.subject, 'email', o.email,
                'name', o.name, 'linked_at', o.linked_at)), '{}'::jsonb)
          FROM kitium_auth.oauth_accounts AS o WHERE o.user_id = u.id) AS oauth,
       u.created_at, u.updated_at
  FROM kitium_auth.oauth_accounts AS link
  JOIN kitium_auth.users AS u ON u.id = link.user_id
 WHERE link.provider = :provider AND link.subject = :subject;

-- name: update_user(id, set_email, email, set_email_verified_at, email_verified_at, set_name, name, set_picture, picture, set_plan, plan, set_entitlements, entitlements, set_metadata, metadata, metadata_patch)^
-- Update the given columns of one user (each set_x flag says whether x is given); no row if the
-- user does not exist. A new address (not the same one in another letter case) is unverified
-- unless email_verified_at is given too: the proof was for the old one (the trigger
-- users_email_verified_at_follows_email clears it, migration 0015).
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
UPDATE kitium_auth.users AS u
   SET email        = CASE WHEN :set_email THEN :email ELSE u.email END,
       email_verified_at = CASE WHEN :set_email_verified_at THEN :email_verified_at
                                ELSE u.email_verified_at END,
       name         = CASE WHEN :set_name THEN :name ELSE u.name END,
       picture      = CASE WHEN :set_picture THEN :picture ELSE u.picture END,
       plan         = CASE WHEN :set_plan THEN :plan ELSE u.plan END,
       entitlements = CASE WHEN :set_entitlements THEN :entitlements ELSE u.entitlements END,
       metadata     = CASE WHEN :set_metadata THEN :metadata::jsonb
                           ELSE kitium_auth.jsonb_merge_patch(u.metadata,
                                                              :metadata_patch::jsonb) END
 WHERE u.id = :id
RETURNING u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
          u.metadata,
          kitium_auth.user_oauth_map(u.id) AS oauth, u.created_at, u.updated_at;

-- name: mark_user_email_verified(id, email)^
-- Record that the user proved control of this address, only while it is still the user's
-- address (in another ASCII letter case too; a concurrent email change wins) and keeping the
-- first proof's time; no row if there is no such user or the address is not the user's.
-- ASCII case only (the "C" collation), as the trigger of migration 0015 compares: under a
-- linguistic locale lower() makes İ an i, so a row stored as bob@gİthub.com by another tool
-- would take the proof of bob@github.com.
UPDATE kitium_auth.users AS u
   SET email_verified_at = coalesce(u.email_verified_at, statement_timestamp())
 WHERE u.id = :id AND lower(u.email COLLATE "C") = lower(:email COLLATE "C")
RETURNING u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
          u.metadata,
          kitium_auth.user_oauth_map(u.id) AS oauth, u.created_at, u.updated_at;

-- name: delete_user(id)!
-- Delete a user; sessions, API keys, OAuth links and memberships go with it (ON DELETE CASCADE).
DELETE FROM kitium_auth.users WHERE id = :id;

-- name: set_password_hash(id, password_hash)$
-- Replace (or clear, with NULL) a user's password hash; returns the id, or nothing if no user.
UPDATE kitium_auth.users SET password_hash = :password_hash WHERE id = :id RETURNING id;

-- name: get_password_hash(id)^
-- A user's password hash; a row with NULL when the user has none, no row when no user.
SELECT password_hash FROM kitium_auth.users WHERE id = :id;

-- name: link_oauth_account(id, user_id, provider, subject, email, name, access_token_ciphertext, refresh_token_ciphertext, tokens_key_id, token_expires_at, tokens_version)^
-- Link an OAuth identity to a user, or refresh it when this user already holds it (provider
-- tokens are replaced only when new ones are given; they arrive encrypted). Returns no row when
-- the identity belongs to another user (the caller raises ConflictError). The user returned is
-- its row as locked (the newest version), its oauth map the user's other links, read after the
-- lock (user_oauth_map), and the link as written (the insert's RETURNING). New tokens end a
-- refresh lease (claim_oauth_refresh). The write's version (drawn at random per call; it
-- becomes tokens_version when tokens are given) goes first in recent_write_versions (the last
-- 8 kept). A retry of this very write after a
-- lost acknowledgement finds its version there and leaves the link as it is: an email, a name
-- or tokens written since (a lease holder's refresh) stay (migration 0032).
-- Links of one user run one after another: the row's user_id is read from the user's row
-- locked FOR NO KEY UPDATE (owner), so the insert and its ON CONFLICT check come after the
-- lock. ON CONFLICT checks only its arbiter, (provider, subject): two first links of one
-- identity to one user that both found no row there both inserted, and the second failed on
-- oauth_accounts__provider_key (user_id, provider) instead of refreshing the link the first had
-- made (found in review). Waiting on the user's row, the second finds that link and updates it.
-- The lock is the one update_user's UPDATE takes, held to the end of the transaction; the
-- foreign-key checks of rows that refer to the user take FOR KEY SHARE and do not wait for it.
-- For no such user nothing is locked and the insert goes ahead with the given id, which the
-- foreign key refuses (NotFoundError).
WITH owner AS (
  SELECT u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
         u.metadata, u.created_at, u.updated_at
    FROM kitium_auth.users AS u
   WHERE u.id = :user_id
     FOR NO KEY UPDATE
), link AS (
  INSERT INTO kitium_auth.oauth_accounts AS o
    (id, user_id, provider, subject, email, name, access_token_ciphertext,
     refresh_token_ciphertext, tokens_key_id, token_expires_at, tokens_version,
     recent_write_versions)
  VALUES
    (:id, coalesce((SELECT w.id FROM owner AS w), :user_id), :provider, :subject, :email,
     :name, :access_token_ciphertext, :refresh_token_ciphertext, :tokens_key_id,
     :token_expires_at, :tokens_version, ARRAY[CAST(:tokens_version AS bigint)])
  ON CONFLICT (provider, subject) DO UPDATE
     -- Each CASE: this very write's retry keeps what is stored, and so does a write without
     -- tokens for the token columns.
     SET email = CASE WHEN EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                      THEN o.email ELSE EXCLUDED.email END,
         name = CASE WHEN EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                     THEN o.name ELSE EXCLUDED.name END,
         access_token_ciphertext =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.access_token_ciphertext ELSE EXCLUDED.access_token_ciphertext END,
         refresh_token_ciphertext =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.refresh_token_ciphertext ELSE EXCLUDED.refresh_token_ciphertext END,
         token_expires_at =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.token_expires_at ELSE EXCLUDED.token_expires_at END,
         tokens_key_id =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.tokens_key_id ELSE EXCLUDED.tokens_key_id END,
         tokens_version =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.tokens_version ELSE EXCLUDED.tokens_version END,
         refresh_lease_until =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.refresh_lease_until ELSE NULL END,
         refresh_lease_holder =
           CASE WHEN EXCLUDED.tokens_key_id IS NULL
                  OR EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.refresh_lease_holder ELSE NULL END,
         recent_write_versions =
           CASE WHEN EXCLUDED.tokens_version = ANY(o.recent_write_versions)
                THEN o.recent_write_versions
                ELSE (EXCLUDED.tokens_version || o.recent_write_versions)[1 : 8] END
   WHERE o.user_id = EXCLUDED.user_id
  RETURNING o.user_id, o.provider, o.subject, o.email, o.name, o.linked_at
)
SELECT u.id, u.email, u.email_verified_at, u.name, u.picture, u.plan, u.entitlements,
       u.metadata,
       kitium_auth.user_oauth_map(u.id) - link.provider
       || jsonb_build_object(link.provider, jsonb_build_object(
                'provider', link.provider, 'sub', link.subject, 'email', link.email,
                'name', link.name, 'linked_at', link.linked_at)) AS oauth,
       u.created_at, u.updated_at
  FROM link
  JOIN owner AS u ON u.id = link.user_id;

-- name: unlink_oauth_account(user_id, provider)!
-- Remove a user's link to a provider.
DELETE FROM kitium_auth.oauth_accounts WHERE user_id = :user_id AND provider = :provider;

-- name: get_oauth_tokens(user_id, provider)^
-- A user's encrypted provider tokens at one provider, with their version (oauth_accounts__provider_key).
SELECT access_token_ciphertext, refresh_token_ciphertext, tokens_key_id, token_expires_at,
       tokens_version
  FROM kitium_auth.oauth_accounts
 WHERE user_id = :user_id AND provider = :provider;

-- name: claim_oauth_refresh(user_id, provider, lease_seconds, holder)^
-- Take the lease on refreshing a link's provider tokens for lease_seconds and return the
-- encrypted tokens with their version, only where no lease is held, the one held has run out,
-- or it is this very claim's (holder, drawn at random per call: a retry after a lost
-- acknowledgement); no row otherwise (another worker holds it, or there is no link). Times are
-- the server's clock, shared by every worker, read once the row is locked (locked, then
-- clock), not at the start of a statement that may have waited on the row (a lease from then
-- would have run out already, and a second worker would get it too). clock_timestamp() in the
-- UPDATE itself was read before that wait when the transaction waited for had only locked the
-- row (the UPDATE is then not evaluated again; found in review). The lease is judged on the row
-- as locked (c.*), not on the UPDATE's scan of the statement's snapshot.
WITH locked AS (
  SELECT o.user_id, o.provider, o.refresh_lease_until, o.refresh_lease_holder
    FROM kitium_auth.oauth_accounts AS o
   WHERE o.user_id = :user_id AND o.provider = :provider
     FOR NO KEY UPDATE
), clock AS (
  SELECT l.user_id, l.provider, l.refresh_lease_until, l.refresh_lease_holder,
         clock_timestamp() AS at
    FROM locked AS l
)
UPDATE kitium_auth.oauth_accounts AS o
   SET refresh_lease_until = c.at + make_interval(secs => :lease_seconds),
       refresh_lease_holder = :holder
  FROM clock AS c
 WHERE o.user_id = c.user_id AND o.provider = c.provider
   AND (c.refresh_lease_until IS NULL
        OR c.refresh_lease_until <= c.at
        OR c.refresh_lease_holder = :holder)
RETURNING o.access_token_ciphertext, o.refresh_token_ciphertext, o.tokens_key_id,
          o.token_expires_at, o.tokens_version;

-- name: update_oauth_tokens(user_id, provider, access_token_ciphertext, refresh_token_ciphertext, tokens_key_id, token_expires_at, if_version, tokens_version)^
-- Replace a link's provider tokens and set their new version (drawn at random by the caller for
-- this write), only while the link holds version if_version when one is given; returns the
-- version, or no row (no link, or another write came first). New tokens end a refresh lease
-- (claim_oauth_refresh): the refresh it was taken for is done. Their version goes first in
-- recent_write_versions (the last 8 kept). A retry of this very write after a lost
-- acknowledgement finds its version there: it changes nothing (newer tokens another worker
-- stored since stay, and so does a lease taken since) and returns the version (migration 0032).
-- The link is read locked, so a retry that waited for its own first attempt (still running
-- when the connection was lost) reads the row that attempt wrote, not its snapshot's.
WITH locked AS (
  SELECT o.user_id, o.provider, o.tokens_version,
         coalesce(:tokens_version = ANY(o.recent_write_versions), false) AS seen
    FROM kitium_auth.oauth_accounts AS o
   WHERE o.user_id = :user_id AND o.provider = :provider
     FOR UPDATE
), written AS (
  UPDATE kitium_auth.oauth_accounts AS o
     SET access_token_ciphertext = :access_token_ciphertext,
         refresh_token_ciphertext = :refresh_token_ciphertext,
         tokens_key_id = :tokens_key_id,
         token_expires_at = :token_expires_at,
         tokens_version = :tokens_version,
         refresh_lease_until = NULL,
         refresh_lease_holder = NULL,
         recent_write_versions = (CAST(:tokens_version AS bigint)
                                  || o.recent_write_versions)[1 : 8]
    FROM locked AS c
   WHERE o.user_id = c.user_id AND o.provider = c.provider AND NOT c.seen
     AND (CAST(:if_version AS bigint) IS NULL OR c.tokens_version = :if_version)
  RETURNING o.tokens_version
)
SELECT tokens_version FROM written
UNION ALL
SELECT CAST(:tokens_version AS bigint) FROM locked WHERE seen;

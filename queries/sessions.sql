-- Login sessions.
-- Every session-returning query yields the columns of kitium_pg.records.Session. Reads treat a
-- session whose expires_at has passed as gone; only the cleanup and delete queries touch it.
-- Expiry is judged at statement_timestamp(), not now(): inside a caller's transaction now()
-- is the transaction's start, so a credential that expired since would still pass.

-- name: create_session(id, user_id, org_id, plan, entitlements, metadata, expires_at, token_hash)^
-- Insert a session (token_hash is the digest of a bearer token's secret, or NULL); a retry with
-- the same id returns the row the first attempt wrote. A session bound to an organization needs
-- the user's membership (sessions__member_fkey, migration 0021): without one no row is written
-- or returned (the caller raises NotFoundError).
-- Lock order for such a session: the user, the organization, then the membership (KEY SHARE;
-- each CTE waits for the one before it), all before the insert. The insert's foreign-key checks
-- take the same locks, but at the end of the statement and in the order of their triggers'
-- names, which a dump and restore changes; delete_user and delete_organization lock the parent
-- row first and the memberships by cascade after it, so the membership first would be a cycle.
WITH owner AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE u.id = :user_id AND CAST(:org_id AS uuid) IS NOT NULL
     FOR KEY SHARE
), org AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE o.id = :org_id AND EXISTS (SELECT FROM owner)
     FOR KEY SHARE
), member AS (
  SELECT m.user_id
    FROM kitium_auth.organization_members AS m
   WHERE m.org_id = :org_id AND m.user_id = :user_id AND EXISTS (SELECT FROM org)
     FOR KEY SHARE
), inserted AS (
  INSERT INTO kitium_auth.sessions
    (id, user_id, org_id, plan, entitlements, metadata, expires_at, token_hash)
  SELECT :id, :user_id, :org_id, :plan, :entitlements, :metadata::jsonb, :expires_at, :token_hash
   WHERE CAST(:org_id AS uuid) IS NULL OR EXISTS (SELECT FROM member)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
)
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM inserted
UNION ALL
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM kitium_auth.sessions
 WHERE id = :id
 LIMIT 1;

-- name: create_session_with_event(id, user_id, org_id, plan, entitlements, metadata, expires_at, token_hash, event_id, event_type, event_principal_id, event_org_id, event_data, event_ts)^
-- Insert a session and its audit event (a sign-in) in one statement: both rows or neither, one
-- round trip, one commit. Both ids are drawn before the first attempt, so a retry writes nothing
-- twice and returns the session the first attempt wrote. Membership and lock order as in
-- create_session: without the membership neither row is written.
WITH owner AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE u.id = :user_id AND CAST(:org_id AS uuid) IS NOT NULL
     FOR KEY SHARE
), org AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE o.id = :org_id AND EXISTS (SELECT FROM owner)
     FOR KEY SHARE
), member AS (
  SELECT m.user_id
    FROM kitium_auth.organization_members AS m
   WHERE m.org_id = :org_id AND m.user_id = :user_id AND EXISTS (SELECT FROM org)
     FOR KEY SHARE
), inserted AS (
  INSERT INTO kitium_auth.sessions
    (id, user_id, org_id, plan, entitlements, metadata, expires_at, token_hash)
  SELECT :id, :user_id, :org_id, :plan, :entitlements, :metadata::jsonb, :expires_at, :token_hash
   WHERE CAST(:org_id AS uuid) IS NULL OR EXISTS (SELECT FROM member)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
), event AS (
  INSERT INTO kitium_auth.auth_events (id, type, principal_id, org_id, data, "timestamp")
  SELECT :event_id, :event_type, :event_principal_id, :event_org_id, :event_data::jsonb,
         coalesce(:event_ts::timestamptz, now())
   WHERE CAST(:org_id AS uuid) IS NULL OR EXISTS (SELECT FROM member)
  ON CONFLICT (id) DO NOTHING
)
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM inserted
UNION ALL
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM kitium_auth.sessions
 WHERE id = :id
 LIMIT 1;

-- name: get_session(id)^
-- Fetch one unexpired session by id.
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM kitium_auth.sessions
 WHERE id = :id AND expires_at > statement_timestamp();

-- name: update_session(id, set_org_id, org_id, set_plan, plan, set_entitlements, entitlements, set_expires_at, expires_at, set_metadata, metadata, metadata_patch)^
-- Update the given columns of one unexpired session (each set_x flag says whether x is given); no
-- row if the session does not exist or has expired (an expired session is never revived).
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
-- Binding the session to an organization goes through update_session_org; this one may only
-- unbind it (org_id NULL).
-- The expiry is judged on the row as locked and at that time (locked, then clock): a plain
-- UPDATE that waited for the row judged it, and computed its new values, before the wait, and
-- revived a session that had expired meanwhile (found in review). clock_timestamp() alone would
-- not do: when the transaction waited for only locked the row, the UPDATE is not evaluated
-- again after the wait; and its scan reads the statement's snapshot, not the row as locked.
WITH locked AS (
  SELECT s.id, s.expires_at FROM kitium_auth.sessions AS s WHERE s.id = :id FOR NO KEY UPDATE
), clock AS (
  SELECT l.id, l.expires_at, clock_timestamp() AS at FROM locked AS l
)
UPDATE kitium_auth.sessions AS s
   SET org_id       = CASE WHEN :set_org_id THEN :org_id ELSE s.org_id END,
       plan         = CASE WHEN :set_plan THEN :plan ELSE s.plan END,
       entitlements = CASE WHEN :set_entitlements THEN :entitlements ELSE s.entitlements END,
       expires_at   = CASE WHEN :set_expires_at THEN :expires_at ELSE s.expires_at END,
       metadata     = CASE WHEN :set_metadata THEN :metadata::jsonb
                           ELSE kitium_auth.jsonb_merge_patch(s.metadata,
                                                              :metadata_patch::jsonb) END
  FROM clock AS c
 WHERE s.id = c.id AND c.expires_at > c.at
RETURNING s.id, s.user_id, s.org_id, s.plan, s.entitlements, s.metadata, s.expires_at,
          s.created_at, s.updated_at;

-- name: update_session_org(id, org_id, set_plan, plan, set_entitlements, entitlements, set_expires_at, expires_at, set_metadata, metadata, metadata_patch)^
-- update_session that binds the session to organization org_id: only while its user is a
-- member (sessions__member_fkey), as the caller sees the membership (under row-level security,
-- the tenant's); no row otherwise (the caller raises NotFoundError). Lock order as in
-- create_session: the user, the organization and the membership (KEY SHARE), then the session
-- row (locked, once member has read the membership), whose expiry is then judged at that time
-- (clock), as in update_session.
WITH target AS (
  SELECT s.user_id
    FROM kitium_auth.sessions AS s
   WHERE s.id = :id
), owner AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE u.id = (SELECT t.user_id FROM target AS t)
     FOR KEY SHARE
), org AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE o.id = :org_id AND EXISTS (SELECT FROM owner)
     FOR KEY SHARE
), member AS (
  SELECT m.user_id
    FROM kitium_auth.organization_members AS m
   WHERE m.org_id = :org_id AND m.user_id = (SELECT t.user_id FROM target AS t)
     AND EXISTS (SELECT FROM org)
     FOR KEY SHARE
), locked AS (
  SELECT s.id, s.expires_at
    FROM kitium_auth.sessions AS s
   WHERE s.id = :id AND EXISTS (SELECT FROM member)
     FOR NO KEY UPDATE
), clock AS (
  SELECT l.id, l.expires_at, clock_timestamp() AS at FROM locked AS l
)
UPDATE kitium_auth.sessions AS s
   SET org_id       = :org_id,
       plan         = CASE WHEN :set_plan THEN :plan ELSE s.plan END,
       entitlements = CASE WHEN :set_entitlements THEN :entitlements ELSE s.entitlements END,
       expires_at   = CASE WHEN :set_expires_at THEN :expires_at ELSE s.expires_at END,
       metadata     = CASE WHEN :set_metadata THEN :metadata::jsonb
                           ELSE kitium_auth.jsonb_merge_patch(s.metadata,
                                                              :metadata_patch::jsonb) END
  FROM clock AS c
 WHERE s.id = c.id AND c.expires_at > c.at
RETURNING s.id, s.user_id, s.org_id, s.plan, s.entitlements, s.metadata, s.expires_at,
          s.created_at, s.updated_at;

-- name: delete_session(id)!
-- Delete one session, expired or not.
DELETE FROM kitium_auth.sessions WHERE id = :id;

-- name: delete_expired_sessions(after, after_id, batch_size)^
-- Delete at most batch_size expired sessions, earliest expiry first (sessions_expires_at_id_idx,
-- migration 0042), from the key (after, after_id) on (NULLs: the first batch), and return how
-- many it deleted, how many it locked and the key it reached (the next batch's: its expiry as
-- text, which reads back exactly, even
-- '-infinity' or a date BC written by another tool, which a Python datetime cannot hold; in UTC
-- and without a zone: the text of a timestamptz names the session's zone, by abbreviation under
-- a non-ISO DateStyle, and PostgreSQL 15 read 'IST' (Asia/Kolkata's) back as Israel's, 3.5 hours
-- off, so the next batch started past expired rows). The index scan starts there, not at the
-- start of the index: while an older snapshot is open elsewhere (pg_dump, a long report), the index
-- entries of rows deleted by the batches before cannot be marked dead, and each batch would walk
-- them all (measured: 171 s instead of 5.4 s for 378,000 rows); the id makes the key unique, so
-- rows sharing one expiry are not walked again by each batch either (migration 0042 says why).
-- Rows another transaction has locked
-- (another cleaner, an open update) are skipped and left for the next run, so cleaners never wait
-- on each other or on the application. The batch is deleted by physical address (a Tid Scan): it
-- saves a primary-key descent per row (benchmarks: 1.3x the rows/s of = ANY (ARRAY(SELECT id ...)),
-- and a third of the buffer writes). A row updated after the statement began is locked in its new
-- version, which this statement's snapshot does not see: it is locked but not deleted, and the
-- caller goes on while a batch locks batch_size rows; the next batch starts just past the last
-- row it reached (the adapter passes that row's id's successor) and the next run deletes it. IN (subquery) was planned as a hash
-- semi-join over the whole table.
WITH batch AS (
  SELECT ctid, expires_at, id
    FROM kitium_auth.sessions
   WHERE expires_at <= statement_timestamp()
     AND (expires_at, id) >= (coalesce(CAST(:after AS timestamp) AT TIME ZONE 'UTC', '-infinity'),
                              coalesce(CAST(:after_id AS uuid),
                                       '00000000-0000-0000-0000-000000000000'))
   ORDER BY expires_at, id
   LIMIT :batch_size
     FOR UPDATE SKIP LOCKED
), deleted AS (
  DELETE FROM kitium_auth.sessions
   WHERE ctid = ANY (ARRAY(SELECT ctid FROM batch))
  RETURNING 1
), reached AS (
  SELECT expires_at, id FROM batch ORDER BY expires_at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM batch) AS locked,
       (SELECT (expires_at AT TIME ZONE 'UTC')::text FROM reached) AS last,
       (SELECT id FROM reached) AS last_id;

-- name: list_user_sessions(user_id)
-- A user's unexpired sessions, newest first: created_at, then id (a backward scan of
-- sessions_user_id_created_at_id_idx, migration 0030).
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM kitium_auth.sessions
 WHERE user_id = :user_id AND expires_at > statement_timestamp()
 ORDER BY created_at DESC, id DESC;

-- name: list_user_sessions_page(user_id, after_created_at, after_id, page_size)
-- One page of a user's unexpired sessions, newest first: at most page_size of them (all when
-- NULL) strictly after the keyset (after_created_at, after_id) in that order, that is older, or
-- from the newest when both are NULL. The bound is always there (NULL stands for ('infinity',
-- the largest uuid), above every session), so it is an index condition of a backward range
-- scan of sessions_user_id_created_at_id_idx (migration 0030) in a generic plan too: no sort.
-- Expired sessions in the range are read and skipped (the purge removes them).
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at
  FROM kitium_auth.sessions
 WHERE user_id = :user_id
   AND (created_at, id) < (coalesce(:after_created_at::timestamptz, 'infinity'::timestamptz),
                           coalesce(:after_id::uuid,
                                    'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
   AND expires_at > statement_timestamp()
 ORDER BY created_at DESC, id DESC
 LIMIT :page_size;

-- name: delete_user_sessions(user_id, except_session_id)!
-- Delete every session of a user, expired ones included, but the one except_session_id names
-- when it is not NULL ("sign out other devices"; served by
-- sessions_user_id_created_at_id_idx). First the memberships its organization-bound sessions
-- rest on are locked (FOR KEY SHARE): a member's removal, a member-set replacement and an
-- organization's deletion delete the membership before its sessions, so they wait here before
-- either side holds a session. Without it the sessions went in creation order here and in row
-- order there, and the two deadlocked once a slid expiry had moved an older session's row after
-- a newer one's (found in review). The memberships go in row order, the order in which a
-- user's deletion reaches them (its cascade, through organization_members_user_id_idx, whose
-- ties are in row order, or any scan): in organization order the two deadlocked over a user's
-- two memberships (found in review of that fix). The lock is taken by
-- lock_user_session_memberships (migration 0039), which sees every tenant's memberships: under
-- tenant_rls this statement's own read would lock only the tenant's.
WITH members AS (
  SELECT kitium_auth.lock_user_session_memberships(:user_id)
)
DELETE FROM kitium_auth.sessions
 WHERE user_id = :user_id
   AND (:except_session_id::uuid IS NULL OR id <> :except_session_id)
   AND (SELECT count(*) FROM members) >= 0;  -- always true: the memberships are locked first

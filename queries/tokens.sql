-- Bearer credentials issued by kitium-pg: session tokens and API keys. Only digests are stored;
-- the adapter compares them in constant time after the indexed lookup.
-- Expiry is judged at statement_timestamp(), not now(): inside a caller's transaction now()
-- is the transaction's start, so a credential that expired since would still pass.

-- name: get_session_for_token(id)^
-- The unexpired, token-bearing session with this id and its token digest (primary key lookup).
SELECT id, user_id, org_id, plan, entitlements, metadata, expires_at, created_at, updated_at,
       token_hash
  FROM kitium_auth.sessions
 WHERE id = :id AND expires_at > statement_timestamp() AND token_hash IS NOT NULL;

-- name: create_session_unless_deactivated(id, user_id, expires_at, token_hash)^
-- fastapi-users' login (KitiumSessionStrategy.write_token): insert a bearer-token session only
-- while the user is active there (metadata fastapi_users.is_active missing or JSON true), judged
-- on the user row locked FOR SHARE, which conflicts with an UPDATE of it. A deactivation in
-- flight is waited for and its new row judged; one that comes later waits for this session to
-- commit, so the delete_user_sessions after it sees the session. No row when refused or the user
-- is gone; a retry with the same id returns the row the first attempt wrote.
WITH owner AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE u.id = :user_id
     AND coalesce(u.metadata -> 'fastapi_users' -> 'is_active', 'true'::jsonb) = 'true'::jsonb
     FOR SHARE
), inserted AS (
  INSERT INTO kitium_auth.sessions
    (id, user_id, org_id, plan, entitlements, metadata, expires_at, token_hash)
  SELECT :id, o.id, NULL, NULL, '{}', '{}'::jsonb, :expires_at, :token_hash
    FROM owner AS o
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

-- name: rotate_session_token(id, presented_hash, token_hash, set_expires_at, expires_at, reuse_grace, presented_ago, event_id)
-- Give one unexpired session a new token digest, and a new expires_at when set_expires_at, if
-- its digest is the presented token's, or already the new one (a retry after a lost
-- acknowledgement finds its own write); the digest replaced is kept with the time (0028). No
-- row when the session is unknown, expired, tokenless or was rotated by another call first
-- (that call's digest matches neither), and none when the new expires_at has passed (the new
-- token would never validate: the presented one stays). reused is false on a rotated row.
-- The token rotated out last, presented more than reuse_grace after its rotation (NULL: never),
-- ends the session and writes a session.token_reused event (id event_id), both here: a row
-- with reused true (and no session) says so, also to a retry after a lost acknowledgement, which
-- finds that event (auth_event_written, migration 0038: read after this statement's waits, so a
-- retry that waited for its own first attempt's lock sees its commit). Within reuse_grace it
-- gets no row and changes nothing. The event is the user's, with no organization (the
-- session's goes in its data): sessions are not tenant data, and under tenant_rls a caller
-- without a tenant may write only such events.
-- The session is judged as locked and at that time (locked, then clock), as in update_session:
-- judged on the statement's snapshot and at its start, a rotation that waited for the row
-- stamped a rotation time from before the wait, which shortened the grace of the token it
-- replaced, and took a new expires_at that had passed meanwhile (found in review). The grace
-- runs from that stamp to when the token was presented (this statement's start, less
-- presented_ago: zero, or for the adapter's retry the time since its first attempt began), not
-- to when this call got the lock: a rotation of the same token queued behind the winning one
-- was presented before that rotation, and is no reuse (found in review); nor to a retry's
-- start: a retry after a lost acknowledgement ended the session for a token presented within
-- the grace (found in review).
WITH locked AS (
  SELECT s.id, s.token_hash, s.previous_token_hash, s.token_rotated_at, s.expires_at
    FROM kitium_auth.sessions AS s
   WHERE s.id = :id
     FOR NO KEY UPDATE
), clock AS (
  SELECT l.id, l.token_hash, l.previous_token_hash, l.token_rotated_at, l.expires_at,
         clock_timestamp() AS at
    FROM locked AS l
), ended AS (
  DELETE FROM kitium_auth.sessions AS s
   USING clock AS c
   WHERE s.id = c.id
     AND c.previous_token_hash = :presented_hash
     AND c.token_hash <> :token_hash
     AND c.token_rotated_at
         <= statement_timestamp() - CAST(:presented_ago AS interval)
            - CAST(:reuse_grace AS interval)
  RETURNING s.id, s.user_id, s.org_id, s.token_rotated_at
), reported AS (
  INSERT INTO kitium_auth.auth_events (id, type, principal_id, org_id, data, "timestamp")
  SELECT :event_id, 'session.token_reused', ended.user_id::text, NULL,
         jsonb_build_object('session_id', ended.id, 'org_id', ended.org_id,
                            'rotated_at', ended.token_rotated_at),
         statement_timestamp()
    FROM ended
), rotated AS (
  UPDATE kitium_auth.sessions AS s
     SET token_hash = :token_hash,
         previous_token_hash = CASE WHEN s.token_hash = :token_hash THEN s.previous_token_hash
                                    ELSE s.token_hash END,
         token_rotated_at = CASE WHEN s.token_hash = :token_hash THEN s.token_rotated_at
                                 ELSE c.at END,
         expires_at = CASE WHEN :set_expires_at THEN :expires_at ELSE s.expires_at END
    FROM clock AS c
   WHERE s.id = c.id
     AND c.token_hash IN (:presented_hash, :token_hash)
     AND c.expires_at > c.at
     AND (NOT :set_expires_at OR :expires_at > c.at)
  RETURNING s.id, s.user_id, s.org_id, s.plan, s.entitlements, s.metadata, s.expires_at,
            s.created_at, s.updated_at
)
SELECT r.id IS NULL AS reused, r.id, r.user_id, r.org_id, r.plan, r.entitlements, r.metadata,
       r.expires_at, r.created_at, r.updated_at
  FROM (SELECT) AS one
  LEFT JOIN rotated AS r ON true
 WHERE r.id IS NOT NULL
    OR EXISTS (SELECT FROM ended)
    OR kitium_auth.auth_event_written(:event_id);

-- name: verify_api_key(hash)^
-- The unexpired key with this digest; stamps last_used_at when it is over a minute old, so a busy
-- key costs at most one write a minute (api_keys__hash_key serves both branches). The stamp
-- skips a row another transaction holds locked (SKIP LOCKED; the key is then returned as read,
-- unstamped this time): a check must not wait for a lock. Updating directly, every check of a
-- key whose row an open transaction held (an update_api_key, or a verify_api_key inside a
-- transaction()) waited for it, and failed at its statement timeout (found in review).
WITH due AS (
  SELECT id
    FROM kitium_auth.api_keys
   WHERE hash = :hash
     AND (expires_at IS NULL OR expires_at > statement_timestamp())
     AND (last_used_at IS NULL OR last_used_at < statement_timestamp() - interval '1 minute')
     FOR NO KEY UPDATE SKIP LOCKED
), touched AS (
  UPDATE kitium_auth.api_keys
     SET last_used_at = statement_timestamp()
   WHERE id = (SELECT d.id FROM due AS d)
  RETURNING id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at,
            last_used_at, created_at, updated_at
)
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM touched
UNION ALL
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM kitium_auth.api_keys
 WHERE hash = :hash
   AND (expires_at IS NULL OR expires_at > statement_timestamp())
   AND NOT EXISTS (SELECT 1 FROM touched)
 LIMIT 1;

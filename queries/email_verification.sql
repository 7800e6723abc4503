-- Email verification (and reset, login…) tokens and their attempt counters.
-- Every token-returning query yields the columns of kitium_pg.records.EmailVerificationToken.
-- Only code_hash is stored; consumed_by (never returned) records which call consumed a token.
-- Expiry is judged at statement_timestamp(), not now(): inside a caller's transaction now()
-- is the transaction's start, so a credential that expired since would still pass.

-- name: create_email_verification_token(id, email, code_hash, type, user_id, metadata, expires_at)^
-- Insert a token and its attempt counter at 0 (the row concurrent attempts at its address lock:
-- see increment_email_verification_token_attempts); a retry with the same id returns the row
-- the first attempt wrote.
-- A token naming a user first locks the user's row FOR SHARE, which a change of the user's
-- address (an UPDATE: NO KEY UPDATE, since the email's unique index is on an expression) waits
-- for: migration 0033's trigger then sees the token and ends it if it was sent to the old
-- address. With the foreign key's KEY SHARE alone the two did not wait for each other, and a
-- token to the old address committed during the change outlived it (found in review).
WITH owner AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE u.id = :user_id
     FOR SHARE OF u
), inserted AS (
  INSERT INTO kitium_auth.email_verification_tokens
    (id, email, code_hash, type, user_id, metadata, expires_at)
  SELECT :id, :email, :code_hash, :type, :user_id, :metadata::jsonb, :expires_at
   WHERE (SELECT count(*) FROM owner) >= 0  -- always true: the user is locked first
  ON CONFLICT (id) DO NOTHING
  RETURNING id, email, code_hash, type, user_id, metadata, expires_at, used_at, created_at
), counter AS (
  INSERT INTO kitium_auth.email_verification_token_attempts (token_id, attempts, last_attempt_at)
  SELECT id, 0, created_at
    FROM inserted
)
SELECT id, email, code_hash, type, user_id, metadata, expires_at, used_at, created_at
  FROM inserted
UNION ALL
SELECT id, email, code_hash, type, user_id, metadata, expires_at, used_at, created_at
  FROM kitium_auth.email_verification_tokens
 WHERE id = :id AND NOT EXISTS (SELECT 1 FROM inserted)
 LIMIT 1;

-- name: get_email_verification_token_by_id(id)^
-- Fetch one token by id.
SELECT id, email, code_hash, type, user_id, metadata, expires_at, used_at, created_at
  FROM kitium_auth.email_verification_tokens
 WHERE id = :id;

-- name: get_email_verification_tokens(email)
-- Every token of one email (any letter case and type), newest first (served by
-- email_verification_tokens_email_idx on its leading column).
SELECT id, email, code_hash, type, user_id, metadata, expires_at, used_at, created_at
  FROM kitium_auth.email_verification_tokens
 WHERE lower(email) = lower(:email)
 ORDER BY created_at DESC, id DESC;

-- name: get_email_verification_tokens_of_type(email, type)
-- The tokens of one email (any letter case) and one type, newest first (served in order by
-- email_verification_tokens_email_idx).
SELECT id, email, code_hash, type, user_id, metadata, expires_at, used_at, created_at
  FROM kitium_auth.email_verification_tokens
 WHERE lower(email) = lower(:email) AND type = :type
 ORDER BY created_at DESC, id DESC;

-- name: mark_email_verification_token_as_used(id, consumer)^
-- Consume a token once. The guarded update wins only for an unused, unexpired token, or for the
-- call (consumer) that already consumed it, so a retried call still wins. Row lock waiters
-- re-check the guard against the winner's row and lose. consumed is true for the winning row;
-- a row with consumed false means the token exists but is used or expired; no row means no
-- such token. The refusal reads the row locked (FOR KEY SHARE, the weakest lock): the row as
-- committed last, not as the statement's snapshot had it. Read plainly, a token deleted while
-- the update waited for its row (the user deleted, 0009's cascade) was reported as used,
-- ConflictError for a token never consumed (found in review); now it is gone: NotFoundError.
-- Expiry is judged, and used_at stamped, once the token is locked (locked, then clock), as in
-- update_session: a consume that waited for the row took a token that expired meanwhile. The
-- token is judged as locked (c.*): the UPDATE's scan reads the statement's snapshot, where a
-- retry that waited for its own first attempt found the token unused and, once it had expired
-- meanwhile, lost its own win.
WITH locked AS (
  SELECT t.id, t.used_at, t.expires_at, t.consumed_by
    FROM kitium_auth.email_verification_tokens AS t
   WHERE t.id = :id
     FOR NO KEY UPDATE
), clock AS (
  SELECT l.id, l.used_at, l.expires_at, l.consumed_by, clock_timestamp() AS at
    FROM locked AS l
), consumed AS (
  UPDATE kitium_auth.email_verification_tokens AS t
     SET used_at = coalesce(t.used_at, c.at), consumed_by = :consumer
    FROM clock AS c
   WHERE t.id = c.id
     AND ((c.used_at IS NULL AND c.expires_at > c.at) OR c.consumed_by = :consumer)
  RETURNING t.id, t.email, t.code_hash, t.type, t.user_id, t.metadata, t.expires_at,
            t.used_at, t.created_at
), existing AS (
  SELECT t.id, t.email, t.code_hash, t.type, t.user_id, t.metadata, t.expires_at, t.used_at,
         t.created_at
    FROM kitium_auth.email_verification_tokens AS t
   WHERE t.id = :id AND NOT EXISTS (SELECT 1 FROM consumed)
     FOR KEY SHARE
)
SELECT true AS consumed, id, email, code_hash, type, user_id, metadata, expires_at, used_at,
       created_at
  FROM consumed
UNION ALL
SELECT false AS consumed, id, email, code_hash, type, user_id, metadata, expires_at, used_at,
       created_at
  FROM existing
 LIMIT 1;

-- name: revoke_email_verification_tokens(email, type)!
-- Mark every unused, unexpired token of one email (any letter case), only those of type when it
-- is not NULL, as used, so that none can be consumed any more (a new reset link revokes the
-- earlier ones; served by email_verification_tokens_email_idx). The tokens are locked first,
-- in row order: the order in which a change of their user's address (migration 0033's trigger)
-- and their user's deletion (the cascade) reach them, both through
-- email_verification_tokens_user_id_idx, whose ties are in row order. Marked newest first (the
-- email index), the revocation deadlocked with those (found in review). Their users are not
-- locked: a lock on the user, held while waiting for a token a transaction had consumed,
-- deadlocked with that transaction's next write of the user (found in review of that fix).
WITH locked AS (
  SELECT t.id
    FROM kitium_auth.email_verification_tokens AS t
   WHERE lower(t.email) = lower(:email)
     AND (:type::text IS NULL OR t.type = :type)
     AND t.used_at IS NULL
     AND t.expires_at > statement_timestamp()
   ORDER BY t.ctid
     FOR NO KEY UPDATE
)
UPDATE kitium_auth.email_verification_tokens AS t
   SET used_at = statement_timestamp()
 WHERE t.id IN (SELECT l.id FROM locked AS l)
   AND t.used_at IS NULL;

-- name: delete_expired_email_verification_tokens(after, after_id, batch_size)^
-- Delete up to batch_size expired tokens, oldest expiry first (served by
-- email_verification_tokens_expires_at_id_idx, migration 0045) from the key (after, after_id)
-- on, and return how many it deleted, how many it locked and the key it reached; rows locked by
-- another caller are skipped.
-- Built as delete_expired_sessions, whose comment says why.
WITH batch AS (
  SELECT ctid, expires_at, id
    FROM kitium_auth.email_verification_tokens
   WHERE expires_at <= statement_timestamp()
     AND (expires_at, id) >= (coalesce(CAST(:after AS timestamp) AT TIME ZONE 'UTC', '-infinity'),
                              coalesce(CAST(:after_id AS uuid),
                                       '00000000-0000-0000-0000-000000000000'))
   ORDER BY expires_at, id
   LIMIT :batch_size
     FOR UPDATE SKIP LOCKED
), deleted AS (
  DELETE FROM kitium_auth.email_verification_tokens
   WHERE ctid = ANY (ARRAY(SELECT ctid FROM batch))
  RETURNING 1
), reached AS (
  SELECT expires_at, id FROM batch ORDER BY expires_at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM batch) AS locked,
       (SELECT (expires_at AT TIME ZONE 'UTC')::text FROM reached) AS last,
       (SELECT id FROM reached) AS last_id;

-- name: get_email_verification_token_attempts(token_id)$
-- The attempts counted against a token's address: its own counter plus those of the other
-- unexpired tokens of the same email (any letter case) and type (email_verification_tokens_email_idx);
-- 0 for an unknown token. Why the address's: see increment_email_verification_token_attempts.
SELECT coalesce((SELECT a.attempts
                   FROM kitium_auth.email_verification_token_attempts AS a
                  WHERE a.token_id = :token_id), 0)
       + coalesce((SELECT sum(o.attempts)
                     FROM kitium_auth.email_verification_tokens AS t
                     JOIN kitium_auth.email_verification_tokens AS s
                       ON lower(s.email) = lower(t.email) AND s.type = t.type AND s.id <> t.id
                     JOIN kitium_auth.email_verification_token_attempts AS o
                       ON o.token_id = s.id
                    WHERE t.id = :token_id AND s.expires_at > statement_timestamp()), 0);

-- name: increment_email_verification_token_attempts(token_id)$
-- Add one to a token's attempt counter (creating it at 1) and return the attempts counted
-- against its address: the new count plus the counters of the other unexpired tokens of the
-- same email (any letter case) and type. A new token (a resend, which revokes the earlier ones)
-- thus starts with the address's attempts: counted per token, each resend gave a guesser a new
-- budget (found in review: 200 guesses at one address's 6-digit reset codes in 0.2 s). The
-- budget comes back as those tokens expire. Concurrent attempts at one address serialise: each
-- first locks the counters of the address's unexpired tokens and of its own, in token order
-- (so no two wait on each other in a cycle), then reads the others' counts as committed once it
-- holds those locks (email_address_attempts, migration 0041). Read from the statement's
-- snapshot instead, two guesses on two tokens of one address each missed the other's (found in
-- review: 3 attempts, both told 2); read from the rows as locked, a count missed an attempt on
-- a token created (a resend) while the statement waited for a lock (found in review). A
-- token's counter is made, at 0, with the token (create_email_verification_token), so there is
-- a row to lock; a token made before that has none until its first attempt.
WITH address AS (
  SELECT lower(email) AS email, type
    FROM kitium_auth.email_verification_tokens
   WHERE id = :token_id
), counters AS (
  SELECT o.token_id
    FROM address AS d
    JOIN kitium_auth.email_verification_tokens AS s
      ON lower(s.email) = d.email AND s.type = d.type
    JOIN kitium_auth.email_verification_token_attempts AS o
      ON o.token_id = s.id
   WHERE s.id = :token_id OR s.expires_at > statement_timestamp()
   ORDER BY o.token_id
     FOR NO KEY UPDATE OF o
), touched AS (
  -- from a row that needs every lock above: the count is written once they are all held
  INSERT INTO kitium_auth.email_verification_token_attempts AS a
    (token_id, attempts, last_attempt_at)
  SELECT :token_id, 1, now()
    FROM (SELECT count(*) FROM counters) AS locked
  ON CONFLICT (token_id) DO UPDATE
     SET attempts = a.attempts + 1, last_attempt_at = now()
  RETURNING a.attempts
)
SELECT c.attempts + kitium_auth.email_address_attempts(:token_id)
  FROM touched AS c;

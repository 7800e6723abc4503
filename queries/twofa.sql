-- Two-factor devices, backup codes and challenges (twofa_sessions).
-- Every device-returning query yields the columns the adapter decrypts into
-- kitium_pg.records.TwoFactorDevice: secret_ciphertext and secret_key_id become secret.
-- Backup codes and challenge codes are stored only as digests (code_hash); consumed_by (never
-- returned) records which call consumed a code or completed a challenge.
-- Expiry is judged at statement_timestamp(), not now(): inside a caller's transaction now()
-- is the transaction's start, so a credential that expired since would still pass. The calls
-- that lock a challenge (verify_two_factor_session, count_two_factor_attempt,
-- complete_two_factor_session) judge it, its login session and the device's throttle at
-- clock_timestamp() once they hold their rows (migration 0040): statement_timestamp() is the
-- time before any wait for those locks.
-- Throttle (migration 0018): after n consecutive wrong codes a device refuses code checks for
-- 2^(n-1) seconds, at most 15 minutes (throttled_until), and a right code resets it. One
-- formula, in the functions verify_two_factor_session (for a code found wrong) and
-- count_two_factor_attempt (for a code let through to the application's check, charged before
-- it is checked), both in migration 0018: the new throttled_until is the time the call holds
-- its rows (migration 0040) plus that delay, never earlier than the one already set. In SQL
-- the delay is 2 ^ the count before this failure (n - 1), whose exponent stops at 10 (past the
-- cap) so the power cannot overflow; the count saturates below the integer limit.
-- Lock order: a call that locks both a device and one of its challenges locks the device
-- first, as deleting a device or its user does (the cascade deletes the challenges after it),
-- so two such calls never wait for each other in a cycle. An application transaction keeps
-- that order by writing the device (record_totp_step) before the challenge
-- (complete_two_factor_session).

-- name: create_two_factor_device(id, user_id, method, name, verified, phone_number, secret_ciphertext, secret_key_id, metadata)^
-- Insert a device; a retry with the same id returns the row the first attempt wrote.
WITH inserted AS (
  INSERT INTO kitium_auth.twofa_devices
    (id, user_id, method, name, verified, phone_number, secret_ciphertext, secret_key_id,
     metadata)
  VALUES
    (:id, :user_id, :method, :name, :verified, :phone_number, :secret_ciphertext,
     :secret_key_id, :metadata::jsonb)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, user_id, method, name, verified, phone_number, secret_ciphertext,
            secret_key_id, last_used_at, throttle_failures, throttled_until, metadata,
            created_at, updated_at
)
SELECT id, user_id, method, name, verified, phone_number, secret_ciphertext, secret_key_id,
       last_used_at, throttle_failures, throttled_until, metadata, created_at, updated_at
  FROM inserted
UNION ALL
SELECT id, user_id, method, name, verified, phone_number, secret_ciphertext, secret_key_id,
       last_used_at, throttle_failures, throttled_until, metadata, created_at, updated_at
  FROM kitium_auth.twofa_devices
 WHERE id = :id
 LIMIT 1;

-- name: get_two_factor_device(id)^
-- Fetch one device by id.
SELECT id, user_id, method, name, verified, phone_number, secret_ciphertext, secret_key_id,
       last_used_at, throttle_failures, throttled_until, metadata, created_at, updated_at
  FROM kitium_auth.twofa_devices
 WHERE id = :id;

-- name: list_two_factor_devices(user_id)
-- Every device of one user, oldest first (served by twofa_devices_user_id_idx).
SELECT id, user_id, method, name, verified, phone_number, secret_ciphertext, secret_key_id,
       last_used_at, throttle_failures, throttled_until, metadata, created_at, updated_at
  FROM kitium_auth.twofa_devices
 WHERE user_id = :user_id
 ORDER BY created_at, id;

-- name: update_two_factor_device(id, set_name, name, set_verified, verified, set_phone_number, phone_number, set_secret, secret_ciphertext, secret_key_id, set_metadata, metadata, metadata_patch, set_last_used_at, last_used_at)^
-- Update the given columns of one device (each set_x flag says whether x is given; set_secret
-- replaces or clears the ciphertext together with its key id); no row if there is no device.
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
UPDATE kitium_auth.twofa_devices AS d
   SET name              = CASE WHEN :set_name THEN :name ELSE d.name END,
       verified          = CASE WHEN :set_verified THEN :verified ELSE d.verified END,
       phone_number      = CASE WHEN :set_phone_number THEN :phone_number ELSE d.phone_number END,
       secret_ciphertext = CASE WHEN :set_secret THEN :secret_ciphertext
                                ELSE d.secret_ciphertext END,
       secret_key_id     = CASE WHEN :set_secret THEN :secret_key_id ELSE d.secret_key_id END,
       metadata          = CASE WHEN :set_metadata THEN :metadata::jsonb
                                ELSE kitium_auth.jsonb_merge_patch(d.metadata,
                                                                   :metadata_patch::jsonb) END,
       last_used_at      = CASE WHEN :set_last_used_at THEN :last_used_at ELSE d.last_used_at END
 WHERE d.id = :id
RETURNING d.id, d.user_id, d.method, d.name, d.verified, d.phone_number, d.secret_ciphertext,
          d.secret_key_id, d.last_used_at, d.throttle_failures, d.throttled_until, d.metadata,
          d.created_at, d.updated_at;

-- name: delete_two_factor_device(id)!
-- Delete a device; its pending challenges go with it (ON DELETE CASCADE).
DELETE FROM kitium_auth.twofa_devices WHERE id = :id;

-- name: record_totp_step(id, step)$
-- TOTP replay guard: accept a time step only when it is newer than the last accepted one and
-- record it with the use time; an accepted step is a right code, so it also resets the
-- device's throttle. Returns true for the accepted step, no row otherwise (an older or
-- replayed step, or no such device). Row lock waiters re-check the guard against the winner's
-- step, so of concurrent calls with one step exactly one is accepted.
UPDATE kitium_auth.twofa_devices
   SET last_totp_step = :step, last_used_at = statement_timestamp(), throttle_failures = 0,
       throttled_until = NULL
 WHERE id = :id AND (last_totp_step IS NULL OR last_totp_step < :step)
RETURNING true;

-- name: create_backup_codes(user_id, ids, code_hashes)
-- Replace a user's backup codes (ids and code_hashes are parallel arrays) through
-- replace_backup_codes, which serialises concurrent replacements on the user row.
SELECT id, user_id, code_hash, used_at, created_at
  FROM kitium_auth.replace_backup_codes(:user_id, :ids::uuid[], :code_hashes::text[])
 ORDER BY id;

-- name: get_backup_codes(user_id)
-- Every backup code of one user, used ones included, in creation order (served by the unique
-- index twofa_backup_codes__code_hash_key on its leading column).
SELECT id, user_id, code_hash, used_at, created_at
  FROM kitium_auth.twofa_backup_codes
 WHERE user_id = :user_id
 ORDER BY created_at, id;

-- name: mark_backup_code_used(id, consumer)$
-- Consume one backup code by id. Wins only for an unused code, or for the call (consumer) that
-- already consumed it, so a retried call still wins; row lock waiters re-check the guard
-- against the winner's row and lose. Returns the id for the winner, no row otherwise.
UPDATE kitium_auth.twofa_backup_codes
   SET used_at = coalesce(used_at, statement_timestamp()), consumed_by = :consumer
 WHERE id = :id AND (used_at IS NULL OR consumed_by = :consumer)
RETURNING id;

-- name: consume_backup_code(user_id, code_hash, consumer)^
-- Find and consume a user's backup code by digest in one guarded update (served by the unique
-- index twofa_backup_codes__code_hash_key). Same guard as mark_backup_code_used; no row when
-- the user has no unused code with this digest.
UPDATE kitium_auth.twofa_backup_codes
   SET used_at = coalesce(used_at, statement_timestamp()), consumed_by = :consumer
 WHERE user_id = :user_id AND code_hash = :code_hash
   AND (used_at IS NULL OR consumed_by = :consumer)
RETURNING id, user_id, code_hash, used_at, created_at;

-- name: create_two_factor_session(id, user_id, session_id, device_id, method, code_hash, max_attempts, expires_at)^
-- Insert a challenge for one of the user's own unexpired sessions (no row when the session is not
-- theirs, has expired or does not exist); a retry with the same id returns the row the first
-- attempt wrote.
WITH inserted AS (
  INSERT INTO kitium_auth.twofa_sessions
    (id, user_id, session_id, device_id, method, code_hash, max_attempts, expires_at)
  SELECT :id, :user_id, :session_id, :device_id, :method, :code_hash, :max_attempts, :expires_at
   WHERE EXISTS (SELECT 1 FROM kitium_auth.sessions
                  WHERE sessions.id = :session_id AND sessions.user_id = :user_id
                    AND sessions.expires_at > statement_timestamp())
  ON CONFLICT (id) DO NOTHING
  RETURNING id, user_id, session_id, device_id, method, code_hash, attempt_count, max_attempts,
            expires_at, completed_at, created_at
)
SELECT id, user_id, session_id, device_id, method, code_hash, attempt_count, max_attempts,
       expires_at, completed_at, created_at
  FROM inserted
UNION ALL
SELECT id, user_id, session_id, device_id, method, code_hash, attempt_count, max_attempts,
       expires_at, completed_at, created_at
  FROM kitium_auth.twofa_sessions
 WHERE id = :id
 LIMIT 1;

-- name: get_two_factor_session(id)^
-- Fetch one challenge by id.
SELECT id, user_id, session_id, device_id, method, code_hash, attempt_count, max_attempts,
       expires_at, completed_at, created_at
  FROM kitium_auth.twofa_sessions
 WHERE id = :id;

-- name: complete_two_factor_session(id, consumer)$
-- Complete a challenge once. Wins only for an uncompleted, unexpired challenge whose login
-- session is still live, or for the call (consumer) that already completed it, so a retried call
-- still wins; row lock waiters re-check the guard against the winner's row and lose. Returns the
-- id for the winner, no row otherwise (completed, expired, session ended or no such challenge).
-- The challenge's expiry and its login session are checked once the challenge is locked, by
-- twofa_challenge_live (migration 0040), whose query takes its own snapshot and reads the clock:
-- checked in the statement's snapshot and at its start, a session ended (migration 0036) or a
-- challenge or session expired while the call waited for the challenge still counted (found in
-- review). The consumer's own retry wins without them: its first attempt checked them. Whose
-- completion it is, is read from the row as locked (c.consumed_by): the UPDATE's own scan reads
-- the statement's snapshot, so a retry that waited for its own first attempt saw no consumer
-- there and lost (found in review).
WITH challenge AS (
  SELECT c.id, c.consumed_by
    FROM kitium_auth.twofa_sessions AS c
   WHERE c.id = :id
     AND (c.completed_at IS NULL OR c.consumed_by = :consumer)
     FOR NO KEY UPDATE
)
UPDATE kitium_auth.twofa_sessions AS t
   SET completed_at = coalesce(t.completed_at, clock_timestamp()), consumed_by = :consumer
  FROM challenge AS c
 WHERE t.id = c.id
   AND (c.consumed_by = :consumer OR kitium_auth.twofa_challenge_live(c.id))
RETURNING t.id;

-- name: verify_two_factor_session(id, code_hash)^
-- Count one attempt on an open code challenge and complete it when the digest matches, in one
-- call that also throttles the challenge's device: a mismatch bumps it, a match resets it. An
-- attempt past the limit or while the device is throttled is never compared.
-- Returns (verified, attempt_count, max_attempts, throttled, throttled_until): a counted
-- attempt with the device's new throttled_until (NULL after a match); or, while the device is
-- throttled, a row with throttled true and the challenge's count unchanged. No row when the
-- limit is reached, or the challenge is completed, expired, missing, has no stored code or its
-- login session has ended (checked once the challenge is locked: migration 0036). The function
-- (migration 0018) locks the device first, then the challenge (lock order above), each in a
-- statement of its own, and writes them in further statements that read both as locked: a lock
-- waiter sees what the winner left, so a throttle set meanwhile refuses it, concurrent attempts
-- never pass the limit, one match wins and every mismatch bumps.
SELECT verified, attempt_count, max_attempts, throttled, throttled_until
  FROM kitium_auth.verify_two_factor_session(:id, :code_hash);

-- name: count_two_factor_attempt(id, backup_code)^
-- Count one attempt on an open challenge whose answer the application checks itself (a TOTP
-- code; a backup code when backup_code, or on a challenge with method 'backup_code'), before it
-- is checked. A code attempt is refused while the challenge's device is throttled, and one that
-- is let through is charged to the device as a wrong code (the throttle formula above) in this
-- same call: a right code then clears it (record_totp_step). Charged before the check, so
-- concurrent guesses on any of the device's challenges are compared one per throttle window:
-- each later one waits for the device's lock and finds the throttle set. A backup-code attempt
-- is counted whatever the throttle and charges nothing (backup codes are not the device's).
-- Returns (verified false, attempt_count, max_attempts, throttled, throttled_until): the new
-- count and, for a code attempt, the throttle its charge set (NULL for a backup-code attempt);
-- or, while the device is throttled, a row with throttled true, the count unchanged and the
-- device's throttled_until. No row when the limit is reached, or the challenge is completed,
-- expired, missing or its login session has ended (checked once the challenge is locked:
-- migration 0036). The function (migration 0018) locks the device, then the challenge (lock
-- order above), each in a statement of its own, then writes them: a lock waiter reads both as
-- the winner left them, so concurrent calls never pass the limit.
SELECT verified, attempt_count, max_attempts, throttled, throttled_until
  FROM kitium_auth.count_two_factor_attempt(:id, :backup_code);

-- name: delete_two_factor_session(id)!
-- Delete one challenge, completed, expired or not.
DELETE FROM kitium_auth.twofa_sessions WHERE id = :id;

-- name: delete_expired_two_factor_sessions(after, after_id, batch_size)^
-- Delete at most batch_size expired challenges, earliest expiry first
-- (twofa_sessions_expires_at_id_idx, migration 0043) from the key (after, after_id) on,
-- completed or not, and return how many it deleted, how many it locked and the key it reached;
-- rows another transaction has
-- locked (another cleaner, a verification under way) are skipped and left for the next run. A
-- challenge that has not expired stays, completed or not (a retried complete_two_factor_session
-- must still find the row it completed). Built as delete_expired_sessions, whose comment says
-- why (each batch's scan starts where the last one stopped; batch by physical address; a row
-- updated after the statement began is locked, not deleted, and the caller goes on).
WITH batch AS (
  SELECT ctid, expires_at, id
    FROM kitium_auth.twofa_sessions
   WHERE expires_at <= statement_timestamp()
     AND (expires_at, id) >= (coalesce(CAST(:after AS timestamp) AT TIME ZONE 'UTC', '-infinity'),
                              coalesce(CAST(:after_id AS uuid),
                                       '00000000-0000-0000-0000-000000000000'))
   ORDER BY expires_at, id
   LIMIT :batch_size
     FOR UPDATE SKIP LOCKED
), deleted AS (
  DELETE FROM kitium_auth.twofa_sessions
   WHERE ctid = ANY (ARRAY(SELECT ctid FROM batch))
  RETURNING 1
), reached AS (
  SELECT expires_at, id FROM batch ORDER BY expires_at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM batch) AS locked,
       (SELECT (expires_at AT TIME ZONE 'UTC')::text FROM reached) AS last,
       (SELECT id FROM reached) AS last_id;

-- Per-device throttling of second-factor guesses.
--
-- Each 2FA challenge has its own attempt budget (max_attempts), but nothing limited guesses
-- across challenges: someone holding the password could open challenge after challenge against
-- the same TOTP or SMS device until a 6-digit code fell. A device now backs off exponentially,
-- as django-otp's ThrottlingMixin does: after n consecutive wrong codes it refuses any check
-- for 2^(n-1) seconds (at most 15 minutes), and a right code resets it.
-- verify_two_factor_session judges and updates the throttle in the call that counts the
-- attempt, and count_two_factor_attempt (increment_two_factor_attempts) judges it in its own;
-- for codes the application checks, count_two_factor_attempt charges the device before the
-- check (as for a wrong code) and record_totp_step clears the charge for a right one. Both are
-- functions created here (below: why not single statements).
--
-- throttle_failures counts the consecutive wrong codes; throttled_until is when the device
-- accepts a code again (NULL: never throttled, or reset by a right code).
--
-- Both columns are instant on PostgreSQL 11 and later: a nullable column without a default,
-- and a NOT NULL column whose default is a constant (kept in the catalog for existing rows), are
-- added to the catalog only, with no table rewrite or scan. Existing devices start unthrottled.
-- Locks: ACCESS EXCLUSIVE on twofa_devices for that moment (lock_timeout bounds the wait);
-- CREATE FUNCTION only writes the catalog.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.twofa_devices
  ADD COLUMN throttle_failures integer NOT NULL DEFAULT 0,
  ADD COLUMN throttled_until timestamptz;

-- The attempt-counting statements of queries/twofa.sql. Each locks the challenge's device in
-- a statement of its own, then the challenge, and writes them in further statements: each
-- statement of a VOLATILE function takes a fresh snapshot, which sees the rows as locked (the
-- lock is already the transaction's, so the writes never wait). Locking the device and then
-- updating it within one statement made that update follow the row's update chain from the
-- statement's snapshot and wait on a tuple lock, which deadlocked against concurrent foreign
-- key checks (create_two_factor_session takes KEY SHARE on the device). Both return no row when
-- no attempt can be made; otherwise one row (verified, attempt_count, max_attempts, throttled,
-- throttled_until), as queries/twofa.sql describes. The throttle formula: a failure sets
-- throttled_until to statement_timestamp() plus 2 ^ least(failures before it, 10) seconds, at
-- most 15 minutes, never earlier than the one already set; the failure count saturates.

-- Count one attempt on an open challenge whose answer the application checks (p_backup_code:
-- a backup code). A code attempt is refused while the device is throttled, and one let through
-- is charged to the device as a wrong code; a backup-code attempt (p_backup_code, or a
-- challenge with method 'backup_code') is counted whatever the throttle and charges nothing.
CREATE FUNCTION kitium_auth.count_two_factor_attempt(p_id uuid, p_backup_code boolean)
RETURNS TABLE (
  verified boolean, attempt_count integer, max_attempts integer, throttled boolean,
  throttled_until timestamptz
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_device uuid;
  v_until timestamptz;
  v_count integer;
  v_max integer;
  v_code boolean;
BEGIN
  SELECT s.device_id INTO v_device FROM kitium_auth.twofa_sessions AS s WHERE s.id = p_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- The device first (lock order: queries/twofa.sql), its throttle as of now.
  SELECT d.throttled_until INTO v_until
    FROM kitium_auth.twofa_devices AS d
   WHERE d.id = v_device
     FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- Then the challenge, if it is open.
  SELECT s.attempt_count, s.max_attempts, s.method <> 'backup_code' AND NOT p_backup_code
    INTO v_count, v_max, v_code
    FROM kitium_auth.twofa_sessions AS s
   WHERE s.id = p_id
     AND s.device_id = v_device
     AND s.attempt_count < s.max_attempts
     AND s.completed_at IS NULL
     AND s.expires_at > statement_timestamp()
     AND EXISTS (SELECT 1 FROM kitium_auth.sessions
                  WHERE sessions.id = s.session_id
                    AND sessions.user_id = s.user_id
                    AND sessions.expires_at > statement_timestamp())
     FOR NO KEY UPDATE OF s;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_code AND v_until > statement_timestamp() THEN
    -- Refused while throttled: nothing counted.
    RETURN QUERY SELECT false, v_count, v_max, true, v_until;
    RETURN;
  END IF;
  UPDATE kitium_auth.twofa_sessions AS s
     SET attempt_count = s.attempt_count + 1
   WHERE s.id = p_id
  RETURNING s.attempt_count INTO v_count;
  IF v_code THEN
    -- A code let through is charged to its device now, as a wrong one.
    UPDATE kitium_auth.twofa_devices AS d
       SET throttle_failures = least(d.throttle_failures, 2147483646) + 1,
           throttled_until = greatest(
             d.throttled_until,
             statement_timestamp()
             + least(interval '1 second' * 2 ^ least(d.throttle_failures, 10),
                     interval '15 minutes'))
     WHERE d.id = v_device
    RETURNING d.throttled_until INTO v_until;
  ELSE
    v_until := NULL;
  END IF;
  RETURN QUERY SELECT false, v_count, v_max, false, v_until;
END;
$$;

-- Count one attempt on an open code challenge (one with a code_hash) and complete it when
-- p_code_hash matches; a mismatch bumps the device's throttle, a match resets it (unless there
-- is nothing to reset). While the device is throttled the attempt is refused, never compared.
CREATE FUNCTION kitium_auth.verify_two_factor_session(p_id uuid, p_code_hash text)
RETURNS TABLE (
  verified boolean, attempt_count integer, max_attempts integer, throttled boolean,
  throttled_until timestamptz
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_device uuid;
  v_until timestamptz;
  v_count integer;
  v_max integer;
  v_verified boolean;
BEGIN
  SELECT s.device_id INTO v_device FROM kitium_auth.twofa_sessions AS s WHERE s.id = p_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- The device first (lock order: queries/twofa.sql), its throttle as of now.
  SELECT d.throttled_until INTO v_until
    FROM kitium_auth.twofa_devices AS d
   WHERE d.id = v_device
     FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- Then the challenge, if it is open.
  SELECT s.attempt_count, s.max_attempts INTO v_count, v_max
    FROM kitium_auth.twofa_sessions AS s
   WHERE s.id = p_id
     AND s.device_id = v_device
     AND s.code_hash IS NOT NULL
     AND s.attempt_count < s.max_attempts
     AND s.completed_at IS NULL
     AND s.expires_at > statement_timestamp()
     AND EXISTS (SELECT 1 FROM kitium_auth.sessions
                  WHERE sessions.id = s.session_id
                    AND sessions.user_id = s.user_id
                    AND sessions.expires_at > statement_timestamp())
     FOR NO KEY UPDATE OF s;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_until > statement_timestamp() THEN
    -- Refused while throttled: not compared, nothing counted.
    RETURN QUERY SELECT false, v_count, v_max, true, v_until;
    RETURN;
  END IF;
  UPDATE kitium_auth.twofa_sessions AS s
     SET attempt_count = s.attempt_count + 1,
         completed_at = CASE WHEN s.code_hash = p_code_hash THEN statement_timestamp() END
   WHERE s.id = p_id
  RETURNING s.completed_at IS NOT NULL, s.attempt_count INTO v_verified, v_count;
  IF v_verified THEN
    -- A match resets the device, unless there is nothing to reset.
    UPDATE kitium_auth.twofa_devices AS d
       SET throttle_failures = 0, throttled_until = NULL
     WHERE d.id = v_device
       AND NOT (d.throttle_failures = 0 AND d.throttled_until IS NULL);
    v_until := NULL;
  ELSE
    UPDATE kitium_auth.twofa_devices AS d
       SET throttle_failures = least(d.throttle_failures, 2147483646) + 1,
           throttled_until = greatest(
             d.throttled_until,
             statement_timestamp()
             + least(interval '1 second' * 2 ^ least(d.throttle_failures, 10),
                     interval '15 minutes'))
     WHERE d.id = v_device
    RETURNING d.throttled_until INTO v_until;
  END IF;
  RETURN QUERY SELECT v_verified, v_count, v_max, false, v_until;
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.verify_two_factor_session(uuid, text);
DROP FUNCTION kitium_auth.count_two_factor_attempt(uuid, boolean);

-- An instant too (the columns are only marked dropped), under the same lock.
ALTER TABLE kitium_auth.twofa_devices
  DROP COLUMN throttled_until,
  DROP COLUMN throttle_failures;

-- A 2FA challenge's login session checked once the challenge is locked.
--
-- count_two_factor_attempt and verify_two_factor_session (migration 0018) and
-- complete_two_factor_session refuse a challenge whose login session has ended. They checked
-- the session in the statement that locks the challenge, so when that statement waited for
-- the challenge's lock, the session was read as of the statement's start: a session ended by
-- the very transaction the call waited for (or by any other, meanwhile) still counted, and the
-- attempt was counted and charged, the code verified and the challenge completed (found in
-- review). docs/security.md promises that once the session is deleted the challenge can no
-- longer be counted, verified or completed. The check is now a statement of its own, after the
-- lock (these VOLATILE functions take a new snapshot per statement, under READ COMMITTED):
-- the two functions are replaced, and complete_two_factor_session calls the new
-- twofa_login_session_live once its CTE holds the challenge. The session is read, not locked:
-- a lock on it, taken while holding the device and the challenge, would add a lock order that
-- every writer of sessions would have to keep.
--
-- Creating or replacing a function locks no table. This version's complete_two_factor_session
-- calls twofa_login_session_live, and fails until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Whether login session p_session_id of user p_user_id exists and has not expired, read with a
-- snapshot of its own (VOLATILE plpgsql: not inlined into the calling statement's snapshot).
CREATE FUNCTION kitium_auth.twofa_login_session_live(p_session_id uuid, p_user_id uuid)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM kitium_auth.sessions
                  WHERE sessions.id = p_session_id
                    AND sessions.user_id = p_user_id
                    AND sessions.expires_at > statement_timestamp());
END;
$$;

CREATE OR REPLACE FUNCTION kitium_auth.count_two_factor_attempt(p_id uuid, p_backup_code boolean)
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
     FOR NO KEY UPDATE OF s;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- Then its login session, live as of now: a statement of its own, whose snapshot is taken
  -- once the challenge is locked.
  PERFORM 1
     FROM kitium_auth.twofa_sessions AS s
     JOIN kitium_auth.sessions ON sessions.id = s.session_id AND sessions.user_id = s.user_id
    WHERE s.id = p_id
      AND sessions.expires_at > statement_timestamp();
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

CREATE OR REPLACE FUNCTION kitium_auth.verify_two_factor_session(p_id uuid, p_code_hash text)
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
     FOR NO KEY UPDATE OF s;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- Then its login session, live as of now: a statement of its own, whose snapshot is taken
  -- once the challenge is locked.
  PERFORM 1
     FROM kitium_auth.twofa_sessions AS s
     JOIN kitium_auth.sessions ON sessions.id = s.session_id AND sessions.user_id = s.user_id
    WHERE s.id = p_id
      AND sessions.expires_at > statement_timestamp();
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

-- The versions of migration 0018.
CREATE OR REPLACE FUNCTION kitium_auth.count_two_factor_attempt(p_id uuid, p_backup_code boolean)
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

CREATE OR REPLACE FUNCTION kitium_auth.verify_two_factor_session(p_id uuid, p_code_hash text)
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

DROP FUNCTION kitium_auth.twofa_login_session_live(uuid, uuid);

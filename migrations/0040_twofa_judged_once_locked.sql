-- 2FA calls judge expiry and throttles once they hold their rows, not when their statement began.
--
-- verify_two_factor_session and count_two_factor_attempt (migrations 0018, 0036) lock the
-- challenge's device, then the challenge, then read its login session; complete_two_factor_session
-- locks the challenge. They judged the challenge's and the session's expiry, and the device's
-- throttle, at statement_timestamp(), which inside these functions is the time the caller's
-- statement began: before any wait for those locks (up to the statement timeout, 5 s by
-- default; without limit on a pool the application configures). Found in review, each played
-- with another transaction holding the row:
-- * a wrong code charged after a 1.5 s wait set a 1 s throttle counted from the statement's
--   start, already over when the call returned: the next guess was compared at once, and two
--   guesses queued behind the holder were both let through (docs/security.md: a guess made
--   while another is being counted is never compared);
-- * a right code was accepted on a challenge, or for a login session, that had expired during
--   the wait, and complete_two_factor_session completed an expired challenge.
-- Now each reads the clock once it holds its rows (clock_timestamp()) and judges expiry,
-- throttling and the login session at that time, and stamps completed_at and the new throttle
-- from it. complete_two_factor_session (queries/twofa.sql) checks the challenge and its login
-- session after its lock through the new twofa_challenge_live; twofa_login_session_live (0036)
-- now reads the clock too. A retry of a completion that already won (its consumer) still wins,
-- now also when the login session ended between the two attempts.
--
-- Creating or replacing a function locks no table. This version's complete_two_factor_session
-- calls twofa_challenge_live, and fails until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Whether login session p_session_id of user p_user_id exists and has not expired, read with a
-- snapshot of its own and judged at the time it runs (clock_timestamp()).
CREATE OR REPLACE FUNCTION kitium_auth.twofa_login_session_live(p_session_id uuid, p_user_id uuid)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM kitium_auth.sessions
                  WHERE sessions.id = p_session_id
                    AND sessions.user_id = p_user_id
                    AND sessions.expires_at > clock_timestamp());
END;
$$;

-- Whether challenge p_id is uncompleted, unexpired and its login session live, read with a
-- snapshot of its own and judged at the time it runs: complete_two_factor_session calls it once
-- it holds the challenge's lock.
CREATE FUNCTION kitium_auth.twofa_challenge_live(p_id uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN EXISTS (SELECT 1
                   FROM kitium_auth.twofa_sessions AS c
                  WHERE c.id = p_id
                    AND c.completed_at IS NULL
                    AND c.expires_at > clock_timestamp()
                    AND kitium_auth.twofa_login_session_live(c.session_id, c.user_id));
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
  v_expires timestamptz;
  v_now timestamptz;
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
  SELECT s.attempt_count, s.max_attempts, s.method <> 'backup_code' AND NOT p_backup_code,
         s.expires_at
    INTO v_count, v_max, v_code, v_expires
    FROM kitium_auth.twofa_sessions AS s
   WHERE s.id = p_id
     AND s.device_id = v_device
     AND s.attempt_count < s.max_attempts
     AND s.completed_at IS NULL
     FOR NO KEY UPDATE OF s;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- Both rows held: the time everything below is judged and stamped at.
  v_now := clock_timestamp();
  IF v_expires <= v_now THEN
    RETURN;
  END IF;
  -- Then its login session, live at v_now: a statement of its own, whose snapshot is taken
  -- once the challenge is locked.
  PERFORM 1
     FROM kitium_auth.twofa_sessions AS s
     JOIN kitium_auth.sessions ON sessions.id = s.session_id AND sessions.user_id = s.user_id
    WHERE s.id = p_id
      AND sessions.expires_at > v_now;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_code AND v_until > v_now THEN
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
             v_now
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
  v_expires timestamptz;
  v_now timestamptz;
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
  SELECT s.attempt_count, s.max_attempts, s.expires_at INTO v_count, v_max, v_expires
    FROM kitium_auth.twofa_sessions AS s
   WHERE s.id = p_id
     AND s.device_id = v_device
     AND s.code_hash IS NOT NULL
     AND s.attempt_count < s.max_attempts
     AND s.completed_at IS NULL
     FOR NO KEY UPDATE OF s;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- Both rows held: the time everything below is judged and stamped at.
  v_now := clock_timestamp();
  IF v_expires <= v_now THEN
    RETURN;
  END IF;
  -- Then its login session, live at v_now: a statement of its own, whose snapshot is taken
  -- once the challenge is locked.
  PERFORM 1
     FROM kitium_auth.twofa_sessions AS s
     JOIN kitium_auth.sessions ON sessions.id = s.session_id AND sessions.user_id = s.user_id
    WHERE s.id = p_id
      AND sessions.expires_at > v_now;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_until > v_now THEN
    -- Refused while throttled: not compared, nothing counted.
    RETURN QUERY SELECT false, v_count, v_max, true, v_until;
    RETURN;
  END IF;
  UPDATE kitium_auth.twofa_sessions AS s
     SET attempt_count = s.attempt_count + 1,
         completed_at = CASE WHEN s.code_hash = p_code_hash THEN v_now END
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
             v_now
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

DROP FUNCTION kitium_auth.twofa_challenge_live(uuid);

-- The versions of migration 0036.
CREATE OR REPLACE FUNCTION kitium_auth.twofa_login_session_live(p_session_id uuid, p_user_id uuid)
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

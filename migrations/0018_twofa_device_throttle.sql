-- Per-device throttling of second-factor guesses.
--
-- Each 2FA challenge has its own attempt budget (max_attempts), but nothing limited guesses
-- across challenges: someone holding the password could open challenge after challenge against
-- the same TOTP or SMS device until a 6-digit code fell. A device now backs off exponentially,
-- as django-otp's ThrottlingMixin does: after n consecutive wrong codes it refuses any check
-- for 2^(n-1) seconds (at most 15 minutes), and a right code resets it.
-- verify_two_factor_session judges and updates the throttle in the statement that counts the
-- attempt, and count_two_factor_attempt (increment_two_factor_attempts) judges it in its own;
-- for codes the application checks, count_two_factor_attempt charges the device before the
-- check (as for a wrong code) and record_totp_step clears the charge for a right one.
--
-- throttle_failures counts the consecutive wrong codes; throttled_until is when the device
-- accepts a code again (NULL: never throttled, or reset by a right code).
--
-- Both columns are instant on PostgreSQL 11 and later: a nullable column without a default,
-- and a NOT NULL column whose default is a constant (kept in the catalog for existing rows), are
-- added to the catalog only, with no table rewrite or scan. Existing devices start unthrottled.
-- Locks: ACCESS EXCLUSIVE on twofa_devices for that moment (lock_timeout bounds the wait).

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.twofa_devices
  ADD COLUMN throttle_failures integer NOT NULL DEFAULT 0,
  ADD COLUMN throttled_until timestamptz;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- An instant too (the columns are only marked dropped), under the same lock.
ALTER TABLE kitium_auth.twofa_devices
  DROP COLUMN throttled_until,
  DROP COLUMN throttle_failures;

-- When a user's email address was verified.
--
-- Every auth system needs to know whether the address on an account is proven (Supabase's
-- email_confirmed_at, Auth.js's emailVerified, better-auth's emailVerified); without a column an
-- application kept it in metadata, where marking it after consuming a verification token raced
-- an email change: the new, unproven address could be marked verified. The adapter now sets it
-- with one guarded statement (mark_user_email_verified: only while the address is still the
-- user's).
--
-- A verification belongs to the address: users_email_verified_at_follows_email clears it when
-- an UPDATE changes the address (not merely its letter case) without setting a new time. A
-- trigger rather than the adapter's update_user alone, because other writers change emails
-- too: an instance of the previous version still serving during a rolling deploy (it knows
-- nothing of the column), an admin's SQL, another tool. "Letter case" is ASCII case only
-- (lower() under the "C" collation): under a linguistic locale lower() makes İ (U+0130) an i
-- and the Kelvin sign a k, so bob@gİthub.com -> bob@github.com, another domain, would have kept
-- the proof; a change of a non-ASCII letter's case clears it, the safe side. An UPDATE that sets
-- a new address and
-- the very same time again cannot be told apart from one that leaves the time alone: the time
-- is cleared then too.
--
-- A nullable column without a default: PostgreSQL adds it to the catalog only, no table
-- rewrite. Only an address can be verified: users__email_verified_at_check refuses a time on a
-- user without an email, added NOT VALID (checking the existing rows, all NULL in the new
-- column, would scan users under this migration's lock); 0016 validates it.
-- Locks: ACCESS EXCLUSIVE on users for that moment (lock_timeout bounds the wait).
-- Existing users start unverified (NULL): an application that tracked verification elsewhere
-- can copy it over once, e.g. UPDATE ... SET email_verified_at = ... FROM its own table.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.users ADD COLUMN email_verified_at timestamptz;
ALTER TABLE kitium_auth.users
  ADD CONSTRAINT users__email_verified_at_check
    CHECK (email_verified_at IS NULL OR email IS NOT NULL) NOT VALID;

CREATE FUNCTION kitium_auth.users_email_verified_at_follows_email() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF lower(NEW.email COLLATE "C") IS DISTINCT FROM lower(OLD.email COLLATE "C")
     AND NEW.email_verified_at IS NOT DISTINCT FROM OLD.email_verified_at THEN
    NEW.email_verified_at := NULL;
  END IF;
  RETURN NEW;
END;
$$;

CREATE TRIGGER users_email_verified_at_follows_email
  BEFORE UPDATE OF email ON kitium_auth.users
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.users_email_verified_at_follows_email();

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP TRIGGER users_email_verified_at_follows_email ON kitium_auth.users;
DROP FUNCTION kitium_auth.users_email_verified_at_follows_email();
-- Drops users__email_verified_at_check with it.
ALTER TABLE kitium_auth.users DROP COLUMN email_verified_at;

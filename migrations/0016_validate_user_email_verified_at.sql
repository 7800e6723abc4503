-- Validates users__email_verified_at_check, which 0015 added NOT VALID (only an address can be
-- verified). In a transaction of its own, VALIDATE CONSTRAINT takes only SHARE UPDATE EXCLUSIVE
-- on users: reads and writes go on while the existing rows are checked.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.users VALIDATE CONSTRAINT users__email_verified_at_check;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Back to the state 0015 left: the check NOT VALID (a validated constraint cannot be marked
-- unvalidated, so it is dropped and added again; no row is checked).
ALTER TABLE kitium_auth.users DROP CONSTRAINT users__email_verified_at_check;
ALTER TABLE kitium_auth.users
  ADD CONSTRAINT users__email_verified_at_check
    CHECK (email_verified_at IS NULL OR email IS NOT NULL) NOT VALID;

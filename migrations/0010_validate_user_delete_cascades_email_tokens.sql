-- Validates the reference 0009 added NOT VALID (a user's email verification tokens go with the
-- user). In a transaction of its own, VALIDATE CONSTRAINT takes only SHARE UPDATE EXCLUSIVE on
-- email_verification_tokens and ROW SHARE on users: reads and writes go on while the existing
-- rows are checked.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.email_verification_tokens
  VALIDATE CONSTRAINT email_verification_tokens__user_id_fkey;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Back to the state 0009 left: the reference NOT VALID (a validated constraint cannot be marked
-- unvalidated, so it is dropped and added again). Locks as in 0009, in its order.
LOCK TABLE kitium_auth.users, kitium_auth.email_verification_tokens IN ACCESS EXCLUSIVE MODE;

ALTER TABLE kitium_auth.email_verification_tokens
  DROP CONSTRAINT email_verification_tokens__user_id_fkey;
ALTER TABLE kitium_auth.email_verification_tokens
  ADD CONSTRAINT email_verification_tokens__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE NOT VALID;

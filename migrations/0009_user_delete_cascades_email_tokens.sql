-- A user's email verification tokens go with the user.
--
-- email_verification_tokens__user_id_fkey was ON DELETE SET NULL: delete_user left the user's
-- tokens (password resets, email changes) alive, with no user, consumable until they expired.
-- Once the address was free and registered again, an application that resolves such a token by
-- its email (all it could do once user_id was NULL) acted on the new account with the old
-- account's reset link. The reference is now ON DELETE CASCADE, as every other reference to
-- users is. Tokens already left without a user by earlier deletes cannot be told apart from
-- tokens issued before any user existed (sign-up verification): they stay, and expire.
--
-- PostgreSQL cannot change a reference's ON DELETE action in place, so it is dropped and added
-- again under the same name, NOT VALID (no row can break it in between: the reference dropped
-- was valid, with the same columns and target, and this transaction holds the locks below);
-- 0010 validates it in a transaction of its own.
--
-- Locks, held until this transaction commits, which is soon (nothing is scanned): ACCESS
-- EXCLUSIVE on users and email_verification_tokens (dropping a reference takes it on both of
-- its tables), taken up front, the referenced table first, as a user's delete takes them.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

LOCK TABLE kitium_auth.users, kitium_auth.email_verification_tokens IN ACCESS EXCLUSIVE MODE;

-- Served on the referencing side by email_verification_tokens_user_id_idx.
-- squawk-ignore ban-drop-constraint
ALTER TABLE kitium_auth.email_verification_tokens DROP CONSTRAINT email_verification_tokens__user_id_fkey;
ALTER TABLE kitium_auth.email_verification_tokens
  ADD CONSTRAINT email_verification_tokens__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE NOT VALID;

-- migrate:down

SET LOCAL lock_timeout = '5s';

LOCK TABLE kitium_auth.users, kitium_auth.email_verification_tokens IN ACCESS EXCLUSIVE MODE;

-- Restores the reference 0001 created (ON DELETE SET NULL), validated as it was: the check
-- scans the tokens while the locks above are held. A rollback is rare, and every row passes
-- (the reference being replaced had the same columns and the same target).
ALTER TABLE kitium_auth.email_verification_tokens
  DROP CONSTRAINT email_verification_tokens__user_id_fkey;
-- squawk-ignore adding-foreign-key-constraint, constraint-missing-not-valid
ALTER TABLE kitium_auth.email_verification_tokens ADD CONSTRAINT email_verification_tokens__user_id_fkey FOREIGN KEY (user_id) REFERENCES kitium_auth.users (id) ON DELETE SET NULL;

-- A user's new email address ends the tokens sent to the old one.
--
-- A password reset link or code mailed to a user's address kept working after the user moved to
-- another address (found in review). People change address because they lost the old one, or
-- because someone else has it now: whoever reads the old mailbox could still reset the password
-- with a link sent before the change. Django ties its reset tokens to the address for this
-- reason. users_email_change_revokes_tokens marks the user's unused tokens sent to any other
-- address than the new one used, as revoke_email_verification_tokens does, when an UPDATE
-- changes the address (not merely its ASCII letter case, compared as migration 0015 compares);
-- a token sent to the new address (confirming it) stays. A trigger rather than the adapter's
-- update_user alone, because other writers change emails too (0015 says which). Tokens that
-- name no user (sent to an address before any account had it) are the application's: they are
-- not linked to the account that changed.
--
-- Tokens are found by email_verification_tokens_user_id_idx. The trigger fires only when the
-- address changes, so other updates of users pay nothing.
-- Locks: SHARE ROW EXCLUSIVE on users for CREATE TRIGGER (a moment; lock_timeout bounds the
-- wait).

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

CREATE FUNCTION kitium_auth.users_email_change_revokes_tokens() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE kitium_auth.email_verification_tokens AS t
     SET used_at = statement_timestamp()
   WHERE t.user_id = NEW.id
     AND t.used_at IS NULL
     AND t.expires_at > statement_timestamp()
     AND lower(t.email COLLATE "C") IS DISTINCT FROM lower(NEW.email COLLATE "C");
  RETURN NULL;
END;
$$;

CREATE TRIGGER users_email_change_revokes_tokens
  AFTER UPDATE OF email ON kitium_auth.users
  FOR EACH ROW
  WHEN (lower(NEW.email COLLATE "C") IS DISTINCT FROM lower(OLD.email COLLATE "C"))
  EXECUTE FUNCTION kitium_auth.users_email_change_revokes_tokens();

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP TRIGGER users_email_change_revokes_tokens ON kitium_auth.users;
DROP FUNCTION kitium_auth.users_email_change_revokes_tokens();

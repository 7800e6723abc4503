-- The attempts counted against an email address, read with a snapshot of their own.
--
-- increment_email_verification_token_attempts adds one to a token's counter and returns the
-- attempts counted against its address: its own count plus the counters of the address's other
-- unexpired tokens. It locks those counters first, in token order, and summed them from the
-- rows as locked. A token created after the statement started is not among them: the
-- statement's snapshot predates it. When the statement waited for a lock (another attempt at
-- the address still ran), a resend could create a token meanwhile, and an attempt on that new
-- token could count and commit before the waiting one went on. The waiting attempt's count
-- then missed it: two attempts at the address, both told 1 (found in review). This function is
-- VOLATILE plpgsql, as auth_event_written (migration 0038): under READ COMMITTED its query takes
-- a new snapshot when it runs, which the statement's final SELECT does once it holds every
-- lock. An attempt on a token created later still has to lock the older tokens' counters this
-- statement holds, so it counts after this one.
--
-- Creating a function locks no table. This version's increment_email_verification_token_attempts
-- calls it, and fails until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- The attempts counted on the unexpired tokens (at the calling statement's start) of p_token_id's
-- email (any letter case) and type, p_token_id's own excepted, as committed when this runs
-- (email_verification_tokens_email_idx, email_verification_token_attempts_pkey).
CREATE FUNCTION kitium_auth.email_address_attempts(p_token_id uuid) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN (
    SELECT coalesce(sum(o.attempts), 0)
      FROM kitium_auth.email_verification_tokens AS d
      JOIN kitium_auth.email_verification_tokens AS s
        ON lower(s.email) = lower(d.email) AND s.type = d.type
      JOIN kitium_auth.email_verification_token_attempts AS o
        ON o.token_id = s.id
     WHERE d.id = p_token_id
       AND s.id <> p_token_id
       AND s.expires_at > statement_timestamp()
  );
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.email_address_attempts(uuid);

-- The OAuth links update_user, mark_user_email_verified and link_oauth_account return, read once
-- the statement holds the user's row lock.
--
-- Those statements read the user's links in a subquery, with the snapshot the statement took
-- when it started. When it had to wait for the user's row lock, held by another
-- link_oauth_account (which locks the user's row before it writes) or by a transaction that
-- changed the user, the record returned missed what that call had committed: of four
-- concurrent first links of four providers to one user, the last one written returned all four
-- in 11 of 100 rounds (found in review). This function is VOLATILE plpgsql, as the lists of
-- migration 0034: under READ COMMITTED (the adapter's isolation level) its query takes a new
-- snapshot when it runs, after the lock was granted. plpgsql, not LANGUAGE sql, so that no plan
-- inlines the query back into the calling statement's snapshot.
--
-- Creating a function locks no table. This version's update_user, mark_user_email_verified
-- and link_oauth_account call it, and fail until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- A user's OAuth links as the User record's oauth: {provider: {"provider", "sub", "email",
-- "name", "linked_at"}, ...}; {} for none.
CREATE FUNCTION kitium_auth.user_oauth_map(p_user_id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN (SELECT coalesce(jsonb_object_agg(o.provider, jsonb_build_object(
                   'provider', o.provider, 'sub', o.subject, 'email', o.email,
                   'name', o.name, 'linked_at', o.linked_at)), '{}'::jsonb)
            FROM kitium_auth.oauth_accounts AS o
           WHERE o.user_id = p_user_id);
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.user_oauth_map(uuid);

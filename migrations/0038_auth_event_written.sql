-- Whether an auth event was written, read with a snapshot of its own.
--
-- rotate_session_token ends a session whose rotated-out token is presented again and writes a
-- session.token_reused event (id event_id) in the same statement; a retry after a lost
-- acknowledgement finds that event and still reports the reuse. The statement looked for the
-- event with the snapshot it took when it started. When the retry started while the first
-- attempt still ran (the connection lost mid-statement, not after its commit), it waited for
-- the session's row, which the first attempt held, and read once the first attempt had
-- committed: the session was gone, and the event, committed after the retry's snapshot, was
-- not seen. The call returned None without reporting the reuse (noted in review; the session
-- was ended and the event written all the same). This function is VOLATILE plpgsql, as the
-- lists of migration 0034: under READ COMMITTED its query takes a new snapshot when it runs,
-- which rotate_session_token's final check does after its UPDATE and DELETE waited for the row.
-- plpgsql, not LANGUAGE sql, so that no plan inlines the query back into the calling
-- statement's snapshot.
--
-- Creating a function locks no table. This version's rotate_session_token calls it, and fails
-- until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Whether the auth event p_id exists (auth_events_pkey), as committed when this runs.
CREATE FUNCTION kitium_auth.auth_event_written(p_id uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN EXISTS (SELECT FROM kitium_auth.auth_events AS e WHERE e.id = p_id);
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.auth_event_written(uuid);

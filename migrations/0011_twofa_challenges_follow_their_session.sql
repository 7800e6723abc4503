-- A 2FA challenge goes with its login session.
--
-- twofa_sessions.session_id referenced nothing, so delete_session, delete_user_sessions and
-- delete_expired_sessions (and an organization's delete, through sessions__org_id_fkey) left the
-- session's challenges behind, each with the digest of the code sent by SMS or email, forever:
-- every 2FA login added a row nothing ever deleted. Such a challenge can never be counted,
-- verified or completed again (those queries require its session), so it is deleted here, then
-- session_id references sessions ON DELETE CASCADE (twofa_sessions__session_id_fkey): deleting a
-- session, by any of those calls, now deletes its challenges in the same statement. Expired
-- challenges of live sessions are deleted by delete_expired_two_factor_sessions (and
-- `kitium-pg delete-expired`), which twofa_sessions_expires_at_idx, added here, serves as
-- sessions_expires_at_idx serves delete_expired_sessions.
--
-- Cost: a delete_expired_sessions batch (and any session delete) now also deletes the batch's
-- challenges, one lookup per deleted session on twofa_sessions_session_id_idx (which already
-- exists, from 0002) and one row per challenge; the cascade waits for a challenge another
-- transaction holds locked (verify and complete lock one only while its session is unexpired,
-- in one short statement). A challenge created after its session was deleted is refused: by the
-- query's check that the session exists (NotFoundError "no session ... of user ...", as
-- before), or by the reference when the session's delete commits while the insert runs
-- (NotFoundError naming twofa_sessions__session_id_fkey).
--
-- The reference is added NOT VALID, so it holds for every write from now on; 0012 validates it
-- in a transaction of its own.
--
-- Locks, held until this transaction commits: SHARE ROW EXCLUSIVE (writers wait, readers do not)
-- on sessions and twofa_sessions, taken up front, in the order a session's delete takes them
-- (sessions, then twofa_sessions through the cascade). Writers must wait: a session deleted by
-- a transaction still open when the clean-up below runs would otherwise leave challenges the
-- clean-up does not see and the NOT VALID reference does not check, and 0012's validation would
-- then fail on every attempt. While they are held, logins (session writes) and challenge writes
-- wait for the clean-up (a scan of twofa_sessions against sessions) and the index build (a scan
-- of what is left of twofa_sessions): on a large table, run this migration at a quiet time.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

LOCK TABLE kitium_auth.sessions, kitium_auth.twofa_sessions IN SHARE ROW EXCLUSIVE MODE;

DELETE FROM kitium_auth.twofa_sessions AS t
 WHERE NOT EXISTS (SELECT 1 FROM kitium_auth.sessions AS s WHERE s.id = t.session_id);

-- Served on the referencing side, for the cascade, by twofa_sessions_session_id_idx.
ALTER TABLE kitium_auth.twofa_sessions
  ADD CONSTRAINT twofa_sessions__session_id_fkey FOREIGN KEY (session_id)
    REFERENCES kitium_auth.sessions (id) ON DELETE CASCADE NOT VALID;

-- Serves delete_expired_two_factor_sessions (earliest expiry first). Built in place rather than
-- CONCURRENTLY (which cannot run in the migration's transaction), under the locks above: the
-- clean-up just left only the challenges of existing sessions, and lock_timeout bounds the wait.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX twofa_sessions_expires_at_idx ON kitium_auth.twofa_sessions (expires_at);

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Dropping a reference (and an index) takes ACCESS EXCLUSIVE on both tables: taken up front, in
-- the up part's order.
LOCK TABLE kitium_auth.sessions, kitium_auth.twofa_sessions IN ACCESS EXCLUSIVE MODE;

-- Challenges the up part deleted are not restored: they could no longer be used. The index is
-- dropped in place (DROP INDEX CONCURRENTLY cannot run in the migration's transaction), under
-- the locks above.
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.twofa_sessions_expires_at_idx;
ALTER TABLE kitium_auth.twofa_sessions DROP CONSTRAINT twofa_sessions__session_id_fkey;

-- Validates the reference 0011 added NOT VALID (a 2FA challenge goes with its login session). In
-- a transaction of its own, VALIDATE CONSTRAINT takes only SHARE UPDATE EXCLUSIVE on
-- twofa_sessions and ROW SHARE on sessions: reads and writes go on while the existing rows are
-- checked. Every row passes: 0011 deleted the challenges without a session under its locks, and
-- since then the reference checks every write and deleting a session deletes its challenges.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.twofa_sessions VALIDATE CONSTRAINT twofa_sessions__session_id_fkey;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Back to the state 0011 left: the reference NOT VALID (a validated constraint cannot be marked
-- unvalidated, so it is dropped and added again). Dropping a reference takes ACCESS EXCLUSIVE
-- on both of its tables: taken up front, in 0011's order.
LOCK TABLE kitium_auth.sessions, kitium_auth.twofa_sessions IN ACCESS EXCLUSIVE MODE;

ALTER TABLE kitium_auth.twofa_sessions DROP CONSTRAINT twofa_sessions__session_id_fkey;
ALTER TABLE kitium_auth.twofa_sessions
  ADD CONSTRAINT twofa_sessions__session_id_fkey FOREIGN KEY (session_id)
    REFERENCES kitium_auth.sessions (id) ON DELETE CASCADE NOT VALID;

-- A session bound to an organization needs the user's membership in it.
--
-- sessions.org_id referenced the organization alone, so a session could be bound to an
-- organization its user does not belong to (create_session(org_id=...) and
-- update_session(org_id=...) took any organization), and removing a member ended their
-- organization-bound sessions only as far as remove_organization_member's own DELETE could see
-- them: a session created by a transaction that committed after that DELETE's snapshot
-- survived the removal (migration 0013 noted it). Better Auth's organization plugin refuses to
-- make an organization active for a non-member for the same reason.
--
-- sessions__member_fkey references the membership (org_id, user_id) and goes with it (ON DELETE
-- CASCADE): a session cannot be bound to an organization without a membership, whoever writes
-- it, and a removal takes the user's sessions there with it, including one whose insert holds
-- the membership (its foreign-key check locks the membership row, so the removal waits for
-- that insert to commit and its cascade then sees the session). MATCH SIMPLE, the default: a
-- session with org_id NULL is not checked. Served on the member side by
-- organization_members_pkey (org_id, user_id). On the session side the cascade deletes
-- WHERE org_id = $1 AND user_id = $2 once per deleted membership: without an index on both
-- columns its generic plan combined sessions_user_id_idx with sessions_org_id_idx, reading every
-- session of the organization each time, so deleting an organization of 20,000 members with 3
-- sessions each took 11.6 s instead of 0.06 s (measured in review). sessions_org_id_user_id_idx
-- serves it; partial (WHERE org_id IS NOT NULL), since sessions without an organization are
-- never looked up by it.
--
-- The reference is added NOT VALID: it holds for every write from now on and the existing rows
-- are left to 0021, which deletes the sessions bound to an organization their user is not a
-- member of and then validates it without blocking writes.
-- Locks: SHARE on sessions while the index is built (one read of the table: logins and other
-- session writes wait, reads go on; it is built in place because the migration runs in a
-- transaction, where CREATE INDEX CONCURRENTLY cannot), then SHARE ROW EXCLUSIVE on sessions
-- and organization_members for an instant; all until this transaction commits. lock_timeout
-- bounds the wait for them. On a very large sessions table, run it at a quiet time.

-- migrate:up

SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-creation
CREATE INDEX sessions_org_id_user_id_idx
  ON kitium_auth.sessions (org_id, user_id)
  WHERE org_id IS NOT NULL;

ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__member_fkey FOREIGN KEY (org_id, user_id)
    REFERENCES kitium_auth.organization_members (org_id, user_id) ON DELETE CASCADE NOT VALID;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.sessions DROP CONSTRAINT sessions__member_fkey;
-- Takes ACCESS EXCLUSIVE on sessions for an instant once granted (nothing is scanned).
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.sessions_org_id_user_id_idx;

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
-- organization_members_pkey (org_id, user_id), on the session side by 0020's
-- sessions_org_id_user_id_idx.
--
-- The reference is added NOT VALID: it holds for every write from now on and the existing rows
-- are left to 0022, which deletes the sessions bound to an organization their user is not a
-- member of and then validates it without blocking writes.
-- Locks: SHARE ROW EXCLUSIVE on organization_members, then on sessions (the order in which
-- removals and deletes of users and organizations take theirs, so that none waits in a cycle
-- with this migration), until this transaction commits: writes of either table wait for the
-- instant the constraint takes to add (no scan). lock_timeout bounds the wait for them.

-- migrate:up

SET LOCAL lock_timeout = '5s';

LOCK TABLE kitium_auth.organization_members, kitium_auth.sessions IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__member_fkey FOREIGN KEY (org_id, user_id)
    REFERENCES kitium_auth.organization_members (org_id, user_id) ON DELETE CASCADE NOT VALID;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.sessions DROP CONSTRAINT sessions__member_fkey;

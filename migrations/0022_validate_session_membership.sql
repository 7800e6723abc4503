-- Validates sessions__member_fkey, which 0021 added NOT VALID, after deleting the sessions that
-- break it: sessions bound to an organization their user is not a member of. Those are exactly
-- the sessions that should have ended with the membership (or never been bound): their users
-- sign in again. 0021's reference already checks every write since it committed, so no new
-- such session can appear while this runs; a removal meanwhile deletes its sessions by cascade.
--
-- Locks: the DELETE reads sessions once (an anti-join with organization_members) and locks only
-- the rows it deletes; VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE on sessions and ROW
-- SHARE on organization_members: reads and writes go on while the existing rows are checked.

-- migrate:up

SET LOCAL lock_timeout = '5s';

DELETE FROM kitium_auth.sessions AS s
 WHERE s.org_id IS NOT NULL
   AND NOT EXISTS (
     SELECT 1
       FROM kitium_auth.organization_members AS m
      WHERE m.org_id = s.org_id AND m.user_id = s.user_id
   );

ALTER TABLE kitium_auth.sessions VALIDATE CONSTRAINT sessions__member_fkey;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Back to the state 0021 left: the reference NOT VALID (a validated constraint cannot be marked
-- unvalidated, so it is dropped and added again; no row is checked). Deleted sessions stay
-- deleted.
ALTER TABLE kitium_auth.sessions DROP CONSTRAINT sessions__member_fkey;
ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__member_fkey FOREIGN KEY (org_id, user_id)
    REFERENCES kitium_auth.organization_members (org_id, user_id) ON DELETE CASCADE NOT VALID;

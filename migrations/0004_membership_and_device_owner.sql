-- Two integrity rules the schema left to callers:
--
-- 1. A role assignment needs a membership. user_roles referenced the user and the organization
--    separately, so removing a member (remove_organization_member, or update_organization
--    replacing the member set) left their roles, and with them their permissions, in place; a
--    non-member could also be given a role. Assignments now reference the membership and go
--    with it (ON DELETE CASCADE). Assignments without a membership are deleted first: they are
--    exactly the permissions that should already have been revoked.
--
-- 2. A 2FA challenge's device must be the challenged user's own. twofa_sessions referenced the
--    device alone, so a challenge for one user could name another user's device. The device
--    reference now includes the user. Challenges that name another user's device are deleted
--    first (challenges are short-lived; such a row can only be an attempt to misuse one).
--
-- The new references are added NOT VALID here, so they hold for every write from now on, and
-- validated by 0005 in a transaction of its own, which then locks neither table against reads
-- or writes while it checks the existing rows.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Writers wait (readers do not) until this transaction ends: a membership removed or a challenge
-- written by a transaction still open when the clean-up below runs would otherwise escape it,
-- the NOT VALID references would not check it, and 0005's validation would then fail on every
-- attempt. The locks are taken up front, in one order, as the statements below need them.
LOCK TABLE kitium_auth.organization_members, kitium_auth.user_roles IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE kitium_auth.twofa_devices IN ACCESS EXCLUSIVE MODE;
LOCK TABLE kitium_auth.twofa_sessions IN SHARE ROW EXCLUSIVE MODE;

DELETE FROM kitium_auth.user_roles AS ur
 WHERE NOT EXISTS (
   SELECT 1
     FROM kitium_auth.organization_members AS m
    WHERE m.org_id = ur.org_id AND m.user_id = ur.user_id
 );

-- Served on the member side by organization_members_pkey (org_id, user_id) and on the
-- assignment side by user_roles__role_key (user_id, org_id, role_id) for the cascade.
ALTER TABLE kitium_auth.user_roles
  ADD CONSTRAINT user_roles__member_fkey FOREIGN KEY (org_id, user_id)
    REFERENCES kitium_auth.organization_members (org_id, user_id) ON DELETE CASCADE NOT VALID;

DELETE FROM kitium_auth.twofa_sessions AS s
 WHERE NOT EXISTS (
   SELECT 1
     FROM kitium_auth.twofa_devices AS d
    WHERE d.id = s.device_id AND d.user_id = s.user_id
 );

-- Lets twofa_sessions check that a device belongs to the challenged user (as
-- roles__id_org_id_key does for role assignments). Built in place rather than CONCURRENTLY
-- (which cannot run in the migration's transaction): the table holds a few rows per user, and
-- lock_timeout above bounds the wait.
-- squawk-ignore disallowed-unique-constraint, constraint-missing-not-valid
ALTER TABLE kitium_auth.twofa_devices ADD CONSTRAINT twofa_devices__id_user_id_key UNIQUE (id, user_id);

ALTER TABLE kitium_auth.twofa_sessions
  ADD CONSTRAINT twofa_sessions__device_owner_fkey FOREIGN KEY (device_id, user_id)
    REFERENCES kitium_auth.twofa_devices (id, user_id) ON DELETE CASCADE NOT VALID;

-- migrate:down

SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.twofa_sessions DROP CONSTRAINT twofa_sessions__device_owner_fkey;
ALTER TABLE kitium_auth.twofa_devices DROP CONSTRAINT twofa_devices__id_user_id_key;
ALTER TABLE kitium_auth.user_roles DROP CONSTRAINT user_roles__member_fkey;

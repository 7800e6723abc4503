-- Validates the references 0004 added NOT VALID (role assignment -> membership, 2FA challenge
-- -> the challenged user's own device). In a transaction of its own, VALIDATE CONSTRAINT takes
-- only SHARE UPDATE EXCLUSIVE on the referencing table and ROW SHARE on the referenced one:
-- reads and writes go on while the existing rows are checked. Dropping the superseded reference
-- at the end takes ACCESS EXCLUSIVE on twofa_sessions and twofa_devices, for an instant (no
-- scan), after waiting at most lock_timeout for it.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.user_roles VALIDATE CONSTRAINT user_roles__member_fkey;
ALTER TABLE kitium_auth.twofa_sessions VALIDATE CONSTRAINT twofa_sessions__device_owner_fkey;

-- Now that the reference on (device_id, user_id) is validated, the one on device_id alone says
-- nothing more (same device, same cascade).
-- squawk-ignore ban-drop-constraint
ALTER TABLE kitium_auth.twofa_sessions DROP CONSTRAINT twofa_sessions__device_id_fkey;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Restores the reference 0002 created. Validated at once: a rollback is rare, the table holds
-- short-lived challenges, and every row already satisfies the stricter reference on
-- (device_id, user_id).
-- squawk-ignore adding-foreign-key-constraint, constraint-missing-not-valid
ALTER TABLE kitium_auth.twofa_sessions ADD CONSTRAINT twofa_sessions__device_id_fkey FOREIGN KEY (device_id) REFERENCES kitium_auth.twofa_devices (id) ON DELETE CASCADE;

-- Back to the state 0004 left: its two references NOT VALID (a validated constraint cannot be
-- marked unvalidated, so each is dropped and added again).
ALTER TABLE kitium_auth.user_roles DROP CONSTRAINT user_roles__member_fkey;
ALTER TABLE kitium_auth.user_roles
  ADD CONSTRAINT user_roles__member_fkey FOREIGN KEY (org_id, user_id)
    REFERENCES kitium_auth.organization_members (org_id, user_id) ON DELETE CASCADE NOT VALID;
ALTER TABLE kitium_auth.twofa_sessions DROP CONSTRAINT twofa_sessions__device_owner_fkey;
ALTER TABLE kitium_auth.twofa_sessions
  ADD CONSTRAINT twofa_sessions__device_owner_fkey FOREIGN KEY (device_id, user_id)
    REFERENCES kitium_auth.twofa_devices (id, user_id) ON DELETE CASCADE NOT VALID;

-- Drops user_roles_role_id_idx (role_id), superseded by 0025's
-- user_roles_role_id_assigned_at_user_id_idx, which it leads: every lookup by role_id is served
-- by the newer index (get_role_users, and the cascade of user_roles__role_id_fkey when a role is
-- deleted, WHERE role_id = $1 AND org_id = $2, a role's id being unique), and the older one cost
-- an entry for every role assignment written. No other query reads user_roles by role_id alone:
-- revoke_role_from_user, get_user_roles, get_user_permissions, has_permission and set_user_roles
-- go by (user_id, org_id) through user_roles__role_key, an organization's cascade through
-- user_roles_org_id_idx.
--
-- A migration of its own, so that the brief exclusive lock is the only lock it takes.
-- Locks: ACCESS EXCLUSIVE on user_roles for an instant once granted (nothing is scanned);
-- lock_timeout bounds the wait for it. Its down part builds the index again in place (SHARE on
-- user_roles while the table is read once: role assignment writes wait).

-- migrate:up

SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.user_roles_role_id_idx;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-creation
CREATE INDEX user_roles_role_id_idx ON kitium_auth.user_roles (role_id);

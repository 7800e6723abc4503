-- "Log out everywhere" locks every membership its sessions rest on, whatever the tenant.
--
-- delete_user_sessions locks the memberships the user's organization-bound sessions rest on
-- (FOR KEY SHARE, in row order) before it deletes the sessions, so that a member's removal, a
-- member-set replacement or an organization's deletion, which delete the membership and then
-- its sessions, waits for it (or it for them) before either holds a session. Under the
-- optional tenant_rls migration that lock read organization_members through row-level
-- security: a logout through one tenant's view locked only that tenant's membership, then
-- deleted the user's sessions bound to other tenants' organizations too (sessions are not
-- tenant data), and deadlocked with a removal of the user from one of those (a retryable
-- ConflictError, which docs/operations.md listed as a known limitation). The lock now goes
-- through this function, which runs as its owner (SECURITY DEFINER), whom tenant_rls's
-- owner_access policy lets see every membership. It locks and returns nothing: what a tenant
-- reads is unchanged. Its search_path is pinned, as a SECURITY DEFINER function's must be.
--
-- Creating a function locks no table. This version's delete_user_sessions calls it, and fails
-- until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Lock (FOR KEY SHARE, in row order: the order a user's deletion reaches them) the
-- memberships of user p_user_id in the organizations its sessions are bound to, every tenant's.
CREATE FUNCTION kitium_auth.lock_user_session_memberships(p_user_id uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM 1
     FROM kitium_auth.organization_members AS m
    WHERE m.user_id = p_user_id
      AND m.org_id IN (SELECT s.org_id FROM kitium_auth.sessions AS s WHERE s.user_id = p_user_id)
    ORDER BY m.ctid
      FOR KEY SHARE OF m;
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.lock_user_session_memberships(uuid);

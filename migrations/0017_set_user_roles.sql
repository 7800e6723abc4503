-- Replacing a user's roles in an organization in one call (set_user_roles), safe against a
-- second replacement at the same time.
--
-- An admin UI edits a user's roles as a set ("these boxes are ticked"). Done as one
-- assign_role_to_user or revoke_role_from_user call per changed role, a save that fails half-way
-- leaves a mix of the old and new sets, and two saves at the same time can leave the union of
-- the two. One plain DELETE-then-INSERT statement would not do either: a second statement
-- waiting for the first's row locks would run its DELETE of "every role not listed" with the
-- snapshot it took before the first committed, miss the first call's new assignments, and both
-- sets would survive, merged (see 0006 for the member and domain sets).
--
-- So set_user_roles first locks the user's membership row (organization_members (org_id,
-- user_id), the row every assignment of the user in the organization refers to through
-- user_roles__member_fkey) with SELECT ... FOR NO KEY UPDATE, then deletes the assignments not
-- listed, inserts the missing ones and reads the result, each in a statement of its own. The
-- function is VOLATILE plpgsql, and under READ COMMITTED (the adapter's isolation level) each of
-- those statements takes a new snapshot when it starts, after the lock was granted: it sees
-- everything the previous holder of the lock committed. Concurrent replacements for the same
-- user and organization run one after the other and the later one's set is what stays.
--
-- Lock order: the user's and the organization's rows (FOR KEY SHARE, the locks the insert's
-- reference checks take anyway) come before the membership row, as they do for delete_user and
-- delete_organization, which lock their row first and then delete the membership by cascade.
-- Taken in the other order (membership first, parents when the insert's checks run), the two
-- waited for each other: a deadlock that rolled back a delete_user inside a transaction.
--
-- The listed roles are locked too (FOR KEY SHARE, after the organization, as delete_role locks
-- the organization and then the role): a role already held goes through the insert's ON
-- CONFLICT with no reference check, and without the lock delete_role could delete it while the
-- function ran, so that it returned fewer roles than asked for and reported success.
--
-- The function returns the roles asked for (each is known to be the organization's: locked
-- here, and the insert's reference check passed for the new ones), not a re-read of the
-- assignments: an assign_role_to_user
-- committed between this function's DELETE and a final read would have shown up in a result
-- that matches neither order of the two calls.
--
-- FOR NO KEY UPDATE, not FOR UPDATE: the reference checks of assignments (user_roles__member_fkey)
-- take FOR KEY SHARE on the membership row, which FOR NO KEY UPDATE does not block, so
-- assign_role_to_user for the same user goes on. Removing the member (a DELETE of that row)
-- waits for the replacement, and then removes its assignments with the membership. Only the one
-- membership row is locked: changes of other members, and of the organization, go on.
--
-- A user who is not a member is raised as the reference violation an insert of an assignment
-- would raise (user_roles__member_fkey), also when the new set is empty; a role that is not a
-- role of the organization is refused by user_roles__role_id_fkey on the insert. Either way the
-- statement fails as a whole and nothing is written. The function runs with the caller's rights
-- (not SECURITY DEFINER), so under the optional tenant_rls migration another tenant's membership
-- is invisible to it (not a member) and its writes meet the same policies as the adapter's own
-- statements.
--
-- get_role_users (who holds a role) needs no index of its own: user_roles_role_id_idx
-- (user_roles (role_id), migration 0002) serves it.
--
-- Locks: none on tables; CREATE FUNCTION only writes the catalog.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Replace the roles p_user_id holds in p_org_id with p_role_ids (distinct; p_ids holds the ids
-- of the assignments to insert, one per role id, used only for roles not yet held): kept
-- assignments keep their id and assigned_at. Returns the roles asked for, in no order.
-- Planned for each call's arguments, as replace_backup_codes is (0003): user_roles grows.
CREATE FUNCTION kitium_auth.set_user_roles(
  p_user_id uuid, p_org_id uuid, p_role_ids uuid[], p_ids uuid[]
) RETURNS TABLE (
  held_id uuid, held_org_id uuid, held_name text, held_description text,
  held_is_system boolean, held_permissions jsonb, held_metadata jsonb,
  held_created_at timestamptz, held_updated_at timestamptz
)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
  PERFORM 1 FROM kitium_auth.users AS u WHERE u.id = p_user_id FOR KEY SHARE;
  PERFORM 1 FROM kitium_auth.organizations AS o WHERE o.id = p_org_id FOR KEY SHARE;
  PERFORM 1
    FROM kitium_auth.roles AS r
   WHERE r.org_id = p_org_id AND r.id = ANY (p_role_ids)
   ORDER BY r.id
     FOR KEY SHARE;
  PERFORM 1
    FROM kitium_auth.organization_members AS m
   WHERE m.org_id = p_org_id AND m.user_id = p_user_id
     FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE foreign_key_violation
      USING MESSAGE = 'the user is not a member of the organization',
            CONSTRAINT = 'user_roles__member_fkey';
  END IF;
  DELETE FROM kitium_auth.user_roles AS ur
   WHERE ur.user_id = p_user_id AND ur.org_id = p_org_id
     AND NOT (ur.role_id = ANY (p_role_ids));
  INSERT INTO kitium_auth.user_roles AS ur (id, user_id, role_id, org_id)
  SELECT w.id, p_user_id, w.role_id, p_org_id
    FROM unnest(p_role_ids, p_ids) AS w (role_id, id)
  ON CONFLICT (user_id, org_id, role_id) DO NOTHING;
  RETURN QUERY
    SELECT r.id, r.org_id, r.name, r.description, r.is_system, r.permissions, r.metadata,
           r.created_at, r.updated_at
      FROM kitium_auth.roles AS r
     WHERE r.org_id = p_org_id AND r.id = ANY (p_role_ids);
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.set_user_roles(uuid, uuid, uuid[], uuid[]);

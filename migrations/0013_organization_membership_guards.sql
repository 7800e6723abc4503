-- Membership changes that keep an organization's rules, and end the sessions a removal revokes.
--
-- Until now, applications had to enforce membership rules themselves, and could not do so safely:
--
-- * add_organization_member was an upsert: adding a user who was already a member changed the
--   member's role. So an application's "accept the invitation as a member" demoted an owner who
--   accepted an old invitation. An existing member now keeps its role (and joined_at), and roles
--   are changed by set_organization_member_role.
-- * "Keep at least one owner" and "no more members than organizations.seats" were
--   check-then-write races: two removals of the last two owners each saw the other owner and
--   both went through, and two adds each saw a free seat. The functions below refuse a removal or
--   demotion of the last member holding a given role (keep_last) and, on request (within_seats),
--   an add beyond the seats.
-- * Removing a member (remove_organization_member, or update_organization(members=...) leaving
--   the user out) left that user's sessions bound to the organization (sessions.org_id) valid,
--   so a removed member kept acting in the organization until their session expired. Removing a
--   membership now deletes those sessions too, in the same transaction; the user's other
--   sessions stay.
--
-- Why functions, and why the lock comes first. Every membership change of an organization now
-- runs one after another on the organization's row: each function first takes that row with
-- SELECT ... FOR NO KEY UPDATE, then reads and writes the members in later statements. The
-- functions are VOLATILE plpgsql, and under READ COMMITTED (the adapter's isolation level) each
-- statement in such a function takes a new snapshot when it starts, so those later statements
-- run with a snapshot taken after the lock was granted: they see everything the previous holder
-- of the lock committed (its new member, its removal). A guard in one plain SQL statement cannot
-- do that, even one that locks the organization row in a CTE first: the whole statement reads
-- with the snapshot taken when it started, before it waited for the lock. Two "remove an owner
-- if another owner remains" statements would then both see the other owner and both delete.
-- update_organization already locks the organization row with its UPDATE before it calls
-- replace_organization_members (0006), so member-set replacements are serialized with these
-- functions too.
--
-- FOR NO KEY UPDATE, not FOR UPDATE: the reference checks of rows pointing at the organization
-- (a session bound to it, a new role, a new member) take FOR KEY SHARE on the organization row,
-- which FOR NO KEY UPDATE does not block; logins into the organization go on while its members
-- change.
--
-- The functions report refusals as an outcome column rather than raising, so that a refusal
-- leaves the caller's transaction usable (the adapter raises SeatLimitError or ConflictError).
-- A missing organization is raised as the reference violation a plain insert would raise
-- (organization_members__org_id_fkey), as replace_backup_codes does for a missing user.
--
-- replace_organization_members is redefined (CREATE OR REPLACE) to delete the sessions of the
-- members it removes; the down part restores 0006's body. The lock it needs is taken by
-- update_organization's UPDATE, before the function is called.
--
-- Locks: none on tables; CREATE [OR REPLACE] FUNCTION only writes the catalog.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Add a user to an organization; an existing member is returned unchanged (outcome 'existing':
-- role and joined_at kept), a new member is inserted (outcome 'added'). With p_within_seats an
-- add that would take the organization past its seats writes nothing (outcome 'seat_limit',
-- membership columns NULL); a user that does not exist is still reported as such first.
CREATE FUNCTION kitium_auth.add_organization_member(
  p_org_id uuid, p_user_id uuid, p_role text, p_within_seats boolean
) RETURNS TABLE (
  outcome text, member_user_id uuid, member_role text, member_joined_at timestamptz
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_seats integer;
BEGIN
  SELECT o.seats INTO v_seats
    FROM kitium_auth.organizations AS o
   WHERE o.id = p_org_id
     FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE foreign_key_violation
      USING MESSAGE = 'no such organization', CONSTRAINT = 'organization_members__org_id_fkey';
  END IF;
  RETURN QUERY
    SELECT 'existing'::text, m.user_id, m.role, m.joined_at
      FROM kitium_auth.organization_members AS m
     WHERE m.org_id = p_org_id AND m.user_id = p_user_id;
  IF FOUND THEN
    RETURN;
  END IF;
  -- Counts at most v_seats members: the question is only whether that many are there.
  IF p_within_seats AND (
    SELECT count(*)
      FROM (SELECT 1
              FROM kitium_auth.organization_members AS m
             WHERE m.org_id = p_org_id
             LIMIT v_seats) AS taken
  ) >= v_seats THEN
    PERFORM 1 FROM kitium_auth.users AS u WHERE u.id = p_user_id;
    IF NOT FOUND THEN
      RAISE foreign_key_violation
        USING MESSAGE = 'no such user', CONSTRAINT = 'organization_members__user_id_fkey';
    END IF;
    RETURN QUERY SELECT 'seat_limit'::text, NULL::uuid, NULL::text, NULL::timestamptz;
    RETURN;
  END IF;
  RETURN QUERY
    INSERT INTO kitium_auth.organization_members AS m (org_id, user_id, role)
    VALUES (p_org_id, p_user_id, p_role)
    RETURNING 'added'::text, m.user_id, m.role, m.joined_at;
END;
$$;

-- Give a member another role (outcome 'set'; joined_at kept). With p_keep_last, taking that role
-- from the organization's last member holding it writes nothing (outcome 'last', the membership
-- as stored). No row when the organization does not exist or the user is not a member.
CREATE FUNCTION kitium_auth.set_organization_member_role(
  p_org_id uuid, p_user_id uuid, p_role text, p_keep_last text
) RETURNS TABLE (
  outcome text, member_user_id uuid, member_role text, member_joined_at timestamptz
)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_role text;
BEGIN
  PERFORM 1 FROM kitium_auth.organizations AS o WHERE o.id = p_org_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT m.role INTO v_role
    FROM kitium_auth.organization_members AS m
   WHERE m.org_id = p_org_id AND m.user_id = p_user_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_role = p_role THEN
    -- Nothing to change (a retry of a call that changed it, too): no write, no guard.
    RETURN QUERY
      SELECT 'set'::text, m.user_id, m.role, m.joined_at
        FROM kitium_auth.organization_members AS m
       WHERE m.org_id = p_org_id AND m.user_id = p_user_id;
    RETURN;
  END IF;
  IF v_role = p_keep_last AND NOT EXISTS (
    SELECT 1
      FROM kitium_auth.organization_members AS m
     WHERE m.org_id = p_org_id AND m.role = p_keep_last AND m.user_id <> p_user_id
  ) THEN
    RETURN QUERY
      SELECT 'last'::text, m.user_id, m.role, m.joined_at
        FROM kitium_auth.organization_members AS m
       WHERE m.org_id = p_org_id AND m.user_id = p_user_id;
    RETURN;
  END IF;
  RETURN QUERY
    UPDATE kitium_auth.organization_members AS m
       SET role = p_role
     WHERE m.org_id = p_org_id AND m.user_id = p_user_id
    RETURNING 'set'::text, m.user_id, m.role, m.joined_at;
END;
$$;

-- Remove a user from an organization, and with the membership its role assignments there (the
-- user_roles__member_fkey cascade) and its sessions bound to the organization: 'removed'. With
-- p_keep_last, removing the organization's last member holding that role writes nothing:
-- 'last'. 'absent' when the user is not a member (or the organization does not exist).
CREATE FUNCTION kitium_auth.remove_organization_member(
  p_org_id uuid, p_user_id uuid, p_keep_last text
) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM 1 FROM kitium_auth.organizations AS o WHERE o.id = p_org_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN 'absent';
  END IF;
  IF p_keep_last IS NOT NULL
     AND EXISTS (
       SELECT 1
         FROM kitium_auth.organization_members AS m
        WHERE m.org_id = p_org_id AND m.user_id = p_user_id AND m.role = p_keep_last
     )
     AND NOT EXISTS (
       SELECT 1
         FROM kitium_auth.organization_members AS m
        WHERE m.org_id = p_org_id AND m.role = p_keep_last AND m.user_id <> p_user_id
     ) THEN
    RETURN 'last';
  END IF;
  DELETE FROM kitium_auth.organization_members AS m
   WHERE m.org_id = p_org_id AND m.user_id = p_user_id;
  IF NOT FOUND THEN
    RETURN 'absent';
  END IF;
  DELETE FROM kitium_auth.sessions AS s WHERE s.org_id = p_org_id AND s.user_id = p_user_id;
  RETURN 'removed';
END;
$$;

-- 0006's replacement of a member set, which now also deletes the sessions bound to the
-- organization of the members it removes (the caller has locked the organization row).
CREATE OR REPLACE FUNCTION kitium_auth.replace_organization_members(
  p_org_id uuid, p_user_ids uuid[], p_roles text[]
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_removed uuid[];
BEGIN
  WITH removed AS (
    DELETE FROM kitium_auth.organization_members AS m
     WHERE m.org_id = p_org_id AND NOT (m.user_id = ANY (p_user_ids))
    RETURNING m.user_id
  )
  SELECT array_agg(removed.user_id) INTO v_removed FROM removed;
  IF v_removed IS NOT NULL THEN
    DELETE FROM kitium_auth.sessions AS s
     WHERE s.org_id = p_org_id AND s.user_id = ANY (v_removed);
  END IF;
  INSERT INTO kitium_auth.organization_members AS m (org_id, user_id, role)
  SELECT p_org_id, w.user_id, w.role
    FROM unnest(p_user_ids, p_roles) AS w (user_id, role)
  ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role;
  RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'user_id', m.user_id, 'role', m.role, 'joined_at', m.joined_at)
             ORDER BY m.joined_at, m.user_id), '[]'::jsonb)
      FROM kitium_auth.organization_members AS m
     WHERE m.org_id = p_org_id
  );
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- 0006's body: removed members' sessions stay.
CREATE OR REPLACE FUNCTION kitium_auth.replace_organization_members(
  p_org_id uuid, p_user_ids uuid[], p_roles text[]
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  DELETE FROM kitium_auth.organization_members AS m
   WHERE m.org_id = p_org_id AND NOT (m.user_id = ANY (p_user_ids));
  INSERT INTO kitium_auth.organization_members AS m (org_id, user_id, role)
  SELECT p_org_id, w.user_id, w.role
    FROM unnest(p_user_ids, p_roles) AS w (user_id, role)
  ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role;
  RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'user_id', m.user_id, 'role', m.role, 'joined_at', m.joined_at)
             ORDER BY m.joined_at, m.user_id), '[]'::jsonb)
      FROM kitium_auth.organization_members AS m
     WHERE m.org_id = p_org_id
  );
END;
$$;

DROP FUNCTION kitium_auth.remove_organization_member(uuid, uuid, text);
DROP FUNCTION kitium_auth.set_organization_member_role(uuid, uuid, text, text);
DROP FUNCTION kitium_auth.add_organization_member(uuid, uuid, text, boolean);

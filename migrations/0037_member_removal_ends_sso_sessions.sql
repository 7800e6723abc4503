-- Removing a member ends their SSO sessions at the organization's providers.
--
-- remove_organization_member and update_organization(members=...) leaving a user out (0013)
-- ended the member's sessions bound to the organization, but their SSO sessions at the
-- organization's own providers (sso_providers.org_id) stayed: an application that asks
-- get_sso_session whether the organization's IdP session still holds got a yes for someone the
-- organization had removed (noted in review). The two functions now delete those SSO sessions
-- with the membership. SSO sessions at shared providers (no organization) and at other
-- organizations' providers stay, as do SSO links: a link is an identity, and what a returning
-- identity may do is the application's sign-in policy.
--
-- Lock order. Each function locks the organization's row first (update_organization's UPDATE
-- does it for replace_organization_members), then the users it removes (FOR KEY SHARE, in id
-- order), then their SSO sessions there (FOR UPDATE, in row order), deletes those, then the
-- memberships, whose cascade takes the sessions bound to the organization
-- (sessions__member_fkey, 0021). Why these:
-- * delete_user locks the user's row, then reaches memberships, sessions and SSO sessions by
--   cascade. A removal that held a membership and waited for an SSO session could meet a
--   delete_user holding that SSO session and waiting for the membership; locking the user
--   first makes the two wait for each other at the user's row instead. KEY SHARE conflicts
--   only with deleting the user: changes of the user (update_user's NO KEY UPDATE) and
--   sign-ins (the foreign-key checks' KEY SHARE) do not wait for it.
-- * An application ending a user's SSO sessions and then their sessions in one transaction
--   (delete_user_sso_sessions, then delete_user_sessions, which locks the memberships FOR KEY
--   SHARE), the order a single logout takes too, meets a removal that deletes the SSO sessions
--   before the membership without a cycle.
-- * The SSO sessions go in row order (ctid), the order every other delete of several of a
--   user's SSO sessions reaches them: delete_user_sso_sessions and delete_user's cascade (by
--   user: sso_sessions_user_id_idx, whose ties are in row order, or any scan), the logouts and
--   delete_sso_link (one identity: sso_sessions_provider_id_provider_subject_idx, ties in row
--   order), delete_sso_provider's cascade (by provider). Deleted in the join's order (provider
--   by provider, or by subject) a removal met delete_user_sso_sessions of the same user, each
--   holding a session the other wanted: a deadlock (found in review).
-- The existing-member check moves before anything is deleted, so a call for a user who is not
-- a member still writes nothing ('absent'). The explicit DELETE of the removed members'
-- sessions goes: since 0021 the membership's cascade deletes them, and it found none.
--
-- Creating or replacing a function locks no table.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Remove a user from an organization, and with the membership its role assignments there
-- (user_roles__member_fkey), its sessions bound to the organization (sessions__member_fkey) and
-- its SSO sessions at the organization's providers: 'removed'. With p_keep_last, removing the
-- organization's last member holding that role writes nothing: 'last'. 'absent' when the user
-- is not a member (or the organization does not exist): nothing written.
CREATE OR REPLACE FUNCTION kitium_auth.remove_organization_member(
  p_org_id uuid, p_user_id uuid, p_keep_last text
) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM 1 FROM kitium_auth.organizations AS o WHERE o.id = p_org_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RETURN 'absent';
  END IF;
  PERFORM 1 FROM kitium_auth.users AS u WHERE u.id = p_user_id FOR KEY SHARE;
  IF NOT EXISTS (
    SELECT 1
      FROM kitium_auth.organization_members AS m
     WHERE m.org_id = p_org_id AND m.user_id = p_user_id
  ) THEN
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
  PERFORM 1
     FROM kitium_auth.sso_sessions AS s
    WHERE s.user_id = p_user_id
      AND s.provider_id IN (SELECT p.id FROM kitium_auth.sso_providers AS p
                             WHERE p.org_id = p_org_id)
    ORDER BY s.ctid
      FOR UPDATE OF s;
  DELETE FROM kitium_auth.sso_sessions AS s
   USING kitium_auth.sso_providers AS p
   WHERE p.org_id = p_org_id AND s.provider_id = p.id AND s.user_id = p_user_id;
  DELETE FROM kitium_auth.organization_members AS m
   WHERE m.org_id = p_org_id AND m.user_id = p_user_id;
  -- A membership deleted by a plain DELETE that committed after the check above.
  IF NOT FOUND THEN
    RETURN 'absent';
  END IF;
  RETURN 'removed';
END;
$$;

-- Replace an organization's member set (the caller has locked the organization row): members
-- left out are removed as remove_organization_member removes them, those named are inserted or
-- get the role named; returns the members as organization_member_list does.
CREATE OR REPLACE FUNCTION kitium_auth.replace_organization_members(
  p_org_id uuid, p_user_ids uuid[], p_roles text[]
) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM 1
     FROM kitium_auth.users AS u
    WHERE u.id IN (SELECT m.user_id
                     FROM kitium_auth.organization_members AS m
                    WHERE m.org_id = p_org_id AND NOT (m.user_id = ANY (p_user_ids)))
    ORDER BY u.id
      FOR KEY SHARE OF u;
  PERFORM 1
     FROM kitium_auth.sso_sessions AS s
    WHERE s.provider_id IN (SELECT p.id FROM kitium_auth.sso_providers AS p
                             WHERE p.org_id = p_org_id)
      AND s.user_id IN (SELECT m.user_id
                          FROM kitium_auth.organization_members AS m
                         WHERE m.org_id = p_org_id AND NOT (m.user_id = ANY (p_user_ids)))
    ORDER BY s.ctid
      FOR UPDATE OF s;
  DELETE FROM kitium_auth.sso_sessions AS s
   USING kitium_auth.sso_providers AS p, kitium_auth.organization_members AS m
   WHERE p.org_id = p_org_id AND s.provider_id = p.id
     AND m.org_id = p_org_id AND m.user_id = s.user_id AND NOT (m.user_id = ANY (p_user_ids));
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

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- 0013's bodies: a removed member's SSO sessions stay.
CREATE OR REPLACE FUNCTION kitium_auth.remove_organization_member(
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

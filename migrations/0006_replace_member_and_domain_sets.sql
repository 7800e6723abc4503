-- Replacing an organization's member set (update_organization(members=...)) or a provider's
-- domain set (update_sso_provider(domains=...)) in one statement was not safe against a second
-- replacement at the same time: the second statement waited for the first's lock on the
-- organization (provider) row, but its DELETE of "everyone not listed" then ran with the
-- snapshot it took before the first committed, missed the first call's new rows, and both sets
-- survived, merged. These functions do the DELETE and the upsert with snapshots of their own
-- (VOLATILE under READ COMMITTED: one per statement), taken after the caller's UPDATE of the
-- organization (provider) row has locked it, as replace_backup_codes does for backup codes: the
-- later call replaces what the earlier one wrote. Each returns the resulting set as the jsonb
-- array the records are built from.

-- migrate:up

SET LOCAL lock_timeout = '5s';

CREATE FUNCTION kitium_auth.replace_organization_members(
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

CREATE FUNCTION kitium_auth.replace_sso_provider_domains(p_provider_id uuid, p_domains text[])
RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  DELETE FROM kitium_auth.sso_provider_domains AS d
   WHERE d.provider_id = p_provider_id AND NOT (d.domain = ANY (p_domains));
  INSERT INTO kitium_auth.sso_provider_domains AS d (provider_id, domain)
  SELECT p_provider_id, w.domain
    FROM unnest(p_domains) AS w (domain)
  ON CONFLICT (provider_id, domain) DO NOTHING;
  RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object(
             'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain), '[]'::jsonb)
      FROM kitium_auth.sso_provider_domains AS d
     WHERE d.provider_id = p_provider_id
  );
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.replace_sso_provider_domains(uuid, text[]);
DROP FUNCTION kitium_auth.replace_organization_members(uuid, uuid[], text[]);

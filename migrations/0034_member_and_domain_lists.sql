-- The member list update_organization returns and the domain list update_sso_provider returns,
-- read once the UPDATE holds the row's lock.
--
-- Both statements read the list in a subquery, with the snapshot the statement took when it
-- started. When the UPDATE had to wait for the row's lock, held by add_organization_member
-- (or add_sso_provider_domain, which lock the same row before they write), the list missed what
-- that call had committed: the record returned paired the new name with a member list that had
-- never been the organization's (found in review). These functions are VOLATILE plpgsql: under
-- READ COMMITTED (the adapter's isolation level) their query takes a new snapshot when it runs,
-- after the UPDATE was granted the lock, and sees everything the previous holder committed, as
-- replace_organization_members and replace_sso_provider_domains (migration 0006) already did for
-- the lists they replace. plpgsql, not LANGUAGE sql, so that no plan inlines the query back
-- into the calling statement's snapshot.
--
-- Creating a function locks no table. This version's update_organization and
-- update_sso_provider call them, and fail until this migration is applied.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- The members of one organization in join order (then user id), as the Organization record's
-- members: [{"user_id", "role", "joined_at"}, ...]; [] for none.
CREATE FUNCTION kitium_auth.organization_member_list(p_org_id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'user_id', m.user_id, 'role', m.role, 'joined_at', m.joined_at)
                   ORDER BY m.joined_at, m.user_id), '[]'::jsonb)
            FROM kitium_auth.organization_members AS m
           WHERE m.org_id = p_org_id);
END;
$$;

-- The domains of one SSO provider in domain order, as the SsoProvider record's domains:
-- [{"domain", "verified_at"}, ...]; [] for none.
CREATE FUNCTION kitium_auth.sso_provider_domain_list(p_provider_id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain),
                   '[]'::jsonb)
            FROM kitium_auth.sso_provider_domains AS d
           WHERE d.provider_id = p_provider_id);
END;
$$;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP FUNCTION kitium_auth.sso_provider_domain_list(uuid);
DROP FUNCTION kitium_auth.organization_member_list(uuid);

-- Optional: tenant isolation with row-level security on the organization-scoped tables.
-- Apply it with PostgresStorageAdapter(..., optional_migrations=["tenant_rls"]) or
-- `kitium-pg migrate --optional tenant_rls`.
--
-- The tenant is the run-time setting kitium.tenant, which the adapter sets per transaction with
-- set_config(..., true) (storage.tenant(org_id)), so it also works through a transaction-pooling
-- proxy. Without a tenant a non-owner role sees no organization-scoped row (fail closed). RLS is
-- FORCEd, so it binds the table owner too; the owner (the role running this migration, which
-- also provisions organizations and runs maintenance) gets an explicit policy of its own.
-- Superusers and BYPASSRLS roles are never subject to row-level security.
--
-- A provider's domains, SSO links and SSO sessions follow their provider: a tenant reads and
-- writes those of its own providers; those of another tenant's provider are invisible to it, and
-- inserting one is refused. SSO providers without an organization are shared: every tenant, and
-- a role with no tenant, may read them and their domains, links and SSO sessions; none may change
-- them (only the owner adds or deletes a link or SSO session on a shared provider, as it manages
-- the provider and its domains). Reads of shared rows come from a separate FOR SELECT policy
-- (shared_read), so the policy that also governs writes (tenant_isolation) only ever matches the
-- tenant's own rows. (One FOR ALL policy with "org_id IS NULL OR ..." in its USING clause would
-- let any tenant update or delete a shared provider: WITH CHECK only constrains the row as
-- written, not the row chosen.)

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Whether a provider exists and is not the current tenant's to change: another tenant's, or a
-- shared one (no organization), or any provider when no tenant is set. The WITH CHECK of domains,
-- links and SSO sessions refuses those rather than requiring "a provider of this tenant" (for
-- links and sessions either would do; one rule for the three): create_sso_provider inserts a
-- provider and its domains in one statement, and no query of that statement can see the new
-- provider (it is not in the statement's snapshot), so the positive check would refuse every
-- new provider's domains. The new provider itself must pass sso_providers' own WITH CHECK.
-- SECURITY DEFINER, to see every provider whatever the caller's policies, with a fixed
-- search_path.
CREATE FUNCTION kitium_auth.sso_provider_is_foreign(provider uuid) RETURNS boolean
  LANGUAGE sql STABLE SECURITY DEFINER
  SET search_path = pg_catalog, pg_temp
  AS $fn$
    SELECT EXISTS (
      SELECT 1
        FROM kitium_auth.sso_providers AS p
       WHERE p.id = provider
         AND (p.org_id IS NULL
              OR p.org_id IS DISTINCT FROM nullif(current_setting('kitium.tenant', true), '')::uuid)
    )
  $fn$;

DO $$
DECLARE
  spec record;
BEGIN
  FOR spec IN
    SELECT * FROM (VALUES
      ('organizations',        'id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid',
                               'id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid'),
      ('organization_members', 'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid',
                               'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid'),
      ('roles',                'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid',
                               'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid'),
      ('user_roles',           'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid',
                               'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid'),
      -- Shared providers (no organization) are readable through shared_read below.
      ('sso_providers',        'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid',
                               'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid'),
      -- A provider's domains follow their provider (the check: see sso_provider_is_foreign).
      ('sso_provider_domains', 'EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p WHERE p.id = provider_id AND p.org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid)',
                               'NOT kitium_auth.sso_provider_is_foreign(provider_id)'),
      -- And so do its links and SSO sessions (a reference is not checked by row-level security:
      -- without these, a tenant could read, create and delete them on another tenant's provider).
      ('sso_links',            'EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p WHERE p.id = provider_id AND p.org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid)',
                               'NOT kitium_auth.sso_provider_is_foreign(provider_id)'),
      ('sso_sessions',         'EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p WHERE p.id = provider_id AND p.org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid)',
                               'NOT kitium_auth.sso_provider_is_foreign(provider_id)'),
      -- Events about a user but no organization are not tenant data.
      ('auth_events',          'org_id IS NULL OR org_id = current_setting(''kitium.tenant'', true)',
                               'org_id IS NULL OR org_id = current_setting(''kitium.tenant'', true)')
    ) AS t (tbl, using_expr, check_expr)
  LOOP
    EXECUTE format('ALTER TABLE kitium_auth.%I ENABLE ROW LEVEL SECURITY', spec.tbl);
    EXECUTE format('ALTER TABLE kitium_auth.%I FORCE ROW LEVEL SECURITY', spec.tbl);
    EXECUTE format('CREATE POLICY tenant_isolation ON kitium_auth.%I USING (%s) WITH CHECK (%s)',
                   spec.tbl, spec.using_expr, spec.check_expr);
    EXECUTE format('CREATE POLICY owner_access ON kitium_auth.%I TO %I USING (true) WITH CHECK (true)',
                   spec.tbl, current_user);
  END LOOP;
END;
$$;

-- Read-only access to what is shared: SSO providers without an organization, and their domains,
-- links and SSO sessions. A policy of its own, FOR SELECT, so that no tenant can update or delete
-- a shared row. A link or SSO session on a shared provider belongs to no organization (as the
-- user it links does not), so every tenant sees it, as it sees the provider.
CREATE POLICY shared_read ON kitium_auth.sso_providers FOR SELECT
  USING (org_id IS NULL);
CREATE POLICY shared_read ON kitium_auth.sso_provider_domains FOR SELECT
  USING (EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p
                  WHERE p.id = provider_id AND p.org_id IS NULL));
CREATE POLICY shared_read ON kitium_auth.sso_links FOR SELECT
  USING (EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p
                  WHERE p.id = provider_id AND p.org_id IS NULL));
CREATE POLICY shared_read ON kitium_auth.sso_sessions FOR SELECT
  USING (EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p
                  WHERE p.id = provider_id AND p.org_id IS NULL));

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP POLICY shared_read ON kitium_auth.sso_sessions;
DROP POLICY shared_read ON kitium_auth.sso_links;
DROP POLICY shared_read ON kitium_auth.sso_provider_domains;
DROP POLICY shared_read ON kitium_auth.sso_providers;

DO $$
DECLARE
  tbl text;
BEGIN
  FOREACH tbl IN ARRAY ARRAY['organizations', 'organization_members', 'roles', 'user_roles',
                             'sso_providers', 'sso_provider_domains', 'sso_links',
                             'sso_sessions', 'auth_events']
  LOOP
    EXECUTE format('DROP POLICY tenant_isolation ON kitium_auth.%I', tbl);
    EXECUTE format('DROP POLICY owner_access ON kitium_auth.%I', tbl);
    EXECUTE format('ALTER TABLE kitium_auth.%I NO FORCE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE kitium_auth.%I DISABLE ROW LEVEL SECURITY', tbl);
  END LOOP;
END;
$$;

DROP FUNCTION kitium_auth.sso_provider_is_foreign(uuid);

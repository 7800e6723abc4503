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

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

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
      -- Providers without an organization are shared by every tenant (read-only for them).
      ('sso_providers',        'org_id IS NULL OR org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid',
                               'org_id = nullif(current_setting(''kitium.tenant'', true), '''')::uuid'),
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

-- migrate:down

SET LOCAL lock_timeout = '5s';

DO $$
DECLARE
  tbl text;
BEGIN
  FOREACH tbl IN ARRAY ARRAY['organizations', 'organization_members', 'roles', 'user_roles',
                             'sso_providers', 'auth_events']
  LOOP
    EXECUTE format('DROP POLICY tenant_isolation ON kitium_auth.%I', tbl);
    EXECUTE format('DROP POLICY owner_access ON kitium_auth.%I', tbl);
    EXECUTE format('ALTER TABLE kitium_auth.%I NO FORCE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE kitium_auth.%I DISABLE ROW LEVEL SECURITY', tbl);
  END LOOP;
END;
$$;

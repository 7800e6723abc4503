-- Least-privilege grants for an application role (the placeholder kitium_app is replaced by the
-- validated role name). No DDL rights; audit events are append-only (no UPDATE or DELETE: pruning
-- is maintenance for the owner); the migration ledger is readable for health checks; the
-- schema's functions (the membership, 2FA and domain writes call them, tenant_rls's policies
-- too) are executable even where EXECUTE was revoked from PUBLIC, as hardened clusters do.

-- name: grant_app_role#
-- Grant an application role exactly what the adapter's runtime calls need.
GRANT USAGE ON SCHEMA kitium_auth TO kitium_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON
  kitium_auth.users, kitium_auth.oauth_accounts, kitium_auth.organizations,
  kitium_auth.organization_members, kitium_auth.sessions, kitium_auth.api_keys,
  kitium_auth.email_verification_tokens, kitium_auth.roles, kitium_auth.sso_providers,
  kitium_auth.sso_provider_domains, kitium_auth.sso_links, kitium_auth.sso_sessions,
  kitium_auth.twofa_devices, kitium_auth.twofa_backup_codes, kitium_auth.twofa_sessions
  TO kitium_app;
-- No UPDATE: an assignment is inserted or deleted, never changed.
GRANT SELECT, INSERT, DELETE ON kitium_auth.user_roles TO kitium_app;
-- No DELETE: a counter goes with its token (the foreign key's cascade runs as the owner).
GRANT SELECT, INSERT, UPDATE ON kitium_auth.email_verification_token_attempts TO kitium_app;
GRANT SELECT, INSERT ON kitium_auth.auth_events TO kitium_app;
GRANT SELECT ON kitium_auth.auth_migrations TO kitium_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA kitium_auth TO kitium_app;

-- Three integrity rules about organizations and SSO providers:
--
-- 1. An organization's SSO providers go with it. sso_providers__org_id_fkey was ON DELETE SET
--    NULL, so deleting an organization turned its providers into shared ones (org_id NULL): read
--    by every tenant under tenant_rls, secrets and verified domains included, listed by
--    list_sso_providers for every organization. A tenant could even make its own provider shared
--    by deleting its own organization (a referential action is not checked by row-level
--    security). The reference is now ON DELETE CASCADE: the providers go, and with them their
--    domains, links and SSO sessions (their references to the provider cascade already).
--
-- 2. A session bound to an organization ends with it. sessions__org_id_fkey was ON DELETE SET
--    NULL, so such a session became unbound, and require_permission (FastAPI) then let it act in
--    any organization where its user holds the permission. It is now ON DELETE CASCADE.
--
-- 3. An SSO link's or SSO session's provider_type is its provider's type. It was the caller's
--    word, checked only against ('saml', 'oidc'). sso_links and sso_sessions now reference
--    sso_providers (id, type) (sso_links__provider_type_fkey, sso_sessions__provider_type_fkey,
--    ON UPDATE CASCADE: a provider whose type is changed carries its rows along; ON DELETE
--    CASCADE, as the references on provider_id alone, which stay). A create with another type is
--    refused (NotFoundError naming the constraint). Existing rows with another type are kept,
--    not deleted: 0008 sets their provider_type to their provider's type before it validates.
--    That correction needs no table lock there: from this migration on, no write can add such
--    a row.
--
-- PostgreSQL cannot change a reference's ON DELETE action in place, so 1 and 2 drop the reference
-- and add it again under the same name (no row can break it in between: the reference dropped
-- was valid, with the same columns and target, and this transaction locks both tables). Every
-- new reference is added NOT VALID here, so it holds for every write from now on, and validated
-- by 0008 in a transaction of its own, which then locks no table against reads or writes while
-- it checks the existing rows.
--
-- Locks, held until this transaction commits, which is soon once they are granted (nothing is
-- scanned but sso_providers, a small table, for its new unique index): ACCESS EXCLUSIVE on
-- organizations, sessions and sso_providers (dropping a reference takes it on both of its
-- tables; the index is built on sso_providers), SHARE ROW EXCLUSIVE (writers wait, readers do
-- not) on sso_links and sso_sessions. They are taken up front, in one order, referenced tables
-- before the tables that reference them, as the cascade of an organization's delete takes them.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

LOCK TABLE kitium_auth.organizations, kitium_auth.sessions, kitium_auth.sso_providers
  IN ACCESS EXCLUSIVE MODE;
LOCK TABLE kitium_auth.sso_links, kitium_auth.sso_sessions IN SHARE ROW EXCLUSIVE MODE;

-- Served on the referencing side by sso_providers_org_id_idx and sessions_org_id_idx.
-- squawk-ignore ban-drop-constraint
ALTER TABLE kitium_auth.sso_providers DROP CONSTRAINT sso_providers__org_id_fkey;
ALTER TABLE kitium_auth.sso_providers
  ADD CONSTRAINT sso_providers__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE NOT VALID;

-- squawk-ignore ban-drop-constraint
ALTER TABLE kitium_auth.sessions DROP CONSTRAINT sessions__org_id_fkey;
ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE NOT VALID;

-- Lets sso_links and sso_sessions check that their provider_type is their provider's (as
-- roles__id_org_id_key does for role assignments). Built in place rather than CONCURRENTLY
-- (which cannot run in the migration's transaction): the table holds one row per identity
-- provider, and lock_timeout above bounds the wait.
-- squawk-ignore disallowed-unique-constraint, constraint-missing-not-valid
ALTER TABLE kitium_auth.sso_providers ADD CONSTRAINT sso_providers__id_type_key UNIQUE (id, type);

-- Served on the referencing side, for the cascades, by sso_links__provider_subject_key
-- (provider_id, provider_subject) and sso_sessions_provider_id_idx (provider_id).
ALTER TABLE kitium_auth.sso_links
  ADD CONSTRAINT sso_links__provider_type_fkey FOREIGN KEY (provider_id, provider_type)
    REFERENCES kitium_auth.sso_providers (id, type) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;
ALTER TABLE kitium_auth.sso_sessions
  ADD CONSTRAINT sso_sessions__provider_type_fkey FOREIGN KEY (provider_id, provider_type)
    REFERENCES kitium_auth.sso_providers (id, type) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;

-- migrate:down

SET LOCAL lock_timeout = '5s';

LOCK TABLE kitium_auth.organizations, kitium_auth.sessions, kitium_auth.sso_providers
  IN ACCESS EXCLUSIVE MODE;
LOCK TABLE kitium_auth.sso_links, kitium_auth.sso_sessions IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE kitium_auth.sso_sessions DROP CONSTRAINT sso_sessions__provider_type_fkey;
ALTER TABLE kitium_auth.sso_links DROP CONSTRAINT sso_links__provider_type_fkey;
ALTER TABLE kitium_auth.sso_providers DROP CONSTRAINT sso_providers__id_type_key;

-- Restores the references 0001 and 0002 created (ON DELETE SET NULL), validated as they were:
-- each check scans its table (sessions can be large) while the locks above are held, so reads
-- of these tables wait for it. A rollback is rare, and every row passes (the reference being
-- replaced had the same columns and the same target).
ALTER TABLE kitium_auth.sessions DROP CONSTRAINT sessions__org_id_fkey;
-- squawk-ignore adding-foreign-key-constraint, constraint-missing-not-valid
ALTER TABLE kitium_auth.sessions ADD CONSTRAINT sessions__org_id_fkey FOREIGN KEY (org_id) REFERENCES kitium_auth.organizations (id) ON DELETE SET NULL;
ALTER TABLE kitium_auth.sso_providers DROP CONSTRAINT sso_providers__org_id_fkey;
-- squawk-ignore adding-foreign-key-constraint, constraint-missing-not-valid
ALTER TABLE kitium_auth.sso_providers ADD CONSTRAINT sso_providers__org_id_fkey FOREIGN KEY (org_id) REFERENCES kitium_auth.organizations (id) ON DELETE SET NULL;

-- Validates the references 0007 added NOT VALID (an organization's SSO providers and bound
-- sessions go with it; an SSO link's or SSO session's provider_type is its provider's type).
--
-- SSO links and SSO sessions written before 0007 may name another type than their provider's.
-- They are corrected, not deleted: provider_type is set to the provider's type (the provider is
-- what the row is bound to; the type was only the caller's description of it). No new such row
-- can appear meanwhile: since 0007 every write is checked against the provider's type, and
-- changing a provider's type carries its rows along.
--
-- In a transaction of its own, VALIDATE CONSTRAINT takes only SHARE UPDATE EXCLUSIVE on the
-- referencing table and ROW SHARE on the referenced one, and the correction locks only the rows
-- it changes: reads and writes go on while the existing rows are checked.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

UPDATE kitium_auth.sso_links AS l
   SET provider_type = p.type
  FROM kitium_auth.sso_providers AS p
 WHERE p.id = l.provider_id AND l.provider_type <> p.type;
UPDATE kitium_auth.sso_sessions AS s
   SET provider_type = p.type
  FROM kitium_auth.sso_providers AS p
 WHERE p.id = s.provider_id AND s.provider_type <> p.type;

ALTER TABLE kitium_auth.sso_providers VALIDATE CONSTRAINT sso_providers__org_id_fkey;
ALTER TABLE kitium_auth.sessions VALIDATE CONSTRAINT sessions__org_id_fkey;
ALTER TABLE kitium_auth.sso_links VALIDATE CONSTRAINT sso_links__provider_type_fkey;
ALTER TABLE kitium_auth.sso_sessions VALIDATE CONSTRAINT sso_sessions__provider_type_fkey;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Back to the state 0007 left: its four references NOT VALID (a validated constraint cannot be
-- marked unvalidated, so each is dropped and added again). The corrected provider_type values
-- stay: they are right under either version. Locks as in 0007, in its order.
LOCK TABLE kitium_auth.organizations, kitium_auth.sessions, kitium_auth.sso_providers
  IN ACCESS EXCLUSIVE MODE;
LOCK TABLE kitium_auth.sso_links, kitium_auth.sso_sessions IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE kitium_auth.sso_providers DROP CONSTRAINT sso_providers__org_id_fkey;
ALTER TABLE kitium_auth.sso_providers
  ADD CONSTRAINT sso_providers__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE NOT VALID;
ALTER TABLE kitium_auth.sessions DROP CONSTRAINT sessions__org_id_fkey;
ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE NOT VALID;
ALTER TABLE kitium_auth.sso_links DROP CONSTRAINT sso_links__provider_type_fkey;
ALTER TABLE kitium_auth.sso_links
  ADD CONSTRAINT sso_links__provider_type_fkey FOREIGN KEY (provider_id, provider_type)
    REFERENCES kitium_auth.sso_providers (id, type) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;
ALTER TABLE kitium_auth.sso_sessions DROP CONSTRAINT sso_sessions__provider_type_fkey;
ALTER TABLE kitium_auth.sso_sessions
  ADD CONSTRAINT sso_sessions__provider_type_fkey FOREIGN KEY (provider_id, provider_type)
    REFERENCES kitium_auth.sso_providers (id, type) ON UPDATE CASCADE ON DELETE CASCADE NOT VALID;

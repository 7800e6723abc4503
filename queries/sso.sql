-- SSO providers with their email domains, SSO links and SSO sessions.
-- Every provider-returning query yields the columns the adapter's provider row factory reads:
-- those of kitium_pg.records.SsoProvider, except that each secret arrives as its ciphertext and
-- key id (decrypted in Python; no secret is ever sent to or stored by the database in
-- plaintext), and the domains column aggregates the provider's rows of sso_provider_domains
-- (one lookup on the primary key provider_id, domain) ordered by domain.
-- Domain lists arrive as one text array expanded with unnest, already lowercased by the caller.

-- name: create_sso_provider(id, type, name, org_id, metadata_url, client_id, client_secret_ciphertext, client_secret_key_id, token_endpoint_auth_method, idp_entity_id, idp_sso_url, idp_slo_url, idp_certificate, sp_entity_id, sp_acs_url, sp_slo_url, signing_cert, signing_key_ciphertext, signing_key_key_id, encryption_enabled, force_authn, scopes, redirect_uris, claim_mapping, attribute_mapping, metadata, domains)^
-- Insert a provider with its (unverified) domains; a retry with the same id returns the stored row.
WITH inserted AS (
  INSERT INTO kitium_auth.sso_providers
    (id, type, name, org_id, metadata_url, client_id, client_secret_ciphertext,
     client_secret_key_id, token_endpoint_auth_method, idp_entity_id, idp_sso_url, idp_slo_url,
     idp_certificate, sp_entity_id, sp_acs_url, sp_slo_url, signing_cert, signing_key_ciphertext,
     signing_key_key_id, encryption_enabled, force_authn, scopes, redirect_uris, claim_mapping,
     attribute_mapping, metadata)
  VALUES
    (:id, :type, :name, :org_id, :metadata_url, :client_id, :client_secret_ciphertext,
     :client_secret_key_id, :token_endpoint_auth_method, :idp_entity_id, :idp_sso_url,
     :idp_slo_url, :idp_certificate, :sp_entity_id, :sp_acs_url, :sp_slo_url, :signing_cert,
     :signing_key_ciphertext, :signing_key_key_id, :encryption_enabled, :force_authn, :scopes,
     :redirect_uris, :claim_mapping::jsonb, :attribute_mapping::jsonb, :metadata::jsonb)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, type, name, org_id, metadata_url, client_id, client_secret_ciphertext,
            client_secret_key_id, token_endpoint_auth_method, idp_entity_id, idp_sso_url,
            idp_slo_url, idp_certificate, sp_entity_id, sp_acs_url, sp_slo_url, signing_cert,
            signing_key_ciphertext, signing_key_key_id, encryption_enabled, force_authn, scopes,
            redirect_uris, claim_mapping, attribute_mapping, metadata, created_at, updated_at
),
-- No RETURNING here: under the optional tenant_rls migration, returning a row needs the SELECT
-- policy, which cannot see the provider this same statement inserts. The domains written are
-- exactly the given ones, unverified, and the first branch below lists those.
added AS (
  INSERT INTO kitium_auth.sso_provider_domains (provider_id, domain)
  SELECT inserted.id, d.domain
    FROM inserted, unnest(:domains::text[]) AS d (domain)
)
SELECT i.id, i.type, i.name, i.org_id, i.metadata_url, i.client_id, i.client_secret_ciphertext,
       i.client_secret_key_id, i.token_endpoint_auth_method, i.idp_entity_id, i.idp_sso_url,
       i.idp_slo_url, i.idp_certificate, i.sp_entity_id, i.sp_acs_url, i.sp_slo_url,
       i.signing_cert, i.signing_key_ciphertext, i.signing_key_key_id, i.encryption_enabled,
       i.force_authn, i.scopes, i.redirect_uris, i.claim_mapping, i.attribute_mapping,
       i.metadata,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'domain', d.domain, 'verified_at', NULL) ORDER BY d.domain), '[]'::jsonb)
          FROM unnest(:domains::text[]) AS d (domain)) AS domains,
       i.created_at, i.updated_at
  FROM inserted AS i
UNION ALL
SELECT p.id, p.type, p.name, p.org_id, p.metadata_url, p.client_id, p.client_secret_ciphertext,
       p.client_secret_key_id, p.token_endpoint_auth_method, p.idp_entity_id, p.idp_sso_url,
       p.idp_slo_url, p.idp_certificate, p.sp_entity_id, p.sp_acs_url, p.sp_slo_url,
       p.signing_cert, p.signing_key_ciphertext, p.signing_key_key_id, p.encryption_enabled,
       p.force_authn, p.scopes, p.redirect_uris, p.claim_mapping, p.attribute_mapping,
       p.metadata,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain), '[]'::jsonb)
          FROM kitium_auth.sso_provider_domains AS d WHERE d.provider_id = p.id) AS domains,
       p.created_at, p.updated_at
  FROM kitium_auth.sso_providers AS p
 WHERE p.id = :id AND NOT EXISTS (SELECT 1 FROM inserted)
 LIMIT 1;

-- name: get_sso_provider(id)^
-- Fetch one provider with its domains.
SELECT p.id, p.type, p.name, p.org_id, p.metadata_url, p.client_id, p.client_secret_ciphertext,
       p.client_secret_key_id, p.token_endpoint_auth_method, p.idp_entity_id, p.idp_sso_url,
       p.idp_slo_url, p.idp_certificate, p.sp_entity_id, p.sp_acs_url, p.sp_slo_url,
       p.signing_cert, p.signing_key_ciphertext, p.signing_key_key_id, p.encryption_enabled,
       p.force_authn, p.scopes, p.redirect_uris, p.claim_mapping, p.attribute_mapping,
       p.metadata,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain), '[]'::jsonb)
          FROM kitium_auth.sso_provider_domains AS d WHERE d.provider_id = p.id) AS domains,
       p.created_at, p.updated_at
  FROM kitium_auth.sso_providers AS p
 WHERE p.id = :id;

-- name: get_sso_provider_by_domain(domain)^
-- Fetch the provider that has verified this email domain (served by the partial unique index
-- sso_provider_domains__domain_key, so there is at most one).
SELECT p.id, p.type, p.name, p.org_id, p.metadata_url, p.client_id, p.client_secret_ciphertext,
       p.client_secret_key_id, p.token_endpoint_auth_method, p.idp_entity_id, p.idp_sso_url,
       p.idp_slo_url, p.idp_certificate, p.sp_entity_id, p.sp_acs_url, p.sp_slo_url,
       p.signing_cert, p.signing_key_ciphertext, p.signing_key_key_id, p.encryption_enabled,
       p.force_authn, p.scopes, p.redirect_uris, p.claim_mapping, p.attribute_mapping,
       p.metadata,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain), '[]'::jsonb)
          FROM kitium_auth.sso_provider_domains AS d WHERE d.provider_id = p.id) AS domains,
       p.created_at, p.updated_at
  FROM kitium_auth.sso_provider_domains AS hit
  JOIN kitium_auth.sso_providers AS p ON p.id = hit.provider_id
 WHERE hit.domain = :domain AND hit.verified_at IS NOT NULL;

-- name: update_sso_provider(id, set_name, name, set_org_id, org_id, set_metadata_url, metadata_url, set_client_id, client_id, set_client_secret, client_secret_ciphertext, client_secret_key_id, set_token_endpoint_auth_method, token_endpoint_auth_method, set_idp_entity_id, idp_entity_id, set_idp_sso_url, idp_sso_url, set_idp_slo_url, idp_slo_url, set_idp_certificate, idp_certificate, set_sp_entity_id, sp_entity_id, set_sp_acs_url, sp_acs_url, set_sp_slo_url, sp_slo_url, set_signing_cert, signing_cert, set_signing_key, signing_key_ciphertext, signing_key_key_id, set_encryption_enabled, encryption_enabled, set_force_authn, force_authn, set_scopes, scopes, set_redirect_uris, redirect_uris, set_claim_mapping, claim_mapping, set_attribute_mapping, attribute_mapping, set_metadata, metadata, metadata_patch, set_domains, domains)^
-- Update the given columns of one provider and, when set_domains, replace its domain set (domains
-- kept keep their verified_at; the others are deleted or inserted unverified) with
-- replace_sso_provider_domains, after the UPDATE has locked the provider row (see migration
-- 0006: a concurrent replacement is then replaced, not merged). No row if the provider does not
-- exist.
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
-- The domains returned are read after the lock (sso_provider_domain_list, migration 0034), so
-- they include a domain added by the call this UPDATE waited for.
WITH updated AS (
  UPDATE kitium_auth.sso_providers AS p
     SET name = CASE WHEN :set_name THEN :name ELSE p.name END,
         org_id = CASE WHEN :set_org_id THEN :org_id ELSE p.org_id END,
         metadata_url = CASE WHEN :set_metadata_url THEN :metadata_url ELSE p.metadata_url END,
         client_id = CASE WHEN :set_client_id THEN :client_id ELSE p.client_id END,
         client_secret_ciphertext = CASE WHEN :set_client_secret
                                         THEN :client_secret_ciphertext
                                         ELSE p.client_secret_ciphertext END,
         client_secret_key_id = CASE WHEN :set_client_secret
                                     THEN :client_secret_key_id
                                     ELSE p.client_secret_key_id END,
         token_endpoint_auth_method = CASE WHEN :set_token_endpoint_auth_method
                                           THEN :token_endpoint_auth_method
                                           ELSE p.token_endpoint_auth_method END,
         idp_entity_id = CASE WHEN :set_idp_entity_id THEN :idp_entity_id ELSE p.idp_entity_id END,
         idp_sso_url = CASE WHEN :set_idp_sso_url THEN :idp_sso_url ELSE p.idp_sso_url END,
         idp_slo_url = CASE WHEN :set_idp_slo_url THEN :idp_slo_url ELSE p.idp_slo_url END,
         idp_certificate = CASE WHEN :set_idp_certificate
                                THEN :idp_certificate
                                ELSE p.idp_certificate END,
         sp_entity_id = CASE WHEN :set_sp_entity_id THEN :sp_entity_id ELSE p.sp_entity_id END,
         sp_acs_url = CASE WHEN :set_sp_acs_url THEN :sp_acs_url ELSE p.sp_acs_url END,
         sp_slo_url = CASE WHEN :set_sp_slo_url THEN :sp_slo_url ELSE p.sp_slo_url END,
         signing_cert = CASE WHEN :set_signing_cert THEN :signing_cert ELSE p.signing_cert END,
         signing_key_ciphertext = CASE WHEN :set_signing_key
                                       THEN :signing_key_ciphertext
                                       ELSE p.signing_key_ciphertext END,
         signing_key_key_id = CASE WHEN :set_signing_key
                                   THEN :signing_key_key_id
                                   ELSE p.signing_key_key_id END,
         encryption_enabled = CASE WHEN :set_encryption_enabled
                                   THEN :encryption_enabled
                                   ELSE p.encryption_enabled END,
         force_authn = CASE WHEN :set_force_authn THEN :force_authn ELSE p.force_authn END,
         scopes = CASE WHEN :set_scopes THEN :scopes ELSE p.scopes END,
         redirect_uris = CASE WHEN :set_redirect_uris THEN :redirect_uris ELSE p.redirect_uris END,
         claim_mapping = CASE WHEN :set_claim_mapping
                              THEN :claim_mapping::jsonb
                              ELSE p.claim_mapping END,
         attribute_mapping = CASE WHEN :set_attribute_mapping
                                  THEN :attribute_mapping::jsonb
                                  ELSE p.attribute_mapping END,
         metadata = CASE WHEN :set_metadata THEN :metadata::jsonb
                         ELSE kitium_auth.jsonb_merge_patch(p.metadata, :metadata_patch::jsonb) END
   WHERE p.id = :id
  RETURNING p.id, p.type, p.name, p.org_id, p.metadata_url, p.client_id,
            p.client_secret_ciphertext, p.client_secret_key_id, p.token_endpoint_auth_method,
            p.idp_entity_id, p.idp_sso_url, p.idp_slo_url, p.idp_certificate, p.sp_entity_id,
            p.sp_acs_url, p.sp_slo_url, p.signing_cert, p.signing_key_ciphertext,
            p.signing_key_key_id, p.encryption_enabled, p.force_authn, p.scopes,
            p.redirect_uris, p.claim_mapping, p.attribute_mapping, p.metadata, p.created_at,
            p.updated_at
)
SELECT u.id, u.type, u.name, u.org_id, u.metadata_url, u.client_id, u.client_secret_ciphertext,
       u.client_secret_key_id, u.token_endpoint_auth_method, u.idp_entity_id, u.idp_sso_url,
       u.idp_slo_url, u.idp_certificate, u.sp_entity_id, u.sp_acs_url, u.sp_slo_url,
       u.signing_cert, u.signing_key_ciphertext, u.signing_key_key_id, u.encryption_enabled,
       u.force_authn, u.scopes, u.redirect_uris, u.claim_mapping, u.attribute_mapping,
       u.metadata,
       CASE WHEN :set_domains
            THEN kitium_auth.replace_sso_provider_domains(u.id, :domains::text[])
            ELSE kitium_auth.sso_provider_domain_list(u.id)
       END AS domains,
       u.created_at, u.updated_at
  FROM updated AS u;

-- name: delete_sso_provider(id)!
-- Delete a provider; its domains, links and SSO sessions go with it (ON DELETE CASCADE).
DELETE FROM kitium_auth.sso_providers WHERE id = :id;

-- name: list_sso_providers()
-- Every provider, newest first.
SELECT p.id, p.type, p.name, p.org_id, p.metadata_url, p.client_id, p.client_secret_ciphertext,
       p.client_secret_key_id, p.token_endpoint_auth_method, p.idp_entity_id, p.idp_sso_url,
       p.idp_slo_url, p.idp_certificate, p.sp_entity_id, p.sp_acs_url, p.sp_slo_url,
       p.signing_cert, p.signing_key_ciphertext, p.signing_key_key_id, p.encryption_enabled,
       p.force_authn, p.scopes, p.redirect_uris, p.claim_mapping, p.attribute_mapping,
       p.metadata,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain), '[]'::jsonb)
          FROM kitium_auth.sso_provider_domains AS d WHERE d.provider_id = p.id) AS domains,
       p.created_at, p.updated_at
  FROM kitium_auth.sso_providers AS p
 ORDER BY p.created_at DESC, p.id DESC;

-- name: list_org_sso_providers(org_id)
-- The providers of one organization plus the global ones (no org_id), newest first (served by
-- sso_providers_org_id_idx).
SELECT p.id, p.type, p.name, p.org_id, p.metadata_url, p.client_id, p.client_secret_ciphertext,
       p.client_secret_key_id, p.token_endpoint_auth_method, p.idp_entity_id, p.idp_sso_url,
       p.idp_slo_url, p.idp_certificate, p.sp_entity_id, p.sp_acs_url, p.sp_slo_url,
       p.signing_cert, p.signing_key_ciphertext, p.signing_key_key_id, p.encryption_enabled,
       p.force_authn, p.scopes, p.redirect_uris, p.claim_mapping, p.attribute_mapping,
       p.metadata,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'domain', d.domain, 'verified_at', d.verified_at) ORDER BY d.domain), '[]'::jsonb)
          FROM kitium_auth.sso_provider_domains AS d WHERE d.provider_id = p.id) AS domains,
       p.created_at, p.updated_at
  FROM kitium_auth.sso_providers AS p
 WHERE p.org_id = :org_id OR p.org_id IS NULL
 ORDER BY p.created_at DESC, p.id DESC;

-- name: add_sso_provider_domain(provider_id, domain, verified)^
-- Add a domain to a provider, verified now when verified is true. Adding it again is a no-op
-- that never un-verifies (verifying it then sets verified_at if it was not set).
-- Adds to one provider run one after another: the row's provider_id is read from the provider's
-- row locked FOR NO KEY UPDATE, so the insert and its ON CONFLICT check come after the lock.
-- ON CONFLICT checks only its arbiter, the primary key (provider_id, domain): two verified adds
-- of one new domain that both found no row there both inserted, and the second failed on
-- sso_provider_domains__domain_key (a verified domain belongs to one provider) instead of
-- finding the first's row (found in review). Foreign-key checks take FOR KEY SHARE on the
-- provider and do not wait for the lock. A provider that does not exist, or that row-level
-- security does not let this caller update, is not locked: the insert goes ahead with the given
-- id, and the foreign key or the policy refuses it as before.
WITH locked AS (
  SELECT p.id FROM kitium_auth.sso_providers AS p WHERE p.id = :provider_id FOR NO KEY UPDATE
)
INSERT INTO kitium_auth.sso_provider_domains AS d (provider_id, domain, verified_at)
VALUES (coalesce((SELECT l.id FROM locked AS l), :provider_id), :domain,
        CASE WHEN :verified THEN statement_timestamp() END)
ON CONFLICT (provider_id, domain) DO UPDATE
   SET verified_at = coalesce(d.verified_at, EXCLUDED.verified_at)
RETURNING d.domain, d.verified_at;

-- name: verify_sso_provider_domain(provider_id, domain)^
-- Mark a provider's domain verified (keeping an earlier verified_at); no row if not added.
UPDATE kitium_auth.sso_provider_domains AS d
   SET verified_at = coalesce(d.verified_at, statement_timestamp())
 WHERE d.provider_id = :provider_id AND d.domain = :domain
RETURNING d.domain, d.verified_at;

-- name: remove_sso_provider_domain(provider_id, domain)!
-- Remove a domain from a provider.
DELETE FROM kitium_auth.sso_provider_domains
 WHERE provider_id = :provider_id AND domain = :domain;

-- name: create_sso_link(id, user_id, provider_id, provider_type, provider_subject, provider_email, auto_provisioned, metadata, last_auth_at)^
-- Insert an SSO link (last_auth_at defaults to now); a retry with the same id returns the
-- stored row.
WITH inserted AS (
  INSERT INTO kitium_auth.sso_links
    (id, user_id, provider_id, provider_type, provider_subject, provider_email,
     auto_provisioned, metadata, last_auth_at)
  VALUES
    (:id, :user_id, :provider_id, :provider_type, :provider_subject, :provider_email,
     :auto_provisioned, :metadata::jsonb, coalesce(:last_auth_at, statement_timestamp()))
  ON CONFLICT (id) DO NOTHING
  RETURNING id, user_id, provider_id, provider_type, provider_subject, provider_email,
            auto_provisioned, metadata, linked_at, last_auth_at
)
SELECT id, user_id, provider_id, provider_type, provider_subject, provider_email,
       auto_provisioned, metadata, linked_at, last_auth_at
  FROM inserted
UNION ALL
SELECT id, user_id, provider_id, provider_type, provider_subject, provider_email,
       auto_provisioned, metadata, linked_at, last_auth_at
  FROM kitium_auth.sso_links
 WHERE id = :id
 LIMIT 1;

-- name: get_sso_link(id)^
-- Fetch one SSO link by id.
SELECT id, user_id, provider_id, provider_type, provider_subject, provider_email,
       auto_provisioned, metadata, linked_at, last_auth_at
  FROM kitium_auth.sso_links
 WHERE id = :id;

-- name: get_sso_link_by_subject(provider_id, provider_subject)^
-- Fetch the SSO link of one identity at one provider, the user an assertion signs in
-- (sso_links__provider_subject_key).
SELECT id, user_id, provider_id, provider_type, provider_subject, provider_email,
       auto_provisioned, metadata, linked_at, last_auth_at
  FROM kitium_auth.sso_links
 WHERE provider_id = :provider_id AND provider_subject = :provider_subject;

-- name: get_user_sso_links(user_id)
-- A user's SSO links, newest first (served by sso_links_user_id_idx).
SELECT id, user_id, provider_id, provider_type, provider_subject, provider_email,
       auto_provisioned, metadata, linked_at, last_auth_at
  FROM kitium_auth.sso_links
 WHERE user_id = :user_id
 ORDER BY linked_at DESC, id DESC;

-- name: delete_sso_link(id)$
-- Delete one SSO link and, in the same statement, the SSO sessions of the identity it linked for
-- its user (same provider_id, provider_subject and user_id; served by
-- sso_sessions_provider_id_provider_subject_idx), so that an unlinked identity, which may then be
-- linked to another user, leaves no session naming the old one. Returns how many links it
-- deleted (0 or 1); sessions are deleted only along with the link this statement deletes.
WITH link AS (
  DELETE FROM kitium_auth.sso_links WHERE id = :id
  RETURNING provider_id, provider_subject, user_id
), ended AS (
  DELETE FROM kitium_auth.sso_sessions AS s
   USING link AS l
   WHERE s.provider_id = l.provider_id
     AND s.provider_subject = l.provider_subject
     AND s.user_id = l.user_id
)
SELECT count(*) FROM link;

-- name: create_sso_session(id, user_id, provider_id, provider_type, provider_subject, session_token_hash, expires_at, last_auth_at)^
-- Insert an SSO session (session_token_hash is the SHA-256 digest of the provider session token,
-- or NULL; last_auth_at defaults to now) and record the sign-in on the user's link of that
-- identity: its last_auth_at becomes the session's, capped at the statement's time (a
-- far-future value cannot pin it) and never moved back; a retry with the same id returns the
-- stored row and touches no link.
-- Lock order: the user's and the provider's rows (KEY SHARE, in parents), then the link row.
-- The INSERT's foreign-key checks take those KEY SHARE locks anyway, but only at the end of the
-- statement, after the link UPDATE: delete_user and delete_sso_provider lock the parent row
-- first and then delete the link by cascade, so that order would be a cycle (a deadlock). The
-- link UPDATE joins parents, so it reaches the link only after parents has locked both rows.
WITH inserted AS (
  INSERT INTO kitium_auth.sso_sessions
    (id, user_id, provider_id, provider_type, provider_subject, session_token_hash, expires_at,
     last_auth_at)
  VALUES
    (:id, :user_id, :provider_id, :provider_type, :provider_subject, :session_token_hash,
     :expires_at, coalesce(:last_auth_at, statement_timestamp()))
  ON CONFLICT (id) DO NOTHING
  RETURNING id, user_id, provider_id, provider_type, provider_subject, expires_at, linked_at,
            last_auth_at
),
parents AS (
  SELECT u.id AS user_id, p.id AS provider_id
    FROM kitium_auth.users AS u, kitium_auth.sso_providers AS p
   WHERE u.id = :user_id AND p.id = :provider_id
     FOR KEY SHARE
),
link AS (
  UPDATE kitium_auth.sso_links AS l
     SET last_auth_at = greatest(l.last_auth_at, least(i.last_auth_at, statement_timestamp()))
    FROM inserted AS i, parents AS k
   WHERE k.user_id = i.user_id
     AND k.provider_id = i.provider_id
     AND l.provider_id = i.provider_id
     AND l.provider_subject = i.provider_subject
     AND l.user_id = i.user_id
     AND l.last_auth_at IS DISTINCT FROM
         greatest(l.last_auth_at, least(i.last_auth_at, statement_timestamp()))
)
SELECT id, user_id, provider_id, provider_type, provider_subject, expires_at, linked_at,
       last_auth_at
  FROM inserted
UNION ALL
SELECT id, user_id, provider_id, provider_type, provider_subject, expires_at, linked_at,
       last_auth_at
  FROM kitium_auth.sso_sessions
 WHERE id = :id
 LIMIT 1;

-- name: get_sso_session(id)^
-- Fetch one unexpired SSO session by id.
SELECT id, user_id, provider_id, provider_type, provider_subject, expires_at, linked_at,
       last_auth_at
  FROM kitium_auth.sso_sessions
 WHERE id = :id AND expires_at > statement_timestamp();

-- name: delete_sso_session(id)!
-- Delete one SSO session, expired or not.
DELETE FROM kitium_auth.sso_sessions WHERE id = :id;

-- name: delete_sso_sessions_by_subject(provider_id, provider_subject, end_user_sessions)
-- Delete the SSO sessions of one identity at one provider, expired ones included, and return
-- them (single logout by SAML NameID or OIDC sub; sso_sessions_provider_id_provider_subject_idx);
-- when end_user_sessions, also delete the application sessions of their users
-- (sessions_user_id_created_at_id_idx) in the same statement, so a retry after a lost
-- acknowledgement, which finds no SSO session left, still leaves none of them: those bound to
-- the provider's organization and unbound ones; a shared provider (org_id NULL) ends them all.
-- A session bound to another organization stays, so one tenant's IdP cannot sign a user out of another tenant.
-- Lock order, with end_user_sessions: the provider's organization (SHARE, in org), the
-- users' rows (KEY SHARE, in parents), then their SSO sessions, then their sessions.
-- delete_user locks the user's row first, then deletes its sessions and SSO sessions by cascade
-- (in that order): without parents, a logout holding an SSO session and waiting for a session,
-- against a delete_user holding that session and waiting for the SSO session, would deadlock.
-- delete_organization locks the organization first, then by cascade deletes the sessions bound
-- to it (through its memberships) and only then its providers' SSO sessions: without org, a
-- logout holding an SSO session and waiting for one of those sessions, against a
-- delete_organization holding that session and waiting for the SSO session, deadlocked (found
-- in review). SHARE, not KEY SHARE: update_organization(members=...) locks the organization
-- (NO KEY UPDATE, as the other membership changes do) and then deletes the removed members'
-- sessions bound to it, user after user in its own order, which a logout deleting the same
-- sessions in another order deadlocked against (found in the second review); SHARE makes the
-- two wait for each other at the organization instead. It still does not conflict with
-- create_session's or assign_role_to_user's KEY SHARE, nor with another logout's SHARE. The
-- DELETE filters on parents, which reads org first, so it reaches no SSO session before both
-- have locked. A shared provider's logout ends its users' sessions in every organization, so
-- it locks the organizations those sessions are bound to (in id order, so two such logouts
-- wait rather than deadlock): with no organization to lock, it deleted them against a member's
-- removal deleting them in another order, a deadlock (found in the third review).
WITH org AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE :end_user_sessions
     AND o.id IN (SELECT p.org_id FROM kitium_auth.sso_providers AS p WHERE p.id = :provider_id
                  UNION
                  SELECT a.org_id
                    FROM kitium_auth.sso_providers AS p
                    JOIN kitium_auth.sso_sessions AS t ON t.provider_id = p.id
                    JOIN kitium_auth.sessions AS a ON a.user_id = t.user_id
                   WHERE p.id = :provider_id AND p.org_id IS NULL
                     AND t.provider_subject = :provider_subject)
   ORDER BY o.id
     FOR SHARE OF o
), parents AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE :end_user_sessions
     AND (SELECT count(*) FROM org) >= 0  -- always true: org is locked before any user
     AND u.id IN (SELECT t.user_id
                    FROM kitium_auth.sso_sessions AS t
                   WHERE t.provider_id = :provider_id
                     AND t.provider_subject = :provider_subject)
     FOR KEY SHARE OF u
), ended AS (
  DELETE FROM kitium_auth.sso_sessions AS s
   WHERE s.provider_id = :provider_id AND s.provider_subject = :provider_subject
     AND (NOT :end_user_sessions OR s.user_id IN (SELECT k.id FROM parents AS k))
  RETURNING s.id, s.user_id, s.provider_id, s.provider_type, s.provider_subject, s.expires_at,
            s.linked_at, s.last_auth_at
), signed_out AS (
  DELETE FROM kitium_auth.sessions AS a
   WHERE :end_user_sessions AND a.user_id IN (SELECT e.user_id FROM ended AS e)
     AND (a.org_id IS NULL
          OR NOT EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p
                          WHERE p.id = :provider_id AND p.org_id <> a.org_id))
)
SELECT id, user_id, provider_id, provider_type, provider_subject, expires_at, linked_at,
       last_auth_at
  FROM ended;

-- name: delete_sso_sessions_by_token(provider_id, session_token_hash, provider_subject, end_user_sessions)
-- Delete the SSO sessions of one provider with this session token digest (SAML SessionIndex,
-- OIDC sid), expired ones included, and when provider_subject is not NULL only those of that
-- identity; return them. When end_user_sessions, also delete the application sessions of their
-- users that delete_sso_sessions_by_subject would (not those bound to another organization than
-- the provider's), with its lock order (its comment says why). A query
-- of its own rather than optional conditions in the subject one: the index
-- sso_sessions_provider_id_session_token_hash_idx (partial, on non-NULL digests) serves it in a
-- generic plan too, where an optional condition on the digest could not.
WITH org AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE :end_user_sessions
     AND o.id IN (SELECT p.org_id FROM kitium_auth.sso_providers AS p WHERE p.id = :provider_id
                  UNION
                  SELECT a.org_id
                    FROM kitium_auth.sso_providers AS p
                    JOIN kitium_auth.sso_sessions AS t ON t.provider_id = p.id
                    JOIN kitium_auth.sessions AS a ON a.user_id = t.user_id
                   WHERE p.id = :provider_id AND p.org_id IS NULL
                     AND t.session_token_hash = :session_token_hash
                     AND (:provider_subject::text IS NULL
                          OR t.provider_subject = :provider_subject))
   ORDER BY o.id
     FOR SHARE OF o
), parents AS (
  SELECT u.id
    FROM kitium_auth.users AS u
   WHERE :end_user_sessions
     AND (SELECT count(*) FROM org) >= 0  -- always true: org is locked before any user
     AND u.id IN (SELECT t.user_id
                    FROM kitium_auth.sso_sessions AS t
                   WHERE t.provider_id = :provider_id
                     AND t.session_token_hash = :session_token_hash
                     AND (:provider_subject::text IS NULL
                          OR t.provider_subject = :provider_subject))
     FOR KEY SHARE OF u
), ended AS (
  DELETE FROM kitium_auth.sso_sessions AS s
   WHERE s.provider_id = :provider_id
     AND s.session_token_hash = :session_token_hash
     AND (:provider_subject::text IS NULL OR s.provider_subject = :provider_subject)
     AND (NOT :end_user_sessions OR s.user_id IN (SELECT k.id FROM parents AS k))
  RETURNING s.id, s.user_id, s.provider_id, s.provider_type, s.provider_subject, s.expires_at,
            s.linked_at, s.last_auth_at
), signed_out AS (
  DELETE FROM kitium_auth.sessions AS a
   WHERE :end_user_sessions AND a.user_id IN (SELECT e.user_id FROM ended AS e)
     AND (a.org_id IS NULL
          OR NOT EXISTS (SELECT 1 FROM kitium_auth.sso_providers AS p
                          WHERE p.id = :provider_id AND p.org_id <> a.org_id))
)
SELECT id, user_id, provider_id, provider_type, provider_subject, expires_at, linked_at,
       last_auth_at
  FROM ended;

-- name: delete_user_sso_sessions(user_id)!
-- Delete every SSO session of a user, expired ones included (sso_sessions_user_id_idx).
DELETE FROM kitium_auth.sso_sessions WHERE user_id = :user_id;

-- name: sso_sessions_hidden_by_row_security()$
-- Whether row-level security keeps SSO sessions from the current role's purge: it is active on
-- sso_sessions, and either no permissive policy for every command with USING (true) applies to
-- the role (tenant_rls's owner_access) or a restrictive policy with another condition does on
-- reads, updates (the purge's SELECT ... FOR UPDATE meets those) or deletes; judged as keys.sql's
-- secrets_hidden_by_row_security, but a delete has no WITH CHECK to pass.
WITH applying AS (
  SELECT p.polcmd, p.polpermissive,
         coalesce(pg_get_expr(p.polqual, p.polrelid), 'true') = 'true' AS sees_all
    FROM pg_catalog.pg_policy AS p
   WHERE p.polrelid = 'kitium_auth.sso_sessions'::regclass
     AND (0 = ANY (p.polroles)
          OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS r (oid)
                      WHERE r.oid <> 0 AND pg_has_role(r.oid, 'USAGE')))
)
SELECT row_security_active('kitium_auth.sso_sessions'::regclass)
       AND (NOT EXISTS (SELECT 1 FROM applying AS a
                         WHERE a.polcmd = '*' AND a.polpermissive AND a.sees_all)
            OR EXISTS (SELECT 1 FROM applying AS a
                        WHERE a.polcmd IN ('*', 'r', 'w', 'd') AND NOT a.polpermissive
                          AND NOT a.sees_all));

-- name: delete_expired_sso_sessions(after, after_id, batch_size)^
-- Delete at most batch_size expired SSO sessions, earliest expiry first
-- (sso_sessions_expires_at_id_idx, migration 0044) from the key (after, after_id) on, and
-- return how many it deleted, how many it locked and the key it reached; rows another
-- transaction has locked (another
-- cleaner, a logout under way) are skipped and left for the next run. Built as
-- delete_expired_sessions, whose comment says why (each batch's scan starts where the last one
-- stopped; batch by physical address; a row updated after the statement began is locked, not
-- deleted, and the caller goes on).
WITH batch AS (
  SELECT ctid, expires_at, id
    FROM kitium_auth.sso_sessions
   WHERE expires_at <= statement_timestamp()
     AND (expires_at, id) >= (coalesce(CAST(:after AS timestamp) AT TIME ZONE 'UTC', '-infinity'),
                              coalesce(CAST(:after_id AS uuid),
                                       '00000000-0000-0000-0000-000000000000'))
   ORDER BY expires_at, id
   LIMIT :batch_size
     FOR UPDATE SKIP LOCKED
), deleted AS (
  DELETE FROM kitium_auth.sso_sessions
   WHERE ctid = ANY (ARRAY(SELECT ctid FROM batch))
  RETURNING 1
), reached AS (
  SELECT expires_at, id FROM batch ORDER BY expires_at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM batch) AS locked,
       (SELECT (expires_at AT TIME ZONE 'UTC')::text FROM reached) AS last,
       (SELECT id FROM reached) AS last_id;

-- RBAC (roles, user_roles), SSO (providers, verified domains, links, sessions), 2FA (devices,
-- backup codes, challenges), and bearer-token digests on sessions and OAuth token ciphertexts.
--
-- Secrets: reversible ones (2FA secrets, SSO client secrets and signing keys, OAuth provider
-- tokens) are stored only as AES-256-GCM ciphertext (<name>_ciphertext bytea) beside the id of
-- the key that made it (<name>_key_id); one-time codes, backup codes and bearer tokens only as
-- digests (code_hash, token_hash). No column holds a secret in plaintext.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

-- Bearer session tokens: only the SHA-256 digest of the token's secret part.
-- (The CHECKs ride on the new, all-NULL columns: nothing to validate, no long lock.)
ALTER TABLE kitium_auth.sessions
  ADD COLUMN token_hash bytea
    CONSTRAINT sessions__token_hash_check CHECK (octet_length(token_hash) = 32);

-- OAuth provider tokens, encrypted.
ALTER TABLE kitium_auth.oauth_accounts
  ADD COLUMN access_token_ciphertext bytea,
  ADD COLUMN refresh_token_ciphertext bytea,
  ADD COLUMN tokens_key_id text
    CONSTRAINT oauth_accounts__tokens_key_id_check
      CHECK ((access_token_ciphertext IS NULL AND refresh_token_ciphertext IS NULL)
             OR tokens_key_id IS NOT NULL),
  ADD COLUMN token_expires_at timestamptz;

CREATE TABLE kitium_auth.roles (
  id          uuid PRIMARY KEY,
  org_id      uuid NOT NULL,
  name        text NOT NULL,
  description text,
  is_system   boolean NOT NULL DEFAULT false,
  permissions jsonb NOT NULL DEFAULT '[]',
  metadata    jsonb NOT NULL DEFAULT '{}',
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT roles__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE,
  CONSTRAINT roles__name_key UNIQUE (org_id, name),
  -- Lets user_roles check that a role is assigned within its own organization.
  CONSTRAINT roles__id_org_id_key UNIQUE (id, org_id),
  CONSTRAINT roles__name_check CHECK (char_length(name) BETWEEN 1 AND 255),
  CONSTRAINT roles__description_check CHECK (char_length(description) <= 8192),
  CONSTRAINT roles__permissions_check CHECK (jsonb_typeof(permissions) = 'array'),
  CONSTRAINT roles__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE TRIGGER roles_set_updated_at BEFORE UPDATE ON kitium_auth.roles
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

CREATE TABLE kitium_auth.user_roles (
  id          uuid PRIMARY KEY,
  user_id     uuid NOT NULL,
  role_id     uuid NOT NULL,
  org_id      uuid NOT NULL,
  assigned_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT user_roles__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT user_roles__role_id_fkey FOREIGN KEY (role_id, org_id)
    REFERENCES kitium_auth.roles (id, org_id) ON DELETE CASCADE,
  CONSTRAINT user_roles__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE,
  CONSTRAINT user_roles__role_key UNIQUE (user_id, org_id, role_id)
);
CREATE INDEX user_roles_role_id_idx ON kitium_auth.user_roles (role_id);
CREATE INDEX user_roles_org_id_idx ON kitium_auth.user_roles (org_id);

CREATE TABLE kitium_auth.sso_providers (
  id                          uuid PRIMARY KEY,
  type                        text NOT NULL,
  name                        text NOT NULL,
  org_id                      uuid,
  metadata_url                text,
  client_id                   text,
  client_secret_ciphertext    bytea,
  client_secret_key_id        text,
  token_endpoint_auth_method  text,
  idp_entity_id               text,
  idp_sso_url                 text,
  idp_slo_url                 text,
  idp_certificate             text,
  sp_entity_id                text,
  sp_acs_url                  text,
  sp_slo_url                  text,
  signing_cert                text,
  signing_key_ciphertext      bytea,
  signing_key_key_id          text,
  encryption_enabled          boolean NOT NULL DEFAULT false,
  force_authn                 boolean NOT NULL DEFAULT false,
  scopes                      text[] NOT NULL DEFAULT '{}',
  redirect_uris               text[] NOT NULL DEFAULT '{}',
  claim_mapping               jsonb NOT NULL DEFAULT '{}',
  attribute_mapping           jsonb NOT NULL DEFAULT '{}',
  metadata                    jsonb NOT NULL DEFAULT '{}',
  created_at                  timestamptz NOT NULL DEFAULT now(),
  updated_at                  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT sso_providers__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE SET NULL,
  CONSTRAINT sso_providers__type_check CHECK (type IN ('saml', 'oidc')),
  CONSTRAINT sso_providers__name_check CHECK (char_length(name) BETWEEN 1 AND 255),
  CONSTRAINT sso_providers__client_secret_check
    CHECK ((client_secret_ciphertext IS NULL) = (client_secret_key_id IS NULL)),
  CONSTRAINT sso_providers__signing_key_check
    CHECK ((signing_key_ciphertext IS NULL) = (signing_key_key_id IS NULL)),
  CONSTRAINT sso_providers__claim_mapping_check CHECK (jsonb_typeof(claim_mapping) = 'object'),
  CONSTRAINT sso_providers__attribute_mapping_check
    CHECK (jsonb_typeof(attribute_mapping) = 'object'),
  CONSTRAINT sso_providers__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX sso_providers_org_id_idx ON kitium_auth.sso_providers (org_id);
CREATE TRIGGER sso_providers_set_updated_at BEFORE UPDATE ON kitium_auth.sso_providers
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

-- Email domains a provider serves; a verified domain belongs to one provider only, which is
-- what makes home-realm discovery (get_sso_provider_by_domain) unambiguous.
CREATE TABLE kitium_auth.sso_provider_domains (
  provider_id uuid NOT NULL,
  domain      text NOT NULL,
  verified_at timestamptz,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT sso_provider_domains_pkey PRIMARY KEY (provider_id, domain),
  CONSTRAINT sso_provider_domains__provider_id_fkey FOREIGN KEY (provider_id)
    REFERENCES kitium_auth.sso_providers (id) ON DELETE CASCADE,
  CONSTRAINT sso_provider_domains__domain_check
    CHECK (domain = lower(domain) AND domain ~ '^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$')
);
CREATE UNIQUE INDEX sso_provider_domains__domain_key
  ON kitium_auth.sso_provider_domains (domain) WHERE verified_at IS NOT NULL;

CREATE TABLE kitium_auth.sso_links (
  id               uuid PRIMARY KEY,
  user_id          uuid NOT NULL,
  provider_id      uuid NOT NULL,
  provider_type    text NOT NULL,
  provider_subject text NOT NULL,
  provider_email   text,
  auto_provisioned boolean NOT NULL DEFAULT false,
  metadata         jsonb NOT NULL DEFAULT '{}',
  linked_at        timestamptz NOT NULL DEFAULT now(),
  last_auth_at     timestamptz,
  CONSTRAINT sso_links__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT sso_links__provider_id_fkey FOREIGN KEY (provider_id)
    REFERENCES kitium_auth.sso_providers (id) ON DELETE CASCADE,
  CONSTRAINT sso_links__provider_subject_key UNIQUE (provider_id, provider_subject),
  CONSTRAINT sso_links__provider_type_check CHECK (provider_type IN ('saml', 'oidc')),
  CONSTRAINT sso_links__provider_subject_check
    CHECK (char_length(provider_subject) BETWEEN 1 AND 1024),
  CONSTRAINT sso_links__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX sso_links_user_id_idx ON kitium_auth.sso_links (user_id);

CREATE TABLE kitium_auth.sso_sessions (
  id                 uuid PRIMARY KEY,
  user_id            uuid NOT NULL,
  provider_id        uuid NOT NULL,
  provider_type      text NOT NULL,
  provider_subject   text NOT NULL,
  session_token_hash bytea,
  expires_at         timestamptz NOT NULL,
  linked_at          timestamptz NOT NULL DEFAULT now(),
  last_auth_at       timestamptz,
  CONSTRAINT sso_sessions__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT sso_sessions__provider_id_fkey FOREIGN KEY (provider_id)
    REFERENCES kitium_auth.sso_providers (id) ON DELETE CASCADE,
  CONSTRAINT sso_sessions__provider_type_check CHECK (provider_type IN ('saml', 'oidc')),
  CONSTRAINT sso_sessions__session_token_hash_check CHECK (octet_length(session_token_hash) = 32)
);
CREATE INDEX sso_sessions_user_id_idx ON kitium_auth.sso_sessions (user_id);
CREATE INDEX sso_sessions_provider_id_idx ON kitium_auth.sso_sessions (provider_id);

CREATE TABLE kitium_auth.twofa_devices (
  id                uuid PRIMARY KEY,
  user_id           uuid NOT NULL,
  method            text NOT NULL,
  name              text,
  verified          boolean NOT NULL DEFAULT false,
  phone_number      text,
  secret_ciphertext bytea,
  secret_key_id     text,
  last_used_at      timestamptz,
  -- TOTP replay guard: the newest time step accepted (RFC 6238 section 5.2).
  last_totp_step    bigint,
  metadata          jsonb NOT NULL DEFAULT '{}',
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT twofa_devices__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT twofa_devices__method_check CHECK (method IN ('totp', 'sms', 'email')),
  CONSTRAINT twofa_devices__name_check CHECK (char_length(name) <= 255),
  CONSTRAINT twofa_devices__phone_number_check CHECK (char_length(phone_number) <= 32),
  CONSTRAINT twofa_devices__secret_check
    CHECK ((secret_ciphertext IS NULL) = (secret_key_id IS NULL)),
  CONSTRAINT twofa_devices__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX twofa_devices_user_id_idx ON kitium_auth.twofa_devices (user_id);
CREATE TRIGGER twofa_devices_set_updated_at BEFORE UPDATE ON kitium_auth.twofa_devices
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

CREATE TABLE kitium_auth.twofa_backup_codes (
  id          uuid PRIMARY KEY,
  user_id     uuid NOT NULL,
  code_hash   text NOT NULL,
  used_at     timestamptz,
  consumed_by uuid,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT twofa_backup_codes__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT twofa_backup_codes__code_hash_key UNIQUE (user_id, code_hash),
  CONSTRAINT twofa_backup_codes__code_hash_check CHECK (char_length(code_hash) BETWEEN 16 AND 512)
);

-- Replaces a user's backup codes atomically even when two replacements race. A single
-- DELETE+INSERT statement cannot: its snapshot predates the other call's insert, so both new sets
-- would survive. This function locks the user row first and, being VOLATILE under READ
-- COMMITTED, runs its DELETE with a snapshot taken after the lock, so exactly one set survives.
CREATE FUNCTION kitium_auth.replace_backup_codes(p_user_id uuid, p_ids uuid[], p_code_hashes text[])
RETURNS SETOF kitium_auth.twofa_backup_codes
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM 1 FROM kitium_auth.users WHERE id = p_user_id FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE foreign_key_violation
      USING MESSAGE = 'no such user', CONSTRAINT = 'twofa_backup_codes__user_id_fkey';
  END IF;
  DELETE FROM kitium_auth.twofa_backup_codes WHERE user_id = p_user_id;
  RETURN QUERY
    INSERT INTO kitium_auth.twofa_backup_codes (id, user_id, code_hash)
    SELECT given.id, p_user_id, given.code_hash
      FROM unnest(p_ids, p_code_hashes) AS given (id, code_hash)
    RETURNING id, user_id, code_hash, used_at, consumed_by, created_at;
END;
$$;

CREATE TABLE kitium_auth.twofa_sessions (
  id            uuid PRIMARY KEY,
  user_id       uuid NOT NULL,
  session_id    uuid NOT NULL,
  device_id     uuid NOT NULL,
  method        text NOT NULL,
  code_hash     text,
  attempt_count integer NOT NULL DEFAULT 0,
  max_attempts  integer NOT NULL DEFAULT 5,
  expires_at    timestamptz NOT NULL,
  completed_at  timestamptz,
  consumed_by   uuid,
  created_at    timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT twofa_sessions__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT twofa_sessions__device_id_fkey FOREIGN KEY (device_id)
    REFERENCES kitium_auth.twofa_devices (id) ON DELETE CASCADE,
  CONSTRAINT twofa_sessions__method_check CHECK (method IN ('totp', 'sms', 'email', 'backup_code')),
  CONSTRAINT twofa_sessions__code_hash_check CHECK (char_length(code_hash) BETWEEN 16 AND 512),
  CONSTRAINT twofa_sessions__attempt_count_check
    CHECK (attempt_count >= 0 AND attempt_count <= max_attempts),
  CONSTRAINT twofa_sessions__max_attempts_check CHECK (max_attempts BETWEEN 1 AND 100)
);
CREATE INDEX twofa_sessions_user_id_idx ON kitium_auth.twofa_sessions (user_id);
CREATE INDEX twofa_sessions_session_id_idx ON kitium_auth.twofa_sessions (session_id);
CREATE INDEX twofa_sessions_device_id_idx ON kitium_auth.twofa_sessions (device_id);

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP TABLE kitium_auth.twofa_sessions;
DROP FUNCTION kitium_auth.replace_backup_codes(uuid, uuid[], text[]);
DROP TABLE kitium_auth.twofa_backup_codes;
DROP TABLE kitium_auth.twofa_devices;
DROP TABLE kitium_auth.sso_sessions;
DROP TABLE kitium_auth.sso_links;
DROP TABLE kitium_auth.sso_provider_domains;
DROP TABLE kitium_auth.sso_providers;
DROP TABLE kitium_auth.user_roles;
DROP TABLE kitium_auth.roles;
ALTER TABLE kitium_auth.oauth_accounts
  DROP CONSTRAINT oauth_accounts__tokens_key_id_check,
  DROP COLUMN token_expires_at,
  DROP COLUMN tokens_key_id,
  DROP COLUMN refresh_token_ciphertext,
  DROP COLUMN access_token_ciphertext;
ALTER TABLE kitium_auth.sessions
  DROP CONSTRAINT sessions__token_hash_check,
  DROP COLUMN token_hash;

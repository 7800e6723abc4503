-- Core auth tables: users and their OAuth links, sessions, API keys, organizations and members,
-- email verification tokens, audit events.
--
-- Conventions (all migrations):
--   * every object lives in the schema kitium_auth (rewritten when the adapter is configured with
--     another schema); nothing relies on search_path;
--   * ids are UUIDs the adapter generates before the insert (UUIDv7: time-ordered, so a retried
--     insert recognises its own row);
--   * every instant is timestamptz;
--   * constraint names are <table>__<column>_<kind>, so errors can name the caller's field;
--   * secrets are never stored: only digests (code_hash, hash) or, later, ciphertext.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

CREATE SCHEMA IF NOT EXISTS kitium_auth;

CREATE FUNCTION kitium_auth.set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at = now();
  RETURN NEW;
END;
$$;

CREATE TABLE kitium_auth.users (
  id            uuid PRIMARY KEY,
  email         text,
  name          text,
  picture       text,
  plan          text NOT NULL DEFAULT 'free',
  entitlements  text[] NOT NULL DEFAULT '{}',
  metadata      jsonb NOT NULL DEFAULT '{}',
  password_hash text,
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT users__email_check CHECK (char_length(email) BETWEEN 3 AND 320),
  CONSTRAINT users__name_check CHECK (char_length(name) <= 255),
  CONSTRAINT users__picture_check CHECK (char_length(picture) <= 2048),
  CONSTRAINT users__plan_check CHECK (char_length(plan) BETWEEN 1 AND 255),
  CONSTRAINT users__password_hash_check CHECK (char_length(password_hash) BETWEEN 1 AND 512),
  CONSTRAINT users__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
-- Emails are unique regardless of case; the same expression serves get_user_by_email.
CREATE UNIQUE INDEX users__email_key ON kitium_auth.users (lower(email));
CREATE TRIGGER users_set_updated_at BEFORE UPDATE ON kitium_auth.users
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

CREATE TABLE kitium_auth.oauth_accounts (
  id         uuid PRIMARY KEY,
  user_id    uuid NOT NULL,
  provider   text NOT NULL,
  subject    text NOT NULL,
  email      text,
  name       text,
  linked_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT oauth_accounts__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT oauth_accounts__sub_key UNIQUE (provider, subject),
  CONSTRAINT oauth_accounts__provider_key UNIQUE (user_id, provider),
  CONSTRAINT oauth_accounts__provider_check CHECK (char_length(provider) BETWEEN 1 AND 255),
  CONSTRAINT oauth_accounts__sub_check CHECK (char_length(subject) BETWEEN 1 AND 255),
  CONSTRAINT oauth_accounts__email_check CHECK (char_length(email) <= 320),
  CONSTRAINT oauth_accounts__name_check CHECK (char_length(name) <= 255)
);

CREATE TABLE kitium_auth.organizations (
  id         uuid PRIMARY KEY,
  name       text NOT NULL,
  plan       text NOT NULL,
  seats      integer NOT NULL DEFAULT 1,
  metadata   jsonb NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT organizations__name_check CHECK (char_length(name) BETWEEN 1 AND 255),
  CONSTRAINT organizations__plan_check CHECK (char_length(plan) BETWEEN 1 AND 255),
  CONSTRAINT organizations__seats_check CHECK (seats >= 0),
  CONSTRAINT organizations__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE TRIGGER organizations_set_updated_at BEFORE UPDATE ON kitium_auth.organizations
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

-- Members in their own table (the reference kept a JSON array): one row per (org, user).
CREATE TABLE kitium_auth.organization_members (
  org_id    uuid NOT NULL,
  user_id   uuid NOT NULL,
  role      text NOT NULL DEFAULT 'member',
  joined_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT organization_members_pkey PRIMARY KEY (org_id, user_id),
  CONSTRAINT organization_members__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE CASCADE,
  CONSTRAINT organization_members__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT organization_members__role_check CHECK (role ~ '^[a-z0-9_.:-]{1,64}$')
);
CREATE INDEX organization_members_user_id_idx ON kitium_auth.organization_members (user_id);

CREATE TABLE kitium_auth.sessions (
  id           uuid PRIMARY KEY,
  user_id      uuid NOT NULL,
  org_id       uuid,
  plan         text,
  entitlements text[] NOT NULL DEFAULT '{}',
  metadata     jsonb NOT NULL DEFAULT '{}',
  expires_at   timestamptz NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT sessions__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT sessions__org_id_fkey FOREIGN KEY (org_id)
    REFERENCES kitium_auth.organizations (id) ON DELETE SET NULL,
  CONSTRAINT sessions__plan_check CHECK (char_length(plan) <= 255),
  CONSTRAINT sessions__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX sessions_user_id_idx ON kitium_auth.sessions (user_id);
CREATE INDEX sessions_org_id_idx ON kitium_auth.sessions (org_id);
CREATE INDEX sessions_expires_at_idx ON kitium_auth.sessions (expires_at);
CREATE TRIGGER sessions_set_updated_at BEFORE UPDATE ON kitium_auth.sessions
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

CREATE TABLE kitium_auth.api_keys (
  id           uuid PRIMARY KEY,
  principal_id uuid NOT NULL,
  hash         text NOT NULL,
  prefix       text NOT NULL,
  last_four    text NOT NULL,
  scopes       text[] NOT NULL DEFAULT '{}',
  metadata     jsonb NOT NULL DEFAULT '{}',
  expires_at   timestamptz,
  last_used_at timestamptz,
  created_at   timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT api_keys__principal_id_fkey FOREIGN KEY (principal_id)
    REFERENCES kitium_auth.users (id) ON DELETE CASCADE,
  CONSTRAINT api_keys__hash_key UNIQUE (hash),
  CONSTRAINT api_keys__hash_check CHECK (char_length(hash) BETWEEN 16 AND 512),
  CONSTRAINT api_keys__prefix_check CHECK (char_length(prefix) BETWEEN 1 AND 64),
  CONSTRAINT api_keys__last_four_check CHECK (char_length(last_four) = 4),
  CONSTRAINT api_keys__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX api_keys_principal_id_idx ON kitium_auth.api_keys (principal_id);
CREATE INDEX api_keys_prefix_last_four_idx ON kitium_auth.api_keys (prefix, last_four);
CREATE TRIGGER api_keys_set_updated_at BEFORE UPDATE ON kitium_auth.api_keys
  FOR EACH ROW EXECUTE FUNCTION kitium_auth.set_updated_at();

-- Only code_hash is stored: the plaintext code exists in the email and nowhere else.
-- consumed_by records which call consumed the token, so a retried consume recognises its win.
CREATE TABLE kitium_auth.email_verification_tokens (
  id          uuid PRIMARY KEY,
  email       text NOT NULL,
  code_hash   text NOT NULL,
  type        text NOT NULL,
  user_id     uuid,
  metadata    jsonb NOT NULL DEFAULT '{}',
  expires_at  timestamptz NOT NULL,
  used_at     timestamptz,
  consumed_by uuid,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT email_verification_tokens__user_id_fkey FOREIGN KEY (user_id)
    REFERENCES kitium_auth.users (id) ON DELETE SET NULL,
  CONSTRAINT email_verification_tokens__email_check CHECK (char_length(email) BETWEEN 3 AND 320),
  CONSTRAINT email_verification_tokens__code_hash_check
    CHECK (char_length(code_hash) BETWEEN 16 AND 512),
  CONSTRAINT email_verification_tokens__type_check CHECK (type ~ '^[a-z0-9_.:-]{1,64}$'),
  CONSTRAINT email_verification_tokens__metadata_check CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX email_verification_tokens_email_idx
  ON kitium_auth.email_verification_tokens (lower(email), type, created_at DESC);
CREATE INDEX email_verification_tokens_expires_at_idx
  ON kitium_auth.email_verification_tokens (expires_at);
CREATE INDEX email_verification_tokens_user_id_idx
  ON kitium_auth.email_verification_tokens (user_id);

CREATE TABLE kitium_auth.email_verification_token_attempts (
  token_id        uuid PRIMARY KEY,
  attempts        integer NOT NULL DEFAULT 0,
  last_attempt_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT email_verification_token_attempts__token_id_fkey FOREIGN KEY (token_id)
    REFERENCES kitium_auth.email_verification_tokens (id) ON DELETE CASCADE,
  CONSTRAINT email_verification_token_attempts__attempts_check CHECK (attempts >= 0)
);

-- Audit events are append-only; principal_id and org_id are text and not foreign keys so the
-- trail outlives the users and organizations it mentions.
CREATE TABLE kitium_auth.auth_events (
  id           uuid PRIMARY KEY,
  type         text NOT NULL,
  principal_id text NOT NULL,
  org_id       text,
  data         jsonb NOT NULL DEFAULT '{}',
  "timestamp"  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT auth_events__type_check CHECK (char_length(type) BETWEEN 1 AND 255),
  CONSTRAINT auth_events__principal_id_check CHECK (char_length(principal_id) BETWEEN 1 AND 255),
  CONSTRAINT auth_events__org_id_check CHECK (char_length(org_id) <= 255)
);
CREATE INDEX auth_events_timestamp_idx ON kitium_auth.auth_events ("timestamp" DESC, id DESC);
CREATE INDEX auth_events_principal_idx
  ON kitium_auth.auth_events (principal_id, "timestamp" DESC, id DESC);
CREATE INDEX auth_events_org_idx
  ON kitium_auth.auth_events (org_id, "timestamp" DESC, id DESC) WHERE org_id IS NOT NULL;

-- migrate:down

SET LOCAL lock_timeout = '5s';

DROP TABLE kitium_auth.auth_events;
DROP TABLE kitium_auth.email_verification_token_attempts;
DROP TABLE kitium_auth.email_verification_tokens;
DROP TABLE kitium_auth.api_keys;
DROP TABLE kitium_auth.sessions;
DROP TABLE kitium_auth.organization_members;
DROP TABLE kitium_auth.organizations;
DROP TABLE kitium_auth.oauth_accounts;
DROP TABLE kitium_auth.users;
DROP FUNCTION kitium_auth.set_updated_at();

-- The bearer token a session's rotation replaced, so that presenting it again is recognised.
--
-- rotate_session_token used to forget the digest it replaced: the old token then looked like
-- any wrong one. When a rotated-out token comes back after the rotation, two parties held the
-- session's token and one of them is not the user (token theft, or a session fixation that the
-- rotation defeated). Rotating refresh credentials with reuse detection is the OAuth security
-- best practice's answer (RFC 9700, 4.14.2); Supabase Auth ends the whole session then. The
-- adapter now keeps the digest replaced last (only that one: docs/security.md says what this
-- does not catch) and the time of that rotation; the rotation query ends the session when that
-- token is presented after a grace period (a client that lost the answer to its own rotation
-- retries within it) and records an auth event.
--
-- Nullable columns without a default: PostgreSQL adds them to the catalog only, no table
-- rewrite. The checks (a digest is 32 bytes; a replaced digest and its rotation time come
-- together) are added NOT VALID: checking the existing rows, all NULL in the new columns, would
-- scan sessions under this migration's lock. 0029 validates them.
-- Locks: ACCESS EXCLUSIVE on sessions for that moment (lock_timeout bounds the wait).

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.sessions
  ADD COLUMN previous_token_hash bytea,
  ADD COLUMN token_rotated_at timestamptz;
ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__previous_token_hash_check
    CHECK (octet_length(previous_token_hash) = 32) NOT VALID,
  ADD CONSTRAINT sessions__token_rotated_at_check
    CHECK ((previous_token_hash IS NULL) = (token_rotated_at IS NULL)) NOT VALID;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Drops both checks with them.
ALTER TABLE kitium_auth.sessions
  DROP COLUMN previous_token_hash,
  DROP COLUMN token_rotated_at;

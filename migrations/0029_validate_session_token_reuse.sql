-- Validates the two checks 0028 added NOT VALID on sessions (a replaced digest is 32 bytes and
-- comes with its rotation time). In a transaction of its own, VALIDATE CONSTRAINT takes only
-- SHARE UPDATE EXCLUSIVE on sessions: reads and writes go on while the existing rows are checked.

-- migrate:up

-- Give up quickly rather than queue behind (and block) live traffic; migrate again later.
SET LOCAL lock_timeout = '5s';

ALTER TABLE kitium_auth.sessions VALIDATE CONSTRAINT sessions__previous_token_hash_check;
ALTER TABLE kitium_auth.sessions VALIDATE CONSTRAINT sessions__token_rotated_at_check;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Back to the state 0028 left: the checks NOT VALID (a validated constraint cannot be marked
-- unvalidated, so each is dropped and added again; no row is checked).
ALTER TABLE kitium_auth.sessions
  DROP CONSTRAINT sessions__previous_token_hash_check,
  DROP CONSTRAINT sessions__token_rotated_at_check;
ALTER TABLE kitium_auth.sessions
  ADD CONSTRAINT sessions__previous_token_hash_check
    CHECK (octet_length(previous_token_hash) = 32) NOT VALID,
  ADD CONSTRAINT sessions__token_rotated_at_check
    CHECK ((previous_token_hash IS NULL) = (token_rotated_at IS NULL)) NOT VALID;

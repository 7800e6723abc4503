-- API keys. Only a digest of each key is stored (hash); the key itself never reaches the database.
-- Every key-returning query yields the columns of kitium_pg.records.ApiKey. A key whose
-- expires_at has passed never authenticates (the lookups by hash and by prefix skip it), but it
-- stays visible by id and in the principal's list until deleted.
-- Expiry is judged at statement_timestamp(), not now(): inside a caller's transaction now()
-- is the transaction's start, so a credential that expired since would still pass.

-- name: create_api_key(id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at)^
-- Insert a key; a retry with the same id returns the row the first attempt wrote (the id check
-- comes first, so the retry is not mistaken for a duplicate hash).
WITH inserted AS (
  INSERT INTO kitium_auth.api_keys
    (id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at)
  VALUES
    (:id, :principal_id, :hash, :prefix, :last_four, :scopes, :metadata::jsonb, :expires_at)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at,
            last_used_at, created_at, updated_at
)
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM inserted
UNION ALL
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM kitium_auth.api_keys
 WHERE id = :id
 LIMIT 1;

-- name: get_api_key(id)^
-- Fetch one key by id, expired or not.
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM kitium_auth.api_keys
 WHERE id = :id;

-- name: get_api_key_by_hash(hash)^
-- Fetch the unexpired key with this digest (served by the unique index api_keys__hash_key).
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM kitium_auth.api_keys
 WHERE hash = :hash AND (expires_at IS NULL OR expires_at > statement_timestamp());

-- name: get_api_key_to_verify(hash)^
-- get_api_key_by_hash for verify_api_key on a replica, with whether its last_used_at stamp is due
-- (over a minute old by the database's clock, as verify_api_key judges it on the primary: the
-- application's clock may differ by more than that minute).
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at,
       (last_used_at IS NULL
        OR last_used_at < statement_timestamp() - interval '1 minute') AS stamp_due
  FROM kitium_auth.api_keys
 WHERE hash = :hash AND (expires_at IS NULL OR expires_at > statement_timestamp());

-- name: get_api_keys_by_prefix_and_last_four(prefix, last_four)
-- The unexpired keys with this prefix and last four characters, newest first
-- (api_keys_prefix_last_four_idx).
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM kitium_auth.api_keys
 WHERE prefix = :prefix AND last_four = :last_four
   AND (expires_at IS NULL OR expires_at > statement_timestamp())
 ORDER BY created_at DESC, id DESC;

-- name: update_api_key(id, set_scopes, scopes, set_metadata, metadata, metadata_patch, set_expires_at, expires_at, set_prefix, prefix, set_last_four, last_four)^
-- Update the given columns of one key, expired or not (each set_x flag says whether x is given);
-- no row if the key does not exist. The digest is never changed: rotating a key means a new key.
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
UPDATE kitium_auth.api_keys AS k
   SET scopes     = CASE WHEN :set_scopes THEN :scopes ELSE k.scopes END,
       metadata   = CASE WHEN :set_metadata THEN :metadata::jsonb
                         ELSE kitium_auth.jsonb_merge_patch(k.metadata, :metadata_patch::jsonb) END,
       expires_at = CASE WHEN :set_expires_at THEN :expires_at ELSE k.expires_at END,
       prefix     = CASE WHEN :set_prefix THEN :prefix ELSE k.prefix END,
       last_four  = CASE WHEN :set_last_four THEN :last_four ELSE k.last_four END
 WHERE k.id = :id
RETURNING k.id, k.principal_id, k.hash, k.prefix, k.last_four, k.scopes, k.metadata,
          k.expires_at, k.last_used_at, k.created_at, k.updated_at;

-- name: delete_api_key(id)!
-- Delete one key.
DELETE FROM kitium_auth.api_keys WHERE id = :id;

-- name: delete_user_api_keys(principal_id)!
-- Delete every key of a principal, expired ones included (api_keys_principal_id_idx).
DELETE FROM kitium_auth.api_keys WHERE principal_id = :principal_id;

-- name: list_api_keys(principal_id)
-- All of a principal's keys, expired ones included, newest first (api_keys_principal_id_idx).
SELECT id, principal_id, hash, prefix, last_four, scopes, metadata, expires_at, last_used_at,
       created_at, updated_at
  FROM kitium_auth.api_keys
 WHERE principal_id = :principal_id
 ORDER BY created_at DESC, id DESC;

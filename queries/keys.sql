-- Key rotation: find secrets encrypted under an older key and re-encrypt them under the current
-- one. Each re-encryption is a compare-and-swap on the old key id and the old ciphertext, so a
-- row changed meanwhile (even re-written under the same old key, by an application instance that
-- still has the old keyring) is left for the next pass instead of being overwritten.
--
-- Each swap is one statement that first locks its batch's rows in id order (the CTE locked),
-- then updates them. The lock order of a plain UPDATE ... FROM unnest(...) is its join's output
-- order, which the plan decides: the array's order for a nested loop or a hash on the table, heap
-- order for a hash on the array and a sequential scan, and the plan changes with the batch's size
-- and the table's statistics. Two rotations running at once (two deploys, an operator running
-- rotate-keys twice) then locked overlapping batches in opposite orders and deadlocked (40P01;
-- found in review). Locked in id order (the UPDATE then finds every row it writes locked
-- already, and waits for none), a swap only ever waits for a row past every row it holds, so
-- concurrent swaps cannot wait on each other in a cycle; a row another rotation has swapped
-- meanwhile fails the compare-and-swap on its new version and is left to that rotation. The
-- locks are FOR NO KEY UPDATE, those the UPDATE takes anyway: they do not block inserts of rows
-- referring to the locked ones.
-- A swap returns how many values it stored, counting a row that already holds this call's new
-- ciphertext under the new key: only a retry of this very swap can find one (each ciphertext
-- has a random nonce), after its first attempt committed and its acknowledgement was lost.
-- Counted from the rows as locked (already: a locked row under the new key is one the locking
-- condition found holding this call's ciphertexts, as an old key id is never the new one), so a
-- retry that waited for its own first attempt sees its commit; the UPDATE leaves such a row
-- alone (its compare-and-swap on the old key id fails). Counted only from the UPDATE, such a run re-encrypted a value and reported
-- none, and kitium-pg rotate-keys said there was nothing to re-encrypt (found in review).
-- Before its rows a swap locks their parents FOR KEY SHARE, in id order (owners): the users of
-- 2FA devices and OAuth links, the organizations of SSO providers. Deleting a user or an
-- organization locks it first, then deletes its rows in an order of the cascade's plan (a
-- user's links by provider, not by id), so a swap holding one of those rows and waiting for
-- another deadlocked with it (found in review). Now the deletion waits for the swap, or the
-- swap for the deletion, before it holds any row. KEY SHARE does not block writes of the
-- parents that keep their key (an update of the user, a link's lock on its user).

-- name: count_stale_secrets(key_id)$
-- How many encrypted values are not under the current key (for progress reports).
SELECT (SELECT count(*) FROM kitium_auth.twofa_devices WHERE secret_key_id <> :key_id)
     + (SELECT count(*) FROM kitium_auth.sso_providers WHERE client_secret_key_id <> :key_id)
     + (SELECT count(*) FROM kitium_auth.sso_providers WHERE signing_key_key_id <> :key_id)
     + (SELECT count(*) FROM kitium_auth.oauth_accounts WHERE tokens_key_id <> :key_id);

-- name: secrets_hidden_by_row_security()$
-- Whether row-level security filters a table holding secrets for the current role: it is active
-- there, and either no permissive policy for every command with USING (true) WITH CHECK (true)
-- applies to the role (tenant_rls's owner_access, granted to the role that applied it) or a
-- restrictive policy on reads or updates with another condition does.
WITH applying AS (
  SELECT p.polrelid, p.polcmd, p.polpermissive,
         coalesce(pg_get_expr(p.polqual, p.polrelid), 'true') = 'true'
           AND coalesce(pg_get_expr(p.polwithcheck, p.polrelid), 'true') = 'true' AS sees_all
    FROM pg_catalog.pg_policy AS p
   WHERE 0 = ANY (p.polroles)
      OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS r (oid)
                  WHERE r.oid <> 0 AND pg_has_role(r.oid, 'USAGE'))
)
SELECT EXISTS (
  SELECT 1
    FROM pg_catalog.pg_class AS c
   WHERE c.oid IN ('kitium_auth.twofa_devices'::regclass,
                   'kitium_auth.sso_providers'::regclass,
                   'kitium_auth.oauth_accounts'::regclass)
     AND row_security_active(c.oid)
     AND (NOT EXISTS (SELECT 1 FROM applying AS a
                       WHERE a.polrelid = c.oid AND a.polcmd = '*' AND a.polpermissive
                         AND a.sees_all)
          OR EXISTS (SELECT 1 FROM applying AS a
                      WHERE a.polrelid = c.oid AND a.polcmd IN ('*', 'r', 'w')
                        AND NOT a.polpermissive AND NOT a.sees_all)));

-- name: stale_twofa_secrets(key_id, after, batch_size)
-- The next batch (after a given id) of 2FA device secrets under an older key.
SELECT id, secret_key_id, secret_ciphertext
  FROM kitium_auth.twofa_devices
 WHERE secret_key_id <> :key_id AND id > :after
 ORDER BY id
 LIMIT :batch_size;

-- name: reencrypt_twofa_secrets(ids, old_key_ids, old_ciphertexts, key_id, ciphertexts)$
-- Store re-encrypted 2FA secrets, only where the old key id and ciphertext are still in place;
-- the devices' users, then the rows, are locked in id order first (see the top of this file).
WITH owners AS (
  SELECT p.id
    FROM kitium_auth.users AS p
   WHERE p.id IN (SELECT d.user_id FROM kitium_auth.twofa_devices AS d
                   WHERE d.id = ANY (:ids::uuid[]))
   ORDER BY p.id
     FOR KEY SHARE
), locked AS (
  SELECT t.id, u.old_key_id, u.old_ciphertext, u.ciphertext,
         t.secret_key_id = :key_id AS already
    FROM kitium_auth.twofa_devices AS t
    JOIN unnest(:ids::uuid[], :old_key_ids::text[], :old_ciphertexts::bytea[],
                :ciphertexts::bytea[])
         AS u (id, old_key_id, old_ciphertext, ciphertext)
      ON u.id = t.id
   WHERE ((t.secret_key_id = u.old_key_id AND t.secret_ciphertext = u.old_ciphertext)
          OR (t.secret_key_id = :key_id AND t.secret_ciphertext = u.ciphertext))
     AND (SELECT count(*) FROM owners) >= 0  -- always true: the owners are locked first
   ORDER BY t.id
     FOR NO KEY UPDATE OF t
), swapped AS (
  UPDATE kitium_auth.twofa_devices AS t
     SET secret_ciphertext = l.ciphertext, secret_key_id = :key_id
    FROM locked AS l
   WHERE t.id = l.id AND t.secret_key_id = l.old_key_id
     AND t.secret_ciphertext = l.old_ciphertext
  RETURNING t.id
)
SELECT (SELECT count(*) FROM swapped) + (SELECT count(*) FROM locked WHERE already);

-- name: stale_sso_client_secrets(key_id, after, batch_size)
-- The next batch (after a given id) of SSO client secrets under an older key.
SELECT id, client_secret_key_id, client_secret_ciphertext
  FROM kitium_auth.sso_providers
 WHERE client_secret_key_id <> :key_id AND id > :after
 ORDER BY id
 LIMIT :batch_size;

-- name: reencrypt_sso_client_secrets(ids, old_key_ids, old_ciphertexts, key_id, ciphertexts)$
-- Store re-encrypted SSO client secrets, only where the old key id and ciphertext are still in
-- place; the providers' organizations, then the rows, are locked in id order first (see the
-- top of this file).
WITH owners AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE o.id IN (SELECT p.org_id FROM kitium_auth.sso_providers AS p
                   WHERE p.id = ANY (:ids::uuid[]))
   ORDER BY o.id
     FOR KEY SHARE
), locked AS (
  SELECT t.id, u.old_key_id, u.old_ciphertext, u.ciphertext,
         t.client_secret_key_id = :key_id AS already
    FROM kitium_auth.sso_providers AS t
    JOIN unnest(:ids::uuid[], :old_key_ids::text[], :old_ciphertexts::bytea[],
                :ciphertexts::bytea[])
         AS u (id, old_key_id, old_ciphertext, ciphertext)
      ON u.id = t.id
   WHERE ((t.client_secret_key_id = u.old_key_id AND t.client_secret_ciphertext = u.old_ciphertext)
          OR (t.client_secret_key_id = :key_id AND t.client_secret_ciphertext = u.ciphertext))
     AND (SELECT count(*) FROM owners) >= 0  -- always true: the owners are locked first
   ORDER BY t.id
     FOR NO KEY UPDATE OF t
), swapped AS (
  UPDATE kitium_auth.sso_providers AS t
     SET client_secret_ciphertext = l.ciphertext, client_secret_key_id = :key_id
    FROM locked AS l
   WHERE t.id = l.id AND t.client_secret_key_id = l.old_key_id
     AND t.client_secret_ciphertext = l.old_ciphertext
  RETURNING t.id
)
SELECT (SELECT count(*) FROM swapped) + (SELECT count(*) FROM locked WHERE already);

-- name: stale_sso_signing_keys(key_id, after, batch_size)
-- The next batch (after a given id) of SSO signing keys under an older key.
SELECT id, signing_key_key_id, signing_key_ciphertext
  FROM kitium_auth.sso_providers
 WHERE signing_key_key_id <> :key_id AND id > :after
 ORDER BY id
 LIMIT :batch_size;

-- name: reencrypt_sso_signing_keys(ids, old_key_ids, old_ciphertexts, key_id, ciphertexts)$
-- Store re-encrypted SSO signing keys, only where the old key id and ciphertext are still in
-- place; the providers' organizations, then the rows, are locked in id order first (see the
-- top of this file).
WITH owners AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
   WHERE o.id IN (SELECT p.org_id FROM kitium_auth.sso_providers AS p
                   WHERE p.id = ANY (:ids::uuid[]))
   ORDER BY o.id
     FOR KEY SHARE
), locked AS (
  SELECT t.id, u.old_key_id, u.old_ciphertext, u.ciphertext,
         t.signing_key_key_id = :key_id AS already
    FROM kitium_auth.sso_providers AS t
    JOIN unnest(:ids::uuid[], :old_key_ids::text[], :old_ciphertexts::bytea[],
                :ciphertexts::bytea[])
         AS u (id, old_key_id, old_ciphertext, ciphertext)
      ON u.id = t.id
   WHERE ((t.signing_key_key_id = u.old_key_id AND t.signing_key_ciphertext = u.old_ciphertext)
          OR (t.signing_key_key_id = :key_id AND t.signing_key_ciphertext = u.ciphertext))
     AND (SELECT count(*) FROM owners) >= 0  -- always true: the owners are locked first
   ORDER BY t.id
     FOR NO KEY UPDATE OF t
), swapped AS (
  UPDATE kitium_auth.sso_providers AS t
     SET signing_key_ciphertext = l.ciphertext, signing_key_key_id = :key_id
    FROM locked AS l
   WHERE t.id = l.id AND t.signing_key_key_id = l.old_key_id
     AND t.signing_key_ciphertext = l.old_ciphertext
  RETURNING t.id
)
SELECT (SELECT count(*) FROM swapped) + (SELECT count(*) FROM locked WHERE already);

-- name: stale_oauth_tokens(key_id, after, batch_size)
-- The next batch (after a given id) of OAuth provider token pairs under an older key.
SELECT id, user_id, provider, tokens_key_id, access_token_ciphertext, refresh_token_ciphertext
  FROM kitium_auth.oauth_accounts
 WHERE tokens_key_id <> :key_id AND id > :after
 ORDER BY id
 LIMIT :batch_size;

-- name: reencrypt_oauth_tokens(ids, old_key_ids, old_access_ciphertexts, old_refresh_ciphertexts, key_id, access_ciphertexts, refresh_ciphertexts)$
-- Store re-encrypted OAuth token pairs, only where the old key id and both old ciphertexts are
-- still in place; the links' users, then the rows, are locked in id order first (see the top of
-- this file).
WITH owners AS (
  SELECT p.id
    FROM kitium_auth.users AS p
   WHERE p.id IN (SELECT a.user_id FROM kitium_auth.oauth_accounts AS a
                   WHERE a.id = ANY (:ids::uuid[]))
   ORDER BY p.id
     FOR KEY SHARE
), locked AS (
  SELECT t.id, u.old_key_id, u.old_access_ciphertext, u.old_refresh_ciphertext,
         u.access_ciphertext, u.refresh_ciphertext,
         t.tokens_key_id = :key_id AS already
    FROM kitium_auth.oauth_accounts AS t
    JOIN unnest(:ids::uuid[], :old_key_ids::text[], :old_access_ciphertexts::bytea[],
                :old_refresh_ciphertexts::bytea[], :access_ciphertexts::bytea[],
                :refresh_ciphertexts::bytea[])
         AS u (id, old_key_id, old_access_ciphertext, old_refresh_ciphertext, access_ciphertext,
               refresh_ciphertext)
      ON u.id = t.id
   WHERE ((t.tokens_key_id = u.old_key_id
           AND t.access_token_ciphertext IS NOT DISTINCT FROM u.old_access_ciphertext
           AND t.refresh_token_ciphertext IS NOT DISTINCT FROM u.old_refresh_ciphertext)
          OR (t.tokens_key_id = :key_id
              AND t.access_token_ciphertext IS NOT DISTINCT FROM u.access_ciphertext
              AND t.refresh_token_ciphertext IS NOT DISTINCT FROM u.refresh_ciphertext))
     AND (SELECT count(*) FROM owners) >= 0  -- always true: the owners are locked first
   ORDER BY t.id
     FOR NO KEY UPDATE OF t
), swapped AS (
  UPDATE kitium_auth.oauth_accounts AS t
     SET access_token_ciphertext = l.access_ciphertext,
         refresh_token_ciphertext = l.refresh_ciphertext,
         tokens_key_id = :key_id
    FROM locked AS l
   WHERE t.id = l.id AND t.tokens_key_id = l.old_key_id
     AND t.access_token_ciphertext IS NOT DISTINCT FROM l.old_access_ciphertext
     AND t.refresh_token_ciphertext IS NOT DISTINCT FROM l.old_refresh_ciphertext
  RETURNING t.id
)
SELECT (SELECT count(*) FROM swapped) + (SELECT count(*) FROM locked WHERE already);

-- Diagnostics used by `kitium-pg demo` to show what is stored, not by the adapter's methods.

-- name: sso_client_secret_storage(id, plaintext)^
-- How a provider's client secret is stored: its key id, ciphertext length, and whether the plaintext bytes occur in it.
SELECT client_secret_key_id, octet_length(client_secret_ciphertext),
       position(:plaintext::bytea IN client_secret_ciphertext) > 0
  FROM kitium_auth.sso_providers
 WHERE id = :id;

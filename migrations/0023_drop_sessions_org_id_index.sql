-- Drops sessions_org_id_idx, superseded by 0020's partial sessions_org_id_user_id_idx: every
-- lookup by org_id (sessions__org_id_fkey's cascade when an organization is deleted, and the
-- membership cascade) is served by the newer index, and the older one cost an entry for every
-- session written, those without an organization included (the most of them).
--
-- A migration of its own, so that the brief exclusive lock is the only lock it takes.
-- Locks: ACCESS EXCLUSIVE on sessions for an instant once granted (nothing is scanned);
-- lock_timeout bounds the wait for it. Its down part builds the index again in place (SHARE on
-- sessions while the table is read once: session writes wait).

-- migrate:up

SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.sessions_org_id_idx;

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-creation
CREATE INDEX sessions_org_id_idx ON kitium_auth.sessions (org_id);

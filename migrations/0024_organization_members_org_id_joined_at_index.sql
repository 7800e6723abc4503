-- An index on organization_members (org_id, joined_at, user_id), for listing an organization's
-- members in join order, a page at a time.
--
-- list_organization_members returns the members ordered by joined_at, then user_id. Only the
-- primary key (org_id, user_id) served it: every call read all of the organization's members and
-- sorted them, so a page of an organization of 20,000 members could not be read without reading
-- and sorting the 20,000. With this index list_organization_members(org_id, after=...,
-- limit=...) reads one page by keyset (the members after the previous page's last (joined_at,
-- user_id)) as one index range scan with no sort, in a generic plan too: 0.1 to 0.4 ms for a
-- page of 100 anywhere in 20,000 members, where the primary key alone took 2.5 to 4.5 ms per
-- page, more the further the page (a scan of the organization's members and a top-N sort;
-- EXPLAIN ANALYZE under plan_cache_mode = force_generic_plan, 60,000 memberships).
--
-- The primary key stays: it enforces one membership per (org, user), and serves the membership
-- lookups and references (user_roles__member_fkey, sessions__member_fkey).
--
-- A migration of its own, so that SHARE on organization_members is the only table lock it takes
-- (0020 says why two in one transaction could deadlock with removals); 0025 builds the index of
-- user_roles in the same way.
-- Locks: SHARE on organization_members while the index is built (one read of the table):
-- membership writes (adds, removals, role changes, member-set replacements, the cascades of
-- user and organization deletes) wait, reads go on, and so do logins into an organization (the
-- membership reference only takes row locks). It is built in place because the migration runs
-- in a transaction, where CREATE INDEX CONCURRENTLY cannot; lock_timeout bounds the wait for the
-- lock. On a very large organization_members table, run it at a quiet time.

-- migrate:up

SET LOCAL lock_timeout = '5s';

-- squawk-ignore require-concurrent-index-creation
CREATE INDEX organization_members_org_id_joined_at_user_id_idx
  ON kitium_auth.organization_members (org_id, joined_at, user_id);

-- migrate:down

SET LOCAL lock_timeout = '5s';

-- Takes ACCESS EXCLUSIVE on organization_members for an instant once granted (nothing is
-- scanned).
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX kitium_auth.organization_members_org_id_joined_at_user_id_idx;

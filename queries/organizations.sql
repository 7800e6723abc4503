-- Organizations and their members.
-- Every organization-returning query yields the columns of kitium_pg.records.Organization; the
-- members column aggregates the organization's rows of organization_members (one index lookup
-- on the primary key org_id, user_id) ordered by joined_at, then user_id.
-- Member lists arrive as two parallel arrays (member_ids, member_roles) expanded with unnest, so
-- any number of members is written by the one statement.

-- name: create_organization(id, name, plan, seats, metadata, member_ids, member_roles)^
-- Insert an organization with its members; a retry with the same id returns the stored row.
WITH org AS (
  INSERT INTO kitium_auth.organizations (id, name, plan, seats, metadata)
  VALUES (:id, :name, :plan, :seats, :metadata::jsonb)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, name, plan, seats, metadata, created_at, updated_at
),
added AS (
  INSERT INTO kitium_auth.organization_members (org_id, user_id, role)
  SELECT org.id, m.user_id, m.role
    FROM org, unnest(:member_ids::uuid[], :member_roles::text[]) AS m (user_id, role)
  RETURNING user_id, role, joined_at
)
SELECT org.id, org.name, org.plan, org.seats,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'user_id', a.user_id, 'role', a.role, 'joined_at', a.joined_at)
                ORDER BY a.joined_at, a.user_id), '[]'::jsonb)
          FROM added AS a) AS members,
       org.metadata, org.created_at, org.updated_at
  FROM org
UNION ALL
SELECT o.id, o.name, o.plan, o.seats,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'user_id', m.user_id, 'role', m.role, 'joined_at', m.joined_at)
                ORDER BY m.joined_at, m.user_id), '[]'::jsonb)
          FROM kitium_auth.organization_members AS m WHERE m.org_id = o.id) AS members,
       o.metadata, o.created_at, o.updated_at
  FROM kitium_auth.organizations AS o
 WHERE o.id = :id AND NOT EXISTS (SELECT 1 FROM org)
 LIMIT 1;

-- name: get_organization(id)^
-- Fetch one organization with its members.
SELECT o.id, o.name, o.plan, o.seats,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'user_id', m.user_id, 'role', m.role, 'joined_at', m.joined_at)
                ORDER BY m.joined_at, m.user_id), '[]'::jsonb)
          FROM kitium_auth.organization_members AS m WHERE m.org_id = o.id) AS members,
       o.metadata, o.created_at, o.updated_at
  FROM kitium_auth.organizations AS o
 WHERE o.id = :id;

-- name: update_organization(id, set_name, name, set_plan, plan, set_seats, seats, set_metadata, metadata, metadata_patch, set_members, member_ids, member_roles)^
-- Update the given columns of one organization and, when set_members, replace its member set
-- (members kept keep their joined_at; the others are deleted or inserted) with
-- replace_organization_members, after the UPDATE has locked the organization row (see
-- migration 0006: a concurrent replacement is then replaced, not merged; it removes members as
-- remove_organization_member does, with their sessions bound to the organization and, since
-- 0037, their SSO sessions at its providers). No row if the organization does not exist.
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
-- The members returned are read after the lock (organization_member_list, migration 0034), so
-- they include a member added by the call this UPDATE waited for.
WITH org AS (
  UPDATE kitium_auth.organizations AS o
     SET name     = CASE WHEN :set_name THEN :name ELSE o.name END,
         plan     = CASE WHEN :set_plan THEN :plan ELSE o.plan END,
         seats    = CASE WHEN :set_seats THEN :seats ELSE o.seats END,
         metadata = CASE WHEN :set_metadata THEN :metadata::jsonb
                         ELSE kitium_auth.jsonb_merge_patch(o.metadata, :metadata_patch::jsonb) END
   WHERE o.id = :id
  RETURNING o.id, o.name, o.plan, o.seats, o.metadata, o.created_at, o.updated_at
)
SELECT org.id, org.name, org.plan, org.seats,
       CASE WHEN :set_members
            THEN kitium_auth.replace_organization_members(
                   org.id, :member_ids::uuid[], :member_roles::text[])
            ELSE kitium_auth.organization_member_list(org.id)
       END AS members,
       org.metadata, org.created_at, org.updated_at
  FROM org;

-- name: delete_organization(id)!
-- Delete an organization; everything bound to it goes with it (ON DELETE CASCADE, migrations
-- 0001, 0002 and 0007): its memberships, roles and role assignments, its SSO providers with
-- their domains, links and SSO sessions, and the sessions bound to it (sessions.org_id).
DELETE FROM kitium_auth.organizations WHERE id = :id;

-- name: add_organization_member(org_id, user_id, role, within_seats)^
-- Add a user to an organization under the organization's row lock (migration 0013): outcome
-- 'added' for a new member, 'existing' for a member already there (returned unchanged: its role
-- and joined_at are kept), 'seat_limit' when within_seats and the organization has no free seat
-- (nothing written, no membership).
SELECT r.outcome, r.member_user_id AS user_id, r.member_role AS role,
       r.member_joined_at AS joined_at
  FROM kitium_auth.add_organization_member(:org_id, :user_id, :role, :within_seats) AS r;

-- name: set_organization_member_role(org_id, user_id, role, keep_last)^
-- Change a member's role under the organization's row lock (migration 0013): outcome 'set' with
-- the membership, or 'last' (nothing written) when keep_last names the role the member holds and
-- no other member holds it. No row when the user is not a member or there is no organization.
SELECT r.outcome, r.member_user_id AS user_id, r.member_role AS role,
       r.member_joined_at AS joined_at
  FROM kitium_auth.set_organization_member_role(:org_id, :user_id, :role, :keep_last) AS r;

-- name: remove_organization_member(org_id, user_id, keep_last)$
-- Remove a user from an organization with its roles there, its sessions bound to the
-- organization and its SSO sessions at the organization's providers (migration 0037), under the
-- organization's row lock (migration 0013): 'removed', 'absent' (not a member, or no
-- organization), or 'last' (nothing written) when keep_last names the role the member holds and
-- no other member holds it.
SELECT kitium_auth.remove_organization_member(:org_id, :user_id, :keep_last) AS outcome;

-- name: get_organization_member(org_id, user_id)^
-- One membership: whether the user belongs to the organization, and with which role (served by
-- the primary key).
SELECT user_id, role, joined_at
  FROM kitium_auth.organization_members
 WHERE org_id = :org_id AND user_id = :user_id;

-- name: list_organization_members(org_id)
-- The members of one organization in join order, joined_at then user_id (found through
-- organization_members_org_id_joined_at_user_id_idx, migration 0024; for all of a large
-- organization's members the planner may prefer a bitmap scan and a sort: pages avoid both).
SELECT user_id, role, joined_at
  FROM kitium_auth.organization_members
 WHERE org_id = :org_id
 ORDER BY joined_at, user_id;

-- name: list_organization_members_page(org_id, after_joined_at, after_user_id, page_size)
-- One page of the members of one organization in join order: at most page_size of them (all
-- when NULL) strictly after the keyset (after_joined_at, after_user_id), or from the first one
-- when both are NULL. A keyset, not an offset: members added meanwhile never shift a later page.
-- The bound is always there (NULL stands for ('-infinity', the smallest uuid), below every
-- member), so it is an index condition of organization_members_org_id_joined_at_user_id_idx
-- (migration 0024) in a generic plan too: a page is one index range scan, with no sort. An
-- optional bound (after_joined_at IS NULL OR ...) became a filter in the generic plan, which
-- read every member before the page (checked with EXPLAIN on 20,000 members).
SELECT user_id, role, joined_at
  FROM kitium_auth.organization_members
 WHERE org_id = :org_id
   AND (joined_at, user_id) > (coalesce(:after_joined_at::timestamptz, '-infinity'::timestamptz),
                               coalesce(:after_user_id::uuid,
                                        '00000000-0000-0000-0000-000000000000'::uuid))
 ORDER BY joined_at, user_id
 LIMIT :page_size;

-- name: list_user_organizations(user_id)
-- The organizations a user belongs to, in the order the user joined them (served by
-- organization_members_user_id_idx).
SELECT o.id, o.name, o.plan, o.seats,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'user_id', m.user_id, 'role', m.role, 'joined_at', m.joined_at)
                ORDER BY m.joined_at, m.user_id), '[]'::jsonb)
          FROM kitium_auth.organization_members AS m WHERE m.org_id = o.id) AS members,
       o.metadata, o.created_at, o.updated_at
  FROM kitium_auth.organization_members AS mine
  JOIN kitium_auth.organizations AS o ON o.id = mine.org_id
 WHERE mine.user_id = :user_id
 ORDER BY mine.joined_at, o.id;

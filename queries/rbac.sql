-- Roles of organizations, their assignment to users, and the permissions those roles grant.
-- Every role-returning query yields the columns of kitium_pg.records.Role; the permissions column
-- is a jsonb array of objects with the keys of kitium_pg.records.Permission (name, resource,
-- action, description, metadata), written whole by the adapter.
-- A user's roles in an organization are ordered oldest role first (created_at, then id); when two
-- of them define a permission of the same name, the first one's definition wins.

-- name: create_role(id, org_id, name, description, is_system, permissions, metadata)^
-- Insert a role; a retry with the same id returns the row the first attempt wrote.
WITH inserted AS (
  INSERT INTO kitium_auth.roles (id, org_id, name, description, is_system, permissions, metadata)
  VALUES (:id, :org_id, :name, :description, :is_system, :permissions::jsonb, :metadata::jsonb)
  ON CONFLICT (id) DO NOTHING
  RETURNING id, org_id, name, description, is_system, permissions, metadata, created_at,
            updated_at
)
SELECT id, org_id, name, description, is_system, permissions, metadata, created_at, updated_at
  FROM inserted
UNION ALL
SELECT r.id, r.org_id, r.name, r.description, r.is_system, r.permissions, r.metadata,
       r.created_at, r.updated_at
  FROM kitium_auth.roles AS r
 WHERE r.id = :id
 LIMIT 1;

-- name: get_role(id)^
-- Fetch one role by id.
SELECT id, org_id, name, description, is_system, permissions, metadata, created_at, updated_at
  FROM kitium_auth.roles
 WHERE id = :id;

-- name: update_role(id, set_name, name, set_description, description, set_permissions, permissions, set_metadata, metadata, metadata_patch, set_is_system, is_system)^
-- Update the given columns of one role (each set_x flag says whether x is given); no row if the
-- role does not exist.
-- Without set_metadata, metadata_patch (RFC 7396 JSON Merge Patch; NULL: none) is merged into
-- the row's metadata as this UPDATE locked it (migration 0014): concurrent patches all apply.
UPDATE kitium_auth.roles AS r
   SET name        = CASE WHEN :set_name THEN :name ELSE r.name END,
       description = CASE WHEN :set_description THEN :description ELSE r.description END,
       permissions = CASE WHEN :set_permissions THEN :permissions::jsonb ELSE r.permissions END,
       metadata    = CASE WHEN :set_metadata THEN :metadata::jsonb
                          ELSE kitium_auth.jsonb_merge_patch(r.metadata,
                                                             :metadata_patch::jsonb) END,
       is_system   = CASE WHEN :set_is_system THEN :is_system ELSE r.is_system END
 WHERE r.id = :id
RETURNING r.id, r.org_id, r.name, r.description, r.is_system, r.permissions, r.metadata,
          r.created_at, r.updated_at;

-- name: delete_role(id)!
-- Delete a role; its assignments go with it (ON DELETE CASCADE of user_roles__role_id_fkey).
-- The organization's row is locked first, as update_organization's UPDATE locks it: both
-- cascade into user_roles, in different row orders, and would otherwise deadlock.
WITH org AS (
  SELECT o.id
    FROM kitium_auth.organizations AS o
    JOIN kitium_auth.roles AS r ON r.org_id = o.id
   WHERE r.id = :id
     FOR NO KEY UPDATE OF o
)
DELETE FROM kitium_auth.roles AS r
 USING org
 WHERE r.id = :id AND r.org_id = org.id;

-- name: list_roles(org_id)
-- The roles of one organization, newest first (served by roles__name_key, led by org_id).
SELECT id, org_id, name, description, is_system, permissions, metadata, created_at, updated_at
  FROM kitium_auth.roles
 WHERE org_id = :org_id
 ORDER BY created_at DESC, id DESC;

-- name: assign_role_to_user(id, user_id, role_id, org_id)^
-- Assign a role to a user within the role's organization (a no-op when already assigned, also
-- under concurrent calls) and return the role. The foreign key on (role_id, org_id) refuses a
-- role of another organization. The organization's row is locked first (FOR KEY SHARE, in the
-- CTE the insert reads): the insert's reference checks, at the end of the statement, would
-- lock the role before it, and delete_organization locks the organization and then deletes
-- its roles, so the two waited for each other. No organization (or one another tenant's, or
-- one deleted while this waited for its row): nothing is inserted and no row is returned.
-- The role is read after the insert (the filter on it) and locked FOR KEY SHARE, as the
-- insert's reference check locks it anyway: a lock returns the row's newest version, so an
-- insert that waited for a concurrent assignment returns the role as that transaction left it
-- (read in the statement's snapshot, a change it committed was missing: found in review).
WITH org AS (
  SELECT o.id FROM kitium_auth.organizations AS o WHERE o.id = :org_id FOR KEY SHARE
),
inserted AS (
  INSERT INTO kitium_auth.user_roles (id, user_id, role_id, org_id)
  SELECT :id, :user_id, :role_id, org.id FROM org
  ON CONFLICT (user_id, org_id, role_id) DO NOTHING
  RETURNING id
)
SELECT r.id, r.org_id, r.name, r.description, r.is_system, r.permissions, r.metadata,
       r.created_at, r.updated_at
  FROM kitium_auth.roles AS r
  JOIN org ON org.id = r.org_id
 WHERE r.id = :role_id
   AND (SELECT count(*) FROM inserted) >= 0
   FOR KEY SHARE OF r;

-- name: revoke_role_from_user(user_id, role_id, org_id)!
-- Remove one role assignment (served by user_roles__role_key).
DELETE FROM kitium_auth.user_roles
 WHERE user_id = :user_id AND org_id = :org_id AND role_id = :role_id;

-- name: get_user_roles(user_id, org_id)
-- The roles a user holds in one organization, oldest role first (served by user_roles__role_key).
SELECT r.id, r.org_id, r.name, r.description, r.is_system, r.permissions, r.metadata,
       r.created_at, r.updated_at
  FROM kitium_auth.user_roles AS ur
  JOIN kitium_auth.roles AS r ON r.id = ur.role_id AND r.org_id = ur.org_id
 WHERE ur.user_id = :user_id AND ur.org_id = :org_id
 ORDER BY r.created_at, r.id;

-- name: set_user_roles(user_id, org_id, role_ids, ids)
-- Replace the roles a user holds in one organization with role_ids (ids: the ids of the
-- assignments to insert, parallel to role_ids) through set_user_roles, which locks the
-- membership row first so that concurrent replacements run one after the other (migration
-- 0017); the roles asked for, now held, oldest role first as get_user_roles.
SELECT r.held_id AS id, r.held_org_id AS org_id, r.held_name AS name,
       r.held_description AS description, r.held_is_system AS is_system,
       r.held_permissions AS permissions, r.held_metadata AS metadata,
       r.held_created_at AS created_at, r.held_updated_at AS updated_at
  FROM kitium_auth.set_user_roles(:user_id, :org_id, :role_ids::uuid[], :ids::uuid[]) AS r
 ORDER BY r.held_created_at, r.held_id;

-- name: get_role_users(role_id)
-- The users holding one role, oldest assignment first, then by user id (found through
-- user_roles_role_id_assigned_at_user_id_idx, migration 0025; for all of a role's many holders
-- the planner may prefer a bitmap scan and a sort: pages avoid both).
SELECT user_id, role_id, org_id, assigned_at
  FROM kitium_auth.user_roles
 WHERE role_id = :role_id
 ORDER BY assigned_at, user_id;

-- name: get_role_users_page(role_id, after_assigned_at, after_user_id, page_size)
-- One page of the users holding one role, oldest assignment first, then by user id: at most
-- page_size of them (all when NULL) strictly after the keyset (after_assigned_at,
-- after_user_id), or from the first one when both are NULL. Keyset pagination with a bound that
-- is always there, as list_organization_members_page (its comment says why): one range scan of
-- user_roles_role_id_assigned_at_user_id_idx (migration 0025), with no sort, in a generic plan.
SELECT user_id, role_id, org_id, assigned_at
  FROM kitium_auth.user_roles
 WHERE role_id = :role_id
   AND (assigned_at, user_id) > (coalesce(:after_assigned_at::timestamptz,
                                          '-infinity'::timestamptz),
                                 coalesce(:after_user_id::uuid,
                                          '00000000-0000-0000-0000-000000000000'::uuid))
 ORDER BY assigned_at, user_id
 LIMIT :page_size;

-- name: get_user_permissions(user_id, org_id)
-- The distinct permissions (by name, in code-point order of the name) a user holds in one
-- organization through its roles; the oldest role defining a name supplies its definition.
SELECT DISTINCT ON ((p.perm ->> 'name') COLLATE "C")
       p.perm ->> 'name' AS name,
       p.perm ->> 'resource' AS resource,
       p.perm ->> 'action' AS action,
       p.perm ->> 'description' AS description,
       coalesce(p.perm -> 'metadata', '{}'::jsonb) AS metadata
  FROM kitium_auth.user_roles AS ur
  JOIN kitium_auth.roles AS r ON r.id = ur.role_id AND r.org_id = ur.org_id
 CROSS JOIN LATERAL jsonb_array_elements(r.permissions) WITH ORDINALITY AS p (perm, position)
 WHERE ur.user_id = :user_id AND ur.org_id = :org_id
 ORDER BY (p.perm ->> 'name') COLLATE "C", r.created_at, r.id, p.position;

-- name: has_permission(user_id, org_id, name)$
-- Whether any role the user holds in the organization grants the permission of this name
-- (jsonb containment on the role's permissions array).
SELECT EXISTS (
  SELECT 1
    FROM kitium_auth.user_roles AS ur
    JOIN kitium_auth.roles AS r ON r.id = ur.role_id AND r.org_id = ur.org_id
   WHERE ur.user_id = :user_id
     AND ur.org_id = :org_id
     AND r.permissions @> jsonb_build_array(jsonb_build_object('name', :name::text))
);

"""The tables' CHECK constraints: each refuses, at its boundary, what it is there to refuse, and
accepts what lies just inside, for a writer that goes around the adapter (a DBA's script,
another service, a restore). The adapter's validators refuse the same input first
(kitium_pg/_validate.py), so no adapter call reaches these constraints: these statements do.

Every CHECK constraint of the migrated schema has a case here (the catalog is compared with
``CHECKS``); each case is applied to the one row of its table that the ``world`` fixture
seeds, in a transaction that is rolled back."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from kitium_pg import PostgresStorageAdapter

from .conftest import TEST_KEYS

FUTURE = dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
DIGEST = b"\x01" * 32  # a SHA-256 digest's length
OBJECT, ARRAY = Jsonb({}), Jsonb([])


def chars(n: int) -> str:
    return "x" * n


def length_limits(column: str, low: int, high: int) -> tuple[list[Any], list[Any]]:
    """The refused and accepted assignments of ``char_length(column) BETWEEN low AND high``
    (``low`` 0: only ``<= high``)."""
    refused = [{column: chars(high + 1)}, *([{column: chars(low - 1)}] if low else [])]
    return refused, [{column: chars(high)}, *([{column: chars(low)}] if low else [])]


def object_only(column: str) -> tuple[list[Any], list[Any]]:
    return [{column: ARRAY}, {column: Jsonb("text")}], [{column: OBJECT}]


def one_of(column: str, allowed: list[str]) -> tuple[list[Any], list[Any]]:
    return [{column: "ldap"}, {column: allowed[0].upper()}], [{column: a} for a in allowed]


def together(data: str, key_id: str, value: Any, key: Any) -> tuple[list[Any], list[Any]]:
    """A ciphertext and the id of its key: both set or both unset."""
    return (
        [{data: value, key_id: None}, {data: None, key_id: key}],
        [{data: value, key_id: key}, {data: None, key_id: None}],
    )


def oauth_tokens(access: bytes | None, refresh: bytes | None, key: str | None) -> dict[str, Any]:
    return {
        "access_token_ciphertext": access,
        "refresh_token_ciphertext": refresh,
        "tokens_key_id": key,
    }


MACHINE_NAME = (
    [{"x": "Admin"}, {"x": chars(65)}, {"x": ""}, {"x": "a b"}],
    [{"x": chars(64)}, {"x": "org.billing:admin_2-x"}],
)


def machine_name(column: str) -> tuple[list[Any], list[Any]]:
    """``column ~ '^[a-z0-9_.:-]{1,64}$'``."""
    refused, accepted = MACHINE_NAME
    return [{column: a["x"]} for a in refused], [{column: a["x"]} for a in accepted]


# constraint -> (its table, assignments it refuses, assignments it accepts)
CHECKS: dict[str, tuple[str, tuple[list[Any], list[Any]]]] = {
    "users__email_check": ("users", length_limits("email", 3, 320)),
    "users__name_check": ("users", length_limits("name", 0, 255)),
    "users__picture_check": ("users", length_limits("picture", 0, 2048)),
    "users__plan_check": ("users", length_limits("plan", 1, 255)),
    "users__password_hash_check": ("users", length_limits("password_hash", 1, 512)),
    "users__metadata_check": ("users", object_only("metadata")),
    "users__email_verified_at_check": (
        "users",
        (
            [{"email": None, "email_verified_at": NOW}],
            [{"email_verified_at": NOW}, {"email": None, "email_verified_at": None}],
        ),
    ),
    "oauth_accounts__provider_check": ("oauth_accounts", length_limits("provider", 1, 255)),
    "oauth_accounts__sub_check": ("oauth_accounts", length_limits("subject", 1, 255)),
    "oauth_accounts__email_check": ("oauth_accounts", length_limits("email", 0, 320)),
    "oauth_accounts__name_check": ("oauth_accounts", length_limits("name", 0, 255)),
    "oauth_accounts__tokens_key_id_check": (
        "oauth_accounts",
        (
            [oauth_tokens(b"a", None, None), oauth_tokens(None, b"r", None)],
            [oauth_tokens(b"a", b"r", "k"), oauth_tokens(None, None, None)],
        ),
    ),
    "organizations__name_check": ("organizations", length_limits("name", 1, 255)),
    "organizations__plan_check": ("organizations", length_limits("plan", 1, 255)),
    "organizations__seats_check": ("organizations", ([{"seats": -1}], [{"seats": 0}])),
    "organizations__metadata_check": ("organizations", object_only("metadata")),
    "organization_members__role_check": ("organization_members", machine_name("role")),
    "sessions__plan_check": ("sessions", length_limits("plan", 0, 255)),
    "sessions__metadata_check": ("sessions", object_only("metadata")),
    "sessions__token_hash_check": (
        "sessions",
        ([{"token_hash": DIGEST[:31]}, {"token_hash": DIGEST + b"\x01"}], [{"token_hash": DIGEST}]),
    ),
    "sessions__previous_token_hash_check": (
        "sessions",
        (
            [{"previous_token_hash": DIGEST[:31], "token_rotated_at": NOW}],
            [{"previous_token_hash": DIGEST, "token_rotated_at": NOW}],
        ),
    ),
    "sessions__token_rotated_at_check": (
        "sessions",
        (
            [
                {"previous_token_hash": DIGEST, "token_rotated_at": None},
                {"previous_token_hash": None, "token_rotated_at": NOW},
            ],
            [
                {"previous_token_hash": DIGEST, "token_rotated_at": NOW},
                {"previous_token_hash": None, "token_rotated_at": None},
            ],
        ),
    ),
    "api_keys__hash_check": ("api_keys", length_limits("hash", 16, 512)),
    "api_keys__prefix_check": ("api_keys", length_limits("prefix", 1, 64)),
    "api_keys__last_four_check": (
        "api_keys",
        ([{"last_four": "abc"}, {"last_four": "abcde"}], [{"last_four": "abcd"}]),
    ),
    "api_keys__metadata_check": ("api_keys", object_only("metadata")),
    "email_verification_tokens__email_check": (
        "email_verification_tokens",
        length_limits("email", 3, 320),
    ),
    "email_verification_tokens__code_hash_check": (
        "email_verification_tokens",
        length_limits("code_hash", 16, 512),
    ),
    "email_verification_tokens__type_check": (
        "email_verification_tokens",
        machine_name("type"),
    ),
    "email_verification_tokens__metadata_check": (
        "email_verification_tokens",
        object_only("metadata"),
    ),
    "email_verification_token_attempts__attempts_check": (
        "email_verification_token_attempts",
        ([{"attempts": -1}], [{"attempts": 0}]),
    ),
    "auth_events__type_check": ("auth_events", length_limits("type", 1, 255)),
    "auth_events__principal_id_check": ("auth_events", length_limits("principal_id", 1, 255)),
    "auth_events__org_id_check": ("auth_events", length_limits("org_id", 0, 255)),
    "roles__name_check": ("roles", length_limits("name", 1, 255)),
    "roles__description_check": ("roles", length_limits("description", 0, 8192)),
    "roles__permissions_check": (
        "roles",
        ([{"permissions": OBJECT}, {"permissions": Jsonb(1)}], [{"permissions": ARRAY}]),
    ),
    "roles__metadata_check": ("roles", object_only("metadata")),
    "sso_providers__type_check": ("sso_providers", one_of("type", ["saml", "oidc"])),
    "sso_providers__name_check": ("sso_providers", length_limits("name", 1, 255)),
    "sso_providers__client_secret_check": (
        "sso_providers",
        together("client_secret_ciphertext", "client_secret_key_id", b"c", "k"),
    ),
    "sso_providers__signing_key_check": (
        "sso_providers",
        together("signing_key_ciphertext", "signing_key_key_id", b"s", "k"),
    ),
    "sso_providers__claim_mapping_check": ("sso_providers", object_only("claim_mapping")),
    "sso_providers__attribute_mapping_check": (
        "sso_providers",
        object_only("attribute_mapping"),
    ),
    "sso_providers__metadata_check": ("sso_providers", object_only("metadata")),
    "sso_provider_domains__domain_check": (
        "sso_provider_domains",
        (
            [{"domain": d} for d in ("Ex.com", "-ex.com", "ex.com-", "a_b.com", chars(254), "")],
            [{"domain": d} for d in ("example.com", "x", chars(253), "a-b.c0")],
        ),
    ),
    "sso_links__provider_type_check": ("sso_links", one_of("provider_type", ["oidc"])),
    "sso_links__provider_subject_check": (
        "sso_links",
        length_limits("provider_subject", 1, 1024),
    ),
    "sso_links__metadata_check": ("sso_links", object_only("metadata")),
    "sso_sessions__provider_type_check": ("sso_sessions", one_of("provider_type", ["oidc"])),
    "sso_sessions__session_token_hash_check": (
        "sso_sessions",
        (
            [{"session_token_hash": DIGEST[:31]}, {"session_token_hash": DIGEST + b"\x01"}],
            [{"session_token_hash": DIGEST}, {"session_token_hash": None}],
        ),
    ),
    "twofa_devices__method_check": (
        "twofa_devices",
        ([{"method": "backup_code"}, {"method": "TOTP"}], [{"method": "sms"}, {"method": "email"}]),
    ),
    "twofa_devices__name_check": ("twofa_devices", length_limits("name", 0, 255)),
    "twofa_devices__phone_number_check": ("twofa_devices", length_limits("phone_number", 0, 32)),
    "twofa_devices__secret_check": (
        "twofa_devices",
        together("secret_ciphertext", "secret_key_id", b"s", "k"),
    ),
    "twofa_devices__metadata_check": ("twofa_devices", object_only("metadata")),
    "twofa_backup_codes__code_hash_check": (
        "twofa_backup_codes",
        length_limits("code_hash", 16, 512),
    ),
    "twofa_sessions__method_check": (
        "twofa_sessions",
        ([{"method": "push"}, {"method": "SMS"}], [{"method": "backup_code"}, {"method": "email"}]),
    ),
    "twofa_sessions__code_hash_check": ("twofa_sessions", length_limits("code_hash", 16, 512)),
    "twofa_sessions__attempt_count_check": (
        "twofa_sessions",
        (
            [{"attempt_count": -1}, {"attempt_count": 6, "max_attempts": 5}],
            [{"attempt_count": 0}, {"attempt_count": 5, "max_attempts": 5}],
        ),
    ),
    "twofa_sessions__max_attempts_check": (
        "twofa_sessions",
        (
            [{"max_attempts": 0, "attempt_count": 0}, {"max_attempts": 101}],
            [{"max_attempts": 1, "attempt_count": 0}, {"max_attempts": 100}],
        ),
    ),
}


@pytest.fixture(scope="module")
def world(dsn: str) -> Iterator[str]:
    """A schema of its own holding one row in each table; yields the schema's name."""
    schema = f"checks_{uuid.uuid4().hex[:10]}"
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=TEST_KEYS) as storage:
        user = storage.create_user(email="seed@example.com", name="Seed")
        storage.link_oauth_account(user.id, "github", sub="seed-subject", email=user.email)
        org = storage.create_organization(name="Seed", plan="team", members=[{"user_id": user.id}])
        session = storage.issue_session_token(user_id=user.id, expires_at=FUTURE).session
        storage.issue_api_key(user.id, ["read"])
        token = storage.create_email_verification_token(
            email="seed@example.com",
            code_hash=hashlib.sha256(b"seed").hexdigest(),
            type="email_verification",
            expires_at=FUTURE,
        )
        storage.increment_email_verification_token_attempts(token.id)
        storage.emit_event(type="seed", principal_id=str(user.id), data={})
        storage.create_role(org_id=org.id, name="admin")
        provider = storage.create_sso_provider(
            type="oidc", name="Seed IdP", client_secret="seed-client-secret", domains=["seed.test"]
        )
        storage.create_sso_link(
            user_id=user.id,
            provider_id=provider.id,
            provider_type="oidc",
            provider_subject="seed-subject",
        )
        storage.create_sso_session(
            user_id=user.id,
            provider_id=provider.id,
            provider_type="oidc",
            provider_subject="seed-subject",
            expires_at=FUTURE,
        )
        device = storage.create_two_factor_device(
            user_id=user.id, method="totp", secret="JBSWY3DPEHPK3PXP"
        )
        storage.create_backup_codes(user.id, [hashlib.sha256(b"code").hexdigest()])
        storage.create_two_factor_session(
            user_id=user.id,
            session_id=session.id,
            device_id=device.id,
            method="totp",
            expires_at=FUTURE,
            max_attempts=5,
        )
    try:
        yield schema
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_every_check_constraint_has_a_case(dsn: str, world: str) -> None:
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT conname FROM pg_constraint WHERE connamespace = %s::regnamespace"
            " AND contype = 'c'",
            [world],
        ).fetchall()
    assert {name for (name,) in found} == set(CHECKS)


@pytest.mark.parametrize("constraint", sorted(CHECKS))
def test_a_check_refuses_a_write_past_its_line_and_accepts_one_on_it(
    dsn: str, world: str, constraint: str
) -> None:
    table, (refused, accepted) = CHECKS[constraint]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(world, table))
        ).fetchone()
        assert rows == (1,)  # the seeded row, which every assignment below rewrites
        for assignment in refused:
            with pytest.raises(psycopg.errors.CheckViolation) as caught:
                _update(conn, world, table, assignment)
            assert caught.value.diag.constraint_name == constraint, assignment
        for assignment in accepted:
            assert _update(conn, world, table, assignment) == 1, assignment


def _update(
    conn: psycopg.Connection[Any], schema: str, table: str, assignment: Mapping[str, Any]
) -> int:
    """Apply ``assignment`` to the table's row in a transaction that is rolled back; the number
    of rows it updated."""
    statement = sql.SQL("UPDATE {} SET {}").format(
        sql.Identifier(schema, table),
        sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(column), sql.Placeholder())
            for column in assignment
        ),
    )
    with conn.transaction(force_rollback=True):
        return conn.execute(statement, list(assignment.values())).rowcount


def test_a_backup_code_given_twice_is_refused_by_the_schema_too(dsn: str, world: str) -> None:
    """``create_backup_codes`` refuses a repeated digest before it writes; the function it calls
    is refused one too (twofa_backup_codes__code_hash_key), from a caller that goes around the
    adapter: the same code would work twice."""
    digest = hashlib.sha256(b"twice").hexdigest()
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql.SQL("SELECT id FROM {}").format(sql.Identifier(world, "users")))
        user = row.fetchone()
        assert user is not None
        replace = sql.SQL("SELECT count(*) FROM {}(%s, %s, %s)").format(
            sql.Identifier(world, "replace_backup_codes")
        )
        with pytest.raises(psycopg.errors.UniqueViolation) as caught:
            conn.execute(replace, [user[0], [uuid.uuid4(), uuid.uuid4()], [digest, digest]])
        assert caught.value.diag.constraint_name == "twofa_backup_codes__code_hash_key"
        conn.rollback()
        with conn.transaction(force_rollback=True):
            written = conn.execute(replace, [user[0], [uuid.uuid4()], [digest]]).fetchone()
        assert written == (1,)

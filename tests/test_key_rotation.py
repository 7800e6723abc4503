"""rotate_keys: every secret ends up under the newest key, readable without the old one."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter
from kitium_pg.encryption import generate_key
from kitium_pg.errors import ConflictError, EncryptionKeyError, PermissionDeniedError

from .conftest import AwaitableSync
from .fix_holder import (
    call_while_holding,
    replay_behind_open_attempt,
    two_calls_queued_on,
    unretried_adapter,
)
from .fix_proxy import CuttingProxy
from .fix_race import race_each, start
from .fix_roles import POLICIES_BESIDE_TENANT_RLS, set_policies
from .fix_roles import login_role as login_role
from .fix_roles import owner_dsn as owner_dsn
from .fix_roles import schema as schema

OLD, NEW = generate_key(), generate_key()


def test_rotation_moves_every_secret_to_the_newest_key(dsn: str, schema: str) -> None:
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as before:
        users = [before.create_user() for _ in range(5)]
        for n, user in enumerate(users):
            before.link_oauth_account(
                user.id, "gh", sub=f"s{n}", access_token=f"access-{n}", refresh_token=f"r-{n}"
            )
        # Re-encryption keeps the tokens' versions (it changes no token).
        versions = [before.get_oauth_tokens(user.id, "gh").version for user in users]  # type: ignore[union-attr]
        device = before.create_two_factor_device(
            user_id=users[0].id, method="totp", secret="JBSWY3DPEHPK3PXP"
        )
        provider = before.create_sso_provider(
            type="oidc",
            name="Okta",
            client_id="cid",
            client_secret="oidc-client-secret",
            signing_key="-----BEGIN PRIVATE KEY-----x",
        )
    seen: list[tuple[int, int]] = []
    keys = {"old": OLD, "new": NEW}
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=keys) as rotating:
        done = rotating.rotate_keys(batch_size=2, progress=lambda d, t: seen.append((d, t)))
        expected = 5 + 1 + 2  # token pairs, the device secret, the provider's two secrets
        assert done == expected
        assert seen[-1] == (expected, expected)
        assert rotating.rotate_keys() == 0  # nothing left under the old key
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"new": NEW}) as after:
        for n, user in enumerate(users):
            tokens = after.get_oauth_tokens(user.id, "gh")
            assert tokens is not None and tokens.access_token == f"access-{n}"
            assert tokens.refresh_token == f"r-{n}"
            assert tokens.version == versions[n]
        found_device = after.get_two_factor_device(device.id)
        assert found_device is not None and found_device.secret == "JBSWY3DPEHPK3PXP"
        found_provider = after.get_sso_provider(provider.id)
        assert found_provider is not None
        assert found_provider.client_secret == "oidc-client-secret"
        assert found_provider.signing_key == "-----BEGIN PRIVATE KEY-----x"
    with psycopg.connect(dsn) as conn:
        key_ids = conn.execute(
            f"SELECT DISTINCT tokens_key_id FROM {schema}.oauth_accounts".encode()
        ).fetchall()
    assert key_ids == [("new",)]


# Per kind of secret: its table, how to store one under a user (returns nothing), how to
# re-write it (by the row's id and user), and text of its swap statement (near the statement's
# start: pg_stat_activity keeps its first kilobyte only).
SECRET_KINDS: dict[str, tuple[str, Callable[..., object], Callable[..., object], str]] = {
    "2fa secret": (
        "twofa_devices",
        lambda app, user, n: app.create_two_factor_device(
            user_id=user, method="totp", secret=f"S{n}"
        ),
        lambda app, id, user: app.update_two_factor_device(id, secret="REWRITTEN"),
        "t.secret_key_id = ",
    ),
    "sso client secret": (
        "sso_providers",
        lambda app, user, n: app.create_sso_provider(
            type="oidc", name=f"p{n}", client_id="c", client_secret=f"cs{n}"
        ),
        lambda app, id, user: app.update_sso_provider(id, client_secret="rewritten"),
        "t.client_secret_key_id = ",
    ),
    "sso signing key": (
        "sso_providers",
        lambda app, user, n: app.create_sso_provider(type="saml", name=f"p{n}", signing_key="k"),
        lambda app, id, user: app.update_sso_provider(id, signing_key="rewritten"),
        "t.signing_key_key_id = ",
    ),
    "oauth tokens": (
        "oauth_accounts",
        lambda app, user, n: app.link_oauth_account(user, "gh", sub=f"s{n}", access_token="a"),
        lambda app, id, user: app.update_oauth_tokens(
            user, "gh", access_token="rewritten", refresh_token=None
        ),
        "oauth_accounts AS a\n",
    ),
}


@pytest.mark.parametrize("secret", SECRET_KINDS)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_swap_locks_its_batch_in_id_order_whatever_the_plan(
    dsn: str, schema: str, kind: str, secret: str
) -> None:
    """The swap locks its rows in id order before it writes any, so that concurrent rotations
    never wait on each other in a cycle, whatever join the planner picks. Here it may only
    pick a hash join, whose order is the table's physical one, and the row with the lowest id
    was re-written (so it lies last) and is held: the swap must wait for it holding no other
    row of its batch (the UPDATE alone would have locked them all first)."""
    table, store, rewrite, statement = SECRET_KINDS[secret]
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as app:
        for n in range(5):
            store(app, app.create_user().id, n)
        with psycopg.connect(dsn) as conn:
            ids = conn.execute(
                f"SELECT id, {'user_id' if table == 'oauth_accounts' else 'NULL'}"
                f" FROM {schema}.{table} ORDER BY id".encode()
            ).fetchall()
        rewrite(app, *ids[0])
    hash_joins = make_conninfo(dsn, options="-c enable_nestloop=off -c enable_mergejoin=off")
    options: dict[str, Any] = {"schema": schema, "encryption_keys": {"old": OLD, "new": NEW}}
    rows = [(table, {"id": id}) for id, _ in ids]

    async def rotate_holding_the_first(storage: Any) -> Any:
        return await call_while_holding(
            storage, dsn, rows[0], "UPDATE", lambda: storage.rotate_keys(batch_size=10),
            waits_on=statement, free=rows[1:], schema=schema,
        )  # fmt: skip

    if kind == "sync":
        with PostgresStorageAdapter(hash_joins, **options) as adapter:
            moved = await rotate_holding_the_first(AwaitableSync(adapter))
    else:
        async with AsyncPostgresStorageAdapter(hash_joins, **options) as async_adapter:
            async_adapter.kind = "async"  # type: ignore[attr-defined]
            moved = await rotate_holding_the_first(async_adapter)
    assert moved == len(ids)


def _seed_shuffled(dsn: str, schema: str, key: dict[str, str], n: int) -> list[Any]:
    """``n`` secrets of every kind rotate_keys handles, under ``key``, then each re-written in a
    random order (as an application does over time), so that the tables' physical order is not
    their id order. Returns (user, device, provider) per row, to read the values back."""
    rows = []
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=key) as app:
        for i in range(n):
            user = app.create_user()
            device = app.create_two_factor_device(user_id=user.id, method="totp", secret=f"S{i}")
            provider = app.create_sso_provider(
                type="oidc", name=f"p{i}", client_id="c", client_secret="x", signing_key="x"
            )
            app.link_oauth_account(user.id, "gh", sub=f"s{i}", access_token="x")
            rows.append((i, user, device, provider))
        shuffled = random.sample(rows, len(rows))
        for i, user, _, _ in shuffled:
            app.update_oauth_tokens(user.id, "gh", access_token=f"a{i}", refresh_token=f"r{i}")
        for i, _, device, provider in shuffled:
            app.update_two_factor_device(device.id, secret=f"SEED{i}")
            app.update_sso_provider(provider.id, client_secret=f"cs{i}", signing_key=f"sk{i}")
    return [(user, device, provider) for _, user, device, provider in rows]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_concurrent_rotations_share_the_work_without_deadlocking(
    dsn: str, schema: str, kind: str
) -> None:
    """Deploys (or an operator, twice) start rotate_keys at once, with batch sizes whose swap
    statements get different plans. Each swap used to lock its rows in its join's output order
    (the array's, which is id order, or the table's physical one): overlapping batches met in
    opposite orders and deadlocked (40P01), in most rounds. Every run must now succeed (no
    retry hides a deadlock: max_retries=0), the counts must add up to every value once, and
    every value must end under the newest key, readable with it alone. Three rounds, each to a
    new key (after the first, from the physical order the previous round's runs left)."""
    n, runs = 400, (5, 40, 100, 200)
    keys = {"k0": generate_key()}
    rows = _seed_shuffled(dsn, schema, keys, n)
    for round_ in range(1, 4):
        keys = {**keys, f"k{round_}": generate_key()}
        options: dict[str, Any] = {"schema": schema, "encryption_keys": keys, "max_retries": 0}
        calls = [((), {"batch_size": size}) for size in runs]
        if kind == "sync":
            with PostgresStorageAdapter(dsn, max_size=len(runs), **options) as adapter:
                results = await race_each(AwaitableSync(adapter), "rotate_keys", calls)
        else:
            async with AsyncPostgresStorageAdapter(dsn, max_size=len(runs), **options) as adapter:
                adapter.kind = "async"  # type: ignore[attr-defined]
                results = await race_each(adapter, "rotate_keys", calls)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert sum(results) == 4 * n  # each value re-encrypted once, by one of the runs
    newest = list(keys)[-1]
    with PostgresStorageAdapter(
        dsn, schema=schema, encryption_keys={newest: keys[newest]}
    ) as after:
        for i, (user, device, provider) in enumerate(rows):
            tokens = after.get_oauth_tokens(user.id, "gh")
            assert tokens is not None
            assert (tokens.access_token, tokens.refresh_token) == (f"a{i}", f"r{i}")
            found_device = after.get_two_factor_device(device.id)
            assert found_device is not None and found_device.secret == f"SEED{i}"
            found = after.get_sso_provider(provider.id)
            assert found is not None
            assert (found.client_secret, found.signing_key) == (f"cs{i}", f"sk{i}")
    with psycopg.connect(dsn) as conn:
        key_ids = conn.execute(
            f"SELECT secret_key_id FROM {schema}.twofa_devices"
            f" UNION SELECT client_secret_key_id FROM {schema}.sso_providers"
            f" UNION SELECT signing_key_key_id FROM {schema}.sso_providers"
            f" UNION SELECT tokens_key_id FROM {schema}.oauth_accounts".encode()
        ).fetchall()
    assert key_ids == [(newest,)]


def test_reading_without_the_old_key_is_a_clear_error(dsn: str, schema: str) -> None:
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as before:
        user = before.create_user()
        before.link_oauth_account(user.id, "gh", sub="s", access_token="a")
    with (
        PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"new": NEW}) as after,
        pytest.raises(EncryptionKeyError, match="'old'"),
    ):
        after.get_oauth_tokens(user.id, "gh")


def test_rotation_never_overwrites_a_secret_rewritten_under_the_old_key(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance still on the old keyring re-enrols a device (a leaked seed replaced) after
    rotation read the row and before it stores the re-encrypted value: the row keeps the new
    seed, and the next pass moves it to the new key."""
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as old_app:
        user = old_app.create_user()
        device = old_app.create_two_factor_device(
            user_id=user.id, method="totp", secret="LEAKEDSEED234567"
        )
        with PostgresStorageAdapter(
            dsn, schema=schema, encryption_keys={"old": OLD, "new": NEW}
        ) as rotating:
            decrypt = rotating._decrypt
            rewritten: list[bool] = []

            def decrypt_then_race(*args: object) -> str | None:
                # Rotation has read the batch and decrypts it now: the old instance writes.
                if not rewritten:
                    old_app.update_two_factor_device(device.id, secret="FRESHSEED2345678")
                    rewritten.append(True)
                return decrypt(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(rotating, "_decrypt", decrypt_then_race)
            # The first pass's swap finds the row changed and stores nothing; the second pass
            # moves the new seed.
            assert rotating.rotate_keys() == 1
            assert rewritten == [True]
            monkeypatch.undo()
            found = rotating.get_two_factor_device(device.id)
            assert found is not None and found.secret == "FRESHSEED2345678"
            assert rotating.rotate_keys() == 0
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"new": NEW}) as after:
        found = after.get_two_factor_device(device.id)
        assert found is not None and found.secret == "FRESHSEED2345678"


@pytest.mark.parametrize(
    ("change", "secret"),
    [
        ({"name": "renamed"}, "FIRSTSEED2345678"),
        ({"secret": "FRESHSEED2345678"}, "FRESHSEED2345678"),
    ],
)
def test_a_swap_that_waits_for_an_application_write_keeps_it(
    dsn: str, schema: str, change: dict[str, Any], secret: str
) -> None:
    """The swap locks its rows before writing: one an application transaction holds is waited
    for, then checked again. A change to another column is kept (the swap writes the secret
    alone); a secret re-written under the old key fails the compare-and-swap, and the next pass
    moves the new one."""
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as old_app:
        user = old_app.create_user()
        device = old_app.create_two_factor_device(
            user_id=user.id, method="totp", secret="FIRSTSEED2345678"
        )
        keys = {"old": OLD, "new": NEW}
        with PostgresStorageAdapter(dsn, schema=schema, encryption_keys=keys) as rotating:
            done: list[int] = []
            with old_app.transaction() as tx, psycopg.connect(dsn, autocommit=True) as watch:
                tx.update_two_factor_device(device.id, **change)
                worker = threading.Thread(target=lambda: done.append(rotating.rotate_keys()))
                worker.start()
                waiting = (
                    "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    f" AND query LIKE '%{schema}.twofa_devices%')"
                ).encode()
                while worker.is_alive() and watch.execute(waiting).fetchone() != (True,):
                    pass  # until the swap waits for this transaction's row lock
            worker.join()
            assert done == [1]
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"new": NEW}) as after:
        found = after.get_two_factor_device(device.id)
        assert found is not None and found.secret == secret
        assert found.name == change.get("name")


def test_rotation_reports_secrets_an_old_writer_keeps_rewriting(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process still on the old keyring re-writes the secret during every pass: the call
    ends with an error that says so, not with a count that looks like success."""
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as old_app:
        user = old_app.create_user()
        device = old_app.create_two_factor_device(
            user_id=user.id, method="totp", secret="FIRSTSEED2345678"
        )
        with PostgresStorageAdapter(
            dsn, schema=schema, encryption_keys={"old": OLD, "new": NEW}
        ) as rotating:
            decrypt = rotating._decrypt

            def decrypt_then_race(*args: object) -> str | None:
                old_app.update_two_factor_device(device.id, secret="RACINGSEED234567")
                return decrypt(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(rotating, "_decrypt", decrypt_then_race)
            with pytest.raises(ConflictError, match="still under an older key") as caught:
                rotating.rotate_keys()
            assert caught.value.code == "stale_secrets"
            monkeypatch.undo()
            assert rotating.rotate_keys() == 1  # the old writer has stopped: it completes


def _refused_then_rotated_by_the_superuser(dsn: str, role: str, schema: str, why: str) -> None:
    """rotate_keys as ``role`` raises PermissionDeniedError matching ``why``; as the
    superuser (who sees every row) it moves the one provider secret."""
    keys = {"old": OLD, "new": NEW}
    options: dict[str, Any] = {"schema": schema, "optional_migrations": ["tenant_rls"]}
    with (
        PostgresStorageAdapter(
            make_conninfo(dsn, user=role), encryption_keys=keys, **options
        ) as as_role,
        pytest.raises(PermissionDeniedError, match=why),
    ):
        as_role.rotate_keys()
    with PostgresStorageAdapter(dsn, encryption_keys=keys, **options) as superuser:
        assert superuser.rotate_keys() == 1


def test_rotation_as_a_role_row_security_filters_is_refused(
    dsn: str, schema: str, login_role: str
) -> None:
    """Under tenant_rls an application role sees only its tenant's rows: a rotation run by it
    would leave the others under the old key, so it refuses; the owner sees them all."""
    with PostgresStorageAdapter(
        dsn, schema=schema, encryption_keys={"old": OLD}, optional_migrations=["tenant_rls"]
    ) as owner:
        owner.grant_app_role(login_role)
        org = owner.create_organization(name="Acme", plan="free")
        owner.create_sso_provider(type="oidc", name="Okta", org_id=org.id, client_secret="s")
    _refused_then_rotated_by_the_superuser(dsn, login_role, schema, "schema owner")


def test_rotation_by_an_owner_tenant_rls_was_not_applied_by_is_refused(
    dsn: str, schema: str, login_role: str, owner_dsn: str
) -> None:
    """tenant_rls gives every row to the role that applied it (owner_access), which need not be
    the tables' owner: a superuser may apply it to a schema another role owns. That owner then
    sees no organization's provider, and must be refused rather than report success."""
    with PostgresStorageAdapter(owner_dsn, schema=schema, encryption_keys={"old": OLD}) as owner:
        org = owner.create_organization(name="Acme", plan="free")
        owner.create_sso_provider(type="oidc", name="Okta", org_id=org.id, client_secret="s")
    with PostgresStorageAdapter(dsn, schema=schema, optional_migrations=["tenant_rls"]):
        pass  # the superuser applies tenant_rls
    _refused_then_rotated_by_the_superuser(dsn, login_role, schema, "applied tenant_rls")


# The policies beside tenant_rls's that must make rotate_keys, run by the role that applied
# tenant_rls, refuse: those that keep rows from its reads or updates (it would pass over them and
# report success), including a WITH CHECK its updates fail; and only those.
ROTATION_REFUSED = frozenset(
    {
        "a restrictive policy on updates only",
        "a restrictive policy that hides rows",
        "owner_access for reads only",
        "owner_access restrictive",
        "owner_access with a WITH CHECK",
    }
)


@pytest.mark.parametrize("case", POLICIES_BESIDE_TENANT_RLS)
def test_rotation_by_the_role_that_applied_tenant_rls_refuses_only_when_a_policy_hides_rows(
    dsn: str, schema: str, login_role: str, owner_dsn: str, case: str
) -> None:
    """The role that applied tenant_rls (here not a superuser) rotates every tenant's secrets:
    its owner_access policy shows it every row. Only a policy that keeps rows from its reads
    or updates makes it refuse, and then nothing is re-encrypted."""
    refused = case in ROTATION_REFUSED
    options: dict[str, Any] = {"schema": schema, "optional_migrations": ["tenant_rls"]}
    with PostgresStorageAdapter(owner_dsn, encryption_keys={"old": OLD}, **options) as owner:
        providers = [
            owner.create_sso_provider(
                type="oidc",
                name=f"IdP {n}",
                org_id=owner.create_organization(name=f"Tenant {n}", plan="free").id,
                client_secret=f"secret-{n}",
            ).id
            for n in range(2)
        ]
    set_policies(dsn, case, f"{schema}.sso_providers", login_role)
    keys = {"old": OLD, "new": NEW}
    with PostgresStorageAdapter(owner_dsn, encryption_keys=keys, **options) as owner:
        if refused:
            with pytest.raises(PermissionDeniedError, match="row-level security hides"):
                owner.rotate_keys()
        else:
            assert owner.rotate_keys() == 2
    with PostgresStorageAdapter(dsn, encryption_keys={"new": NEW}, **options) as superuser:
        if refused:  # nothing moved: the new key alone cannot read them
            with pytest.raises(EncryptionKeyError):
                superuser.get_sso_provider(providers[0])
        else:
            secrets = [superuser.get_sso_provider(id) for id in providers]
            assert [p.client_secret if p else None for p in secrets] == ["secret-0", "secret-1"]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_rotation_and_a_users_deletion_do_not_deadlock(
    dsn: str, schema: str, kind: str
) -> None:
    """Found in the fourth review: a swap locked a user's OAuth links in id order (the order
    they were made), a deletion of the user reaches them through the cascade in provider order,
    and the two deadlocked. Played without timing, on adapters that do not retry: a holder
    keeps the github link (made second, first by provider); the deletion locks the user and
    waits for it; the rotation starts. It now locks the links' users first, so it waits for the
    deletion before it holds any link."""
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as before:
        user = before.create_user()
        before.link_oauth_account(user.id, "google", sub="g", access_token="a", refresh_token="r")
        before.link_oauth_account(user.id, "github", sub="h", access_token="a", refresh_token="r")
    options: dict[str, Any] = {"schema": schema, "encryption_keys": {"old": OLD, "new": NEW}}
    async with unretried_adapter(kind, dsn, migrate=False, **options) as own:
        results = await two_calls_queued_on(
            dsn,
            ("oauth_accounts", {"provider": "github"}),
            lambda: start(own, "delete_user", user.id),
            f"DELETE FROM {schema}.users",
            lambda: start(own, "rotate_keys"),
            schema=schema,
        )
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[0] is True


@pytest.mark.parametrize("secret", ["client_secret", "signing_key", "2fa"])
async def test_a_rotation_and_an_owners_deletion_do_not_deadlock_whatever_the_row_order(
    dsn: str, schema: str, secret: str
) -> None:
    """As above for SSO providers (an organization's deletion) and 2FA devices (a user's): the
    cascade reaches an owner's rows in their physical order, the swap in id order, and those
    differ once a row takes the place of one deleted and vacuumed away (here the newest row
    lies first). The holder keeps that row, which the deletion reaches first and the swap
    last: the swap must wait for the deletion at the owner, holding no row, rather than hold
    the older rows and wait for it (a mutant run found no test of the owners' lock for these
    kinds)."""
    options: dict[str, Any] = {"schema": schema, "encryption_keys": {"old": OLD}}
    with PostgresStorageAdapter(dsn, **options) as before:
        owner = "user" if secret == "2fa" else "organization"
        if owner == "organization":
            org = before.create_organization(name="Acme", plan="team")
            table, delete, target = "sso_providers", "delete_organization", org.id

            def make(n: int) -> Any:
                secrets: dict[str, Any] = {secret: "s"}
                return before.create_sso_provider(
                    type="oidc", name=f"p{n}", org_id=org.id, **secrets
                )

            def drop(row: Any) -> None:
                before.delete_sso_provider(row.id)
        else:
            user = before.create_user()
            table, delete, target = "twofa_devices", "delete_user", user.id

            def make(n: int) -> Any:
                return before.create_two_factor_device(
                    user_id=user.id, method="totp", secret=f"S{n}"
                )

            def drop(row: Any) -> None:
                before.delete_two_factor_device(row.id)

        gone, *older = [make(n) for n in range(3)]
        drop(gone)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"VACUUM {schema}.{table}".encode())
            newest = make(3)  # in the slot the vacuum freed: first in physical order
            order = conn.execute(
                f"SELECT id FROM {schema}.{table} ORDER BY ctid".encode()
            ).fetchall()
        assert [r[0] for r in order] == [newest.id, *(r.id for r in older)]
    options["encryption_keys"] = {"old": OLD, "new": NEW}
    async with unretried_adapter("async", dsn, migrate=False, **options) as own:
        results = await two_calls_queued_on(
            dsn,
            (table, {"id": newest.id}),
            lambda: start(own, delete, target),
            f"DELETE FROM {schema}.{'organizations' if owner == 'organization' else 'users'}",
            lambda: start(own, "rotate_keys"),
            schema=schema,
        )
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[0] is True


@pytest.mark.parametrize(
    "marker",
    [
        "SET secret_ciphertext",
        "SET client_secret_ciphertext",
        "SET signing_key_ciphertext",
        "SET access_token_ciphertext",
    ],
    ids=["twofa", "sso-client-secret", "sso-signing-key", "oauth-tokens"],
)
def test_a_swap_whose_acknowledgement_was_lost_is_counted(
    dsn: str, schema: str, marker: str
) -> None:
    """Found in review: a swap that committed but whose reply was lost is retried, and the
    retry's compare-and-swap finds the new key in place and changes nothing: the run returned
    one value short (kitium-pg rotate-keys printed "nothing to re-encrypt" for a run that
    re-encrypted the only stale value). A row holding this call's own new ciphertext counts
    as swapped."""
    with PostgresStorageAdapter(dsn, schema=schema, encryption_keys={"old": OLD}) as before:
        user = before.create_user()
        before.link_oauth_account(user.id, "gh", sub="s", access_token="a", refresh_token="r")
        before.create_two_factor_device(user_id=user.id, method="totp", secret="JBSWY3DPEHPK3PXP")
        before.create_sso_provider(
            type="oidc", name="Okta", client_id="cid", client_secret="cs", signing_key="sk"
        )
    keys = {"old": OLD, "new": NEW}
    with (
        CuttingProxy(dsn) as proxy,
        PostgresStorageAdapter(proxy.dsn, schema=schema, encryption_keys=keys) as rotating,
    ):
        proxy.arm(marker)
        done = rotating.rotate_keys()
        assert proxy.wait_cut(0), "the swap's reply was not cut"
    assert done == 4


async def test_a_swap_retried_behind_its_own_open_first_attempt_is_counted(
    storage: Any, dsn: str
) -> None:
    """The retry of a swap whose first attempt is still open (its acknowledgement lost, its
    commit slow) waits for that attempt's row lock and then finds the row holding its own new
    ciphertext: counted from the row as locked, not from the statement's snapshot, where the
    row still had the old one."""
    user = await storage.create_user()
    device = await storage.create_two_factor_device(
        user_id=user.id, method="totp", secret="JBSWY3DPEHPK3PXP"
    )
    adapter = storage.adapter if storage.kind == "sync" else storage
    stored = adapter._encrypt("twofa_devices.secret", device.id, "JBSWY3DPEHPK3PXP")
    # The swap moves the value to another key id than the one it is under, as a rotation does
    # (the ciphertext's key does not matter to the count).
    new_key_id = "test-old" if stored[0] != "test-old" else "test-new"
    with psycopg.connect(dsn) as conn:
        key_id, ciphertext = conn.execute(
            "SELECT secret_key_id, secret_ciphertext FROM kitium_auth.twofa_devices WHERE id = %s",
            [device.id],
        ).fetchone() or (None, None)
    params = {
        "ids": [device.id],
        "old_key_ids": [key_id],
        "old_ciphertexts": [ciphertext],
        "key_id": new_key_id,
        "ciphertexts": [stored[1]],
    }
    first, retried = await replay_behind_open_attempt(
        storage, dsn, "reencrypt_twofa_secrets", params, waits_on="twofa_devices"
    )
    assert first == (1,)
    assert retried == 1

"""SSO providers (encrypted secrets, domains, home-realm discovery), links and sessions, against
both adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter
from kitium_pg._async import sso as sso_async
from kitium_pg._sync import sso as sso_sync
from kitium_pg.encryption import ENV_VAR
from kitium_pg.errors import ConflictError, EncryptionKeyError, NotFoundError, ValidationError
from kitium_pg.records import SsoDomain, SsoLink, SsoProvider, SsoSession, User
from tests.conftest import AwaitableSync

from .fix_disguised import Disguised
from .fix_holder import call_while_holding, waiting
from .fix_metadata import check_metadata_patch
from .fix_race import race_each, start
from .roundtrips import round_trips

CLIENT_SECRET = "oidc-client-secret-7f3a9c"
SIGNING_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
)


def _in(**delta: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(**delta)


def _raw(dsn: str, sql: str, *params: Any) -> Any:
    """One row of ``sql`` read straight from the database (bypassing the adapter)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchone()


def _stored(dsn: str, provider_id: uuid.UUID) -> Any:
    return _raw(
        dsn,
        "SELECT client_secret_ciphertext, client_secret_key_id, signing_key_ciphertext,"
        " signing_key_key_id FROM kitium_auth.sso_providers WHERE id = %s",
        provider_id,
    )


LOGOUT = "FROM kitium_auth.sso_providers AS p WHERE p.id"
"""Text in the start of both single-logout statements, which a waiting logout shows in
pg_stat_activity (its query is cut at track_activity_query_size, 1 kB by default)."""


async def _oidc(storage: Any, unique: Callable[[str], str], **kw: Any) -> SsoProvider:
    provider: SsoProvider = await storage.create_sso_provider(
        type="oidc", name=unique("idp"), client_id="client", client_secret=CLIENT_SECRET, **kw
    )
    return provider


async def _user(storage: Any, unique: Callable[[str], str]) -> User:
    user: User = await storage.create_user(email=f"{unique('u')}@example.com")
    return user


async def _link_and_session(storage: Any, user: User, provider: SsoProvider) -> tuple[Any, Any]:
    """An SSO link and an SSO session of ``user`` at ``provider`` (subject ``s``)."""
    bound = {"user_id": user.id, "provider_id": provider.id, "provider_type": provider.type}
    link = await storage.create_sso_link(**bound, provider_subject="s")
    session = await storage.create_sso_session(
        **bound, provider_subject="s", expires_at=_in(hours=1)
    )
    return link, session


# -- providers ----------------------------------------------------------------------------------


async def test_create_and_get_round_trip(storage: Any, unique: Callable[[str], str]) -> None:
    org = await storage.create_organization(name="Acme", plan="team")
    domain = f"{unique('acme')}.example"
    provider = await storage.create_sso_provider(
        type="saml",
        name="Acme SAML",
        org_id=str(org.id),
        metadata_url="https://idp.example/metadata",
        client_id="client-1",
        client_secret=CLIENT_SECRET,
        token_endpoint_auth_method="client_secret_basic",
        idp_entity_id="https://idp.example/entity",
        idp_sso_url="https://idp.example/sso",
        idp_slo_url="https://idp.example/slo",
        idp_certificate="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        sp_entity_id="https://sp.example/entity",
        sp_acs_url="https://sp.example/acs",
        sp_slo_url="https://sp.example/slo",
        signing_cert="-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----",
        signing_key=SIGNING_KEY,
        encryption_enabled=True,
        force_authn=True,
        scopes=["openid", "email"],
        redirect_uris=["https://app.example/cb"],
        claim_mapping={"email": "mail"},
        attribute_mapping={"name": ["givenName", "sn"]},
        metadata={"tier": 1},
        domains=[domain.upper(), f"eu.{domain}"],
    )
    assert isinstance(provider, SsoProvider)
    assert provider.id.version == 7
    assert (provider.type, provider.name, provider.org_id) == ("saml", "Acme SAML", org.id)
    assert (provider.client_secret, provider.signing_key) == (CLIENT_SECRET, SIGNING_KEY)
    assert (provider.encryption_enabled, provider.force_authn) == (True, True)
    assert provider.scopes == ("openid", "email")
    assert provider.redirect_uris == ("https://app.example/cb",)
    assert provider.claim_mapping == {"email": "mail"}
    assert provider.attribute_mapping == {"name": ["givenName", "sn"]}
    assert provider.metadata == {"tier": 1}
    # Domains are stored lowercase, unverified, in domain order.
    assert provider.domains == (
        SsoDomain(domain=domain, verified_at=None),
        SsoDomain(domain=f"eu.{domain}", verified_at=None),
    )
    assert provider.created_at.tzinfo is dt.UTC
    assert await storage.get_sso_provider(provider.id) == provider
    assert await storage.get_sso_provider(str(provider.id)) == provider


async def test_create_with_defaults(storage: Any, unique: Callable[[str], str]) -> None:
    provider = await storage.create_sso_provider(type="oidc", name=unique("bare"))
    assert provider.client_secret is None
    assert provider.signing_key is None
    assert provider.org_id is None
    assert provider.metadata_url is None
    assert (provider.encryption_enabled, provider.force_authn) == (False, False)
    assert (provider.scopes, provider.redirect_uris, provider.domains) == ((), (), ())
    assert (provider.claim_mapping, provider.attribute_mapping, provider.metadata) == ({}, {}, {})
    assert await storage.get_sso_provider(provider.id) == provider


async def test_secrets_are_stored_only_as_ciphertext(
    storage: Any, unique: Callable[[str], str], dsn: str, encryption_keys: dict[str, str]
) -> None:
    provider = await _oidc(storage, unique, signing_key=SIGNING_KEY)
    secret_blob, secret_kid, key_blob, key_kid = _stored(dsn, provider.id)
    current = list(encryption_keys)[-1]
    assert (secret_kid, key_kid) == (current, current)
    assert CLIENT_SECRET.encode() not in secret_blob
    assert SIGNING_KEY.encode() not in key_blob
    assert b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in key_blob
    # Random nonces: the same plaintext never gives the same ciphertext.
    other = await _oidc(storage, unique)
    assert _stored(dsn, other.id)[0] != secret_blob
    # No other column holds the plaintext either.
    row = _raw(dsn, "SELECT p::text FROM kitium_auth.sso_providers AS p WHERE id = %s", provider.id)
    assert CLIENT_SECRET not in row[0]
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in row[0]


async def test_a_ciphertext_moved_to_another_row_fails_to_decrypt(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    source = await _oidc(storage, unique)
    victim = await storage.create_sso_provider(type="oidc", name=unique("victim"))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE kitium_auth.sso_providers AS v"
                "   SET client_secret_ciphertext = s.client_secret_ciphertext,"
                "       client_secret_key_id = s.client_secret_key_id"
                "  FROM kitium_auth.sso_providers AS s WHERE s.id = %s AND v.id = %s",
                [source.id, victim.id],
            )
        with pytest.raises(EncryptionKeyError, match="does not authenticate"):
            await storage.get_sso_provider(victim.id)
        # An update of another field is saved; the error says so, since only the returned
        # record failed (it passed for a refused write).
        # Also for a call with a transaction-local setting, which commits a transaction of its
        # own.
        for view, name in ((storage, "renamed"), (storage.with_statement_timeout(5000), "again")):
            with pytest.raises(EncryptionKeyError, match="the change is saved"):
                await view.update_sso_provider(victim.id, name=name)
            with psycopg.connect(dsn) as conn:
                row = conn.execute(
                    "SELECT name FROM kitium_auth.sso_providers WHERE id = %s", [victim.id]
                ).fetchone()
            assert row == (name,)
        # The same ciphertext moved to the other secret column of its own row fails too.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE kitium_auth.sso_providers"
                "   SET signing_key_ciphertext = client_secret_ciphertext,"
                "       signing_key_key_id = client_secret_key_id WHERE id = %s",
                [source.id],
            )
        with pytest.raises(EncryptionKeyError, match="does not authenticate"):
            await storage.get_sso_provider(source.id)
    finally:
        # Undecryptable rows would break every later list_sso_providers call.
        await storage.delete_sso_provider(victim.id)
        await storage.delete_sso_provider(source.id)


async def test_without_a_key_secrets_are_refused_and_nothing_is_written(
    storage: Any, unique: Callable[[str], str], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    encrypted = await _oidc(storage, unique)
    name = unique("keyless")

    async def check(keyless: Any) -> None:
        for secret in ({"client_secret": CLIENT_SECRET}, {"signing_key": SIGNING_KEY}):
            with pytest.raises(EncryptionKeyError, match=ENV_VAR):
                await keyless.create_sso_provider(type="oidc", name=name, **secret)
        with pytest.raises(EncryptionKeyError):
            await keyless.update_sso_provider(encrypted.id, client_secret="new", name="changed")
        with pytest.raises(EncryptionKeyError):  # reading a secret needs its key too
            await keyless.get_sso_provider(encrypted.id)
        # A provider without secrets needs no key.
        plain = await keyless.create_sso_provider(type="saml", name=unique("plain"))
        assert await keyless.get_sso_provider(plain.id) == plain
        assert await keyless.delete_sso_provider(plain.id) is True

    if storage.kind == "sync":
        with PostgresStorageAdapter(dsn, max_size=2) as sync_keyless:
            await check(AwaitableSync(sync_keyless))
    else:
        async with AsyncPostgresStorageAdapter(dsn, max_size=2) as async_keyless:
            await check(async_keyless)
    count = _raw(dsn, "SELECT count(*) FROM kitium_auth.sso_providers WHERE name = %s", name)
    assert count == (0,)
    assert await storage.get_sso_provider(encrypted.id) == encrypted


async def test_repr_hides_secrets(storage: Any, unique: Callable[[str], str]) -> None:
    provider = await _oidc(storage, unique, signing_key=SIGNING_KEY)
    text = repr(provider)
    assert CLIENT_SECRET not in text
    assert "PRIVATE KEY" not in text
    assert "client_secret" not in text
    assert "signing_key" not in text
    assert provider.name in text


async def test_lookups_of_unknown_or_malformed_ids(storage: Any) -> None:
    assert await storage.get_sso_provider(uuid.uuid4()) is None
    assert await storage.get_sso_link(uuid.uuid4()) is None
    assert await storage.get_sso_session(uuid.uuid4()) is None
    for bad in ("nope", "", "x" * 10_000, 42, None):
        assert await storage.get_sso_provider(bad) is None
        assert await storage.delete_sso_provider(bad) is False
        assert await storage.get_sso_link(bad) is None
        assert await storage.get_user_sso_links(bad) == []
        assert await storage.delete_sso_link(bad) is False
        assert await storage.get_sso_session(bad) is None
        assert await storage.remove_sso_provider_domain(bad, "example.com") is False
    assert await storage.list_sso_providers("nope") == []


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("type", {"type": "ldap"}),
        ("type", {"type": None}),
        ("name", {"name": ""}),
        ("org_id", {"org_id": "not-a-uuid"}),
        ("idp_sso_url", {"idp_sso_url": "https://x.example/" + "a" * 2048}),
        ("redirect_uris[0]", {"redirect_uris": ["https://x.example/" + "a" * 2048]}),
        ("redirect_uris", {"redirect_uris": "https://x.example/cb"}),
        ("scopes", {"scopes": "openid"}),
        ("encryption_enabled", {"encryption_enabled": "yes"}),
        ("client_secret", {"client_secret": ""}),
        ("claim_mapping", {"claim_mapping": ["not", "an", "object"]}),
        ("domains[0]", {"domains": ["not a domain"]}),
        ("domains[0]", {"domains": ["bücher.example"]}),
        ("domains[1]", {"domains": ["a.example", "A.EXAMPLE"]}),
        ("domains", {"domains": "a.example"}),
        # A str subclass is checked by what it holds (found in review: stored past the limit).
        ("metadata_url", {"metadata_url": Disguised("https://x.example/" + "a" * 2048)}),
        ("client_id", {"client_id": Disguised("c" * 300)}),
        ("scopes[0]", {"scopes": [Disguised("s" * 300)]}),
        ("name", {"name": Disguised("a\x00b")}),
    ],
)
async def test_create_validates_input(
    storage: Any, unique: Callable[[str], str], field: str, kwargs: dict[str, Any]
) -> None:
    args = {"type": "oidc", "name": unique("bad"), **kwargs}
    with pytest.raises(ValidationError) as caught:
        await storage.create_sso_provider(**args)
    assert caught.value.field == field


async def test_create_with_unknown_org_writes_nothing(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    name = unique("orphan")
    with pytest.raises(NotFoundError):
        await storage.create_sso_provider(
            type="oidc", name=name, org_id=uuid.uuid4(), domains=[f"{name}.example"]
        )
    assert _raw(dsn, "SELECT count(*) FROM kitium_auth.sso_providers WHERE name = %s", name) == (0,)


async def test_update_changes_only_given_fields(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    provider = await _oidc(storage, unique, scopes=["openid"], metadata={"a": 1})
    blob = _stored(dsn, provider.id)[0]
    updated = await storage.update_sso_provider(
        provider.id, name="Renamed", force_authn=True, idp_slo_url=None, claim_mapping={"x": "y"}
    )
    assert (updated.name, updated.force_authn, updated.claim_mapping) == (
        "Renamed",
        True,
        {"x": "y"},
    )
    assert updated.client_secret == CLIENT_SECRET
    assert (updated.scopes, updated.metadata, updated.client_id) == (
        ("openid",),
        {"a": 1},
        "client",
    )
    assert updated.updated_at >= provider.updated_at
    assert updated.created_at == provider.created_at
    assert await storage.get_sso_provider(provider.id) == updated
    # Nothing given: the row comes back as it was (updated_at aside).
    same = await storage.update_sso_provider(str(provider.id))
    assert (same.name, same.client_secret) == ("Renamed", CLIENT_SECRET)
    assert _stored(dsn, provider.id)[0] == blob  # updates without a secret keep its ciphertext


async def test_update_patches_metadata_in_place(storage: Any, unique: Callable[[str], str]) -> None:
    provider = await _oidc(storage, unique)
    await check_metadata_patch(
        storage, "update_sso_provider", "get_sso_provider", provider.id, force_authn=True
    )


async def test_update_reencrypts_and_clears_secrets(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    provider = await _oidc(storage, unique)
    old_blob = _stored(dsn, provider.id)[0]
    updated = await storage.update_sso_provider(
        provider.id, client_secret="rotated-secret", signing_key=SIGNING_KEY
    )
    assert (updated.client_secret, updated.signing_key) == ("rotated-secret", SIGNING_KEY)
    new_blob, kid, key_blob, _ = _stored(dsn, provider.id)
    assert new_blob != old_blob
    assert b"rotated-secret" not in new_blob
    assert kid is not None
    assert SIGNING_KEY.encode() not in key_blob
    assert await storage.get_sso_provider(provider.id) == updated
    cleared = await storage.update_sso_provider(provider.id, client_secret=None)
    assert (cleared.client_secret, cleared.signing_key) == (None, SIGNING_KEY)
    assert _stored(dsn, provider.id)[:2] == (None, None)


async def test_update_errors(storage: Any, unique: Callable[[str], str]) -> None:
    provider = await _oidc(storage, unique)
    with pytest.raises(NotFoundError):
        await storage.update_sso_provider(uuid.uuid4(), name="ghost")
    with pytest.raises(NotFoundError):
        await storage.update_sso_provider(provider.id, org_id=uuid.uuid4())
    with pytest.raises(ValidationError):
        await storage.update_sso_provider("nope", name="x")
    with pytest.raises(ValidationError):
        await storage.update_sso_provider(provider.id, name=None)
    with pytest.raises(TypeError):
        await storage.update_sso_provider(provider.id, type="saml")  # type cannot change
    assert await storage.get_sso_provider(provider.id) == provider


async def test_update_replaces_domains_keeping_verification(
    storage: Any, unique: Callable[[str], str]
) -> None:
    base = unique("realm")
    keep, drop, new = f"keep.{base}.example", f"drop.{base}.example", f"new.{base}.example"
    provider = await _oidc(storage, unique, domains=[keep, drop])
    verified = await storage.verify_sso_provider_domain(provider.id, keep)
    updated = await storage.update_sso_provider(provider.id, domains=[new.upper(), keep])
    assert updated.domains == (verified, SsoDomain(domain=new, verified_at=None))
    assert (await storage.get_sso_provider(provider.id)).domains == updated.domains
    emptied = await storage.update_sso_provider(provider.id, domains=[])
    assert emptied.domains == ()
    assert await storage.get_sso_provider_by_domain(keep) is None


async def test_delete_cascades(storage: Any, unique: Callable[[str], str]) -> None:
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique, domains=[f"{unique('gone')}.example"])
    link, session = await _link_and_session(storage, user, provider)
    assert await storage.delete_sso_provider(provider.id) is True
    assert await storage.delete_sso_provider(provider.id) is False
    assert await storage.get_sso_provider(provider.id) is None
    assert await storage.get_sso_link(link.id) is None
    assert await storage.get_sso_session(session.id) is None


async def test_list_by_org_includes_global_providers(
    storage: Any, unique: Callable[[str], str]
) -> None:
    org = await storage.create_organization(name="Mine", plan="team")
    other = await storage.create_organization(name="Theirs", plan="team")
    mine = await _oidc(storage, unique, org_id=org.id)
    theirs = await _oidc(storage, unique, org_id=other.id)
    global_ = await _oidc(storage, unique)
    newer_mine = await _oidc(storage, unique, org_id=org.id)

    listed = await storage.list_sso_providers(org.id)
    ids = [p.id for p in listed]
    assert mine.id in ids
    assert newer_mine.id in ids
    assert global_.id in ids
    assert theirs.id not in ids
    assert all(p.org_id in (org.id, None) for p in listed)
    assert ids.index(newer_mine.id) < ids.index(global_.id) < ids.index(mine.id)  # newest first
    assert listed[ids.index(mine.id)] == mine  # secrets decrypted in lists too

    everything = [p.id for p in await storage.list_sso_providers()]
    assert {mine.id, theirs.id, global_.id, newer_mine.id} <= set(everything)
    assert await storage.list_sso_providers(str(org.id)) == listed


# -- domains and home-realm discovery -----------------------------------------------------------


def test_two_verified_adds_of_one_new_domain_to_one_provider_both_succeed(
    sync_one: PostgresStorageAdapter, dsn: str
) -> None:
    """Found in review: ON CONFLICT chooses between insert and update on the primary key
    (provider_id, domain) alone. Two verified adds of one new domain to one provider that both
    found no row there both inserted, and the second failed on sso_provider_domains__domain_key
    (a verified domain has one provider) with ConflictError where adding again is a no-op. The
    statement itself, sent by two connections at once, 1,000 times (about 1 in 80 failed
    before: 13 of 1,000); now the second waits for the first on the provider's row."""
    provider = sync_one.create_sso_provider(
        type="oidc", name=f"idp-{uuid.uuid4().hex[:8]}", client_id="c", client_secret="s"
    )
    statement = sync_one._queries["add_sso_provider_domain"].sql
    connections = [psycopg.connect(dsn, autocommit=True) for _ in range(2)]
    failures: list[psycopg.Error] = []
    try:
        for _ in range(1000):
            params = {"provider_id": provider.id, "domain": f"{uuid.uuid4().hex}.example"}
            barrier = threading.Barrier(2)

            def add(
                conn: psycopg.Connection[Any],
                params: dict[str, Any] = params,
                barrier: threading.Barrier = barrier,
            ) -> None:
                barrier.wait()
                try:
                    conn.execute(statement, {**params, "verified": True})
                except psycopg.Error as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=add, args=(conn,)) for conn in connections]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for conn in connections:
            conn.close()
    assert failures == []
    stored = sync_one.get_sso_provider(provider.id)
    assert stored is not None
    assert len(stored.domains) == 1000 and all(d.verified_at for d in stored.domains)


async def test_domain_lifecycle(storage: Any, unique: Callable[[str], str]) -> None:
    provider = await _oidc(storage, unique)
    domain = f"{unique('corp')}.example"
    added = await storage.add_sso_provider_domain(provider.id, domain.upper())
    assert added == SsoDomain(domain=domain, verified_at=None)
    assert await storage.add_sso_provider_domain(provider.id, domain) == added  # idempotent
    assert await storage.get_sso_provider_by_domain(domain) is None  # unverified: no routing

    verified = await storage.verify_sso_provider_domain(provider.id, domain)
    assert verified.domain == domain
    assert verified.verified_at is not None
    assert verified.verified_at.tzinfo is dt.UTC
    assert await storage.verify_sso_provider_domain(provider.id, domain) == verified
    # Adding it again (unverified) never un-verifies it.
    assert await storage.add_sso_provider_domain(provider.id, domain) == verified
    assert (await storage.get_sso_provider(provider.id)).domains == (verified,)

    assert await storage.remove_sso_provider_domain(provider.id, domain.upper()) is True
    assert await storage.remove_sso_provider_domain(provider.id, domain) is False
    assert await storage.remove_sso_provider_domain(provider.id, "not a domain") is False
    assert await storage.get_sso_provider_by_domain(domain) is None


async def test_add_verified_and_errors(storage: Any, unique: Callable[[str], str]) -> None:
    provider = await _oidc(storage, unique)
    domain = f"{unique('fast')}.example"
    added = await storage.add_sso_provider_domain(provider.id, domain, verified=True)
    assert added.verified_at is not None
    assert (await storage.get_sso_provider_by_domain(domain)).id == provider.id
    with pytest.raises(NotFoundError):
        await storage.add_sso_provider_domain(uuid.uuid4(), f"{unique('x')}.example")
    with pytest.raises(NotFoundError):
        await storage.verify_sso_provider_domain(provider.id, f"{unique('never')}.example")
    for bad in ("", "a b.example", "-a.example", "a..example", "bücher.example", "x" * 300, 42):
        with pytest.raises(ValidationError):
            await storage.add_sso_provider_domain(provider.id, bad)
    with pytest.raises(ValidationError):
        await storage.add_sso_provider_domain(provider.id, domain, verified="yes")


async def test_a_verified_domain_belongs_to_one_provider(
    storage: Any, unique: Callable[[str], str]
) -> None:
    domain = f"{unique('contested')}.example"
    first = await _oidc(storage, unique, domains=[domain])
    second = await _oidc(storage, unique, domains=[domain])  # unverified claims may overlap
    await storage.verify_sso_provider_domain(first.id, domain)
    with pytest.raises(ConflictError) as caught:
        await storage.verify_sso_provider_domain(second.id, domain)
    assert "sso_provider_domains__domain_key" in str(caught.value)
    with pytest.raises(ConflictError):
        await storage.add_sso_provider_domain(second.id, domain, verified=True)
    assert (await storage.get_sso_provider(second.id)).domains == (
        SsoDomain(domain=domain, verified_at=None),
    )
    assert (await storage.get_sso_provider_by_domain(domain)).id == first.id
    # Once the first provider lets go, the second may verify it.
    assert await storage.remove_sso_provider_domain(first.id, domain) is True
    await storage.verify_sso_provider_domain(second.id, domain)
    assert (await storage.get_sso_provider_by_domain(domain)).id == second.id


async def test_home_realm_discovery_by_email_or_domain(
    storage: Any, unique: Callable[[str], str]
) -> None:
    domain = f"{unique('hrd')}.example"
    provider = await _oidc(storage, unique, domains=[domain])
    await storage.verify_sso_provider_domain(provider.id, domain)
    found = await storage.get_sso_provider_by_domain(f"Ada.Lovelace@{domain.upper()}")
    assert found is not None
    assert found.id == provider.id
    assert found.client_secret == CLIENT_SECRET
    assert await storage.get_sso_provider_by_domain(domain) == found
    assert await storage.get_sso_provider_by_domain(f'"odd@local"@{domain}') == found
    assert await storage.get_sso_provider_by_domain(f"ada@sub.{domain}") is None  # exact only
    for bad in ("", "@", "ada@", "not a domain", "x" * 10_000, "bad\x00.example", None, 42):
        assert await storage.get_sso_provider_by_domain(bad) is None


async def test_home_realm_discovery_of_an_internationalised_domain(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """A verified ``xn--`` domain also routes the Unicode spelling users type (and
    ``create_user`` accepts), so an application enforcing SSO by domain does not fail open for
    it; a name whose ``xn--`` form differs between IDNA 2003 and 2008 raises rather than
    finding no provider."""
    label = f"bücher-{unique('idn')}"
    ascii_domain = f"{label}.example".encode("idna").decode()
    assert ascii_domain.startswith("xn--")
    provider = await _oidc(storage, unique, domains=[ascii_domain])
    await storage.verify_sso_provider_domain(provider.id, ascii_domain)
    for spelling in (f"ceo@{label}.example", f"ceo@{label.upper()}.EXAMPLE", f"{label}.example"):
        found = await storage.get_sso_provider_by_domain(spelling)
        assert found is not None, spelling
        assert found.id == provider.id
    for deviation in (
        "ceo@straße.example",
        "ceo@STRA\u1e9eE.example",  # capital sharp s: lowercases to ß
        "ceo@ς.example",
        "ceo@a\u200db.example",
    ):
        with pytest.raises(ValidationError) as caught:
            await storage.get_sso_provider_by_domain(deviation)
        assert caught.value.field == "domain"
    assert await storage.get_sso_provider_by_domain("ceo@" + "ü" * 70 + ".example") is None
    # A capital sigma is no deviation (both standards map it to sigma), even word-final.
    assert await storage.get_sso_provider_by_domain("ceo@ΟΔΟΣ-ΕΝΑ.example") is None


# -- links --------------------------------------------------------------------------------------


async def test_links(storage: Any, unique: Callable[[str], str]) -> None:
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    first = await storage.create_sso_link(
        user_id=user.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject="subject-1",
        provider_email="ada@corp.example",
        auto_provisioned=True,
        metadata={"groups": ["eng"]},
    )
    assert isinstance(first, SsoLink)
    assert (first.user_id, first.provider_id, first.provider_subject) == (
        user.id,
        provider.id,
        "subject-1",
    )
    assert (first.provider_email, first.auto_provisioned, first.metadata) == (
        "ada@corp.example",
        True,
        {"groups": ["eng"]},
    )
    assert first.last_auth_at is not None
    assert first.last_auth_at > before
    assert first.linked_at.tzinfo is dt.UTC
    assert await storage.get_sso_link(first.id) == first

    saml = await storage.create_sso_provider(type="saml", name=unique("saml"))
    when = dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    second = await storage.create_sso_link(
        user_id=str(user.id),
        provider_id=str(saml.id),
        provider_type="saml",
        provider_subject="subject-1",  # the same subject at another provider is fine
        last_auth_at=when,
    )
    assert second.last_auth_at == when
    assert second.last_auth_at.tzinfo is dt.UTC
    assert (second.provider_email, second.auto_provisioned, second.metadata) == (None, False, {})
    assert await storage.get_user_sso_links(user.id) == [second, first]  # newest first

    assert await storage.delete_sso_link(first.id) is True
    assert await storage.delete_sso_link(first.id) is False
    assert await storage.get_user_sso_links(str(user.id)) == [second]
    assert await storage.get_user_sso_links(uuid.uuid4()) == []


async def test_a_provider_subject_links_to_one_user(
    storage: Any, unique: Callable[[str], str]
) -> None:
    ada, bob = await _user(storage, unique), await _user(storage, unique)
    provider = await _oidc(storage, unique)
    link = await storage.create_sso_link(
        user_id=ada.id, provider_id=provider.id, provider_type="oidc", provider_subject="sub"
    )
    for user in (ada, bob):
        with pytest.raises(ConflictError) as caught:
            await storage.create_sso_link(
                user_id=user.id,
                provider_id=provider.id,
                provider_type="oidc",
                provider_subject="sub",
            )
        assert "sso_links__provider_subject_key" in str(caught.value)
    assert await storage.get_user_sso_links(ada.id) == [link]
    assert await storage.get_user_sso_links(bob.id) == []


async def test_link_errors(storage: Any, unique: Callable[[str], str]) -> None:
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    base = {"provider_type": "oidc", "provider_subject": "s"}
    with pytest.raises(NotFoundError):
        await storage.create_sso_link(user_id=uuid.uuid4(), provider_id=provider.id, **base)
    with pytest.raises(NotFoundError):
        await storage.create_sso_link(user_id=user.id, provider_id=uuid.uuid4(), **base)
    bad: list[dict[str, Any]] = [
        {"provider_type": "ldap"},
        {"provider_subject": ""},
        {"provider_subject": "x" * 1025},
        {"auto_provisioned": 1},
        {"last_auth_at": dt.datetime(2024, 1, 1)},  # naive on purpose
        {"metadata": {"k": float("nan")}},
    ]
    for change in bad:
        with pytest.raises(ValidationError):
            await storage.create_sso_link(
                user_id=user.id, provider_id=provider.id, **{**base, **change}
            )
    assert await storage.get_user_sso_links(user.id) == []


async def test_a_provider_type_other_than_the_providers_is_refused(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """A link or SSO session says its provider's type, never another one (code that branches on
    ``provider_type`` would otherwise run the wrong protocol): refused with the constraint named,
    nothing written."""
    user = await _user(storage, unique)
    saml = await storage.create_sso_provider(type="saml", name=unique("saml"))
    with pytest.raises(NotFoundError) as caught:
        await storage.create_sso_link(
            user_id=user.id, provider_id=saml.id, provider_type="oidc", provider_subject="s"
        )
    assert "sso_links__provider_type_fkey" in str(caught.value)
    with pytest.raises(NotFoundError) as caught:
        await storage.create_sso_session(
            user_id=user.id,
            provider_id=saml.id,
            provider_type="oidc",
            provider_subject="s",
            expires_at=_in(hours=1),
        )
    assert "sso_sessions__provider_type_fkey" in str(caught.value)
    assert await storage.get_user_sso_links(user.id) == []
    count = "SELECT count(*) FROM kitium_auth.sso_sessions WHERE user_id = %s"
    assert _raw(dsn, count, user.id) == (0,)
    link = await storage.create_sso_link(
        user_id=user.id, provider_id=saml.id, provider_type="saml", provider_subject="s"
    )
    assert link.provider_type == "saml"


async def test_a_providers_type_changed_in_the_database_carries_its_rows_along(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """``update_sso_provider`` cannot change ``type``; an owner who changes it in SQL does not
    leave links and SSO sessions naming the old type (ON UPDATE CASCADE)."""
    user = await _user(storage, unique)
    provider = await storage.create_sso_provider(type="saml", name=unique("saml"))
    link, sso_session = await _link_and_session(storage, user, provider)
    _raw(
        dsn,
        "UPDATE kitium_auth.sso_providers SET type = 'oidc' WHERE id = %s RETURNING id",
        provider.id,
    )
    assert (await storage.get_sso_link(link.id)).provider_type == "oidc"
    assert (await storage.get_sso_session(sso_session.id)).provider_type == "oidc"
    renamed = await storage.update_sso_provider(provider.id, name=unique("renamed"))
    assert renamed.type == "oidc"
    assert (await storage.get_sso_link(link.id)).provider_type == "oidc"


# -- sessions -----------------------------------------------------------------------------------


async def test_sessions_store_only_a_token_digest(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    token = f"idp-session-{uuid.uuid4().hex}"
    expires = _in(hours=1)
    session = await storage.create_sso_session(
        user_id=user.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject="subject-1",
        expires_at=expires,
        session_token=token,
    )
    assert isinstance(session, SsoSession)
    assert (session.user_id, session.provider_id, session.provider_subject) == (
        user.id,
        provider.id,
        "subject-1",
    )
    assert session.expires_at == expires
    assert session.expires_at.tzinfo is dt.UTC
    assert session.last_auth_at is not None  # defaults to now
    assert await storage.get_sso_session(session.id) == session
    assert await storage.get_sso_session(str(session.id)) == session
    stored = _raw(
        dsn,
        "SELECT session_token_hash, s::text FROM kitium_auth.sso_sessions AS s WHERE id = %s",
        session.id,
    )
    assert stored[0] == hashlib.sha256(token.encode()).digest()
    assert token not in stored[1]
    assert token not in repr(session)

    tokenless = await storage.create_sso_session(
        user_id=user.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject="subject-1",
        expires_at=expires,
    )
    assert _raw(
        dsn, "SELECT session_token_hash FROM kitium_auth.sso_sessions WHERE id = %s", tokenless.id
    ) == (None,)


async def test_an_expired_sso_session_is_gone(storage: Any, unique: Callable[[str], str]) -> None:
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    base = {
        "user_id": user.id,
        "provider_id": provider.id,
        "provider_type": "oidc",
        "provider_subject": "s",
    }
    expired = await storage.create_sso_session(**base, expires_at=_in(seconds=-1))
    assert expired.expires_at < dt.datetime.now(dt.UTC)
    assert await storage.get_sso_session(expired.id) is None


async def test_session_errors(storage: Any, unique: Callable[[str], str]) -> None:
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    base: dict[str, Any] = {
        "user_id": user.id,
        "provider_id": provider.id,
        "provider_type": "oidc",
        "provider_subject": "s",
        "expires_at": _in(hours=1),
    }
    with pytest.raises(NotFoundError):
        await storage.create_sso_session(**{**base, "user_id": uuid.uuid4()})
    with pytest.raises(NotFoundError):
        await storage.create_sso_session(**{**base, "provider_id": uuid.uuid4()})
    bad: list[dict[str, Any]] = [
        {"expires_at": dt.datetime(2030, 1, 1)},  # naive on purpose
        {"provider_type": "OIDC"},
        {"session_token": ""},
        {"session_token": "a\x00b"},
    ]
    for change in bad:
        with pytest.raises(ValidationError):
            await storage.create_sso_session(**{**base, **change})


async def test_a_sign_in_at_one_provider_moves_no_link_at_another(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Two providers may name the user by the same subject: an SSO session at one records the
    sign-in on that provider's link only."""
    user = await _user(storage, unique)
    links = []
    for provider in (await _oidc(storage, unique), await _oidc(storage, unique)):
        links.append(
            await storage.create_sso_link(
                user_id=user.id, provider_id=provider.id, provider_type="oidc",
                provider_subject="same", last_auth_at=_in(days=-1),
            )
        )  # fmt: skip
    signed_in, other = links
    await storage.create_sso_session(
        user_id=user.id, provider_id=signed_in.provider_id, provider_type="oidc",
        provider_subject="same", expires_at=_in(hours=1),
    )  # fmt: skip
    moved = await storage.get_sso_link(signed_in.id)
    assert moved is not None and moved.last_auth_at > signed_in.last_auth_at
    assert await storage.get_sso_link(other.id) == other


@pytest.mark.parametrize("held", ["users", "sso_providers", "another provider"])
async def test_an_sso_session_locks_its_user_and_provider_before_the_link_and_no_other_row(
    storage: Any, unique: Callable[[str], str], dsn: str, held: str
) -> None:
    """``create_sso_session`` locks the user and the provider, then the link (sso.sql): while
    another transaction holds the user or the provider, as ``delete_user`` and
    ``delete_sso_provider`` do before their cascades reach the links, it waits without holding
    the link, so the two cannot wait on each other in a cycle (a third transaction locks the link
    at once, ``NOWAIT``). Another provider's row it leaves alone: held, it does not wait."""
    user = await _user(storage, unique)
    provider, another = await _oidc(storage, unique), await _oidc(storage, unique)
    bound = {"user_id": user.id, "provider_id": provider.id, "provider_type": "oidc"}
    link = await storage.create_sso_link(**bound, provider_subject="s")
    table, row = {
        "users": ("users", user.id),
        "sso_providers": ("sso_providers", provider.id),
        "another provider": ("sso_providers", another.id),
    }[held]
    sign_in = storage.with_statement_timeout(3000).create_sso_session
    session = await call_while_holding(
        storage,
        dsn,
        (table, {"id": row}),
        "UPDATE",
        lambda: sign_in(**bound, provider_subject="s", expires_at=_in(hours=1)),
        waits_on=None if held == "another provider" else "sso_sessions",
        free=[("sso_links", {"id": link.id})],
    )
    assert isinstance(session, SsoSession) and session.provider_id == provider.id


# -- logout -------------------------------------------------------------------------------------


def _sso_sessions_left(dsn: str, *ids: uuid.UUID) -> set[uuid.UUID]:
    """Which of ``ids`` still have a row (expired ones included, unlike ``get_sso_session``)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id FROM kitium_auth.sso_sessions WHERE id = ANY(%s)", [list(ids)]
        ).fetchall()
    return {row[0] for row in rows}


async def _sso_session(
    storage: Any,
    user: User,
    provider: SsoProvider,
    subject: str,
    token: str | None = None,
    *,
    expired: bool = False,
) -> uuid.UUID:
    created = await storage.create_sso_session(
        user_id=user.id,
        provider_id=provider.id,
        provider_type=provider.type,
        provider_subject=subject,
        session_token=token,
        expires_at=_in(seconds=-1) if expired else _in(hours=1),
    )
    return uuid.UUID(str(created.id))


async def test_an_sso_session_records_the_sign_in_on_its_link(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """create_sso_session moves the last_auth_at of the user's link of that identity to the
    session's, never back, in the same statement; sessions of another subject or another user
    leave the link alone."""
    ada, bob = await _user(storage, unique), await _user(storage, unique)
    provider = await _oidc(storage, unique)
    linked_at = _in(hours=-2)
    link = await storage.create_sso_link(
        user_id=ada.id,
        provider_id=provider.id,
        provider_type="oidc",
        provider_subject="ada",
        last_auth_at=linked_at,
    )

    async def sign_in(user: User, subject: str, at: dt.datetime | None) -> SsoSession:
        created: SsoSession = await storage.create_sso_session(
            user_id=user.id,
            provider_id=provider.id,
            provider_type="oidc",
            provider_subject=subject,
            expires_at=_in(hours=1),
            last_auth_at=at,
        )
        return created

    async def last_auth() -> dt.datetime | None:
        stored: SsoLink | None = await storage.get_sso_link(link.id)
        assert stored is not None
        return stored.last_auth_at

    hour_ago = _in(hours=-1)
    assert (await sign_in(ada, "ada", hour_ago)).last_auth_at == hour_ago
    assert await last_auth() == hour_ago
    await sign_in(ada, "ada", _in(hours=-3))  # an older sign-in recorded late: no step back
    assert await last_auth() == hour_ago
    await sign_in(ada, "someone-else", _in(minutes=-1))
    await sign_in(bob, "ada", _in(minutes=-1))  # not this link's user
    assert await last_auth() == hour_ago
    now = await sign_in(ada, "ada", None)  # the database clock
    assert now.last_auth_at is not None and now.last_auth_at > hour_ago
    assert await last_auth() == now.last_auth_at


async def test_a_far_future_sign_in_time_does_not_pin_the_link(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """The link takes a session's last_auth_at only up to the statement's time: a session
    recorded with a far-future last_auth_at (kept on the session as given) leaves the link at
    the time of the call, so later sign-ins still move it."""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    bound = {"user_id": user.id, "provider_id": provider.id, "provider_type": "oidc"}
    link = await storage.create_sso_link(**bound, provider_subject="s", last_auth_at=_in(hours=-2))
    far = dt.datetime(2999, 1, 1, tzinfo=dt.UTC)
    future = await storage.create_sso_session(
        **bound, provider_subject="s", expires_at=_in(hours=1), last_auth_at=far
    )
    assert future.last_auth_at == far
    capped = await storage.get_sso_link(link.id)
    assert capped is not None and link.last_auth_at < capped.last_auth_at < far
    now = await storage.create_sso_session(**bound, provider_subject="s", expires_at=_in(hours=1))
    moved = await storage.get_sso_link(link.id)
    assert moved is not None and moved.last_auth_at == now.last_auth_at > capped.last_auth_at


_PARENT_DELETES = {
    "delete_user": "DELETE FROM kitium_auth.users",
    "delete_sso_provider": "DELETE FROM kitium_auth.sso_providers",
}


@pytest.mark.parametrize("delete", sorted(_PARENT_DELETES))
async def test_a_sign_in_and_deleting_its_user_or_provider_do_not_deadlock(
    storage: Any,
    unique: Callable[[str], str],
    dsn: str,
    caplog: pytest.LogCaptureFixture,
    delete: str,
) -> None:
    """create_sso_session locks the user's and the provider's rows before the link it
    updates; delete_user and delete_sso_provider lock their row, then delete the link by
    cascade. A transaction holding the link (a concurrent sign-in) makes the sign-in wait on it
    first, then the delete wait too; once it commits, the two run one after the other. (With
    the parent rows locked only by the insert's foreign-key checks, after the link, the sign-in
    held the link and waited for the parent row, and the delete held the parent row and waited
    for the link: a deadlock, which the adapter logged and retried.)"""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    bound = {"user_id": user.id, "provider_id": provider.id, "provider_type": "oidc"}
    link = await storage.create_sso_link(**bound, provider_subject="s", last_auth_at=_in(hours=-1))
    parent = user.id if delete == "delete_user" else provider.id
    holder = psycopg.connect(dsn)
    try:
        with caplog.at_level(logging.WARNING, logger="kitium_pg"):
            holder.execute(
                "SELECT id FROM kitium_auth.sso_links WHERE id = %s FOR NO KEY UPDATE", [link.id]
            )
            sign_in = start(
                storage,
                "create_sso_session",
                **bound,
                provider_subject="s",
                expires_at=_in(hours=1),
            )
            seen = [await asyncio.to_thread(waiting, dsn, "INSERT INTO kitium_auth.sso_sessions")]
            deleted = start(storage, delete, parent)
            seen.append(await asyncio.to_thread(waiting, dsn, _PARENT_DELETES[delete]))
            holder.commit()
            results = await asyncio.gather(sign_in, deleted, return_exceptions=True)
    finally:
        holder.close()
    assert seen == [True, True]
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("kitium_pg") and r.levelno >= logging.WARNING
    ]
    assert failures == []  # no deadlock_detected, retried or raised
    assert isinstance(results[0], SsoSession) and results[1] is True, results
    assert _sso_sessions_left(dsn, results[0].id) == set()  # deleted along with its parent
    assert await storage.get_sso_link(link.id) is None


async def test_delete_sso_session(storage: Any, unique: Callable[[str], str], dsn: str) -> None:
    """An SSO session can be ended before it expires (an application's own logout)."""
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    ended = await _sso_session(storage, user, provider, "s", "sid")
    kept = await _sso_session(storage, user, provider, "s", "sid")
    expired = await _sso_session(storage, user, provider, "s", expired=True)
    assert await storage.delete_sso_session(ended) is True
    assert await storage.get_sso_session(ended) is None
    assert await storage.delete_sso_session(str(ended)) is False  # idempotent
    assert await storage.delete_sso_session(str(expired).upper()) is True  # expired rows too
    for missing in (uuid.uuid4(), "not-a-uuid", "", 42, None):
        assert await storage.delete_sso_session(missing) is False
    assert _sso_sessions_left(dsn, ended, kept, expired) == {kept}
    assert await storage.get_sso_session(kept) is not None


async def test_single_logout_by_subject_and_or_session_token(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """SAML Single Logout and OIDC back-channel logout: a provider names the sessions to end by
    subject (NameID, sub) and/or session token (SessionIndex, sid). Only that provider's sessions
    matching every criterion given end, expired ones included, and the call returns them, each
    with its user (an OIDC logout token may carry only a sid)."""
    ada, bob = await _user(storage, unique), await _user(storage, unique)
    idp, other_idp = await _oidc(storage, unique), await _oidc(storage, unique)
    by_token = await _sso_session(storage, ada, idp, "ada", "sid-1")
    elsewhere = await _sso_session(storage, ada, other_idp, "ada", "sid-1")  # another provider
    by_both = await _sso_session(storage, ada, idp, "ada", "sid-2")
    by_expired_token = await _sso_session(storage, ada, idp, "ada", "sid-3", expired=True)
    tokenless = await _sso_session(storage, ada, idp, "ada")
    expired_tokenless = await _sso_session(storage, ada, idp, "ada", expired=True)
    bobs = await _sso_session(storage, bob, idp, "bob", "sid-bob")
    everything = (
        by_token,
        elsewhere,
        by_both,
        by_expired_token,
        tokenless,
        expired_tokenless,
        bobs,
    )

    async def ended(provider_id: object, **given: Any) -> set[tuple[uuid.UUID, uuid.UUID]]:
        sessions = await storage.delete_sso_sessions(provider_id=provider_id, **given)
        assert all(isinstance(s, SsoSession) for s in sessions)
        return {(s.id, s.user_id) for s in sessions}

    assert await ended(idp.id, session_token="SID-1") == set()
    assert await ended(idp.id, session_token="sid-1") == {(by_token, ada.id)}
    assert await storage.get_sso_session(by_token) is None
    assert await storage.get_sso_session(elsewhere) is not None
    # Both given: both must match.
    assert await ended(idp.id, provider_subject="bob", session_token="sid-2") == set()
    assert await storage.get_sso_session(by_both) is not None
    matched = {"provider_subject": "ada", "session_token": "sid-2"}
    assert await ended(str(idp.id), **matched) == {(by_both, ada.id)}
    assert await ended(idp.id, **matched) == set()  # idempotent
    assert await ended(idp.id, session_token="sid-3") == {(by_expired_token, ada.id)}
    # By subject: the identity's remaining sessions at this provider, with or without a token.
    assert await ended(idp.id, provider_subject="ada") == {
        (tokenless, ada.id),
        (expired_tokenless, ada.id),
    }
    assert _sso_sessions_left(dsn, *everything) == {elsewhere, bobs}

    for missing in (uuid.uuid4(), "not-a-uuid", b"\x00" * 16):
        assert await ended(missing, provider_subject="bob") == set()
    assert await storage.get_sso_session(bobs) is not None
    assert await ended(idp.id, session_token="sid-bob") == {(bobs, bob.id)}


def _app_sessions_left(dsn: str, *ids: uuid.UUID) -> set[uuid.UUID]:
    """Which of the application sessions ``ids`` still have a row (expired ones included)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id FROM kitium_auth.sessions WHERE id = ANY(%s)", [list(ids)]
        ).fetchall()
    return {row[0] for row in rows}


async def _app_session(storage: Any, user: User, *, expired: bool = False) -> uuid.UUID:
    created = await storage.create_session(
        user_id=user.id, expires_at=_in(seconds=-1) if expired else _in(hours=1)
    )
    return uuid.UUID(str(created.id))


async def test_single_logout_can_end_the_users_application_sessions(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """With end_user_sessions=True the logout also ends every application session (expired
    ones included) of the users whose SSO sessions it ended, by token or by subject; other
    users' stay, and so do those of a user whose SSO sessions it did not end. Without it
    (the default) only SSO sessions end."""
    ada, bob, cal, dee = [await _user(storage, unique) for _ in range(4)]
    idp, other_idp = await _oidc(storage, unique), await _oidc(storage, unique)
    adas_sso = await _sso_session(storage, ada, idp, "ada", "sid-a")
    bobs_sso = await _sso_session(storage, bob, idp, "bob", "sid-b")
    cals_sso = await _sso_session(storage, cal, idp, "cal", "sid-c")
    dees_sso = await _sso_session(storage, dee, other_idp, "dee", "sid-d")
    adas = {await _app_session(storage, ada), await _app_session(storage, ada, expired=True)}
    bobs = {await _app_session(storage, bob)}
    cals = {await _app_session(storage, cal)}
    dees = {await _app_session(storage, dee)}
    everyone = adas | bobs | cals | dees

    ended = await storage.delete_sso_sessions(
        provider_id=idp.id, session_token="sid-a", end_user_sessions=True
    )
    assert [(e.id, e.user_id) for e in ended] == [(adas_sso, ada.id)]
    assert _app_sessions_left(dsn, *everyone) == bobs | cals | dees
    ended = await storage.delete_sso_sessions(
        provider_id=str(idp.id), provider_subject="bob", end_user_sessions=True
    )
    assert [(e.id, e.user_id) for e in ended] == [(bobs_sso, bob.id)]
    assert _app_sessions_left(dsn, *everyone) == cals | dees
    # Nothing matched (dee's SSO session is at another provider): nothing more ends.
    for given in ({"provider_subject": "dee"}, {"session_token": "sid-d"}):
        assert (
            await storage.delete_sso_sessions(provider_id=idp.id, **given, end_user_sessions=True)
            == []
        )
    assert _app_sessions_left(dsn, *everyone) == cals | dees
    # The default ends the SSO session only, as before.
    ended = await storage.delete_sso_sessions(provider_id=idp.id, session_token="sid-c")
    assert [e.id for e in ended] == [cals_sso]
    assert _app_sessions_left(dsn, *everyone) == cals | dees
    assert _sso_sessions_left(dsn, adas_sso, bobs_sso, cals_sso, dees_sso) == {dees_sso}


async def test_a_tenants_logout_leaves_the_sessions_bound_to_another_organization(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """A logout at a provider of organization A with end_user_sessions ends the user's sessions
    bound to A and the unbound ones; those bound to organization B stay, so A's IdP cannot sign
    the user out of B. A shared provider (no organization) ends them all."""
    ada = await _user(storage, unique)
    acme = await storage.create_organization(name="Acme", plan="team")
    other = await storage.create_organization(name="Other", plan="team")
    for org in (acme, other):
        await storage.add_organization_member(org.id, ada.id)
    acmes_idp = await _oidc(storage, unique, org_id=acme.id)
    shared_idp = await _oidc(storage, unique)

    async def sessions() -> dict[uuid.UUID | None, uuid.UUID]:
        made = {}
        for org_id in (acme.id, other.id, None):
            created = await storage.create_session(
                user_id=ada.id, expires_at=_in(hours=1), org_id=org_id
            )
            made[org_id] = uuid.UUID(str(created.id))
        return made

    for logout in ({"provider_subject": "ada"}, {"session_token": "sid-ada"}):
        made = await sessions()
        await _sso_session(storage, ada, acmes_idp, "ada", "sid-ada")
        ended = await storage.delete_sso_sessions(
            provider_id=acmes_idp.id, **logout, end_user_sessions=True
        )
        assert [e.user_id for e in ended] == [ada.id]
        assert _app_sessions_left(dsn, *made.values()) == {made[other.id]}, logout
        await storage.delete_user_sessions(ada.id)

        made = await sessions()
        await _sso_session(storage, ada, shared_idp, "ada", "sid-ada")
        ended = await storage.delete_sso_sessions(
            provider_id=shared_idp.id, **logout, end_user_sessions=True
        )
        assert [e.user_id for e in ended] == [ada.id]
        assert _app_sessions_left(dsn, *made.values()) == set(), logout


def test_a_logout_and_deleting_the_providers_organization_do_not_deadlock(
    sync_adapter: PostgresStorageAdapter, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in review: delete_organization deletes the sessions bound to the organization by
    cascade before its provider's SSO sessions, and a logout with end_user_sessions took the
    SSO session, then those sessions: a deadlock, after which the logout's retry found the SSO
    session gone and left the user's unbound session signed in. The logout now locks the
    organization first; the deletion waits for it."""
    storage = sync_adapter
    org, user, idp, sso = _member_signed_in_at_its_orgs_idp(storage, unique)
    expires = sso.expires_at
    storage.create_session(user_id=user.id, expires_at=expires, org_id=org.id)
    unbound = storage.create_session(user_id=user.id, expires_at=expires)
    before = _deadlocks(dsn)
    results: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> threading.Thread:
        def target() -> None:
            try:
                results[name] = call()
            except Exception as exc:  # reported by the assertions below
                results[name] = exc

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    holder = psycopg.connect(dsn)
    try:
        holder.execute("SELECT id FROM kitium_auth.sso_sessions WHERE id = %s FOR UPDATE", [sso.id])
        logout = run(
            "logout",
            lambda: storage.delete_sso_sessions(
                provider_id=idp.id, provider_subject="s", end_user_sessions=True
            ),
        )
        assert waiting(dsn, "DELETE FROM kitium_auth.sso_sessions AS s")
        deletion = run("delete", lambda: storage.delete_organization(org.id))
        assert waiting(dsn, "DELETE FROM kitium_auth.organizations")
        holder.commit()
        logout.join()
        deletion.join()
    finally:
        holder.close()
    assert results == {"logout": [sso], "delete": True}
    assert storage.get_session(unbound.id) is None
    assert _deadlocks(dsn) == before


def test_a_logout_waits_at_the_organization_for_a_change_of_its_members(
    sync_adapter: PostgresStorageAdapter, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in the second review: update_organization(members=...) locks the organization
    (NO KEY UPDATE), then deletes the removed members' sessions bound to it user after user,
    and a logout with end_user_sessions, whose KEY SHARE of the organization did not wait for
    that, deleted the same sessions in another order: a deadlock (4 to 5 in 40 to 100 runs of
    three members with 300 sessions each). The logout now takes SHARE of the organization,
    which waits for a membership change holding it, before it locks any user or SSO session."""
    storage = sync_adapter
    org, user, idp, sso = _member_signed_in_at_its_orgs_idp(storage, unique)
    results: dict[str, Any] = {}

    def logout() -> None:
        results["logout"] = storage.delete_sso_sessions(
            provider_id=idp.id, provider_subject="s", end_user_sessions=True
        )

    holder = psycopg.connect(dsn)
    try:
        # What update_organization's UPDATE and the membership functions take first.
        holder.execute(
            "SELECT 1 FROM kitium_auth.organizations WHERE id = %s FOR NO KEY UPDATE", [org.id]
        )
        thread = threading.Thread(target=logout)
        thread.start()
        assert waiting(dsn, LOGOUT), "the logout did not wait"
        with psycopg.connect(dsn, autocommit=True) as probe:  # no user or SSO session locked yet
            probe.execute("SET lock_timeout = '100ms'")
            probe.execute("SELECT 1 FROM kitium_auth.users WHERE id = %s FOR UPDATE", [user.id])
            probe.execute(
                "SELECT 1 FROM kitium_auth.sso_sessions WHERE id = %s FOR UPDATE", [sso.id]
            )
        holder.commit()
        thread.join()
    finally:
        holder.close()
    assert results == {"logout": [sso]}


def _member_signed_in_at_its_orgs_idp(
    storage: PostgresStorageAdapter, unique: Callable[[str], str]
) -> tuple[Any, User, SsoProvider, SsoSession]:
    """An organization, a member, the organization's OIDC provider, and the member's SSO
    session there (subject ``s``, an hour left)."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    user = storage.create_user(email=f"{unique('m')}@example.com")
    org = storage.create_organization(name="Acme", plan="team", members=[{"user_id": user.id}])
    idp = storage.create_sso_provider(
        type="oidc", name=unique("idp"), org_id=org.id, client_id="c", client_secret=CLIENT_SECRET
    )
    sso = storage.create_sso_session(
        user_id=user.id,
        provider_id=idp.id,
        provider_type="oidc",
        provider_subject="s",
        expires_at=expires,
    )
    return org, user, idp, sso


def _deadlocks(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_end_user_sessions_must_be_a_bool(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """A truthy or falsy non-bool is refused, naming the flag, before anything is deleted (a
    malformed provider_id included)."""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    kept = await _sso_session(storage, user, provider, "s", "sid")
    app = await _app_session(storage, user)
    flags: list[object] = [1, 0, "true", "", None, [], 1.0]
    for flag in flags:
        for provider_id in (provider.id, "not-a-uuid"):
            with pytest.raises(ValidationError) as caught:
                await storage.delete_sso_sessions(
                    provider_id=provider_id, session_token="sid", end_user_sessions=flag
                )
            assert caught.value.field == "end_user_sessions", flag
    assert _sso_sessions_left(dsn, kept) == {kept}
    assert _app_sessions_left(dsn, app) == {app}


@pytest.mark.parametrize("by", ["provider_subject", "session_token"])
async def test_a_logout_ending_app_sessions_and_deleting_its_user_do_not_deadlock(
    storage: Any,
    unique: Callable[[str], str],
    dsn: str,
    caplog: pytest.LogCaptureFixture,
    by: str,
) -> None:
    """delete_user locks the user's row, then deletes its sessions and then its SSO sessions
    by cascade. A logout with end_user_sessions locks the users' rows first, then their SSO
    sessions, then their sessions: with an SSO session held by another transaction, the logout
    waits on it, delete_user waits on the user, and once it commits both finish. (Locking the
    SSO session first, the logout held it and waited for a session that delete_user held while
    waiting for the SSO session: a deadlock.) Whether the logout names the identity or the
    provider's session token: each has a query of its own."""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    sso = await _sso_session(storage, user, provider, "s", "sid")
    app = await _app_session(storage, user)
    holder = psycopg.connect(dsn)
    try:
        with caplog.at_level(logging.WARNING, logger="kitium_pg"):
            holder.execute(
                "SELECT id FROM kitium_auth.sso_sessions WHERE id = %s FOR NO KEY UPDATE", [sso]
            )
            logout = start(
                storage,
                "delete_sso_sessions",
                provider_id=provider.id,
                end_user_sessions=True,
                **{by: {"provider_subject": "s", "session_token": "sid"}[by]},
            )
            seen = [await asyncio.to_thread(waiting, dsn, LOGOUT)]
            deleted = start(storage, "delete_user", user.id)
            seen.append(await asyncio.to_thread(waiting, dsn, "DELETE FROM kitium_auth.users"))
            holder.commit()
            results = await asyncio.gather(logout, deleted, return_exceptions=True)
    finally:
        holder.close()
    assert seen == [True, True]
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("kitium_pg") and r.levelno >= logging.WARNING
    ]
    assert failures == []  # no deadlock_detected, retried or raised
    ended, user_deleted = results
    assert isinstance(ended, list) and user_deleted is True, results
    assert [e.id for e in ended] == [sso]
    assert _app_sessions_left(dsn, app) == set()


@pytest.mark.parametrize("held", ["its organization", "another organization", "another user"])
@pytest.mark.parametrize("by", ["provider_subject", "session_token"])
async def test_a_tenants_logout_waits_for_its_organization_and_for_no_other_row(
    storage: Any, unique: Callable[[str], str], dsn: str, by: str, held: str
) -> None:
    """A logout ending application sessions through an organization's provider locks the
    organization first (sso.sql says why: delete_organization and update_organization(members=)
    lock it before their cascades and deletes reach the sessions). While another transaction
    holds it, the logout waits without holding the user or the SSO session: a third transaction
    locks both at once (``NOWAIT``). Another organization, even one the user has a session
    bound to (which the logout leaves), or another user of the provider (another subject,
    another session token), it leaves alone: held, it does not wait."""
    org = await storage.create_organization(name=unique("org"), plan="team")
    user, provider = await _user(storage, unique), await _oidc(storage, unique, org_id=org.id)
    other_org = await storage.create_organization(
        name=unique("org"), plan="team", members=[{"user_id": user.id}]
    )
    other_user = await _user(storage, unique)
    sso = await _sso_session(storage, user, provider, "s", "sid")
    await _sso_session(storage, other_user, provider, "t", "tid")
    app = await _app_session(storage, user)
    elsewhere = await storage.create_session(
        user_id=user.id, expires_at=_in(hours=1), org_id=other_org.id
    )
    # each in the mode that conflicts with the logout's lock (SHARE, KEY SHARE)
    table, row, mode = {
        "its organization": ("organizations", org.id, "NO KEY UPDATE"),
        "another organization": ("organizations", other_org.id, "NO KEY UPDATE"),
        "another user": ("users", other_user.id, "UPDATE"),
    }[held]
    own = held == "its organization"
    ended = await call_while_holding(
        storage,
        dsn,
        (table, {"id": row}),
        mode,
        lambda: (storage if own else storage.with_statement_timeout(3000)).delete_sso_sessions(
            provider_id=provider.id,
            end_user_sessions=True,
            **{by: {"provider_subject": "s", "session_token": "sid"}[by]},
        ),
        waits_on=LOGOUT if own else None,
        free=[("users", {"id": user.id}), ("sso_sessions", {"id": sso})],
    )
    assert [e.id for e in ended] == [sso]
    assert _app_sessions_left(dsn, app, elsewhere.id) == {elsewhere.id}


@pytest.mark.parametrize("held", ["an organization of its sessions", "another organization"])
@pytest.mark.parametrize("by", ["provider_subject", "session_token", "both"])
async def test_a_shared_providers_logout_waits_for_the_organizations_of_the_sessions_it_ends(
    storage: Any, unique: Callable[[str], str], dsn: str, by: str, held: str
) -> None:
    """Found in the third review: a shared provider's logout (no organization of its own) ends
    its users' sessions in every organization, and locked no organization first, so it deleted
    a member's sessions against remove_organization_member or update_organization(members=)
    deleting them in another order: a deadlock. It now locks the organizations its sessions are
    bound to, in id order, before the user or the SSO session; an organization none of them is
    bound to, such as one where another user of the provider has a session, it leaves alone:
    held, it does not wait."""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    other_user = await _user(storage, unique)  # another subject, another session token
    members = [{"user_id": user.id}, {"user_id": other_user.id}]
    first, second, other = [
        await storage.create_organization(name=unique("org"), plan="team", members=members)
        for _ in range(3)
    ]
    sso = await _sso_session(storage, user, provider, "s", "sid")
    await _sso_session(storage, other_user, provider, "t", "tid")
    others = await storage.create_session(
        user_id=other_user.id, expires_at=_in(hours=1), org_id=other.id
    )
    bound = [
        (await storage.create_session(user_id=user.id, expires_at=_in(hours=1), org_id=org)).id
        for org in (first.id, second.id)
    ]
    unbound = await _app_session(storage, user)
    own = held == "an organization of its sessions"
    ended = await call_while_holding(
        storage,
        dsn,
        ("organizations", {"id": (second if own else other).id}),
        "NO KEY UPDATE",  # what the membership changes take before deleting sessions
        lambda: (storage if own else storage.with_statement_timeout(3000)).delete_sso_sessions(
            provider_id=provider.id,
            end_user_sessions=True,
            **{
                "provider_subject": {"provider_subject": "s"},
                "session_token": {"session_token": "sid"},
                "both": {"provider_subject": "s", "session_token": "sid"},
            }[by],
        ),
        waits_on=LOGOUT if own else None,
        free=[("users", {"id": user.id}), ("sso_sessions", {"id": sso})],
    )
    assert [e.id for e in ended] == [sso]
    assert _app_sessions_left(dsn, unbound, *bound, others.id) == {others.id}


@pytest.mark.parametrize("sso_first", [True, False], ids=["sso-first", "sessions-first"])
async def test_log_out_everywhere_in_a_transaction_against_a_single_logout(
    storage: Any,
    unique: Callable[[str], str],
    dsn: str,
    sso_first: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review, and what docs/guide/sso.md tells: a transaction of the application's
    own that ends a user's SSO sessions and then its sessions meets a single logout of that
    user (which takes them in that order) without a deadlock: the logout waits for the SSO
    session the transaction deleted, and finds it gone. The other order makes the two wait for
    each other, and PostgreSQL ends one of them as a deadlock."""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    await _sso_session(storage, user, provider, "s", "sid")
    app = await _app_session(storage, user)
    calls = ["delete_user_sso_sessions", "delete_user_sessions"]
    first, second = calls if sso_first else calls[::-1]
    failure: BaseException | None = None
    with caplog.at_level(logging.WARNING, logger="kitium_pg"):
        async with storage.transaction() as tx:
            await getattr(tx, first)(user.id)
            logout = start(
                storage,
                "delete_sso_sessions",
                provider_id=provider.id,
                provider_subject="s",
                end_user_sessions=True,
            )
            assert await asyncio.to_thread(waiting, dsn, LOGOUT)
            if not sso_first:
                # A backend looks for a deadlock deadlock_timeout (1 s) after it starts to wait.
                # A few ms apart, a loaded machine once ran the transaction's check first (a
                # mutation run: the transaction was the one ended); half a second apart, the
                # logout's check comes first.
                await asyncio.sleep(0.5)
            try:
                await getattr(tx, second)(user.id)
            except ConflictError as exc:
                failure = exc
        ended = await logout
    deadlocks = [r for r in caplog.records if "deadlock" in r.getMessage()]
    assert failure is None and ended == []
    # The logout began to wait first, so its deadlock check ran first: it was the one ended,
    # and the adapter ran it again (logging why) once the transaction had committed.
    assert bool(deadlocks) is not sso_first
    assert _app_sessions_left(dsn, app) == set()


async def test_single_logout_needs_a_subject_or_a_session_token(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """Without a subject or a token the call would end every session of the provider: refused,
    as are a subject or token create_sso_session would refuse; nothing is deleted."""
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    kept = await _sso_session(storage, user, provider, "s", "sid")
    refused: list[tuple[dict[str, Any], str]] = [
        ({}, "provider_subject"),
        ({"provider_subject": None, "session_token": None}, "provider_subject"),
        ({"provider_subject": ""}, "provider_subject"),
        ({"provider_subject": "x" * 1025}, "provider_subject"),
        ({"provider_subject": 7}, "provider_subject"),
        ({"session_token": "a\x00b"}, "session_token"),
        ({"provider_subject": "s", "session_token": ""}, "session_token"),
    ]
    for given, field in refused:
        with pytest.raises(ValidationError) as caught:
            await storage.delete_sso_sessions(provider_id=provider.id, **given)
        assert caught.value.field == field, given
    with pytest.raises(ValidationError):  # the criteria are checked first, whatever the id
        await storage.delete_sso_sessions(provider_id="not-a-uuid")
    assert _sso_sessions_left(dsn, kept) == {kept}


async def test_delete_expired_sso_sessions_deletes_only_expired_ones(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """Expired SSO sessions are never returned, and their rows go in batches; live ones stay."""
    user = await _user(storage, unique)
    provider = await _oidc(storage, unique)
    expired = [await _sso_session(storage, user, provider, f"s{n}", expired=True) for n in range(3)]
    live = await _sso_session(storage, user, provider, "live")
    done: list[int] = []
    deleted = await storage.delete_expired_sso_sessions(batch_size=2, progress=done.append)
    assert deleted >= 3  # other tests' expired rows too
    assert done[-1] == deleted and done == sorted(done)
    assert _sso_sessions_left(dsn, *expired, live) == {live}
    assert await storage.delete_expired_sso_sessions() == 0
    with pytest.raises(ValidationError) as refused:
        await storage.delete_expired_sso_sessions(batch_size=0)
    assert refused.value.field == "batch_size"


async def test_delete_user_sso_sessions(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    ada, bob = await _user(storage, unique), await _user(storage, unique)
    idp, other_idp = await _oidc(storage, unique), await _oidc(storage, unique)
    adas = [
        await _sso_session(storage, ada, idp, "ada", "sid"),
        await _sso_session(storage, ada, other_idp, "ada-2"),
        await _sso_session(storage, ada, idp, "ada", expired=True),
    ]
    bobs = await _sso_session(storage, bob, idp, "bob", "sid")
    assert await storage.delete_user_sso_sessions(ada.id) == 3
    assert await storage.delete_user_sso_sessions(str(ada.id)) == 0
    for missing in (uuid.uuid4(), "not-a-uuid", None):
        assert await storage.delete_user_sso_sessions(missing) == 0
    assert _sso_sessions_left(dsn, *adas, bobs) == {bobs}


async def test_an_assertions_subject_finds_its_link(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """Signing in through SSO starts from (provider, subject): without a lookup by them, an
    application could not tell which user an assertion signs in."""
    user = await _user(storage, unique)
    provider, other = await _oidc(storage, unique), await _oidc(storage, unique)
    link = await storage.create_sso_link(
        user_id=user.id, provider_id=provider.id, provider_type="oidc", provider_subject="Sub-1"
    )
    assert await storage.get_sso_link_by_subject(provider.id, "Sub-1") == link
    assert await storage.get_sso_link_by_subject(str(provider.id).upper(), "Sub-1") == link
    assert await storage.get_sso_link_by_subject(provider.id, "sub-1") is None  # exact subject
    assert await storage.get_sso_link_by_subject(other.id, "Sub-1") is None  # per provider
    assert await storage.get_sso_link_by_subject("not-a-uuid", "Sub-1") is None
    with pytest.raises(ValidationError) as refused:
        await storage.get_sso_link_by_subject(provider.id, "")
    assert refused.value.field == "provider_subject"
    assert await storage.delete_sso_link(link.id) is True
    assert await storage.get_sso_link_by_subject(provider.id, "Sub-1") is None


async def test_a_subject_is_refused_by_name_past_1024_characters_or_2048_bytes(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """Found in review: 1,000 CJK characters passed the 1,024-character check, then failed as
    InternalError (an index entry holds at most 2704 bytes, and two indexes hold the subject).
    Every call that takes a subject refuses one past 2048 bytes of UTF-8 by name and writes
    nothing; 512 four-byte characters (2048 bytes) and 1024 ASCII ones are a subject."""
    user, provider = await _user(storage, unique), await _oidc(storage, unique)
    where = {"user_id": user.id, "provider_id": provider.id, "provider_type": "oidc"}
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    calls: dict[str, Callable[[str], Any]] = {
        "create_sso_link": lambda s: storage.create_sso_link(**where, provider_subject=s),
        "create_sso_session": lambda s: storage.create_sso_session(
            **where, provider_subject=s, expires_at=later
        ),
        "get_sso_link_by_subject": lambda s: storage.get_sso_link_by_subject(provider.id, s),
        "delete_sso_sessions": lambda s: storage.delete_sso_sessions(
            provider_id=provider.id, provider_subject=s
        ),
    }
    for subject in ("\U0001f600" * 513, "\u4e2d" * 683, "x" * 1025):
        for name, call in calls.items():
            with pytest.raises(ValidationError) as refused:
                await call(subject)
            assert refused.value.field == "provider_subject", (name, len(subject))
    assert await storage.get_user_sso_links(user.id) == []
    for subject in ("\U0001f600" * 512, "x" * 1024):
        link = await storage.create_sso_link(**where, provider_subject=subject)
        assert await storage.get_sso_link_by_subject(provider.id, subject) == link
        session = await _sso_session(storage, user, provider, subject)
        assert _sso_sessions_left(dsn, session) == {session}
        assert await storage.delete_sso_link(link.id) is True


async def test_deleting_a_link_ends_its_identitys_sso_sessions(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """An unlinked identity can be linked to another user; a session naming the old user must
    not outlive the link. The link's user's sessions with its provider and subject end with it
    (expired ones too); other sessions stay."""
    ada, bob = await _user(storage, unique), await _user(storage, unique)
    idp, other_idp = await _oidc(storage, unique), await _oidc(storage, unique)
    link = await storage.create_sso_link(
        user_id=ada.id, provider_id=idp.id, provider_type="oidc", provider_subject="s"
    )
    ended = [
        await _sso_session(storage, ada, idp, "s", "sid"),
        await _sso_session(storage, ada, idp, "s", expired=True),
    ]
    kept = [
        await _sso_session(storage, ada, idp, "other-subject"),
        await _sso_session(storage, ada, other_idp, "s"),
        await _sso_session(storage, bob, idp, "s"),  # the same subject, another user
    ]
    assert await storage.delete_sso_link(link.id) is True
    assert _sso_sessions_left(dsn, *ended, *kept) == set(kept)
    assert await storage.get_sso_session(ended[0]) is None

    relinked = await storage.create_sso_link(
        user_id=bob.id, provider_id=idp.id, provider_type="oidc", provider_subject="s"
    )
    assert await storage.get_sso_session(ended[0]) is None
    # Deleting the old link again deletes nothing, not the new user's sessions either.
    assert await storage.delete_sso_link(link.id) is False
    assert _sso_sessions_left(dsn, *kept) == set(kept)
    assert await storage.get_user_sso_links(bob.id) == [relinked]


# -- retries and round trips --------------------------------------------------------------------


async def test_a_create_retried_with_the_same_id_returns_the_stored_row(
    storage: Any, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await _user(storage, unique)
    fixed = uuid.uuid4()
    for module in (sso_async, sso_sync):
        monkeypatch.setattr(module, "new_id", lambda: fixed)
    domain = f"{unique('retry')}.example"

    async def create() -> SsoProvider:
        return await _oidc(storage, unique, signing_key=SIGNING_KEY, domains=[domain])

    first = await create()
    assert first.id == fixed
    # The second attempt (fresh nonces, another name) writes nothing and returns the stored row.
    assert await create() == first

    link = {"user_id": user.id, "provider_id": fixed, "provider_type": "oidc"}
    first_link = await storage.create_sso_link(**link, provider_subject="s")
    monkeypatch.setattr(sso_async, "new_id", lambda: first_link.id)
    monkeypatch.setattr(sso_sync, "new_id", lambda: first_link.id)
    assert await storage.create_sso_link(**link, provider_subject="s") == first_link
    session = await storage.create_sso_session(
        **link, provider_subject="s", expires_at=_in(hours=1), session_token="t"
    )
    monkeypatch.undo()
    assert session.id == first_link.id  # the id is per table: no clash with the link
    assert await storage.delete_sso_provider(fixed) is True


@pytest.fixture(scope="module")
def sync_one(dsn: str, encryption_keys: dict[str, str]) -> Iterator[PostgresStorageAdapter]:
    with PostgresStorageAdapter(
        dsn, min_size=1, max_size=1, encryption_keys=encryption_keys
    ) as adapter:
        yield adapter


@pytest.fixture(scope="module")
async def async_one(
    dsn: str, encryption_keys: dict[str, str]
) -> AsyncIterator[AsyncPostgresStorageAdapter]:
    async with AsyncPostgresStorageAdapter(
        dsn, min_size=1, max_size=1, encryption_keys=encryption_keys
    ) as adapter:
        yield adapter


@pytest.fixture(params=["sync", "async"])
def one_conn(request: pytest.FixtureRequest) -> Any:
    """An adapter whose pool holds exactly one connection (so the trace sees everything)."""
    return request.getfixturevalue(f"{request.param}_one")


async def test_every_sso_method_is_one_round_trip(one_conn: Any) -> None:
    s, tag = one_conn, uuid.uuid4().hex[:12]
    user = s.create_user(email=f"rt-{tag}@example.com")
    user = await user if not isinstance(user, User) else user
    domain = f"rt-{tag}.example"
    ctx: dict[str, Any] = {}
    calls: list[tuple[str, Callable[[], Any]]] = [
        (
            "create_sso_provider",
            lambda: s.create_sso_provider(
                type="oidc", name=tag, client_secret="x", signing_key="y", domains=[domain]
            ),
        ),
        ("get_sso_provider", lambda: s.get_sso_provider(ctx["create_sso_provider"].id)),
        (
            "update_sso_provider",
            lambda: s.update_sso_provider(
                ctx["create_sso_provider"].id, client_secret="z", domains=[domain]
            ),
        ),
        ("list_sso_providers", lambda: s.list_sso_providers(uuid.uuid4())),
        (
            "add_sso_provider_domain",
            lambda: s.add_sso_provider_domain(ctx["create_sso_provider"].id, f"b.{domain}"),
        ),
        (
            "verify_sso_provider_domain",
            lambda: s.verify_sso_provider_domain(ctx["create_sso_provider"].id, domain),
        ),
        ("get_sso_provider_by_domain", lambda: s.get_sso_provider_by_domain(f"a@{domain}")),
        (
            "remove_sso_provider_domain",
            lambda: s.remove_sso_provider_domain(ctx["create_sso_provider"].id, f"b.{domain}"),
        ),
        (
            "create_sso_link",
            lambda: s.create_sso_link(
                user_id=user.id,
                provider_id=ctx["create_sso_provider"].id,
                provider_type="oidc",
                provider_subject=tag,
            ),
        ),
        ("get_sso_link", lambda: s.get_sso_link(ctx["create_sso_link"].id)),
        ("get_user_sso_links", lambda: s.get_user_sso_links(user.id)),
        ("delete_sso_link", lambda: s.delete_sso_link(ctx["create_sso_link"].id)),
        (
            "create_sso_session",
            lambda: s.create_sso_session(
                user_id=user.id,
                provider_id=ctx["create_sso_provider"].id,
                provider_type="oidc",
                provider_subject=tag,
                expires_at=_in(hours=1),
                session_token=tag,
            ),
        ),
        ("get_sso_session", lambda: s.get_sso_session(ctx["create_sso_session"].id)),
        (
            "delete_sso_sessions",
            lambda: s.delete_sso_sessions(
                provider_id=ctx["create_sso_provider"].id, provider_subject=tag, session_token=tag
            ),
        ),
        ("delete_sso_session", lambda: s.delete_sso_session(ctx["create_sso_session"].id)),
        ("delete_user_sso_sessions", lambda: s.delete_user_sso_sessions(user.id)),
        ("delete_sso_provider", lambda: s.delete_sso_provider(ctx["create_sso_provider"].id)),
    ]
    measured = {}
    for name, call in calls:
        measured[name], ctx[name] = await round_trips(s, call)
    assert measured == dict.fromkeys(measured, 1)
    assert ctx["get_sso_provider_by_domain"].client_secret == "z"
    assert ctx["get_sso_session"] == ctx["create_sso_session"]
    assert [s.id for s in ctx["delete_sso_sessions"]] == [ctx["create_sso_session"].id]
    assert ctx["delete_sso_session"] is False


async def test_concurrent_domain_set_replacements_leave_one_set(
    storage: Any, unique: Callable[[str], str]
) -> None:
    """As for member sets (tests/test_organizations.py): eight replacements at once leave one
    caller's domain set, never a merge."""
    provider = await _oidc(storage, unique)
    tag = uuid.uuid4().hex[:8]
    for round_ in range(2):
        calls = [((provider.id,), {"domains": [f"d{n}-{round_}-{tag}.example"]}) for n in range(8)]
        results = await race_each(storage, "update_sso_provider", calls)
        found = await storage.get_sso_provider(provider.id)
        stored = [d.domain for d in found.domains]
        assert len(stored) == 1, stored
        assert [[d.domain for d in r.domains] for r in results].count(stored) >= 1


async def test_an_update_that_waited_for_an_add_returns_the_added_domain(
    storage: Any, unique: Callable[[str], str], dsn: str
) -> None:
    """As for organizations' members: update_sso_provider waited for the provider's lock, held
    by add_sso_provider_domain, then returned the domains its snapshot from before the wait
    showed. It reads them after the lock (migration 0034)."""
    tag = uuid.uuid4().hex[:8]
    provider = await _oidc(storage, unique, domains=[f"a-{tag}.example"])
    async with storage.transaction() as tx:
        await tx.add_sso_provider_domain(provider.id, f"b-{tag}.example")
        renaming = start(storage, "update_sso_provider", provider.id, name=unique("renamed"))
        assert await asyncio.to_thread(waiting, dsn, "UPDATE kitium_auth.sso_providers AS p")
    renamed = await renaming
    assert [d.domain for d in renamed.domains] == [f"a-{tag}.example", f"b-{tag}.example"]
    assert renamed == await storage.get_sso_provider(provider.id)

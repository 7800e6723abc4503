"""SSO provider, domain, link and session methods (async source; the sync copy is generated)."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from .. import _validate as v
from .._base import UNSET, Retry, Unset, metadata_patch_arg, new_id
from ..errors import (
    EncryptionKeyError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
    saved_but_unreadable,
)
from ..records import SsoDomain, SsoLink, SsoProvider, SsoSession
from .core import AsyncCore

PROVIDER_TYPES: Final = ("saml", "oidc")
"""The provider types (mirrors sso_providers__type_check)."""

# Column names bound into the ciphertexts (with the provider id), so a value copied onto another
# row or column fails to decrypt.
CLIENT_SECRET: Final = "sso_providers.client_secret"  # noqa: S105 - a column name
SIGNING_KEY: Final = "sso_providers.signing_key"

PEM: Final = 65_536
"""Longest certificate or signing key accepted (characters of PEM text, chains included)."""

SUBJECT: Final = 1024
"""Longest ``provider_subject`` (mirrors sso_links__provider_subject_check)."""

SUBJECT_BYTES: Final = 2048
"""Longest ``provider_subject`` in bytes of UTF-8: two B-tree indexes hold it, whose entries
have at most 2704 bytes (found in review: 1,000 CJK characters failed as InternalError)."""

MAX_DOMAINS: Final = 256
"""Most domains one ``create_sso_provider`` or ``update_sso_provider`` call may write."""


def _domain_list(value: object) -> list[str]:
    """``domains`` normalised with ``_domain``; a domain listed twice (in any letter case) is a
    ``ValidationError``, not a silent merge."""
    items = v.strings("domains", value, max_items=MAX_DOMAINS, max_len=v.DOMAIN)
    domains: list[str] = []
    for i, item in enumerate(items):
        domain = v.domain(f"domains[{i}]", item)
        if domain in domains:
            raise ValidationError(f"domains[{i}]", "lists the same domain twice")
        domains.append(domain)
    return domains


def _flag(field: str, value: object) -> bool:
    return bool(v.expect_type(field, value, bool))


_url = functools.partial(v.opt_text, max_len=v.URL)
_pem = functools.partial(v.opt_text, max_len=PEM)

# The plain (not secret) provider columns that create and update take, with their checks.
_FIELDS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "name": v.text,
    "org_id": v.opt_uuid_arg,
    "metadata_url": _url,
    "client_id": v.opt_text,
    "token_endpoint_auth_method": v.opt_text,
    "idp_entity_id": _url,
    "idp_sso_url": _url,
    "idp_slo_url": _url,
    "idp_certificate": _pem,
    "sp_entity_id": _url,
    "sp_acs_url": _url,
    "sp_slo_url": _url,
    "signing_cert": _pem,
    "encryption_enabled": _flag,
    "force_authn": _flag,
    "scopes": v.strings,
    "redirect_uris": functools.partial(v.strings, max_len=v.URL),
    "claim_mapping": v.json_text,
    "attribute_mapping": v.json_text,
    "metadata": v.json_text,
}

# The secret columns: (column bound into the ciphertext, longest plaintext accepted).
_SECRETS: Final = {"client_secret": (CLIENT_SECRET, v.LONG), "signing_key": (SIGNING_KEY, PEM)}


def _sso_domains(value: Iterable[dict[str, Any]]) -> tuple[SsoDomain, ...]:
    # Domains aggregated with jsonb_agg carry verified_at as ISO 8601 text (the record parses).
    return tuple(SsoDomain(**item) for item in value)


class AsyncSso(AsyncCore):
    """SSO provider, domain, link and session methods of the async adapter.

    ``client_secret`` and ``signing_key`` are stored only as AES-256-GCM ciphertext bound to
    their column and provider id: writing one needs an encryption key (``EncryptionKeyError``
    otherwise, and nothing is written), and every provider read decrypts them, so reading a
    provider that has a secret needs the key too. Home-realm discovery
    (``get_sso_provider_by_domain``) uses verified domains only; a verified domain belongs to
    one provider.
    """

    def _sso_provider_row(
        self,
        *,
        id: uuid.UUID,
        client_secret_ciphertext: bytes | None,
        client_secret_key_id: str | None,
        signing_key_ciphertext: bytes | None,
        signing_key_key_id: str | None,
        domains: list[dict[str, Any]],
        **fields: Any,
    ) -> SsoProvider:
        # Row factory of every provider query: decrypts the secrets and binds the record.
        return SsoProvider(
            id=id,
            client_secret=self._decrypt(
                CLIENT_SECRET, id, client_secret_key_id, client_secret_ciphertext
            ),
            signing_key=self._decrypt(SIGNING_KEY, id, signing_key_key_id, signing_key_ciphertext),
            domains=_sso_domains(domains),
            **fields,
        )

    def _sealed(self, field: str, provider_id: uuid.UUID, value: object) -> dict[str, Any]:
        """The ``<field>_ciphertext`` and ``<field>_key_id`` parameters of secret ``field``."""
        column, max_len = _SECRETS[field]
        key_id, blob = self._encrypt(column, provider_id, v.opt_text(field, value, max_len=max_len))
        return {f"{field}_ciphertext": blob, f"{field}_key_id": key_id}

    async def create_sso_provider(
        self,
        *,
        type: str,
        name: str,
        org_id: uuid.UUID | str | None = None,
        metadata_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_endpoint_auth_method: str | None = None,
        idp_entity_id: str | None = None,
        idp_sso_url: str | None = None,
        idp_slo_url: str | None = None,
        idp_certificate: str | None = None,
        sp_entity_id: str | None = None,
        sp_acs_url: str | None = None,
        sp_slo_url: str | None = None,
        signing_cert: str | None = None,
        signing_key: str | None = None,
        encryption_enabled: bool = False,
        force_authn: bool = False,
        scopes: Iterable[str] = (),
        redirect_uris: Iterable[str] = (),
        claim_mapping: dict[str, Any] | None = None,
        attribute_mapping: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        domains: Iterable[str] = (),
    ) -> SsoProvider:
        """Create a SAML or OIDC provider with its email domains (one statement) and return it.

        ``type`` is ``"saml"`` or ``"oidc"``; ``domains`` are added unverified (verify them with
        ``verify_sso_provider_domain`` before they route logins). ``client_secret`` and
        ``signing_key`` are encrypted before they leave the process. Raises
        ``EncryptionKeyError`` when a secret is given and no key is configured, ``NotFoundError``
        when ``org_id`` is not an organization, and ``ValidationError`` for bad input (nothing is
        written in each case). Retried on transient failures: the id is generated before the
        first attempt (the ciphertexts are bound to it), so a retry returns the same row.
        """
        provider_id = new_id()
        given = {
            "name": name,
            "org_id": org_id,
            "metadata_url": metadata_url,
            "client_id": client_id,
            "token_endpoint_auth_method": token_endpoint_auth_method,
            "idp_entity_id": idp_entity_id,
            "idp_sso_url": idp_sso_url,
            "idp_slo_url": idp_slo_url,
            "idp_certificate": idp_certificate,
            "sp_entity_id": sp_entity_id,
            "sp_acs_url": sp_acs_url,
            "sp_slo_url": sp_slo_url,
            "signing_cert": signing_cert,
            "encryption_enabled": encryption_enabled,
            "force_authn": force_authn,
            "scopes": scopes,
            "redirect_uris": redirect_uris,
            "claim_mapping": claim_mapping,
            "attribute_mapping": attribute_mapping,
            "metadata": metadata,
        }
        params: dict[str, Any] = {
            "id": provider_id,
            "type": v.choice("type", type, PROVIDER_TYPES),
            **{field: _FIELDS[field](field, value) for field, value in given.items()},
            "domains": _domain_list(domains),
        }
        params.update(self._sealed("client_secret", provider_id, client_secret))
        params.update(self._sealed("signing_key", provider_id, signing_key))
        provider: SsoProvider = await self._written(
            "create_sso_provider", params, self._sso_provider_row, retry=Retry.SAFE
        )
        return provider

    async def get_sso_provider(self, id: uuid.UUID | str) -> SsoProvider | None:
        """The provider with this id and its domains, secrets decrypted, or ``None`` (also for
        a malformed id). Raises ``EncryptionKeyError`` when a stored secret cannot be
        decrypted."""
        provider_id = v.parse_uuid(id)
        if provider_id is None:
            return None
        provider: SsoProvider | None = await self._run(
            "get_sso_provider",
            {"id": provider_id},
            retry=Retry.SAFE,
            make=self._sso_provider_row,
        )
        return provider

    async def update_sso_provider(
        self,
        id: uuid.UUID | str,
        *,
        name: str | Unset = UNSET,
        org_id: uuid.UUID | str | Unset | None = UNSET,
        metadata_url: str | Unset | None = UNSET,
        client_id: str | Unset | None = UNSET,
        client_secret: str | Unset | None = UNSET,
        token_endpoint_auth_method: str | Unset | None = UNSET,
        idp_entity_id: str | Unset | None = UNSET,
        idp_sso_url: str | Unset | None = UNSET,
        idp_slo_url: str | Unset | None = UNSET,
        idp_certificate: str | Unset | None = UNSET,
        sp_entity_id: str | Unset | None = UNSET,
        sp_acs_url: str | Unset | None = UNSET,
        sp_slo_url: str | Unset | None = UNSET,
        signing_cert: str | Unset | None = UNSET,
        signing_key: str | Unset | None = UNSET,
        encryption_enabled: bool | Unset = UNSET,
        force_authn: bool | Unset = UNSET,
        scopes: Iterable[str] | Unset = UNSET,
        redirect_uris: Iterable[str] | Unset = UNSET,
        claim_mapping: dict[str, Any] | Unset = UNSET,
        attribute_mapping: dict[str, Any] | Unset = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        metadata_patch: Mapping[str, Any] | Unset = UNSET,
        domains: Iterable[str] | Unset = UNSET,
    ) -> SsoProvider:
        """Change the given fields of a provider and return it (fields left out stay as they
        are; ``type`` cannot change).

        A new ``client_secret`` or ``signing_key`` is encrypted afresh (``None`` clears it).
        ``domains`` replaces the whole domain set in the same statement: domains listed again
        keep their verification, the others are removed, new ones are added unverified. Raises
        ``NotFoundError`` when there is no such provider (or ``org_id`` is not an
        organization), and ``EncryptionKeyError``: before anything is written when a secret is
        given and no key is configured, or after the change is saved when a stored secret cannot
        be decrypted for the returned record (the message says which). ``metadata`` replaces the
        whole object; ``metadata_patch`` edits it in the same statement (RFC 7396 JSON Merge
        Patch: its keys are set, nested objects merged, a ``None`` value removes its key), so
        concurrent patches of different keys all survive; giving both is a ``ValidationError``
        naming ``metadata_patch``. Setting values and applying a merge patch are idempotent, so
        transient failures are retried.
        """
        provider_id = v.uuid_arg("id", id)
        given = {
            "name": name,
            "org_id": org_id,
            "metadata_url": metadata_url,
            "client_id": client_id,
            "token_endpoint_auth_method": token_endpoint_auth_method,
            "idp_entity_id": idp_entity_id,
            "idp_sso_url": idp_sso_url,
            "idp_slo_url": idp_slo_url,
            "idp_certificate": idp_certificate,
            "sp_entity_id": sp_entity_id,
            "sp_acs_url": sp_acs_url,
            "sp_slo_url": sp_slo_url,
            "signing_cert": signing_cert,
            "encryption_enabled": encryption_enabled,
            "force_authn": force_authn,
            "scopes": scopes,
            "redirect_uris": redirect_uris,
            "claim_mapping": claim_mapping,
            "attribute_mapping": attribute_mapping,
            "metadata": metadata,
        }
        params: dict[str, Any] = {"id": provider_id}
        for field, value in given.items():
            is_set = value is not UNSET
            params[f"set_{field}"] = is_set
            params[field] = _FIELDS[field](field, value) if is_set else None
        params["metadata_patch"] = metadata_patch_arg(metadata, metadata_patch)
        params["set_domains"] = domains is not UNSET
        params["domains"] = _domain_list(domains) if domains is not UNSET else []
        for field, secret in (("client_secret", client_secret), ("signing_key", signing_key)):
            is_set = secret is not UNSET
            params[f"set_{field}"] = is_set
            params.update(self._sealed(field, provider_id, secret if is_set else None))
        try:
            provider: SsoProvider | None = await self._run(
                "update_sso_provider", params, retry=Retry.SAFE, make=self._sso_provider_row
            )
        except EncryptionKeyError as exc:
            raise saved_but_unreadable("update_sso_provider", exc) from exc
        if provider is None:
            raise NotFoundError(f"update_sso_provider: no SSO provider {provider_id}")
        return provider

    async def delete_sso_provider(self, id: uuid.UUID | str) -> bool:
        """Delete a provider with its domains, links and SSO sessions; ``True`` if a row was
        deleted. Idempotent (retried on transient failures): deleting a missing provider returns
        ``False``, as may a retry after a lost acknowledgement for a provider the first attempt
        deleted."""
        return await self._delete_by_id("delete_sso_provider", id)

    async def list_sso_providers(self, org_id: uuid.UUID | str | None = None) -> list[SsoProvider]:
        """Providers, newest first, secrets decrypted: every one, or with ``org_id`` that
        organization's providers plus the global ones (no ``org_id``), as the reference does.
        Empty for a malformed ``org_id``. Raises ``EncryptionKeyError`` when a stored secret
        cannot be decrypted."""
        factory = self._sso_provider_row
        if org_id is None:
            providers: list[SsoProvider] = await self._run(
                "list_sso_providers", {}, retry=Retry.SAFE, make=factory
            )
            return providers
        parsed = v.parse_uuid(org_id)
        if parsed is None:
            return []
        providers = await self._run(
            "list_org_sso_providers", {"org_id": parsed}, retry=Retry.SAFE, make=factory
        )
        return providers

    async def add_sso_provider_domain(
        self, provider_id: uuid.UUID | str, domain: str, *, verified: bool = False
    ) -> SsoDomain:
        """Add an email domain (stored lowercase) to a provider and return it; ``verified=True``
        marks it verified now.

        Adding a domain the provider already has is idempotent and never un-verifies it, so the
        call is retried on transient failures. Raises ``ConflictError`` when verifying a domain
        another provider has verified, ``NotFoundError`` when there is no such provider, and
        ``ValidationError`` for a malformed domain.
        """
        params = {
            "provider_id": v.uuid_arg("provider_id", provider_id),
            "domain": v.domain("domain", domain),
            "verified": _flag("verified", verified),
        }
        added = await self._written("add_sso_provider_domain", params, SsoDomain, retry=Retry.SAFE)
        return added

    async def verify_sso_provider_domain(
        self, provider_id: uuid.UUID | str, domain: str
    ) -> SsoDomain:
        """Mark a provider's domain verified (a domain verified earlier keeps its
        ``verified_at``) and return it; from then on it routes logins to this provider.

        Raises ``ConflictError`` when another provider already has the domain verified and
        ``NotFoundError`` when the domain was not added to this provider. Idempotent, so
        retried on transient failures.
        """
        params = {
            "provider_id": v.uuid_arg("provider_id", provider_id),
            "domain": v.domain("domain", domain),
        }
        verified = await self._one(
            "verify_sso_provider_domain", params, SsoDomain, retry=Retry.SAFE
        )
        if verified is None:
            raise NotFoundError(
                f"verify_sso_provider_domain: provider {params['provider_id']} has no such domain"
            )
        return verified

    async def remove_sso_provider_domain(self, provider_id: uuid.UUID | str, domain: str) -> bool:
        """Remove a domain from a provider; ``True`` if it had it (``False`` also for a
        malformed id or domain). Idempotent, so retried on transient failures."""
        parsed = v.parse_uuid(provider_id)
        if parsed is None:
            return False
        try:
            name = v.domain("domain", domain)
        except ValidationError:
            return False
        params = {"provider_id": parsed, "domain": name}
        return await self._exec("remove_sso_provider_domain", params, retry=Retry.SAFE) > 0

    async def get_sso_provider_by_domain(self, domain: str) -> SsoProvider | None:
        """Home-realm discovery: the provider that has verified the domain of ``domain`` (an
        email address or a bare domain, in any letter case), or ``None``.

        Only exact, verified domains match (``eu.example.com`` does not match a verified
        ``example.com``); unverified domains never route logins. A Unicode domain
        (``bücher.example``) matches its verified ``xn--`` form. ``None`` for malformed input;
        ``ValidationError`` for a Unicode domain with ß, ς or a zero-width joiner, whose
        ``xn--`` form depends on the IDNA version (so that SSO enforcement fails closed).
        """
        if not isinstance(domain, str) or len(domain) > v.LONG:
            return None
        name = v.lookup_domain(domain)
        if name is None:
            return None
        provider: SsoProvider | None = await self._run(
            "get_sso_provider_by_domain",
            {"domain": name},
            retry=Retry.SAFE,
            make=self._sso_provider_row,
        )
        return provider

    async def create_sso_link(
        self,
        *,
        user_id: uuid.UUID | str,
        provider_id: uuid.UUID | str,
        provider_type: str,
        provider_subject: str,
        provider_email: str | None = None,
        auto_provisioned: bool = False,
        metadata: dict[str, Any] | None = None,
        last_auth_at: dt.datetime | None = None,
    ) -> SsoLink:
        """Link a user to their identity (``provider_subject``) at a provider and return the
        link. ``last_auth_at`` defaults to now (the database clock), as in the reference.

        Raises ``ConflictError`` when the provider's subject is already linked (to any user),
        ``NotFoundError`` when the user or the provider does not exist or ``provider_type`` is
        not the provider's type (``sso_links__provider_type_fkey``), and ``ValidationError``
        for bad input. Retried on transient failures: the id is generated before the first
        attempt, so a retry after a lost acknowledgement returns the same row.
        """
        params = {
            "id": new_id(),
            "user_id": v.uuid_arg("user_id", user_id),
            "provider_id": v.uuid_arg("provider_id", provider_id),
            "provider_type": v.choice("provider_type", provider_type, PROVIDER_TYPES),
            "provider_subject": v.text(
                "provider_subject", provider_subject, max_len=SUBJECT, max_bytes=SUBJECT_BYTES
            ),
            "provider_email": v.opt_text("provider_email", provider_email, max_len=v.EMAIL),
            "auto_provisioned": _flag("auto_provisioned", auto_provisioned),
            "metadata": v.json_text("metadata", metadata),
            "last_auth_at": v.opt_timestamp("last_auth_at", last_auth_at),
        }
        link = await self._written("create_sso_link", params, SsoLink, retry=Retry.SAFE)
        return link

    async def get_sso_link(self, id: uuid.UUID | str) -> SsoLink | None:
        """The SSO link with this id, or ``None`` (also for a malformed id)."""
        link_id = v.parse_uuid(id)
        if link_id is None:
            return None
        return await self._one("get_sso_link", {"id": link_id}, SsoLink, retry=Retry.SAFE)

    async def get_sso_link_by_subject(
        self, provider_id: uuid.UUID | str, provider_subject: str
    ) -> SsoLink | None:
        """The link of the identity ``provider_subject`` (SAML NameID, OIDC ``sub``) at a
        provider, whose ``user_id`` is the user an assertion from that provider signs in; or
        ``None`` (no such link, or a malformed ``provider_id``). Raises ``ValidationError`` for
        a subject ``create_sso_link`` would refuse."""
        parsed = v.parse_uuid(provider_id)
        subject = v.text(
            "provider_subject", provider_subject, max_len=SUBJECT, max_bytes=SUBJECT_BYTES
        )
        if parsed is None:
            return None
        return await self._one(
            "get_sso_link_by_subject",
            {"provider_id": parsed, "provider_subject": subject},
            SsoLink,
            retry=Retry.SAFE,
        )

    async def get_user_sso_links(self, user_id: uuid.UUID | str) -> list[SsoLink]:
        """A user's SSO links, newest first (empty for an unknown or malformed id)."""
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return []
        return await self._many(
            "get_user_sso_links", {"user_id": parsed}, SsoLink, retry=Retry.SAFE
        )

    async def delete_sso_link(self, id: uuid.UUID | str) -> bool:
        """Delete an SSO link and end the SSO sessions of the identity it linked; ``True`` if the
        link was deleted.

        The same statement deletes the user's SSO sessions with the link's ``provider_id`` and
        ``provider_subject`` (expired ones included; sessions of that user at other providers,
        or under another subject, stay): once unlinked, the identity may be linked to another
        user, and the sessions naming the old user end with the link. A session is not tied to a
        link (``create_sso_session`` does not need one), so a sign-in writing its session while
        the unlink runs can keep it: to be sure, call ``delete_sso_sessions`` for the subject
        after unlinking. Sessions are deleted only along with a link the call deletes.
        Idempotent (retried on transient failures): deleting a missing link or a malformed id
        returns ``False`` and deletes nothing (a retry after a lost acknowledgement may report
        ``False`` for a link the first attempt deleted).
        """
        link_id = v.parse_uuid(id)
        if link_id is None:
            return False
        return int(await self._value("delete_sso_link", {"id": link_id}, retry=Retry.SAFE)) > 0

    async def create_sso_session(
        self,
        *,
        user_id: uuid.UUID | str,
        provider_id: uuid.UUID | str,
        provider_type: str,
        provider_subject: str,
        expires_at: dt.datetime,
        session_token: str | None = None,
        last_auth_at: dt.datetime | None = None,
    ) -> SsoSession:
        """Record an SSO login session and return it.

        Only the SHA-256 digest of ``session_token`` (the provider's session index or token) is
        stored, never the token. ``expires_at`` must be timezone-aware; ``last_auth_at``
        defaults to now (the database clock), as in the reference. The same statement records
        the sign-in on the user's link of this identity (same provider, subject and user), if
        there is one: the link's ``last_auth_at`` becomes this session's, capped at the time of
        the statement (a future ``last_auth_at`` is kept on the session but cannot pin the link
        ahead of later sign-ins), unless it is later already. It locks the user's and the
        provider's rows before the link, the order of ``delete_user`` and
        ``delete_sso_provider`` (their row, then the link by cascade), so it waits for them
        rather than deadlock. Raises ``NotFoundError`` when
        the user or the provider does not exist or ``provider_type`` is not the provider's type
        (``sso_sessions__provider_type_fkey``), and ``ValidationError`` for bad input. Retried
        on transient failures: the id is generated before the first attempt, so a retry returns
        the same row.
        """
        token = v.opt_text("session_token", session_token, max_len=v.LONG)
        params = {
            "id": new_id(),
            "user_id": v.uuid_arg("user_id", user_id),
            "provider_id": v.uuid_arg("provider_id", provider_id),
            "provider_type": v.choice("provider_type", provider_type, PROVIDER_TYPES),
            "provider_subject": v.text(
                "provider_subject", provider_subject, max_len=SUBJECT, max_bytes=SUBJECT_BYTES
            ),
            "session_token_hash": None if token is None else _token_digest(token),
            "expires_at": v.timestamp("expires_at", expires_at),
            "last_auth_at": v.opt_timestamp("last_auth_at", last_auth_at),
        }
        session = await self._written("create_sso_session", params, SsoSession, retry=Retry.SAFE)
        return session

    async def get_sso_session(self, id: uuid.UUID | str) -> SsoSession | None:
        """The unexpired SSO session with this id, or ``None`` (unknown, expired or malformed
        id; expiry is judged by the database clock)."""
        session_id = v.parse_uuid(id)
        if session_id is None:
            return None
        return await self._one("get_sso_session", {"id": session_id}, SsoSession, retry=Retry.SAFE)

    async def delete_sso_session(self, id: uuid.UUID | str) -> bool:
        """Delete an SSO session (expired or not); ``True`` if a row was deleted.

        Idempotent: deleting a missing session (or a malformed id) returns ``False``. Retried on
        transient failures, since deleting twice leaves the same state (a retry after a lost
        acknowledgement may report ``False`` for a session the first attempt deleted).
        """
        return await self._delete_by_id("delete_sso_session", id)

    async def delete_sso_sessions(
        self,
        *,
        provider_id: uuid.UUID | str,
        provider_subject: str | None = None,
        session_token: str | None = None,
        end_user_sessions: bool = False,
    ) -> list[SsoSession]:
        """End the SSO sessions a provider's logout names (SAML Single Logout, OIDC back-channel
        logout) and return them, expired ones included: each names its ``user_id`` (an OIDC
        logout token may carry only a ``sid``, and this is how it learns the user).

        The sessions deleted are those of ``provider_id`` with this ``provider_subject`` (SAML
        NameID, OIDC ``sub``) and/or this ``session_token`` (SAML SessionIndex, OIDC ``sid``: the
        ``session_token`` given to ``create_sso_session``, matched by its SHA-256 digest, as
        stored; sessions recorded without one never match it). Given both, a session must match
        both. At least one is required: ``ValidationError`` (naming ``provider_subject``)
        otherwise, and for a subject or token ``create_sso_session`` would refuse (naming it),
        or an ``end_user_sessions`` that is not a ``bool``. Returns an empty list for an unknown
        or malformed ``provider_id`` and for a logout already processed.

        With ``end_user_sessions=True`` the same statement also deletes the application
        sessions (``create_session``, ``issue_session_token``) of the users whose SSO sessions
        it ended, expired ones included: both or neither. Those are the sessions bound to the
        provider's organization and the unbound ones (all of them for a shared provider, whose
        ``org_id`` is ``None``); a session bound to another organization stays, so one tenant's
        identity provider cannot sign a user out of another tenant. Use it
        when an SSO logout means the user's logout from the application; a retry after a lost
        acknowledgement, or the provider sending the logout again, then finds the application
        sessions already gone even though it gets ``[]``. Leave it off (the default, which
        touches only SSO sessions) when the application ends its own sessions selectively
        (``delete_session`` for the ones an SSO login opened) or not at all; the records
        returned name the users either way.

        Under the optional ``tenant_rls`` migration a tenant view ends only the SSO sessions of
        its own providers; with ``end_user_sessions`` it then ends those users' application
        sessions bound to its organization or to none, and none of a user whose SSO sessions
        it could not end.
        Retried on transient failures, since deleting twice leaves the same state (a retry
        after a lost acknowledgement returns only what it deleted itself, possibly nothing, for
        sessions the first attempt ended).
        """
        subject = v.opt_text(
            "provider_subject", provider_subject, max_len=SUBJECT, max_bytes=SUBJECT_BYTES
        )
        token = v.opt_text("session_token", session_token, max_len=v.LONG)
        if subject is None and token is None:
            raise ValidationError(
                "provider_subject", "give provider_subject or session_token (or both)"
            )
        end_sessions = _flag("end_user_sessions", end_user_sessions)
        parsed = v.parse_uuid(provider_id)
        if parsed is None:
            return []
        if token is None:
            params: dict[str, Any] = {
                "provider_id": parsed,
                "provider_subject": subject,
                "end_user_sessions": end_sessions,
            }
            return await self._many(
                "delete_sso_sessions_by_subject", params, SsoSession, retry=Retry.SAFE
            )
        params = {
            "provider_id": parsed,
            "session_token_hash": _token_digest(token),
            "provider_subject": subject,
            "end_user_sessions": end_sessions,
        }
        return await self._many(
            "delete_sso_sessions_by_token", params, SsoSession, retry=Retry.SAFE
        )

    async def delete_user_sso_sessions(self, user_id: uuid.UUID | str) -> int:
        """Delete every SSO session of a user, expired ones included ("log out everywhere");
        returns how many rows were deleted (0 for an unknown or malformed id).

        Under the optional ``tenant_rls`` migration a tenant view deletes only the user's
        sessions at its own providers (those at another tenant's or a shared provider stay).
        Retried on transient failures, since deleting twice leaves the same state (a retry after
        a lost acknowledgement may report a lower count than the first attempt deleted).
        """
        parsed = v.parse_uuid(user_id)
        if parsed is None:
            return 0
        return await self._exec("delete_user_sso_sessions", {"user_id": parsed}, retry=Retry.SAFE)

    async def delete_expired_sso_sessions(
        self, *, batch_size: int = 1000, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete the SSO sessions whose ``expires_at`` has passed (by the database clock) and
        return how many were deleted.

        Runs one short statement per ``batch_size`` rows (earliest expiry first) so locks stay
        brief on a large table. Rows another transaction holds locked at that moment (another
        cleaner, a logout under way) are skipped rather than waited for, and left for the next
        run. Each batch is retried on transient failures, because deleting expired rows is
        idempotent. Raises ``ValidationError`` when ``batch_size`` is not between 1 and 100000,
        and ``PermissionDeniedError``, having deleted nothing, when row-level security
        (``tenant_rls``) hides SSO sessions from this role and no tenant is set: run it as the
        role that applied ``tenant_rls`` (usually the schema owner), or per tenant through
        ``tenant(org_id)``.
        """
        if "kitium.tenant" not in dict(self._local) and await self._value(
            "sso_sessions_hidden_by_row_security", {}, retry=Retry.SAFE
        ):
            # Found in review: as the application role it deleted nothing and said 0, on every
            # run, while expired SSO sessions piled up.
            raise PermissionDeniedError(
                "delete_expired_sso_sessions: row-level security hides SSO sessions from this"
                " role, so expired ones would stay: run it as the role that applied tenant_rls"
                " (its owner_access policy shows it every row), usually the schema owner, or per"
                " tenant through tenant(org_id)"
            )
        return await self._delete_in_batches(
            "delete_expired_sso_sessions",
            {},
            batch_size=batch_size,
            progress=progress,
            resume=("after", "after_id"),
        )


def _token_digest(token: str) -> bytes:
    """The SHA-256 digest of a provider session token, as ``sso_sessions.session_token_hash``
    stores it (the token itself is never sent to the database)."""
    return hashlib.sha256(token.encode("utf-8")).digest()

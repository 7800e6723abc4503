"""fastapi-users on kitium-pg: a ``BaseUserDatabase`` and a session-token ``Strategy``.

Install ``kitium-pg[fastapi]`` and ``fastapi-users``. Then::

    import uuid
    from collections.abc import AsyncIterator

    from fastapi import FastAPI
    from fastapi_users import BaseUserManager, FastAPIUsers, UUIDIDMixin
    from fastapi_users.authentication import AuthenticationBackend, BearerTransport

    from kitium_pg.integrations.fastapi import Storage, add_exception_handlers, storage_lifespan
    from kitium_pg.integrations.fastapi_users import (
        KitiumSessionStrategy,
        KitiumUser,
        KitiumUserDatabase,
        add_email_changed_handler,
    )


    SECRET = ...  # from your secret store: signs reset and verification tokens


    class UserManager(UUIDIDMixin, BaseUserManager[KitiumUser, uuid.UUID]):
        reset_password_token_secret = verification_token_secret = SECRET


    async def get_user_manager(storage: Storage) -> AsyncIterator[UserManager]:
        yield UserManager(KitiumUserDatabase(storage))


    def get_strategy(storage: Storage) -> KitiumSessionStrategy:
        return KitiumSessionStrategy(storage, lifetime_seconds=3600)


    backend = AuthenticationBackend(
        name="kitium",
        transport=BearerTransport(tokenUrl="auth/login"),
        get_strategy=get_strategy,
    )
    fastapi_users = FastAPIUsers[KitiumUser, uuid.UUID](get_user_manager, [backend])

    app = FastAPI(lifespan=storage_lifespan("postgresql://app@db/app"))
    add_exception_handlers(app)
    add_email_changed_handler(app)
    app.include_router(fastapi_users.get_auth_router(backend), prefix="/auth")
    # ...and the register, reset-password, verify and users routers

The two handlers answer what fastapi-users' routes do not catch: without them each is a 500.
``add_exception_handlers`` answers kitium-pg's errors (a database that is down, a statement
that timed out or another transient failure: 503 with ``Retry-After``; an OAuth identity
another user holds, linked through the associate route: 409; a malformed ``expires_at`` from a
provider: 422);
``add_email_changed_handler`` answers ``EmailChanged`` (409, below). A value kitium-pg refuses
in a user being registered or updated (``UserFieldRefused``) is a 422 with or without them.

How fastapi-users' user maps onto kitium-pg:

- ``id``, ``email``: the user's columns; ``hashed_password``: the stored password hash
  (``get_password_hash``). A user stored without one (created outside fastapi-users: SSO,
  ``create_user`` without a hash) gets ``UNUSABLE_HASH``, which no password verifies, rather
  than a hash error; it is the same in every process, so a password-reset token issued for such
  a user (fastapi-users ties it to the hash) works on any worker, and a login spends on it what
  it spends on a real argon2id hash. A user without an email, or with one pydantic's
  ``EmailStr`` refuses (``ada@localhost``, ``a..b@example.com``: kitium-pg stores them, from an
  application's own sign-up or SSO), is no fastapi-users user: ``get`` and ``get_by_email``
  answer ``None`` for it (fastapi-users' user schemas require an ``EmailStr``; answering it
  made ``GET /users/me`` a 500), so its token gets 401 from fastapi-users' routes and its
  password login 400 ``LOGIN_BAD_CREDENTIALS``; kitium-pg's own dependencies still accept its
  sessions. ``get_by_oauth_account`` raises ``UnrepresentableOAuthUser`` for an identity linked
  to such a user (a ``UserAlreadyExists``: the OAuth callback route answers 400
  ``OAUTH_USER_ALREADY_EXISTS`` and creates nothing). ``create`` and ``update`` refuse such an
  address, and any other value kitium-pg refuses, with ``UserFieldRefused`` before writing.
- Sessions: a password reset or change through fastapi-users (``set_password_hash``) leaves the
  user's existing sessions valid, as fastapi-users' own database strategy does. To end them,
  call ``delete_user_sessions`` in the user manager's ``on_after_reset_password``, and in its
  ``on_after_update`` when the update dict has ``"password"``.
- ``is_verified``: whether the user's address is verified (``email_verified_at`` is set).
  Setting it goes through ``mark_user_email_verified`` with the address the user had when
  read: if it has changed since (the verification was for an earlier address), nothing is
  marked and ``EmailChanged`` (an ``InvalidVerifyToken``) is raised. The verify route answers it
  with 400; for the users router's ``PATCH``, call ``add_email_changed_handler(app)`` to answer 409
  rather than 500. Changing the email clears it, as any
  ``update_user(email=...)`` does.
- ``is_active``, ``is_superuser``: the ``"fastapi_users"`` object in the user's ``metadata``
  (missing: active, not superuser), written as a merge patch by the update statement itself, so
  concurrent updates of other metadata keys or flags all hold.
- ``name``, ``picture`` and ``plan`` in a create or update dict go to the columns of that name;
  other unknown fields raise ``ValueError``. In an update dict, ``null`` for ``email``,
  ``password`` or a flag leaves it as it is (a ``PATCH`` with ``{"email": null}`` would
  otherwise remove the user's address, and ``{"is_active": null}`` deactivate the user).
- OAuth accounts are kitium-pg OAuth links: one identity per provider and user (a second
  account at the same provider is a ``ConflictError``, as in ``link_oauth_account``). Their
  provider tokens are stored encrypted, so the adapter needs encryption keys to link accounts
  with tokens and to load such users. ``OAuthAccount.id`` is a stable UUID derived from the
  user id and the provider. fastapi-users' OAuth sign-up creates the user, then links the
  account: when kitium-pg refuses that first link (a provider's ``expires_at`` or token it
  refuses, an adapter without encryption keys), the user the database instance's previous call
  created is deleted again before the error is raised, if it has no OAuth link. Left behind,
  unlinked and holding the provider's address, it made every later OAuth login of that person
  a 400 ``OAUTH_USER_ALREADY_EXISTS`` (found in review). Any other call in between (a shared
  instance serving another request) forgets the sign-up, so a user who signed up earlier is
  never taken for one.

Each ``get*`` call reads the user, its password hash, and the tokens of each linked provider
(one statement each, on the primary so a read follows the preceding write).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import secrets
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any, Final

import attrs
import pydantic
from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_users import exceptions as fu_exceptions
from fastapi_users.db import BaseUserDatabase
from fastapi_users.manager import BaseUserManager
from fastapi_users.models import OAuthAccountProtocol
from fastapi_users.password import PasswordHelperProtocol
from fastapi_users.router.common import ErrorCode

from .. import AsyncPostgresStorageAdapter
from .._base import logger
from .._validate import plain
from ..errors import ConflictError, KitiumPgError, NotFoundError, ValidationError
from ..records import User

__all__ = [
    "UNUSABLE_HASH",
    "EmailChanged",
    "KitiumSessionStrategy",
    "KitiumUser",
    "KitiumUserDatabase",
    "OAuthAccount",
    "UnrepresentableOAuthUser",
    "UserFieldRefused",
    "add_email_changed_handler",
]

METADATA_KEY: Final = "fastapi_users"
"""Key of the user's ``metadata`` object that holds the fastapi-users flags."""
NO_LIFETIME_DAYS: Final = 3650
"""Validity of a session issued by a strategy without a lifetime (fastapi-users' "never
expires"): every kitium session has an expiry."""
UNUSABLE_HASH: Final = (
    "$argon2id$v=19$m=65536,t=3,p=4$CQFKyxes0nSnLd7gP0P0uA"
    "$Mu8t8JmlCVQXOFtjT9gfWLEL1gGhnkB+H1dWLD5Ri6E"
)
"""The ``hashed_password`` of a user stored without a password hash: pwdlib's argon2id (its
default parameters) of 32 random bytes that were thrown away, so no password verifies it."""
_FLAGS: Final = ("is_active", "is_superuser")
# fastapi-users' fields an update leaves as they are when given as null: their columns or
# flags have no null to store (the password's null is fastapi-users' "no new password").
_NULL_IS_UNCHANGED: Final = frozenset(
    {"email", "password", "is_active", "is_superuser", "is_verified"}
)
_FLAG_DEFAULTS: Final = {"is_active": True, "is_superuser": False}
_COLUMNS: Final = ("name", "picture", "plan")
_LINK_FIELDS: Final = ("oauth_name", "account_id", "account_email")
_TOKEN_KEYS: Final = frozenset({"access_token", "refresh_token", "expires_at"})
_OAUTH_FIELDS: Final = (*_LINK_FIELDS, *sorted(_TOKEN_KEYS))
# The fields of a create or update dict that come from the client (the request's schema):
# kitium-pg's refusal of one is the client's error. The others (the hash, the flags' metadata,
# email_verified_at) are made here or by the password helper: a refusal is a bug, left a 500.
_CLIENT_FIELDS: Final = frozenset({"email", *_COLUMNS})
_EMAIL_STR: Final = pydantic.TypeAdapter(pydantic.EmailStr)


class UserFieldRefused(ValidationError, RequestValidationError):
    """kitium-pg refused a field of a user fastapi-users asked to create or update; nothing was
    written. ``field`` names it: ``email`` for an address pydantic's ``EmailStr`` accepts and
    kitium-pg refuses (``bİb@example.com``: ``lower()``, which compares addresses, would make it
    ``bib@example.com``, another address), or one ``EmailStr`` refuses (only from a caller that
    skipped fastapi-users' schemas, or a provider's address in an OAuth sign-up: such a user could
    not be loaded again); ``name``, ``picture`` or ``plan`` for those columns.

    Both kitium-pg's ``ValidationError`` (``add_exception_handlers`` answers it 422 with its
    message) and FastAPI's ``RequestValidationError``, which every FastAPI app answers 422 with
    the error at ``("body", field)``, as it answers a value the request's schema refused.
    fastapi-users' register and users routes catch neither; a plain ``ValidationError`` was a
    500 in an app without ``add_exception_handlers``. Outside a request it is a
    ``ValidationError`` like any other: nothing here depends on HTTP."""

    def __init__(self, field: str, message: str) -> None:
        ValidationError.__init__(self, field, message)
        RequestValidationError.__init__(
            self, [{"type": "value_error", "loc": ("body", field), "msg": message}]
        )

    def __str__(self) -> str:
        # kitium-pg's "field: message", not RequestValidationError's summary of its errors.
        return Exception.__str__(self)


class UnrepresentableOAuthUser(fu_exceptions.UserAlreadyExists):
    """The OAuth identity is linked to a kitium-pg user that fastapi-users cannot represent (no
    email, or one pydantic's ``EmailStr`` refuses); ``user_id`` is that user's id.

    ``get_by_oauth_account`` raises it rather than answer ``None``: fastapi-users' OAuth callback
    would then create another user for the identity, fail to link it (the identity is taken)
    and leave that user holding the provider's address, which locked the person out (found in
    review). A ``UserAlreadyExists``: the callback passes it through untouched and its route
    answers 400 ``OAUTH_USER_ALREADY_EXISTS``; nothing is written. The person signs in the way
    the user was made (the application's own flow), or the application gives the user an
    address."""

    def __init__(self, user_id: uuid.UUID) -> None:
        super().__init__(
            f"the OAuth identity belongs to user {user_id}, which has no address"
            " fastapi-users can represent"
        )
        self.user_id = user_id

    def __reduce__(self) -> tuple[type[UnrepresentableOAuthUser], tuple[uuid.UUID]]:
        # Rebuilt from its user id (its message is made from it), not from its message.
        return type(self), (self.user_id,)


class EmailChanged(fu_exceptions.InvalidVerifyToken):
    """``is_verified=True`` arrived after the user's address changed: the verification (the
    token, or a superuser's ``PATCH``) was for the address read before, so nothing was written.

    A subclass of ``InvalidVerifyToken``, which fastapi-users' verify route answers with 400
    ``VERIFY_USER_BAD_TOKEN``. Its users router (``PATCH /users/{id}``) maps no such error and
    would answer 500: ``add_email_changed_handler`` makes that a 409."""


def add_email_changed_handler(app: FastAPI) -> None:
    """Answer an ``EmailChanged`` that no route handled with 409 Conflict and the detail
    ``{"code": "UPDATE_USER_EMAIL_CHANGED", "reason": ...}``: a superuser's
    ``PATCH /users/{id}`` setting ``is_verified`` while the user changed their address. The
    client reads the user again and decides; nothing was written."""

    async def email_changed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            status_code=409,
            content={
                "detail": {
                    "code": "UPDATE_USER_EMAIL_CHANGED",
                    "reason": "the user's email address changed after it was read; nothing"
                    " was written: read the user again",
                }
            },
        )

    app.add_exception_handler(EmailChanged, email_changed)


@attrs.define(kw_only=True)
class OAuthAccount:
    """An OAuth account as fastapi-users sees it (``OAuthAccountProtocol``)."""

    id: uuid.UUID
    oauth_name: str
    access_token: str = attrs.field(repr=False)
    expires_at: int | None
    refresh_token: str | None = attrs.field(repr=False)
    account_id: str
    account_email: str


@attrs.define(kw_only=True)
class KitiumUser:
    """A user as fastapi-users sees it (``UserOAuthProtocol``), with the kitium-pg ``record``
    it was read from (``name``, ``plan``, ``metadata``…)."""

    id: uuid.UUID
    email: str
    hashed_password: str = attrs.field(repr=False)
    is_active: bool = True
    is_superuser: bool = False
    is_verified: bool = False
    oauth_accounts: list[OAuthAccount] = attrs.field(factory=list)
    record: User


class KitiumUserDatabase(BaseUserDatabase[KitiumUser, uuid.UUID]):
    """fastapi-users' user database on an ``AsyncPostgresStorageAdapter``.

    ``password_helper``: give it only if your user manager's helper cannot read argon2id
    hashes (``UNUSABLE_HASH``): users stored without a hash then get a hash it makes of a
    random password, once per database instance (so a password-reset token issued for such a
    user works only within that instance).
    """

    def __init__(
        self,
        storage: AsyncPostgresStorageAdapter,
        *,
        password_helper: PasswordHelperProtocol | None = None,
    ) -> None:
        self.storage = storage
        self._password_helper = password_helper
        self._unusable: str | None = None
        # The user the last call created, while the call after it may be its OAuth sign-up's
        # first link (see add_oauth_account); every other call forgets it.
        self._signed_up: uuid.UUID | None = None

    # -- reads ----------------------------------------------------------------------------

    async def get(self, id: uuid.UUID) -> KitiumUser | None:
        """The user with this id, or ``None`` (also for a user without an address
        ``EmailStr`` accepts)."""
        self._signed_up = None
        return await self._load(await self.storage.get_user(id, consistency="primary"))

    async def get_by_email(self, email: str) -> KitiumUser | None:
        """The user with this email in any letter case, or ``None`` (also for a user whose
        address ``EmailStr`` refuses)."""
        self._signed_up = None
        return await self._load(await self.storage.get_user_by_email(email, consistency="primary"))

    async def get_by_oauth_account(self, oauth: str, account_id: str) -> KitiumUser | None:
        """The user linked to account ``account_id`` at provider ``oauth``, or ``None`` when
        the identity is linked to no user. Raises ``UnrepresentableOAuthUser`` when it is linked
        to a user without an address ``EmailStr`` accepts."""
        self._signed_up = None
        record = await self.storage.get_user_by_oauth(oauth, account_id, consistency="primary")
        user = await self._load(record)
        if record is not None and user is None:
            # "No such user" would make fastapi-users' callback create one for the identity.
            raise UnrepresentableOAuthUser(record.id)
        return user

    # -- writes ---------------------------------------------------------------------------

    async def create(self, create_dict: dict[str, Any]) -> KitiumUser:
        """Create a user from fastapi-users' dict (``email``, ``hashed_password``, flags,
        ``name``/``picture``/``plan``). Raises ``UserAlreadyExists`` for a taken email (also
        when another registration took it after the user manager's check), and
        ``UserFieldRefused`` for an email or column kitium-pg refuses or an email ``EmailStr``
        refuses (nothing is written)."""
        self._signed_up = None
        fields = dict(create_dict)
        flags = {k: bool(fields.pop(k)) for k in _FLAGS if fields.get(k) is not None}
        for k in _FLAGS:
            fields.pop(k, None)
        verified = bool(fields.pop("is_verified", False))
        email = fields.pop("email")
        _check_email(email)
        password_hash = fields.pop("hashed_password", None)
        columns = _columns(fields)
        metadata = {METADATA_KEY: {**_FLAG_DEFAULTS, **flags}}
        try:
            with _refused_by_kitium():
                record = await self.storage.create_user(
                    email=email,
                    email_verified_at=dt.datetime.now(dt.UTC) if verified else None,
                    password_hash=password_hash,
                    metadata=metadata,
                    **columns,
                )
        except ConflictError as exc:
            # users' only unique rule besides the id: the email (a deadlock or a serialization
            # failure is a ConflictError too, and no taken address)
            if exc.code != "unique_violation":
                raise
            raise fu_exceptions.UserAlreadyExists() from exc
        self._signed_up = record.id
        user = await self._load(record, password_hash=password_hash)
        assert user is not None
        return user

    async def update(self, user: KitiumUser, update_dict: dict[str, Any]) -> KitiumUser:
        """Apply fastapi-users' update dict in one transaction and return the user re-read.
        Raises ``NotFoundError`` when the user is gone, ``UserAlreadyExists`` for a taken
        email, ``UserFieldRefused`` for an email or column kitium-pg refuses or an email
        ``EmailStr`` refuses, and ``EmailChanged`` (an ``InvalidVerifyToken``) for
        ``is_verified=True`` when the user's address is no longer the one ``user`` holds (it
        changed after the verification token was checked, or after a superuser's ``PATCH``
        read the user): nothing is written then. Flags are merged into the stored metadata by
        the update statement itself (a merge patch), so two concurrent updates of different
        flags both hold. ``null`` for ``email``, ``password`` or a flag leaves it unchanged.
        Deactivating a user (``is_active=False``) also deletes their sessions and API keys, in
        the same transaction."""
        self._signed_up = None
        fields = {
            k: v for k, v in update_dict.items() if v is not None or k not in _NULL_IS_UNCHANGED
        }
        if (
            "email" in update_dict
            and update_dict["email"] is None
            and not fields.get("is_verified", True)
        ):
            # fastapi-users un-verifies the user with any change of address, this one too;
            # the address stays, so does its verification.
            del fields["is_verified"]
        flags = {k: bool(fields.pop(k)) for k in _FLAGS if k in fields}
        verified = bool(fields.pop("is_verified")) if "is_verified" in fields else None
        has_hash = "hashed_password" in fields
        password_hash = fields.pop("hashed_password", None)
        changes: dict[str, Any] = _columns({k: v for k, v in fields.items() if k != "email"})
        if "email" in fields:
            _check_email(fields["email"])
            changes["email"] = fields["email"]
            if verified:  # verified with the new address: it is the one vouched for
                changes["email_verified_at"] = dt.datetime.now(dt.UTC)
        if verified is False:
            changes["email_verified_at"] = None
        if flags:
            changes["metadata_patch"] = {METADATA_KEY: flags}
        async with self.storage.transaction() as tx:
            if changes:
                try:
                    with _refused_by_kitium():
                        await tx.update_user(user.id, **changes)
                except ConflictError as exc:  # the email, as in create()
                    if exc.code != "unique_violation":
                        raise
                    raise fu_exceptions.UserAlreadyExists() from exc
            # Only while the address is still the one the token was checked against.
            if (
                verified
                and "email" not in fields
                and await tx.mark_user_email_verified(user.id, user.email) is None
            ):
                # Marked nothing: the address changed, or the user is gone.
                if await tx.get_user(user.id) is None:
                    raise NotFoundError(f"update: no user {user.id}")
                raise EmailChanged()
            if has_hash:
                await tx.set_password_hash(user.id, password_hash)
            if flags.get("is_active") is False:
                # kitium's own dependencies (current_session, require_permission,
                # api_key_principal) see the sessions and keys, not fastapi-users' flags: a
                # deactivated user's end here (found in review: the keys kept working).
                await tx.delete_user_sessions(user.id)
                await tx.delete_user_api_keys(user.id)
        refreshed = await self.get(user.id)
        if refreshed is None:  # deleted concurrently, after the commit
            raise fu_exceptions.UserNotExists()
        return refreshed

    async def delete(self, user: KitiumUser) -> None:
        """Delete the user with everything that belongs to it (sessions, keys, links…)."""
        self._signed_up = None
        await self.storage.delete_user(user.id)

    async def add_oauth_account(self, user: KitiumUser, create_dict: dict[str, Any]) -> KitiumUser:
        """Link an OAuth account (fastapi-users' dict: ``oauth_name``, ``account_id``,
        ``account_email``, ``access_token``, ``refresh_token``, ``expires_at`` in epoch
        seconds) and return the user re-read. Without any of the three token keys the stored
        tokens (and their version) are kept. When the link fails for the user this instance's
        previous call created (fastapi-users' OAuth sign-up: create, then this), and that user
        has no OAuth link, it is deleted before the error is raised (see the module's
        docstring)."""
        signing_up, self._signed_up = self._signed_up == user.id, None
        try:
            tokens: dict[str, Any] = {}
            if _TOKEN_KEYS & create_dict.keys():
                expires_at = create_dict.get("expires_at")
                tokens = {
                    # "" is how a link without tokens loads (fastapi-users' access_token is a
                    # str).
                    "access_token": create_dict.get("access_token") or None,
                    "refresh_token": create_dict.get("refresh_token") or None,
                    "token_expires_at": _expiry(expires_at),
                }
            await self.storage.link_oauth_account(
                user.id,
                create_dict["oauth_name"],
                sub=create_dict["account_id"],
                email=create_dict.get("account_email"),
                **tokens,
            )
        except Exception:
            if signing_up:
                await self._undo_sign_up(user.id)
            raise
        refreshed = await self.get(user.id)
        if refreshed is None:  # pragma: no cover - deleted concurrently
            raise fu_exceptions.UserNotExists()
        return refreshed

    async def _undo_sign_up(self, user_id: uuid.UUID) -> None:
        """Delete a user whose OAuth sign-up failed at its link, unless it has an OAuth link
        by now (then it is no failed sign-up's); a failure of the deletion is logged, not
        raised (the link's error is the one to report)."""
        try:
            record = await self.storage.get_user(user_id, consistency="primary")
            if record is not None and not record.oauth:
                await self.storage.delete_user(user_id)
        except KitiumPgError as exc:
            logger.warning(
                "kitium_pg fastapi-users: could not delete user %s after its OAuth sign-up"
                " failed (%s); delete it, or its OAuth logins stay refused",
                user_id,
                exc,
            )

    async def update_oauth_account(
        self,
        user: KitiumUser,
        oauth_account: OAuthAccountProtocol[Any],
        update_dict: dict[str, Any],
    ) -> KitiumUser:
        """Refresh a linked account (new tokens, email) and return the user re-read.

        The tokens are written only when ``update_dict`` has one of ``access_token``,
        ``refresh_token`` or ``expires_at`` (the others then come from ``oauth_account``): an
        update of the email alone must not write back the tokens loaded with the user, which a
        refresh (``update_oauth_tokens``) may have replaced since."""
        kept = _OAUTH_FIELDS if _TOKEN_KEYS & update_dict.keys() else _LINK_FIELDS
        merged = {name: getattr(oauth_account, name) for name in kept} | update_dict
        return await self.add_oauth_account(user, merged)

    # -- loading --------------------------------------------------------------------------

    async def _load(
        self, record: User | None, *, password_hash: str | None = None
    ) -> KitiumUser | None:
        if record is None or record.email is None or not _representable(record.email):
            # fastapi-users' user schemas require an EmailStr: loading such a user made every
            # route that answers it fail its response validation (a 500).
            return None
        if password_hash is None:
            password_hash = await self.storage.get_password_hash(record.id)
        accounts = []
        for provider, link in sorted(record.oauth.items()):
            tokens = await self.storage.get_oauth_tokens(record.id, provider)
            expires = tokens.expires_at if tokens else None
            accounts.append(
                OAuthAccount(
                    id=uuid.uuid5(record.id, f"fastapi-users:{provider}"),
                    oauth_name=provider,
                    access_token=(tokens.access_token if tokens else None) or "",
                    refresh_token=tokens.refresh_token if tokens else None,
                    expires_at=None if expires is None else int(expires.timestamp()),
                    account_id=link.sub,
                    account_email=link.email or record.email or "",
                )
            )
        return KitiumUser(
            id=record.id,
            email=record.email,
            hashed_password=password_hash or self._unusable_hash(),
            oauth_accounts=accounts,
            record=record,
            is_verified=record.email_verified_at is not None,
            **_flags(record.metadata),
        )

    def _unusable_hash(self) -> str:
        # Not a hash made per process or per instance (a database per request, as wired
        # above): each made one argon2 hash on the event loop, a login of such a user took
        # visibly longer, and a reset token failed on the next request (found in review).
        if self._password_helper is None:
            return UNUSABLE_HASH
        if self._unusable is None:
            self._unusable = self._password_helper.hash(secrets.token_urlsafe(32))
        return self._unusable


def _flags(metadata: dict[str, Any]) -> dict[str, bool]:
    """The flags in ``metadata``: a flag is true only when it is JSON ``true``, or missing and
    true by default (``is_active``). Anything else written there by another tool (``"no"``,
    ``1``, ``null``) counts as false: no superuser by accident, and an inactive user, as
    ``create_session_unless_deactivated`` judges it for a login."""
    stored = metadata.get(METADATA_KEY)
    stored = stored if isinstance(stored, dict) else {}
    return {k: stored.get(k, default) is True for k, default in _FLAG_DEFAULTS.items()}


@functools.lru_cache(maxsize=4096)
def _representable(email: str) -> bool:
    """Whether pydantic's ``EmailStr`` (fastapi-users' user schemas) accepts ``email``."""
    # Cached: a check takes about 150 µs, and every authenticated request loads its user.
    try:
        _EMAIL_STR.validate_python(email)
    except pydantic.ValidationError:
        return False
    return True


def _check_email(email: object) -> None:
    """Raise ``UserFieldRefused`` for an email ``EmailStr`` refuses: stored, its user could not
    be loaded again (``create`` would commit a user and fail to return it). The characters a
    ``str`` subclass holds are checked, as kitium-pg stores them: the cache would answer one
    that equals (and hashes as) another address with that address's entry."""
    if not isinstance(email, str) or not _representable(plain(email)):
        raise UserFieldRefused("email", "must be an address pydantic's EmailStr accepts")


@contextmanager
def _refused_by_kitium(fields: Collection[str] = _CLIENT_FIELDS) -> Iterator[None]:
    """Raise kitium-pg's refusal of one of ``fields`` as ``UserFieldRefused``."""
    try:
        yield
    except UserFieldRefused:
        raise
    except ValidationError as exc:
        if exc.field not in fields:
            raise
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise UserFieldRefused(exc.field, message) from exc


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(_COLUMNS)
    if unknown:
        raise ValueError(f"fields kitium-pg users do not have: {', '.join(sorted(unknown))}")
    return fields


class KitiumSessionStrategy:
    """A fastapi-users ``Strategy`` whose tokens are kitium-pg session tokens.

    ``write_token`` issues a session (as ``issue_session_token``) valid for ``lifetime_seconds``
    (``None``: ``NO_LIFETIME_DAYS`` days), only while the user is active (else fastapi-users'
    400 ``LOGIN_BAD_CREDENTIALS``);
    ``read_token`` validates it and loads the user through the user manager (``None`` for a
    missing, malformed, expired or revoked token, or a deleted user); ``destroy_token`` deletes
    the session (logout).
    """

    def __init__(self, storage: AsyncPostgresStorageAdapter, lifetime_seconds: int | None = 3600):
        self.storage = storage
        self.lifetime_seconds = lifetime_seconds

    async def read_token(
        self, token: str | None, user_manager: BaseUserManager[KitiumUser, uuid.UUID]
    ) -> KitiumUser | None:
        """The user of a valid session token, else ``None``."""
        if token is None:
            return None
        session = await self.storage.validate_session_token(token, consistency="primary")
        if session is None:
            return None
        try:
            return await user_manager.get(session.user_id)
        except fu_exceptions.UserNotExists:
            return None

    async def write_token(self, user: KitiumUser) -> str:
        """Issue a session for the user and return its token. A strategy without a lifetime
        (``lifetime_seconds=None``, fastapi-users' "never expires") issues sessions valid for
        ``NO_LIFETIME_DAYS`` days: every kitium session has an expiry."""
        seconds = self.lifetime_seconds
        lifetime = (
            dt.timedelta(days=NO_LIFETIME_DAYS)
            if seconds is None
            else dt.timedelta(seconds=seconds)
        )
        expires_at = dt.datetime.now(dt.UTC) + lifetime
        # Not issue_session_token: fastapi-users checked is_active when it read the user,
        # before verifying the password; a deactivation committed since (which deletes the
        # user's sessions) must not be followed by a session. The statement judges the flag on
        # the user row, locked against the deactivation's update.
        try:
            issued = await self.storage._issue_session_token_unless_deactivated(user.id, expires_at)
        except NotFoundError:
            # What fastapi-users answers for an inactive user's login.
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, detail=ErrorCode.LOGIN_BAD_CREDENTIALS
            ) from None
        return issued.token

    async def destroy_token(self, token: str, user: KitiumUser) -> None:
        """Delete the token's session (only when it belongs to ``user``)."""
        session = await self.storage.validate_session_token(token, consistency="primary")
        if session is not None and session.user_id == user.id:
            await self.storage.delete_session(session.id)


def _expiry(epoch: object) -> dt.datetime | None:
    """fastapi-users' ``expires_at`` (epoch seconds, from the provider's token response) as a
    UTC datetime, ``None`` for ``None``. Raises ``ValidationError`` naming ``expires_at`` for
    anything else (a bool, a string, NaN, a time outside what a datetime holds), before anything
    is written."""
    if epoch is None:
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, int | float) or not math.isfinite(epoch):
        raise ValidationError("expires_at", "must be epoch seconds: an int or a finite float")
    try:
        return dt.datetime.fromtimestamp(epoch, dt.UTC)
    except (OverflowError, ValueError, OSError):
        raise ValidationError("expires_at", "is outside the times a datetime holds") from None

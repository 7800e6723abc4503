"""A guided tour of every domain, printed as a report (``kitium-pg demo``).

``run(storage, console)`` creates demo data with unique emails (so it can run again on the same
database), checks each result as it goes, and prints one table per domain. A result that is not
what the adapter promises raises ``InternalError``, so the command fails loudly instead of
printing a report that looks fine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ._sync.adapter import PostgresStorageAdapter
from .errors import ConflictError, InternalError

__all__ = ["run"]

# Stands where an application would pass argon2id output; the demo never hashes a password.
_PLACEHOLDER_HASH = "$argon2id$demo"


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise InternalError(f"demo: expected {what}")


def _section(console: Console, title: str, steps: list[tuple[str, str | Text]]) -> None:
    # One panel per domain: each call on its own line, its outcome indented below it. Values
    # are plain Text, so something like ['read', 'write'] is never taken for rich markup.
    body = Text()
    for number, (call, outcome) in enumerate(steps):
        if number:
            body.append("\n")
        body.append(call, style="bold cyan")
        body.append("\n  → ")
        body.append(outcome if isinstance(outcome, Text) else Text(outcome))
    console.print(Panel(body, title=title, title_align="left", border_style="blue"))


def _digest(secret: str) -> str:
    # What an application stores for a secret it hands out once: its SHA-256, never the secret.
    return hashlib.sha256(secret.encode()).hexdigest()


def run(storage: PostgresStorageAdapter, console: Console) -> None:
    """Walk through health, users, sessions, API keys, organizations, email verification and
    events on ``storage`` (connected and migrated), printing a report on ``console``."""
    tag = secrets.token_hex(4)
    now = dt.datetime.now(dt.UTC)
    intro = Text("kitium-pg demo, run ")
    intro.append(tag, style="bold")
    intro.append(f"\n{storage!r}")
    console.print(Panel.fit(intro, border_style="blue"))

    # -- health ---------------------------------------------------------------------------------
    health = storage.health_check()
    _check(health.status == "ok", f"a healthy, migrated database (got {health.error})")
    pool = health.pool
    _section(
        console,
        "Health",
        [
            ("health_check()", f"status {health.status}, round trip {health.latency_ms:.2f} ms"),
            (
                "health_check().pool",
                f"{pool.get('pool_size')} of at most {pool.get('pool_max')} connections open,"
                f" {pool.get('pool_available')} idle",
            ),
            (
                "health_check().applied_migrations",
                f"{', '.join(health.applied_migrations)} (none pending)",
            ),
        ],
    )

    # -- users ----------------------------------------------------------------------------------
    email = f"ada.{tag}@example.com"
    ada = storage.create_user(email=email, name="Ada Lovelace", password_hash=_PLACEHOLDER_HASH)
    found = storage.get_user_by_email(email.upper())
    _check(found is not None and found.id == ada.id, "the user found by email in another case")
    sub = f"gh-{tag}"
    storage.link_oauth_account(ada.id, "github", sub=sub, email=email, name="ada")
    by_oauth = storage.get_user_by_oauth("github", sub)
    _check(by_oauth is not None and by_oauth.id == ada.id, "the user found by OAuth identity")
    updated = storage.update_user(ada.id, plan="pro", entitlements=["export", "sso"])
    _check(updated.plan == "pro", "the updated plan")
    _check(storage.get_password_hash(ada.id) == _PLACEHOLDER_HASH, "the stored password hash")
    grace = storage.create_user(email=f"grace.{tag}@example.com", name="Grace Hopper")
    _section(
        console,
        "Users",
        [
            (
                f"create_user(email={email!r}, password_hash={_PLACEHOLDER_HASH!r})",
                f"user {ada.id}, plan {ada.plan}",
            ),
            (f"get_user_by_email({email.upper()!r})", "the same user (emails ignore case)"),
            (f"link_oauth_account(ada, 'github', sub={sub!r})", "linked"),
            (f"get_user_by_oauth('github', {sub!r})", "the same user"),
            (
                "update_user(ada, plan='pro', entitlements=['export', 'sso'])",
                f"plan {updated.plan}, entitlements {', '.join(updated.entitlements)}",
            ),
            (
                "get_password_hash(ada)",
                f"{_PLACEHOLDER_HASH!r} (stored, but never part of the User record)",
            ),
            (f"create_user(email={grace.email!r})", f"user {grace.id}"),
        ],
    )

    # -- sessions -------------------------------------------------------------------------------
    session = storage.create_session(user_id=ada.id, expires_at=now + dt.timedelta(hours=1))
    stale = storage.create_session(user_id=ada.id, expires_at=now - dt.timedelta(minutes=1))
    live = storage.get_session(session.id)
    _check(live is not None and live.id == session.id, "the live session")
    _check(storage.get_session(stale.id) is None, "no expired session from get_session")
    deleted = storage.delete_expired_sessions()
    _check(deleted >= 1, "the expired session to be deleted")
    _section(
        console,
        "Sessions",
        [
            (
                "create_session(user_id=ada, expires_at=now + 1 h)",
                f"session {session.id}, expires {session.expires_at:%H:%M:%S %Z}",
            ),
            ("create_session(user_id=ada, expires_at=now - 1 min)", f"session {stale.id}"),
            ("get_session(live session)", "the session"),
            ("get_session(expired session)", "None: an expired session is never returned"),
            ("delete_expired_sessions()", f"{deleted} deleted"),
        ],
    )

    # -- API keys -------------------------------------------------------------------------------
    key = f"kp_{secrets.token_urlsafe(24)}"
    prefix, last_four = key[:7], key[-4:]
    created_key = storage.create_api_key(
        principal_id=ada.id,
        hash=_digest(key),
        prefix=prefix,
        last_four=last_four,
        scopes=["read", "write"],
    )
    looked_up = storage.get_api_key_by_hash(_digest(key))
    _check(looked_up is not None and looked_up.id == created_key.id, "the key found by digest")
    keys = storage.list_api_keys(ada.id)
    _check(created_key.id in {k.id for k in keys}, "the key in the principal's list")
    _section(
        console,
        "API keys",
        [
            (
                "key = 'kp_' + secrets.token_urlsafe(24)",
                f"{prefix}…{last_four} (shown to its owner once, never stored)",
            ),
            (
                f"create_api_key(principal_id=ada, hash=sha256(key), prefix={prefix!r},"
                f" last_four={last_four!r}, scopes=['read', 'write'])",
                f"key {created_key.id}",
            ),
            ("get_api_key_by_hash(sha256(key))", "the same key"),
            (
                "list_api_keys(ada)",
                ", ".join(f"{k.prefix}…{k.last_four} [{' '.join(k.scopes)}]" for k in keys),
            ),
        ],
    )

    # -- organizations --------------------------------------------------------------------------
    org = storage.create_organization(
        name=f"Analytical Engines {tag}",
        plan="team",
        seats=5,
        members=[{"user_id": ada.id, "role": "owner"}],
    )
    storage.add_organization_member(org.id, grace.id, role="admin")
    members = storage.list_organization_members(org.id)
    roles = {m.user_id: m.role for m in members}
    _check(roles == {ada.id: "owner", grace.id: "admin"}, "an owner and an admin")
    names = {ada.id: "ada", grace.id: "grace"}
    _section(
        console,
        "Organizations",
        [
            (
                f"create_organization(name={org.name!r}, plan='team', seats=5,"
                " members=[{'user_id': ada, 'role': 'owner'}])",
                f"organization {org.id}",
            ),
            ("add_organization_member(org, grace, role='admin')", "added"),
            (
                "list_organization_members(org)",
                ", ".join(f"{names[m.user_id]} ({m.role})" for m in members),
            ),
        ],
    )

    # -- email verification ---------------------------------------------------------------------
    code = f"{secrets.randbelow(10**6):06d}"
    token = storage.create_email_verification_token(
        email=email,
        code_hash=_digest(code),
        type="verify_email",
        expires_at=now + dt.timedelta(minutes=15),
    )
    attempts = storage.increment_email_verification_token_attempts(token.id)
    _check(attempts == 1, "one counted attempt")
    used = storage.mark_email_verification_token_as_used(token.id)
    _check(used.used_at is not None, "used_at to be set")
    try:
        storage.mark_email_verification_token_as_used(token.id)
    except ConflictError as exc:
        replay = Text(f"ConflictError: {exc}", style="red")
    else:
        raise InternalError("demo: expected a second use of the token to be refused")
    _section(
        console,
        "Email verification",
        [
            (
                "create_email_verification_token(email=ada, code_hash=sha256(code),"
                " type='verify_email', expires_at=now + 15 min)",
                f"token {token.id} (the code itself is never stored)",
            ),
            ("increment_email_verification_token_attempts(token)", f"{attempts} attempt"),
            (
                "mark_email_verification_token_as_used(token)",
                f"used at {used.used_at:%H:%M:%S %Z}" if used.used_at else "used",
            ),
            ("mark_email_verification_token_as_used(token) again", replay),
        ],
    )

    # -- events ---------------------------------------------------------------------------------
    principal = str(ada.id)
    storage.emit_event(type="user.signed_in", principal_id=principal, data={"method": "password"})
    written = storage.emit_events(
        [
            {"type": "api_key.created", "principal_id": principal, "data": {"prefix": prefix}},
            {
                "type": "org.member_added",
                "principal_id": principal,
                "org_id": str(org.id),
                "data": {"member": str(grace.id), "role": "admin"},
            },
        ]
    )
    _check(written == 2, "two events written by emit_events")
    page = storage.list_events(principal_id=principal)
    _check(len(page.events) == 3, f"three events for the principal (got {len(page.events)})")
    _section(
        console,
        "Events",
        [
            ("emit_event(type='user.signed_in', principal_id=ada, data={...})", "recorded"),
            ("emit_events([api_key.created, org.member_added])", f"{written} recorded"),
        ],
    )
    events = Table(title="list_events(principal_id=ada), newest first", title_justify="left")
    events.add_column("timestamp", no_wrap=True)
    events.add_column("type", style="cyan", no_wrap=True)
    events.add_column("data")
    for event in page.events:
        events.add_row(f"{event.timestamp:%H:%M:%S.%f}", event.type, Text(str(event.data)))
    console.print(events)
    console.print(
        Panel.fit(
            f"Every domain answered as documented. The demo data stays in the database\n"
            f"(its emails end in .{tag}@example.com), so the demo can run again.",
            title="done",
            border_style="green",
        )
    )

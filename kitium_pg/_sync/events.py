# WARNING: generated from kitium_pg/_async/events.py by tools/unasync.py; do not edit.
# Change the async source and run `python tools/unasync.py`.
"""Audit event methods (generated from the async source)."""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from .. import _validate as v
from .._base import MAX_PAGE, Retry, new_id, new_id_text
from ..errors import ValidationError
from ..records import AuthEvent, EventPage
from .core import Core

MAX_BATCH: Final = 10_000
"""Most events ``emit_events`` takes in one call."""

MAX_BATCH_DATA_BYTES: Final = 40_000_000
"""Most serialised bytes (the events with their ``data``) ``emit_events`` sends in one
statement. The batch goes as one jsonb value, whose containers hold at most 268,435,455 bytes,
and JSON text takes up to 6 times its size in jsonb (a one-digit number and its comma, 2 bytes,
take 12): at 64 MB a batch within every limit failed on the server (found in review)."""

PRUNE_BATCH: Final = 1000
"""Default number of rows ``prune_events`` deletes per statement."""

_CURSOR_MAX_LEN: Final = 200


class Events(Core):
    """Audit event methods of the sync adapter."""

    def emit_event(
        self,
        *,
        type: str,
        principal_id: str | uuid.UUID,
        data: Mapping[str, Any] | None,
        org_id: str | uuid.UUID | None = None,
        timestamp: dt.datetime | None = None,
    ) -> AuthEvent:
        """Record one audit event and return it.

        ``principal_id`` and ``org_id`` are stored as text: a ``uuid.UUID`` in its canonical
        form, a string exactly as given (so pass ids the same way when listing); ``data`` is
        a JSON object (``None`` stores ``{}``); ``timestamp`` must be timezone-aware and
        defaults to the database's ``now()``. Raises ``ValidationError`` for bad input.
        Retried on transient failures: the id is generated before the first attempt, so a
        retry after a lost acknowledgement returns the row the first attempt wrote.
        """
        params = {"id": new_id(), **v.event_fields("", type, principal_id, data, org_id, timestamp)}
        event = self._written("emit_event", params, AuthEvent, retry=Retry.SAFE)
        return event

    def emit_events(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Record a batch of audit events in one statement; returns how many were written.

        Each event is a dict with the keys ``type``, ``principal_id`` and ``data`` and optionally
        ``org_id`` and ``timestamp``, with the meaning they have in ``emit_event``. Every event is
        checked before anything is sent: a ``ValidationError`` names a bad field with its index
        (``events[3].type``) and nothing is written. At most ``MAX_BATCH`` (10,000) events
        per call; an empty batch returns 0 without touching the database. Retried on transient
        failures: the ids are generated before the first attempt, so a retry skips the rows an
        earlier attempt wrote and still counts them.
        """
        if isinstance(events, str | bytes | Mapping) or not isinstance(events, Iterable):
            raise ValidationError("events", "must be a list of dicts")
        batch = list(itertools.islice(events, MAX_BATCH + 1))
        if len(batch) > MAX_BATCH:
            raise ValidationError("events", f"must have at most {MAX_BATCH} events per call")
        if not batch:
            return 0
        text = v.event_batch(batch, new_id_text, MAX_BATCH_DATA_BYTES)
        params = {"batch": text, "count": len(batch)}
        written = int(self._value("emit_events", params, retry=Retry.SAFE))
        if written < len(batch):
            # Every id is new, so fewer means a retry whose snapshot predates the commit of an
            # attempt whose acknowledgement was lost (see _written): count again.
            written = int(self._value("emit_events", params, retry=Retry.SAFE))
        return written

    def list_events(
        self,
        *,
        principal_id: str | uuid.UUID | None = None,
        org_id: str | uuid.UUID | None = None,
        type: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> EventPage:
        """One page of events, newest first (by ``timestamp``, then id).

        Filters combine: ``principal_id`` and ``org_id`` together give that principal's events in
        that organization; ``type`` narrows any of them; ``since`` (inclusive) and ``until``
        (exclusive), timezone-aware, keep the events of that window, read by the index from
        ``until`` down (an audit of last March does not page through everything newer); pass
        the same window with each page's ``after``. ``after`` is the ``next_cursor`` of the
        previous page (an opaque string); the last page's ``next_cursor`` is ``None``. Pages are
        read by keyset, so events emitted meanwhile never shift later pages (no duplicates, no
        gaps). ``limit`` is 1 to 1000. Raises ``ValidationError`` for bad input, including a
        cursor this method did not produce.
        """
        page_size = v.integer("limit", limit, minimum=1, maximum=MAX_PAGE)
        principal = None if principal_id is None else v.text_id("principal_id", principal_id)
        org = None if org_id is None else v.text_id("org_id", org_id)
        after_ts, after_id = (None, None) if after is None else decode_cursor(after)
        params: dict[str, Any] = {
            "type": v.opt_text("type", type),
            "after_ts": after_ts,
            "after_id": after_id,
            "since": v.opt_timestamp("since", since),
            "until": v.opt_timestamp("until", until),
            "page_size": page_size + 1,
        }
        if principal is not None:
            name = "list_events_by_principal"
            params.update(principal_id=principal, org_id=org)
        elif org is not None:
            name = "list_events_by_org"
            params.update(org_id=org)
        else:
            name = "list_events_all"
        rows = self._many(name, params, AuthEvent, retry=Retry.SAFE)
        if len(rows) <= page_size:
            return EventPage(events=tuple(rows), next_cursor=None)
        last = rows[page_size - 1]
        return EventPage(
            events=tuple(rows[:page_size]), next_cursor=encode_cursor(last.timestamp, last.id)
        )

    def prune_events(
        self,
        *,
        before: dt.datetime,
        batch_size: int = PRUNE_BATCH,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete the events whose timestamp is earlier than ``before``; returns how many.

        ``before`` must be timezone-aware. Rows go in statements of at most ``batch_size``, so
        locks stay short on a large table; rows another transaction holds locked at that moment
        are skipped and left for the next run. Deleting old events is idempotent, so each
        statement is retried on transient failures (one retried after a lost acknowledgement
        is not counted: the count may be lower than what was deleted).
        """
        params = {"before": v.timestamp("before", before)}
        return self._delete_in_batches(
            "prune_events",
            params,
            batch_size=batch_size,
            progress=progress,
            resume=("after_ts", "after_id"),
        )

    def delete_principal_events(
        self,
        principal_id: str | uuid.UUID,
        *,
        batch_size: int = PRUNE_BATCH,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Delete every event of a principal, whatever its age; returns how many. For erasing a
        person's data (GDPR's right to erasure): ``delete_user`` keeps the audit events, which
        name the user by ``principal_id`` and may carry addresses and IPs in ``data``.

        ``principal_id`` is matched as stored (a ``uuid.UUID`` in its canonical text form, as
        ``emit_event`` stores it). Rows go in statements of at most ``batch_size``; a row
        another transaction holds locked is waited for, not skipped, so nothing of the
        principal's that was committed before the call is left when it returns. Events naming
        the principal only inside ``data``, or emitted meanwhile, are not deleted. Under
        row-level security (``tenant(org_id)``) only the events the tenant sees go. Each
        statement is retried on transient failures (deleting is idempotent; one retried after
        a lost acknowledgement is not counted). Needs a role
        that may delete audit events (the owner): ``grant_app_role``'s keeps them append-only,
        and it raises ``PermissionDeniedError``.
        """
        params = {"principal_id": v.text_id("principal_id", principal_id)}
        return self._delete_in_batches(
            "delete_principal_events", params, batch_size=batch_size, progress=progress
        )


def encode_cursor(timestamp: dt.datetime, id: uuid.UUID) -> str:
    """The opaque ``next_cursor`` for a page ending at the event (``timestamp``, ``id``)."""
    raw = f"{timestamp.astimezone(dt.UTC).isoformat()}|{id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: object) -> tuple[dt.datetime, uuid.UUID]:
    """The (``timestamp``, ``id``) a cursor from ``encode_cursor`` holds; anything else is a
    ``ValidationError`` naming ``after``."""
    if not isinstance(cursor, str) or not 0 < len(cursor) <= _CURSOR_MAX_LEN:
        raise ValidationError("after", "must be the next_cursor of a previous page")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        stamp, sep, ident = raw.decode("ascii").partition("|")
        timestamp = dt.datetime.fromisoformat(stamp)
        event_id = uuid.UUID(ident)
        if not sep or timestamp.utcoffset() is None:
            raise ValueError("not a cursor")
        return timestamp.astimezone(dt.UTC), event_id
    except (ValueError, OverflowError):
        pass  # raised below, so that the exception (which may quote the cursor) is not kept
    raise ValidationError("after", "must be the next_cursor of a previous page")

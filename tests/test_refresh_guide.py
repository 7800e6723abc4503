"""The guide's fresh_tokens (docs/guide/users.md) when the provider's new tokens still "need
refresh" by the guide test's needs_refresh: no expiry (RFC 6749's expires_in is optional) or an
access token shorter-lived than the 5-minute margin. Found in the second review: the waiters
re-read the tokens, saw them still needing refresh, claimed the lease the holder had just ended
and refreshed again, one after the other (four workers, four provider calls)."""

from __future__ import annotations

import datetime as dt
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kitium_pg import PostgresStorageAdapter

from .test_users import _guide_example


class _Provider:
    """An OAuth client whose refresh takes a while, counts its calls and rotates the refresh
    token; its access tokens last ``lifetime`` (``None``: no expiry given)."""

    def __init__(self, lifetime: dt.timedelta | None) -> None:
        self.lifetime, self.lock, self.used = lifetime, threading.Lock(), list[str]()

    def refresh(self, refresh_token: str) -> Any:
        with self.lock:
            self.used.append(refresh_token)
            n = len(self.used)
        time.sleep(0.3)
        expires = None if self.lifetime is None else dt.datetime.now(dt.UTC) + self.lifetime
        return types.SimpleNamespace(
            access_token=f"a-new-{n}", refresh_token=f"{refresh_token}+{n}", expires_at=expires
        )


@pytest.mark.parametrize("lifetime", [None, dt.timedelta(minutes=2)], ids=["no-expiry", "2min"])
def test_the_guides_refresh_calls_the_provider_once_when_new_tokens_still_need_refresh(
    sync_adapter: PostgresStorageAdapter,
    unique: Callable[[str], str],
    lifetime: dt.timedelta | None,
) -> None:
    fresh_tokens = _guide_example("fresh_tokens")
    user = sync_adapter.create_user(email=f"{unique('guide')}@example.com")
    sync_adapter.link_oauth_account(
        user.id,
        "google",
        sub=unique("g"),
        access_token="a-old",
        refresh_token="r-old",
        token_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1),
    )
    provider = _Provider(lifetime)
    barrier = threading.Barrier(4)

    def worker() -> Any:
        barrier.wait()
        return fresh_tokens(sync_adapter, user.id, "google", provider, lease_seconds=5)

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = [f.result() for f in [pool.submit(worker) for _ in range(4)]]
    assert provider.used == ["r-old"]
    stored = sync_adapter.get_oauth_tokens(user.id, "google")
    assert stored is not None and stored.refresh_token == "r-old+1"
    assert outcomes == [stored] * 4

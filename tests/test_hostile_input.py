"""Property-based hostile input: every call either round-trips the value exactly or raises a
ValidationError naming the field; nothing else escapes and nothing partial is written."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kitium_pg import AsyncPostgresStorageAdapter, PostgresStorageAdapter, ValidationError

from .conftest import examples

INJECTION = [
    "'; DROP TABLE kitium_auth.users; --",
    "%s %(id)s %%",
    ":id :email::text",
    "$1 $$ $tag$",
    "\\x00 \\' \"",
    "Robert'); DELETE FROM kitium_auth.sessions;--",
]

hostile_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(INJECTION),
    st.text(alphabet=st.characters(codec=None), max_size=50),  # includes lone surrogates, NUL
    st.just("x" * 1_000_001),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _deep(n: int) -> Any:
    value: Any = "leaf"
    for _ in range(n):
        value = {"k": value}
    return value


class Blocking:
    """Runs an async adapter's coroutines to completion on a private loop."""

    def __init__(self, adapter: AsyncPostgresStorageAdapter, loop: asyncio.AbstractEventLoop):
        self.adapter, self.loop = adapter, loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.adapter, name)
        return lambda *a, **kw: self.loop.run_until_complete(method(*a, **kw))


@pytest.fixture(scope="module", params=["sync", "async"])
def blocking(request: pytest.FixtureRequest, dsn: str) -> Iterator[Any]:
    """The adapter under test with plain blocking methods (hypothesis drives sync bodies)."""
    if request.param == "sync":
        with PostgresStorageAdapter(dsn) as sync_adapter:
            yield sync_adapter
        return
    loop = asyncio.new_event_loop()
    async_adapter = AsyncPostgresStorageAdapter(dsn)
    loop.run_until_complete(async_adapter.connect())
    yield Blocking(async_adapter, loop)
    loop.run_until_complete(async_adapter.disconnect())
    loop.close()


def _valid_text(value: str, limit: int) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 0 < len(value) <= limit and "\x00" not in value


def _json_ok(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return _valid_text(value, 10**7) or value == ""
    if isinstance(value, dict):
        return all(_json_ok(k, depth + 1) and _json_ok(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_ok(v, depth + 1) for v in value)
    return True


SETTINGS = settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(name=hostile_text, plan=hostile_text, metadata=json_values)
def test_create_user_round_trips_or_names_the_field(
    blocking: Any, name: str, plan: str, metadata: Any
) -> None:
    metadata = {"v": metadata}
    try:
        user = blocking.create_user(name=name, plan=plan, metadata=metadata)
    except ValidationError as exc:  # either outcome is allowed; each is checked
        assert exc.field in {"name", "plan", "metadata"}  # noqa: PT017
        expected_ok = _valid_text(name, 255) and _valid_text(plan, 255) and _json_ok(metadata)
        assert not expected_ok or len(str(metadata)) > 10**5, (exc, name, plan)  # noqa: PT017
        return
    assert (user.name, user.plan, user.metadata) == (name, plan, metadata)
    assert blocking.get_user(user.id) == user


@SETTINGS
@given(value=st.one_of(hostile_text, st.integers(), st.binary(max_size=20), st.none()))
def test_lookups_never_raise_on_hostile_ids_or_emails(blocking: Any, value: Any) -> None:
    assert blocking.get_user(value) is None
    if isinstance(value, str):
        found = blocking.get_user_by_email(value)
        assert found is None or found.email.lower() == value.lower()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"metadata": _deep(40)}, "metadata"),
        ({"metadata": {"when": dt.datetime.now(dt.UTC)}}, "metadata"),
        ({"metadata": {1: "int key"}}, "metadata"),
        ({"entitlements": ["ok", "bad\x00"]}, "entitlements[1]"),
        ({"name": 42}, "name"),
        ({"email": b"bytes@example.com"}, "email"),
    ],
)
def test_wrong_types_and_shapes_are_refused_before_any_write(
    blocking: Any, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        blocking.create_user(**kwargs)
    assert caught.value.field == field

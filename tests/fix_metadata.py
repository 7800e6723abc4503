"""The ``metadata_patch`` contract every ``update_*`` method with ``metadata`` shares, checked
through one record of each kind (tests/test_users.py and the other domain modules call it)."""

from __future__ import annotations

from typing import Any

import pytest

from kitium_pg import ValidationError

BEFORE = {"keep": 1, "drop": "x", "nested": {"a": 1, "b": 2}, "list": [1, 2], "scalar": "s"}
PATCH = {
    "drop": None,  # removed
    "absent": None,  # removing a missing key changes nothing
    "nested": {"b": None, "c": {"d": None, "e": [None]}},  # merged, not replaced
    "list": [3],  # arrays are replaced whole
    "scalar": {"now": "object", "gone": None},  # a non-object value is replaced by an object
    "new": False,
}
AFTER = {
    "keep": 1,
    "nested": {"a": 1, "c": {"e": [None]}},
    "list": [3],
    "scalar": {"now": "object"},
    "new": False,
}


async def check_metadata_patch(
    storage: Any, update: str, get: str, record_id: Any, **also: Any
) -> None:
    """``update(record_id, metadata_patch=..., **also)`` applies an RFC 7396 merge patch to the
    stored metadata, sets the ``also`` fields in the same call, and returns the record ``get``
    reads back; the same patch again changes nothing (a retry is safe); ``{}`` changes nothing;
    a patch with ``metadata``, or one that is no JSON object, is a ``ValidationError`` naming
    ``metadata_patch`` and writes nothing."""
    method, read = getattr(storage, update), getattr(storage, get)
    await method(record_id, metadata=BEFORE)
    patched = await method(record_id, metadata_patch=PATCH, **also)
    assert patched.metadata == AFTER
    assert {name: getattr(patched, name) for name in also} == also
    assert await read(record_id) == patched
    assert (await method(record_id, metadata_patch=PATCH)).metadata == AFTER
    assert (await method(record_id, metadata_patch={})).metadata == AFTER
    stored = await read(record_id)
    refused: list[dict[str, Any]] = [
        {"metadata": {"x": 1}, "metadata_patch": {"y": 2}},
        {"metadata_patch": None},
        {"metadata_patch": ["not", "an", "object"]},
        {"metadata_patch": {"deep": float("nan")}},
        {"metadata_patch": {1: "non-string key"}},
        {"metadata_patch": {"big": "x" * 1_000_001}},
    ]
    for kwargs in refused:
        with pytest.raises(ValidationError) as caught:
            await method(record_id, **kwargs)
        assert caught.value.field == "metadata_patch", kwargs
    assert await read(record_id) == stored  # updated_at included: nothing was written

"""The JSON checks of kitium_pg._validate: the fast checker against a plain definition."""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import json
import math
import sys
import types
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kitium_pg import PostgresStorageAdapter, ValidationError, _sql
from kitium_pg import _validate as v
from kitium_pg._base import UNSET, load_migrations, metadata_patch_arg
from kitium_pg._sync import migrate
from kitium_pg.encryption import Keyring, generate_key

from .conftest import examples
from .fix_disguised import Boundless, Disguised, Masked, Posing


def reference(value: object, depth: int = 0) -> bool:
    """What jsonb can hold, written the obvious way (every node one recursive call); returns
    whether a float needs exact formatting and raises ValueError otherwise."""
    if depth > v.JSON_DEPTH:
        raise ValueError("too deep")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("NUL")
        return False
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not finite")
        return "e" in repr(value)
    if isinstance(value, Mapping):
        exact = False
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("key")
            reference(key, depth + 1)
            exact |= reference(item, depth + 1)
        return exact
    if isinstance(value, list | tuple):
        exact = False
        for item in value:
            exact |= reference(item, depth + 1)
        return exact
    if value is None or isinstance(value, bool | int):
        return False
    raise ValueError("type")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.text(max_size=8),  # NUL included
    st.sampled_from([b"x", 1j, object()]),  # not JSON
)
keys = st.one_of(st.text(max_size=4), st.integers(0, 3), st.none())
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(keys, inner, max_size=3),
    ),
    max_leaves=40,
)


def nested(depth: int, leaf: object) -> object:
    for n in range(depth):
        leaf = {"x": leaf} if n % 2 else [leaf]
    return leaf


@settings(max_examples=examples(400))
@given(documents)
def test_the_fast_checker_agrees_with_the_plain_definition(value: Any) -> None:
    try:
        expected: bool | None = reference(value)
    except ValueError:
        expected = None
    field = None
    try:
        found: bool | None = v._check_json("data", value, 0, [v.JSON_BYTES])
    except ValidationError as exc:
        found, field = None, exc.field
    assert found == expected
    assert field == (None if expected is not None else "data")


@pytest.mark.parametrize("depth", [v.JSON_DEPTH - 1, v.JSON_DEPTH, v.JSON_DEPTH + 1])
@pytest.mark.parametrize("leaf", [{}, [], "s", 1, 1.5, 3.6e16])
def test_nesting_limit_matches_the_plain_definition(depth: int, leaf: object) -> None:
    value = nested(depth, leaf)
    try:
        expected: bool | None = reference(value)
    except ValueError:
        expected = None
    try:
        found: bool | None = v._check_json("data", value, 0, [v.JSON_BYTES])
    except ValidationError:
        found = None
    assert found == expected
    assert (expected is None) == (depth > v.JSON_DEPTH)  # the leaf sits at depth ``depth``


def test_whitespace_pattern_is_exactly_str_isspace() -> None:
    # email() looks for whitespace with a regex: it must match the same code points as
    # str.isspace, every one of them.
    differ = [
        hex(c)
        for c in range(sys.maxunicode + 1)
        if bool(v._WHITESPACE.match(chr(c))) != chr(c).isspace()
    ]
    assert differ == []


_ADDRESS_PART = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="@\x00"), min_size=1, max_size=20
)


@given(local=_ADDRESS_PART, domain=_ADDRESS_PART)
def test_email_is_refused_exactly_when_malformed_and_kept_in_nfc(local: str, domain: str) -> None:
    """Refused for whitespace, a control or invisible format character or a domain ending in a
    dot; otherwise returned in Unicode normal form NFC."""
    address = f"{local}@{domain}"
    normal = unicodedata.normalize("NFC", address)
    malformed = any(
        c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in normal
    ) or normal.endswith(".")
    if malformed:
        with pytest.raises(ValidationError, match="email address") as raised:
            v.email("email", address)
        assert raised.value.field == "email"
    else:
        assert v.email("email", address) == normal


@pytest.mark.parametrize(
    "address",
    [
        "bob\u200b@example.com",
        "bob@example.com.",
        "\ufeffbob@example.com",
        "mallory\x08\x08\x08\x08\x08\x08\x08admin@example.com",  # prints as admin@...
        "a\x1b[2J\x07@example.com",  # a terminal escape
        "bob\x7f@example.com",
        "bob\x9b@example.com",
    ],
)
def test_email_refuses_invisible_characters_and_a_trailing_dot(address: str) -> None:
    with pytest.raises(ValidationError, match="email address"):
        v.email("email", address)


def test_email_spelled_with_a_combining_accent_is_the_composed_one() -> None:
    assert v.email("email", "jose\u0301@example.com") == "jos\u00e9@example.com"


def test_strings_refuses_an_endless_iterable_without_consuming_it() -> None:
    drawn = itertools.count()
    endless = (str(next(drawn)) for _ in itertools.repeat(None))
    with pytest.raises(ValidationError, match="at most 256 items") as raised:
        v.strings("scopes", endless)
    assert raised.value.field == "scopes"
    assert next(drawn) == 257  # max_items + 1 drawn, no more


@given(count=st.integers(0, 40), max_items=st.integers(0, 20))
def test_strings_draws_at_most_one_item_past_the_limit(count: int, max_items: int) -> None:
    drawn: list[int] = []

    def items() -> Iterator[str]:
        for n in range(count):
            drawn.append(n)
            yield "s"

    if count <= max_items:
        assert v.strings("scopes", items(), max_items=max_items) == ["s"] * count
    else:
        with pytest.raises(ValidationError) as raised:
            v.strings("scopes", items(), max_items=max_items)
        assert raised.value.field == "scopes"
    assert len(drawn) == min(count, max_items + 1)


@pytest.mark.parametrize("value", ["scope", b"scope", 1, 1.5, None, True, object()])
def test_strings_refuses_what_is_not_a_list(value: object) -> None:
    with pytest.raises(ValidationError, match="list of strings") as raised:
        v.strings("scopes", value)
    assert raised.value.field == "scopes"


@pytest.mark.parametrize("item", [1, None, b"x", "a\x00b", "\ud800", "x" * (v.SHORT + 1)])
def test_strings_names_the_bad_item(item: object) -> None:
    with pytest.raises(ValidationError) as raised:
        v.strings("scopes", ["ok", item])
    assert raised.value.field == "scopes[1]"


class _ReprFloat(float):
    """A float whose repr is not a number, as numpy.float64's is (``np.float64(1e-07)``)."""

    def __repr__(self) -> str:
        return f"_ReprFloat({float.__repr__(self)})"


@pytest.mark.parametrize("number", [0.5, 1e-7, 3.6e16, -2.5e-300])
def test_a_float_subclass_is_serialised_as_its_value(number: float) -> None:
    text = v.json_text("data", {"x": _ReprFloat(number), "y": [_ReprFloat(number)]})
    assert json.loads(text) == {"x": number, "y": [number]}


def test_any_mapping_is_a_json_object_whatever_it_holds() -> None:
    """A mapping that is not a dict serialises, nested or not, with or without floats (the C
    encoder takes dicts only)."""
    inner = types.MappingProxyType({"n": 1, "f": 1e300, "s": "x"})
    for value in (types.MappingProxyType({"a": 1}), {"m": inner}, {"l": [inner]}):
        assert json.loads(v.json_text("data", value)) == json.loads(json.dumps(_plain(value)))
    # Copied into a plain dict (emit_events serialises what json_object returns).
    copied, exact, _ = v.json_object("data", types.MappingProxyType({"a": 1}))
    assert type(copied) is dict and copied == {"a": 1} and not exact
    ordered = collections.OrderedDict(a=1, b=[collections.defaultdict(int, c=2)])
    copied, exact, _ = v.json_object("data", ordered)
    assert type(copied) is dict and type(copied["b"][0]) is dict and not exact
    assert copied == ordered
    assert json.loads(v.json_text("data", ordered)) == {"a": 1, "b": [{"c": 2}]}
    with pytest.raises(ValidationError, match="keys must be strings"):
        v.json_text("data", types.MappingProxyType({1: "x"}))


class _ItemsElsewhere(dict[str, Any]):
    """A dict whose items() (what the JSON encoder reads) is not what iterating it shows."""

    def __init__(self, hidden: object) -> None:
        super().__init__(shown=1)
        self.hidden = hidden

    def items(self) -> Any:
        return [("a", self.hidden)]


class _IterElsewhere(list[Any]):
    def __iter__(self) -> Any:
        return iter(["shown"])


class _NoNul(str):
    def __contains__(self, item: object) -> bool:
        return False


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (_ItemsElsewhere(nested(v.JSON_DEPTH + 5, 1)), "nested deeper"),
        (_ItemsElsewhere("x\x00"), "NUL"),
        ({"l": _IterElsewhere(["x\x00"])}, "NUL"),
        ({"s": _NoNul("x\x00")}, "NUL"),
        ({_NoNul("k\x00"): 1}, "NUL"),
        ({"l": (_NoNul("x\x00"),)}, "NUL"),
    ],
)
def test_a_subclass_cannot_show_the_checks_one_document_and_the_encoder_another(
    value: object, message: str
) -> None:
    """Subclasses of dict, list and str may override what the checks read (iteration,
    ``in``) apart from what the JSON encoder reads (``items()``, the list's storage, the
    string's characters): such a document is copied into plain builtins, checked and sent as
    the copy, so a bad one is refused with the field named (it reached the database as an
    InternalError, or a data exception naming no field)."""
    for check in (v.json_text, v.json_object):
        with pytest.raises(ValidationError, match=message) as caught:
            check("data", value)
        assert caught.value.field == "data"


def test_a_subclass_is_sent_as_the_encoder_reads_it() -> None:
    assert json.loads(v.json_text("data", _ItemsElsewhere([1]))) == {"a": [1]}
    text = v.json_text("data", {"l": _IterElsewhere(["stored"]), "s": _NoNul("plain")})
    assert json.loads(text) == {"l": ["stored"], "s": "plain"}


@pytest.mark.parametrize("value", [-5, 2**31, 2**80])
def test_an_int_subclass_is_checked_by_the_number_it_holds(value: int) -> None:
    """Found in review: ``integer`` compared through the subclass's own ``<=`` and passed it on,
    so any number reached the database (a negative TOTP step stored; out of range, an error
    naming the column's constraint, not the argument)."""
    with pytest.raises(ValidationError, match="between 0 and") as caught:
        v.integer("step", Boundless(value))
    assert caught.value.field == "step"
    plain = v.integer("step", Boundless(7))
    assert (plain, type(plain)) == (7, int)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Disguised("x" * 300), "at most 255"),
        (Disguised("a\x00b"), "NUL"),
        (Disguised("a\ud800b"), "surrogates"),
    ],
)
def test_a_str_subclass_is_checked_by_the_characters_it_holds(value: str, message: str) -> None:
    """Found in review: ``text`` read a subclass through its own ``len``, ``in`` and
    ``encode``, and passed it on, so an over-long, NUL or surrogate value reached the database
    (stored past the limit where no CHECK backs it, or an InternalError naming no field)."""
    with pytest.raises(ValidationError, match=message) as caught:
        v.text("name", value)
    assert caught.value.field == "name"


def test_a_str_subclass_is_passed_on_as_a_plain_copy() -> None:
    checked = v.text("name", Disguised("kept"))
    assert type(checked) is str and checked == "kept"
    assert type(v.email("email", Disguised("a@example.com"))) is str
    chosen = v.choice("method", Disguised("totp"), ["totp", "sms"])
    assert type(chosen) is str and chosen == "totp"
    with pytest.raises(ValidationError):
        v.choice("method", Disguised("email"), ["totp", "sms"])


def test_a_datetime_subclass_is_passed_on_as_a_plain_copy_of_its_instant() -> None:
    """Found in review: a subclass passed the timestamp checks and psycopg then sent what its
    own ``__sub__`` said (the binary dumper subtracts the epoch): an ``after=`` keyset pointed
    anywhere. The value passed on is a plain datetime of the stored fields, in UTC."""

    class Liar(dt.datetime):
        def __sub__(self, other: Any) -> Any:
            return dt.timedelta(0)

        @property
        def year(self) -> int:
            return 1999

    east = dt.timezone(dt.timedelta(hours=2))
    checked = v.timestamp("when", Liar(2026, 1, 2, 3, 4, 5, 6, tzinfo=east))
    assert type(checked) is dt.datetime
    assert checked == dt.datetime(2026, 1, 2, 1, 4, 5, 6, tzinfo=dt.UTC)

    class Deceiver(dt.datetime):
        """Round 2: its own astimezone and comparisons ran before the copy was made."""

        def astimezone(self, tz: Any = None) -> Any:
            return self

        def __le__(self, other: Any) -> bool:
            return True

        def __ge__(self, other: Any) -> bool:
            return True

    tokyo = dt.timezone(dt.timedelta(hours=9))
    shifted = v.timestamp("when", Deceiver(2026, 1, 2, 12, 0, tzinfo=tokyo))
    assert shifted == dt.datetime(2026, 1, 2, 3, 0, tzinfo=dt.UTC)
    assert shifted.tzinfo is dt.UTC
    with pytest.raises(ValidationError, match="from 0001-01-02 to 9999-12-30"):
        v.timestamp("when", Deceiver(9999, 12, 31, 23, tzinfo=dt.UTC))
    plain = dt.datetime(2026, 1, 2, 1, 4, 5, tzinfo=dt.UTC)
    assert v.timestamp("when", plain) is plain  # a plain one is not copied


def test_an_adapter_keeps_the_checked_copies_of_its_settings() -> None:
    """Found in review: the settings were checked as plain copies, then the caller's subclass
    was kept, so it still chose the schema the queries use, which optional migration file
    runs, the application name sent, and the key id stored beside every secret."""
    adapter = PostgresStorageAdapter("host=/nonexistent", schema=Posing("tenant_b", "kitium_auth"))
    assert type(adapter._settings.schema) is str
    assert "tenant_b.users" in adapter._queries["get_user"].sql
    with pytest.raises(ValidationError) as refused:
        PostgresStorageAdapter(
            "host=/nonexistent", optional_migrations=[Posing("../../../evil", "tenant_rls")]
        )
    assert refused.value.field == "optional_migrations"
    with pytest.raises(ValidationError):
        load_migrations("kitium_auth", optional=[Posing("../../../evil", "tenant_rls")])
    with pytest.raises(ValidationError) as refused:
        PostgresStorageAdapter("host=/nonexistent", application_name=Disguised("n" * 100))
    assert refused.value.field == "application_name"
    with pytest.raises(ValidationError, match="entry 1"):
        Keyring({Disguised("k:" * 60): generate_key()})
    keyring = Keyring({Posing("k1", "other"): generate_key()})
    assert type(keyring.current_key_id) is str


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=examples(300))
@given(_JSON_VALUES)
def test_the_one_shot_encoder_writes_what_the_json_encoder_writes(value: object) -> None:
    """emit_events encodes a row at a time with an encoder made once (``v._encode``): the
    text must be ``JSONEncoder.encode``'s, which the rest of the checks reason about."""
    assert v._encode(value) == v._ENCODER.encode(value)


@pytest.mark.parametrize("value", [math.nan, [math.inf], {"a": object()}])
def test_the_one_shot_encoder_refuses_what_the_json_encoder_refuses(value: object) -> None:
    for encode in (v._encode, v._ENCODER.encode):
        with pytest.raises((ValueError, TypeError)):
            encode(value)
    assert v.json_document(value) is None
    assert v._encode([1, "é"]) == '[1,"é"]'  # the encoder is reusable after a refusal


def test_the_grants_name_a_schema_called_like_the_role_placeholder() -> None:
    """Found in review: the role replaced every ``kitium_app`` of the grants, the schema's
    name too when the schema is called that, so the role got nothing on its schema."""
    grants = PostgresStorageAdapter("host=/nonexistent", schema="kitium_app").app_role_grants
    text = grants("app_user")
    assert "GRANT USAGE ON SCHEMA kitium_app TO app_user;" in text
    assert "kitium_app.users" in text and "app_user." not in text


class _Repeating(Mapping[str, str]):
    """A mapping whose items() name one key id twice."""

    def __init__(self, *items: tuple[str, str]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> str:
        return dict(self._items)[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_a_keyring_refuses_two_keys_under_one_id() -> None:
    """Found in review: the second key silently replaced the first, whose values could then
    no longer be read; the environment's form already refused it."""
    first, second = generate_key(), generate_key()
    for keys in (
        _Repeating(("k1", first), ("k1", second)),
        {Posing("k1", "other"): first, "k1": second},
    ):
        with pytest.raises(ValidationError, match="entries 1 and 2 have the same key id"):
            Keyring(keys)


def _grant_to(role: str) -> str:
    return migrate._role_sql("GRANT USAGE ON SCHEMA kitium_auth TO kitium_app", role)


@pytest.mark.parametrize(
    ("check", "name"),
    [
        (_sql.check_schema, "user"),
        (_sql.check_schema, "information_schema"),
        (_grant_to, "public"),
        (_grant_to, "current_user"),
    ],
)
def test_a_str_subclass_cannot_hide_a_refused_name(
    check: Callable[[str], object], name: str
) -> None:
    """A hash and == that find nothing would let ``user`` pass as a schema (a syntax error in
    every migration) and ``public`` (every role of the cluster) as the grants' role."""
    with pytest.raises(ValidationError):
        check(Disguised(name))


class _ClassSwap:
    """An object whose ``__class__`` (what ``isinstance`` reads; ``type()`` does not) edits
    the document around it with ``swap`` and answers ``int``."""

    def __init__(self, parent: dict[str, Any], key: str, swap: dict[str, Any]) -> None:
        self.parent, self.key, self.swap, self.reads = parent, key, swap, 0

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        self.reads += 1
        self.parent.update(self.swap)
        self.parent[self.key] = 1
        return int


class _IntClassSwap(int):
    """An int (the encoder writes it as one) whose ``__class__`` edits the document after it
    and answers ``str``."""

    parent: dict[str, Any]
    reads = 0

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        self.reads += 1
        self.parent["z"] = "x\x00y"
        return str


@pytest.mark.parametrize(
    "swap", [{"a": "x\x00y"}, {"a": nested(100, 1)}], ids=["nul", "nested-100-deep"]
)
@pytest.mark.parametrize("check", [v.json_text, v.json_object])
def test_a_value_whose_class_attribute_lies_is_refused_by_its_type(
    check: Any, swap: dict[str, Any]
) -> None:
    """The checks decide types by ``type()``, as the encoder does: ``isinstance`` read the
    ``__class__`` property, which turned the document into one with a NUL (a data exception
    naming field ``input``) or nested 100 deep, then sent."""
    doc: dict[str, Any] = {"a": "ok", "b": None}
    doc["b"] = swap_value = _ClassSwap(doc, "b", swap)
    with pytest.raises(ValidationError, match="not JSON-serialisable") as caught:
        check("data", doc)
    assert caught.value.field == "data"
    assert swap_value.reads == 0


def test_an_int_whose_class_attribute_lies_is_written_as_the_int() -> None:
    for big in (1, 3.6e16):  # the encoder's path and the exact-float one
        number = _IntClassSwap(7)
        doc: dict[str, Any] = {"f": big, "i": number, "z": "ok"}
        number.parent = doc
        assert json.loads(v.json_text("data", doc)) == {"f": big, "i": 7, "z": "ok"}
        assert number.reads == 0


async def test_metadata_whose_class_attribute_lies_is_refused_and_nothing_written(
    storage: Any, email: str
) -> None:
    user = await storage.create_user(email=email, metadata={"k": "v"})
    doc: dict[str, Any] = {"a": "ok", "b": None}
    doc["b"] = _ClassSwap(doc, "b", {"a": "x\x00y"})
    with pytest.raises(ValidationError) as caught:
        await storage.update_user(user.id, metadata=doc)
    assert caught.value.field == "metadata"
    assert (await storage.get_user(user.id)).metadata == {"k": "v"}


class _Sprawling(Mapping[str, Any]):
    """A mapping whose ``items()`` produce a million children, each another such mapping,
    ``depth`` levels down: ``drawn`` counts the items all of them produced."""

    def __init__(self, depth: int, drawn: list[int]) -> None:
        self.depth, self.drawn = depth, drawn

    def items(self) -> Any:
        for i in range(10**6):
            self.drawn[0] += 1
            if self.drawn[0] > 3 * v.JSON_BYTES:
                raise AssertionError("items drawn without bound")
            yield f"k{i}", _Sprawling(self.depth - 1, self.drawn) if self.depth else i

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize("check", [v.json_text, v.json_object])
def test_a_copy_reads_at_most_the_byte_limit_in_items_at_all_depths(check: Any) -> None:
    """The copy of a document of mappings draws from one budget for the whole document (an
    item or a character of a string at least a byte of its serialisation): a cap per mapping
    let three levels of a million items each run past 20 s and 1.7 GB."""
    drawn = [0]
    with pytest.raises(ValidationError, match="at most 1000000 bytes") as caught:
        check("data", _Sprawling(2, drawn))
    assert caught.value.field == "data"
    assert drawn[0] <= v.JSON_BYTES + 1
    # The budget never refuses a document within the limit: 999,997 bytes serialised.
    near = types.MappingProxyType(
        {"s": "x" * (v.JSON_BYTES - 20), "t": [types.MappingProxyType({})]}
    )
    assert len(v.json_text("data", near)) == v.JSON_BYTES - 3
    with pytest.raises(ValidationError, match="at most 1000000 bytes"):
        v.json_text("data", types.MappingProxyType({"s": "x" * v.JSON_BYTES}))


@settings(max_examples=examples(400))
@given(documents)
def test_the_checkers_budget_is_never_more_than_the_serialisation(value: Any) -> None:
    """What the checker spends of its budget is a lower bound of the encoded size, so a
    document within the byte limit is never refused by the budget."""
    budget = [v.JSON_BYTES]
    try:
        v._check_json("data", value, 0, budget)
        encoded = v.json_text("data", value, obj=False)  # as sent: floats written in full
    except (ValidationError, v._Irregular):
        return
    assert v.JSON_BYTES - budget[0] <= len(encoded.encode("utf-8"))


def _doubling(levels: int, leaf: object) -> list[object]:
    """``levels`` lists, each holding the one below twice: 2 * levels references, 2**levels
    copies of ``leaf`` to read."""
    doc: list[object] = [leaf]
    for _ in range(levels):
        doc = [doc, doc]
    return doc


@pytest.mark.parametrize("check", [v.json_text, v.json_object])
@pytest.mark.parametrize(
    "doc",
    [
        {"a": _doubling(v.JSON_DEPTH - 2, 1)},  # 2**30 items, from 60 references
        {"a": _doubling(v.JSON_DEPTH - 3, {"k": "v"})},
        {"a": ["x" * 100_000] * 11},  # 1.1 MB from one string
        {"a": [{"x" * 100_000: 1}] * 11},  # from one key
        {"a": ("x" * 100_000,) * 11},
        {"a": [10**4299] * 1000},  # 4.3 MB of digits from one int
        {"a": [-(10**4299)] * 1000},
        {"a": [5e-324] * 4000},  # 1.3 MB once written in full (326 characters each)
        {"a": [1e300] * 4000},
    ],
    ids=[
        "nested-lists",
        "nested-objects",
        "one-string",
        "one-key",
        "tuple",
        "one-int",
        "one-negative-int",
        "one-tiny-float",
        "one-huge-float",
    ],
)
def test_a_document_holding_one_part_many_times_is_refused_by_its_size(
    check: Any, doc: dict[str, Any]
) -> None:
    """Aliasing makes a small object a large document: the checker spends one budget for all
    of it and refuses it within the byte limit's worth of reading. Without the budget the
    nested lists took 35 minutes to read (2 s at 22 levels) and the repeated string was
    encoded into 1.1 MB before its size was checked."""
    with pytest.raises(ValidationError, match="at most 1000000 bytes") as caught:
        check("data", doc)
    assert caught.value.field == "data"


def test_reading_stops_at_the_string_that_overdraws_the_budget() -> None:
    """The checker stops at the first string past the budget rather than scan every copy for
    NUL: 1,000 references to a 400,000-character string are refused at the third, at most one
    string's length past the limit (1.1 GB of reading and encoding without the budget)."""
    big = "x" * 400_000
    for doc in ([big] * 1000, _doubling(v.JSON_DEPTH - 2, [big]), {"a": [big] * 1000}):
        budget = [v.JSON_BYTES]
        with pytest.raises(ValidationError, match="at most 1000000 bytes"):
            v._check_json("data", doc, 0, budget)
        assert -len(big) <= budget[0] < 0


@pytest.mark.parametrize("item", [10**4299, -(10**4299), 5e-324, 1e300, 2.5e-100])
def test_long_numbers_are_charged_at_most_their_written_length(item: object) -> None:
    """Found in review: ints and floats cost the budget one byte whatever their length, so
    50,000 references to a 4,300-digit int took 11 s and 413 MB before being refused. Each is
    charged a lower bound of its written length now, and reading stops at the first one past
    the budget."""
    written = len(v.json_text("data", [item], obj=False)) - 2
    budget = [v.JSON_BYTES]
    v._check_json("data", [item], 0, budget)
    assert 2 <= v.JSON_BYTES - budget[0] - 1 <= written  # one byte was the list's
    many = [item] * (v.JSON_BYTES // 100)
    budget = [v.JSON_BYTES]
    with pytest.raises(ValidationError, match="at most 1000000 bytes"):
        v._check_json("data", many, 0, budget)
    assert budget[0] >= -written


def test_short_numbers_cost_nothing_beyond_their_item() -> None:
    budget = [v.JSON_BYTES]
    v._check_json("data", [10**18, -(10**18), 0.1, 1.5, True, None], 0, budget)
    assert v.JSON_BYTES - budget[0] == 7


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: _plain(x) for k, x in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(x) for x in value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime.max.replace(tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, tzinfo=dt.UTC),
        dt.datetime.min.replace(tzinfo=dt.UTC),
        dt.datetime(1, 1, 1, 23, 59, tzinfo=dt.UTC),
        dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=-5))),  # 0001-01-01 05:00 UTC
        dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5))),  # past year 9999
    ],
)
def test_a_timestamp_a_session_time_zone_could_not_read_back_is_refused(value: dt.datetime) -> None:
    """psycopg reads timestamptz in the session's time zone: within a day of either end of
    datetime's range, some zone would make it year 0 or 10000."""
    with pytest.raises(ValidationError, match="from 0001-01-02 to 9999-12-30") as refused:
        v.timestamp("expires_at", value)
    assert refused.value.field == "expires_at"


def test_the_timestamp_range_ends_are_accepted() -> None:
    assert v.timestamp("t", dt.datetime(1, 1, 2, tzinfo=dt.UTC)).year == 1
    latest = dt.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=dt.UTC)
    assert v.timestamp("t", latest) == latest


@pytest.mark.parametrize("value", ["example.com\n", "example.com\n.org", "a\n.example.com"])
def test_a_domain_with_a_newline_is_refused_before_the_database(value: str) -> None:
    """Python's ``$`` also matches before a final newline: the check must cover the whole
    value, so the caller's field is named instead of the table's CHECK constraint."""
    with pytest.raises(ValidationError) as refused:
        v.domain("domains[0]", value)
    assert refused.value.field == "domains[0]"


@pytest.mark.parametrize(
    "schema",
    [
        "kitium_auth\n",
        "public\n",
        "x\ny",
        "information_schema",
        "pg_catalog",
        "pg_x",
        "real",
        "user",
    ],
)
def test_a_schema_name_with_a_newline_or_of_postgresql_is_refused(schema: str) -> None:
    with pytest.raises(ValidationError) as refused:
        _sql.check_schema(schema)
    assert refused.value.field == "schema"


def test_the_one_letter_lower_makes_ascii_is_refused_and_never_looked_up() -> None:
    """``İ`` lowercases to ``i`` in PostgreSQL: ``a@gİthub.com`` would find ``a@github.com``.
    Scanning every code point finds no other letter whose lowercase starts with ASCII once
    the address is in NFC (the Kelvin sign becomes ``K``)."""
    with pytest.raises(ValidationError):
        v.email("email", "a@g\u0130thub.com")
    assert v.lookup_email("a@g\u0130thub.com") is None
    assert v.email("email", "a@\u212aey.com") == "a@Key.com"
    nfc = (unicodedata.normalize("NFC", chr(c)) for c in range(128, sys.maxunicode + 1))
    lowering = [c for c in nfc if not c.isascii() and c.lower()[0].isascii()]
    assert lowering == ["\u0130"]


def test_a_tzinfo_is_asked_for_its_offset_once_and_its_failure_is_a_validation_error() -> None:
    """Found in review: a tzinfo whose ``utcoffset()`` raised let the caller's own exception
    through instead of a ``ValidationError`` naming the field; one that answered differently
    on each call was asked twice (the awareness check, then ``astimezone``)."""

    class Zone(dt.tzinfo):
        def dst(self, when: dt.datetime | None) -> None:
            return None

        def tzname(self, when: dt.datetime | None) -> str:
            return "zone"

    class Broken(Zone):
        def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
            raise RuntimeError("zone database missing")

    class Fickle(Zone):
        calls = 0

        def utcoffset(self, when: dt.datetime | None) -> dt.timedelta | None:
            Fickle.calls += 1
            return dt.timedelta(hours=Fickle.calls)

    with pytest.raises(ValidationError) as refused:
        v.timestamp("expires_at", dt.datetime(2026, 1, 2, tzinfo=Broken()))
    assert refused.value.field == "expires_at"
    assert "utcoffset() failed (RuntimeError)" in str(refused.value)
    assert refused.value.__context__ is None
    checked = v.timestamp("expires_at", dt.datetime(2026, 1, 2, 5, tzinfo=Fickle()))
    assert Fickle.calls == 1
    assert checked == dt.datetime(2026, 1, 2, 4, tzinfo=dt.UTC)


@given(st.one_of(st.text(), st.binary(), st.integers(), st.builds(object)))
def test_a_value_shown_in_a_message_is_one_printable_line_of_at_most_40_characters(
    value: object,
) -> None:
    """``shown``: a string's escaped ``repr`` (no line break or control character reaches a
    log line), anything else by its type's name; never longer than 40 characters (plus the
    brackets of a type's name)."""
    text = v.shown(value)
    assert text.isprintable() and len(text) <= 42
    if isinstance(value, str):
        assert repr(value).startswith(text)
    else:
        assert text == f"<{type(value).__name__}>"


@pytest.mark.parametrize("value", ["rôle", "admin\u00e9", "r\u0661", "\u00b5"])
def test_an_identifier_is_ascii(value: str) -> None:
    """Found by mutation testing: ``"é".islower()`` and ``"\u0661".isdigit()`` are true, so only the
    ASCII check keeps such letters and digits out (the database's CHECK would refuse them too,
    naming the same field, which hid the check's absence)."""
    with pytest.raises(ValidationError) as caught:
        v.identifier("role", value)
    assert caught.value.field == "role"


def test_a_long_spelling_of_a_uuid_is_not_parsed() -> None:
    """Found by mutation testing: ``uuid.UUID`` strips any number of braces and hyphens, so
    without the 64-character bound a megabyte of them around an id would parse."""
    u = uuid.uuid4()
    assert v.parse_uuid("{" * 40 + str(u) + "}" * 40) is None
    assert v.parse_uuid("-" * 100 + str(u)) is None
    assert v.parse_uuid("urn:uuid:" + str(u)) == u  # 45 characters: within the bound


def test_a_json_document_of_exactly_the_limit_is_accepted() -> None:
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    exact = {"k": "x" * (v.JSON_BYTES - overhead)}
    assert len(v.json_text("metadata", exact).encode()) == v.JSON_BYTES
    with pytest.raises(ValidationError) as caught:
        v.json_text("metadata", {"k": "x" * (v.JSON_BYTES - overhead + 1)})
    assert caught.value.field == "metadata"


def test_an_event_batch_of_exactly_the_limit_is_accepted() -> None:
    batch = [{"type": "t", "principal_id": "p", "data": {"n": i, "s": "é" * i}} for i in range(3)]

    def fixed_id() -> str:
        return "00000000-0000-7000-8000-000000000000"

    text = v.event_batch(batch, fixed_id, 10_000)
    size = len(text.encode("utf-8"))
    assert v.event_batch(batch, fixed_id, size) == text
    with pytest.raises(ValidationError) as caught:
        v.event_batch(batch, fixed_id, size - 1)
    assert caught.value.field == "events"


def test_a_metadata_patch_of_none_is_refused_naming_the_field() -> None:
    """Found by mutation testing: serialised, ``None`` would become ``{}``, a patch that
    silently changes nothing."""
    with pytest.raises(ValidationError) as caught:
        metadata_patch_arg(UNSET, None)
    assert caught.value.field == "metadata_patch"
    assert metadata_patch_arg(UNSET, {"a": None}) == '{"a":null}'


@pytest.mark.parametrize("says", ["x\x00y", "\ud800", "y" * 10**6, "another id"])
async def test_a_uuid_subclass_is_read_and_sent_as_the_number_it_holds(
    storage: Any, email: str, says: str
) -> None:
    """Found in the fourth review: an id given as a ``uuid.UUID`` subclass was passed on, and a
    principal or organization id sent as its own ``str()``, unchecked: a NUL reached the server
    (InternalError), a lone surrogate raised UnicodeEncodeError, 1 MB was sent, and another
    valid id could be stored instead. The number it holds is used."""
    user = await storage.create_user(email=email)
    masked = Masked(user.id, str(uuid.uuid4()) if says == "another id" else says)
    assert await storage.get_user(masked) == user
    one = await storage.emit_event(type="masked", principal_id=masked, org_id=masked, data={})
    assert (one.principal_id, one.org_id) == (str(user.id), str(user.id))
    batch = [{"type": "masked", "principal_id": masked, "org_id": masked, "data": {}}]
    assert await storage.emit_events(batch) == 1
    page = await storage.list_events(principal_id=masked, org_id=masked)
    assert [(e.principal_id, e.org_id) for e in page.events] == [(str(user.id), str(user.id))] * 2


async def test_a_uuid_holding_an_int_subclass_is_read_as_the_number_it_holds(
    storage: Any, email: str
) -> None:
    """Found in review of the fix above: uuid.UUID(int=...) checks its range with the int's own
    comparisons, so an int subclass that compares as within any range made a plain UUID of a
    200-digit number: sent as a 205-character principal_id, and an OverflowError from a lookup.
    The number is read as a plain int and checked again."""
    user = await storage.create_user(email=email)
    huge = uuid.UUID(int=Boundless(16**200))
    same = uuid.UUID(int=Boundless(user.id.int))
    masked_huge = Masked(user.id, "x")
    vars(uuid.UUID)["int"].__set__(masked_huge, Boundless(16**200))
    for value in (huge, masked_huge):
        assert await storage.get_user(value) is None
        with pytest.raises(ValidationError) as caught:
            await storage.emit_event(type="t", principal_id=value, data={})
        assert caught.value.field == "principal_id"
        with pytest.raises(ValidationError) as caught:
            await storage.update_user(value, name="x")
        assert caught.value.field == "id"
    assert await storage.get_user(same) == user
    event = await storage.emit_event(type="t", principal_id=same, data={})
    assert event.principal_id == str(user.id)

"""Identity validation against whatever a client may send: a bad identity is always the documented
InvalidField (a 400 naming the field) or MissingIdentity (a 401), never another exception, and a
valid one comes out as it went in."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.identity import model
from sidecar.identity.model import InvalidField, Profile
from sidecar.identity.resolve import (
    AmbiguousKey,
    Grant,
    MissingIdentity,
    Resolved,
    Source,
    decode_header_id,
    encode_header_id,
    key_digest,
    resolve,
)

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
HEADER = "X-ORQ-IDENTITY-ID"
KEY = "sk-known-key"
GRANTS = {key_digest(KEY): Grant("key-owner")}
PARAMS = ("identity", "orq.identity", "contact")

# Text as hostile as a client can make it: controls, CR/LF, NUL, non-ASCII, lone whitespace,
# bidirectional overrides.
HOSTILE_TEXT = st.text(
    st.characters(blacklist_categories=["Cs"])
    | st.sampled_from("\r\n\0\t %\x7f\x85\x9b\u2028\u202e\u2066\u200f\u061c"),
    max_size=40,
) | st.text(max_size=300)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | HOSTILE_TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["id", "display_name", "email", "logo_url", "avatar_url", "tags", "metadata"]
# Identity objects with the real field names (so that validation goes past the first field)
# and anything at all as values, now and then an unknown field.
IDENTITY_OBJECTS = st.dictionaries(
    st.sampled_from(FIELDS) | HOSTILE_TEXT,
    JSON
    | HOSTILE_TEXT
    | st.lists(HOSTILE_TEXT | JSON, max_size=12)
    | st.dictionaries(HOSTILE_TEXT, SCALARS, max_size=22)
    | st.lists(st.dictionaries(HOSTILE_TEXT, SCALARS, max_size=8), max_size=4),
    max_size=8,
)
# A latin-1 string is what a header value is once the server decoded its bytes.
HEADER_VALUES = (
    st.text(st.characters(max_codepoint=255), max_size=300)
    | st.text(max_size=40)
    | st.builds(lambda s: "".join(f"%{b:02X}" for b in s), st.binary(max_size=20))
)


def no_control(s: str) -> bool:
    return not model.has_control(s)


def headers_for(value: str | None, key: bool) -> dict[str, str]:
    headers = {}
    if value is not None:
        headers[HEADER.lower()] = value
    if key:
        headers["authorization"] = f"Bearer {KEY}"
    return headers


def run(body: dict[str, Any] | None, headers: dict[str, str], required: bool) -> Resolved:
    found = resolve(body, headers, header=HEADER, grant_for=GRANTS.get, required=required)
    # Who sent it (key owner, creator) is tested with trust; here: who it is for.
    return Resolved(found.external_id, found.source, found.profile)


def assert_valid_id(external_id: str) -> None:
    assert external_id == external_id.strip()
    assert 1 <= len(external_id) <= model.MAX_ID
    assert not model.has_control(external_id)


@pytest.mark.slow
@BOUNDED
@given(
    where=st.sampled_from(PARAMS),
    raw=IDENTITY_OBJECTS | JSON,
    header=st.none() | HEADER_VALUES,
    key=st.booleans(),
    required=st.booleans(),
)
def test_any_identity_is_resolved_or_refused_as_documented(
    where: str, raw: Any, header: str | None, key: bool, required: bool
) -> None:
    body: dict[str, Any] = {"model": "m"}
    if where == "orq.identity":
        body["orq"] = {"identity": raw}
    else:
        body[where] = raw
    try:
        resolved = run(body, headers_for(header, key), required)
    except InvalidField as exc:
        assert exc.param.startswith(where), exc.param  # names the field it is about
        assert exc.message
    else:
        assert resolved.source is Source.BODY
        assert_valid_id(resolved.external_id)
        assert isinstance(resolved.profile, Profile)
        assert body == {"model": "m"}  # the identity object never goes upstream


@BOUNDED
@given(header=HEADER_VALUES, key=st.booleans(), required=st.booleans())
def test_any_header_is_resolved_or_refused_as_documented(
    header: str, key: bool, required: bool
) -> None:
    try:
        resolved = run({"model": "m"}, headers_for(header, key), required)
    except InvalidField as exc:
        assert exc.param == HEADER and exc.message
    except MissingIdentity:
        assert required and not key and not header.strip()
    else:
        if header.strip():
            assert resolved.source is Source.HEADER
        elif key:
            assert resolved == Resolved("key-owner", Source.API_KEY)
        else:
            assert resolved.source is Source.ANONYMOUS and not required
        assert_valid_id(resolved.external_id)
        assert resolved.profile is None


@pytest.mark.slow
@BOUNDED
@given(
    body=st.none() | st.dictionaries(HOSTILE_TEXT, JSON, max_size=4),
    headers=st.dictionaries(
        st.sampled_from([HEADER.lower(), "authorization", "x-api-key"]) | HOSTILE_TEXT,
        HEADER_VALUES,
        max_size=4,
    ),
    required=st.booleans(),
)
def test_any_request_is_resolved_or_refused_as_documented(
    body: dict[str, Any] | None, headers: dict[str, str], required: bool
) -> None:
    try:
        resolved = run(body, headers, required)
    except (InvalidField, MissingIdentity):
        return
    except AmbiguousKey as exc:  # two headers with different keys
        assert exc.param in ("x-api-key", "api-key") and headers[exc.param]
        return
    assert_valid_id(resolved.external_id)


# -- valid identities round-trip --------------------------------------------------------------

# What an id or a name may hold: no controls (C0, C1) and no bidirectional formatting.
VISIBLE = st.characters(blacklist_categories=["Cs", "Cc"]).filter(no_control)
# No control characters, and what strip() would remove is removed: an id as stored.
IDS = st.text(VISIBLE, min_size=1, max_size=model.MAX_ID).map(str.strip).filter(bool)
SHORT = st.text(VISIBLE, max_size=64)
EMAILS = st.from_regex(r"[a-z0-9._+]{1,20}@[a-z0-9-]{1,20}\.[a-z]{2,8}", fullmatch=True)
URLS = st.from_regex(r"https?://[a-z0-9.-]{1,30}(/[A-Za-z0-9._~%/-]{0,40})?", fullmatch=True)
TAGS = st.lists(SHORT.map(str.strip).filter(bool), max_size=model.MAX_TAGS)
METADATA_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=model.MAX_METADATA_VALUE)
)
METADATA_KEYS = SHORT.filter(lambda k: bool(k) and no_control(k))
METADATA = st.dictionaries(METADATA_KEYS, METADATA_VALUES, max_size=model.MAX_METADATA_KEYS)


@st.composite
def valid_identities(draw: st.DrawFn) -> tuple[dict[str, Any], Profile]:
    """A valid body identity as a client sends it, and the profile it must give."""
    external_id = draw(IDS)
    padding = draw(st.sampled_from(["", " ", "\t", "  \u2003"]))
    sent: dict[str, Any] = {"id": padding + external_id + padding}
    expected = Profile()
    if draw(st.booleans()):
        name = draw(st.none() | st.text(VISIBLE, max_size=model.MAX_NAME))
        sent["display_name"] = name
        expected.display_name = None if name is None else (name.strip() or None)
    if draw(st.booleans()):
        sent["email"] = expected.email = draw(st.none() | EMAILS)
    if draw(st.booleans()):
        url = draw(st.none() | URLS)
        sent[draw(st.sampled_from(["logo_url", "avatar_url"]))] = expected.avatar_url = url
    if draw(st.booleans()):
        tags = draw(TAGS)
        sent["tags"] = [draw(st.sampled_from(["", " "])) + tag for tag in tags]
        expected.tags = list(dict.fromkeys(tags))
    if draw(st.booleans()):
        merged = draw(METADATA)
        if draw(st.booleans()):
            sent["metadata"] = merged
        else:  # the SDK's shape: an array of objects merged in order
            items = list(merged.items())
            cut = draw(st.integers(min_value=0, max_value=len(items)))
            sent["metadata"] = [dict(items[:cut]), dict(items[cut:])]
        expected.metadata = merged
    return sent, expected


@pytest.mark.slow
@BOUNDED
@given(
    identity=valid_identities(),
    where=st.sampled_from(PARAMS),
    header=st.none() | HEADER_VALUES,
)
def test_a_valid_body_identity_round_trips(
    identity: tuple[dict[str, Any], Profile], where: str, header: str | None
) -> None:
    sent, expected = identity
    request: dict[str, Any] = {"model": "m", "messages": []}
    if where == "orq.identity":
        request["orq"] = {"identity": sent}
    else:
        request[where] = sent
    # Through JSON, as it arrives; a body identity wins over the header and the key.
    body = msgspec.json.decode(msgspec.json.encode(request))
    resolved = run(body, headers_for(header, True), required=True)
    assert resolved == Resolved(sent["id"].strip(), Source.BODY, expected)
    assert body == {"model": "m", "messages": []}


@BOUNDED
@given(external_id=IDS)
def test_a_valid_id_round_trips_through_the_identity_header(external_id: str) -> None:
    encoded = encode_header_id(external_id)
    # What goes upstream is a legal header value: printable ASCII, no CR, LF or NUL.
    assert encoded.isascii() and encoded.isprintable(), encoded
    assert decode_header_id(encoded) == external_id
    assert run(None, {HEADER.lower(): encoded}, required=True) == Resolved(
        external_id, Source.HEADER
    )


@pytest.mark.slow
@BOUNDED
@given(
    external_id=IDS.filter(
        lambda s: s.isascii() and s.isprintable() and "%" not in s and "," not in s
    )
)
def test_a_printable_ascii_id_travels_as_it_is(external_id: str) -> None:
    assert encode_header_id(external_id) == external_id


def test_a_comma_travels_encoded_so_that_no_server_splits_the_id() -> None:
    assert encode_header_id("acme-1, tenant-beta") == "acme-1%2C tenant-beta"
    assert decode_header_id("acme-1%2C tenant-beta") == "acme-1, tenant-beta"


@pytest.mark.parametrize(
    "value",
    ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b", "\x7f", "a\x1bb", "a\tb"],
)
def test_control_characters_in_an_id_are_refused(value: str) -> None:
    with pytest.raises(InvalidField) as body_error:
        run({"identity": {"id": value}}, {}, required=False)
    assert body_error.value.param == "identity.id"
    with pytest.raises(InvalidField) as header_error:
        run(None, {HEADER.lower(): value}, required=False)
    assert header_error.value.param == HEADER


# -- controls and bidirectional formatting, from every source ---------------------------------

# C0 and C1 controls, DEL, and the bidirectional marks, embeddings, overrides and isolates.
FORBIDDEN = (
    st.characters(min_codepoint=0x00, max_codepoint=0x1F)
    | st.characters(min_codepoint=0x7F, max_codepoint=0x9F)
    | st.characters(min_codepoint=0x202A, max_codepoint=0x202E)
    | st.characters(min_codepoint=0x2066, max_codepoint=0x2069)
    | st.sampled_from("\u200e\u200f\u061c")
)
# An id with one forbidden character inside it (inside: trimming never removes it).
TAINTED = st.builds(lambda a, c, b: a + c + b, IDS, FORBIDDEN, IDS)


def refused(param: str, body: dict[str, Any] | None, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidField) as error:
        resolve(
            body, headers, header=HEADER, grant_for=GRANTS.get, required=False, user_fields=True
        )
    assert error.value.param == param
    assert "control or bidirectional formatting" in error.value.message


@BOUNDED
@given(value=TAINTED, where=st.sampled_from(PARAMS))
def test_a_forbidden_character_is_refused_in_a_body_identity(value: str, where: str) -> None:
    def body(identity: dict[str, Any]) -> dict[str, Any]:
        if where == "orq.identity":
            return {"model": "m", "orq": {"identity": identity}}
        return {"model": "m", where: identity}

    refused(f"{where}.id", body({"id": value}), {})
    refused(f"{where}.display_name", body({"id": "fine", "display_name": value}), {})
    refused(f"{where}.tags[0]", body({"id": "fine", "tags": [value]}), {})


@BOUNDED
@given(value=TAINTED)
def test_a_forbidden_character_is_refused_in_a_header_or_user_field(value: str) -> None:
    # Percent-encoded (how a non-ASCII id travels), and as raw header bytes where it can be.
    refused(HEADER, None, {HEADER.lower(): encode_header_id(value)})
    if all(ord(c) < 256 for c in value):
        refused(HEADER, None, {HEADER.lower(): value})
    refused("user", {"model": "m", "user": value}, {})
    refused("metadata.user_id", {"model": "m", "metadata": {"user_id": value}}, {})


@BOUNDED
@given(value=TAINTED)
def test_a_forbidden_character_is_refused_by_the_api_and_the_usage_hook(value: str) -> None:
    # The identity API's create and update, and the usage hook's `identity`, check with these.
    with pytest.raises(InvalidField) as create:
        model.external_id(value)
    assert create.value.param == "external_id"
    with pytest.raises(InvalidField) as hook:
        model.external_id(value, "identity")
    assert hook.value.param == "identity"
    with pytest.raises(InvalidField) as update:
        model.profile(model.IdentityPatch(display_name=value))
    assert update.value.param == "display_name"


@BOUNDED
@given(value=IDS, name=st.text(VISIBLE, max_size=model.MAX_NAME))
def test_text_without_forbidden_characters_is_accepted(value: str, name: str) -> None:
    assert model.external_id(value) == value
    made = model.profile(model.IdentityCreate(external_id=value, display_name=name))
    assert made.display_name == (name.strip() or None)

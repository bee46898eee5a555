"""A metered body as the sidecar takes it: a JSON object, not too deep, naming what the sidecar
reads as the API spells it, once."""

from __future__ import annotations

import pytest

from sidecar.errors import InvalidRequest
from sidecar.jsonbody import MAX_DEPTH, READ_NAMES, parse_object
from sidecar.usage import estimate


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "invalid_json"),
        (b'{"a": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", "json_too_deep"),
        (b'{"model": "m", "MAX_TOKENS": 9}', "field_not_normalized"),
        ('{"max_to\u212aens": 9}'.encode(), "field_not_normalized"),  # a Kelvin sign
        (b'{"model": "m", "max_tokens": 100000, "max_tokens": 1}', "field_repeated"),
        (b'{"max_tokens" : 100000, "model": "m", "max_tokens":1}', "field_repeated"),
        (b'{"n": 16, "model": "m", "n": 1}', "field_repeated"),
        (b'{"model": "o1-pro", "model": "gpt-4o-mini"}', "field_repeated"),
        # Spelled with an escape, where the bytes show the name once.
        (b'{"max\\u005ftokens": 100000, "max_tokens": 1}', "field_repeated"),
        (b'{"\\u006dodel": "o1-pro", "model": "m"}', "field_repeated"),
        (
            b'{"stream": true, "stream_options": {"include_usage": false, "include_usage": true}}',
            "field_repeated",
        ),
        # The end user, where the body goes upstream with it.
        (b'{"model": "m", "user": "victim", "user": "acme-1"}', "field_repeated"),
        (b'{"metadata": {"user_id": "victim", "user_id": "acme-1"}}', "field_repeated"),
        (b'{"metadata": {"user_id": "victim"}, "metadata": {"user_id": "a"}}', "field_repeated"),
    ],
)
def test_what_is_refused(body: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_object(body)
    assert refused.value.code == code


def test_names_the_sidecar_does_not_read_may_take_any_case() -> None:
    body = b'{"model": "m", "dataSources": [], "Temperature": 1, "\xc3\xa9t\xc3\xa9": 1}'
    assert parse_object(body) == {"model": "m", "dataSources": [], "Temperature": 1, "été": 1}
    assert all(name.isascii() and name.islower() for name in READ_NAMES)


@pytest.mark.parametrize(
    "body",
    [
        # The same name in two objects: a tool's schema may name what the API names.
        b'{"model": "m", "n": 1, "tools": [{"type": "function", "function": {"name": "f",'
        b' "parameters": {"properties": {"model": {}, "n": {}}}}}]}',
        # "user" as a value, beside the field of that name.
        b'{"model": "m", "user": "u", "messages": [{"role": "user", "content": "hi"}]}',
        # "user_id" in a tool's schema, beside the end user's.
        b'{"model": "m", "metadata": {"user_id": "u"}, "tools": [{"input_schema": '
        b'{"properties": {"user_id": {}}}}]}',
        # Escapes in values only; a name no upstream acts on for the sidecar, twice.
        b'{"model": "m", "messages": [{"role": "user", "content": "caf\\u00e9 \\u0061"}]}',
        b'{"model": "m", "temperature": 1, "temperature": 0}',
    ],
)
def test_a_name_read_once_per_object_is_taken(body: bytes) -> None:
    assert parse_object(body)["model"] == "m"


def test_a_repeated_name_is_told_by_name() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_object(b'{"model": "m", "max_completion_tokens": 9, "max_completion_tokens": 1}')
    assert refused.value.param == "max_completion_tokens"
    assert "twice" in refused.value.message


def test_every_field_the_reservation_reads_is_one_whose_case_is_checked() -> None:
    """READ_NAMES is written out by hand beside the modules that read the fields: the
    estimate's output caps and choices, the output cap the sidecar adds, and the usage option a
    stream is given must stay in it, or a respelled one passes unreserved."""
    read = {*estimate._ANY_CAPS, *estimate._ANY_CHOICES, *estimate.OUTPUT_CAP.values()}
    assert read | {"stream", "stream_options", "model"} <= READ_NAMES

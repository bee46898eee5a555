from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote

import msgspec

from sidecar._msgspec import describe
from sidecar.identity import model
from sidecar.identity.model import BodyIdentity, InvalidField, Profile


class Source(enum.Enum):
    BODY = "body"
    HEADER = "header"
    API_KEY = "api_key"
    ANONYMOUS = "anonymous"


class Resolved(msgspec.Struct, frozen=True):
    external_id: str
    source: Source
    profile: Profile | None = None  # given only by a body identity, which upserts


class MissingIdentity(Exception):
    """No identity on a request, and `identity.required` is set."""


ANONYMOUS = Resolved(model.ANONYMOUS, Source.ANONYMOUS)


def _body_identity(body: dict[str, Any]) -> tuple[Any, str] | None:
    """Take the identity object out of a request body (it must not reach the upstream)."""
    if "identity" in body:
        return body.pop("identity"), "identity"
    orq = body.get("orq")
    if isinstance(orq, dict) and "identity" in orq:
        raw = orq.pop("identity")
        if not orq:
            del body["orq"]
        return raw, "orq.identity"
    if "contact" in body:
        return body.pop("contact"), "contact"
    return None


def _parse_body_identity(raw: Any, param: str) -> Resolved:
    if not isinstance(raw, dict):
        raise InvalidField(param, f"{param} must be an object with at least an `id`")
    try:
        given = msgspec.convert(raw, BodyIdentity)
    except msgspec.ValidationError as exc:
        name, message = describe(exc, param)
        raise InvalidField(name, f"{name}: {message}") from None
    try:
        external_id = model.external_id(given.id, f"{param}.id")
        profile = model.profile(given)
    except InvalidField as exc:
        if exc.param.startswith(param):
            raise
        raise InvalidField(f"{param}.{exc.param}", f"{param}.{exc.message}") from None
    return Resolved(external_id, Source.BODY, profile)


def api_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def decode_header_id(value: str) -> str:
    # Non-ASCII ids travel percent-encoded (UTF-8); a literal '%' travels as %25.
    return unquote(value, errors="strict") if "%" in value else value


def encode_header_id(external_id: str) -> str:
    if external_id.isascii() and external_id.isprintable() and "%" not in external_id:
        return external_id
    return quote(external_id, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def resolve(
    body: dict[str, Any] | None,
    headers: Mapping[str, str],
    *,
    header: str,
    key_owner: Callable[[str], str | None],
    required: bool,
) -> Resolved:
    """Who a request is for, in the documented order: body, header, API key owner, anonymous.

    `headers` has lower-case names. The body identity is removed from `body` in place. Raises
    InvalidField (a 400) for a bad identity and MissingIdentity (a 401) when one is required.
    """
    if body is not None:
        found = _body_identity(body)
        if found is not None:
            return _parse_body_identity(*found)
    value = headers.get(header.lower())
    if value is not None and value.strip():
        try:
            return Resolved(model.external_id(decode_header_id(value), header), Source.HEADER)
        except UnicodeDecodeError:
            raise InvalidField(header, f"{header} is not valid percent-encoded UTF-8") from None
    key = api_key(headers)
    if key is not None:
        owner = key_owner(key_digest(key))
        if owner is not None:
            return Resolved(owner, Source.API_KEY)
    if required:
        raise MissingIdentity
    return ANONYMOUS

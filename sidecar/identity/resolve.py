from __future__ import annotations

import enum
import fnmatch
import hashlib
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple
from urllib.parse import quote, unquote

import msgspec

from sidecar._msgspec import describe
from sidecar.identity import model
from sidecar.identity.model import BodyIdentity, InvalidField, Profile


class Source(enum.Enum):
    BODY = "body"
    USER_FIELD = "user_field"
    HEADER = "header"
    API_KEY = "api_key"
    ANONYMOUS = "anonymous"

    # Hashed as the singletons they are: Enum's own __hash__ is a Python-level call (3x a dict
    # lookup's cost), and members key dicts on every request's path.
    __hash__ = object.__hash__


CLAIMS = frozenset({Source.BODY, Source.USER_FIELD, Source.HEADER})


class Resolved(msgspec.Struct, frozen=True):
    external_id: str
    source: Source
    profile: Profile | None = None  # given only by a body identity, which upserts
    owner: str | None = None  # the owner of the listed API key the request carries
    # Who creates the identity when it is new (the creation cap counts per creator): the key
    # owner, else the client's address.
    creator: str = ""


class MissingIdentity(Exception):
    """No identity on a request, and `identity.required` is set."""


# The headers an API key travels in besides `Authorization: Bearer` (see api_key), and all of
# them: a request that repeats one with different values is refused (asgi.lowered). Anthropic's,
# Azure OpenAI's, Google AI Studio's and Azure API Management's, and LiteLLM's own: LiteLLM's
# proxy authenticates a caller by any of them, and a key the sidecar did not read there would
# be billed to its owner and limited as no one's.
_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key", "ocp-apim-subscription-key")
_LITELLM_KEY = "x-litellm-api-key"
KEY_HEADERS = frozenset({"authorization", _LITELLM_KEY, *_KEY_HEADERS})


class AmbiguousKey(Exception):
    """A request carries two different API keys (a 400); `param` names the second's header."""

    def __init__(self, param: str) -> None:
        super().__init__(param)
        self.param = param


class ClaimRefused(Exception):
    """A caller claimed an identity it may not claim (a 403); `param` names the claim."""

    def __init__(self, param: str, external_id: str) -> None:
        super().__init__(param)
        self.param = param
        self.external_id = external_id


class Grant(NamedTuple):
    """A listed API key: its owner, and the external ids (globs) it may claim for others."""

    owner: str
    may_assert: tuple[str, ...] = ()

    def allows(self, external_id: str) -> bool:
        return external_id == self.owner or any(
            fnmatch.fnmatchcase(external_id, glob) for glob in self.may_assert
        )


class Caller(NamedTuple):
    """What the network and the credentials say about who sent a request."""

    peer_trusted: bool = False  # the TCP peer is in `trusted_networks`
    client: str = ""  # the client's address (see identity.caller.Networks.client)


class Trust(NamedTuple):
    """`[identity] trust` and whether `trusted_networks` are set."""

    mode: Literal["any", "keys"] = "any"
    networks: bool = False

    def accepts(self, external_id: str, caller: Caller, grant: Grant | None) -> bool:
        """Whether the caller may claim `external_id` (docs/trust.md)."""
        if caller.peer_trusted:
            return True
        if self.mode == "keys":
            return grant is not None and grant.allows(external_id)
        return not self.networks


ANONYMOUS = Resolved(model.ANONYMOUS, Source.ANONYMOUS)
TRUST_ANY = Trust()
UNKNOWN_CALLER = Caller()


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


def _user_field(body: dict[str, Any]) -> tuple[Any, str] | None:
    """OpenAI's `user`, or Anthropic's `metadata.user_id`: how clients name their end user."""
    if "user" in body:
        return body["user"], "user"
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and "user_id" in metadata:
        return metadata["user_id"], "metadata.user_id"
    return None


# Body identities parsed and checked before, by (param, the object as JSON): clients send the
# same identity object with every request, and checking its fields again cost more than the
# rest of its attribution (bench/RESULTS.md). Errors are not kept; nothing changes a Resolved
# or its Profile once made. Up to PARSED_MAX objects of up to PARSED_BYTES each (16 MiB at
# most, whatever clients send), emptied when full.
_PARSED: dict[tuple[str, bytes], Resolved] = {}
PARSED_MAX = 4096
PARSED_BYTES = 4096
_as_json = msgspec.json.Encoder().encode


def _json_of(raw: Any) -> bytes | None:
    """A body identity object as JSON, when it is JSON and small enough to be kept."""
    if not isinstance(raw, dict):
        return None
    try:
        as_json = _as_json(raw)
    except (TypeError, ValueError, OverflowError):  # not JSON (a body parsed from JSON always is)
        return None
    return as_json if len(as_json) <= PARSED_BYTES else None


def _parse_body_identity(raw: Any, param: str, as_json: bytes | None) -> Resolved:
    if not isinstance(raw, dict):
        raise InvalidField(param, f"{param} must be an object with at least an `id`")
    if as_json is None:
        return _parsed(raw, param)
    key = (param, as_json)
    found = _PARSED.get(key)
    if found is None:
        found = _parsed(raw, param)
        if len(_PARSED) >= PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = found
    return found


def _parsed(raw: dict[str, Any], param: str) -> Resolved:
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
    """The API key a request carries: LiteLLM's own header when it is there (LiteLLM reads it
    first, so that `Authorization` or `x-api-key` can carry the caller's own provider key past
    it); else OpenAI's bearer token, or one of the other headers keys travel in
    (`_KEY_HEADERS`), whose value may also begin `Bearer ` (LiteLLM strips it). AmbiguousKey
    when two of those hold different keys: the upstream bills the one it reads, in an order of
    its own, so the request could be billed to one key and attributed (and limited) as the
    other's."""
    litellm = headers.get(_LITELLM_KEY)
    if litellm:
        return _unbearer(litellm) or None
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else ""
    for name in _KEY_HEADERS:
        other = headers.get(name)
        if other:
            other = _unbearer(other)
            if not key:
                key = other
            elif other != key:
                raise AmbiguousKey(name)
    return key or None


def _unbearer(value: str) -> str:
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _held(key: str) -> bytes:
    """What Resolver keeps an API key by (never the key itself)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def decode_header_id(value: str) -> str:
    # Non-ASCII ids travel percent-encoded (UTF-8); a literal '%' travels as %25.
    return unquote(value, errors="strict") if "%" in value else value


def encode_header_id(external_id: str) -> str:
    """The id as the identity header carries it: as it is when printable ASCII, else
    percent-encoded (UTF-8), `%` itself included; and `,` too, which a server reading the
    header as a list (RFC 9110 5.3) would split into two ids."""
    if (
        external_id.isascii()
        and external_id.isprintable()
        and "%" not in external_id
        and "," not in external_id
    ):
        return external_id
    return quote(external_id, safe=" !\"#$&'()*+-./:;<=>?@[\\]^_`{|}~")


def resolve(
    body: dict[str, Any] | None,
    headers: Mapping[str, str],
    *,
    header: str,
    grant_for: Callable[[str], Grant | None],
    required: bool,
    trust: Trust = TRUST_ANY,
    caller: Caller = UNKNOWN_CALLER,
    user_fields: bool = False,
    canonical: Callable[[str], str] | None = None,
) -> Resolved:
    """Who a request is for, in the documented order: body identity, (opt-in) user fields,
    header, API key owner, anonymous; a claim (the first three) only when `trust` accepts it
    from this caller.

    `headers` has lower-case names. The body identity is removed from `body` in place. Raises
    InvalidField (a 400) for a bad identity, ClaimRefused (a 403) for a claim the caller may not
    make, and MissingIdentity (a 401) when an identity is required and there is none.
    `canonical` maps a claimed external id to the one it counts under (normalized, and an
    alias's survivor), before the trust check: a caller must be allowed the identity it acts
    as. A process resolving request after request keeps what it resolved: see Resolver."""
    resolver = Resolver(
        header=header,
        grant_for=grant_for,
        required=required,
        trust=trust,
        user_fields=user_fields,
        canonical=canonical,
    )
    return resolver.resolve(body, headers, caller, None)


class Resolver:
    """`resolve` with a process's settings, keeping what it resolved.

    A resolution is kept by everything it was made from: the claim (a body identity object as
    JSON, or the identity header's value), a digest of the API key and the caller. What else
    it reads (the listed keys, the aliases) is the `token` each call passes: when that changes,
    everything kept is dropped. A request with the same claim, key and caller as one before is
    resolved as that one was, without its fields, its trust and its alias being checked again.
    Refusals are never kept: a bad or refused claim is checked every time. Bounded like the
    parsed objects (PARSED_MAX entries, claims of up to PARSED_BYTES), emptied when full; API
    keys are kept only as digests (BLAKE2b, 128 bits)."""

    def __init__(
        self,
        *,
        header: str,
        grant_for: Callable[[str], Grant | None],
        required: bool,
        trust: Trust = TRUST_ANY,
        user_fields: bool = False,
        canonical: Callable[[str], str] | None = None,
        max_entries: int = PARSED_MAX,
    ) -> None:
        self.header = header
        self.header_lower = header.lower()
        self.grant_for = grant_for
        self.required = required
        self.trust = trust
        self.user_fields = user_fields
        self.canonical = canonical
        self.max_entries = max_entries
        self._found: dict[tuple[object, ...], Resolved] = {}
        self._token: object = None

    def __len__(self) -> int:
        return len(self._found)

    def resolve(
        self,
        body: dict[str, Any] | None,
        headers: Mapping[str, str],
        caller: Caller,
        token: object,
    ) -> Resolved:
        """As `resolve`; `token` stands for the keys and aliases it is resolved against."""
        found = self._found
        if token != self._token:
            found.clear()
            self._token = token
        key = api_key(headers)
        # Kept by a digest of its own: SHA-256 (OpenSSL's) costs a resolution several times
        # what BLAKE2b (CPython's) does, and the grant's digest is needed only when it is new.
        held = _held(key) if key is not None else None
        if body is not None and "identity" in body:  # the common case first
            taken: tuple[Any, str] | None = (body.pop("identity"), "identity")
        else:
            taken = _body_identity(body) if body is not None else None
        as_json = _json_of(taken[0]) if taken is not None else None
        claimed: tuple[str, object] | None
        if taken is not None:
            claimed = (taken[1], as_json) if as_json is not None else None
        elif body is None or not self.user_fields:
            value = headers.get(self.header_lower)
            claimed = ("", value) if value is None or len(value) <= PARSED_BYTES else None
        else:  # a user field may claim: not kept
            claimed = None
        if claimed is not None:
            remembered = found.get((claimed, held, caller))
            if remembered is not None:
                return remembered
        resolved = _resolved(
            body,
            headers,
            self.grant_for(key_digest(key)) if key is not None else None,
            taken,
            as_json,
            header=self.header,
            required=self.required,
            trust=self.trust,
            caller=caller,
            user_fields=self.user_fields,
            canonical=self.canonical,
        )
        if claimed is not None:
            if len(found) >= self.max_entries:
                found.clear()
            found[(claimed, held, caller)] = resolved
        return resolved


def _resolved(
    body: dict[str, Any] | None,
    headers: Mapping[str, str],
    grant: Grant | None,
    taken: tuple[Any, str] | None,
    as_json: bytes | None,
    *,
    header: str,
    required: bool,
    trust: Trust,
    caller: Caller,
    user_fields: bool,
    canonical: Callable[[str], str] | None,
) -> Resolved:
    """`resolve`, for the API key's grant and the body identity taken out of the body."""
    owner = grant.owner if grant is not None else None
    creator = f"key:{owner}" if owner is not None else f"addr:{caller.client}"
    claim = _claim(body, headers, header, user_fields, taken, as_json)
    if claim is not None:
        resolved, param = claim
        if canonical is not None:
            resolved = msgspec.structs.replace(
                resolved, external_id=canonical(resolved.external_id)
            )
        if not trust.accepts(resolved.external_id, caller, grant):
            raise ClaimRefused(param, resolved.external_id)
        return msgspec.structs.replace(resolved, owner=owner, creator=creator)
    if owner is not None:
        return Resolved(owner, Source.API_KEY, owner=owner, creator=creator)
    if required:
        raise MissingIdentity
    return msgspec.structs.replace(ANONYMOUS, creator=creator)


def _claim(
    body: dict[str, Any] | None,
    headers: Mapping[str, str],
    header: str,
    user_fields: bool,
    taken: tuple[Any, str] | None,
    as_json: bytes | None,
) -> tuple[Resolved, str] | None:
    """The identity a request claims, and the parameter that claims it. `taken`: the body
    identity object taken out of the body (and its parameter), `as_json` that object as JSON."""
    if taken is not None:
        return _parse_body_identity(taken[0], taken[1], as_json), f"{taken[1]}.id"
    if body is not None and user_fields:
        user = _user_field(body)
        if user is not None:
            value, param = user
            if not isinstance(value, str):
                raise InvalidField(param, f"{param} must be a string")
            return Resolved(model.external_id(value, param), Source.USER_FIELD), param
    value = headers.get(header.lower())
    if value is not None and value.strip():
        try:
            external_id = model.external_id(decode_header_id(value), header)
        except UnicodeDecodeError:
            raise InvalidField(header, f"{header} is not valid percent-encoded UTF-8") from None
        return Resolved(external_id, Source.HEADER), header
    return None

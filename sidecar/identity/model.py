from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

MAX_ID = 255
MAX_NAME = 255
MAX_EMAIL = 254
MAX_URL = 2048
MAX_TAGS = 10
MAX_TAG = 64
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
ANONYMOUS = "anonymous"

# C0 and C1 controls, and the bidirectional marks, embeddings, overrides and isolates: text that
# would change how a log line, a terminal or a page shows what follows it (an id shown
# reversed, a forged line).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_URL = re.compile(r"https?://[^\s/]+\S*", re.IGNORECASE)

Metadata = dict[str, Any] | list[dict[str, Any]]


class InvalidField(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class _Fields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    display_name: str | UnsetType | None = UNSET
    email: str | UnsetType | None = UNSET
    avatar_url: str | UnsetType | None = UNSET
    logo_url: str | UnsetType | None = UNSET
    tags: list[str] | UnsetType | None = UNSET
    metadata: Metadata | UnsetType | None = UNSET


class IdentityCreate(_Fields, kw_only=True):
    external_id: str


class IdentityPatch(_Fields, kw_only=True):
    external_id: str | UnsetType = UNSET


class BodyIdentity(_Fields, kw_only=True):
    """The `identity` object of a request body (`id` is the external id)."""

    id: str


class Profile(msgspec.Struct, kw_only=True):
    """Validated profile fields to write; UNSET leaves a stored field as it is, None clears it."""

    display_name: str | UnsetType | None = UNSET
    email: str | UnsetType | None = UNSET
    avatar_url: str | UnsetType | None = UNSET
    tags: list[str] | UnsetType = UNSET
    metadata: dict[str, str | int | float | bool | None] | UnsetType = UNSET

    def is_empty(self) -> bool:
        return all(getattr(self, f) is UNSET for f in self.__struct_fields__)


class Metrics(msgspec.Struct, kw_only=True):
    total_cost: float = 0.0
    total_tokens: int = 0
    total_requests: int = 0
    error_rate: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    rate_limited_requests: int = 0


class Identity(msgspec.Struct, kw_only=True):
    id: str = msgspec.field(name="_id")
    external_id: str
    display_name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created: str
    updated: str
    metrics: Metrics | UnsetType = UNSET


def rfc3339(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms // 1000))


def _text(param: str, value: str, limit: int) -> str:
    value = value.strip()
    if len(value) > limit:
        raise InvalidField(param, f"{param} must be at most {limit} characters")
    found = _CONTROL.search(value)
    if found:
        raise InvalidField(
            param,
            f"{param} must not contain control or bidirectional formatting characters "
            f"(found U+{ord(found.group()):04X})",
        )
    return value


def external_id(value: str, param: str = "external_id") -> str:
    value = _text(param, value, MAX_ID)
    if not value:
        raise InvalidField(param, f"{param} must not be empty")
    return value


_BLANKS = re.compile(r"\s+")


def _as_given(external_id: str) -> str:
    return external_id


def _trimmed(external_id: str) -> str:
    return _BLANKS.sub(" ", external_id.strip())


def _lowered(external_id: str) -> str:
    return _trimmed(external_id).lower()


_NORMALIZERS = {"none": _as_given, "trim": _trimmed, "lower": _lowered}


def normalizer(mode: str) -> Callable[[str], str]:
    """`[identity] normalize`: "none" keeps external ids as given; "trim" removes blanks
    around them and makes each run of blanks inside one space; "lower" trims, then lower-cases
    (ids that differ only in case name one identity)."""
    return _NORMALIZERS[mode]


def tag(value: str, param: str = "tag") -> str:
    value = _text(param, value, MAX_TAG)
    if not value:
        raise InvalidField(param, f"{param} must not be empty")
    return value


def _optional(param: str, value: str | UnsetType | None, limit: int) -> str | UnsetType | None:
    if value is UNSET or value is None:
        return value
    value = _text(param, value, limit)
    return value or None


def _tags(value: list[str] | None) -> list[str]:
    if value is None:
        return []
    if len(value) > MAX_TAGS:
        raise InvalidField("tags", f"tags must have at most {MAX_TAGS} entries, got {len(value)}")
    tags: list[str] = []
    for i, tag in enumerate(value):
        tag = _text(f"tags[{i}]", tag, MAX_TAG)
        if not tag:
            raise InvalidField(f"tags[{i}]", "tags must not be empty strings")
        if tag not in tags:
            tags.append(tag)
    return tags


def _metadata(value: Metadata | None) -> dict[str, str | int | float | bool | None]:
    if value is None:
        return {}
    merged: dict[str, Any] = {}
    for part in value if isinstance(value, list) else [value]:
        merged.update(part)
        if len(merged) > MAX_METADATA_KEYS:
            raise InvalidField("metadata", f"metadata must have at most {MAX_METADATA_KEYS} keys")
    for key, item in merged.items():
        param = f"metadata.{key[:MAX_METADATA_KEY]}"
        if not key or len(key) > MAX_METADATA_KEY or _CONTROL.search(key):
            raise InvalidField(
                param, f"metadata keys must be 1-{MAX_METADATA_KEY} printable characters"
            )
        if isinstance(item, str):
            if len(item) > MAX_METADATA_VALUE:
                raise InvalidField(
                    param, f"{param} must be at most {MAX_METADATA_VALUE} characters"
                )
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidField(param, f"{param} must be a finite number")
        elif not (item is None or isinstance(item, bool | int | float)):
            raise InvalidField(param, f"{param} must be a string, number, boolean or null")
    return merged


def profile(fields: _Fields) -> Profile:
    """Check every field of a create, patch or body identity; InvalidField names the bad one."""
    avatar = fields.avatar_url
    if fields.logo_url is not UNSET:
        if avatar is not UNSET and avatar != fields.logo_url:
            raise InvalidField("logo_url", "logo_url and avatar_url differ; send one of them")
        avatar = fields.logo_url
    email = _optional("email", fields.email, MAX_EMAIL)
    if isinstance(email, str) and not _EMAIL.fullmatch(email):
        raise InvalidField("email", "email is not a valid address")
    param = "logo_url" if fields.logo_url is not UNSET else "avatar_url"
    avatar = _optional(param, avatar, MAX_URL)
    if isinstance(avatar, str) and not _URL.fullmatch(avatar):
        raise InvalidField(param, f"{param} must be an http or https URL")
    return Profile(
        display_name=_optional("display_name", fields.display_name, MAX_NAME),
        email=email,
        avatar_url=avatar,
        tags=UNSET if fields.tags is UNSET else _tags(fields.tags),
        metadata=UNSET if fields.metadata is UNSET else _metadata(fields.metadata),
    )


def has_control(value: str) -> bool:
    return _CONTROL.search(value) is not None


def metadata_text(value: object) -> str:
    """A metadata value as text, to group or filter by: a string as it is, anything else as
    JSON (`true`, `3`, `null`)."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


class MetadataFilter(msgspec.Struct, frozen=True):
    """Identities whose metadata has `key` (with `value`, as metadata_text reads it; None:
    any value)."""

    key: str
    value: str | None = None

    def matches(self, identity: Identity) -> bool:
        if self.key not in identity.metadata:
            return False
        return self.value is None or metadata_text(identity.metadata[self.key]) == self.value

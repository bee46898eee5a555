from __future__ import annotations

from urllib.parse import parse_qsl

import msgspec
from msgspec import UNSET

from sidecar.identity import model
from sidecar.identity.model import IdentityCreate, InvalidField, Profile

MAX_FIELDS = 200  # form fields one post may carry
MAX_ROWS = 40  # metadata rows, empty ones included
EMPTY_ROWS = 3  # blank rows the form offers


class BadForm(ValueError):
    """A post that is not a urlencoded form of UTF-8 text."""


def parse(body: bytes, content_type: str) -> dict[str, list[str]]:
    if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise BadForm("expected an application/x-www-form-urlencoded form")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FIELDS,
            errors="strict",
        )
    except ValueError as exc:  # UnicodeDecodeError too
        raise BadForm(f"the form is not valid: {exc}") from None
    fields: dict[str, list[str]] = {}
    for name, value in pairs:
        fields.setdefault(name, []).append(value)
    return fields


def first(fields: dict[str, list[str]], name: str) -> str:
    return fields.get(name, [""])[0]


class NewIdentity(msgspec.Struct, kw_only=True):
    """The New Identity form as sent (kept to show it again), and its errors by field:
    external_id, display_name, email, tags, metadata, or meta.<row> for one metadata row."""

    external_id: str = ""
    display_name: str = ""
    email: str = ""
    tags: str = ""  # comma-separated
    metadata: list[tuple[str, str]] = msgspec.field(default_factory=list)
    errors: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: dict[str, list[str]]) -> NewIdentity:
        keys, values = fields.get("meta_key", []), fields.get("meta_value", [])
        rows = max(len(keys), len(values))
        keys, values = keys + [""] * (rows - len(keys)), values + [""] * (rows - len(values))
        return cls(
            external_id=first(fields, "external_id"),
            display_name=first(fields, "display_name"),
            email=first(fields, "email"),
            tags=first(fields, "tags"),
            metadata=list(zip(keys, values, strict=True)),
        )

    def validate(self) -> tuple[str, Profile] | None:
        """The external id and the checked profile, or None with `errors` filled: every field
        is checked, by the API's own rules (sidecar.identity.model)."""
        errors: dict[str, str] = {}
        external_id = ""
        try:
            external_id = model.external_id(self.external_id)
        except InvalidField as exc:
            errors["external_id"] = exc.message
        if len(self.metadata) > MAX_ROWS:
            errors["metadata"] = f"at most {MAX_ROWS} rows"
        metadata: dict[str, str] = {}
        rows: dict[str, int] = {}
        for i, (key, value) in enumerate(self.metadata[:MAX_ROWS]):
            key = key.strip()
            if not key and not value.strip():
                continue
            if not key:
                errors[f"meta.{i}"] = "a value needs a key"
            elif key in metadata:
                errors[f"meta.{i}"] = f"the key {key!r} is given twice"
            else:
                metadata[key], rows[key[: model.MAX_METADATA_KEY]] = value, i
        tags = [t.strip() for t in self.tags.split(",") if t.strip()]
        parts = {
            "display_name": IdentityCreate(external_id="", display_name=self.display_name),
            "email": IdentityCreate(external_id="", email=self.email.strip() or UNSET),
            "tags": IdentityCreate(external_id="", tags=tags),
            "metadata": IdentityCreate(external_id="", metadata=dict(metadata)),
        }
        for name, part in parts.items():
            try:
                model.profile(part)
            except InvalidField as exc:
                field = name
                if exc.param.startswith("metadata."):
                    row = rows.get(exc.param.removeprefix("metadata."))
                    field = f"meta.{row}" if row is not None else "metadata"
                errors.setdefault(field, exc.message)
        if errors:
            self.errors = errors
            return None
        profile = model.profile(
            IdentityCreate(
                external_id=external_id,
                display_name=self.display_name.strip() or UNSET,
                email=self.email.strip() or UNSET,
                tags=tags or UNSET,
                metadata=metadata or UNSET,
            )
        )
        return external_id, profile

from __future__ import annotations

import re

import msgspec

_PATH = re.compile(r"`\$((?:\.[^`\[]+|\[\d+\])*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `(.+)`")
_MISSING = re.compile(r"Object missing required field `(.+)`")


def describe(err: msgspec.ValidationError, prefix: str) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.a[0].b`" as ("prefix.a[0].b", "expected ...").

    Unknown and missing fields name the field itself: ("prefix.x", "unknown field")."""
    text = str(err)
    message, sep, location = text.rpartition(" - at ")
    if not sep:
        message, location = text, ""
    match = _PATH.fullmatch(location)
    where = prefix + (match.group(1) if match else "")
    if unknown := _UNKNOWN.fullmatch(message):
        return f"{where}.{unknown.group(1)}", "unknown field"
    if missing := _MISSING.fullmatch(message):
        return f"{where}.{missing.group(1)}", "required field missing"
    return where, message[0].lower() + message[1:]

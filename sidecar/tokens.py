from __future__ import annotations

import hashlib
import hmac


def token_matches(given: str | None, expected: str) -> bool:
    """Constant time: digests first, so that neither the length nor the content leaks."""
    if given is None:
        return False
    a = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None

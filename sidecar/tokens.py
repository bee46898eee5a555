from __future__ import annotations

import functools
import hashlib
import hmac
import os

# Tokens are compared by keyed BLAKE2b digests of both (a MAC under a key of this process):
# neither their length nor their content leaks through the comparison's time. CPython's own
# BLAKE2b, not OpenSSL's SHA-256: the hooks compare a token on every call, and OpenSSL's
# per-call set-up cost several times the whole comparison (bench/RESULTS.md).
_KEY = os.urandom(32)


def _mac(token: bytes) -> bytes:
    return hashlib.blake2b(token, key=_KEY, digest_size=32).digest()


@functools.lru_cache(maxsize=8)
def _expected_mac(expected: str) -> bytes:
    return _mac(expected.encode("utf-8"))


def token_matches(given: str | None, expected: str) -> bool:
    """Constant time: digests first, so that neither the length nor the content leaks."""
    if given is None:
        return False
    return hmac.compare_digest(
        _mac(given.encode("utf-8", "surrogateescape")), _expected_mac(expected)
    )


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None

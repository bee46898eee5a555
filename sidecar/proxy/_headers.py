"""An upstream answer's headers as the sidecar relays them: the bytes the upstream sent, less the
hop-by-hop ones and those its own HTTP server writes, or Unrelayable when one cannot go to the
client as it is."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Hop-by-hop headers (RFC 9110 7.6.1): this connection's business, not the client's.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Written by the sidecar's own HTTP server on every answer (uvicorn's defaults): the upstream's
# would make two of each, and Date is a single-valued field (RFC 9110 6.6.1).
SERVER_OWN = frozenset({b"date", b"server"})
NOT_RELAYED = HOP_BY_HOP | SERVER_OWN
# A field name is a token (RFC 9110 5.1); a value holds no control but HTAB (5.5): what the
# HTTP server would refuse to write (uvicorn raises, and the client gets a 500 or a cut
# connection), so it is caught before anything is sent.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class Unrelayable(Exception):
    """A header of the upstream's answer cannot be relayed; the message says which, never its
    value."""


# Names checked before: answers carry the same few, and checking each again on every answer
# cost more than the rest of relaying its headers. Bounded; emptied when full.
_VALID_NAMES: set[bytes] = set()
_VALID_NAMES_MAX = 1024


def relayed(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Names lower-cased, values byte for byte (obs-text such as UTF-8 included: re-encoding
    a value as text would change it)."""
    out = []
    for name, value in raw:
        lower = name.lower()
        if lower in NOT_RELAYED:
            continue
        if name not in _VALID_NAMES:
            if not _TOKEN.fullmatch(name):
                raise Unrelayable("a header name that is not a valid token")
            if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
                _VALID_NAMES.clear()
            _VALID_NAMES.add(name)
        out.append((lower, value))
    # The values in one search (the tab that joins them is allowed in a value): one that
    # fails is then found to be named.
    if out and _BAD_VALUE.search(b"\t".join([value for _, value in out])):
        bad = next(lower for lower, value in out if _BAD_VALUE.search(value))
        raise Unrelayable(f"a control character in the value of {bad.decode()}")
    return out

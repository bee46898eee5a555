from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import quote, urlencode

from litestar.datastructures import Cookie
from litestar.response import Response, Template

from sidecar.money import display, from_number

# The formatting helpers the templates use (as filters and globals, see templates.py) and the
# responses every page goes out as. The helpers return plain text: the templates escape it.

PRODUCT = "LLM identity sidecar"
HTML = "text/html; charset=utf-8"

# No script or style from anywhere but this page; scripts only with this response's nonce.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "script-src 'nonce-{nonce}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def identity_path(external_id: str, identity_id: str) -> str:
    """The dashboard's URL of an identity: its external id, percent-encoded as one segment.
    "new" is the form's own path, so that external id is sent as "%6Eew"; a browser collapses
    "." and ".." segments (encoded or not), so those two go by `_id`."""
    if external_id in (".", ".."):
        return f"/ui/identities/{identity_id}"
    encoded = quote(external_id, safe="")
    return f"/ui/identities/{'%6Eew' if encoded == 'new' else encoded}"


def query(**params: str | None) -> str:
    kept = {k: v for k, v in params.items() if v}
    return "?" + urlencode(kept) if kept else ""


money = display  # nano-dollars, for people (sidecar.money.display)


def dollars(amount: float) -> str:
    """A dollar figure the API gives as a number (e.g. `total_cost`), for people."""
    return display(from_number(amount) or 0)


def count(n: float) -> str:
    return f"{round(n):,}"


def compact(n: float) -> str:
    """1234 -> 1.2k, 3400000 -> 3.4M (axis labels)."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{n:.0f}" if n == int(n) else f"{n:.2g}"


def percent(rate: float | None) -> str:
    return "\u2013" if rate is None else f"{rate * 100:.1f}%"


def moment(rfc3339: str | None) -> str:
    """'2026-11-18T11:06:40Z' -> '2026-11-18 11:06'."""
    return rfc3339[:16].replace("T", " ") if rfc3339 else "never"


def literal(value: object) -> str:
    """A metadata value as JSON text (strings quoted), for reading, not for a script."""
    return json.dumps(value, ensure_ascii=False)


def page(
    template: str,
    title: str,
    *,
    csrf: str | None = None,
    status: int = 200,
    nav: bool = True,
    **context: Any,
) -> Template:
    """A whole HTML page from `template` (which extends base.html). `csrf`: the session's
    token (signed in with a cookie: a sign-out button). A page's inline script runs by this
    response's nonce."""
    nonce = secrets.token_urlsafe(16)
    return Template(
        template,
        context={**context, "title": title, "csrf": csrf, "nav": nav, "nonce": nonce},
        status_code=status,
        media_type=HTML,
        headers=security_headers(nonce),
    )


def security_headers(nonce: str = "none") -> dict[str, str]:
    return {
        "content-security-policy": _CSP.format(nonce=nonce),
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
        "cache-control": "no-store",
    }


def redirect(location: str, *, cookies: list[Cookie] | None = None) -> Response[str]:
    """303 See Other: the browser GETs `location` (after a form post, too)."""
    return Response(
        "",
        status_code=303,
        media_type="text/plain",
        headers={"location": location, **security_headers()},
        cookies=cookies,
    )


def message_page(title: str, message: str, status: int, *, csrf: str | None = None) -> Template:
    return page("message.html", title, status=status, csrf=csrf, message=message)

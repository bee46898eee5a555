from __future__ import annotations

import secrets
from decimal import Decimal
from html import escape
from urllib.parse import quote, urlencode

from litestar.datastructures import Cookie
from litestar.response import Response

# The page frame and the small formatting helpers every page shares. Every value that comes
# from a user or the store goes through `escape` (or `attr`) on its way into the HTML.

PRODUCT = "LLM identity sidecar"

CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1d2430;background:#f5f6f8}
header{display:flex;align-items:center;gap:24px;padding:10px 24px;background:#1d2430;color:#fff}
header a{color:#dfe6f0;text-decoration:none}
header a:hover{color:#fff}
.brand{font-weight:600;color:#fff}
header nav{display:flex;gap:16px;flex:1}
header form{margin:0}
header button{background:none;border:1px solid #5b6679;color:#dfe6f0;border-radius:4px;
padding:3px 10px;cursor:pointer}
main{max-width:1180px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:22px;margin:4px 0 16px}
h2{font-size:16px;margin:28px 0 10px}
a{color:#1f5fbf}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7}
th,td{padding:7px 10px;border-bottom:1px solid #e8ebef;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:13px;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:hover td{background:#fafbfc}
.sub{color:#6b7585;font-size:12px}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;background:#e8ebef;
color:#394355;margin:1px 2px 1px 0;text-decoration:none}
.src-body{background:#dcefe1;color:#1b5e2b}.src-header{background:#dde8f8;color:#1f4f99}
.src-api_key{background:#f5e8cf;color:#7a4d00}.src-anonymous{background:#ececec;color:#555}
.toolbar{display:flex;flex-wrap:wrap;gap:10px;align-items:end;margin-bottom:14px}
.toolbar label{display:flex;flex-direction:column;font-size:12px;color:#4a5568;gap:2px}
input,select{font:inherit;padding:5px 8px;border:1px solid #c5ccd6;border-radius:4px;
background:#fff}
button,.button{font:inherit;padding:6px 14px;border-radius:4px;border:1px solid #1f5fbf;
background:#1f5fbf;color:#fff;cursor:pointer;text-decoration:none;display:inline-block}
button.secondary{background:#fff;color:#1f5fbf}
.pager{display:flex;gap:12px;margin-top:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 12px}
.card b{display:block;font-size:20px;font-variant-numeric:tabular-nums}
.card span{color:#6b7585;font-size:12px}
#metric-last-seen b{font-size:15px;line-height:30px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
.chart{background:#fff;border:1px solid #dde1e7;border-radius:6px}
.chart .grid{stroke:#e8ebef}.chart .axis-line{stroke:#9aa3b2}
.chart .tick,.chart .axis{font-size:11px;fill:#6b7585}.chart .chart-title{font-size:13px;
font-weight:600;fill:#1d2430}
.chart .cost{fill:#2f855a}.chart .input{fill:#3b6fc4}.chart .output{fill:#9dbbe8}
.chart .day:hover rect{opacity:.8}
dl.profile{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;
border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin:0}
dl.profile dt{color:#6b7585}dl.profile dd{margin:0;overflow-wrap:anywhere}
form.stack{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:16px 20px;
max-width:640px}
form.stack .field{margin-bottom:14px}
form.stack label{display:block;font-weight:600;margin-bottom:3px}
form.stack input[type=text],form.stack input[type=email],form.stack input[type=password]{
width:100%}
.meta-row{display:flex;gap:8px;margin-bottom:6px}.meta-row input{flex:1}
.error{color:#b42318;font-size:13px;margin-top:3px}
.invalid{border-color:#b42318;background:#fff6f5}
.notice{background:#fff6f5;border:1px solid #f1b8b2;color:#8a1c12;padding:8px 12px;
border-radius:4px;margin-bottom:14px}
.empty{padding:24px;text-align:center;color:#6b7585;background:#fff;border:1px solid #dde1e7}
.bar{height:6px;background:#e8ebef;border-radius:3px;min-width:80px}
.bar i{display:block;height:6px;border-radius:3px;background:#2f855a}
.bar i.hot{background:#c05621}
"""

# No script or style from anywhere but this page; scripts only with this response's nonce.
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "script-src 'nonce-{nonce}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def attr(value: object) -> str:
    """A value for inside a double-quoted attribute."""
    return escape(str(value), quote=True)


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


def money(nanos: int) -> str:
    """Dollars from nano-dollars: cents from a dollar up, else up to 6 decimals."""
    dollars = Decimal(nanos) / Decimal(10**9)
    if nanos == 0:
        return "$0.00"
    if abs(dollars) >= 1:
        return f"${dollars:,.2f}"
    text = f"{dollars:.6f}".rstrip("0")
    return "$" + (text + "0" if text.endswith(".") else text)


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


def source_tag(source: str | None) -> str:
    if not source:
        return '<span class="sub">\u2013</span>'
    return f'<span class="pill src-{attr(source)}">{escape(source)}</span>'


def page(
    title: str,
    body: str,
    *,
    csrf: str | None = None,
    status: int = 200,
    script: str = "",
    nav: bool = True,
) -> Response[str]:
    """A whole HTML page. `csrf`: the session's token (signed in with a cookie: a sign-out
    button); `script`: inline JavaScript, allowed by this response's nonce."""
    nonce = secrets.token_urlsafe(16)
    links = '<a href="/ui">Identities</a><a href="/ui/identities/new">New Identity</a>'
    nav_html = f"<nav>{links if nav else ''}</nav>"
    logout = (
        '<form method="post" action="/ui/logout">'
        f'<input type="hidden" name="csrf" value="{attr(csrf)}">'
        '<button type="submit">Sign out</button></form>'
        if csrf
        else ""
    )
    scripts = f'<script nonce="{nonce}">{script}</script>' if script else ""
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · {PRODUCT}</title><style>{CSS}</style></head>"
        f'<body><header><a class="brand" href="/ui">{PRODUCT}</a>{nav_html}{logout}</header>'
        f"<main>{body}</main>{scripts}</body></html>"
    )
    return Response(
        html,
        status_code=status,
        media_type="text/html; charset=utf-8",
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


def message_page(
    title: str, message: str, status: int, *, csrf: str | None = None
) -> Response[str]:
    body = (
        f"<h1>{escape(title)}</h1><p>{escape(message)}</p>"
        '<p><a href="/ui">Back to the identities</a></p>'
    )
    return page(title, body, status=status, csrf=csrf)

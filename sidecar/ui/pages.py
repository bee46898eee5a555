from __future__ import annotations

from html import escape

import msgspec

from sidecar.identity.model import Identity, Metrics
from sidecar.ui.forms import EMPTY_ROWS, MAX_ROWS, NewIdentity
from sidecar.ui.render import (
    attr,
    count,
    identity_path,
    money,
    percent,
    query,
    source_tag,
)

SORT_LABELS = {
    "newest": "Newest",
    "cost": "Cost (30 days)",
    "requests": "Requests (30 days)",
    "error_rate": "Error rate (30 days)",
}


def _metrics(identity: Identity) -> Metrics:
    return identity.metrics if isinstance(identity.metrics, Metrics) else Metrics()


def nanos(dollars: float) -> int:
    return round(dollars * 1e9)


def login(*, error: str | None = None, next_path: str = "/ui") -> str:
    notice = f'<div class="notice" role="alert">{escape(error)}</div>' if error else ""
    return (
        "<h1>Sign in</h1>"
        f"{notice}"
        '<form class="stack" method="post" action="/ui/login">'
        f'<input type="hidden" name="next" value="{attr(next_path)}">'
        '<div class="field"><label for="token">Admin token</label>'
        '<input type="password" id="token" name="token" autocomplete="current-password" '
        "required autofocus></div>"
        '<button type="submit">Sign in</button>'
        '<p class="sub">The token that <code>sidecar serve</code> printed, or <code>[admin] '
        "token</code>. The session lasts 12 hours, on this site only.</p></form>"
    )


class Row(msgspec.Struct):
    identity: Identity
    source: str | None  # the last request's source tag


class Listing(msgspec.Struct, kw_only=True):
    rows: list[Row]
    search: str
    tag: str
    sort: str
    previous: str | None  # hrefs of the neighbouring pages
    next: str | None


def identities(listing: Listing) -> str:
    options = "".join(
        f'<option value="{attr(value)}"{" selected" if value == listing.sort else ""}>'
        f"{escape(label)}</option>"
        for value, label in SORT_LABELS.items()
    )
    toolbar = (
        '<form class="toolbar" method="get" action="/ui" role="search">'
        '<label>Search<input type="search" name="q" placeholder="id, name or email" '
        f'value="{attr(listing.search)}"></label>'
        f'<label>Tag<input type="text" name="tag" value="{attr(listing.tag)}"></label>'
        f'<label>Sort by<select name="sort">{options}</select></label>'
        '<button type="submit">Apply</button>'
        '<a class="button" href="/ui/identities/new">New Identity</a></form>'
    )

    def header(label: str, sort: str) -> str:
        href = "/ui" + query(q=listing.search, tag=listing.tag, sort=sort)
        mark = " ▼" if listing.sort == sort else ""
        return f'<th class="num"><a href="{attr(href)}">{escape(label)}</a>{mark}</th>'

    head = (
        "<tr><th>Name</th><th>Source</th>"
        + header("Requests", "requests")
        + header("Cost", "cost")
        + '<th class="num">Tokens</th>'
        + header("Error rate", "error_rate")
        + "</tr>"
    )
    rows = "".join(_row(row, listing) for row in listing.rows)
    if not rows:
        table = '<div class="empty">No identities match.</div>'
    else:
        table = f'<table id="identities"><thead>{head}</thead><tbody>{rows}</tbody></table>'
    pager = []
    if listing.previous:
        pager.append(f'<a rel="prev" href="{attr(listing.previous)}">← Previous</a>')
    if listing.next:
        pager.append(f'<a rel="next" href="{attr(listing.next)}">Next →</a>')
    return (
        "<h1>Identities</h1>"
        f"{toolbar}{table}"
        f'<div class="pager">{"".join(pager)}</div>'
        '<p class="sub">Requests, cost, tokens and error rate over the last 30 UTC days.</p>'
    )


def _row(row: Row, listing: Listing) -> str:
    identity = row.identity
    m = _metrics(identity)
    name = identity.display_name or identity.external_id
    under = (
        f'<div class="sub">{escape(identity.external_id)}</div>' if identity.display_name else ""
    )
    tags = "".join(
        f'<a class="pill" href="{attr("/ui" + query(tag=t, sort=listing.sort))}">{escape(t)}</a>'
        for t in identity.tags
    )
    href = identity_path(identity.external_id, identity.id)
    rate = m.error_rate if m.total_requests else None
    return (
        f'<tr data-id="{attr(identity.id)}">'
        f'<td class="name"><a href="{attr(href)}">{escape(name)}</a>{under}'
        f"{f'<div>{tags}</div>' if tags else ''}</td>"
        f'<td class="source">{source_tag(row.source)}</td>'
        f'<td class="num requests">{count(m.total_requests)}</td>'
        f'<td class="num cost">{money(nanos(m.total_cost))}</td>'
        f'<td class="num tokens">{count(m.total_tokens)}</td>'
        f'<td class="num error-rate">{percent(rate)}</td></tr>'
    )


ADD_ROW_JS = (
    "document.getElementById('add-row').addEventListener('click',function(){"
    "var rows=document.getElementById('meta-rows');"
    f"if(rows.children.length>={MAX_ROWS})return;"
    "var row=rows.lastElementChild.cloneNode(true);"
    "row.querySelectorAll('input').forEach(function(i){i.value='';i.className='';});"
    "var e=row.querySelector('.error');if(e)e.remove();"
    "rows.appendChild(row);row.querySelector('input').focus();});"
)


def _field(form: NewIdentity, name: str, label: str, kind: str = "text", hint: str = "") -> str:
    value = getattr(form, name)
    error = form.errors.get(name)
    invalid = ' class="invalid" aria-invalid="true"' if error else ""
    return (
        f'<div class="field" id="field-{name}"><label for="{name}">{escape(label)}</label>'
        f'<input type="{kind}" id="{name}" name="{name}" value="{attr(value)}"{invalid}>'
        + (f'<div class="error" role="alert">{escape(error)}</div>' if error else "")
        + (f'<div class="sub">{escape(hint)}</div>' if hint else "")
        + "</div>"
    )


def new_identity(form: NewIdentity, csrf: str) -> str:
    rows = list(form.metadata)
    while len(rows) < len([r for r in rows if r[0] or r[1]]) + EMPTY_ROWS and len(rows) < MAX_ROWS:
        rows.append(("", ""))
    meta = []
    for i, (key, value) in enumerate(rows):
        error = form.errors.get(f"meta.{i}")
        invalid = ' class="invalid" aria-invalid="true"' if error else ""
        meta.append(
            f'<div class="meta-row-wrap" id="meta-{i}"><div class="meta-row">'
            f'<input type="text" name="meta_key" placeholder="key" aria-label="metadata key" '
            f'value="{attr(key)}"{invalid}>'
            f'<input type="text" name="meta_value" placeholder="value" '
            f'aria-label="metadata value" value="{attr(value)}"{invalid}></div>'
            + (f'<div class="error" role="alert">{escape(error)}</div>' if error else "")
            + "</div>"
        )
    meta_error = form.errors.get("metadata")
    notice = (
        '<div class="notice" role="alert">The identity was not created: see the fields below.</div>'
        if form.errors
        else ""
    )
    return (
        "<h1>New Identity</h1>"
        f"{notice}"
        '<form class="stack" method="post" action="/ui/identities/new" novalidate>'
        f'<input type="hidden" name="csrf" value="{attr(csrf)}">'
        + _field(form, "external_id", "External id", hint="required; the id your traffic sends")
        + _field(form, "display_name", "Display name")
        + _field(form, "email", "Email", "email")
        + _field(form, "tags", "Tags", hint="comma-separated, e.g. premium, beta")
        + '<div class="field" id="field-metadata"><label>Metadata</label>'
        f'<div id="meta-rows">{"".join(meta)}</div>'
        + (f'<div class="error" role="alert">{escape(meta_error)}</div>' if meta_error else "")
        + '<button type="button" class="secondary" id="add-row">Add row</button>'
        '<div class="sub">Values are stored as text; empty rows are ignored.</div></div>'
        '<button type="submit">Create identity</button></form>'
    )

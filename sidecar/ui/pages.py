from __future__ import annotations

import msgspec
from litestar.response import Template

from sidecar.identity.model import Identity, Metrics
from sidecar.ui.forms import EMPTY_ROWS, MAX_ROWS, NewIdentity
from sidecar.ui.render import page

# The sign-in form, the list and the New Identity form: what each template is given.

SORT_LABELS = {
    "newest": "Newest",
    "cost": "Cost (30 days)",
    "requests": "Requests (30 days)",
    "error_rate": "Error rate (30 days)",
}


def metrics(identity: Identity) -> Metrics:
    return identity.metrics if isinstance(identity.metrics, Metrics) else Metrics()


def login(*, error: str | None = None, next_path: str = "/ui", status: int = 200) -> Template:
    return page("login.html", "Sign in", status=status, nav=False, error=error, next_path=next_path)


class Row(msgspec.Struct):
    identity: Identity
    source: str | None  # the last request's source tag
    budget: float | None = None  # the most any of its budgets has used (None: none applies)

    @property
    def metrics(self) -> Metrics:
        return metrics(self.identity)


class Listing(msgspec.Struct, kw_only=True):
    rows: list[Row]
    search: str
    tag: str
    meta_key: str
    meta_value: str
    sort: str
    previous: str | None  # hrefs of the neighbouring pages
    next: str | None
    budgets: bool = False  # some budget applies to some row: the "budget used" column


def identities(listing: Listing, *, csrf: str | None) -> Template:
    return page("identities.html", "Identities", csrf=csrf, listing=listing, sorts=SORT_LABELS)


class MetaRow(msgspec.Struct, frozen=True):
    key: str
    value: str
    error: str | None


def meta_rows(form: NewIdentity) -> list[MetaRow]:
    """The form's metadata rows as sent, then blank ones: EMPTY_ROWS more than it filled, up
    to MAX_ROWS in all."""
    rows = list(form.metadata)
    filled = len([r for r in rows if r[0] or r[1]])
    while len(rows) < filled + EMPTY_ROWS and len(rows) < MAX_ROWS:
        rows.append(("", ""))
    return [MetaRow(k, v, form.errors.get(f"meta.{i}")) for i, (k, v) in enumerate(rows)]


def new_identity(form: NewIdentity, *, csrf: str | None, status: int = 200) -> Template:
    """`csrf` is None for a client signed in by the Authorization header: no token needed."""
    return page(
        "new_identity.html",
        "New Identity",
        csrf=csrf,
        status=status,
        form=form,
        rows=meta_rows(form),
        max_rows=MAX_ROWS,
    )

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

import msgspec
from litestar import Controller, Request, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException, ValidationException
from litestar.response import Response

from sidecar.budgets.service import Budgets
from sidecar.catalog import Catalog
from sidecar.errors import Conflict, InvalidRequest, NotFound, SidecarError
from sidecar.identity import model
from sidecar.quota.decision import PolicyUsage
from sidecar.quota.policy import choose
from sidecar.quota.service import Quota
from sidecar.quota.signins import TooManyFailedSignIns
from sidecar.tokens import bearer
from sidecar.ui import budget_pages, detail, pages
from sidecar.ui.forms import BadForm, NewIdentity, first, parse
from sidecar.ui.render import identity_path, message_page, query, redirect
from sidecar.ui.session import COOKIE, SESSION_TTL_S, Sessions, is_https, same_origin
from sidecar.usage import buckets
from sidecar.usage.counters import UsageCounters

log = logging.getLogger("sidecar.ui")

# The services the pages take, by parameter name (app.py provides them).
BudgetsDep = NamedDependency[Budgets]
CatalogDep = NamedDependency[Catalog]
QuotaDep = NamedDependency[Quota]
SessionsDep = NamedDependency[Sessions]
UsageCountersDep = NamedDependency[UsageCounters]


PREFIX = "/ui/identities/"
PAGE_SIZE = 25
SORTS = {"newest": "created", "cost": "cost", "requests": "requests", "error_rate": "error_rate"}
_NEXT = re.compile(r"/ui(?:[/?][!-~]*)?")  # where a sign-in may send the browser back to


class Auth(msgspec.Struct):
    session: str | None  # None: the admin token came in an Authorization header
    csrf: str | None  # the session's form token


class LoginRequired(Exception):
    def __init__(self, back_to: str) -> None:
        super().__init__(back_to)
        self.back_to = back_to


class Forbidden(Exception):
    """A form post without this session's CSRF token, or from another site."""


def _here(request: Request[Any, Any, Any]) -> str:
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw.split(b"?", 1)[0].decode("latin-1")
    qs: bytes = request.scope.get("query_string", b"")
    return path + ("?" + qs.decode("latin-1") if qs else "")


def _peer(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client is not None else None


def _back_to(value: str) -> str:
    return value if _NEXT.fullmatch(value) and "\\" not in value else "/ui"


def _cookie(request: Request[Any, Any, Any], value: str, max_age: int) -> Cookie:
    return Cookie(
        key=COOKIE,
        value=value,
        path="/ui",
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=is_https(request.scope.get("scheme", "http"), request.headers),
    )


def _ref(request: Request[Any, Any, Any]) -> str | None:
    """The identity of `/ui/identities/{ref}` (None for the New Identity form's own path),
    read from the raw path so that an encoded '/' stays inside the id."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    segment = raw.split(b"?", 1)[0].decode("latin-1")[len(PREFIX) :]
    if segment == "new":
        return None
    if not segment or "/" in segment:
        raise NotFound(f"no page at {request.url.path}")
    try:
        ref = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the identity in the address is not valid UTF-8") from None
    if not ref or len(ref) > model.MAX_ID:
        raise NotFound(f"no identity {ref[:64]!r}")
    return ref


def _metadata_filter(key: str, value: str) -> model.MetadataFilter | None:
    """The list's metadata filter: `meta_key` alone, identities that have the key; with
    `meta_value`, those whose value reads so (a string as it is, else as JSON: `true`)."""
    if not key:
        if value:
            raise InvalidRequest("meta_value needs a meta_key")
        return None
    if len(key) > model.MAX_METADATA_KEY or model.has_control(key):
        raise InvalidRequest(f"meta_key: at most {model.MAX_METADATA_KEY} printable characters")
    if len(value) > model.MAX_METADATA_VALUE or model.has_control(value):
        raise InvalidRequest(f"meta_value: at most {model.MAX_METADATA_VALUE} printable characters")
    return model.MetadataFilter(key, value or None)


def ui_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Errors as pages: a sign-in is a redirect, the rest a short page with the status."""
    if isinstance(exc, LoginRequired):
        return redirect("/ui/login" + query(next=exc.back_to))
    if isinstance(exc, Forbidden):
        return message_page(
            "Refused",
            "This form was not sent by this dashboard (a missing or stale form token, or "
            "another site's page). Reload the page and try again.",
            403,
        )
    if isinstance(exc, BadForm):
        return message_page("Invalid form", str(exc), 400)
    if isinstance(exc, SidecarError):
        page = message_page(exc.type.replace("_", " ").capitalize(), exc.message, exc.status)
        page.headers.update(exc.headers)  # retry-after, for one
        return page
    if isinstance(exc, ValidationException):
        return message_page("Invalid request", str(exc.detail), 400)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        message = "No such page." if status == 404 else str(exc.detail)
        response = message_page(f"Error {status}", message, status)
        response.headers.update(exc.headers or {})
        return response
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return message_page("Internal error", "Something went wrong; see the sidecar's log.", 500)


async def auth_of(request: Request[Any, Any, Any], sessions: Sessions) -> Auth | None:
    header = request.headers.get("authorization")
    if header is not None and await sessions.token_valid(
        bearer(header), _peer(request), request.headers
    ):
        return Auth(session=None, csrf=None)
    session = await sessions.check(request.cookies.get(COOKIE))
    return None if session is None else Auth(session=session, csrf=sessions.csrf(session))


async def signed_in(request: Request[Any, Any, Any], sessions: Sessions) -> Auth:
    """The page's viewer, signed in by the session cookie or the admin token, on this site."""
    auth = await auth_of(request, sessions)
    if not same_origin(request.headers):
        raise Forbidden()
    if auth is None:
        raise LoginRequired(_here(request))
    return auth


async def form_of(
    request: Request[Any, Any, Any], sessions: Sessions
) -> tuple[Auth, dict[str, list[str]]]:
    """A form post of a signed-in user: from this site, with the session's CSRF token."""
    auth = await signed_in(request, sessions)
    fields = parse(await request.body(), request.headers.get("content-type", ""))
    if auth.session is not None and not sessions.csrf_matches(auth.session, first(fields, "csrf")):
        raise Forbidden()
    return auth, fields


class DashboardController(Controller):
    """The dashboard's pages, server-rendered; see README "Dashboard"."""

    path = "/ui"
    include_in_schema = False
    exception_handlers = {Exception: ui_error}

    # -- signing in ---------------------------------------------------------------------

    @get("/login", operation_id="uiLoginForm")
    async def login_form(
        self, request: Request[Any, Any, Any], sessions: SessionsDep
    ) -> Response[Any]:
        back_to = _back_to(request.query_params.get("next", "/ui"))
        if await auth_of(request, sessions) is not None:
            return redirect(back_to)
        return pages.login(next_path=back_to)

    @post("/login", operation_id="uiLogin")
    async def login(self, request: Request[Any, Any, Any], sessions: SessionsDep) -> Response[Any]:
        try:
            fields = parse(await request.body(), request.headers.get("content-type", ""))
        except BadForm as exc:
            return pages.login(error=str(exc), status=400)
        if not same_origin(request.headers):
            raise Forbidden()
        back_to = _back_to(first(fields, "next"))
        try:
            valid = await sessions.token_valid(
                first(fields, "token"), _peer(request), request.headers
            )
        except TooManyFailedSignIns as exc:
            page = pages.login(error=exc.message, next_path=back_to, status=exc.status)
            page.headers.update(exc.headers)
            return page
        if not valid:
            return pages.login(error="That is not the admin token.", next_path=back_to, status=401)
        value = await sessions.open()
        return redirect(back_to, cookies=[_cookie(request, value, SESSION_TTL_S)])

    @post("/logout", operation_id="uiLogout")
    async def logout(self, request: Request[Any, Any, Any], sessions: SessionsDep) -> Response[Any]:
        auth, _ = await form_of(request, sessions)
        if auth.session is not None:
            await sessions.close(auth.session)
        return redirect("/ui/login", cookies=[_cookie(request, "", 0)])

    # -- pages ----------------------------------------------------------------------------

    @get("/", operation_id="uiIdentities")
    async def identities(
        self,
        request: Request[Any, Any, Any],
        sessions: SessionsDep,
        catalog: CatalogDep,
        usage_counters: UsageCountersDep,
        budgets: BudgetsDep,
    ) -> Response[Any]:
        auth = await signed_in(request, sessions)
        params = request.query_params
        search, tag = params.get("q", "").strip(), params.get("tag", "").strip()
        meta_key, meta_value = params.get("meta_key", "").strip(), params.get("meta_value", "")
        sort = params.get("sort") or "newest"
        after, before = params.get("after") or None, params.get("before") or None
        limit_text = params.get("limit") or str(PAGE_SIZE)
        if sort not in SORTS:
            raise InvalidRequest(f"sort must be one of {', '.join(SORTS)}")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 200:
            raise InvalidRequest("limit must be a number from 1 to 200")
        if after and before:
            raise InvalidRequest("send after or before, not both")
        for text in (search, tag):
            if len(text) > 255 or model.has_control(text):
                raise InvalidRequest("search and tag: at most 255 printable characters")
        metadata = _metadata_filter(meta_key, meta_value)
        limit = int(limit_text)
        found = await catalog.page(
            limit=limit,
            starting_after=after,
            ending_before=before,
            search=search or None,
            tags=[tag] if tag else (),
            include_metrics=True,
            sort=SORTS[sort],
            metadata=metadata,
        )
        ids = [identity.id for identity in found.data]
        sources = await usage_counters.last_sources(ids)
        rows = [pages.Row(i, s) for i, s in zip(found.data, sources, strict=True)]
        if budgets.active:
            applying = await budgets.for_identities([(i.external_id, i.tags) for i in found.data])
            for row, pairs in zip(rows, applying, strict=True):
                row.budget = budget_pages.used_share(pairs)
        base: dict[str, str | None] = {
            "q": search,
            "tag": tag,
            "meta_key": meta_key,
            "meta_value": meta_value,
            "sort": None if sort == "newest" else sort,
            "limit": None if limit == PAGE_SIZE else str(limit),
        }
        backward = before is not None
        has_previous = found.has_more if backward else after is not None
        has_next = True if backward else found.has_more
        listing = pages.Listing(
            rows=rows,
            search=search,
            tag=tag,
            meta_key=meta_key,
            meta_value=meta_value,
            sort=sort,
            previous="/ui" + query(**base, before=ids[0]) if ids and has_previous else None,
            next="/ui" + query(**base, after=ids[-1]) if ids and has_next else None,
            budgets=any(row.budget is not None for row in rows),
        )
        return pages.identities(listing, csrf=auth.csrf)

    @get("/identities/{ref:path}", operation_id="uiIdentity")
    async def identity(
        self,
        request: Request[Any, Any, Any],
        sessions: SessionsDep,
        catalog: CatalogDep,
        usage_counters: UsageCountersDep,
        quota: QuotaDep,
        budgets: BudgetsDep,
    ) -> Response[Any]:
        auth = await signed_in(request, sessions)
        ref = _ref(request)
        if ref is None:
            return self._new_form(NewIdentity(), auth, 200)
        found = await catalog.get(ref, include_metrics=True)
        if found is None:
            raise NotFound(f"no identity with external id {ref!r}")
        usage_series = await usage_counters.series(found.id, "day")
        first, last = buckets.window(catalog.clock())
        model_days = await usage_counters.model_days(found.id, first, last)
        policy = choose(quota.live.policies, found.external_id, found.tags, found.metadata)
        usage: PolicyUsage | None = None
        if policy is not None and (policy.limits or policy.concurrency):
            usage = await quota.limiter.usage(found.id, policy)
        (applying,) = await budgets.for_identities([(found.external_id, found.tags)])
        return detail.identity_page(
            found,
            usage_series,
            policy,
            usage,
            model_days,
            budgets=budget_pages.rows(applying),
            new_budget=budget_pages.new_path("identity", found.external_id),
            csrf=auth.csrf,
        )

    @post("/identities/{ref:path}", operation_id="uiCreateIdentity")
    async def create(
        self, request: Request[Any, Any, Any], sessions: SessionsDep, catalog: CatalogDep
    ) -> Response[Any]:
        if _ref(request) is not None:
            raise HTTPException(status_code=405, detail="only the New Identity form takes posts")
        auth, fields = await form_of(request, sessions)
        form = NewIdentity.from_fields(fields)
        checked = form.validate()
        if checked is None:
            return self._new_form(form, auth, 400)
        try:
            made = await catalog.create(*checked)
        except Conflict:
            form.errors["external_id"] = "an identity with this external id already exists"
            return self._new_form(form, auth, 409)
        return redirect(identity_path(made.external_id, made.id))

    def _new_form(self, form: NewIdentity, auth: Auth, status: int) -> Response[Any]:
        return pages.new_identity(form, csrf=auth.csrf, status=status)

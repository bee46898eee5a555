"""The dashboard's templates escape every value: hostile profiles, form input and error
messages reach the browser as text, never as markup."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from importlib import resources
from urllib.parse import quote

import httpx

from sidecar.testing.serving import ApiClient
from sidecar.ui.templating import environment

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"onmouseover="alert(1)'  # breaks out of a double-quoted attribute
TAG = '"><img src=x onerror=alert(1)>'


class Parsed(HTMLParser):
    """A page as a browser reads it: its elements, attribute names and text."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: set[str] = set()
        self.values: dict[str, str] = {}  # input name -> value
        self.scripts: list[str | None] = []  # their nonces
        self.text = ""
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes.update(name for name, _ in attrs)
        named = dict(attrs)
        if tag == "script":
            self.scripts.append(named.get("nonce"))
        if tag == "input" and named.get("name"):
            self.values.setdefault(named["name"] or "", named.get("value") or "")

    def handle_data(self, data: str) -> None:
        self.text += data


def assert_inert(r: httpx.Response) -> Parsed:
    """No script, image or event handler came from the values (the page's own script, if
    any, carries the nonce its CSP allows); returns the parsed page."""
    page = r.text
    assert SCRIPT not in page and ATTRIBUTE not in page and "<img" not in page
    parsed = Parsed(page)
    nonce = re.search(r"'nonce-([^']+)'", r.headers["content-security-policy"])
    assert nonce and all(given == nonce.group(1) for given in parsed.scripts)
    assert len(parsed.scripts) <= 1 and "img" not in parsed.tags
    assert not {name for name in parsed.attributes if name.startswith("on")}
    return parsed


async def test_hostile_profiles_show_as_text_on_the_list_and_the_identity_page(
    browser_client: httpx.AsyncClient, signed_in: str, api: ApiClient
) -> None:
    external_id = f"x{SCRIPT}{ATTRIBUTE}"
    metadata_value = f"{ATTRIBUTE} {SCRIPT}"
    r = await api.post(
        "/v2/identities",
        json={
            "external_id": external_id,
            "display_name": f"{SCRIPT} {ATTRIBUTE}",
            "email": "a@b.co",
            "avatar_url": f"https://example.com/{ATTRIBUTE}",
            "tags": [ATTRIBUTE, TAG],
            "metadata": {"<k>": metadata_value},
        },
    )
    assert r.status_code == 201, r.text
    listing = assert_inert(await browser_client.get("/ui"))
    for shown in (external_id, f"{SCRIPT} {ATTRIBUTE}", ATTRIBUTE, TAG):
        assert shown in listing.text, shown
    r = await browser_client.get("/ui/identities/" + quote(external_id, safe=""))
    assert r.status_code == 200
    detail = assert_inert(r)
    for shown in (
        external_id,
        f"{SCRIPT} {ATTRIBUTE}",
        f"https://example.com/{ATTRIBUTE}",
        ATTRIBUTE,
        "<k>",
        json.dumps(metadata_value),
    ):
        assert shown in detail.text, shown
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


async def test_a_refused_form_gives_back_hostile_values_intact(
    browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    r = await browser_client.post(
        "/ui/identities/new",
        data={
            "csrf": signed_in,
            "external_id": "",  # refused: the values come back in the form
            "display_name": ATTRIBUTE,
            "email": SCRIPT,
            "tags": ATTRIBUTE,
            "meta_key": [ATTRIBUTE, ""],
            "meta_value": [SCRIPT, ATTRIBUTE],  # the second row: a value without a key
        },
    )
    assert r.status_code == 400
    form = assert_inert(r)
    assert form.values["display_name"] == ATTRIBUTE
    assert form.values["email"] == SCRIPT
    assert form.values["tags"] == ATTRIBUTE
    assert form.values["meta_key"] == ATTRIBUTE and form.values["meta_value"] == SCRIPT
    assert "a value needs a key" in form.text


async def test_error_pages_show_the_address_as_text(
    browser_client: httpx.AsyncClient, signed_in: str
) -> None:
    r = await browser_client.get("/ui/identities/" + quote(SCRIPT + ATTRIBUTE, safe=""))
    assert r.status_code == 404
    assert SCRIPT in assert_inert(r).text
    # Signed out, the sign-in form keeps where to go back to, in an attribute.
    async with httpx.AsyncClient(base_url=browser_client.base_url) as other:
        back_to = "/ui?q=" + ATTRIBUTE
        r = await other.get("/ui/login", params={"next": back_to})
        assert r.status_code == 200
        assert assert_inert(r).values["next"] == back_to


def test_every_template_compiles_and_none_turns_escaping_off() -> None:
    env = environment()
    names = env.list_templates()
    assert {"base.html", "identities.html", "identity.html", "new_identity.html"} <= set(names)
    folder = resources.files("sidecar.ui") / "templates"
    for name in names:
        env.get_template(name)
        source = (folder / name).read_text("utf-8")
        for raw in ("|safe", "| safe", "autoescape false", "Markup"):
            assert raw not in source, f"{name} renders a value unescaped ({raw})"

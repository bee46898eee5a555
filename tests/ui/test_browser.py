"""The dashboard in a real headless Chromium: sign in, create an identity through the form,
send it traffic through the proxy, and watch its row and chart change. Screenshots land in
tests/artifacts/ui/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.support.auth import ADMIN_TOKEN
from tests.support.clock import FakeClock
from tests.support.env import MakeEnv
from tests.support.traffic import MESSAGES, tokens
from tests.support.ui import ARTIFACTS, INSTALL_TIMEOUT_S

# Nothing leaves the machine: no GPU, no updates, no sync, no QUIC probing.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TODAY = "2026-11-18"  # the tests' fake clock


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, args=ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def day_value(page: Page, chart: str) -> float:
    value = await page.get_attribute(f'#{chart} g.day[data-day="{TODAY}"]', "data-value")
    assert value is not None
    return float(value)


async def row_cell(page: Page, external_id: str, cell: str) -> str:
    row = page.locator("#identities tbody tr", has=page.locator(f'a[href$="/{external_id}"]'))
    return (await row.locator(f"td.{cell}").inner_text()).strip()


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_TIMEOUT_S + 60)  # the first use may install chromium
async def test_sign_in_create_send_traffic_and_see_it(
    chromium: str, browser: Browser, make_env: MakeEnv, tmp_path: Path, clock: FakeClock
) -> None:
    policies = tmp_path / "policies.toml"
    policies.write_text(
        '[[policy]]\nname = "pro"\nmatch = { metadata = { plan = "pro" } }\n'
        'requests = ["100/minute"]\ntokens = ["50000/day"]\n'
    )
    env = await make_env(policies={"paths": [str(policies)]})
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(5000)
    page = await context.new_page()
    offsite: list[str] = []
    page.on(
        "request",
        lambda request: None if request.url.startswith(env.url) else offsite.append(request.url),
    )

    # Signed out, the dashboard sends the browser to the sign-in form, and back after it.
    await page.goto(env.url + "/ui")
    assert page.url == env.url + "/ui/login?next=%2Fui"
    await page.fill("#token", "not-the-token-at-all")
    await page.click("form.stack button[type=submit]")
    assert "That is not the admin token." in await page.inner_text("main")
    await shot(page, "01-sign-in-refused")
    await page.fill("#token", ADMIN_TOKEN)
    await page.click("form.stack button[type=submit]")
    assert page.url == env.url + "/ui"
    cookie = next(c for c in await context.cookies() if c["name"] == "sidecar_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert await page.evaluate("document.cookie") == ""  # not readable by scripts

    # New Identity: a mistake first, shown beside its field with the values kept.
    await page.click("text=New Identity >> nth=0")
    assert page.url == env.url + "/ui/identities/new"
    await page.fill("#external_id", "e2e-user")
    await page.fill("#display_name", "End To End")
    await page.fill("#email", "not an email")
    rows = page.locator("#meta-rows .meta-row")
    assert await rows.count() == 3
    await rows.nth(0).locator("input[name=meta_key]").fill("plan")
    await rows.nth(0).locator("input[name=meta_value]").fill("pro")
    await page.click("#add-row")  # the inline script adds a fourth row
    assert await rows.count() == 4
    await rows.nth(3).locator("input[name=meta_key]").fill("team")
    await rows.nth(3).locator("input[name=meta_value]").fill("research")
    await page.click("form.stack button[type=submit]")
    assert await page.inner_text("#field-email .error") == "email is not a valid address"
    assert await page.input_value("#display_name") == "End To End"
    await shot(page, "02-new-identity-error")
    await page.fill("#email", "e2e@example.com")
    await page.click("form.stack button[type=submit]")
    assert page.url == env.url + "/ui/identities/e2e-user"
    assert await page.inner_text("#metric-requests b") == "0"
    assert await day_value(page, "chart-tokens") == 0
    assert "Policy pro" in await page.inner_text("#policy")
    await shot(page, "03-identity-created")

    # Traffic through the proxy, attributed by the identity header.
    async with openai.AsyncOpenAI(
        base_url=env.url + "/v1", api_key="sk-upstream", max_retries=0
    ) as client:
        for n in range(3):
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={"X-ORQ-IDENTITY-ID": "e2e-user", **tokens(1000 * (n + 1), 200)},
            )
        # Another identity, newer, from a body identity: fewer requests, a dearer model.
        clock.advance(1)
        await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_body={"identity": {"id": "big-spender", "display_name": "Big Spender"}},
            extra_headers=tokens(5000, 2000),
        )
    await env.settle()

    await page.reload()
    assert await page.inner_text("#metric-requests b") == "3"
    assert await day_value(page, "chart-tokens") == 6600  # 1000 + 2000 + 3000 in, 600 out
    assert await day_value(page, "chart-cost") > 0
    assert await day_value(page, "chart-models") == await day_value(page, "chart-cost")
    model_rows = page.locator("#models tr.model")
    assert await model_rows.count() == 1
    assert await model_rows.first.get_attribute("data-model") == "gpt-4o-mini"
    used = await page.inner_text('tr[data-limit="100/minute"] td.used')
    assert used == "3"
    await shot(page, "04-identity-after-traffic")

    await page.click("header >> text=Identities")
    assert await row_cell(page, "e2e-user", "requests") == "3"
    assert await row_cell(page, "e2e-user", "tokens") == "6,600"
    assert await row_cell(page, "e2e-user", "source") == "header"
    assert await row_cell(page, "big-spender", "source") == "body"
    names = page.locator("#identities tbody td.name > a")
    assert await names.all_inner_texts() == ["Big Spender", "End To End"]  # newest first
    await page.select_option("select[name=sort]", "requests")
    await page.click("form.toolbar button[type=submit]")
    assert page.url.endswith("/ui?q=&tag=&meta_key=&meta_value=&sort=requests")
    assert await names.all_inner_texts() == ["End To End", "Big Spender"]
    await page.select_option("select[name=sort]", "cost")
    await page.click("form.toolbar button[type=submit]")
    assert await names.all_inner_texts() == ["Big Spender", "End To End"]
    await shot(page, "05-list-by-cost")

    await page.click("header button:has-text('Sign out')")
    assert page.url == env.url + "/ui/login"
    await page.goto(env.url + "/ui")
    assert "/ui/login" in page.url
    assert offsite == []  # the pages load nothing from anywhere else
    await context.close()

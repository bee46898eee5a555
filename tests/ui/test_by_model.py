"""The dashboard by model and by metadata: the identity page's table and stacked cost chart,
and the list's metadata filter."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
import pytest

from sidecar import catalog
from sidecar.testing.serving import ApiClient
from sidecar.usage import buckets
from tests.support.clock import FakeClock

TODAY = "2026-11-18"  # the fake clock's day


def model_rows(page: str) -> dict[str, str]:
    return {
        html.unescape(model): row
        for model, row in re.findall(
            r'<tr class="model" data-model="([^"]*)">(.*?)</tr>', page, re.S
        )
    }


def chart_of(page: str) -> str:
    return page[
        page.index('id="chart-models"') : page.index("</svg>", page.index('id="chart-models"'))
    ]


async def count(api: ApiClient, external_id: str, by_model: dict[str, int], at: float) -> None:
    """Usage straight into the recorder: per model, that many nano-dollars (one request)."""
    identity_id = (await api.get(f"/v2/identities/{external_id}")).json()["_id"]
    recorder = api.app.services.recorder
    for model, nanos in by_model.items():
        counters = {"r": 1, "i": 10, "o": 5, "c": nanos, "sh": 1}
        recorder.add(identity_id, counters, source="header", external_id=external_id,
                     model=model, at=at)  # fmt: skip
    await recorder.drain()


async def test_the_identity_page_has_a_table_and_a_stacked_cost_chart_by_model(
    browser_client: httpx.AsyncClient, signed_in: str, api: ApiClient, clock: FakeClock
) -> None:
    assert (await api.post("/v2/identities", json={"external_id": "modeller"})).status_code == 201
    page = (await browser_client.get("/ui/identities/modeller")).text
    assert '<p id="models">No usage in the last 30 days.</p>' in page
    costs = {f"model-{n}": (n + 1) * 1_000_000 for n in range(7)}
    costs["<script>alert(1)</script>"] = 500_000
    await count(api, "modeller", costs, clock())
    await count(api, "modeller", {"model-6": 2_000_000}, clock() - 2 * buckets.DAY)
    await count(api, "modeller", {"ancient": 9_000_000}, clock() - 31 * buckets.DAY)
    page = (await browser_client.get("/ui/identities/modeller")).text
    assert "<script>alert(1)</script>" not in page
    rows = model_rows(page)
    # The most expensive first; the first five have a colour each, the rest share one; a day
    # out of the 30-day window is not shown.
    assert list(rows) == [f"model-{n}" for n in (6, 5, 4, 3, 2, 1, 0)] + [
        "<script>alert(1)</script>"
    ]
    swatches = [re.findall(r'class="swatch ([\w-]+)"', row) for row in rows.values()]
    assert swatches == [[css] for css in ["m0", "m1", "m2", "m3", "m4"] + ["m-rest"] * 3]
    six = rows["model-6"]
    assert '<td class="num requests">2</td>' in six and '<td class="num cost">$0.009</td>' in six
    total = sum(costs.values()) + 2_000_000
    assert f"{100 * 9_000_000 / total:.1f}%" in six
    svg = chart_of(page)
    days = dict(re.findall(r'data-day="([0-9-]+)" data-value="([0-9.]+)"', svg))
    assert len(days) == 30
    assert days[TODAY] == str(sum(costs.values()))
    assert days["2026-11-16"] == "2000000" and days["2026-11-17"] == "0"
    today = svg[
        svg.index(f'data-day="{TODAY}"') : svg.index("</g>", svg.index(f'data-day="{TODAY}"'))
    ]
    segments = re.findall(r'<rect class="([\w-]+)"[^>]*><title>([^<]*)</title>', today)
    assert [css for css, _ in segments] == ["m0", "m1", "m2", "m3", "m4", "m-rest"]
    assert segments[0][1] == "model-6: $0.007"
    assert segments[-1][1] == "other models: $0.0035"  # 2 + 1 + 0.5 thousandths


async def count_for(api: ApiClient, external_id: str, nanos: int) -> None:
    identity_id = (await api.get(f"/v2/identities/{external_id}")).json()["_id"]
    recorder = api.app.services.recorder
    recorder.add(
        identity_id, {"r": 1, "c": nanos, "sh": 1}, source="header", external_id=external_id
    )
    await recorder.drain()


def listed(page: str) -> list[str]:
    return re.findall(r'<td class="name"><a href="/ui/identities/([\w-]+)">', page)


def link(page: str, rel: str) -> str | None:
    found = re.search(rf'<a rel="{rel}" href="([^"]+)">', page)
    return html.unescape(found.group(1)) if found else None


@pytest.mark.parametrize("chunk", [2, 500])
async def test_the_list_filters_by_a_metadata_key_and_value(
    browser_client: httpx.AsyncClient,
    signed_in: str,
    api: ApiClient,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
) -> None:
    monkeypatch.setattr(catalog, "_META_CHUNK", chunk)  # 2: records read over several calls
    plans: dict[str, Any] = {
        "p1": "pro", "f1": "free", "n1": None, "p2": "pro", "t1": True, "f2": "free",
        "p3": "pro", "n2": None, "p4": "pro",
    }  # fmt: skip
    for n, (external_id, plan) in enumerate(plans.items()):
        clock.advance(1)
        body: dict[str, Any] = {"external_id": external_id}
        if plan is not None:
            body["metadata"] = {"plan": plan}
        assert (await api.post("/v2/identities", json=body)).status_code == 201
        await count_for(api, external_id, 1000 * (n + 1))
    pro = ["p4", "p3", "p2", "p1"]  # newest first

    async def names(**params: str) -> list[str]:
        r = await browser_client.get("/ui", params=params)
        assert r.status_code == 200, r.text
        return listed(r.text)

    assert await names(meta_key="plan", meta_value="pro") == pro
    assert await names(meta_key="plan", meta_value="true") == ["t1"]
    assert await names(meta_key="plan") == [x for x in reversed(plans) if plans[x] is not None]
    assert await names(meta_key="plan", meta_value="gold") == []
    assert await names(meta_key="plan", meta_value="pro", q="3") == ["p3"]
    assert await names(meta_key="plan", meta_value="pro", sort="cost") == pro  # later: more
    # Pages of a filtered list join up both ways, and keep the filter in their links.
    page = (
        await browser_client.get(
            "/ui", params={"meta_key": "plan", "meta_value": "pro", "limit": 3}
        )
    ).text
    assert listed(page) == pro[:3]
    nxt = link(page, "next")
    assert nxt and "meta_key=plan" in nxt and "meta_value=pro" in nxt
    page = (await browser_client.get(nxt)).text
    assert listed(page) == pro[3:] and link(page, "next") is None
    prev = link(page, "prev")
    assert prev
    assert listed((await browser_client.get(prev)).text) == pro[:3]
    for sort in ("cost", "requests"):
        params = {"meta_key": "plan", "meta_value": "free", "sort": sort, "limit": "1"}
        page = (await browser_client.get("/ui", params=params)).text
        assert listed(page) == ["f2"]
        nxt = link(page, "next")
        assert nxt
        assert listed((await browser_client.get(nxt)).text) == ["f1"]
    # An identity's page links each of its metadata values to the list of the same.
    page = (await browser_client.get("/ui/identities/t1")).text
    assert 'href="/ui?meta_key=plan&amp;meta_value=true">same</a>' in page
    # The form shows the filter it applied.
    page = (await browser_client.get("/ui", params={"meta_key": "plan", "meta_value": "pro"})).text
    assert 'name="meta_key" placeholder="plan" value="plan"' in page
    assert 'name="meta_value" placeholder="any" value="pro"' in page


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"meta_value": "pro"}, "meta_value needs a meta_key"),
        ({"meta_key": "k" * 65}, "meta_key: at most 64"),
        ({"meta_key": "plan", "meta_value": "a\tb"}, "meta_value: at most 512 printable"),
    ],
)
async def test_a_bad_metadata_filter_is_a_400_page(
    browser_client: httpx.AsyncClient, signed_in: str, params: dict[str, str], says: str
) -> None:
    r = await browser_client.get("/ui", params=params)
    assert r.status_code == 400
    assert says in html.unescape(r.text)

"""Identities with usage that ranks them, and the order the identity API lists them in."""

from __future__ import annotations

from typing import Any

from sidecar.testing.serving import ApiClient
from sidecar.usage.recorder import Recorder
from tests.support.clock import FakeClock

# external id -> counters added today; "early" usage lands 3 days ago, "ancient" 40 days ago.
TRAFFIC: dict[str, dict[str, int]] = {
    "a": {"r": 5, "c": 100},
    "b": {"r": 2, "e": 1, "c": 900},
    "c": {"r": 9, "e": 3, "c": 300},
    "d": {"r": 1, "e": 1, "c": 50},
    "e": {},
    "f": {},
}


def recorder_of(api: ApiClient) -> Recorder:
    recorder: Recorder = api.app.services.recorder
    return recorder


async def seed(api: ApiClient, clock: FakeClock) -> dict[str, str]:
    """Identities a-f (f newest), their usage written as the proxy writes it; a gets $10
    more three days ago, f $99 forty days ago (out of every ranking)."""
    ids = {}
    for name in TRAFFIC:
        clock.advance(1)
        r = await api.post("/v2/identities", json={"external_id": name, "tags": [f"t-{name}"]})
        ids[name] = r.json()["_id"]
    recorder = recorder_of(api)
    for name, counters in TRAFFIC.items():
        if counters:
            recorder.add(ids[name], counters, source="header", external_id=name)
    now = clock()
    recorder.add(
        ids["a"], {"r": 1, "c": 1000}, source="header", external_id="a", at=now - 3 * 86400
    )
    recorder.add(ids["f"], {"r": 1, "c": 99}, source="header", external_id="f", at=now - 40 * 86400)
    await recorder.drain()
    return ids


async def order(api: ApiClient, **params: Any) -> list[str]:
    r = await api.get("/v2/identities", params={"limit": 200, **params})
    assert r.status_code == 200, r.text
    return [i["external_id"] for i in r.json()["data"]]

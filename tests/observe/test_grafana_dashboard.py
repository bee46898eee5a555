"""docs/grafana/sidecar.json against a running sidecar: every metric its PromQL queries, every
label it selects or groups by and every label value it matches is in the live /metrics output
after some traffic, and every metric family /metrics exposes has a panel."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from sidecar.testing.otlp import OtlpReceiver
from tests.support.auth import ADMIN_TOKEN
from tests.support.env import MakeEnv
from tests.support.limits import policy_file
from tests.support.prometheus import canonical

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "sidecar.json"

_SELECTOR = re.compile(r"\b(sidecar_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')
_SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus when it scrapes
_PLAIN_ALTERNATIVES = re.compile(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*")


def panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in items:
        out.append(panel)
        out += panels(panel.get("panels", []))
    return out


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def expressions(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(board["panels"]) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def live_labels(text: str) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values it has, from the exposition text."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = canonical(line.rsplit(" ", 1)[0]).partition("{")
        found[name]  # a sample without labels still names its metric
        for label, value in _LABEL.findall(rest):
            found[name][label].add(value)
    return found


def test_the_dashboard_is_a_grafana_dashboard_on_a_prometheus_data_source() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    every = panels(board["panels"])
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in every:
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Every query follows the dashboard's job and instance pickers.
            for _, matchers in _SELECTOR.findall(target["expr"]):
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert set(variables) == {"datasource", "job", "instance"}


async def test_every_metric_and_label_the_dashboard_queries_is_exposed(
    otlp: OtlpReceiver, make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env(
        telemetry={"enabled": True, "endpoint": otlp.url + "/v1/traces"},
        **policy_file(tmp_path, '[[policy]]\nname = "one"\nrequests = ["1/minute"]\n'),
    )
    async with httpx.AsyncClient(base_url=env.url) as client:
        traffic = [
            ({**CHAT, "identity": {"id": "dash-body"}}, {}, 200),
            (CHAT, {"X-ORQ-IDENTITY-ID": "dash-header"}, 200),
            (CHAT, {"X-ORQ-IDENTITY-ID": "dash-header"}, 429),  # refused
            ({**CHAT, "model": "in-house-model"}, {"X-ORQ-IDENTITY-ID": "dash-3"}, 200),
            (CHAT, {"X-ORQ-IDENTITY-ID": "dash-4", "x-mock-status": "500"}, 500),
        ]
        for body, headers, status in traffic:
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == status, r.text
        report = {"request_id": "dash-r1", "identity": "dash-hook", "source": "api_key"}
        hook = {"x-sidecar-token": ADMIN_TOKEN}
        assert (await client.post("/hooks/usage", json=report, headers=hook)).status_code == 202
    await env.settle()
    text = (await env.api.get("/metrics")).text
    exposed = live_labels(text)
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))

    problems = []
    queried: set[str] = set()
    for expr in expressions(dashboard()):
        names = []
        for name, matchers in _SELECTOR.findall(expr):
            names.append(name)
            queried.add(name)
            if name not in exposed:
                problems.append(f"{name}: not in /metrics ({expr})")
                continue
            for label, op, value in _MATCHER.findall(matchers):
                if label in _SCRAPE_LABELS:
                    continue
                values = exposed[name].get(label)
                if values is None:
                    problems.append(f"{name}: no label {label}")
                elif op == "=" and value not in values:
                    problems.append(f"{name}: no {label}={value!r} (has {sorted(values)})")
                elif op == "=~" and _PLAIN_ALTERNATIVES.fullmatch(value):
                    missing = [v for v in value.split("|") if v not in values]
                    if missing:
                        problems.append(
                            f"{name}: no {label} value {missing} (has {sorted(values)})"
                        )
        for group in _BY.findall(expr):
            for label in (part.strip() for part in group.split(",") if part.strip()):
                if label in _SCRAPE_LABELS:
                    continue
                if not any(label in exposed.get(name, {}) for name in names):
                    problems.append(f"by ({label}): on none of {names} ({expr})")
    assert problems == []
    # And the other way: every metric family /metrics exposes has a panel.
    unshown = [f for f in families if not any(q.startswith(f) for q in queried)]
    assert unshown == []

"""The trust rules as properties: whatever the settings, caller, key and claim, a claim is
accepted exactly when docs/trust.md says so, and a refused one names its source."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.identity.resolve import (
    Caller,
    ClaimRefused,
    Grant,
    Source,
    Trust,
    key_digest,
    resolve,
)

HEADER = "X-ORQ-IDENTITY-ID"
KEY = "sk-listed-key"
ids = st.sampled_from(["acme-1", "acme-x", "globex-1", "owner", "Acme-1", "acme"])
globs = st.lists(st.sampled_from(["acme-*", "globex-?", "*", "owner", "[ag]*-1"]), max_size=3)


def expected(
    mode: str, networks: bool, peer_trusted: bool, grant: Grant | None, claimed: str
) -> bool:
    if peer_trusted:
        return True
    if mode == "keys":
        return grant is not None and (
            claimed == grant.owner or any(fnmatch.fnmatchcase(claimed, g) for g in grant.may_assert)
        )
    return not networks


@settings(max_examples=400, deadline=None)
@given(
    mode=st.sampled_from(["any", "keys"]),
    networks=st.booleans(),
    peer_trusted=st.booleans(),
    key=st.sampled_from([None, KEY, "sk-unlisted"]),
    may_assert=globs,
    claimed=ids,
    where=st.sampled_from(["body", "header", "user", "metadata.user_id", "none"]),
)
def test_a_claim_is_accepted_exactly_when_the_rules_say(
    mode: str,
    networks: bool,
    peer_trusted: bool,
    key: str | None,
    may_assert: list[str],
    claimed: str,
    where: str,
) -> None:
    peer_trusted = peer_trusted and networks  # a trusted peer needs trusted networks
    grants = {key_digest(KEY): Grant("owner", tuple(may_assert))}
    headers: dict[str, str] = {}
    body: dict[str, Any] = {"model": "m"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    params = {
        "body": "identity.id",
        "header": HEADER,
        "user": "user",
        "metadata.user_id": "metadata.user_id",
    }
    if where == "body":
        body["identity"] = {"id": claimed, "metadata": {"plan": "pro"}}
    elif where == "header":
        headers[HEADER.lower()] = claimed
    elif where == "user":
        body["user"] = claimed
    elif where == "metadata.user_id":
        body["metadata"] = {"user_id": claimed}
    grant = grants.get(key_digest(key)) if key is not None else None
    run: dict[str, Any] = {
        "header": HEADER,
        "grant_for": grants.get,
        "required": False,
        "trust": Trust(mode, networks),  # type: ignore[arg-type]
        "caller": Caller(peer_trusted, "10.0.0.9"),
        "user_fields": True,
    }
    if where == "none":
        found = resolve(body, headers, **run)
        assert found.source is (Source.API_KEY if grant is not None else Source.ANONYMOUS)
        return
    if expected(mode, networks, peer_trusted, grant, claimed):
        found = resolve(body, headers, **run)
        assert found.external_id == claimed
        assert found.owner == (grant.owner if grant is not None else None)
        assert found.creator == (f"key:{grant.owner}" if grant else "addr:10.0.0.9")
        if where == "body":
            assert found.profile is not None and found.profile.metadata == {"plan": "pro"}
    else:
        with pytest.raises(ClaimRefused) as refused:
            resolve(body, headers, **run)
        assert refused.value.param == params[where]
        assert refused.value.external_id == claimed
        # The body identity is cut out either way: it never reaches the upstream.
        assert "identity" not in body

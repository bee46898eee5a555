"""A process's Resolver keeps what it resolved: it answers exactly what `resolve` answers for
the same request, keys and aliases, re-checks every refusal, drops everything when the keys or
the aliases change, and stays bounded."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import (
    PARSED_BYTES,
    Caller,
    ClaimRefused,
    Grant,
    MissingIdentity,
    Resolved,
    Resolver,
    Trust,
    key_digest,
    resolve,
)

HEADER = "X-Identity"
GRANTS = {
    key_digest("sk-acme"): Grant("acme", ("acme-*",)),
    key_digest("sk-globex"): Grant("globex", ("globex-*",)),
}


def settings_for(
    aliases: dict[str, str], mode: str = "keys", required: bool = False
) -> dict[str, Any]:
    return {
        "header": HEADER,
        "grant_for": GRANTS.get,
        "required": required,
        "trust": Trust(mode),  # type: ignore[arg-type]
        "canonical": lambda external_id: aliases.get(external_id, external_id),
    }


def outcome(run: Any, *args: Any, **kwargs: Any) -> Resolved | tuple[str, str]:
    try:
        found: Resolved = run(*args, **kwargs)
        return found
    except (ClaimRefused, InvalidField) as exc:
        return (type(exc).__name__, exc.param)
    except MissingIdentity:
        return ("MissingIdentity", "")


claims = st.sampled_from(["acme-1", "acme-2", "globex-1", "bob", "acme", ""])
requests = st.tuples(
    st.sampled_from(["body", "header", "none", "bad-body"]),
    claims,
    st.sampled_from([None, "sk-acme", "sk-globex", "sk-unlisted"]),
    st.sampled_from(["10.0.0.1", "10.0.0.2"]),
    st.booleans(),  # the aliases change before this request
)


@settings(max_examples=200, deadline=None)
@given(
    sequence=st.lists(requests, min_size=1, max_size=30),
    mode=st.sampled_from(["any", "keys"]),
    required=st.booleans(),
)
def test_a_resolver_answers_what_resolve_answers(
    sequence: list[tuple[str, str, str | None, str, bool]], mode: str, required: bool
) -> None:
    aliases: dict[str, str] = {}
    generation = 0
    resolver = Resolver(**settings_for(aliases, mode, required))
    for where, claimed, key, peer, realias in sequence:
        if realias:  # acme-2 becomes an alias of bob, or stops being one
            generation += 1
            if aliases:
                aliases.clear()
            else:
                aliases["acme-2"] = "bob"
        headers: dict[str, str] = {}
        body: dict[str, Any] = {"model": "m"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        if where == "body":
            body["identity"] = {"id": claimed, "tags": ["t"]}
        elif where == "bad-body":
            body["identity"] = {"id": claimed, "email": "not an address"}
        elif where == "header":
            headers[HEADER.lower()] = claimed
        caller = Caller(False, peer)
        fresh_body = copy.deepcopy(body)
        kept = outcome(resolver.resolve, body, headers, caller, generation)
        expected = outcome(
            resolve, fresh_body, headers, caller=caller, **settings_for(aliases, mode, required)
        )
        assert kept == expected
        assert body == fresh_body  # the identity object is cut out either way


def body_of(identity: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "identity": identity}


def test_the_same_request_again_is_answered_from_what_was_kept() -> None:
    canonical_calls: list[str] = []

    def canonical(external_id: str) -> str:
        canonical_calls.append(external_id)
        return external_id

    resolver = Resolver(header=HEADER, grant_for=GRANTS.get, required=False, canonical=canonical)
    caller = Caller(False, "10.0.0.1")
    headers = {"authorization": "Bearer sk-acme"}
    first = resolver.resolve(body_of({"id": "ann", "tags": ["a"]}), headers, caller, 0)
    again = resolver.resolve(body_of({"id": "ann", "tags": ["a"]}), headers, caller, 0)
    assert again is first and canonical_calls == ["ann"]
    assert first.owner == "acme" and first.creator == "key:acme"
    # Another key, caller or object is resolved on its own.
    other_key = resolver.resolve(body_of({"id": "ann", "tags": ["a"]}), {}, caller, 0)
    assert other_key.owner is None and other_key.creator == "addr:10.0.0.1"
    other_peer = resolver.resolve(
        body_of({"id": "ann", "tags": ["a"]}), {}, Caller(False, "10.0.0.2"), 0
    )
    assert other_peer.creator == "addr:10.0.0.2"
    changed = resolver.resolve(body_of({"id": "ann", "tags": ["b"]}), headers, caller, 0)
    assert changed.profile is not None and changed.profile.tags == ["b"]
    assert len(resolver) == 4


def test_a_refused_claim_is_checked_every_time_and_never_kept() -> None:
    resolver = Resolver(header=HEADER, grant_for=GRANTS.get, required=False, trust=Trust("keys"))
    caller = Caller(False, "10.0.0.1")
    allowed = resolver.resolve(
        body_of({"id": "acme-1"}), {"authorization": "Bearer sk-acme"}, caller, 0
    )
    assert allowed.external_id == "acme-1"
    for _ in range(2):  # the same object with another key: refused, each time
        with pytest.raises(ClaimRefused):
            resolver.resolve(
                body_of({"id": "acme-1"}), {"authorization": "Bearer sk-globex"}, caller, 0
            )
        with pytest.raises(ClaimRefused):
            resolver.resolve({"model": "m"}, {HEADER.lower(): "acme-1"}, caller, 0)
    assert len(resolver) == 1


def test_a_new_token_drops_everything_kept() -> None:
    aliases: dict[str, str] = {}
    resolver = Resolver(**settings_for(aliases, mode="any"))
    caller = Caller(False, "10.0.0.1")
    assert resolver.resolve({}, {HEADER.lower(): "ann"}, caller, (0, 1)).external_id == "ann"
    aliases["ann"] = "anne"  # merged: the aliases' generation moves
    assert resolver.resolve({}, {HEADER.lower(): "ann"}, caller, (0, 1)).external_id == "ann"
    assert resolver.resolve({}, {HEADER.lower(): "ann"}, caller, (0, 2)).external_id == "anne"
    assert len(resolver) == 1


def test_what_is_kept_is_bounded() -> None:
    resolver = Resolver(header=HEADER, grant_for=GRANTS.get, required=False, max_entries=3)
    caller = Caller(False, "10.0.0.1")
    for n in range(3):
        resolver.resolve(body_of({"id": f"user-{n}"}), {}, caller, 0)
    assert len(resolver) == 3
    resolver.resolve(body_of({"id": "one-more"}), {}, caller, 0)
    assert len(resolver) == 1  # emptied when full, then kept
    long_id = "x" * (PARSED_BYTES + 1)
    with pytest.raises(InvalidField):  # too long an id: refused, and not kept either way
        resolver.resolve({}, {HEADER.lower(): long_id}, caller, 0)
    big = {"id": "big", "metadata": {f"k{n}": "v" * 500 for n in range(10)}}
    assert resolver.resolve(body_of(big), {}, caller, 0).external_id == "big"
    assert len(resolver) == 1  # over PARSED_BYTES: resolved, not kept

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.errors import Forbidden, InvalidRequest, Unauthorized
from sidecar.identity.aliases import Aliases
from sidecar.identity.caller import Networks
from sidecar.identity.model import InvalidField
from sidecar.identity.resolve import (
    KEY_HEADERS,
    AmbiguousKey,
    Caller,
    ClaimRefused,
    MissingIdentity,
    Resolved,
    Resolver,
    Trust,
)
from sidecar.quota.decision import Reserve
from sidecar.quota.live import LiveConfig
from sidecar.settings import IdentitySettings
from sidecar.usage import estimate
from sidecar.usage.extract import cost_from_header
from sidecar.usage.model import Kind, Usage
from sidecar.usage.pricing import Cost, Pricer

Clock = Callable[[], float]


class Attribution:
    """Who a request is for (the documented resolution order) and what its usage costs."""

    def __init__(
        self,
        config: IdentitySettings,
        live: LiveConfig,
        pricer: Pricer,
        aliases: Aliases,
        clock: Clock = time.time,
        default_output_reserve: int = 1024,
        *,
        find_opaque: bool = False,
    ) -> None:
        self.aliases = aliases
        self.default_output_reserve = default_output_reserve
        # Whether a reservation says if the request's input is opaque ([limits] opaque_input):
        # looked for only when it is used, as every limited request is reserved.
        self.find_opaque = find_opaque
        self.header = config.header
        # Named once per request at most: the key's and the identity header (asgi.lowered).
        self.single_headers = KEY_HEADERS | {config.header.lower()}
        self.networks = Networks(config.trusted_networks)
        self.trust = Trust(config.trust_mode, bool(self.networks))
        self.live = live
        self.pricer = pricer
        self.clock = clock
        self.resolver = Resolver(
            header=config.header,
            grant_for=live.grant,
            required=config.required,
            trust=self.trust,
            user_fields=config.user_fields,
            canonical=aliases.canonical,
        )

    def caller(self, peer: str | None, headers: Mapping[str, str]) -> Caller:
        if not self.networks:  # the common case: nothing to look up
            return Caller(False, peer or "unknown")
        forwarded = headers.get("x-forwarded-for")
        return Caller(self.networks.trusted(peer), self.networks.client(peer, forwarded))

    def resolve(
        self, body: dict[str, Any] | None, headers: Mapping[str, str], peer: str | None
    ) -> Resolved:
        """Removes the body identity; `peer` is the TCP peer's address. Raises InvalidRequest
        (400: a bad identity), Forbidden (403: a claim this caller may not make) or
        Unauthorized (401: no identity where one is required)."""
        try:
            # What is kept is kept while the listed keys and the aliases stay as they were.
            token = (self.live.generation, self.aliases.generation)
            return self.resolver.resolve(body, headers, self.caller(peer, headers), token)
        except InvalidField as exc:
            raise InvalidRequest(exc.message, param=exc.param, code="invalid_identity") from None
        except ClaimRefused as exc:
            raise Forbidden(
                f"this caller may not claim identity {exc.external_id!r} ({exc.param}): see "
                "the sidecar's [identity] trust settings",
                param=exc.param,
                code="identity_not_allowed",
            ) from None
        except AmbiguousKey as exc:
            raise InvalidRequest(
                f"this request carries two different API keys ({exc.param} and another "
                "header): send one",
                param=exc.param,
                code="ambiguous_api_key",
            ) from None
        except MissingIdentity:
            raise Unauthorized(
                "this sidecar requires an identity: send an `identity` object, the "
                f"{self.header} header or a known API key",
                code="identity_required",
            ) from None

    def reserve(self, kind: Kind | None, body: dict[str, Any], body_bytes: int) -> Reserve:
        """What the request may use at most (usage/estimate.py), priced at its model's rates."""
        input_tokens, output_tokens = estimate.tokens(
            kind, body, body_bytes, self.default_output_reserve
        )
        model = body.get("model")
        cost = self.cost(
            kind,
            model if isinstance(model, str) else None,
            Usage(input_tokens=input_tokens, output_tokens=output_tokens),
            None,
        )
        opaque = self.find_opaque and estimate.opaque(kind, body)
        if cost is None or not cost.priced:
            return Reserve(input_tokens + output_tokens, 0, priced=False, opaque=opaque)
        return Reserve(input_tokens + output_tokens, cost.nanos, opaque=opaque)

    def cost(
        self, kind: Kind | None, model: str | None, usage: Usage | None, header_cost: str | None
    ) -> Cost | None:
        if usage is None and header_cost is None:
            return None
        return self.pricer.cost(
            model=model,
            usage=usage or Usage(),
            kind=kind or Kind.CHAT,
            header_cost_nanos=cost_from_header(header_cost),
            at=self.clock(),
        )

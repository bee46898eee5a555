"""Who sent a request, as far as the network says: the TCP peer, whether it is trusted, and the
client address behind it (for the limits kept per client address)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Networks:
    """`[identity] trusted_networks`: peers whose identity claims are accepted, and whose
    `X-Forwarded-For` names the client behind them."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusted(self, address: str | None) -> bool:
        if not self.networks or not address:
            return False
        parsed = _address(address)
        return parsed is not None and any(parsed in n for n in self.networks)

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        """The address a request came from: its TCP peer, or, when that peer is trusted, the
        last address in `X-Forwarded-For` that is not (the hop nearest to us that a trusted
        proxy did not add itself). A client's own `X-Forwarded-For` counts for nothing unless
        a trusted proxy passed it on, and then only what the proxy appended."""
        address = peer or "unknown"
        if not forwarded_for or not self.trusted(address):
            return address
        for hop in reversed(forwarded_for.split(",")):
            hop = hop.strip()
            if not hop:
                continue
            if _address(hop) is None:
                return address  # a garbled chain: stop at the last proxy we trust
            address = hop
            if not self.trusted(hop):
                return hop
        return address

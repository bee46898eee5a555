from __future__ import annotations

import hashlib

# Every Redis key the sidecar writes is named here.
#
# Cluster layout: an identity's own keys (its record and its usage buckets) carry its ULID as
# the hash tag, so one Lua script can touch all of them. The global indexes share the `{idx}`
# tag, so the scripts that scan or update them run on one node. No key embeds a raw external id:
# the external-id index is keyed by a digest.


def xid_digest(external_id: str) -> str:
    return hashlib.sha256(external_id.encode("utf-8")).hexdigest()[:32]


class Keys:
    __slots__ = ("_p", "external_ids", "order", "search")

    def __init__(self, prefix: str) -> None:
        self._p = prefix
        self.external_ids = f"{prefix}:{{idx}}:xid"  # hash: digest of external id -> _id
        self.order = f"{prefix}:{{idx}}:order"  # sorted set, all scores 0: _ids in ULID order
        self.search = f"{prefix}:{{idx}}:text"  # hash: _id -> searchable text and tags

    def identity(self, identity_id: str) -> str:
        return f"{self._p}:id:{{{identity_id}}}"  # hash: the profile

    def tombstone(self, identity_id: str) -> str:
        return f"{self._p}:id:{{{identity_id}}}:gone"

    def usage_day(self, identity_id: str, day: str) -> str:
        return f"{self._p}:u:{{{identity_id}}}:d:{day}"  # hash: counters of one UTC day

    def usage_hour(self, identity_id: str, hour: str) -> str:
        return f"{self._p}:u:{{{identity_id}}}:h:{hour}"  # hash: counters of one UTC hour

    def usage_pattern(self, identity_id: str) -> str:
        return f"{self._p}:u:{{{identity_id}}}:*"

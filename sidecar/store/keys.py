from __future__ import annotations

import hashlib

# Every Redis key the sidecar writes is named here.
#
# Cluster layout: an identity's own keys (its record and its usage buckets) carry its ULID as
# the hash tag, so one Lua script can touch all of them. The global indexes share the `{idx}`
# tag, so the scripts that scan or update them run on one node. No key embeds a raw external id:
# the external-id index is keyed by a digest.
#
# Runtime budgets: their records and indexes share the `{budgets}` tag (written by one script
# each); a budget's limit buckets are keyed like an identity's, by its ULID (`limit`). Alerts,
# their durable outbox and the delivery log share the `{alerts}` tag, so that firing an alert
# and queueing its deliveries is one atomic step.


def xid_digest(external_id: str) -> str:
    return hashlib.sha256(external_id.encode("utf-8")).hexdigest()[:32]


class Keys:
    __slots__ = (
        "_p",
        "alias_generation",
        "aliases",
        "external_ids",
        "merge_lock",
        "merges_pending",
        "order",
        "search_build_lock",
        "search_ids",
        "search_late",
        "search_meta",
        "search_postings",
        "search_suffixes",
    )

    def __init__(self, prefix: str) -> None:
        self._p = prefix
        self.external_ids = f"{prefix}:{{idx}}:xid"  # hash: digest of external id -> _id
        # Sorted set, every score 0, so members sort by bytes: "<_id>\0<search text>", in ULID
        # (creation) order. The text rides along so that a search scan reads nothing else.
        self.order = f"{prefix}:{{idx}}:order"
        # The search index (sidecar/identity/ngram.py explains it), in the order set's slot so
        # that the scripts writing the order set keep it in the same step. Each identity has a
        # sequence number (`seq`, at the end of its order-set member).
        # Hash: state (building | ready), seq (numbers handed out), top / late (ms), count, ...
        self.search_meta = f"{prefix}:{{idx}}:s:meta"
        # Prefix, append the hex of a trigram (or "t" and a digest of a tag), ":" and a chunk
        # (seq // 65536): a string of the sorted 2-byte offsets (seq % 65536) of the
        # identities whose text has the trigram (or that have the tag).
        self.search_postings = f"{prefix}:{{idx}}:s:g:"
        # Append seq // 4096: a string of 4096 26-byte slots, the _id of each seq (zeros: none).
        self.search_ids = f"{prefix}:{{idx}}:s:id:"
        # Sorted set, scores 0: every trigram in use, reversed (the ones that end with two
        # given bytes are a range), for searches shorter than a trigram.
        self.search_suffixes = f"{prefix}:{{idx}}:s:dir"
        # Sorted set: the seqs of identities indexed far out of creation order (seq -> seq).
        self.search_late = f"{prefix}:{{idx}}:s:late"
        self.search_build_lock = f"{prefix}:{{idx}}:s:lock"  # string with a TTL: the builder
        # Merged identities (identity/merge.py). Hash: "x:<external id>" -> the survivor's _id,
        # the merged identity's _id and the survivor's external id (26 + 26 characters, then
        # the rest); "i:<merged _id>" -> the survivor's _id. The external-id hash maps each
        # alias's digest to the survivor too, in the same step.
        self.aliases = f"{prefix}:{{idx}}:alias"
        self.alias_generation = f"{prefix}:{{idx}}:alias:gen"  # string counter: bumped by changes
        self.merge_lock = f"{prefix}:{{idx}}:mg:lock"  # string with a TTL: the merge running
        self.merges_pending = f"{prefix}:{{idx}}:mg:pending"  # set: merged _ids not finished

    @property
    def search_index(self) -> list[str]:
        """The keys (and key prefixes) the scripts that write the order set pass on to
        identity/lua/ngram.lua, in its order."""
        return [
            self.search_meta,
            self.search_postings,
            self.search_ids,
            self.search_suffixes,
            self.search_late,
        ]

    def identity(self, identity_id: str) -> str:
        return f"{self._p}:id:{{{identity_id}}}"  # hash: the profile

    def aliases_of(self, identity_id: str) -> str:
        # Set: the aliases that name a survivor, in the {idx} slot ("i:<merged _id>" and
        # "x:<digest> <external id>"), so that a later merge or an erasure can rewrite them.
        return f"{self._p}:{{idx}}:al:{identity_id}"

    def merge_journal(self, merged_id: str) -> str:
        # Hash: one merge's plan and the steps it finished (identity/merge.py).
        return f"{self._p}:{{idx}}:mg:{merged_id}"

    def alias_names(self, identity_id: str) -> str:
        # Set, in the survivor's slot: the external ids merged into it (a profile write
        # through one of them updates the survivor's record).
        return f"{self._p}:al:{{{identity_id}}}"

    def merged_into(self, identity_id: str) -> str:
        # Hash, in the survivor's slot: "<merged _id>:<part>" for each part of a merged
        # identity's state already added here, so that a retried merge adds nothing twice.
        return f"{self._p}:mg:{{{identity_id}}}"

    def usage_days(self, identity_id: str) -> str:
        # Hash of daily counters, fields "<day>:<counter>" (days since the epoch, UTC): a
        # 30-day sum is one HMGET. The recorder trims days past the retention.
        return f"{self._p}:u:{{{identity_id}}}:d"

    def usage_models(self, identity_id: str) -> str:
        """Prefix of the by-model day hashes: append the day (days since the epoch, UTC)."""
        # Hash per UTC day: each model's slot and its counters (usage/buckets.py). Model
        # names stay in fields, never in key names.
        return f"{self._p}:u:{{{identity_id}}}:m:"

    def limit(self, identity_id: str, part: str) -> str:
        """Prefix of one limit's window buckets (append the bucket); see quota.policy."""
        return f"{self._p}:rl:{{{identity_id}}}:{part}:"  # string counters with a TTL

    def charge(self, token: str) -> str:
        # String: a charge with this token was made (quota/lua/adjust.lua); expires soon after
        # its retries end.
        return f"{self._p}:ch:{token}"

    def reservations(self, identity_id: str) -> str:
        # Hash: request id -> 'bucket amount ...' a token or cost limit reserved for it at
        # admission, replaced by the actual at completion (quota/lua/settle.lua).
        return f"{self._p}:rv:{{{identity_id}}}"

    def reservations_expiry(self, identity_id: str) -> str:
        # Sorted set: request id -> when its reservation is given back unsettled (ms).
        return f"{self._p}:rx:{{{identity_id}}}"

    def leases(self, identity_id: str) -> str:
        return f"{self._p}:cc:{{{identity_id}}}"  # sorted set: request id -> lease expiry (ms)

    def report_claim(self, request_id: str) -> str:
        # String with a TTL: the digest of the external id the first usage report of this
        # request id named (hook mode); one naming another is refused. Not an identity's key:
        # a report must find it from its request id alone.
        digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:32]
        return f"{self._p}:rc:{digest}"

    def request(self, identity_id: str, request_id: str) -> str:
        # String with a TTL: a usage report with this request id was counted.
        digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:32]
        return f"{self._p}:rq:{{{identity_id}}}:{digest}"

    def usage_hours(self, identity_id: str) -> str:
        """Prefix of the hour buckets: append the hour number."""
        return f"{self._p}:u:{{{identity_id}}}:h:"  # hash per UTC hour: counters

    def top(self, counter: str, day: int) -> str:
        # Sorted set: _id -> one counter's total (requests, errors or nano-dollars) on one UTC
        # day, so that the list can be ranked without reading every identity. Advisory: it
        # orders, the identity's own counters are what is shown.
        return f"{self._p}:{{idx}}:top:{counter}:{day}"

    def ranking(self, sort: str, day: int) -> str:
        # Sorted set, kept a minute: _id -> 30-day score ending on `day` (the union of `top`).
        return f"{self._p}:{{idx}}:rank:{sort}:{day}"

    def admission(self, request_id: str) -> str:
        # String with a TTL (a concurrency lease's): whom a hook-mode admission counted against
        # beyond the identity, read when its usage report comes.
        digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:32]
        return f"{self._p}:adm:{digest}"

    def created(self, creator: str, minute: int) -> str:
        # String with a TTL: identities one creator (a key owner or a client address) made in
        # one minute. In the {idx} slot, beside the external-id index the creation writes.
        digest = hashlib.sha256(creator.encode("utf-8")).hexdigest()[:32]
        return f"{self._p}:{{idx}}:new:{digest}:{minute}"

    def failed_signins(self, client: str) -> str:
        # Hash with a TTL: failed admin sign-ins from one client address in the current window
        # (see quota.signins). Keyed by a digest: an address may hold ':' and brackets.
        digest = hashlib.sha256(client.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return f"{self._p}:fa:{digest}"

    def ui_session(self, digest: str) -> str:
        # String with a TTL: a dashboard session is signed in (keyed by a digest of its id).
        return f"{self._p}:ui:{digest}"

    # -- runtime budgets -----------------------------------------------------------------------

    @property
    def budgets(self) -> str:
        # Sorted set, every score 0: budget _ids, so in ULID (creation) order.
        return f"{self._p}:{{budgets}}:all"

    def budget(self, budget_id: str) -> str:
        return f"{self._p}:{{budgets}}:b:{budget_id}"  # string: the budget as JSON

    def budget_kind(self, kind: str) -> str:
        return f"{self._p}:{{budgets}}:k:{kind}"  # sorted set as `budgets`, of one scope kind

    def budget_scope(self, kind: str, target: str) -> str:
        # Sorted set as `budgets`, of one scope (kind and target; the target by its digest).
        return f"{self._p}:{{budgets}}:s:{kind}:{xid_digest(target)}"

    @property
    def budget_arms(self) -> str:
        # Hash: _id -> how often its alerts were re-armed (a reset, a changed amount).
        return f"{self._p}:{{budgets}}:arm"

    @property
    def budget_resets(self) -> str:
        # Hash: _id -> how often it was reset (each process ends the quota it held ahead for
        # the buckets a reset emptied when it sees this move).
        return f"{self._p}:{{budgets}}:reset"

    @property
    def budget_generation(self) -> str:
        return f"{self._p}:{{budgets}}:gen"  # string counter: bumped by every change

    def alert_fired(self, budget_id: str, threshold: int, period: str, arm: int) -> str:
        # String with a TTL (the period's end, plus a day): this threshold of this budget fired
        # in this period since its alerts were last re-armed. Set NX by whoever fires it.
        return f"{self._p}:{{alerts}}:f:{budget_id}:{threshold}:{period}:{arm}"

    @property
    def alert_outbox(self) -> str:
        return f"{self._p}:{{alerts}}:outbox"  # sorted set: delivery id -> when due (ms)

    def alert_delivery(self, delivery_id: str) -> str:
        # Hash: one alert's delivery to one notifier (body, state, attempts); expires 30 days
        # after it is delivered or given up.
        return f"{self._p}:{{alerts}}:d:{delivery_id}"

    def alert_log(self, budget_id: str) -> str:
        return f"{self._p}:{{alerts}}:log:{budget_id}"  # list: delivery ids, newest first

    @property
    def alert_sender(self) -> str:
        # String with a TTL: the lease of the one process that sends deliveries (its token).
        return f"{self._p}:{{alerts}}:sender"

    @property
    def alert_last(self) -> str:
        # Hash: budget _id -> the external id of the last request checked against it.
        return f"{self._p}:{{alerts}}:last"

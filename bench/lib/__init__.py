"""The benchmark harness's library; the `bench/*_bench.py` entry points parse their flags and
call it.

- processes: start and stop the mock upstream, nginx, the bare pass-through, redis-servers and
  the sidecar; wait for their ports; stop all on any failure (`Launcher`)
- config:    the sidecar's config for a run
- payloads:  bench identities, request bodies and scenarios
- client:    the Python keep-alive client: sequential latency and streams, targets interleaved
- wrk:       running wrk and its Lua script, parsing its output, saturating a target
- sampling:  RSS and CPU from /proc, Redis memory
- report:    percentiles, medians and spreads over repeats, ratios to the references of the
             same run, the printed table and the JSON written to bench/out/
- meta:      date, commit, machine and tool versions of a run
- cli:       the flags and the `main` every entry point shares
- proxy, proxy_report, rounds, flood, identity: what the entry points measure
"""

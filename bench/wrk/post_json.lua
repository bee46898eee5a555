-- POST JSON bodies for wrk, cycling through a pre-built set of requests.
--
--   WRK_BODIES=bodies.jsonl WRK_API_KEY=sk-... \
--     wrk -t2 -c64 -d10s --latency -s bench/wrk/post_json.lua http://127.0.0.1:8080/v1/chat/completions
--
-- WRK_BODIES names a file with one JSON body per line (the harness writes it, bench/lib: the same
-- chat completion, one line per bench identity). Without it a single built-in chat body is sent.
-- WRK_API_KEY, when set, is sent as `Authorization: Bearer <key>`.
-- WRK_HEADERS, when set, names a file of extra headers, one line per request, each line
-- `Name: value` pairs separated by tabs (bench/hooks_bench.py: an identity header per line);
-- bodies and header lines are cycled side by side.
--
-- Requests are formatted once per thread in init(); request() only picks the next one, so the
-- per-request cost in wrk stays the same whatever the target.
-- done() prints one line starting with "WRK_JSON " holding the exact figures (microseconds), so
-- the harness need not parse the rounded human-readable report.

local default_body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],'
  .. '"max_tokens":64}'

local function load_lines(variable)
  local lines = {}
  local name = os.getenv(variable)
  if name and name ~= "" then
    local file = assert(io.open(name, "r"))
    for line in file:lines() do
      if line ~= "" then
        lines[#lines + 1] = line
      end
    end
    file:close()
  end
  return lines
end

local function header_sets()
  local sets = {}
  for i, line in ipairs(load_lines("WRK_HEADERS")) do
    local set = {}
    for pair in line:gmatch("[^\t]+") do
      local name, value = pair:match("^([^:]+):%s*(.*)$")
      if name then
        set[name] = value
      end
    end
    sets[i] = set
  end
  if #sets == 0 then
    sets[1] = {}
  end
  return sets
end

local requests = {}
local count = 0
local index = 0
local started = 0

-- Runs in the setup environment, once per thread before any starts: number the threads.
function setup(thread)
  thread:set("thread_number", started)
  started = started + 1
end

function init(args)
  local key = os.getenv("WRK_API_KEY")
  local bodies = load_lines("WRK_BODIES")
  if #bodies == 0 then
    bodies[1] = default_body
  end
  local sets = header_sets()
  for i = 1, math.max(#bodies, #sets) do
    local headers = { ["Content-Type"] = "application/json" }
    if key and key ~= "" then
      headers["Authorization"] = "Bearer " .. key
    end
    for name, value in pairs(sets[(i - 1) % #sets + 1]) do
      headers[name] = value
    end
    requests[i] = wrk.format("POST", wrk.path, headers, bodies[(i - 1) % #bodies + 1])
  end
  count = #requests
  -- Threads start at different offsets so they do not send the same identity in lockstep.
  index = ((thread_number or 0) * 37) % count
end

function request()
  index = index % count + 1
  return requests[index]
end

function done(summary, latency, requests_stats)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end

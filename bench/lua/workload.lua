-- wrk script for `make bench` (mcpguard-bench writes the request list and runs wrk).
--   wrk ... -s workload.lua URL -- <request list>
-- Each line of the list is one POST: path TAB bearer token (may be empty) TAB body,
-- then optionally TAB an Mcp-Session-Id (the gateway URL's sessions).
-- Requests are formatted once, in `init`; each thread then cycles through the whole
-- list from its own offset, so no two threads march in step over the same tokens.
-- `done` prints one machine-readable line, `BENCH_JSON {...}`, with latencies in us.

local reqs = {}
local pos = 1
local threads = 0

function setup(thread)
   thread:set("thread_id", threads)
   threads = threads + 1
end

function init(args)
   local list = args[1]
   -- Set by mcpguard-bench for runs against the check port, as Envoy adds it.
   local check_secret = os.getenv("BENCH_CHECK_SECRET")
   for line in io.lines(list) do
      local path, token, body, session = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t?([^\t]*)$")
      if path then
         local headers = {
            ["Content-Type"] = "application/json",
            ["Accept"] = "application/json, text/event-stream",
         }
         if token ~= "" then
            headers["Authorization"] = "Bearer " .. token
         end
         if session ~= "" then
            headers["Mcp-Session-Id"] = session
         end
         if check_secret then
            headers["x-mcpguard-check-secret"] = check_secret
         end
         reqs[#reqs + 1] = wrk.format("POST", path, headers, body)
      end
   end
   if #reqs == 0 then
      error("no requests in " .. tostring(list))
   end
   pos = ((thread_id or 0) * 7919) % #reqs + 1
end

function request()
   local r = reqs[pos]
   pos = pos % #reqs + 1
   return r
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end

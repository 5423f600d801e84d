-- wrk script: POST /api/v1/presence/heartbeat round-robin over users 1..USERS, device "lg-<i>"
-- with i = userId - 1, as put online by `presence-loadgen http|compare` (user-base 1).
-- Usage: USERS=10000 wrk -t2 -c64 -d10s -s docs/wrk-heartbeat.lua http://127.0.0.1:18080
local users = tonumber(os.getenv("USERS") or "10000")
local counter = 0
local threads = {}

function setup(thread)
  thread:set("offset", #threads)
  table.insert(threads, thread)
end

function init(args)
  counter = offset or 0
end

wrk.method = "POST"
wrk.path = "/api/v1/presence/heartbeat"
wrk.headers["Content-Type"] = "application/json"

function request()
  local i = counter % users
  counter = counter + 2
  local body = string.format('{"userId":%d,"deviceId":"lg-%d","active":true}', i + 1, i)
  return wrk.format(nil, nil, nil, body)
end


function done(summary, latency, requests)
  io.write(string.format("non-2xx/3xx: %d\n", summary.errors.status))
end

-- wrk script for load/compare.sh: every request creates a payment under a key no request used
-- before, so every server compared does a full first execution each time and none can answer
-- from a replay cache.
--
--   COMPARE_AUTH="Bearer sk_test_demo" wrk -t1 -c64 -d10s --latency \
--       -s load/create_payment.lua http://127.0.0.1:8080
--
-- Environment:
--   COMPARE_AUTH        the whole Authorization header value; unset or empty sends none
--   COMPARE_KEY_PREFIX  starts every key, so runs against one database never collide
--                       (default: the wall-clock second the script was loaded)

local authorization = os.getenv("COMPARE_AUTH") or ""
local key_prefix = os.getenv("COMPARE_KEY_PREFIX") or ("cmp" .. os.time())
local payment = '{"amount":2500,"currency":"EUR","customer_id":"cus_compare"}'

-- The main state's handles on every thread, so that `done` can add up their counters.
local thread_handles = {}

function setup(thread)
   local index = #thread_handles + 1
   thread:set("thread_index", index)
   thread_handles[index] = thread
end

-- Below, per thread. The counters are globals because thread:get reads only globals.
created = 0
not_created = 0
local sequence = 0
local headers = { ["Content-Type"] = "application/json" }
if authorization ~= "" then
   headers["Authorization"] = authorization
end

function request()
   sequence = sequence + 1
   headers["Idempotency-Key"] = string.format("%s-t%d-%d", key_prefix, thread_index, sequence)
   return wrk.format("POST", "/v1/payments", headers, payment)
end

function response(status, _, _)
   if status == 201 then
      created = created + 1
   else
      not_created = not_created + 1
   end
end

function done(_, _, _)
   local total_created, total_not_created = 0, 0
   for _, thread in ipairs(thread_handles) do
      total_created = total_created + thread:get("created")
      total_not_created = total_not_created + thread:get("not_created")
   end
   io.write(string.format("created (201): %d\nnot created: %d\n", total_created, total_not_created))
end

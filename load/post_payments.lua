-- wrk script: POST /v1/payments with a fresh Idempotency-Key on every request, so that every
-- request is a first execution (a claim, a payment, a reward credit and a completion).
--
--   wrk -t1 -c16 -d10s --latency -s load/post_payments.lua http://127.0.0.1:8080
--
-- Environment: ONCEPAY_LOAD_API_KEY (default sk_test_acme) and ONCEPAY_LOAD_KEY_PREFIX, which
-- keeps keys of several wrk processes against one database apart (default: the start time).

local api_key = os.getenv("ONCEPAY_LOAD_API_KEY") or "sk_test_acme"
local prefix = os.getenv("ONCEPAY_LOAD_KEY_PREFIX") or tostring(os.time())

-- Every thread of this wrk process, so `done` can collect their counts.
local threads = {}
local next_thread_id = 1

function setup(thread)
   thread:set("thread_id", next_thread_id)
   next_thread_id = next_thread_id + 1
   table.insert(threads, thread)
end

-- Per-thread state: each thread runs its own copy of this script. `unexpected` is global so
-- that `done` can read it with thread:get.
local sent = 0
unexpected = 0
local body = '{"amount": 1250, "currency": "EUR", "customer_id": "cus_load"}'

function request()
   sent = sent + 1
   local key = string.format("%s-%d-%d", prefix, thread_id, sent)
   local headers = {
      ["Authorization"] = "Bearer " .. api_key,
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = key,
   }
   return wrk.format("POST", "/v1/payments", headers, body)
end

function response(status, headers, response_body)
   if status ~= 201 then
      unexpected = unexpected + 1
   end
end

function done(summary, latency, requests)
   local total = 0
   for _, thread in ipairs(threads) do
      total = total + (thread:get("unexpected") or 0)
   end
   io.write(string.format("non-201 responses: %d\n", total))
end

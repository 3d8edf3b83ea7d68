-- wrk script for the `single` scenario of loadtests/bench.py: one journal per POST /ledger/post.
--
-- usage: wrk -t2 -c256 -d30s --latency -s loadtests/single.lua http://127.0.0.1:PORT/ledger/post \
--            -- ACCOUNTS RUN_ID TOKEN [PAIRS_FILE]
--
-- PAIRS_FILE (optional) lists "debit_account credit_account" per line; bench.py writes it so a
-- scenario controls whether journals stay on one shard or span two.
--
-- Each request carries a unique journal_id "s-<run>-<thread>-<counter>". Bodies are assembled from a
-- per-thread pool of pre-formatted entry suffixes built in init(), so request() only concatenates.
-- response() counts non-2xx statuses and 2xx bodies without `"ok": true`; done() prints one
-- machine-readable line starting with LEDGER_WRK that bench.py parses.

local threads = {}
local thread_count = 0

function setup(thread)
   thread_count = thread_count + 1
   thread:set("tid", thread_count)
   table.insert(threads, thread)
end

local POOL = 4096
local counter = 0
local prefix = ""
local suffixes = {}
local req_headers = {}

-- globals (read from the main state through thread:get in done())
non2xx = 0
notok = 0
responses = 0

local pairs_list = {}

local function load_pairs(path)
   -- one "debit_account credit_account" pair per line, written by bench.py
   local file = io.open(path, "r")
   if file == nil then return end
   for line in file:lines() do
      local debit, credit = line:match("^(%S+)%s+(%S+)$")
      if debit then table.insert(pairs_list, {debit, credit}) end
   end
   file:close()
end

local function entry_suffix(accounts)
   local debit, credit
   if #pairs_list > 0 then
      local pair = pairs_list[math.random(1, #pairs_list)]
      debit, credit = pair[1], pair[2]
   else
      debit = "asset:acct-" .. math.random(1, accounts)
      credit = "liability:acct-" .. math.random(1, accounts)
   end
   local amount = math.random(1, 10000)
   return string.format(
      '","entries":[' ..
      '{"account_id":"%s","side":"debit","amount_cents":%d,"currency":"USD"},' ..
      '{"account_id":"%s","side":"credit","amount_cents":%d,"currency":"USD"}],' ..
      '"context":{"source":"bench"}}',
      debit, amount, credit, amount)
end

function init(args)
   local accounts = tonumber(args[1]) or 10000
   local run_id = args[2] or "run"
   local token = args[3] or "benchtoken"
   if args[4] then load_pairs(args[4]) end
   req_headers = {
      ["Authorization"] = "Bearer " .. token,
      ["Content-Type"] = "application/json",
   }
   math.randomseed((tid or 0) * 7919 + os.time())
   for i = 1, POOL do
      suffixes[i] = entry_suffix(accounts)
   end
   prefix = '{"journal_id":"s-' .. run_id .. '-' .. tostring(tid or 0) .. '-'
end

function request()
   counter = counter + 1
   local body = prefix .. string.format("%d", counter) .. suffixes[(counter % POOL) + 1]
   return wrk.format("POST", nil, req_headers, body)
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   elseif not string.find(body, '"ok"%s*:%s*true') then
      notok = notok + 1
   end
end

function done(summary, latency, requests)
   local n2, nok, resp = 0, 0, 0
   for _, t in ipairs(threads) do
      n2 = n2 + (t:get("non2xx") or 0)
      nok = nok + (t:get("notok") or 0)
      resp = resp + (t:get("responses") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'LEDGER_WRK {"requests":%d,"duration_us":%d,"bytes":%d,"responses":%d,"non2xx":%d,"notok":%d,' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
      summary.requests, summary.duration, summary.bytes, resp, n2, nok,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      e.connect, e.read, e.write, e.status, e.timeout))
end

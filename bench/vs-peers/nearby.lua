-- wrk script: GET /v1/drivers/nearby (nearest 10 within 5 km) at one of NPOINTS query
-- points chosen at random: point i of the Kronecker sequence over the box that knn.sql
-- asks PostGIS: lat0 + u(i·0.618…)·dlat, lng0 + u(i·0.414…)·dlng with u(x) = x − round(x) + 0.5
-- (pgbench's int() rounds; for x ≥ 0 never exactly halfway, round(x) = floor(x + 0.5)).
--   wrk -s nearby.lua http://127.0.0.1:PORT -- TOKEN NPOINTS LAT0 DLAT LNG0 DLNG
local token, n, lat0, dlat, lng0, dlng
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end

function init(args)
  token, n = args[1], tonumber(args[2])
  lat0, dlat, lng0, dlng = tonumber(args[3]), tonumber(args[4]), tonumber(args[5]), tonumber(args[6])
  if not (token and n and lat0 and dlat and lng0 and dlng) then
    error("usage: wrk -s nearby.lua URL -- TOKEN NPOINTS LAT0 DLAT LNG0 DLNG")
  end
  math.randomseed(seed or 1)
end

local function u(x)
  return x - math.floor(x + 0.5) + 0.5
end

function request()
  local i = math.random(0, n - 1)
  local lat = lat0 + u(i * 0.6180339887498949) * dlat
  local lng = lng0 + u(i * 0.4142135623730951) * dlng
  local path = string.format("/v1/drivers/nearby?lat=%.7f&lng=%.7f&radius_m=5000&limit=10", lat, lng)
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. token })
end

-- Nearest 10 within 5 km by PostGIS's index KNN over the GiST index, as pgbench runs it:
--   pgbench -M prepared -f knn.sql -D npoints=… -D lat0=… -D dlat=… -D lng0=… -D dlng=…
-- Each transaction asks one of `npoints` query points, chosen at random: point i of a
-- Kronecker sequence over the box, lat0 + u(i·0.618…)·dlat, lng0 + u(i·0.414…)·dlng with
-- u(x) = x − round(x) + 0.5 in [0, 1) (pgbench's int() rounds), the set nearby.lua asks
-- dispatchd. vs-peers prepares the SELECT below too (with $1, $2
-- for :lat, :lng), so both measure one statement. geom is in UTM zone 18N (metres): see
-- README.md for why not geography.
\set i random(0, :npoints - 1)
\set lat :lat0 + (:i * 0.6180339887498949 - int(:i * 0.6180339887498949) + 0.5) * :dlat
\set lng :lng0 + (:i * 0.4142135623730951 - int(:i * 0.4142135623730951) + 0.5) * :dlng
SELECT id FROM drivers WHERE ST_DWithin(geom, ST_Transform(ST_SetSRID(ST_MakePoint(:lng, :lat), 4326), 32618), 5000) ORDER BY geom <-> ST_Transform(ST_SetSRID(ST_MakePoint(:lng, :lat), 4326), 32618) LIMIT 10;

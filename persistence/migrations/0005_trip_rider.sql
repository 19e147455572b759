-- dispatchd store schema 5: live trips by rider (issue 16, docs/sharding.md §3/§4).
--
-- A trip lives on its pickup's shard, its rider on the rider's entity shard, and since
-- trips spawn on the pickup's owner the two are often on different nodes. The node that
-- claims a rider shard must give each rider its active trip, wherever that trip runs, so
-- the live trips naming a set of riders are found by column, as migration 4 did for
-- drivers.
--   `rider`: the trip's rider, written with every trip write (as `driver` and `live`).
--            NULL on rows written before this schema: "not known", so the live-trips-by-
--            rider query returns the live ones too (and those whose `live` is not known)
--            and dispatchd decides after decoding; the trip's next write fills it in.
-- Indexed for `WHERE live AND rider = ANY($1)` only (a partial index: final trips, the
-- bulk of the table, are not in it). The same index serves `WHERE live AND rider IS NULL`
-- (a btree keeps NULLs), the rows from before.
ALTER TABLE trips ADD COLUMN rider text;
CREATE INDEX trips_live_rider ON trips (rider) WHERE live;

-- dispatchd store schema 4: storage by shard (issue 16, stage 2 of docs/sharding.md).
--
-- `shard` on every table a write lands in: the shard the write named
-- (`Batch::in_shard`), so the node that claims a shard reads exactly its records
-- (`Store::load_shard`, `WHERE shard = $1 ORDER BY k`, paged by key: hence the index on
-- (shard, k)). Rows written before this schema were written by the one node or leader
-- of the whole city, so they get WHOLE_CITY (0).
--
-- On `trips`, what a driver shard's recovery needs (a driver's status is reconciled
-- from the live trips that name it, docs/sharding.md §3): the trips live on the pickup's
-- shard, the driver on its own, so the trips naming a set of drivers are found by
-- column, not by shard.
--   `driver`: the driver the trip names: its assigned driver, else the driver of its
--             open offer (the engine never has both), else NULL.
--   `live`:   the trip is not final. NULL on rows written before this schema (their
--             state is inside the codec record, which SQL cannot read): "not known",
--             so the live-trips query returns them too and dispatchd decides after
--             decoding; the trip's next write sets both columns.
-- Indexed for `WHERE live AND driver = ANY($1)` only (a partial index: final trips, the
-- bulk of the table, are not in it), plus the not-yet-known rows.
ALTER TABLE drivers  ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE riders   ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE trips    ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE journal  ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE quotes   ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE meta     ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger   ADD COLUMN shard bigint NOT NULL DEFAULT 0;
ALTER TABLE provider ADD COLUMN shard bigint NOT NULL DEFAULT 0;
CREATE INDEX drivers_shard  ON drivers  (shard, k);
CREATE INDEX riders_shard   ON riders   (shard, k);
CREATE INDEX trips_shard    ON trips    (shard, k);
CREATE INDEX journal_shard  ON journal  (shard, k);
CREATE INDEX quotes_shard   ON quotes   (shard, k);
CREATE INDEX meta_shard     ON meta     (shard, k);
CREATE INDEX ledger_shard   ON ledger   (shard, k);
CREATE INDEX provider_shard ON provider (shard, k);
ALTER TABLE trips ADD COLUMN driver text;
ALTER TABLE trips ADD COLUMN live boolean;
CREATE INDEX trips_live_driver ON trips (driver) WHERE live;
CREATE INDEX trips_live_unknown ON trips (k) WHERE live IS NULL;

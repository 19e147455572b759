-- dispatchd store schema 3: a shard is an H3 cell index at the shard resolution (issue
-- 16, docs/sharding.md), a 64-bit number; shard 0 (the whole city, today's one shard)
-- keeps its row and epoch.
ALTER TABLE dispatch_leases ALTER COLUMN shard TYPE bigint;

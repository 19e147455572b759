-- dispatchd store schema 1: one table per sled tree, keyed by the same bytes.
-- Values are codec records (schema version, CRC-32, bincode), read and checked by
-- dispatchd; `ver` is the trip version for `trips` (0 elsewhere): an upsert never
-- replaces a newer trip with an older one, so a retried commit is idempotent.
CREATE TABLE drivers  (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE riders   (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE trips    (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE journal  (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE quotes   (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE meta     (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE ledger   (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);
CREATE TABLE provider (k bytea PRIMARY KEY, v bytea NOT NULL, ver bigint NOT NULL DEFAULT 0);

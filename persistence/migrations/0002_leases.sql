-- dispatchd store schema 2: shard leases (issue 16). One row per shard; `epoch` is the
-- fencing token, raised by every new claim; `expires_at` is by the database's clock,
-- the only clock every node shares. A commit under a fence locks its shard's row
-- FOR SHARE and checks holder, epoch and expiry, so a claim (which must lock the row
-- to raise the epoch) waits for it: a write lands before the next owner's claim, or
-- not at all.
CREATE TABLE dispatch_leases (
    shard      integer     PRIMARY KEY,
    epoch      bigint      NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    claimed_at timestamptz NOT NULL
);

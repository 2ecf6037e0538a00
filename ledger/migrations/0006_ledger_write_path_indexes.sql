-- Indexes of the ledger's hot table, sized to the write path: PostgreSQL
-- maintains every index of usage_entries for every row the ledger ingests.
--
-- usage_entries_tenant_idx (a text btree on tenant_id) took about a quarter of
-- the server's time per ingested row and served no query: per-tenant reads go
-- to the DuckDB copy (ledger/analytics) or sum billing_entries by account
-- (billing_entries_account_idx); ledger/reports.py groups the whole table.
DROP INDEX IF EXISTS ledger.usage_entries_tenant_idx;

-- An entry is reversed at most once, now enforced by the database, and
-- reverse_usage finds existing reversals through these instead of scanning.
-- Partial: ordinary rows (reverses_id NULL) never enter them, so ingest does
-- not pay for them.
CREATE UNIQUE INDEX usage_entries_reverses_uq ON ledger.usage_entries (reverses_id)
  WHERE reverses_id IS NOT NULL;
CREATE UNIQUE INDEX billing_entries_reverses_uq ON ledger.billing_entries (reverses_id)
  WHERE reverses_id IS NOT NULL;

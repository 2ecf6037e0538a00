-- No planner statistics for columns that no query filters or joins on.
--
-- ANALYZE of control.allocations spent most of its time on the assignments
-- jsonb (comparing and sorting sampled documents for statistics nothing uses):
-- 228-254 ms at 44,000 rows on the development machine, against 72-99 ms
-- without the statistics of these three columns. Autovacuum runs that ANALYZE
-- as the table grows, in one burst on one core, and on a small machine
-- placements queue behind it. The outbox payload is opaque bytes in the same way.
--
-- The one query that tests assignments (a node's orphans at registration,
-- `assignments @> …`) is driven by the state index and the node's few rows;
-- without statistics its estimate falls back to the default, which changes
-- nothing there.
ALTER TABLE control.allocations
  ALTER COLUMN assignments SET STATISTICS 0,
  ALTER COLUMN request SET STATISTICS 0,
  ALTER COLUMN request_hash SET STATISTICS 0;
ALTER TABLE control.outbox
  ALTER COLUMN payload SET STATISTICS 0;

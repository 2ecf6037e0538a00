-- Periodic capacity snapshots written by the control plane through
-- ledger.capacity.record_samples(): one row per GPU model per sample time.
-- Append-only; read by the DuckDB analytics (stranded capacity, utilization,
-- days until exhaustion).
CREATE TABLE ledger.capacity_samples (
  id               bigserial PRIMARY KEY,
  at               timestamptz NOT NULL,
  gpu_model        text NOT NULL,
  total_gpus       integer NOT NULL CHECK (total_gpus >= 0),
  healthy_gpus     integer NOT NULL CHECK (healthy_gpus >= 0),
  allocated_milli  bigint NOT NULL CHECK (allocated_milli >= 0),  -- Σ milli-GPUs held by allocations
  free_milli       bigint NOT NULL CHECK (free_milli >= 0),       -- Σ free milli-GPUs on schedulable GPUs
  stranded_milli   bigint NOT NULL CHECK (stranded_milli >= 0),   -- free milli on partly used GPUs (fragments)
  queue_depth      integer NOT NULL DEFAULT 0 CHECK (queue_depth >= 0),
  created_at       timestamptz NOT NULL DEFAULT now(),
  CHECK (stranded_milli <= free_milli)
);
CREATE INDEX capacity_samples_at_idx ON ledger.capacity_samples (at);

CREATE TRIGGER capacity_samples_append_only BEFORE UPDATE OR DELETE ON ledger.capacity_samples
  FOR EACH ROW EXECUTE FUNCTION public.gpuaas_reject_mutation();
CREATE TRIGGER capacity_samples_no_truncate BEFORE TRUNCATE ON ledger.capacity_samples
  FOR EACH STATEMENT EXECUTE FUNCTION public.gpuaas_reject_mutation();

GRANT SELECT, INSERT ON ledger.capacity_samples TO gpuaas_app;
GRANT USAGE ON SEQUENCE ledger.capacity_samples_id_seq TO gpuaas_app;

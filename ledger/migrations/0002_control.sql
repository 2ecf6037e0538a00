-- Schema `control`, owned by actors/ (allocations, nodes). Every state change
-- is written with an event row and an outbox row in the same transaction
-- (actors/store.py), through the transition tables in gpuaas/lifecycle.
CREATE SCHEMA IF NOT EXISTS control;

CREATE TABLE control.nodes (
  node_id        text PRIMARY KEY,
  address        text NOT NULL,
  state          text NOT NULL,
  version        bigint NOT NULL DEFAULT 1,
  backend        text NOT NULL,
  simulated      boolean NOT NULL,
  cpu_milli      integer NOT NULL CHECK (cpu_milli >= 0),
  memory_mib     bigint NOT NULL CHECK (memory_mib >= 0),
  labels         jsonb NOT NULL DEFAULT '{}'::jsonb,
  inventory      bytea NOT NULL,
  registered_at  timestamptz NOT NULL DEFAULT now(),
  last_seen_at   timestamptz,
  updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE control.gpus (
  node_id        text NOT NULL REFERENCES control.nodes(node_id),
  gpu_index      integer NOT NULL CHECK (gpu_index >= 0),
  uuid           text NOT NULL,
  model          text NOT NULL,
  memory_mib     bigint NOT NULL,
  nvlink_island  integer NOT NULL DEFAULT 0,
  state          text NOT NULL,
  reason         text NOT NULL DEFAULT '',
  version        bigint NOT NULL DEFAULT 1,
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (node_id, gpu_index)
);

CREATE TABLE control.allocations (
  allocation_id     uuid PRIMARY KEY,
  tenant_id         text NOT NULL,
  request_id        text NOT NULL,
  request_hash      bytea NOT NULL,
  request           bytea NOT NULL,           -- gpuaas.v1.PlacementRequest
  state             text NOT NULL,
  reason            text NOT NULL DEFAULT '',
  version           bigint NOT NULL DEFAULT 1,
  priority          integer NOT NULL DEFAULT 0,
  gpu_model         text NOT NULL DEFAULT '',
  gpu_milli_total   bigint NOT NULL DEFAULT 0, -- Σ over replicas of gpus × milli
  assignments       jsonb NOT NULL DEFAULT '[]'::jsonb,
  prepare_attempts  integer NOT NULL DEFAULT 0,
  release_attempts  integer NOT NULL DEFAULT 0,
  created_at        timestamptz NOT NULL,
  updated_at        timestamptz NOT NULL,
  running_since     timestamptz,
  stopped_at        timestamptz,
  lease_expires_at  timestamptz,
  queue_deadline    timestamptz,
  next_attempt_at   timestamptz,
  CONSTRAINT allocations_tenant_request_uq UNIQUE (tenant_id, request_id)
);
CREATE INDEX allocations_active_idx ON control.allocations (state)
  WHERE state IN ('QUEUED', 'PLACED', 'RUNNING', 'RELEASING', 'FAILED', 'RELEASE_FAILED');
CREATE INDEX allocations_tenant_idx ON control.allocations (tenant_id, created_at, allocation_id);

CREATE TABLE control.allocation_events (
  event_id       bigserial PRIMARY KEY,
  allocation_id  uuid NOT NULL,
  tenant_id      text NOT NULL,
  from_state     text,
  to_state       text NOT NULL,
  event          text NOT NULL,
  reason         text NOT NULL DEFAULT '',
  version        bigint NOT NULL,
  at             timestamptz NOT NULL,
  CONSTRAINT allocation_events_version_uq UNIQUE (allocation_id, version)
);
CREATE INDEX allocation_events_alloc_idx ON control.allocation_events (allocation_id, event_id);

CREATE TABLE control.node_events (
  event_id    bigserial PRIMARY KEY,
  node_id     text NOT NULL,
  gpu_index   integer,                     -- NULL for a node transition
  from_state  text,
  to_state    text NOT NULL,
  event       text NOT NULL,
  reason      text NOT NULL DEFAULT '',
  automatic   boolean NOT NULL,
  at          timestamptz NOT NULL
);

-- Transactional outbox: domain events (proto/gpuaas/v1/events.proto),
-- delivered at least once by consumers that keep a cursor.
CREATE TABLE control.outbox (
  id          bigserial PRIMARY KEY,
  topic       text NOT NULL,
  key         text NOT NULL,
  payload     bytea NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE control.outbox_cursors (
  consumer    text PRIMARY KEY,
  last_id     bigint NOT NULL DEFAULT 0,
  updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER allocation_events_append_only BEFORE UPDATE OR DELETE ON control.allocation_events
  FOR EACH ROW EXECUTE FUNCTION public.gpuaas_reject_mutation();
CREATE TRIGGER allocation_events_no_truncate BEFORE TRUNCATE ON control.allocation_events
  FOR EACH STATEMENT EXECUTE FUNCTION public.gpuaas_reject_mutation();
CREATE TRIGGER node_events_append_only BEFORE UPDATE OR DELETE ON control.node_events
  FOR EACH ROW EXECUTE FUNCTION public.gpuaas_reject_mutation();
CREATE TRIGGER node_events_no_truncate BEFORE TRUNCATE ON control.node_events
  FOR EACH STATEMENT EXECUTE FUNCTION public.gpuaas_reject_mutation();
CREATE TRIGGER outbox_append_only BEFORE UPDATE OR DELETE ON control.outbox
  FOR EACH ROW EXECUTE FUNCTION public.gpuaas_reject_mutation();
CREATE TRIGGER outbox_no_truncate BEFORE TRUNCATE ON control.outbox
  FOR EACH STATEMENT EXECUTE FUNCTION public.gpuaas_reject_mutation();

GRANT USAGE ON SCHEMA control TO gpuaas_app;
GRANT SELECT, INSERT, UPDATE ON control.nodes, control.gpus, control.allocations, control.outbox_cursors TO gpuaas_app;
GRANT SELECT, INSERT ON control.allocation_events, control.node_events, control.outbox TO gpuaas_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA control TO gpuaas_app;

-- Schema `iam`, owned by gpuaas/auth.py: tenants, API tokens (hash only),
-- quotas.
CREATE SCHEMA IF NOT EXISTS iam;

CREATE TABLE iam.tenants (
  tenant_id   text PRIMARY KEY CHECK (tenant_id ~ '^[a-z0-9][a-z0-9-]{1,39}$'),
  name        text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE iam.api_tokens (
  token_id    text PRIMARY KEY,
  tenant_id   text NOT NULL REFERENCES iam.tenants(tenant_id),
  token_hash  bytea NOT NULL UNIQUE,       -- sha256 of the secret; the secret is never stored
  scopes      text[] NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  expires_at  timestamptz,
  revoked_at  timestamptz
);

CREATE TABLE iam.quotas (
  tenant_id      text NOT NULL REFERENCES iam.tenants(tenant_id),
  gpu_model      text NOT NULL,            -- '*' = every model
  gpu_milli_max  bigint NOT NULL CHECK (gpu_milli_max >= 0),
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, gpu_model)
);

GRANT USAGE ON SCHEMA iam TO gpuaas_app;
GRANT SELECT, INSERT, UPDATE ON iam.tenants, iam.api_tokens, iam.quotas TO gpuaas_app;

-- Shared guard for append-only tables: rejects UPDATE, DELETE and TRUNCATE.
-- Attached per table by each domain's migration. Enforced by the database,
-- not by convention (DESIGN §6).
CREATE OR REPLACE FUNCTION public.gpuaas_reject_mutation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'table %.% is append-only: % rejected', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- The runtime role. Created without a password; an external database sets
-- one out of band (GPUAAS_APP_PASSWORD) or uses its own auth.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'gpuaas_app') THEN
    CREATE ROLE gpuaas_app LOGIN;
  END IF;
END;
$$;

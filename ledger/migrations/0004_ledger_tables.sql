-- Schema `ledger`, owned by ledger/: the append-only, hash-chained record of
-- usage and money. See docs/ledger.md for the ERD and ledger/README.md for the
-- write path.
--
-- Rules enforced here, by the database:
--   * every table rejects UPDATE, DELETE and TRUNCATE (trigger, even for the owner);
--   * gpuaas_app holds only SELECT and INSERT (plus USAGE on the one sequence);
--   * no balance column anywhere: balances are sums of billing_entries;
--   * chained tables (price_book, meter_events, usage_entries, billing_entries)
--     carry `hash` = sha256(previous row's hash || canonical content), where the
--     canonical content is the PostgreSQL binary COPY encoding of the content
--     columns in declared order (ledger/chain.py holds the column lists; verify
--     recomputes it in SQL with the *send() functions). Ids are assigned by the
--     single chain writer under an advisory lock, contiguous from 1, so a
--     missing row also breaks the chain.
CREATE SCHEMA IF NOT EXISTS ledger;

-- Accounts of the double-entry book: one per tenant per currency, one revenue
-- account per currency. Created on first use by the writer.
CREATE TABLE ledger.accounts (
  account_id  text PRIMARY KEY,            -- 'tenant:<tenant>:<CUR>' | 'revenue:<CUR>'
  kind        text NOT NULL CHECK (kind IN ('tenant', 'revenue')),
  tenant_id   text,
  currency    text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  created_at  timestamptz NOT NULL DEFAULT now(),
  CHECK ((kind = 'tenant') = (tenant_id IS NOT NULL))
);

-- Versioned price book: the price of one GPU-hour of a model, in integer
-- micro-units of `currency`, from `effective_from` on. The version in force
-- at an interval's start rates that interval.
CREATE TABLE ledger.price_book (
  id                   bigint PRIMARY KEY,
  gpu_model            text NOT NULL CHECK (gpu_model <> ''),
  currency             text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
  micros_per_gpu_hour  bigint NOT NULL CHECK (micros_per_gpu_hour > 0),
  effective_from       timestamptz NOT NULL,
  hash                 bytea NOT NULL CHECK (octet_length(hash) = 32),
  created_at           timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT price_book_version_uq UNIQUE (gpu_model, effective_from)
);

-- The billing-relevant allocation transitions the ledger consumed from the
-- outbox: kind 1 = start (into RUNNING, with the replicas billed), kind 2 =
-- stop (out of RUNNING). Recovery after a restart rebuilds the open meters
-- from here. One start and one stop per allocation: billing never restarts.
CREATE TABLE ledger.meter_events (
  id             bigint PRIMARY KEY,
  event_id       bigint NOT NULL,            -- control.allocation_events.event_id
  allocation_id  uuid NOT NULL,
  kind           smallint NOT NULL CHECK (kind IN (1, 2)),
  at             timestamptz NOT NULL,       -- the transition's time (billing uses this)
  outbox_id      bigint NOT NULL,
  tenant_id      text NOT NULL,
  event          text NOT NULL,
  replicas       text NOT NULL,              -- canonical JSON [[node, model, gpu_count, gpu_milli], ...]
  hash           bytea NOT NULL CHECK (octet_length(hash) = 32),
  created_at     timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT meter_events_event_uq UNIQUE (event_id),
  CONSTRAINT meter_events_once_uq UNIQUE (allocation_id, kind)
);

-- One row per metered interval per allocation replica. Quantities are exact
-- integers: gpu_milli_us = gpu_count * gpu_milli * duration in microseconds.
-- kind 0 = usage, 1 = reversal of the row `reverses_id` (negative quantity),
-- 2 = correction re-issued after a reversal. The idempotency key is
-- (allocation_id, seq, replica, kind); `idempotency_key` shows it as text.
CREATE TABLE ledger.usage_entries (
  id              bigint PRIMARY KEY,
  allocation_id   uuid NOT NULL,
  seq             integer NOT NULL CHECK (seq >= 0),
  replica         smallint NOT NULL CHECK (replica >= 0),
  kind            smallint NOT NULL CHECK (kind IN (0, 1, 2)),
  interval_start  timestamptz NOT NULL,
  interval_end    timestamptz NOT NULL,
  gpu_count       integer NOT NULL CHECK (gpu_count > 0),
  gpu_milli       integer NOT NULL CHECK (gpu_milli BETWEEN 1 AND 1000),
  gpu_milli_us    bigint NOT NULL,
  util_bp         integer NOT NULL CHECK (util_bp BETWEEN 0 AND 10000),  -- avg utilization, basis points
  energy_mj       bigint NOT NULL,                                       -- energy, millijoules
  reverses_id     bigint REFERENCES ledger.usage_entries(id),
  tenant_id       text NOT NULL,
  node_id         text NOT NULL,
  gpu_model       text NOT NULL,
  hash            bytea NOT NULL CHECK (octet_length(hash) = 32),
  created_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT usage_entries_key_uq UNIQUE (allocation_id, seq, replica, kind),
  CHECK (interval_end > interval_start),
  CHECK ((kind = 1) = (reverses_id IS NOT NULL)),
  CHECK ((kind = 1 AND gpu_milli_us < 0 AND energy_mj <= 0) OR (kind <> 1 AND gpu_milli_us > 0 AND energy_mj >= 0))
);

-- Double-entry lines, integer micro-units. Each charge is two lines (debit
-- the tenant, credit revenue) linked to its usage entry; a reversal is two
-- lines the other way, each referencing the line it reverses.
CREATE TABLE ledger.billing_entries (
  id              bigint PRIMARY KEY,
  usage_entry_id  bigint NOT NULL REFERENCES ledger.usage_entries(id),
  side            smallint NOT NULL CHECK (side IN (1, 2)),    -- 1 = debit, 2 = credit
  amount_micros   bigint NOT NULL CHECK (amount_micros >= 0),
  price_id        bigint NOT NULL REFERENCES ledger.price_book(id),
  at              timestamptz NOT NULL,
  reverses_id     bigint REFERENCES ledger.billing_entries(id),
  account_id      text NOT NULL REFERENCES ledger.accounts(account_id),
  currency        text NOT NULL,
  hash            bytea NOT NULL CHECK (octet_length(hash) = 32),
  created_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT billing_entries_key_uq UNIQUE (usage_entry_id, side)
);

-- Events the consumer could not meter (unknown tenant, unpriced model, a
-- second start, a stop without a start). Recorded so the consumer never
-- wedges; nothing else is written for them. Operators read this table.
CREATE TABLE ledger.dead_letters (
  id             bigserial PRIMARY KEY,
  outbox_id      bigint NOT NULL,
  topic          text NOT NULL,
  key            text NOT NULL,
  event_id       bigint,
  allocation_id  text,
  reason         text NOT NULL,
  payload        bytea NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT dead_letters_outbox_uq UNIQUE (outbox_id)
);

CREATE INDEX usage_entries_tenant_idx ON ledger.usage_entries (tenant_id);
CREATE INDEX billing_entries_account_idx ON ledger.billing_entries (account_id);

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['accounts', 'price_book', 'meter_events', 'usage_entries', 'billing_entries',
                           'dead_letters'] LOOP
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON ledger.%I '
                   'FOR EACH ROW EXECUTE FUNCTION public.gpuaas_reject_mutation()', t || '_append_only', t);
    EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON ledger.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION public.gpuaas_reject_mutation()', t || '_no_truncate', t);
  END LOOP;
END;
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA ledger FROM PUBLIC;
GRANT USAGE ON SCHEMA ledger TO gpuaas_app;
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA ledger TO gpuaas_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA ledger TO gpuaas_app;

-- A new allocation's rows in one statement, event ids included.
--
-- The outbox payload (gpuaas.v1.AllocationTransitioned) carries its event's id,
-- which comes from control.allocation_events_event_id_seq. Fetching the ids first
-- cost a round trip, plus BEGIN and COMMIT around the two statements: four round
-- trips per placement commit, each a wake-up of two processes on a busy machine.
-- The writer now sends the payload without its event_id and the statement appends
-- field 1 (event_id, a varint) once it has taken the ids: protobuf parsers read a
-- field wherever it appears, so the bytes parse to the same message. One
-- statement is its own transaction on an autocommit connection: one round trip.
CREATE FUNCTION control.pb_varint(v bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
  out bytea := ''::bytea;
BEGIN
  IF v < 0 THEN
    RAISE EXCEPTION 'pb_varint: % is negative (event ids are positive)', v;
  END IF;
  WHILE v >= 128 LOOP
    out := out || set_byte('\x00'::bytea, 0, ((v & 127) | 128)::int);
    v := v >> 7;
  END LOOP;
  RETURN out || set_byte('\x00'::bytea, 0, v::int);
END;
$$;

-- Field 1 with wire type 0 (varint): the tag byte 0x08, then the value.
CREATE FUNCTION control.pb_event_id_field(event_id bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT '\x08'::bytea || control.pb_varint(event_id) $$;

GRANT EXECUTE ON FUNCTION control.pb_varint(bigint), control.pb_event_id_field(bigint) TO gpuaas_app;

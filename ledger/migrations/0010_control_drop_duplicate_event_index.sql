-- One index fewer to write on every allocation event.
--
-- control.allocation_events had two indexes led by allocation_id: the unique
-- (allocation_id, version) that the state machine relies on, and
-- (allocation_id, event_id). Every query that looks events up by allocation
-- (the preemption rebuild, the fault scenarios, the tests) is served by the
-- first; within one allocation versions and event ids rise together, so the
-- first also gives its events in order. The second only cost an index entry,
-- and its WAL, for each of an allocation's five-odd events.
DROP INDEX IF EXISTS control.allocation_events_alloc_idx;

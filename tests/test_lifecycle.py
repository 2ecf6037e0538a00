"""The lifecycle transition tables: their shape, their docs, and their use in Postgres."""
import pytest

from gpuaas.lifecycle import (ALLOCATION_TABLE, GPU_TABLE, NODE_TABLE, AllocEvent, AllocState, Billing,
                              IllegalTransition, NodeEvent, NodeState)
from gpuaas.lifecycle import render
from gpuaas.v1 import common_pb2


def test_docs_are_rendered_from_the_tables():
    """docs/state-machines.md equals what the tables render (never stale)."""
    assert render.DOC.read_text() == render.render()


def test_state_values_match_the_contract():
    """Domain enums carry the proto's numbers, so conversion is by value."""
    for s in AllocState:
        assert common_pb2.AllocationState.Value(f"ALLOCATION_STATE_{s.name}") == s.value
    for s in NodeState:
        assert common_pb2.NodeState.Value(f"NODE_STATE_{s.name}") == s.value


def test_billing_starts_only_into_running_and_stops_only_out_of_it():
    """Billing edges: START exactly on the edge into RUNNING, STOP exactly on edges out of RUNNING."""
    for t in ALLOCATION_TABLE.edges:
        if t.billing is Billing.START:
            assert t.dst is AllocState.RUNNING and t.src is not AllocState.RUNNING
        elif t.billing is Billing.STOP:
            assert t.src is AllocState.RUNNING and t.dst is not AllocState.RUNNING
        else:
            assert t.dst is not AllocState.RUNNING and t.src is not AllocState.RUNNING or t.src == t.dst
    starts = [t for t in ALLOCATION_TABLE.edges if t.billing is Billing.START]
    assert len(starts) == 1
    stops = {t.event for t in ALLOCATION_TABLE.edges if t.billing is Billing.STOP}
    assert stops == {AllocEvent.RELEASE_REQUESTED, AllocEvent.LEASE_EXPIRED, AllocEvent.PREEMPTED,
                     AllocEvent.NODE_LOST, AllocEvent.GPU_FAULT}


@pytest.mark.parametrize("state,event", [
    (AllocState.RELEASED, AllocEvent.PREPARE_OK),
    (AllocState.QUEUED, AllocEvent.CLEANUP_OK),
    (AllocState.RUNNING, AllocEvent.PLACED),
    (AllocState.CANCELLED, AllocEvent.RELEASE_REQUESTED),
    (None, AllocEvent.PLACED),
])
def test_illegal_allocation_transitions_raise(state, event):
    """Edges missing from the table are refused."""
    with pytest.raises(IllegalTransition):
        ALLOCATION_TABLE.transition(state, event)


def test_every_state_is_reachable_and_terminals_have_no_exit():
    """Each allocation state is reachable from a new request; RELEASED and CANCELLED are terminal."""
    seen, frontier = set(), {None}
    while frontier:
        s = frontier.pop()
        for t in ALLOCATION_TABLE.edges:
            if t.src == s and t.dst not in seen:
                seen.add(t.dst)
                frontier.add(t.dst)
    assert seen == set(AllocState)
    assert ALLOCATION_TABLE.events_from(AllocState.RELEASED) == []
    assert ALLOCATION_TABLE.events_from(AllocState.CANCELLED) == []


def test_node_and_gpu_tables_cover_the_design():
    """The node table has the design's automatic and operator edges; decommission from anywhere."""
    assert NODE_TABLE.transition(NodeState.SUSPECT, NodeEvent.HEARTBEAT_TIMEOUT).dst is NodeState.OFFLINE
    assert NODE_TABLE.transition(NodeState.SUSPECT, NodeEvent.HEARTBEAT_TIMEOUT).automatic
    assert not NODE_TABLE.transition(NodeState.UNHEALTHY, NodeEvent.CLEARED).automatic
    for s in NodeState:
        if s is not NodeState.DECOMMISSIONED:
            assert NODE_TABLE.transition(s, NodeEvent.DECOMMISSION).dst is NodeState.DECOMMISSIONED
    assert len(GPU_TABLE.edges) >= 5

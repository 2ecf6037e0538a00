"""Crash safety, proven by fault injection (short CI version; benchmarks/recovery.py is the full one).

Each scenario runs a gRPC workload, injects its fault, settles, and audits
Postgres + the ledger (tests/faults/harness.py). Reproduce one with
GPUAAS_FAULT_SEED=<seed printed in the failure>.
"""
from __future__ import annotations

import os
import random

import pytest

from tests.faults import scenarios


@pytest.mark.parametrize("scenario", scenarios.ALL, ids=[s.__name__ for s in scenarios.ALL])
def test_crash_scenario(control_plane, admin, scenario):
    seed = int(os.environ.get("GPUAAS_FAULT_SEED") or random.randrange(1, 1_000_000))
    print(f"fault scenario {scenario.__name__} seed={seed}")
    res = scenario(control_plane, admin, seed, 1)
    print(f"fault scenario {scenario.__name__}: {res.row()}")
    assert res.faults > 0 or res.notes.get("skipped"), f"[seed {seed}] no fault was injected"
    assert not res.violations, f"[seed {seed}] {scenario.__name__}: " + "\n".join(res.violations[:20])

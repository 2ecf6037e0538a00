"""actors.runtime.GcPacer: survivors leave the collector's sight once a second; given back once a period."""
from __future__ import annotations

import gc

from actors.runtime import GcPacer


def test_pacer_freezes_survivors_and_gives_them_back_once_a_period():
    now = [0.0]
    p = GcPacer(freeze_every_s=1.0, release_s=10.0, clock=lambda: now[0])
    try:
        keep = [[i] for i in range(10_000)]          # long-lived containers
        p.tick()
        assert p.stats["freezes"] == 0               # not yet a second
        now[0] = 1.5
        p.tick()
        assert p.stats["freezes"] == 1 and gc.get_freeze_count() >= len(keep)
        cycle = [None]
        cycle[0] = cycle                             # a reference cycle, frozen, then dropped
        now[0] = 3.0
        p.tick()
        del cycle
        now[0] = 12.0
        p.tick()                                     # the period is over: everything given back, collected
        assert p.stats["releases"] == 1 and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()

"""actors.runtime.GcPacer: survivors leave the collector's sight once a second; given back once a period."""
from __future__ import annotations

import gc
import sys

import pytest

from actors.runtime import NO_AUTOMATIC_FULL, GcPacer


@pytest.fixture
def thresholds():
    """The test process's collector settings, as they were before the pacer changed them."""
    saved = gc.get_threshold()
    yield saved
    gc.set_threshold(*saved)


def test_pacer_freezes_survivors_and_gives_them_back_once_a_period(thresholds):
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


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="the incremental collector of 3.14 is left as it is")
def test_the_interpreter_starts_no_full_collection_the_young_ones_go_on(thresholds):
    """With the pacer in place, creating and keeping many containers runs young-generation
    collections (counted, timed) but no full one: only the pacer's release runs that."""
    now = [0.0]
    p = GcPacer(release_s=10.0, clock=lambda: now[0])
    assert gc.get_threshold() == (thresholds[0], thresholds[1], NO_AUTOMATIC_FULL)
    try:
        before = p.stats
        keep = []
        for i in range(300_000):                     # far past what would start several full collections
            keep.append([i])
        after = p.stats
        assert after["collections"][0] > before["collections"][0]
        assert after["collections"][1] > before["collections"][1]
        assert after["collections"][2] == before["collections"][2]
        assert after["collection_s"][0] > before["collection_s"][0]
        now[0] = 11.0
        p.tick()                                     # the release: the one full collection
        assert p.stats["collections"][2] == after["collections"][2] + 1
        assert p.stats["releases"] == 1
    finally:
        gc.unfreeze()


def test_the_pacer_can_leave_the_interpreter_s_full_collections_alone(thresholds):
    GcPacer(own_full_collections=False)
    assert gc.get_threshold() == thresholds

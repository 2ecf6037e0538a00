"""runtime.PauseProbe: sees the moments the process ran no Python, which a handler's own timing
cannot (requests not yet in a handler wait too)."""
from __future__ import annotations

import time

from actors.runtime import PauseProbe


def _hold_interpreter(at_least_s: float) -> float:
    """Hold the interpreter lock without a break (one C call: builtin sum over a range) for at least
    ``at_least_s``; returns how long it was held."""
    n = 1_000_000
    while True:
        t0 = time.perf_counter()
        sum(range(n))
        held = time.perf_counter() - t0
        if held >= at_least_s:
            return held
        n *= 2


def test_a_held_interpreter_is_a_pause_with_its_length_and_time():
    probe = PauseProbe(interval_s=0.002, threshold_s=0.02)
    try:
        time.sleep(0.05)
        start = time.time()
        held = _hold_interpreter(0.1)
        end = time.time()
        time.sleep(0.05)
    finally:
        probe.stop()
    st = probe.stats
    assert st["pauses"] >= 1 and st["longest_s"] >= held * 0.5
    # The pause is listed with the wall clock time it ended, inside the window, and counted in the sum.
    assert any(start <= t <= end + 0.01 and late >= held * 0.5 for t, late in st["recent"])
    assert st["pause_s"] >= st["longest_s"]


def test_sleeping_threads_are_no_pause():
    """Threads that wait (I/O, sleep) leave the interpreter free: the probe counts nothing for them."""
    import threading

    probe = PauseProbe(interval_s=0.002, threshold_s=0.05)
    try:
        threads = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        probe.stop()
    assert probe.stats["pauses"] == 0

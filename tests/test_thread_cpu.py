"""runtime.thread_cpu_s: a process's CPU by thread, from /proc, summed by name (a pool's index dropped)."""
from __future__ import annotations

import threading
import time

from actors.runtime import thread_cpu_s


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_is_counted_against_the_thread_that_used_it():
    before = thread_cpu_s()
    workers = [threading.Thread(target=_spin, args=(0.15,), name=f"spin-pool_{i}") for i in range(2)]
    idle = threading.Thread(target=time.sleep, args=(0.5,), name="idle-one")
    for t in [*workers, idle]:
        t.start()
    for t in workers:
        t.join()
    during = thread_cpu_s()  # the pool has ended; the sleeper is still alive
    idle.join()
    # Ended threads leave /proc: measured while alive, the pool's two threads count as one name.
    assert "spin-pool_0" not in during and "spin-pool_1" not in during
    assert during.get("idle-one", 0.0) < 0.05
    assert "MainThread" in before and all(v >= 0 for v in before.values())


def test_a_live_pool_is_summed_under_one_name():
    spun = [threading.Event(), threading.Event()]
    done = threading.Event()

    def work(i):
        _spin(0.15)
        spun[i].set()
        done.wait()  # stays alive, so that /proc still lists it

    pool = [threading.Thread(target=work, args=(i,), name=f"busy-pool_{i}") for i in range(2)]
    for t in pool:
        t.start()
    try:
        assert all(e.wait(30) for e in spun)
        cpu = thread_cpu_s()
        # Two threads × 0.15 s; /proc counts in ticks of 10 ms, sampled, so allow some slack.
        assert cpu.get("busy-pool", 0.0) >= 0.2
        assert not any(k.startswith("busy-pool_") for k in cpu)
    finally:
        done.set()
        for t in pool:
            t.join()

"""runtime.Combiner: one call in flight; what queues behind it goes together in the next call."""
from __future__ import annotations

import threading
import time

import pytest

from actors.runtime import Combiner
from gpuaas.errors import Unavailable


class Recorder:
    """A send that records its batches and can be held, to let items queue behind a call."""

    def __init__(self, answer=lambda items: [f"r:{i}" for i in items]):
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.answer = answer

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(10)
        return self.answer(items)


def test_an_item_alone_is_sent_at_once_and_answered():
    rec = Recorder()
    c = Combiner(rec, name="t")
    assert c.submit("a").result(5) == "r:a"
    assert rec.batches == [["a"]]
    assert c.stats == {"calls": 1, "items": 1}
    c.close()


def test_items_queued_behind_a_call_go_together_in_order():
    rec = Recorder()
    rec.gate.clear()
    c = Combiner(rec, name="t")
    first = c.submit(0)
    assert rec.entered.wait(5)
    rest = [c.submit(i) for i in range(1, 6)]
    rec.gate.set()
    assert [f.result(5) for f in [first] + rest] == [f"r:{i}" for i in range(6)]
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]
    assert c.stats == {"calls": 2, "items": 6}
    c.close()


def test_a_refusal_of_one_item_leaves_the_others_answered():
    rec = Recorder(lambda items: [ValueError(i) if i == "bad" else i for i in items])
    rec.gate.clear()
    c = Combiner(rec, name="t")
    c.submit("warm")
    assert rec.entered.wait(5)
    futs = [c.submit(x) for x in ("a", "bad", "b")]
    rec.gate.set()
    assert futs[0].result(5) == "a" and futs[2].result(5) == "b"
    with pytest.raises(ValueError):
        futs[1].result(5)
    c.close()


def test_a_failed_call_fails_its_batch_only():
    calls = []

    def send(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise Unavailable("shard restarting")
        return items

    c = Combiner(send, name="t")
    with pytest.raises(Unavailable):
        c.submit("x").result(5)
    assert c.submit("y").result(5) == "y"  # the combiner goes on with the next call


def test_a_wrong_number_of_results_fails_the_batch():
    c = Combiner(lambda items: items[:-1], name="t")
    with pytest.raises(RuntimeError):
        c.submit("x").result(5)


def test_a_batch_never_exceeds_batch_max():
    rec = Recorder()
    rec.gate.clear()
    c = Combiner(rec, name="t", batch_max=3)
    c.submit(-1)
    assert rec.entered.wait(5)
    futs = [c.submit(i) for i in range(7)]
    rec.gate.set()
    assert [f.result(5) for f in futs] == [f"r:{i}" for i in range(7)]
    assert [len(b) for b in rec.batches] == [1, 3, 3, 1]
    c.close()


def test_after_close_a_submit_is_refused_as_retryable():
    c = Combiner(lambda items: items, name="t")
    c.close()
    time.sleep(0.05)
    with pytest.raises(Unavailable):
        c.submit("late").result(1)

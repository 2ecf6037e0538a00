"""Small shared pieces of the async actors: a DB thread, agent stubs, names."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import gc
import logging
import os
import random
import re
import sys
import threading
import time

import grpc
import psycopg

from gpuaas.errors import Unavailable
from gpuaas.v1 import node_pb2_grpc
from ledger import db as dbmod

log = logging.getLogger("gpuaas.actors")

NAMESPACE = "gpuaas"
PLACEMENT = "placement"
LEDGER = "ledger"


def close_quietly(conn) -> None:
    """Close a database connection being dropped (after a failure). Dropping it without closing leaked
    it: the kept cursors of store._execute_kept make a reference cycle that only a full collection
    frees, and GcPacer holds those off, so under a stream of failures the server ran out of
    connections."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


def settle(futures, outcomes) -> None:
    """Answer each waiter of a batch with its own outcome: an exception instance fails it, anything
    else is its result. A future already done (given up, cancelled) is left as it is. Works for
    asyncio and concurrent.futures futures alike."""
    for fut, out in zip(futures, outcomes):
        if fut.done():
            continue
        if isinstance(out, BaseException):
            fut.set_exception(out)
        else:
            fut.set_result(out)


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's threads (from /proc), summed by name: a Python thread by
    its name with any trailing pool index dropped ("ThreadPoolExecutor-0_3" counts as
    "ThreadPoolExecutor-0"), a thread Python did not start (gRPC's core, Ray's) as "native:" and its
    kernel name. Where a process's CPU goes, thread by thread: the placement actor's committer,
    writer, dispatcher, gRPC handlers and gRPC's own threads share one interpreter lock."""
    tick = os.sysconf("SC_CLK_TCK")
    named = {t.native_id: re.sub(r"_\d+$", "", t.name) for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue  # ended meanwhile
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        name = named.get(int(tid)) or "native:" + comm
        out[name] = out.get(name, 0.0) + (int(rest[11]) + int(rest[12])) / tick
    return out


# Per process: every collection the interpreter ran, by generation, and the time it took.
_COLLECTIONS = {"n": [0, 0, 0], "s": [0.0, 0.0, 0.0], "max_s": [0.0, 0.0, 0.0]}
_collection_started: list[float] = []


def _time_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _collection_started[:] = [time.perf_counter()]
    elif _collection_started:
        g = min(info.get("generation", 2), 2)
        took = time.perf_counter() - _collection_started[0]
        _COLLECTIONS["n"][g] += 1
        _COLLECTIONS["s"][g] += took
        _COLLECTIONS["max_s"][g] = max(_COLLECTIONS["max_s"][g], took)


class PauseProbe:
    """Finds the moments a process stopped running Python: a thread that sleeps ``interval_s`` at a
    time and measures how late it wakes. Late by more than ``threshold_s`` means that for that long
    no thread of the process could take the interpreter (a collection, a long call holding it) or
    the process got no core: every request in flight waited, including those that had not reached a
    handler yet, which a handler's own timing cannot see.

    ``stats``: pauses counted and summed, the longest, and the last ``keep`` of them as (wall clock
    time at the end of the pause, seconds late). A pause longer than ``interval_s + threshold_s``
    is always seen, a shorter one when it covers the probe's wake-up. The probe costs one wake-up
    per ``interval_s`` (a plain sleep: ~0.3 % of a core at 20 ms here; an Event wait every 5 ms, the
    first version, cost 1.7 %)."""

    def __init__(self, *, interval_s: float = 0.020, threshold_s: float = 0.010, keep: int = 256,
                 name: str = "pause-probe"):
        self.interval_s, self.threshold_s = interval_s, threshold_s
        self.pauses = 0
        self.pause_s = 0.0
        self.longest_s = 0.0
        self.recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=keep)
        self._stopped = False
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        interval, threshold = self.interval_s, self.threshold_s
        before = time.perf_counter()
        while not self._stopped:
            time.sleep(interval)
            now = time.perf_counter()
            late = now - before - interval
            before = now
            if late >= threshold:
                self.pauses += 1
                self.pause_s += late
                self.longest_s = max(self.longest_s, late)
                self.recent.append((time.time(), late))

    @property
    def stats(self) -> dict:
        return {"pauses": self.pauses, "pause_s": round(self.pause_s, 4), "longest_s": round(self.longest_s, 4),
                "recent": list(self.recent)}

    def stop(self) -> None:
        self._stopped = True


# A threshold the interpreter's count of middle-generation collections never reaches: no full
# collection starts on its own. Python 3.14's incremental collector reads the thresholds
# differently and bounds its own pauses, so it is left as it is there.
NO_AUTOMATIC_FULL = 1 << 30


class GcPacer:
    """Keeps the interpreter's full garbage collections out of the request path, in a process that
    holds many long-lived objects (the placement actor's capacity view: ~9 tracked objects per
    allocation).

    A full collection walks every tracked object: ~95 ms at 50,000 allocations on the development
    machine. ``tick`` (call it about once a second) moves what has survived so far out of the
    collector's sight (``gc.freeze``), so a collection walks only what is new. Even so, the
    interpreter starts a full collection on its own whenever its long-lived objects have grown by a
    quarter since the last one; the freeze leaves that count small, so under load it came every few
    hundred milliseconds, each walking up to a second's survivors: 33-39 ms of wall clock at 8,000
    placements/s, a stall for every request in flight. So the pacer also
    switches those off (``own_full_collections``, Python 3.11-3.13): the young generations are still
    collected as usual, which is where almost every reference cycle dies, and a cycle that outlives
    them is reclaimed when the frozen objects are given back, once every ``release_s``, in one full
    collection.

    ``stats``: freezes, releases, the last release's length, and every collection the process ran
    (``collections``, ``collection_s``, by generation)."""

    def __init__(self, *, freeze_every_s: float = 1.0, release_s: float = 600.0, clock=None,
                 own_full_collections: bool = True):
        self._clock = clock or time.monotonic
        self.freeze_every_s, self.release_s = freeze_every_s, release_s
        now = self._clock()
        self._last_freeze, self._last_release = now, now
        self._stats = {"freezes": 0, "releases": 0, "last_release_ms": 0.0}
        if _time_collection not in gc.callbacks:
            gc.callbacks.append(_time_collection)
        if own_full_collections and sys.version_info < (3, 14):
            t0, t1, _ = gc.get_threshold()
            gc.set_threshold(t0, t1, NO_AUTOMATIC_FULL)

    @property
    def stats(self) -> dict:
        return dict(self._stats, collections=list(_COLLECTIONS["n"]),
                    collection_s=[round(x, 4) for x in _COLLECTIONS["s"]],
                    longest_collection_s=[round(x, 4) for x in _COLLECTIONS["max_s"]])

    def tick(self) -> None:
        now = self._clock()
        if now - self._last_release >= self.release_s:
            self._last_release = self._last_freeze = now
            t0 = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            self._stats["releases"] += 1
            self._stats["last_release_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        elif now - self._last_freeze >= self.freeze_every_s:
            self._last_freeze = now
            gc.freeze()
            self._stats["freezes"] += 1


def alloc_shard_name(i: int) -> str:
    return f"allocations-{i}"


def node_shard_name(i: int) -> str:
    return f"nodes-{i}"


class Combiner:
    """Smart batching of one kind of call to one actor: at most one call in flight, and what arrives
    while it runs goes together in the next one. Idle, an item leaves at once (no window to wait
    out); under load a call carries everything that queued behind the previous one, so the per-call
    cost of an actor call (~1 ms of CPU on both sides here) is paid per batch, not per item.

    ``send(items)`` makes the call and returns one result per item, in order: a value, or an
    exception instance for that item alone. An exception raised by ``send`` fails the whole batch.
    """

    def __init__(self, send, *, name: str, batch_max: int = 512):
        self._send, self.batch_max = send, batch_max
        self._cv = threading.Condition()
        self._queue: list[tuple[object, cf.Future]] = []
        self._closed = False
        self.stats = {"calls": 0, "items": 0}
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, item) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._cv:
            if self._closed:
                fut.set_exception(Unavailable("shutting down; retry"))
                return fut
            self._queue.append((item, fut))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[:self.batch_max], self._queue[self.batch_max:]
            try:
                results = self._send([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - every waiter of the batch gets the failure
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            self.stats["calls"] += 1
            self.stats["items"] += len(batch)
            settle([fut for _, fut in batch], results)


class Readiness:
    """Whether this control plane can commit now: its database answers. Every placement, release and
    admin write is committed before its answer, so with the database gone the control plane can only
    answer UNAVAILABLE; a load balancer's or a client's gRPC health check should see that and route
    elsewhere or wait, rather than send requests to fail.

    One thread ("placement-readiness") sends ``SELECT 1`` every ``interval_s`` on a connection of its
    own (replaced when it breaks, connecting with ``timeout_s``). Another ("placement-readiness-judge")
    looks at the age of the last answer every ``interval_s``: older than ``fail_after`` intervals and a
    half, the control plane is not ready; answered again, ready. Age rather than a count of failures,
    so that a probe held by a server that accepted the connection and never answers (a frozen
    process, a network partition that resets nothing) counts as the outage it is. One lost
    connection (a failover, a restart) is replaced at the next check and changes nothing.
    ``on_change(ready)`` runs on each change (the gRPC health service's status), and each change is
    logged. The probe is a read: slow commits (a stalled disk, a missing synchronous standby) do not
    count; the check is reachability, not commit latency."""

    def __init__(self, url: str, on_change, *, interval_s: float = 1.0, fail_after: int = 2, timeout_s: int = 2):
        self.url, self.on_change = url, on_change
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.stale_s = (fail_after + 0.5) * interval_s
        self.ready = True  # the control plane has just connected (migrations, seeding) when this starts
        self.last_ok = time.monotonic()
        self.failures = 0  # checks failed in a row
        self.changes = 0
        self.last_error = ""
        self._conn = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._probe_loop, name="placement-readiness", daemon=True),
                         threading.Thread(target=self._judge_loop, name="placement-readiness-judge", daemon=True)]
        for t in self._threads:
            t.start()

    def _probe(self) -> None:
        if not dbmod.usable(self._conn):
            close_quietly(self._conn)
            self._conn = None
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.timeout_s)
        self._conn.execute("SELECT 1").fetchone()

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._probe()
                self.failures = 0
                self.last_ok = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - any failure to answer counts
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}".strip()
                close_quietly(self._conn)
                self._conn = None

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            age = time.monotonic() - self.last_ok
            ready = age < self.stale_s
            if ready == self.ready or self._stop.is_set():
                continue
            self.ready = ready
            self.changes += 1
            if ready:
                log.info("the database answers again: ready")
            else:
                log.warning("the database has not answered for %.1f s (%s): not ready, health NOT_SERVING",
                            age, self.last_error or "no answer yet to the last check")
            self.on_change(ready)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.interval_s + 1)
        # A probe held by a server that does not answer is left behind with its connection: closing a
        # connection under a statement waiting on it in another thread is not safe.
        if not self._threads[0].is_alive():
            close_quietly(self._conn)


class DbThread:
    """One connection on one thread: run store functions in a transaction from asyncio."""

    def __init__(self, url: str, name: str, options: str | None = None):
        """``options``: the connection's server options (store.GROUP_WRITER_OPTIONS for a connection
        whose statements are all by key, by arrays of keys or without parameters)."""
        self.url, self.options = url, options
        self._exec = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"db-{name}")
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if not dbmod.usable(self._conn):  # also one the server has closed while it was idle
            conn, self._conn = self._conn, None
            close_quietly(conn)
            # Autocommit: ``tx`` opens its transaction explicitly, ``statement`` needs none.
            kw = {"options": self.options} if self.options else {}
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5, **kw)
        return self._conn

    def _run(self, fn, args, kwargs, in_tx: bool = True):
        try:
            conn = self._connection()
            if not in_tx:
                return fn(conn, *args, **kwargs)
            with conn.transaction():
                return fn(conn, *args, **kwargs)
        except psycopg.OperationalError as exc:
            conn, self._conn = self._conn, None
            close_quietly(conn)
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def tx(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._run, fn, args, kwargs)

    async def statement(self, fn, *args, **kwargs):
        """Run ``fn``, which issues exactly one statement, without BEGIN and COMMIT around it: the
        statement is its own transaction, one round trip."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._run, fn, args, kwargs, False)

    def close(self) -> None:
        """Close the connection on its thread and end the thread (an actor's process ending does this
        by itself; a core used outside an actor calls it)."""
        def shut():
            if self._conn is not None:
                self._conn.close()
        self._exec.submit(shut).result()
        self._exec.shutdown()


class AgentStubs:
    """NodeAgent stubs by address, on grpc.aio channels."""

    def __init__(self):
        self._stubs: dict[str, tuple[grpc.aio.Channel, node_pb2_grpc.NodeAgentStub]] = {}

    def get(self, address: str) -> node_pb2_grpc.NodeAgentStub:
        hit = self._stubs.get(address)
        if hit is None:
            ch = grpc.aio.insecure_channel(address)
            hit = (ch, node_pb2_grpc.NodeAgentStub(ch))
            self._stubs[address] = hit
        return hit[1]

    async def drop(self, address: str) -> None:
        hit = self._stubs.pop(address, None)
        if hit:
            await hit[0].close()


class ItemRefused(RuntimeError):
    """One item of a NodeAgent batch call was refused by the node: ``status`` is the
    ``google.rpc.Status`` its own single call would have answered."""

    def __init__(self, status):
        super().__init__(status.message)
        self.status = status

    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.status.code, grpc.StatusCode.UNKNOWN)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class NodeBatcher:
    """One per-allocation NodeAgent call (``Prepare``, ``Cleanup``), batched per node: the items queued
    for a node in one loop turn, and those queued while its previous batch is on the wire, go in one
    batch call (``PrepareBatch``, ``CleanupBatch``), one item per allocation id per batch. Each item
    succeeds or fails on its own, as its own call would: its future gets the response, the call's
    error (``grpc.RpcError``, a timeout), or ``ItemRefused``. A daemon from before the batch call
    (UNIMPLEMENTED) gets one call per item from then on."""

    def __init__(self, agents: AgentStubs, *, single: str, batch: str, batch_request, max_items: int,
                 timeout_s: float):
        self.agents, self.single, self.batch = agents, single, batch
        self.batch_request, self.max_items, self.timeout_s = batch_request, max_items, timeout_s
        self._pending: dict[str, list[tuple]] = {}
        self._flushers: dict[str, asyncio.Task] = {}
        self._unbatched: set[str] = set()
        self.calls = 0  # batch (or single) calls sent

    def queue(self, address: str, req) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.setdefault(address, []).append((req, fut))
        task = self._flushers.get(address)
        if task is None or task.done():
            self._flushers[address] = loop.create_task(self._flush(address))
        return fut

    async def _flush(self, address: str) -> None:
        await asyncio.sleep(0)  # let the items queued in this loop turn join the batch
        while self._pending.get(address):
            batch, seen, later = [], set(), []
            for item in self._pending[address]:
                if item[1].done():
                    continue  # its caller is gone: nothing waits for this call, so it is not sent
                # An allocation id appears once per batch (the daemon refuses duplicates).
                aid = item[0].allocation_id
                (later if aid in seen or len(batch) >= self.max_items else batch).append(item)
                seen.add(aid)
            self._pending[address] = later
            if batch:
                try:
                    outcomes = await self._send(address, [r for r, _ in batch])
                except Exception as exc:  # noqa: BLE001 - a caller waits on each item: none is left hanging
                    log.error("%s to %s failed: %r", self.batch, address, exc)
                    outcomes = [exc] * len(batch)
                settle([fut for _, fut in batch], outcomes)

    async def _send(self, address: str, reqs: list) -> list:
        """Per request, in order: its response, or the exception that stands for its failure."""
        stub = self.agents.get(address)
        if address not in self._unbatched:
            self.calls += 1
            try:
                resp = await getattr(stub, self.batch)(self.batch_request(requests=reqs), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return [exc] * len(reqs)
                self._unbatched.add(address)  # a daemon from before the batch call
            except asyncio.TimeoutError as exc:
                return [exc] * len(reqs)
            else:
                if len(resp.results) != len(reqs):
                    return [RuntimeError(f"{self.batch} answered {len(resp.results)} results for "
                                         f"{len(reqs)} items")] * len(reqs)
                return [ItemRefused(r.error) if r.HasField("error") else r.response for r in resp.results]
        self.calls += len(reqs)
        call = getattr(stub, self.single)
        return await asyncio.gather(*[call(r, timeout=self.timeout_s) for r in reqs], return_exceptions=True)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(max_s, base_s * (2 ** max(0, attempt - 1))))

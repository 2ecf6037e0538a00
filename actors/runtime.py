"""Small shared pieces of the async actors: a DB thread, agent stubs, names."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import random

import grpc
import psycopg

from gpuaas.errors import Unavailable
from gpuaas.v1 import node_pb2_grpc

log = logging.getLogger("gpuaas.actors")

NAMESPACE = "gpuaas"
PLACEMENT = "placement"
LEDGER = "ledger"


class GcPacer:
    """Keeps the interpreter's full garbage collections short in a process that holds many long-lived
    objects (the placement actor's capacity view: ~9 tracked objects per allocation).

    A full collection walks every tracked object: ~95 ms at 50,000 allocations on the development
    machine, and it comes whenever the long-lived objects have grown by a quarter, so in steady churn
    every few tens of seconds, stalling every request in flight. ``tick`` (call it about once a second)
    moves what has survived so far out of the collector's sight (``gc.freeze``), so a collection only
    walks what is new. Reference cycles that die after being frozen are reclaimed only when the objects
    are given back to the collector, once every ``release_s``: one full collection then, not one per
    quarter of growth."""

    def __init__(self, *, freeze_every_s: float = 1.0, release_s: float = 600.0, clock=None):
        import time

        self._clock = clock or time.monotonic
        self.freeze_every_s, self.release_s = freeze_every_s, release_s
        now = self._clock()
        self._last_freeze, self._last_release = now, now
        self.stats = {"freezes": 0, "releases": 0, "last_release_ms": 0.0}

    def tick(self) -> None:
        import gc
        import time

        now = self._clock()
        if now - self._last_release >= self.release_s:
            self._last_release = self._last_freeze = now
            t0 = time.perf_counter()
            gc.unfreeze()
            gc.collect()
            self.stats["releases"] += 1
            self.stats["last_release_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        elif now - self._last_freeze >= self.freeze_every_s:
            self._last_freeze = now
            gc.freeze()
            self.stats["freezes"] += 1


def alloc_shard_name(i: int) -> str:
    return f"allocations-{i}"


def node_shard_name(i: int) -> str:
    return f"nodes-{i}"


class DbThread:
    """One connection on one thread: run store functions in a transaction from asyncio."""

    def __init__(self, url: str, name: str):
        self.url = url
        self._exec = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"db-{name}")
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            # Autocommit: ``tx`` opens its transaction explicitly, ``statement`` needs none.
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        return self._conn

    def _run(self, fn, args, kwargs, in_tx: bool = True):
        try:
            conn = self._connection()
            if not in_tx:
                return fn(conn, *args, **kwargs)
            with conn.transaction():
                return fn(conn, *args, **kwargs)
        except psycopg.OperationalError as exc:
            self._conn = None
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def tx(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._run, fn, args, kwargs)

    async def statement(self, fn, *args, **kwargs):
        """Run ``fn``, which issues exactly one statement, without BEGIN and COMMIT around it: the
        statement is its own transaction, one round trip."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._run, fn, args, kwargs, False)


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


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(max_s, base_s * (2 ** max(0, attempt - 1))))

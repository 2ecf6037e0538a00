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
            self._conn = psycopg.connect(self.url, connect_timeout=5)
        return self._conn

    def _run(self, fn, args, kwargs):
        try:
            conn = self._connection()
            with conn.transaction():
                return fn(conn, *args, **kwargs)
        except psycopg.OperationalError as exc:
            self._conn = None
            raise Unavailable(f"database unavailable: {exc}") from exc

    async def tx(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._exec, self._run, fn, args, kwargs)


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

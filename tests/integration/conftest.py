"""One real control plane for the integration tests: embedded Postgres (or
GPUAAS_DATABASE_URL), local Ray, the real actors and gRPC server, and real node
daemons on the simulated NVML backend. Tests isolate themselves by tenant."""
from __future__ import annotations

import os
import pathlib
import shutil
import uuid

import pytest

from gpuaas.client import Client
from gpuaas.config import ControlPlaneConfig

NODES = 3
GPUS = 4


@pytest.fixture(scope="session")
def control_plane(ray_session):
    from actors.bootstrap import ControlPlane, SimNodes

    data = pathlib.Path("/tmp") / f"gpuaas-it-{os.getpid()}"
    shutil.rmtree(data, ignore_errors=True)
    cfg = ControlPlaneConfig(listen="127.0.0.1:0", meter_interval_s=1.0, heartbeat_grace_s=2.0,
                             heartbeat_offline_s=4.0, telemetry_interval_ms=250, cleanup_backoff_base_s=0.05,
                             cleanup_backoff_max_s=0.2, allocation_shards=2, usage_window_s=1.0)
    cp = ControlPlane(config=cfg, data_dir=data / "pg", sim=SimNodes(NODES, GPUS, "H100"))
    cp.start(wait_nodes_s=90)
    yield cp
    cp.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def admin(control_plane):
    c = Client(control_plane.address, control_plane.admin_token)
    yield c
    c.close()


def new_tenant(admin: Client, control_plane) -> Client:
    """A fresh tenant and a client holding its placement token (``.tenant_id`` set)."""
    tid = "t-" + uuid.uuid4().hex[:8]
    admin.create_tenant(tid)
    c = Client(control_plane.address, admin.create_token(tid))
    c.tenant_id = tid
    return c


def give_back(c: Client) -> None:
    """Release everything the tenant still holds and wait for it, so tests do not starve each other."""
    from gpuaas.v1 import common_pb2 as pb
    live = [a for a in c.list() if a.state in (pb.ALLOCATION_STATE_QUEUED, pb.ALLOCATION_STATE_PLACED,
                                               pb.ALLOCATION_STATE_RUNNING)]
    for a in live:
        try:
            c.release(a.allocation_id)
        except Exception:  # noqa: BLE001
            pass
    for a in live:
        try:
            c.wait_state(a.allocation_id, {pb.ALLOCATION_STATE_RELEASED, pb.ALLOCATION_STATE_CANCELLED}, 30)
        except Exception:  # noqa: BLE001
            pass


def wait_capacity_back(cp, ids, timeout_s: float = 30.0) -> list[str]:
    """Wait until the placement actor's capacity view holds none of ``ids``; returns those it still holds."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while (held := ray.get(cp.placement.held.remote(list(ids)))) and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


def q(cp, sql, *params):
    """Read Postgres directly (as the owner): what the tests assert is what was committed."""
    import psycopg

    with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def tenant_fixture():
    """A fixture: a fresh tenant's client, which gives back what it still holds when the test ends.
    A module that needs two tenants declares a second one with this."""
    @pytest.fixture
    def _tenant(admin, control_plane):
        c = new_tenant(admin, control_plane)
        yield c
        give_back(c)
        c.close()
    return _tenant


tenant = tenant_fixture()


def rid() -> str:
    return "req-" + uuid.uuid4().hex[:10]

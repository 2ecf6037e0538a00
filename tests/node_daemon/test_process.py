"""The real `gpuaas-node-daemon` process: port file, fault files from outside, graceful SIGTERM."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest

from gpuaas.v1 import node_pb2
from tests.node_daemon.conftest import RegistryPeer, nvml_available, stub_for, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]


def _pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))


def _start(tmp_path, *extra, env_extra=None):
    port_file = tmp_path / "port"
    log = open(tmp_path / "daemon.log", "wb")
    env = dict(os.environ, PYTHONPATH=_pythonpath(), **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "node_daemon.main", "--name", "proc-node", "--listen",
                             "127.0.0.1:0", "--port-file", str(port_file), "--fault-dir", str(tmp_path / "faults"),
                             "--gpus", "4", "--grace-s", "2", *extra], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO)
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, 20)
    except AssertionError:
        proc.kill()
        raise
    assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
    return proc, port_file.read_text().strip(), port_file


def test_sigterm_shuts_down_gracefully(tmp_path, registry_factory):
    """SIGTERM mid-stream: the daemon deregisters, ends the stream, removes its port file and exits 0;
    a fault file written by another process reached the stream first."""
    peer, cp, _ = registry_factory(RegistryPeer())
    # auto exercises the NVML → simulated fallback where there is no GPU; with a GPU, force the
    # simulated backend so the GPU fault can be injected.
    backend = "simulated" if nvml_available() else "auto"
    proc, addr, port_file = _start(tmp_path, "--control-plane", cp, "--backend", backend,
                                   env_extra={"GPUAAS_NODE_TOKEN": "tok"})
    try:
        wait_for(lambda: peer.registers, 10)
        assert peer.registers[0][2]["authorization"] == "Bearer tok"
        call = stub_for(addr).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=100), timeout=30)
        it = iter(call)
        next(it)
        faults = tmp_path / "faults"
        (faults / ".x.tmp").write_text(json.dumps({"fault": "xid", "gpu": 2, "xid": 95}))
        (faults / ".x.tmp").rename(faults / "x.json")
        for f in it:
            if f.xid_events:
                assert (f.xid_events[0].gpu_index, f.xid_events[0].xid) == (2, 95)
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = list(it)  # the stream ends cleanly rather than hanging
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 6
        assert len(rest) < 50
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "daemon.log").read_text()
    assert "SIGTERM received" in log and "stopped in" in log
    assert [d.node_id for d in peer.deregisters] == ["proc-node"]
    assert not port_file.exists()
    if not nvml_available():
        assert "NVML unavailable" in log and "SIMULATED backend" in log


def test_bad_cli_arguments_exit_nonzero(tmp_path):
    """Nonsense flags (too many GPUs, bad labels) stop the daemon at start with a message, not a traceback."""
    for args in (["--gpus", "65"], ["--labels", "novalue"]):
        r = subprocess.run([sys.executable, "-m", "node_daemon.main", "--no-register", *args], capture_output=True,
                           text=True, timeout=30, cwd=REPO, env=dict(os.environ, PYTHONPATH=_pythonpath()))
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not nvml_available(), reason="needs NVML to show that --backend nvml works")
def test_forced_nvml_backend_starts(tmp_path):
    """--backend nvml on a GPU machine serves the real inventory."""
    proc, addr, _ = _start(tmp_path, "--no-register", "--backend", "nvml")
    try:
        inv = stub_for(addr).GetInventory(node_pb2.GetInventoryRequest(), timeout=5)
        assert inv.backend == "nvml" and not inv.simulated
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_forced_nvml_without_nvml_fails_clearly(tmp_path):
    """--backend nvml where NVML cannot start exits non-zero saying why (no silent fallback when forced)."""
    if nvml_available():
        pytest.skip("NVML works here")
    r = subprocess.run([sys.executable, "-m", "node_daemon.main", "--no-register", "--backend", "nvml"],
                       capture_output=True, text=True, timeout=30, cwd=REPO, env=dict(os.environ, PYTHONPATH=_pythonpath()))
    assert r.returncode == 2 and "cannot start" in r.stderr and "nvmlInit" in r.stderr


def test_the_daemon_ends_with_the_process_it_was_told_to_follow(tmp_path):
    """--exit-with-pid: when that process dies without stopping the daemon (killed outright), the daemon
    notices within a second or so and shuts down gracefully (exit 0, port file removed)."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc = None
    try:
        proc, _, port_file = _start(tmp_path, "--no-register", "--backend", "simulated",
                                    "--exit-with-pid", str(parent.pid))
        time.sleep(1.2)
        assert proc.poll() is None, "the daemon must run while the process it follows lives"
        parent.kill()
        parent.wait()
        assert proc.wait(timeout=15) == 0
        assert not port_file.exists()
        assert "gone: shutting down gracefully" in (tmp_path / "daemon.log").read_text()
    finally:
        parent.kill()
        if proc is not None and proc.poll() is None:
            proc.kill()

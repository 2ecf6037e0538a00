"""Backend selection and the simulated backend's behaviour: fallback, determinism, load response, islands."""
from __future__ import annotations

import logging

import pytest

from node_daemon.backend import model_from_name
from node_daemon.daemon import BackendChoice, DaemonConfig, open_backend
from node_daemon.nvml_backend import NvmlUnavailable
from node_daemon.sim_backend import SimulatedBackend


class _NoDriver:
    """Stands in for pynvml on a machine without the NVIDIA driver: nvmlInit fails as the real one does."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def nvmlInit(self):
        raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")


def test_auto_falls_back_to_simulated_with_log_line(caplog):
    """backend=auto with NVML absent picks the simulated backend and says so in the log."""
    caplog.set_level(logging.WARNING, logger="gpuaas.node_daemon")
    b = open_backend(DaemonConfig(node_name="n", backend=BackendChoice.AUTO, gpus=2), nvml_module=_NoDriver())
    assert isinstance(b, SimulatedBackend) and b.simulated and b.inventory().simulated
    assert b.inventory().backend.value == "simulated"
    assert any("NVML unavailable" in r.message and "SIMULATED backend" in r.message for r in caplog.records)


def test_forced_nvml_does_not_fall_back():
    """backend=nvml with NVML absent raises instead of silently simulating."""
    with pytest.raises(NvmlUnavailable):
        open_backend(DaemonConfig(node_name="n", backend=BackendChoice.NVML), nvml_module=_NoDriver())


def test_simulated_is_deterministic_from_seed():
    """Two simulated backends with the same seed and clock produce identical samples; another seed differs."""
    def run(seed):
        t = [0.0]
        b = SimulatedBackend(gpus=4, seed=seed, clock=lambda: t[0], wall_clock=lambda: 1e9 + t[0])
        b.on_prepare("a", [0, 1], 1000)
        out = []
        for _ in range(20):
            t[0] += 0.5
            out.append(b.sample())
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_metrics_follow_allocations_and_energy_integrates_power():
    """A GPU held by an allocation gets busy (util, power, memory, temperature rise); energy = ∫ power dt."""
    t = [0.0]
    b = SimulatedBackend(gpus=2, model="A100", clock=lambda: t[0])
    t[0] = 1.0
    idle = b.sample()
    b.on_prepare("a", [1], 1000)
    for _ in range(20):
        t[0] += 0.5
        busy = b.sample()
    g0, g1 = busy
    assert g0.gpu_util_pct == 0 and g1.gpu_util_pct >= 85
    assert g1.power_mw > 4 * idle[1].power_mw and g1.memory_used_mib > idle[1].memory_used_mib + 10_000
    assert g1.temperature_c >= idle[1].temperature_c + 25
    assert len(g1.processes) == 1 and not g0.processes
    # idle GPU: 55 W for 11 s = 605 J = 605,000 mJ
    assert abs(g0.energy_mj - 55_000 * 11) <= 1
    b.end_processes([1])
    b.on_release("a")
    t[0] += 0.5
    assert b.sample()[1].gpu_util_pct == 0


def test_fractional_shares_add_up():
    """Two 300-milli allocations on one GPU load it about 60%."""
    t = [0.0]
    b = SimulatedBackend(gpus=1, clock=lambda: t[0])
    b.on_prepare("a", [0], 300)
    b.on_prepare("b", [0], 300)
    t[0] = 1
    assert 50 <= b.sample()[0].gpu_util_pct <= 60


@pytest.mark.parametrize("gpus,island_size,expected", [(8, 0, [0] * 8), (8, 4, [0, 0, 0, 0, 1, 1, 1, 1]),
                                                       (4, 1, [0, 1, 2, 3])])
def test_nvlink_islands_configurable(gpus, island_size, expected):
    """Simulated NVLink islands: all GPUs in one, or islands of N."""
    b = SimulatedBackend(gpus=gpus, island_size=island_size)
    assert [g.nvlink_island for g in b.inventory().gpus] == expected


@pytest.mark.parametrize("name,model", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"),
                                        ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"), ("Tesla T4", "T4"),
                                        ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA L40S", "L40S"),
                                        ("NVIDIA L4", "L4"), ("NVIDIA H200", "H200"),
                                        ("NVIDIA Mystery X9", "Mystery")])
def test_model_from_name(name, model):
    """The short placement model is read from the driver's device name."""
    assert model_from_name(name) == model

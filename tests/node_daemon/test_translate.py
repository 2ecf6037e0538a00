"""Translation of raw NVML readings (fixtures/) into the inventory and samples the daemon serves."""
from __future__ import annotations

import json
import pathlib

import pytest

from node_daemon import nvml_translate as tr
from node_daemon.health import HealthView
from gpuaas.lifecycle import GpuState

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ALL = sorted(FIXTURES.glob("nvml_readings_*.json"))


def _load(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_every_fixture_translates_consistently(path):
    """Every readings file (hand-written or recorded on a GPU) yields one GpuInfo and one sample per device."""
    r = json.loads(path.read_text())
    assert r["format"] == tr.FORMAT
    inv = tr.inventory_from_readings(r)
    samples = tr.samples_from_readings(r)
    assert len(inv.gpus) == len(samples) == len(r["devices"]) >= 1
    assert len({g.uuid for g in inv.gpus}) == len(inv.gpus)
    assert all(g.model and g.memory_mib > 0 for g in inv.gpus)
    assert sorted({g.nvlink_island for g in inv.gpus}) == list(range(len({g.nvlink_island for g in inv.gpus})))
    for s in samples:
        assert 0 <= s.gpu_util_pct <= 100 and s.power_mw >= 0 and s.energy_mj >= 0


def test_hgx_inventory_islands_and_samples():
    """NVSwitch-connected H100s share an island; a GPU with inactive links is alone; values convert to MiB/mW/mJ."""
    r = _load("nvml_readings_hgx_h100.json")
    inv = tr.inventory_from_readings(r)
    assert inv.backend.value == "nvml" and not inv.simulated and inv.driver_version == "550.54.15"
    assert [g.model for g in inv.gpus] == ["H100"] * 4
    assert [g.memory_mib for g in inv.gpus] == [81920] * 4
    assert [g.nvlink_island for g in inv.gpus] == [0, 0, 0, 1]
    assert [g.mig_enabled for g in inv.gpus] == [False, False, True, False]
    assert inv.gpus[1].pci_bus_id == "00000000:2A:00.0"
    s0, s1, s2, _ = tr.samples_from_readings(r)
    assert (s0.gpu_util_pct, s0.memory_util_pct, s0.memory_used_mib) == (97, 41, 74 * 1024)
    assert (s0.temperature_c, s0.power_mw, s0.sm_clock_mhz, s0.energy_mj) == (61, 612_345, 1980, 987_654_321)
    assert [(p.pid, p.used_memory_mib, p.name) for p in s0.processes] == [(4242, 73 * 1024, "python")]
    assert (s1.ecc_volatile_corrected, s1.ecc_volatile_uncorrected, s1.ecc_aggregate_uncorrected) == (12, 1, 3)
    assert s1.retired_pages == 3  # Ampere+: remapped rows stand in for retired pages
    assert s2.throttle_reasons == 0x68 and s2.temperature_c == 93


def test_pcie_not_supported_is_zero_and_lost_is_flagged():
    """NotSupported readings (null) become zeros, not crashes; pre-Ampere retired pages count; a lost GPU is flagged."""
    r = _load("nvml_readings_pcie_mixed.json")
    inv = tr.inventory_from_readings(r)
    assert [g.model for g in inv.gpus] == ["A100", "A100", "L4", "V100"]
    assert [g.nvlink_island for g in inv.gpus] == [0, 0, 1, 2]  # bridge matched across PCI id spellings
    assert inv.gpus[2].mig_enabled is False
    a0, _, l4, v100 = tr.samples_from_readings(r)
    assert (a0.gpu_util_pct, a0.power_mw) == (12, 61_000)
    assert (l4.gpu_util_pct, l4.power_mw, l4.energy_mj, l4.sm_clock_mhz, l4.throttle_reasons) == (0, 0, 0, 0, 0)
    assert (l4.ecc_volatile_uncorrected, l4.retired_pages) == (0, 0)
    assert [(p.pid, p.used_memory_mib) for p in l4.processes] == [(777, 0)]
    assert v100.lost and v100.power_mw == 0


def test_translated_samples_drive_health_rules():
    """The health view reads translated samples: uncorrectable ECC, thermal slowdown and a lost GPU are UNHEALTHY."""
    hgx = tr.samples_from_readings(_load("nvml_readings_hgx_h100.json"))
    h = HealthView([0, 1, 2, 3])
    h.observe(hgx)
    assert [h.state(i)[0] for i in range(4)] == [GpuState.READY, GpuState.UNHEALTHY, GpuState.UNHEALTHY,
                                                 GpuState.READY]
    pcie = tr.samples_from_readings(_load("nvml_readings_pcie_mixed.json"))
    h2 = HealthView([0, 1, 2, 3])
    h2.observe(pcie)
    assert h2.state(3)[0] is GpuState.UNHEALTHY and "bus" in h2.state(3)[1]


@pytest.mark.parametrize("a,b,same", [("00000000:18:00.0", "0000:18:00.0", True), ("00000000:18:00.0", "18:00.0", False),
                                      ("0000:1a:00.0", "00000000:1A:00.0", True)])
def test_pci_id_normalisation(a, b, same):
    """PCI bus ids compare equal across NVML's 8- and 4-digit domain spellings and letter case."""
    assert (tr.normalize_pci(a) == tr.normalize_pci(b)) is same


def test_recorded_h100_readings():
    """Readings recorded by gpu_check.py on a real H100 (under a matmul load) translate to the expected values."""
    r = _load("nvml_readings_recorded_h100.json")
    assert r["source"] == "recorded" and r["driver_version"] == "580.159.04"
    inv = tr.inventory_from_readings(r)
    (g,) = inv.gpus
    assert (g.name, g.model, g.memory_mib, g.nvlink_island) == ("NVIDIA H100 80GB HBM3", "H100", 81559, 0)
    assert g.uuid == "GPU-5e7ca3a8-f164-7e43-79c1-539f08503f7c" and not g.mig_enabled
    (s,) = tr.samples_from_readings(r)
    assert (s.gpu_util_pct, s.temperature_c, s.power_mw, s.sm_clock_mhz) == (100, 58, 695_419, 1290)
    assert s.throttle_reasons == 0x4  # SW power cap while the matmul loop runs
    assert s.memory_used_mib == 1_697_447_936 // 2**20 and s.energy_mj == 6_081_775
    assert (s.ecc_volatile_uncorrected, s.retired_pages) == (0, 0)
    assert [(p.pid, p.name) for p in s.processes] == [(493, "python3")]

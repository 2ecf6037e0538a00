"""The XID classification table (gpuaas/xid.py) that the daemon and the control side's health rules share."""
from __future__ import annotations

import pytest

from gpuaas import xid


@pytest.mark.parametrize("code", [13, 31, 43, 45, 68, 109])
def test_application_errors_never_take_a_gpu_out(code):
    """Application XIDs (catalog RESTART_APP) keep the GPU in service."""
    assert xid.classify(code) is xid.XidAction.APPLICATION and not xid.takes_gpu_out_of_service(code)


@pytest.mark.parametrize("code", [48, 63, 64, 74, 79, 92, 94, 95, 119, 120])
def test_fatal_codes_need_a_gpu_reset(code):
    """DBE, row-remap events/failures, NVLink, fell off the bus, ECC containment and GSP errors take the GPU out."""
    assert xid.classify(code) is xid.XidAction.RESET_GPU and xid.takes_gpu_out_of_service(code)
    assert not xid.affects_node(code)


def test_drain_node_and_informational():
    """Drain-node codes take every GPU out; informational ones take none."""
    assert xid.affects_node(154) and xid.takes_gpu_out_of_service(154)
    assert xid.classify(93) is xid.XidAction.INFORMATIONAL and not xid.takes_gpu_out_of_service(93)


def test_unknown_codes_get_the_conservative_default():
    """A code not in the table is treated as RESET_GPU (documented default) and reported as unknown."""
    assert not xid.is_known(9999) and xid.classify(9999) is xid.UNKNOWN_DEFAULT is xid.XidAction.RESET_GPU
    assert "not in the catalog" in xid.describe(9999)


def test_table_is_complete_and_read_only():
    """Every row has a description and an action; the exported table cannot be modified."""
    assert all(row.description and isinstance(row.action, xid.XidAction) for row in xid.TABLE.values())
    with pytest.raises(TypeError):
        xid.TABLE[13] = None  # type: ignore[index]

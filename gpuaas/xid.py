"""NVIDIA XID classification: which codes take a GPU (or node) out of service.

The classes follow the "Resolution Bucket (Immediate Action)" column of
NVIDIA's XID catalog:

    NVIDIA, "XID Errors" (deploy guide), section "Analyzing Xid Errors with the
    Xid Catalog": https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html
    (Ampere and newer; Volta and older: "Xid and SXid Errors" in the same guide)

    catalog bucket      →  XidAction       what the control side does
    RESTART_APP         →  APPLICATION     nothing: the tenant's program faulted, the GPU is fine
    IGNORE              →  INFORMATIONAL   record it
    RESET_GPU           →  RESET_GPU       that GPU → UNHEALTHY, its allocations → FAILED
    RESTART_BM          →  DRAIN_NODE      every GPU of the node leaves service (node reboot)
    CONTACT_SUPPORT /
    codes not listed    →  RESET_GPU       conservative default, see UNKNOWN_DEFAULT

Why the default for an unknown code is RESET_GPU: an XID is the driver telling
us that something went wrong on that GPU. Leaving a GPU that may silently
corrupt a tenant's results in service costs more than taking one GPU out until
an operator clears it (per-GPU: the rest of the node keeps serving). This is
also what NVIDIA's Kubernetes device plugin does: every XID is critical except
an explicit list of application errors.

The table is data; `classify` is the only lookup. `tests/node_daemon/test_xid.py`
pins the codes the health rules depend on.
"""
from __future__ import annotations

import dataclasses
import enum
from types import MappingProxyType


class XidAction(enum.Enum):
    # Informational: nothing is wrong with the GPU; record only.
    INFORMATIONAL = "informational"
    # The application faulted (bad pointer, illegal instruction, engine exception
    # caused by the program). Must NOT take the GPU out of service.
    APPLICATION = "application"
    # Fatal for this GPU: it needs a reset (or replacement) before it can be trusted.
    RESET_GPU = "reset_gpu"
    # The whole node must be drained and rebooted.
    DRAIN_NODE = "drain_node"


@dataclasses.dataclass(frozen=True)
class XidClass:
    xid: int
    action: XidAction
    description: str


UNKNOWN_DEFAULT = XidAction.RESET_GPU

_A, _I, _R, _D = XidAction.APPLICATION, XidAction.INFORMATIONAL, XidAction.RESET_GPU, XidAction.DRAIN_NODE

_ROWS: list[tuple[int, XidAction, str]] = [
    # --- application errors (catalog: RESTART_APP) --------------------------------
    (8, _A, "GPU stopped processing (channel idle timeout)"),
    (13, _A, "Graphics engine exception (illegal address, out-of-range access in a kernel)"),
    (31, _A, "GPU memory page fault (MMU fault, usually an application bug)"),
    (43, _A, "GPU stopped processing: reset channel verification error (application fault)"),
    (45, _A, "Preemptive cleanup after a previous error (channel torn down)"),
    (68, _A, "NVDEC0 video decoder exception"),
    (69, _A, "Graphics engine class error"),
    (109, _A, "Context switch timeout"),
    # video / JPEG / optical-flow engine exceptions: the program that used the engine
    (65, _A, "Video processor exception"),
    (73, _A, "NVENC2 error"),
    (82, _A, "NVJPG0 error"),
    (83, _A, "NVDEC1 error"),
    (84, _A, "NVDEC2 error"),
    (86, _A, "OFA (optical flow accelerator) exception"),
    (88, _A, "NVDEC3 error"),
    (89, _A, "NVDEC4 error"),
    # --- informational (catalog: IGNORE) -------------------------------------------
    (93, _I, "Non-fatal violation of the provisioned InfoROM wear limit"),
    (106, _I, "SMBPBI test message"),
    (107, _I, "SMBPBI test message (silent)"),
    # display engine: no display on a compute node, nothing a tenant depends on
    (16, _I, "Display engine hung"),
    (19, _I, "Display engine error"),
    (56, _I, "Display engine error"),
    (111, _I, "Display bundle error event"),
    (112, _I, "Display supervisor error"),
    (113, _I, "DisplayPort link training error"),
    (114, _I, "Display pipeline underflow"),
    (115, _I, "Display core channel error"),
    (116, _I, "Display window channel error"),
    (117, _I, "Display cursor channel error"),
    (118, _I, "Display pixel pipeline error"),
    # --- fatal for the GPU (catalog: RESET_GPU) ------------------------------------
    (48, _R, "Double-bit ECC error (uncorrectable DRAM error)"),
    (62, _R, "Internal micro-controller halt"),
    (63, _R, "ECC page retirement / row remapping recording event (reset to activate)"),
    (64, _R, "ECC page retirement / row remapper recording failure"),
    (74, _R, "NVLink error"),
    (79, _R, "GPU has fallen off the bus"),
    (92, _R, "High single-bit ECC error rate"),
    (94, _R, "Contained ECC error"),
    (95, _R, "Uncontained ECC error"),
    (119, _R, "GSP RPC timeout"),
    (120, _R, "GSP error"),
    (121, _R, "C2C link error"),
    (140, _R, "Unrecovered ECC error"),
    # --- the node must be drained and rebooted (catalog: RESTART_BM) ---------------
    (54, _D, "Auxiliary power is not connected to the GPU board"),
    (143, _D, "GPU initialization failure"),
    # The driver changed the GPU's recovery action (e.g. to "node reboot
    # required"); we cannot read the new action from the event, so drain.
    (154, _D, "GPU recovery action changed"),
]

TABLE: MappingProxyType = MappingProxyType({x: XidClass(x, a, d) for x, a, d in _ROWS})
assert len(TABLE) == len(_ROWS), "duplicate XID in the table"


def classify(xid: int) -> XidAction:
    """The action the catalog prescribes for ``xid``; UNKNOWN_DEFAULT when unlisted."""
    row = TABLE.get(int(xid))
    return row.action if row is not None else UNKNOWN_DEFAULT


def describe(xid: int) -> str:
    row = TABLE.get(int(xid))
    return row.description if row is not None else f"XID {xid} (not in the catalog table; treated as {UNKNOWN_DEFAULT.value})"


def is_known(xid: int) -> bool:
    return int(xid) in TABLE


def takes_gpu_out_of_service(xid: int) -> bool:
    """True when the GPU must leave service (RESET_GPU or DRAIN_NODE)."""
    return classify(xid) in (XidAction.RESET_GPU, XidAction.DRAIN_NODE)


def affects_node(xid: int) -> bool:
    """True when the whole node must be drained, not only the GPU."""
    return classify(xid) is XidAction.DRAIN_NODE

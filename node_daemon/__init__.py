"""gpuaas-node-daemon: the per-node GPU agent (see README.md)."""
from node_daemon.backend import GpuBackend, GpuDevice, GpuSample, Inventory, XidRecord
from node_daemon.daemon import BackendChoice, DaemonConfig, NodeDaemon

__all__ = ["GpuBackend", "GpuDevice", "GpuSample", "Inventory", "XidRecord", "BackendChoice", "DaemonConfig",
           "NodeDaemon"]

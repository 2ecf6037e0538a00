"""gpuaas: the shared vocabulary of the control plane.

Generated contract code (``gpuaas.v1``), lifecycle state machines
(``gpuaas.lifecycle``), the error model (``gpuaas.errors``), auth, config, the
CLI and the client SDK.
"""

__version__ = "0.1.0"

"""Errors of the ledger, inside the control plane's one hierarchy.

    gpuaas.errors.GpuaasError
    ├── InvalidArgument
    │   └── InvalidEntry          no   bad input: negative or empty duration, end before
    │                                  start, unknown tenant, unpriced model, bad share
    └── AlreadyExists
        └── IdempotencyConflict   no   an entry with this key exists with a different body

A failing batch raises before COMMIT, so nothing of it is written.
"""
from __future__ import annotations

from gpuaas.errors import AlreadyExists, InvalidArgument


class InvalidEntry(InvalidArgument):
    def __init__(self, message: str, *, field: str = ""):
        super().__init__(message, violations=[(field, message)] if field else None)
        self.field = field


class IdempotencyConflict(AlreadyExists):
    def __init__(self, key: str, field: str, stored, new):
        super().__init__(f"entry {key} exists with a different {field}: stored {stored!r}, new {new!r}")
        self.key = key
        self.field = field

"""Read openb-format CSVs (alibaba/clusterdata cluster-trace-gpu-v2023) into domain values.

The only module of the package that touches files; it is given paths, never
looks for them.
"""
from __future__ import annotations

import csv
import dataclasses
import pathlib

from scheduler.frag import TaskShape
from scheduler.types import MILLI, GpuSpec, NodeSpec, Request


@dataclasses.dataclass(frozen=True, slots=True)
class Pod:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int            # per GPU, as in the trace
    models: tuple[str, ...]
    creation_time: int | None = None
    deletion_time: int | None = None

    @property
    def gpu_demand_milli(self) -> int:
        return self.num_gpu * self.gpu_milli

    def shape(self) -> TaskShape:
        return TaskShape(self.cpu_milli, self.num_gpu, self.gpu_milli, self.models)

    def request(self, key: str | None = None) -> Request:
        if self.num_gpu <= 0 or self.gpu_milli <= 0:
            return Request(key=key or self.name, cpu_milli=self.cpu_milli, memory_mib=self.memory_mib)
        return Request(key=key or self.name, num_gpu=self.num_gpu,
                       gpu_milli=self.gpu_milli if self.gpu_milli < MILLI else MILLI,
                       cpu_milli=self.cpu_milli, memory_mib=self.memory_mib, gpu_models=self.models)


def _int(v: str | None) -> int | None:
    if v is None or v == "":
        return None
    return int(float(v))


def load_pods(path: str | pathlib.Path) -> list[Pod]:
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            spec = (row.get("gpu_spec") or "").strip()
            out.append(Pod(name=row["name"], cpu_milli=int(row["cpu_milli"]), memory_mib=int(row["memory_mib"]),
                           num_gpu=int(row["num_gpu"]), gpu_milli=int(row["gpu_milli"]),
                           models=tuple(m for m in spec.split("|") if m),
                           creation_time=_int(row.get("creation_time")), deletion_time=_int(row.get("deletion_time"))))
    return out


def load_nodes(path: str | pathlib.Path, *, gpu_only: bool = True) -> list[NodeSpec]:
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            gpus = int(row.get("gpu") or 0)
            if gpu_only and gpus <= 0:
                continue
            model = (row.get("model") or "").strip()
            out.append(NodeSpec(node_id=row["sn"], cpu_milli=int(row["cpu_milli"]),
                                memory_mib=int(row["memory_mib"]),
                                gpus=tuple(GpuSpec(model=model) for _ in range(gpus)), labels={}))
    return out

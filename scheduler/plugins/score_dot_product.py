"""Score: Tetris-style alignment of the request with the node's free vector (paper's DotProd).

Both vectors are normalised by the largest node spec (128 CPU, 8 GPUs); the
node whose free vector aligns least with the request after placement wins,
which packs like best fit while weighing CPU and GPU together.
"""
import numpy as np

from scheduler.types import PolicyName

NAME = "DotProduct"
POLICY = PolicyName.DOT_PRODUCT
MAX_SPEC_CPU_MILLI = 128_000
MAX_SPEC_GPU_MILLI = 8_000


def score(a, need, cand, ctx):
    cpu_left = a["cpu_free"][cand].astype(float)
    gpu_left = (a["gfree"][cand] * a["gusable"][cand]).sum(axis=1).astype(float)
    dot = (cpu_left * need.cpu / MAX_SPEC_CPU_MILLI ** 2 + gpu_left * need.gpu_total / MAX_SPEC_GPU_MILLI ** 2) / 2
    return np.trunc((1.0 - dot) * 100.0).astype(np.int64)

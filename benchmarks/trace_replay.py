"""Replay the openb traces through the placement engine (FGD paper protocol, or over time).

    python benchmarks/trace_replay.py --workload all --policy all --seeds 42-51 --json out/replay.json

Thin wrapper: the logic lives in scheduler/replay.py (also `gpuaas simulate`).
"""
import sys

import _common  # noqa: F401  (puts the repo on sys.path)

from scheduler.replay import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

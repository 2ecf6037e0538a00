"""Render the transition tables into docs/state-machines.md.

Usage: python -m gpuaas.lifecycle.render [--check]
"""
from __future__ import annotations

import pathlib
import sys

from gpuaas.lifecycle.allocation import ALLOCATION_TABLE
from gpuaas.lifecycle.node import GPU_TABLE, NODE_TABLE
from gpuaas.lifecycle.table import TransitionTable

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "state-machines.md"


def _table(t: TransitionTable) -> str:
    lines = ["| from | event | to | who | billing | effects |", "|---|---|---|---|---|---|"]
    for e in t.edges:
        src = e.src.name if e.src is not None else "—"
        who = "automatic" if e.automatic else "operator / client"
        billing = e.billing.value if e.billing is not None else ""
        lines.append(f"| {src} | {e.event.value} | {e.dst.name} | {who} | {billing} | {e.effects} |")
    return "\n".join(lines)


def render() -> str:
    return "\n".join([
        "# State machines",
        "",
        "Generated from `gpuaas/lifecycle/` by `python -m gpuaas.lifecycle.render`;",
        "`tests/test_lifecycle.py` fails when this file is stale. Every transition is",
        "persisted as a state change, an event row and an outbox row in one transaction",
        "(`actors/store.py`). *automatic* edges are taken by the control plane itself;",
        "*operator / client* edges wait for a person or an API call.",
        "",
        "## Allocation",
        "",
        _table(ALLOCATION_TABLE),
        "",
        "A gang is one allocation with several replicas, so its members move together:",
        "one member failing to prepare rolls the whole gang back to QUEUED.",
        "",
        "## Node",
        "",
        _table(NODE_TABLE),
        "",
        "## GPU",
        "",
        "One bad GPU makes only that GPU unschedulable.",
        "",
        _table(GPU_TABLE),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m gpuaas.lifecycle.render", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

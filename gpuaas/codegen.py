"""Regenerate the committed protobuf/gRPC code from proto/gpuaas/v1.

One pinned generator (grpcio-tools, version pinned in pyproject.toml) writes
``gpuaas/v1/*_pb2*.py``. ``tests/test_contract.py`` runs this into a temporary
folder and fails on any difference, so the contract and its code never drift.

Usage: python -m gpuaas.codegen [--out DIR]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "gpuaas" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc into out_dir; returns the files written (relative paths)."""
    import google.rpc.status_pb2  # noqa: F401  (locates google/rpc/*.proto)
    from grpc_tools import protoc
    import grpc_tools

    google_rpc_root = pathlib.Path(google.rpc.status_pb2.__file__).resolve().parents[2]
    wkt_root = pathlib.Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt_root}",
        f"-I{google_rpc_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ] + [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    init = out_dir / "gpuaas" / "v1" / "__init__.py"
    init.write_text('"""Generated from proto/gpuaas/v1 by gpuaas.codegen. Do not edit."""\n')
    return sorted(p.relative_to(out_dir) for p in (out_dir / "gpuaas" / "v1").glob("*.py*"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=REPO)
    ns = ap.parse_args(argv)
    for f in generate(ns.out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

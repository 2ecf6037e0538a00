"""Fault injection from outside the process: JSON files dropped in --fault-dir.

The fault interface is deliberately not a gRPC service (it is not part of the
contract and must never be reachable from the network). A test or operator
writes a file into the daemon's fault directory; the daemon polls the directory
every 100 ms (SIGUSR1 makes it look at once), applies each `*.json` file in
name order and deletes it. A file it cannot apply is renamed `<name>.rejected`
and the reason written to `<name>.rejected.reason`. Write the file under another
name (e.g. `x.json.tmp`, or a name starting with '.') and rename it to `*.json`
so the daemon never reads half a file.

One file holds one command object or a list of them:

    {"fault": "xid", "gpu": 3, "xid": 79, "message": "optional text"}
    {"fault": "ecc_uncorrectable", "gpu": 1, "count": 1}     also emits XID 48
    {"fault": "thermal_trip", "gpu": 2}
    {"fault": "fall_off_bus", "gpu": 5}                      also emits XID 79
    {"fault": "freeze", "seconds": 30}                        0 / absent: until "thaw"
    {"fault": "thaw"}
    {"fault": "clear", "gpu": 3}                              absent gpu: every GPU
    {"fault": "prepare_fail", "times": 2}                     the next N Prepare calls fail (UNAVAILABLE)
    {"fault": "cleanup_fail", "times": 3}                     the next N Cleanup calls fail (UNAVAILABLE)

GPU faults need the simulated backend; freeze/thaw and prepare_fail/cleanup_fail
work on any backend.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import pathlib
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node_daemon.daemon import NodeDaemon

log = logging.getLogger("gpuaas.node_daemon.faults")

POLL_S = 0.1
FILE_BYTES_MAX = 64 * 1024
COMMANDS_PER_FILE_MAX = 256


class FaultKind(enum.Enum):
    XID = "xid"
    ECC_UNCORRECTABLE = "ecc_uncorrectable"
    THERMAL_TRIP = "thermal_trip"
    FALL_OFF_BUS = "fall_off_bus"
    FREEZE = "freeze"
    THAW = "thaw"
    CLEAR = "clear"
    PREPARE_FAIL = "prepare_fail"
    CLEANUP_FAIL = "cleanup_fail"


class CallFaults:
    """Counters of injected Prepare / Cleanup failures, consumed one per call."""

    def __init__(self):
        self._lock = threading.Lock()
        self._left: dict[str, int] = {}

    def arm(self, kind: str, times: int) -> None:
        with self._lock:
            self._left[kind] = times

    def take(self, kind: str) -> bool:
        with self._lock:
            n = self._left.get(kind, 0)
            if n <= 0:
                return False
            self._left[kind] = n - 1
            return True


class FaultError(ValueError):
    pass


def _int(cmd: dict, key: str, *, default: int | None = None, lo: int = 0, hi: int = 2**31 - 1) -> int:
    v = cmd.get(key, default)
    if v is None:
        raise FaultError(f"'{key}' is required for fault {cmd.get('fault')!r}")
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FaultError(f"'{key}' must be an integer in {lo}..{hi}, got {v!r}")
    return v


def apply_fault(daemon: "NodeDaemon", cmd: object) -> str:
    """Apply one command; returns what was done, raises FaultError when it cannot."""
    if not isinstance(cmd, dict):
        raise FaultError(f"a fault command is a JSON object, got {type(cmd).__name__}")
    try:
        kind = FaultKind(cmd.get("fault"))
    except ValueError:
        raise FaultError(f"unknown fault {cmd.get('fault')!r}; one of {[k.value for k in FaultKind]}") from None
    if kind is FaultKind.FREEZE:
        seconds = cmd.get("seconds", 0) or 0
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 86_400:
            raise FaultError("'seconds' must be a number in 0..86400")
        daemon.hub.freeze(float(seconds))
        return f"freeze {seconds or 'until thaw'}"
    if kind is FaultKind.THAW:
        daemon.hub.thaw()
        return "thaw"
    if kind in (FaultKind.PREPARE_FAIL, FaultKind.CLEANUP_FAIL):
        times = _int(cmd, "times", default=1, lo=0, hi=1_000_000)
        daemon.call_faults.arm(kind.value, times)
        return f"{kind.value} x{times}"
    sim = daemon.sim_backend
    if sim is None:
        raise FaultError(f"fault {kind.value!r} needs the simulated backend (this daemon runs {daemon.backend.name})")
    n = len(daemon.inventory.gpus)
    if kind is FaultKind.CLEAR:
        gpu = cmd.get("gpu")
        if gpu is not None:
            gpu = _int(cmd, "gpu", hi=n - 1)
        sim.clear(gpu)
        daemon.health.clear(gpu)
        return f"clear GPU {'all' if gpu is None else gpu}"
    gpu = _int(cmd, "gpu", hi=n - 1)
    if kind is FaultKind.XID:
        code = _int(cmd, "xid", lo=1, hi=100_000)
        message = str(cmd.get("message", ""))[:200]
        sim.inject_xid(gpu, code, message)
        return f"XID {code} on GPU {gpu}"
    if kind is FaultKind.ECC_UNCORRECTABLE:
        count = _int(cmd, "count", default=1, lo=1, hi=1_000_000)
        sim.inject_ecc_uncorrectable(gpu, count)
        return f"{count} uncorrectable ECC error(s) on GPU {gpu}"
    if kind is FaultKind.THERMAL_TRIP:
        sim.inject_thermal_trip(gpu)
        return f"thermal trip on GPU {gpu}"
    if kind is FaultKind.FALL_OFF_BUS:
        sim.inject_fall_off_bus(gpu)
        return f"GPU {gpu} fell off the bus"
    raise FaultError(f"unhandled fault {kind.value}")  # pragma: no cover - every kind is handled above


class FaultWatcher:
    def __init__(self, daemon: "NodeDaemon", directory: pathlib.Path):
        self.daemon, self.dir = daemon, pathlib.Path(directory)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.rejected = 0

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="fault-watcher", daemon=True)
        self._thread.start()
        log.info("fault injection: watching %s for *.json commands", self.dir)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 - never let a bad file end fault injection
                log.warning("fault directory scan failed: %s", exc)
            self._wake.wait(POLL_S)
            self._wake.clear()

    def scan(self) -> int:
        done = 0
        try:
            names = sorted(e.name for e in os.scandir(self.dir) if e.is_file() and e.name.endswith(".json")
                           and not e.name.startswith("."))
        except FileNotFoundError:
            return 0
        for name in names:
            path = self.dir / name
            try:
                if path.stat().st_size > FILE_BYTES_MAX:
                    raise FaultError(f"file larger than {FILE_BYTES_MAX} bytes")
                payload = json.loads(path.read_text())
                cmds = payload if isinstance(payload, list) else [payload]
                if len(cmds) > COMMANDS_PER_FILE_MAX:
                    raise FaultError(f"more than {COMMANDS_PER_FILE_MAX} commands in one file")
                for cmd in cmds:
                    what = apply_fault(self.daemon, cmd)
                    log.warning("fault injected from %s: %s", name, what)
                    self.applied += 1
                path.unlink(missing_ok=True)
                done += 1
            except FileNotFoundError:
                continue
            except (FaultError, ValueError, IndexError) as exc:
                self.rejected += 1
                log.error("fault file %s rejected: %s", name, exc)
                try:
                    path.rename(path.with_name(name + ".rejected"))
                    path.with_name(name + ".rejected.reason").write_text(str(exc) + "\n")
                except OSError:
                    path.unlink(missing_ok=True)
        return done

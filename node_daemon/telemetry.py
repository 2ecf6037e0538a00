"""Telemetry: one sampler shared by every stream, one bounded buffer per stream.

    backend.sample() ──► TelemetryHub.snapshot(max_age)  (cached: N streams ≠ N samplings)
                              │ health.observe
    backend.poll_xid_events ──► XID poller thread ──► health.record_xid
                              │                       └─► every Subscription (bounded)
                              ▼
    per stream: producer thread, every interval ──► Frame(seq, samples, xids) ──► StreamBuffer
                (and at once when an XID arrives)
                                                                                 (≤ frames_max, drop oldest;
    gRPC generator ◄── StreamBuffer.get() ◄─────────────────────────────────────  a dropped frame's XIDs
       sets dropped_frames = frames dropped since the last delivered one          move to the next frame)

Freeze (a fault): producers stop producing, the stream goes silent, the process
stays alive; XIDs wait in the subscription until the thaw.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from gpuaas import xid as xidmod
from node_daemon.backend import GpuBackend, GpuSample, XidRecord
from node_daemon.health import HealthView

log = logging.getLogger("gpuaas.node_daemon.telemetry")

XIDS_PER_SUBSCRIPTION_MAX = 1024
XIDS_PER_FRAME_MAX = 256
XID_POLL_MS = 200  # NVML's event wait cannot be interrupted: wake this often to notice a stop
XID_POLL_MS_INTERRUPTIBLE = 5000  # backends whose wait stop() can end (the simulated one)
HEALTH_SAMPLE_INTERVAL_S = 1.0
FROZEN_POLL_S = 0.05


@dataclasses.dataclass
class Frame:
    seq: int
    at_s: float
    samples: list[GpuSample]
    xids: list[XidRecord]
    dropped_frames: int = 0


class StreamBuffer:
    """Bounded buffer of one stream. A full buffer drops its oldest frame; the
    dropped frame's XID events are carried into the next frame, so a slow
    consumer loses superseded samples but never a fault."""

    def __init__(self, frames_max: int):
        if frames_max < 1:
            raise ValueError("frames_max must be >= 1")
        self.frames_max = frames_max
        self._dq: collections.deque[Frame] = collections.deque()
        self._cv = threading.Condition()
        self._dropped_since_delivery = 0
        self.dropped_total = 0
        self.xids_lost = 0
        self.closed = False

    def put(self, frame: Frame) -> None:
        with self._cv:
            if len(self._dq) >= self.frames_max:
                old = self._dq.popleft()
                self._dropped_since_delivery += 1
                self.dropped_total += 1
                if old.xids:
                    nxt = self._dq[0] if self._dq else frame
                    merged = old.xids + nxt.xids
                    self.xids_lost += max(0, len(merged) - XIDS_PER_FRAME_MAX)
                    nxt.xids = merged[-XIDS_PER_FRAME_MAX:]
            self._dq.append(frame)
            self._cv.notify()

    def get(self, timeout_s: float) -> Frame | None:
        with self._cv:
            if not self._dq and not self.closed:
                self._cv.wait(timeout_s)
            if not self._dq:
                return None
            frame = self._dq.popleft()
            frame.dropped_frames = self._dropped_since_delivery
            self._dropped_since_delivery = 0
            return frame

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._dq)


class Subscription:
    def __init__(self, hub: "TelemetryHub"):
        self.hub = hub
        self._xids: collections.deque[XidRecord] = collections.deque(maxlen=XIDS_PER_SUBSCRIPTION_MAX)
        self._lock = threading.Lock()
        # Set by a new XID (and by stop): the producer sends a frame at once instead of at
        # the next interval, so a fault never waits up to a whole interval on the node.
        self.wake = threading.Event()

    def add_xid(self, x: XidRecord) -> None:
        with self._lock:
            self._xids.append(x)
        self.wake.set()

    def take_xids(self) -> list[XidRecord]:
        with self._lock:
            out = list(self._xids)
            self._xids.clear()
            return out


class TelemetryHub:
    def __init__(self, backend: GpuBackend, health: HealthView, *, mono=time.monotonic, wall=time.time):
        self.backend, self.health = backend, health
        self._mono, self._wall = mono, wall
        self._sample_lock = threading.Lock()
        self._cache: tuple[float, float, list[GpuSample]] | None = None
        self._subs: set[Subscription] = set()
        self._subs_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._frozen_until: float | None = None  # monotonic; inf = until thawed
        self.streams_active = 0
        self.last_stream_change_mono = mono()
        self.stats = {"samples": 0, "xids": 0, "frames": 0}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for name, target in (("xid-poller", self._xid_loop), ("health-sampler", self._health_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.backend.wake_xid_poll()
        with self._subs_lock:
            for sub in self._subs:
                sub.wake.set()
        for t in self._threads:
            t.join(timeout=2)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------ sampling

    def snapshot(self, max_age_s: float) -> tuple[float, list[GpuSample]]:
        """(wall time, samples) no older than ``max_age_s``."""
        with self._sample_lock:
            now = self._mono()
            if self._cache is None or now - self._cache[0] > max_age_s:
                samples = self.backend.sample()
                self.stats["samples"] += 1
                self.health.observe(samples)
                self._cache = (now, self._wall(), samples)
            return self._cache[1], self._cache[2]

    def _health_loop(self) -> None:
        while not self._stop.wait(HEALTH_SAMPLE_INTERVAL_S):
            # While a stream samples at least every other second its snapshots feed the
            # health view already. Sampling here as well would double the backend's cost
            # (NVML reads are the daemon's main expense) and hand that stream a cached
            # sample up to half its interval old instead of a fresh one.
            max_age_s = HEALTH_SAMPLE_INTERVAL_S * (2 if self.streams_active else 1)
            try:
                self.snapshot(max_age_s)
            except Exception as exc:  # noqa: BLE001 - a sampling hiccup must not end health tracking
                log.warning("background sample failed: %s", exc)

    # ------------------------------------------------------------ XIDs

    def _xid_loop(self) -> None:
        poll_ms = XID_POLL_MS_INTERRUPTIBLE if self.backend.xid_poll_interruptible else XID_POLL_MS
        while not self._stop.is_set():
            try:
                events = self.backend.poll_xid_events(poll_ms)
            except Exception as exc:  # noqa: BLE001 - keep polling; the driver may come back
                log.warning("XID poll failed: %s", exc)
                self._stop.wait(1.0)
                continue
            for x in events:
                self.publish_xid(x)

    def publish_xid(self, x: XidRecord) -> None:
        self.stats["xids"] += 1
        out = self.health.record_xid(x)
        log.warning("XID %d on GPU %d (%s%s): %s", x.xid, x.gpu_index, xidmod.classify(x.xid).value,
                    ", GPU out of service" if out else "", x.message)
        with self._subs_lock:
            for s in self._subs:
                s.add_xid(x)

    # ------------------------------------------------------------ streams

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._subs_lock:
            self._subs.add(sub)
            self.streams_active += 1
            self.last_stream_change_mono = self._mono()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._subs_lock:
            if sub in self._subs:
                self._subs.discard(sub)
                self.streams_active -= 1
                self.last_stream_change_mono = self._mono()

    def produce(self, sub: Subscription, buf: StreamBuffer, interval_s: float, stop: threading.Event) -> None:
        """Producer loop of one stream (runs on its own thread until ``stop``; whoever sets
        ``stop`` also sets ``sub.wake``). A frame every interval, plus one at once when an
        XID arrives (that early frame does not move the schedule)."""
        seq = 0
        next_t = self._mono()
        scheduled = True
        while not stop.is_set() and not self._stop.is_set():
            if self.frozen:
                stop.wait(FROZEN_POLL_S)
                next_t = self._mono()
                scheduled = True
                continue
            try:
                at_s, samples = self.snapshot(interval_s / 2)
            except Exception as exc:  # noqa: BLE001 - skip a tick, keep the stream
                log.warning("sample failed: %s", exc)
                stop.wait(interval_s)
                continue
            seq += 1
            buf.put(Frame(seq, at_s, samples, sub.take_xids()))
            self.stats["frames"] += 1
            now = self._mono()
            if scheduled:
                next_t += interval_s
                if next_t < now:  # fell behind (e.g. after a freeze): no catch-up burst
                    next_t = now + interval_s
            scheduled = not sub.wake.wait(max(0.0, next_t - now))
            sub.wake.clear()

    # ------------------------------------------------------------ freeze

    def freeze(self, seconds: float | None) -> None:
        self._frozen_until = float("inf") if not seconds else self._mono() + seconds
        log.warning("daemon FROZEN %s: telemetry silent, registration paused (fault injection)",
                    "until thawed" if not seconds else f"for {seconds:g}s")

    def thaw(self) -> None:
        if self._frozen_until is not None:
            log.warning("daemon thawed: telemetry resumes")
        self._frozen_until = None

    @property
    def frozen(self) -> bool:
        until = self._frozen_until
        if until is None:
            return False
        if self._mono() >= until:
            self._frozen_until = None
            log.warning("freeze expired: telemetry resumes")
            return False
        return True

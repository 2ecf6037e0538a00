"""A Postgres connection that breaks at a chosen moment: a relay on a unix socket between the product
and the real server, which can lose the answer to a statement (after the server has run and
committed it), lose the statement itself (never sent), and refuse new connections for a while.

Only the connections whose startup message names ``marker`` (a run-time option the product sets on
its group writers, ``store.GROUP_WRITER_OPTIONS``) are cut, or a message holding a chosen pattern;
others pass through, unless new connections are refused. Bytes are relayed as they come; the relay does not parse the protocol.
An autocommit statement's answer is sent after its implicit commit (the server flushes at Sync), so
losing "the next answer" loses the acknowledgement of a commit that took effect.
"""
from __future__ import annotations

import os
import pathlib
import socket
import tempfile
import threading
import time


class PgProxy:
    def __init__(self, upstream_dir: str, port: int = 5432, marker: bytes = b"plan_cache_mode"):
        self.upstream = os.path.join(upstream_dir, f".s.PGSQL.{port}")
        self.dir = tempfile.mkdtemp(prefix="pgproxy-", dir="/tmp")
        self.path = os.path.join(self.dir, f".s.PGSQL.{port}")
        self.marker = marker
        self.mode: str | None = None  # "lose_answer" | "lose_statement": for the next marked statement
        self.pattern: bytes | None = None  # or for the next message holding these bytes (arm)
        self.refuse_until = 0.0       # monotonic time before which new connections are closed at once
        self.cuts = 0                 # connections cut so far
        self._lock = threading.Lock()
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(64)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        """``url`` (a libpq URL or key=value string with ``host=<socket dir>``) through this relay."""
        import urllib.parse as up

        if "://" in url:
            p = up.urlsplit(url)
            q = dict(up.parse_qsl(p.query))
            q["host"] = self.dir
            return up.urlunsplit((p.scheme, p.netloc, p.path, up.urlencode(q), p.fragment))
        return " ".join(f"host={self.dir}" if kv.startswith("host=") else kv for kv in url.split())

    def arm(self, mode: str, pattern: bytes | None = None) -> None:
        """Cut the next statement of a marked connection, or, with ``pattern``, the next message of any
        connection that holds those bytes (b"COMMIT": the end of an explicit transaction)."""
        assert mode in ("lose_answer", "lose_statement")
        with self._lock:
            self.pattern, self.mode = pattern, mode

    def refuse_for(self, seconds: float) -> None:
        self.refuse_until = time.monotonic() + seconds

    def close(self) -> None:
        self._closed = True
        self._srv.close()
        pathlib.Path(self.path).unlink(missing_ok=True)

    # ------------------------------------------------------------ relay

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                client.close()
                continue
            try:
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            conn = {"client": client, "server": server, "marked": False, "started": False, "doomed": False}
            threading.Thread(target=self._up, args=(conn,), daemon=True).start()
            threading.Thread(target=self._down, args=(conn,), daemon=True).start()

    def _cut(self, conn: dict, fault: bool = True) -> None:
        with self._lock:
            if conn.get("cut"):
                return
            conn["cut"] = True
            self.cuts += fault
        for s in (conn["client"], conn["server"]):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _up(self, conn: dict) -> None:
        """Client → server: the startup message marks the connection; an armed fault picks its message."""
        def inspect(data: bytes) -> bool:
            if not conn["started"]:
                conn["started"] = True
                conn["marked"] = self.marker in data
            elif self.mode is not None and (self.pattern in data if self.pattern else conn["marked"]):
                with self._lock:
                    mode, self.mode = self.mode, None
                if mode == "lose_statement":
                    return False
                conn["doomed"] = True  # lose_answer: send it, cut before its answer comes back
            return True
        self._pump(conn, "client", "server", inspect)

    def _down(self, conn: dict) -> None:
        """Server → client: a doomed connection is cut when its answer arrives."""
        self._pump(conn, "server", "client", lambda data: not conn["doomed"])

    def _pump(self, conn: dict, src: str, dst: str, inspect) -> None:
        """Relay ``src`` to ``dst`` until either closes, or ``inspect(data)`` says to cut here."""
        while True:
            try:
                data = conn[src].recv(65536)
            except OSError:
                return
            if not data:  # that side closed it
                self._cut(conn, fault=False)
                return
            if not inspect(data):
                self._cut(conn)
                return
            try:
                conn[dst].sendall(data)
            except OSError:
                return

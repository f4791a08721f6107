"""Fault injection for tests: a TCP proxy that can cut a service off, and process memory."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from steelsight.devstack import free_port


class CuttableProxy:
    """Forwards 127.0.0.1:port to a target port; ``cut()`` makes the service unreachable.

    While cut, the listening socket is closed (new connections are refused) and every
    open connection is reset, as when a host or its network goes away.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> CuttableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:  # a connection of the previous listener may take a moment to let go of the port
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self) -> None:
        with self._lock:  # _accept registers connections under the same lock, so none escapes
            listener, self._listener = self._listener, None
            if listener:
                # close() alone does not wake a thread blocked in accept(): the socket would go on
                # listening, queueing connections that hang, and hold the port against restore()
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)
                listener.close()
            for conn in self._conns:
                _reset(conn)
            self._conns.clear()

    restore = start

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while this connection was being set up
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                for s in (src, dst):
                    self._conns.discard(s)
                    s.close()


def _reset(conn: socket.socket) -> None:
    """Close with RST, as a vanished host would, leaving no TIME_WAIT on the proxy's port."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        # wake the pipe thread blocked in recv() on it: close() alone would leave the
        # connection open, and a request sent on it later would hang unanswered
        conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")

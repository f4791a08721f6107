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


class HttpFaultProxy:
    """An HTTP proxy in front of the S3 server that can answer errors or stall instead of forwarding.

    ``mode``: ``None`` forwards; ``"503"`` answers S3's XML ``503 SlowDown`` as MinIO does
    when overloaded; ``"502"`` answers an HTML ``502 Bad Gateway`` as a load balancer does;
    ``"slow"`` holds each request ``slow_s`` before forwarding it; ``"deny-lifecycle"`` answers
    ``403 AccessDenied`` to lifecycle requests only, as for a least-privilege key. The Host header is passed
    through untouched, so SigV4 signatures made for the proxy's address still verify.
    """

    def __init__(self, target_port: int, slow_s: float = 3.0):
        import http.server

        self.target_port, self.slow_s, self.mode = target_port, slow_s, None
        self.faulted = 0  # requests answered with a fault (a rough count: threads add without a lock)
        self.open, self.most_open = 0, 0  # requests being handled now, and the most at once
        self._count = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                with proxy._count:
                    proxy.open += 1
                    proxy.most_open = max(proxy.most_open, proxy.open)
                try:
                    proxy._handle(self)
                finally:
                    with proxy._count:
                        proxy.open -= 1

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def start(self) -> HttpFaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, handler) -> None:
        import http.client

        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        mode = self.mode
        if mode == "deny-lifecycle" and "lifecycle" in handler.path.partition("?")[2]:
            mode = "403"
        if mode in ("503", "502", "403"):
            self.faulted += 1
            if mode in ("503", "403"):
                code = b"SlowDown" if mode == "503" else b"AccessDenied"
                payload = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code>"
                           b"<Message>refused by the fault proxy</Message></Error>")
                status, ctype = int(mode), "application/xml"
            else:
                payload, status, ctype = b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502, "text/html"
            handler.send_response(status)
            handler.send_header("Content-Type", ctype)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(payload)
            return
        if mode == "slow":
            self.faulted += 1
            time.sleep(self.slow_s)
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        try:
            upstream.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            handler.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    handler.send_header(name, value)
            # a HEAD's length is the object's, not that of the (empty) body
            length = response.getheader("Content-Length", "0") if handler.command == "HEAD" else len(data)
            handler.send_header("Content-Length", str(length))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
        finally:
            upstream.close()

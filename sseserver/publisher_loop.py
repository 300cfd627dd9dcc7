"""The publisher loop: one thread that serves keep-alive publisher connections between their requests.

Owns: the parked connections (each a Handler, whose requests the loop reads), their idle deadlines, and the
decision to give a connection back to a thread of its own or close it.
Must not know: what a publish means or how a request is parsed (Handler.serve_inline() answers; this module
only says when, on which thread), signals, config files.

Why it exists: on a thread of its own, a keep-alive publisher costs every publish a wake-up of that thread, the
GIL handed to it and back, and a wake-up of the writer; with four publishers most of a publish was spent in
those hand-offs, not in Python (py-spy --gil: the GIL was held about a quarter of the time at 13,000
publishes/s). Parked here, all publishers' connections wait in one epoll, and a publish whose bytes have arrived
is answered on this thread at once, several per wake-up when several publishers are ready.

What is answered here: a single POST or PUT /publish with a Content-Length whose body has arrived whole, without
`Expect` or `Idempotency-Key` (a key may have to wait for another request holding it), on a server whose
publish never waits for I/O (SSEServer.park() refuses with Redis or `history_fsync = "always"`: a round trip or
an fsync per publish here would hold up every other publisher). Everything else goes back to a thread with the
bytes read so far (Handler.resume()): a request not of that kind, one that has not arrived whole (its deadline is
the thread's to keep), and an answer the socket could not take at once (this thread never waits for a client).

A connection is parked only after a thread has answered a publish on it, so the first request of every
connection, and every client that is not a publisher, is served exactly as before.
"""

import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING

from .handler import Inline

if TYPE_CHECKING:  # server.py imports this module
    from .handler import Handler
    from .server import SSEServer

log = logging.getLogger("sseserver")

RECV_SIZE = 65536
SWEEP_INTERVAL = 1.0  # seconds between looks for parked connections idle past keepalive_timeout


class PublisherLoop:
    """Methods for the server: start(), park(handler) -> bool, stop() (closes whatever is parked), alive(),
    parked_count()."""

    def __init__(self, server: "SSEServer"):
        self._server = server
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._parked: dict[int, Handler] = {}  # fd -> handler; written under _lock, read by the loop without
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sseserver-publishers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() or self._stopping

    def parked_count(self) -> int:
        return len(self._parked)

    def park(self, handler: "Handler") -> bool:
        """Take a publisher's idle connection from its thread (which then ends without closing it). False when
        the loop is stopping: the thread keeps it."""
        with self._lock:
            if self._stopping or not self._thread.is_alive():
                return False
            # socketserver closes the socket object it gave the thread when the thread ends: the loop keeps the
            # connection under a socket object of its own (the one the thread had is left without an fd).
            sock = handler.connection
            parked = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            handler.connection = handler.reader.sock = parked
            handler.parked = True
            handler.idle_since = time.monotonic()
            fd = parked.fileno()
            self._parked[fd] = handler
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop and close every parked connection (idle keep-alive connections, which a drain closes
        anyway). A publish being answered on the loop's thread is finished first."""
        with self._lock:
            if self._stopping:  # stopped already, or the loop ended on its own (its descriptors are closed)
                return
            self._stopping = True
            if self._thread.ident is None:  # never started: nothing parked, only the loop's own descriptors
                self._release()
                return
            os.eventfd_write(self._wake_fd, 1)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop's thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while not self._stopping:
                for fd, _mask in self._epoll.poll(SWEEP_INTERVAL):
                    handler = self._parked.get(fd)
                    if handler is not None:
                        self._serve(handler)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_INTERVAL
                    self._close_idle(now)
        except Exception:
            log.exception("publisher loop failed; its connections are closed")
        finally:
            with self._lock:
                self._stopping = True  # park() refuses from now on, and stop() writes to no closed eventfd
            for handler in list(self._parked.values()):
                self._close(handler)
            with self._lock:
                self._release()

    def _release(self) -> None:
        self._epoll.close()
        os.close(self._wake_fd)

    def _serve(self, handler: "Handler") -> None:
        """Read what arrived and answer the publishes among it; a thread gets the connection at the first request
        that is not one."""
        try:
            chunk = handler.connection.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(handler)  # the publisher hung up between requests, as keep-alive clients do
            return
        handler.reader.buffer += chunk
        while handler.reader.buffer:
            outcome = handler.serve_inline()
            if outcome is Inline.CLOSE:
                self._close(handler)
                return
            if outcome is Inline.RESUME:
                self._resume(handler)
                return
        handler.idle_since = time.monotonic()

    def _close_idle(self, now: float) -> None:
        """Parked connections without a request for keepalive_timeout are closed, as a thread would."""
        timeout = self._server.config.keepalive_timeout
        for handler in list(self._parked.values()):
            if now - handler.idle_since > timeout:
                self._close(handler)

    def _unpark(self, handler: "Handler") -> None:
        with self._lock:
            fd = handler.connection.fileno()
            self._parked.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            handler.parked = False

    def _resume(self, handler: "Handler") -> None:
        self._unpark(handler)
        if not self._server.start_request_thread(handler.resume, ()):
            self._server.untrack(handler)
            self._server.shutdown_request(handler.connection)

    def _close(self, handler: "Handler") -> None:
        self._unpark(handler)
        self._server.untrack(handler)
        self._server.shutdown_request(handler.connection)

"""The publisher loop: keep-alive publisher connections served between their requests on the first writer's
thread, next to the streams their events go to.

Owns: the parked connections (each a Handler, whose requests are read here), their idle deadlines, and the
decision to give a connection back to a thread of its own or close it.
Must not know: what a publish means or how a request is parsed (Handler.serve_inline() answers; this module only
says when, on which thread), how streams are written (delivery.py hosts the connections as Guests and calls back).

Why: on a thread of its own, a keep-alive publisher costs every publish a wake-up of that thread, the GIL handed
to it and back, and a wake-up of the writer; at 13,000 publishes/s from four publishers the GIL was held only a
quarter of the time (py-spy --gil), the rest was those hand-offs. A separate loop thread saved the first
(15,800/s) but not the rest: per publish, the writer still had to be woken and the GIL passed between the two.
Served on the writer's thread, a publish is read, appended to the ring, answered and written to the streams
without any other thread running: publishes that arrive together are answered together and reach each stream in
one send().

What is answered here: a single POST or PUT /publish with a Content-Length whose body has arrived whole, without
`Expect` or `Idempotency-Key` (a key may have to wait for another request holding it), on a server whose publish
never waits for I/O (SSEServer.park() refuses with Redis or `history_fsync = "always"`: a round trip or an fsync
per publish here would hold up every publisher and every stream). Everything else goes back to a thread with the
bytes read so far (Handler.resume()): a request not of that kind, one that has not arrived whole (its deadline
is the thread's to keep), and an answer the socket could not take at once (the writer never waits for a client).

A connection is parked only after a thread has answered a publish on it, so the first request of every
connection, and every client that is not a publisher, is served exactly as before.
"""

import functools
import socket
import threading
import time
from typing import TYPE_CHECKING

from .delivery import Guest, Writer
from .handler import Inline

if TYPE_CHECKING:  # server.py imports this module
    from .handler import Handler
    from .server import SSEServer


class PublisherLoop:
    """Methods for the server: park(handler) -> bool, stop() (no more parking), parked_count()."""

    def __init__(self, server: "SSEServer", writer: Writer):
        self._server = server
        self._writer = writer
        writer.guest_tick = self._close_idle
        # The parked connections (changed under _lock; only the writer's thread serves them): a handler is
        # parked exactly while it is a key here.
        self._parked: dict[Handler, Guest] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def parked_count(self) -> int:
        return len(self._parked)

    def park(self, handler: "Handler") -> bool:
        """Take a publisher's idle connection from its thread (which then ends without closing it). False when
        stopping: the thread keeps it."""
        with self._lock:
            if self._stopping:
                return False
            # socketserver closes the socket object it gave the thread when the thread ends: the parked
            # connection gets a socket object of its own (the thread's is left without an fd).
            sock = handler.connection
            parked = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            handler.connection = handler.reader.sock = parked
            handler.idle_since = time.monotonic()
            guest = Guest(parked, functools.partial(self._serve, handler), functools.partial(self._evicted, handler))
            self._parked[handler] = guest
        self._writer.host(guest)
        return True

    def stop(self) -> None:
        """No more parking. The parked connections are idle keep-alive connections: the drain shuts them down
        like any other (the writer then reads their end and closes them), and whatever is left when the writer
        ends is evicted (_evicted)."""
        with self._lock:
            self._stopping = True

    # -- on the writer's thread -------------------------------------------------------------------------------

    def _serve(self, handler: "Handler") -> None:
        """Read what arrived and answer the publishes among it; a thread gets the connection at the first request
        that is not one."""
        if handler not in self._parked:
            return  # given to a thread earlier in the same batch of readiness
        arrived = handler.reader.read_available()
        if arrived is None:
            return
        if not arrived:
            self._close(handler)  # the publisher hung up between requests, as keep-alive clients do
            return
        while handler.reader.buffer:
            outcome = handler.serve_inline()
            if outcome is Inline.CLOSE:
                self._close(handler)
                return
            if outcome is Inline.RESUME:
                self._resume(handler)
                return
        handler.idle_since = time.monotonic()

    def _evicted(self, handler: "Handler") -> None:
        """The writer ends (a stop, or the end of an upgrade in place): a publish that already arrived is still
        answered (503 while stopping or paused, never a silent close), then the connection is closed."""
        self._serve(handler)
        if handler in self._parked:
            self._close(handler)

    def _close_idle(self, now: float) -> None:
        """Parked connections without a request for keepalive_timeout are closed, as a thread would."""
        timeout = self._server.config.keepalive_timeout
        for handler in list(self._parked):
            if now - handler.idle_since > timeout:
                self._close(handler)

    def _unpark(self, handler: "Handler") -> None:
        with self._lock:
            guest = self._parked.pop(handler, None)
        if guest is not None:
            self._writer.unhost(guest)

    def _resume(self, handler: "Handler") -> None:
        self._unpark(handler)
        if not self._server.start_request_thread(handler.resume, ()):
            self._server.untrack(handler)
            self._server.shutdown_request(handler.connection)

    def _close(self, handler: "Handler") -> None:
        self._unpark(handler)
        self._server.untrack(handler)
        self._server.shutdown_request(handler.connection)

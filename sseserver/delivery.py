"""Delivery: the writer threads, the only code that writes to subscriber sockets after their headers.

Owns: every open stream's socket once its response headers are out; batching events into send() calls;
heartbeats; noticing dead peers; dropping slow subscribers (by the bouncer's rule); ending streams at shutdown.
Must not know: HTTP requests, routes or config files (it gets numbers).

Why this design (measured with ../shared/tools/sseload on the 2-core machine, numbers in README "Performance"):
- The blog post's design, a thread per subscriber blocked on its own queue, pays a thread (~40 KB of memory)
  per subscriber and a GIL hand-off per event per subscriber; it tops out near 10,000 deliveries/s.
- Here request threads (ThreadingHTTPServer) only parse requests. A subscribe request writes its headers and
  hands the socket over; its thread ends. `writer_threads` threads (default 1) each multiplex their share of the
  non-blocking subscriber sockets with one epoll selector.
- A publish appends to the bouncer's ring and sets an eventfd, at most once per wake-up. The woken writer sweeps
  its subscribers once: each gets *all* events between its cursor and the head in a single send(). The bytes are
  joined once per distinct (cursor, filter) and shared, so 10,000 subscribers at the same cursor cost one join.
  Under load, sweeps take longer and each send() carries more events: the design batches by itself instead of
  falling behind, which is what keeps 10,000 subscribers at tens of events per second on one core.
- send() releases the GIL during the system call, so a second writer thread can overlap kernel work with
  Python work when there are two cores to spare.
- A socket whose kernel buffer is full keeps its unsent bytes and is watched for EVENT_WRITE; while blocked it
  accumulates a backlog, and beyond `queue_size` live events it is dropped (reason "slow"). It reconnects with
  Last-Event-ID and catches up from history. A fast subscriber is never dropped.
- The selector also watches every stream for EVENT_READ, so a client that closes is forgotten at once; TCP
  keepalive and TCP_USER_TIMEOUT (set by the handler) turn a half-open peer into a socket error within about two
  heartbeat intervals, because each heartbeat is data that must be acknowledged.
"""

import array
import collections
import logging
import os
import random
import selectors
import socket
import sys
import threading
import time

from . import framing
from .bouncer import Bouncer, Subscriber
from .metrics import Histogram

log = logging.getLogger("sseserver.delivery")
access_log = logging.getLogger("sseserver.access")
_END_REASONS = {"disconnected": "client gone", "slow": "dropped as slow", "shutdown": "server shutdown",
                "flooding": "dropped for sending data on its stream"}
# What a client may send on its stream after the request (a stray line end, a pipelined request nobody will
# answer) is read and discarded; past this many bytes it is flooding, and reading it would keep the writer busy.
STREAM_INPUT_LIMIT = 64 * 1024

_EVICTED = object()  # cache marker: the events for this cursor have left the ring
# A closing stream's cursor: past any head, so sweeps skip it with the ordinary `cursor >= head` test.
_CLOSING = sys.maxsize


class WriterStats:
    """Counters owned by one writer thread (so += never races); Delivery sums them."""

    __slots__ = ("delivered", "dropped")

    def __init__(self):
        self.delivered = 0
        self.dropped: dict[str, int] = collections.Counter()


class FirstWrites:
    """Publish-to-write latency, observed once per event: when the first of the writer threads hands it to a
    subscriber socket. An event nobody receives is never observed, and neither is a replay (an event older than
    the stream it goes to). One slot per ring slot remembers which pos was observed there, so the memory is
    fixed by the ring; the lock makes "first" exact across writer threads. A reload that resizes the ring
    forgets those marks, so an event being written across a resize may be observed twice."""

    def __init__(self):
        self._lock = threading.Lock()
        self._histogram = Histogram()
        self._observed = array.array("q")

    def observe(self, ring, start: int, end: int, names, now_ns: int) -> None:
        """Events in [start, end) that `names` accepts were just handed to a socket."""
        with self._lock:
            observed = self._observed
            if len(observed) != ring.capacity:
                observed = self._observed = array.array("q", [-1]) * ring.capacity
            for pos in range(start, end):
                slot = pos % ring.capacity
                event = ring.slots[slot]
                if observed[slot] == pos or event is None or event.pos != pos:
                    continue
                if names is None or event.name in names:
                    observed[slot] = pos
                    self._histogram.observe((now_ns - event.published_ns) / 1e9)

    def snapshot(self) -> Histogram:
        with self._lock:
            return Histogram.merged([self._histogram])


class Writer(threading.Thread):
    def __init__(self, index: int, bouncer: Bouncer, heartbeat_interval: float, first_writes: FirstWrites):
        super().__init__(name=f"sseserver-writer-{index}", daemon=True)
        self.bouncer = bouncer
        self.heartbeat_interval = heartbeat_interval
        self.stats = WriterStats()
        self.first_writes = first_writes
        self.wake_pending = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # wake() runs on publishing threads; the writer closes the eventfd when it ends. The lock keeps a late
        # wake() from writing to that fd number after the close, when it may already name some other file.
        self._wake_lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        self._inbox: collections.deque = collections.deque()  # (kind, payload) from other threads
        self._subs: dict[int, Subscriber] = {}
        self._unsolicited: dict[Subscriber, int] = {}  # bytes each stream's client has sent us, once it sent any
        self._swept_head = bouncer.head
        self.access_log = False
        self._closing_deadline: float | None = None
        self._retry_ms = 0
        self._stopped = threading.Event()

    # -- methods for other threads ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the writer run a loop soon. Called on every publish, so it writes the eventfd only when the
        writer has not already been woken since its last look at the head."""
        if not self.wake_pending:
            self.wake_pending = True
            with self._wake_lock:
                if self._wake_fd >= 0:  # -1 once the writer has ended: nothing left to wake
                    os.eventfd_write(self._wake_fd, 1)

    def add(self, sub: Subscriber, sock: socket.socket) -> None:
        sub.sock = sock
        if self._stopped.is_set():  # the writer already ended (shutdown): nobody would ever close this stream
            sub.reason = "shutdown"
            self._finish(sub)
            return
        self._inbox.append(("add", sub))
        self.wake_pending = False  # force a write: the inbox must be seen even if a wake is pending
        self.wake()

    def close_all(self, retry_ms: int, deadline: float) -> None:
        """End every stream: deliver what was published, a jittered `retry:`, then a clean end of stream."""
        self._inbox.append(("close_all", (retry_ms, deadline)))
        self.wake_pending = False
        self.wake()

    def set_heartbeat(self, interval: float) -> None:
        self.heartbeat_interval = interval  # a float store is atomic; the loop reads it each tick

    def count(self) -> int:
        return len(self._subs)

    def join_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug must not leave streams hanging silently
            log.exception("writer thread failed; closing its streams")
        finally:
            for sub in list(self._subs.values()):
                self._drop(sub, "shutdown")
            self._selector.close()
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
            self._stopped.set()

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while True:
            timeout = max(0.0, next_tick - time.monotonic())
            if self._inbox:
                timeout = 0
            now = self._poll(timeout)
            self._handle_inbox(now)
            # Clear the flag before reading the head: a publish after this point wakes us again.
            self.wake_pending = False
            head = self.bouncer.head
            if head != self._swept_head:
                self._sweep(head, now)
            if now >= next_tick:
                tick = min(1.0, self.heartbeat_interval / 4)
                next_tick = now + tick
                if self._closing_deadline is None:
                    self._heartbeats(now)
            if self._closing_deadline is not None:
                if not self._subs:
                    return
                if now >= self._closing_deadline:
                    for sub in list(self._subs.values()):
                        self._drop(sub, "shutdown")
                    return
                next_tick = min(next_tick, self._closing_deadline)

    # The selector's answer and the inbox are handled in methods of their own so that their locals (the last
    # subscriber seen) are gone when they return: a stream that ended must not be kept alive by the loop's
    # variables until the next wake-up (its filter would linger in the server's table of shared filters).

    def _poll(self, timeout: float) -> float:
        """Wait up to `timeout` for sockets and wake-ups, handle what is ready, and return the time after the
        wait."""
        ready = self._selector.select(timeout)
        now = time.monotonic()
        for key, mask in ready:
            sub = key.data
            if sub is None:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            if sub.reason is not None:
                continue  # dropped earlier in this batch
            if mask & selectors.EVENT_READ:
                self._readable(sub)
            if mask & selectors.EVENT_WRITE and sub.reason is None:
                self._writable(sub, now)
        return now

    def _handle_inbox(self, now: float) -> None:
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                self._register(payload, now)
            else:
                self._retry_ms, self._closing_deadline = payload
                self._begin_closing()

    # -- per-subscriber work ---------------------------------------------------------------------------------

    def _register(self, sub: Subscriber, now: float) -> None:
        sock = sub.sock
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, sub)
        except (OSError, ValueError):
            sub.reason = "disconnected"
            self._finish(sub)
            return
        self._subs[sock.fileno()] = sub
        sub.last_write = now
        if self._closing_deadline is not None:
            self._close_gracefully(sub)
        else:
            self._catch_up(sub, self.bouncer.head, now)

    def _catch_up(self, sub: Subscriber, head: int, now: float) -> None:
        if sub.cursor >= head:
            return
        ring = self.bouncer.ring
        start = sub.cursor
        got = self.bouncer.collect(ring, start, head, sub.names)
        if got is None:
            self._drop(sub, "slow")
            return
        data, count, last_id, sub.cursor = got
        if count and not self._send(sub, data, count, last_id, now):
            self._drop(sub, "disconnected")
            return
        if count:
            self.first_writes.observe(ring, max(start, sub.live_from), sub.cursor, sub.names, time.monotonic_ns())
        if sub.cursor < head and sub.out is None:
            self._arm(sub)

    def _sweep(self, head: int, now: float) -> None:
        ring = self.bouncer.ring  # read after head: the ring holds every event below that head
        self._swept_head = head
        cache: dict = {}
        written: dict = {}  # (cursor, names) -> (pos reached, oldest live_from among its streams): for latency
        failed = []
        bouncer = self.bouncer
        for sub in self._subs.values():
            if sub.cursor >= head:
                continue
            if sub.out is not None:
                if bouncer.is_slow(ring, sub, head):
                    failed.append((sub, "slow"))
                continue
            key = (sub.cursor, sub.names)
            got = cache.get(key)
            if got is None:
                got = bouncer.collect(ring, sub.cursor, head, sub.names) or _EVICTED
                cache[key] = got
            if got is _EVICTED:
                failed.append((sub, "slow"))
                continue
            data, count, last_id, sub.cursor = got
            if count and not self._send(sub, data, count, last_id, now):
                failed.append((sub, "disconnected"))
                continue
            if count:
                seen = written.get(key)
                if seen is None or sub.live_from < seen[1]:
                    written[key] = (sub.cursor, sub.live_from)
            if sub.cursor < head and sub.out is None:
                self._arm(sub)  # a batch hit the size cap: continue as soon as the socket can take more
        for sub, reason in failed:
            self._drop(sub, reason)
        # Latency once per distinct filter and range written (not per subscriber: that would cost as much as
        # the delivery itself), after the sends, so that only events some socket took are observed.
        now_ns = time.monotonic_ns()
        for (cursor, names), (end, live_from) in written.items():
            self.first_writes.observe(ring, max(cursor, live_from), end, names, now_ns)

    def _send(self, sub: Subscriber, data: bytes, count: int, last_id: int, now: float) -> bool:
        """Hand `data` to the socket; keep what it does not take. False when the peer is gone (the caller
        drops it, so that a sweep never changes the dict it iterates)."""
        try:
            sent = sub.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        sub.last_write = now
        if last_id:
            sub.last_id_sent = last_id
        sub.events_sent += count
        self.stats.delivered += count
        if sent < len(data):
            self._arm(sub, memoryview(data)[sent:])
        return True

    def _arm(self, sub: Subscriber, rest: memoryview = memoryview(b"")) -> None:
        """Wait for the socket to take more: `rest` is what it has not taken yet (empty when a batch only hit the
        size cap). Until then the subscriber is "blocked", and its backlog counts toward the slow rule."""
        sub.out = rest
        sub.scan = sub.cursor
        sub.backlog = 0
        self._selector.modify(sub.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, sub)

    def _writable(self, sub: Subscriber, now: float) -> None:
        try:
            sent = sub.sock.send(sub.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(sub, "disconnected")
            return
        sub.last_write = now
        if sent < len(sub.out):
            sub.out = sub.out[sent:]
            return
        sub.out = None
        if sub.cursor == _CLOSING:
            self._finish_closing(sub)
            return
        self._selector.modify(sub.sock, selectors.EVENT_READ, sub)
        if self._closing_deadline is None:
            self._catch_up(sub, self.bouncer.head, now)

    def _readable(self, sub: Subscriber) -> None:
        try:
            chunk = sub.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(sub, "disconnected")
            return
        if not chunk:
            self._drop(sub, "disconnected")
            return
        # Anything else a client sends on a stream means nothing to us and is discarded, up to a limit.
        received = self._unsolicited.get(sub, 0) + len(chunk)
        self._unsolicited[sub] = received
        if received > STREAM_INPUT_LIMIT:
            self._drop(sub, "flooding")

    def _heartbeats(self, now: float) -> None:
        idle_since = now - self.heartbeat_interval
        ring = self.bouncer.ring
        failed = []
        for sub in self._subs.values():
            if sub.out is not None or sub.last_write > idle_since:
                continue
            beat = framing.HEARTBEAT
            if sub.names is not None and sub.cursor > 0:
                # A filtered stream may have skipped many events; moving its id on keeps a reconnect from
                # replaying (or resetting over) events it never wanted.
                seen = ring.get(sub.cursor - 1)
                if seen is not None and seen.id != sub.last_id_sent:
                    beat = b":\n" + framing.encode_id_only(seen.id)
                    sub.last_id_sent = seen.id
            if not self._send(sub, beat, 0, 0, now):
                failed.append(sub)
        for sub in failed:
            self._drop(sub, "disconnected")

    # -- ending streams --------------------------------------------------------------------------------------

    def _begin_closing(self) -> None:
        head = self.bouncer.head
        now = time.monotonic()
        self._sweep(head, now)  # everything accepted before the stop still goes out
        for sub in list(self._subs.values()):
            if sub.reason is None:
                self._close_gracefully(sub)

    def _close_gracefully(self, sub: Subscriber) -> None:
        sub.cursor = _CLOSING  # no more events; finish once the retry line is out
        farewell = framing.encode_jittered_retry(self._retry_ms, random.random())
        if sub.out is not None:
            sub.out = memoryview(bytes(sub.out) + farewell)
            return
        if not self._send(sub, farewell, 0, 0, time.monotonic()):
            self._drop(sub, "disconnected")
        elif sub.out is None:
            self._finish_closing(sub)

    def _finish_closing(self, sub: Subscriber) -> None:
        try:
            sub.sock.shutdown(socket.SHUT_WR)  # a clean end of stream: FIN after whole events
        except OSError:
            pass
        self._drop(sub, "shutdown")

    def _drop(self, sub: Subscriber, reason: str) -> None:
        if sub.reason is not None:
            return
        sub.reason = reason
        self._subs.pop(sub.sock.fileno(), None)
        self._unsolicited.pop(sub, None)
        try:
            self._selector.unregister(sub.sock)
        except (KeyError, ValueError):
            pass
        self.stats.dropped[reason] += 1
        self._finish(sub)

    def _finish(self, sub: Subscriber) -> None:
        try:
            sub.sock.close()
        except OSError:
            pass
        self.bouncer.unsubscribe(sub)
        if self.access_log:
            access_log.info("%s stream end: %d events in %.1fs, %s", sub.peer, sub.events_sent,
                            time.monotonic() - sub.started, _END_REASONS.get(sub.reason, sub.reason))


class Delivery:
    """The writer threads as one unit: add streams, wake on publish, end everything at shutdown."""

    def __init__(self, bouncer: Bouncer, writer_threads: int, heartbeat_interval: float):
        self.first_writes = FirstWrites()
        self.writers = [Writer(i, bouncer, heartbeat_interval, self.first_writes) for i in range(writer_threads)]
        bouncer.on_publish(self.wake)

    def start(self) -> None:
        for writer in self.writers:
            writer.start()

    def wake(self) -> None:
        for writer in self.writers:
            writer.wake()

    def add(self, sub: Subscriber, sock: socket.socket) -> None:
        # The least-loaded writer; ties and races only cost balance, never correctness.
        writer = min(self.writers, key=Writer.count) if len(self.writers) > 1 else self.writers[0]
        writer.add(sub, sock)

    def set_heartbeat(self, interval: float) -> None:
        for writer in self.writers:
            writer.set_heartbeat(interval)

    def set_access_log(self, enabled: bool) -> None:
        for writer in self.writers:
            writer.access_log = enabled

    def latency(self) -> Histogram:
        return self.first_writes.snapshot()

    def delivered(self) -> int:
        return sum(writer.stats.delivered for writer in self.writers)

    def dropped(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for writer in self.writers:
            total.update(writer.stats.dropped)
        return dict(total)

    def close_all(self, retry_ms: int, deadline: float) -> bool:
        """End every stream gracefully and stop the writers; True if all finished before the deadline."""
        for writer in self.writers:
            if writer.is_alive():
                writer.close_all(retry_ms, deadline)
        finished = True
        for writer in self.writers:
            if writer.is_alive() or writer.ident is not None:
                finished &= writer.join_stopped(max(0.0, deadline - time.monotonic()) + 1.0)
                writer.join(timeout=1.0)
        return finished

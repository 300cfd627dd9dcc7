"""Delivery: the writer threads, the only code that writes to subscriber sockets after their headers.

Owns: every open stream's socket once its response headers are out, and the stream's state (Stream below);
batching events into send() calls; heartbeats; noticing dead peers (the socket options that make one visible, and
EVENT_READ); dropping slow subscribers (by the bouncer's rule); ending streams at shutdown.
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
  accumulates a backlog, and beyond `queue_size` live publishes it is dropped (reason "slow"). A batch counts
  as one publish: it arrives at once, so a socket that was momentarily full when it came is no sign of a slow
  reader (the bouncer keeps the ring's room for it). It reconnects with Last-Event-ID and catches up from
  history. A fast subscriber is never dropped.
- The first writer also hosts guests: keep-alive publisher connections parked there between requests
  (publisher_loop.py), in an epoll of their own that the selector watches as one fd. Their publishes are answered
  and swept on this thread, with no other thread woken; while they keep coming, sweeps are SWEEP_HOLD apart so
  each carries all of them, and a long sweep serves the guests every GUEST_LOOK streams.
- The selector also watches every stream for EVENT_READ, so a client that closes is forgotten at once; TCP
  keepalive and TCP_USER_TIMEOUT (set by Delivery.add()) turn a half-open peer into a socket error within about
  two heartbeat intervals, because each heartbeat is data that must be acknowledged.
"""

import array
import collections
import dataclasses
import enum
import logging
import os
import random
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import framing
from .bouncer import Bouncer, EventNames, Replay, Ring, Subscriber
from .metrics import Histogram

log = logging.getLogger("sseserver.delivery")
access_log = logging.getLogger("sseserver.access")
# What a client may send on its stream after the request (a stray line end, a pipelined request nobody will
# answer) is read and discarded; past this many bytes it is flooding, and reading it would keep the writer busy.
STREAM_INPUT_LIMIT = 64 * 1024

# While guests (the publisher loop's connections) keep publishing, a sweep follows the previous one by at least
# this long, so that each carries every publish of that time in one send() per stream: sweeping after each
# handful of publishes let 100 streams' send() calls take most of the thread (S2: 8,300 publishes/s against
# 13,000 with publishers on threads of their own). An event published after a quiet spell is swept at once.
SWEEP_HOLD = 0.002
# A sweep serves the guests every this many streams (about 1 ms of sends), so a publisher's answer never waits
# for the whole of a long sweep (10,000 streams take about 100 ms).
GUEST_LOOK = 128
_GUESTS = object()  # the selector's data for the guests' own epoll
_EVICTED = object()  # cache marker: the events for this cursor have left the ring
_NOTHING = memoryview(b"")
# A closing stream's cursor: past any head, so a sweep skips it with the `cursor >= head` test it already makes
# for every stream that is up to date (a state check there would cost every stream of every sweep).
_CLOSING = sys.maxsize


class EndReason(enum.Enum):
    """Why a stream ended. The value is the `reason` label of sseserver_subscribers_dropped_total."""

    DISCONNECTED = "disconnected"
    SLOW = "slow"
    SHUTDOWN = "shutdown"
    FLOODING = "flooding"

    @property
    def text(self) -> str:
        """How the access log says it."""
        return _END_TEXT[self]


_END_TEXT = {
    EndReason.DISCONNECTED: "client gone",
    EndReason.SLOW: "dropped as slow",
    EndReason.SHUTDOWN: "server shutdown",
    EndReason.FLOODING: "dropped for sending data on its stream",
}


class State(enum.Enum):
    """Where a stream is in its life on its writer thread. Only that thread changes it after the hand-over, with
    one exception: Writer.add() finishes a NEW stream itself when the writer has already stopped.

    NEW         handed over by the handler, waiting in the writer's inbox
    LIVE        registered for EVENT_READ; every sweep sends it what it is missing
    BLOCKED     the socket did not take everything (`out` holds the rest) or a batch hit the size cap; also
                watched for EVENT_WRITE, and its backlog counts toward the slow rule
    CLOSING     shutdown: it gets no more events, only the farewell `retry:` (queued behind `out`)
    FINISHED    socket closed, subscriber gone from the bouncer's counts; `reason` says why
    HANDED_OVER an upgrade in place committed: the next process owns the socket (handover.py); this process only
                lets go of its descriptor, which sends nothing to the client

    NEW -> LIVE (registered) | FINISHED (the socket is already dead, or the writer has stopped)
    LIVE -> BLOCKED (send() left bytes, or more events are waiting than one batch holds)
    BLOCKED -> LIVE (the socket took the rest) | FINISHED (slow: too far behind, or its events left the ring)
    LIVE -> FINISHED (slow: the events it still needs left the ring before it was even blocked)
    LIVE, BLOCKED -> CLOSING (close_all) -> FINISHED (the farewell is out and FIN sent, or the deadline passed)
    any -> FINISHED (peer gone, flooding, the writer thread failing)
    LIVE, BLOCKED -> HANDED_OVER (Delivery.release(), only while the writers are frozen: see Writer._freeze)
    NEW with unsent bytes (adopted from the previous process) -> LIVE -> BLOCKED at once, so they go out first
    """

    NEW = "new"
    LIVE = "live"
    BLOCKED = "blocked"
    CLOSING = "closing"
    FINISHED = "finished"
    HANDED_OVER = "handed over"


class Stream:
    """One subscriber's stream on its writer: its socket and everything about it that only the writer changes.
    Attributes, not properties: the sweep reads them for every stream on every publish."""

    __slots__ = (
        "subscriber",
        "sock",
        "names",
        "cursor",
        "live_from",
        "state",
        "out",
        "scan",
        "backlog",
        "counted",
        "last_write",
        "last_id_sent",
        "peer",
        "started",
        "events_sent",
        "received",
        "reason",
        "credential",
    )

    def __init__(self, subscriber: Subscriber, sock: socket.socket):
        self.subscriber = subscriber  # handed back to the bouncer when the stream ends
        self.sock = sock
        self.names = subscriber.names
        self.cursor = subscriber.cursor  # pos of the next entry not yet handed to the socket (_CLOSING: none)
        self.live_from = subscriber.live_from
        self.state = State.NEW
        self.out: memoryview | None = None  # BLOCKED or CLOSING: bytes the socket has not taken yet
        self.scan = self.cursor  # BLOCKED: how far `backlog` has been counted
        self.backlog = 0  # BLOCKED: publishes (a batch is one) with live matching events waiting behind the socket
        self.counted = 0  # BLOCKED: the newest publish counted into `backlog` (or taken before it blocked)
        self.last_write = time.monotonic()
        self.last_id_sent: int | None = None
        self.peer = subscriber.peer
        self.started = time.monotonic()
        self.events_sent = 0
        self.received = 0  # bytes the client sent on its stream, which nobody reads
        self.reason: EndReason | None = None  # FINISHED: why
        self.credential = b""  # the digest of the token it presented (an upgrade in place checks it again)


@dataclasses.dataclass(frozen=True, slots=True)
class Add:
    """Inbox message: take over this stream."""

    stream: Stream


@dataclasses.dataclass(eq=False, slots=True)
class Guest:
    """A socket some other component serves on a writer's thread, between its sweeps (the publisher loop's parked
    connections): the writer calls `ready()` when it is readable, and `evicted()` if the writer ends while it is
    still hosted. Both run on the writer's thread; so must Writer.unhost()."""

    sock: socket.socket
    ready: Callable[[], None]
    evicted: Callable[[], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """Inbox message: watch this guest's socket."""

    guest: Guest


@dataclasses.dataclass(frozen=True, slots=True)
class CloseAll:
    """Inbox message: end every stream gracefully, with this `retry:`, by this deadline (time.monotonic())."""

    retry_ms: int
    deadline: float


@dataclasses.dataclass(frozen=True, slots=True)
class Freeze:
    """Inbox message: send what has been published, then stop at an event boundary and list the streams in
    `streams` (nothing else touches them until Delivery.thaw() or release())."""

    frozen: threading.Event
    streams: list


class WriterStats:
    """Counters owned by one writer thread (so += never races); Delivery sums them."""

    __slots__ = ("delivered", "dropped")

    def __init__(self) -> None:
        self.delivered = 0
        self.dropped: collections.Counter[EndReason] = collections.Counter()


def tune_for_dead_peers(sock: socket.socket, heartbeat_interval: float) -> None:
    """Make a dead peer visible: keepalive probes while idle, and TCP_USER_TIMEOUT so that a heartbeat that is
    never acknowledged (cable pulled) errors the socket after about one more interval."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    seconds = max(1, int(heartbeat_interval))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, seconds // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(heartbeat_interval * 1000) + 1000)
    except (OSError, AttributeError):
        pass  # a platform without these options still detects closed peers by EVENT_READ


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
        self._inbox: collections.deque[Add | Host | CloseAll | Freeze] = collections.deque()  # from other threads
        self._streams: dict[int, Stream] = {}  # by socket fd: every stream that is LIVE, BLOCKED or CLOSING
        self._guests: dict[int, Guest] = {}  # by socket fd
        # The guests wait in an epoll of their own, itself watched by the selector: a long sweep can then look
        # at them (and only them) every GUEST_LOOK streams, so a publisher never waits for a whole sweep.
        self._guest_poll = select.epoll()
        self._selector.register(self._guest_poll.fileno(), selectors.EVENT_READ, _GUESTS)
        self._guests_served = False  # since the last _poll() began
        self.guest_tick: Callable[[float], None] | None = None  # called on the heartbeat tick, for the guests
        self._swept_head = bouncer.head
        self.access_log = False
        self._closing_deadline: float | None = None
        self._retry_ms = 0
        self._stopped = threading.Event()
        self._thaw = threading.Event()  # set by thaw() / release() while frozen
        self._release = False  # with _thaw: the next process has the streams; end without closing them
        self._released = False

    # -- methods for other threads ---------------------------------------------------------------------------

    def wake(self) -> None:
        """Make the writer run a loop soon. Called on every publish, so it writes the eventfd only when the
        writer has not already been woken since its last look at the head, and not at all from the writer's own
        thread (a guest publishing): the loop looks at the head right after serving its guests."""
        if not self.wake_pending:
            if self.ident == threading.get_ident():
                return
            self.wake_pending = True
            with self._wake_lock:
                if self._wake_fd >= 0:  # -1 once the writer has ended: nothing left to wake
                    os.eventfd_write(self._wake_fd, 1)

    def add(self, stream: Stream) -> None:
        if self._stopped.is_set():  # the writer already ended (shutdown): nobody would ever close this stream
            self._finish(stream, EndReason.SHUTDOWN)
            return
        self._tell(Add(stream))

    def host(self, guest: Guest) -> None:
        """Serve `guest` on this writer's thread from now on (any thread may call this)."""
        with self._wake_lock:  # against the writer ending in between: it takes the inbox's guests under the lock
            ended = self._wake_fd < 0
            if not ended:
                self._inbox.append(Host(guest))
                self.wake_pending = True
                os.eventfd_write(self._wake_fd, 1)
        if ended:
            guest.evicted()

    def unhost(self, guest: Guest) -> None:
        """Stop watching `guest` (on the writer's thread only: from its ready() or the guest tick)."""
        fd = guest.sock.fileno()
        if self._guests.pop(fd, None) is not None:
            self._guest_poll.unregister(fd)

    def close_all(self, retry_ms: int, deadline: float) -> None:
        """End every stream: deliver what was published, a jittered `retry:`, then a clean end of stream."""
        self._tell(CloseAll(retry_ms, deadline))

    def set_heartbeat(self, interval: float) -> None:
        self.heartbeat_interval = interval  # a float store is atomic; the loop reads it each tick

    def count(self) -> int:
        return len(self._streams)

    def join_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)

    def freeze(self, message: Freeze) -> None:
        self._tell(message)

    def thaw(self, release: bool) -> None:
        self._release = release
        self._thaw.set()

    def _tell(self, message: Add | Host | CloseAll | Freeze) -> None:
        self._inbox.append(message)
        self.wake_pending = False  # force a write: the inbox must be seen even if a wake is pending
        self.wake()

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug must not leave streams hanging silently
            log.exception("writer thread failed; closing its streams")
        finally:
            for stream in list(self._streams.values()):
                self._drop(stream, EndReason.SHUTDOWN)
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
                arriving = [message.guest for message in self._inbox if isinstance(message, Host)]
            self._evict_guests(arriving)
            self._selector.close()
            self._guest_poll.close()
            self._stopped.set()

    def _loop(self) -> None:
        next_tick = time.monotonic()
        swept_at = 0.0
        while not self._released:
            timeout = max(0.0, next_tick - time.monotonic())
            if self.bouncer.head != self._swept_head:
                # Published and not swept yet: a sweep held back for more of the guests' publishes (SWEEP_HOLD),
                # or publishes guests made during the last sweep (they write no eventfd: see wake()).
                timeout = min(timeout, max(0.0, swept_at + SWEEP_HOLD - time.monotonic()))
            if self._inbox:
                timeout = 0
            now = self._poll(timeout)
            self._handle_inbox(now)
            # Clear the flag before reading the head: a publish after this point wakes us again.
            self.wake_pending = False
            head = self.bouncer.head
            if head != self._swept_head and not (self._guests_served and now < swept_at + SWEEP_HOLD):
                self._sweep(head, now, look_at_guests=True)
                swept_at = time.monotonic()
            if now >= next_tick:
                tick = min(1.0, self.heartbeat_interval / 4)
                next_tick = now + tick
                if self._closing_deadline is None:
                    self._heartbeats(now)
                if self.guest_tick is not None:
                    self.guest_tick(now)
            if self._closing_deadline is not None:
                if not self._streams:
                    return
                if now >= self._closing_deadline:
                    for stream in list(self._streams.values()):
                        self._drop(stream, EndReason.SHUTDOWN)
                    return
                next_tick = min(next_tick, self._closing_deadline)

    # The selector's answer and the inbox are handled in methods of their own so that their locals (the last
    # stream seen) are gone when they return: a stream that ended must not be kept alive by the loop's
    # variables until the next wake-up (its filter would linger in the server's table of shared filters).

    def _poll(self, timeout: float) -> float:
        """Wait up to `timeout` for sockets and wake-ups, handle what is ready, and return the time after the
        wait."""
        ready = self._selector.select(timeout)
        now = time.monotonic()
        self._guests_served = False
        for key, mask in ready:
            stream = key.data
            if stream is None:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            if stream is _GUESTS:
                self._serve_guests()
                continue
            if stream.state is State.FINISHED:
                continue  # dropped earlier in this batch
            if mask & selectors.EVENT_READ:
                self._readable(stream)
            if mask & selectors.EVENT_WRITE and stream.state is not State.FINISHED:
                self._writable(stream, now)
        return now

    def _handle_inbox(self, now: float) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            if isinstance(message, Add):
                self._register(message.stream, now)
            elif isinstance(message, Host):
                self._host(message.guest)
            elif isinstance(message, Freeze):
                self._freeze(message, now)
                if self._released:
                    return
            else:
                self._retry_ms, self._closing_deadline = message.retry_ms, message.deadline
                self._begin_closing()

    def _host(self, guest: Guest) -> None:
        try:
            fd = guest.sock.fileno()
            self._guest_poll.register(fd, select.EPOLLIN)
        except (OSError, ValueError):
            guest.evicted()
            return
        self._guests[fd] = guest

    def _serve_guests(self) -> None:
        """Every guest whose socket is readable, now (no wait)."""
        for fd, _mask in self._guest_poll.poll(0):
            guest = self._guests.get(fd)
            if guest is not None:  # not given up by an earlier guest's ready() in this batch
                guest.ready()
                self._guests_served = True

    def _evict_guests(self, arriving: list[Guest]) -> None:
        """The writer ends: every guest still here, or still on its way in the inbox (`arriving`), is evicted."""
        for guest in list(self._guests.values()) + arriving:
            self.unhost(guest)
            try:
                guest.evicted()
            except Exception:
                log.exception("evicting a guest of the writer")

    # -- per-stream work -------------------------------------------------------------------------------------

    def _register(self, stream: Stream, now: float) -> None:
        sock = stream.sock
        try:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, stream)
        except (OSError, ValueError):
            self._finish(stream, EndReason.DISCONNECTED)
            return
        self._streams[sock.fileno()] = stream
        stream.state = State.LIVE
        stream.last_write = now
        if stream.out:  # adopted with bytes the previous process could not send: they go first
            self._block(stream, stream.out)
        elif self._closing_deadline is not None:
            self._close_gracefully(stream)
        else:
            self._catch_up(stream, self.bouncer.head, now)

    def _catch_up(self, stream: Stream, head: int, now: float) -> None:
        if stream.cursor >= head:
            return
        ring = self.bouncer.ring
        start = stream.cursor
        got = self.bouncer.collect(ring, start, head, stream.names)
        if got is None:
            self._drop(stream, EndReason.SLOW)
            return
        data, count, last_id, stream.cursor = got
        if count and not self._send(stream, data, count, last_id, now):
            self._drop(stream, EndReason.DISCONNECTED)
            return
        if count:
            self.first_writes.observe(
                ring, max(start, stream.live_from), stream.cursor, stream.names, time.monotonic_ns()
            )
        if stream.cursor < head and stream.state is State.LIVE:
            self._block(stream)

    def _sweep(self, head: int, now: float, look_at_guests: bool = False) -> None:
        """Send every stream what it is missing up to `head`. `look_at_guests`: serve the guests every GUEST_LOOK
        streams (their publishes go out in the next sweep), so that a long sweep does not hold up publishers."""
        ring = self.bouncer.ring  # read after head: the ring holds every event below that head
        self._swept_head = head
        cache: dict[tuple[int, EventNames], Any] = {}  # a collect() result, or _EVICTED
        written: dict = {}  # (cursor, names) -> (pos reached, oldest live_from among its streams): for latency
        failed = []
        bouncer = self.bouncer
        look_at_guests = look_at_guests and bool(self._guests)
        for index, stream in enumerate(self._streams.values()):
            if look_at_guests and index % GUEST_LOOK == GUEST_LOOK - 1:
                self._serve_guests()
            if stream.cursor >= head:
                continue  # up to date, or CLOSING
            if stream.state is State.BLOCKED:
                if self._is_slow(stream, ring, head):
                    failed.append((stream, EndReason.SLOW))
                continue
            key = (stream.cursor, stream.names)
            got: Any = cache.get(key)
            if got is None:
                got = bouncer.collect(ring, stream.cursor, head, stream.names) or _EVICTED
                cache[key] = got
            if got is _EVICTED:
                failed.append((stream, EndReason.SLOW))
                continue
            data, count, last_id, stream.cursor = got
            if count and not self._send(stream, data, count, last_id, now):
                failed.append((stream, EndReason.DISCONNECTED))
                continue
            if count:
                seen = written.get(key)
                if seen is None or stream.live_from < seen[1]:
                    written[key] = (stream.cursor, stream.live_from)
            if stream.cursor < head and stream.state is State.LIVE:
                self._block(stream)  # a batch hit the size cap: continue as soon as the socket can take more
        for stream, reason in failed:
            self._drop(stream, reason)
        # Latency once per distinct filter and range written (not per stream: that would cost as much as the
        # delivery itself), after the sends, so that only events some socket took are observed.
        now_ns = time.monotonic_ns()
        for (cursor, names), (end, live_from) in written.items():
            self.first_writes.observe(ring, max(cursor, live_from), end, names, now_ns)

    def _is_slow(self, stream: Stream, ring: Ring, head: int) -> bool:
        """The bouncer's slow rule for a BLOCKED stream, counted incrementally (each event is looked at once per
        stream): too many publishes waiting (a batch is one), or events it still needs gone from the ring."""
        if stream.cursor < head - ring.capacity:
            return True
        got = self.bouncer.publishes_waiting(
            ring, stream.names, max(stream.scan, stream.live_from), head, stream.counted
        )
        if got is None:
            return True
        waiting, stream.counted = got
        stream.backlog += waiting
        stream.scan = head
        return self.bouncer.is_slow(stream.backlog)

    def _send(self, stream: Stream, data: bytes, count: int, last_id: int, now: float) -> bool:
        """Hand `data` to the socket; keep what it does not take. False when the peer is gone (the caller
        drops it, so that a sweep never changes the dict it iterates)."""
        try:
            sent = stream.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        stream.last_write = now
        if last_id:
            stream.last_id_sent = last_id
        stream.events_sent += count
        self.stats.delivered += count
        if sent < len(data):
            self._block(stream, memoryview(data)[sent:])
        return True

    def _block(self, stream: Stream, rest: memoryview = _NOTHING) -> None:
        """Wait for the socket to take more: `rest` is what it has not taken yet (empty when a batch only hit the
        size cap). LIVE -> BLOCKED, and from now on its backlog counts toward the slow rule; a CLOSING stream
        (its farewell not taken whole) stays CLOSING."""
        if stream.state is State.LIVE:
            stream.state = State.BLOCKED
            stream.scan = stream.cursor
            stream.backlog = 0
            # The rest of the publish it is taking (a batch cut by the size cap) is no new publish.
            stream.counted = self.bouncer.batch_before(self.bouncer.ring, stream.cursor)
        stream.out = rest
        self._selector.modify(stream.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, stream)

    def _writable(self, stream: Stream, now: float) -> None:
        """A BLOCKED or CLOSING stream's socket can take more."""
        out = stream.out
        if out is None:
            return
        try:
            sent = stream.sock.send(out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(stream, EndReason.DISCONNECTED)
            return
        stream.last_write = now
        if sent < len(out):
            stream.out = out[sent:]
            return
        stream.out = None
        if stream.state is State.CLOSING:
            self._finish_closing(stream)
            return
        stream.state = State.LIVE
        self._selector.modify(stream.sock, selectors.EVENT_READ, stream)
        if self._closing_deadline is None:
            self._catch_up(stream, self.bouncer.head, now)

    def _readable(self, stream: Stream) -> None:
        try:
            chunk = stream.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(stream, EndReason.DISCONNECTED)
            return
        if not chunk:
            self._drop(stream, EndReason.DISCONNECTED)
            return
        # Anything else a client sends on a stream means nothing to us and is discarded, up to a limit.
        stream.received += len(chunk)
        if stream.received > STREAM_INPUT_LIMIT:
            self._drop(stream, EndReason.FLOODING)

    def _heartbeats(self, now: float) -> None:
        idle_since = now - self.heartbeat_interval
        ring = self.bouncer.ring
        failed = []
        for stream in self._streams.values():
            if stream.state is not State.LIVE or stream.last_write > idle_since:
                continue
            moved = None
            if stream.names is not None and stream.cursor > 0:
                # A filtered stream may have skipped many events; moving its id on keeps a reconnect from
                # replaying (or resetting over) events it never wanted.
                seen = ring.get(stream.cursor - 1)
                if seen is not None and seen.id != stream.last_id_sent:
                    moved = stream.last_id_sent = seen.id
            beat = framing.encode_heartbeat(moved)
            if not self._send(stream, beat, 0, 0, now):
                failed.append(stream)
        for stream in failed:
            self._drop(stream, EndReason.DISCONNECTED)

    # -- an upgrade in place ---------------------------------------------------------------------------------

    def _freeze(self, message: Freeze, now: float) -> None:
        """Send everything published so far (publishing is paused), so every stream stands at an event boundary
        or holds the rest of its last send in `out`, which travels with it; list the streams and wait, touching
        nothing, until thaw(): resume as before, or (release) let go of every stream without closing it."""
        self._sweep(self.bouncer.head, now)
        message.streams.extend(self._streams.values())
        message.frozen.set()
        while not self._thaw.wait(1.0):
            pass  # the control loop thaws or releases us within the hand-over's deadline
        self._thaw.clear()
        if self._release:
            for stream in self._streams.values():
                try:
                    self._selector.unregister(stream.sock)
                except (KeyError, ValueError):
                    pass
                stream.state = State.HANDED_OVER
            self._streams.clear()
            self._released = True

    # -- ending streams --------------------------------------------------------------------------------------

    def _begin_closing(self) -> None:
        head = self.bouncer.head
        now = time.monotonic()
        self._sweep(head, now)  # everything accepted before the stop still goes out
        for stream in list(self._streams.values()):
            if stream.state is State.LIVE or stream.state is State.BLOCKED:  # not dropped during the sweep
                self._close_gracefully(stream)

    def _close_gracefully(self, stream: Stream) -> None:
        """LIVE or BLOCKED -> CLOSING: no more events; finish once the farewell `retry:` is out."""
        blocked = stream.state is State.BLOCKED
        stream.state = State.CLOSING
        stream.cursor = _CLOSING
        farewell = framing.encode_jittered_retry(self._retry_ms, random.random())
        if blocked:
            stream.out = memoryview(bytes(stream.out or b"") + farewell)
            return
        if not self._send(stream, farewell, 0, 0, time.monotonic()):
            self._drop(stream, EndReason.DISCONNECTED)
        elif stream.out is None:
            self._finish_closing(stream)

    def _finish_closing(self, stream: Stream) -> None:
        try:
            stream.sock.shutdown(socket.SHUT_WR)  # a clean end of stream: FIN after whole events
        except OSError:
            pass
        self._drop(stream, EndReason.SHUTDOWN)

    def _drop(self, stream: Stream, reason: EndReason) -> None:
        """Any registered state -> FINISHED, counted by reason."""
        if stream.state is State.FINISHED:
            return
        self._streams.pop(stream.sock.fileno(), None)
        try:
            self._selector.unregister(stream.sock)
        except (KeyError, ValueError):
            pass
        self.stats.dropped[reason] += 1
        self._finish(stream, reason)

    def _finish(self, stream: Stream, reason: EndReason) -> None:
        stream.state = State.FINISHED
        stream.reason = reason
        try:
            stream.sock.close()
        except OSError:
            pass
        self.bouncer.unsubscribe(stream.subscriber)
        if self.access_log:
            access_log.info(
                "%s stream end: %d events in %.1fs, %s",
                stream.peer,
                stream.events_sent,
                time.monotonic() - stream.started,
                reason.text,
            )


class Delivery:
    """The writer threads as one unit: add streams, wake on publish, end everything at shutdown."""

    def __init__(self, bouncer: Bouncer, writer_threads: int, heartbeat_interval: float):
        self.first_writes = FirstWrites()
        self.heartbeat_interval = heartbeat_interval
        self.writers = [Writer(i, bouncer, heartbeat_interval, self.first_writes) for i in range(writer_threads)]
        self._adopted = 0  # streams taken over from a previous process (adopt())
        self._freezing = False  # freeze() asked the writers to stop; thaw() or release() has not answered yet
        bouncer.on_publish(self.wake)

    def start(self) -> None:
        for writer in self.writers:
            writer.start()

    def wake(self) -> None:
        for writer in self.writers:
            writer.wake()

    @property
    def host_writer(self) -> Writer:
        """The writer whose thread serves guests (Guest): the first. A publish there reaches its own streams
        without a wake-up; the other writers, if any, are woken as for any publish."""
        return self.writers[0]

    def add(self, replay: Replay, sock: socket.socket, credential: bytes = b"") -> None:
        """Take over a stream whose response head is out: `sock` is its connection, detached from the request;
        `credential` the digest of the token it presented."""
        tune_for_dead_peers(sock, self.heartbeat_interval)
        # The least-loaded writer; ties and races only cost balance, never correctness.
        writer = min(self.writers, key=Writer.count) if len(self.writers) > 1 else self.writers[0]
        stream = Stream(replay.subscriber, sock)
        stream.credential = credential
        writer.add(stream)

    def set_heartbeat(self, interval: float) -> None:
        self.heartbeat_interval = interval
        for writer in self.writers:
            writer.set_heartbeat(interval)

    def set_access_log(self, enabled: bool) -> None:
        for writer in self.writers:
            writer.access_log = enabled

    def alive(self) -> bool:
        """Every writer thread is running (for the watchdog)."""
        return all(writer.is_alive() for writer in self.writers)

    def latency(self) -> Histogram:
        return self.first_writes.snapshot()

    def delivered(self) -> int:
        return sum(writer.stats.delivered for writer in self.writers)

    def dropped(self) -> dict[EndReason, int]:
        total: collections.Counter[EndReason] = collections.Counter()
        for writer in self.writers:
            total.update(writer.stats.dropped)
        return dict(total)

    def freeze(self, deadline: float) -> list[Stream] | None:
        """An upgrade in place: stop every writer at an event boundary (after sending what was published) and
        return every open stream; None when a writer did not stop by `deadline` (then thaw())."""
        messages = [Freeze(threading.Event(), []) for _ in self.writers]
        self._freezing = True
        for writer, message in zip(self.writers, messages, strict=True):
            writer.freeze(message)
        streams: list[Stream] = []
        for message in messages:
            if not message.frozen.wait(max(0.0, deadline - time.monotonic())):
                return None
            streams += message.streams
        return streams

    def thaw(self) -> None:
        """The hand-over failed: every writer goes on as before (a writer that had not frozen yet does so
        later and is thawed by this same call, as the flag stays set until it is seen). Nothing to do when no
        freeze was asked for (the hand-over failed before): a flag set then would let the next freeze through."""
        if not self._freezing:
            return
        self._freezing = False
        for writer in self.writers:
            writer.thaw(release=False)

    def release(self) -> None:
        """The hand-over committed: every writer lets go of its streams without closing them, and ends."""
        for writer in self.writers:
            writer.thaw(release=True)
        for writer in self.writers:
            writer.join(timeout=5.0)

    def adopt(
        self,
        subscriber: Subscriber,
        sock: socket.socket,
        unsent: bytes,
        last_id_sent: int | None,
        age: float,
        events_sent: int,
        received: int,
        credential: bytes,
    ) -> None:
        """Take over a stream from the previous process (handover.py): `unsent` (whole events, or the rest of
        one already begun) goes out before anything else."""
        tune_for_dead_peers(sock, self.heartbeat_interval)
        stream = Stream(subscriber, sock)
        stream.out = memoryview(unsent) if unsent else None
        stream.last_id_sent = last_id_sent
        stream.started = time.monotonic() - age
        stream.events_sent, stream.received = events_sent, received
        stream.credential = credential
        # Round robin: before the writers start, Writer.count() does not see what waits in their inboxes.
        self._adopted += 1
        self.writers[self._adopted % len(self.writers)].add(stream)

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

"""`python3 -m sseserver.bench`: measure any sseserver deployment from the outside, as one JSON line.

Owns: a load-generating HTTP client (subscriber worker processes, each multiplexing its streams with one selector,
and keep-alive publisher threads in the bench process), the latency histogram, and the verdict on whether the
client itself was the bottleneck.
Must not know: anything else of the package. It imports nothing from it (a test checks): it is only an HTTP
client, so it measures what users see, including any proxy in front of the daemon.

A run, in order (run() below reads the same way):
1. Probe every URL once, so that an address where nothing listens fails the run within seconds.
2. Fork the subscriber workers. Each opens its share of --subs streams, spread over every --url, and reports how
   far it has got in shared counters (Progress) that the bench polls.
3. Warm up: publish "w" events until every open stream has received one, because a server (or a proxy) may
   register a stream lazily, and a stream that is not live yet would count its first events as lost.
4. Measure: publish --msgs "b" events at --rate over --pub-conns connections to the first URL, then wait up to
   --drain seconds for every stream to receive every one of them. With --batch N each request is a
   POST <publish-path>/batch of N events (NDJSON); with --idempotency every event carries a unique idempotency key
   (the Idempotency-Key header, or idempotency_key on its batch line), to measure what keys cost.
5. Stop the workers, merge their histograms and counts, and print one JSON line.

Every payload is "<kind>:<seq>:<CLOCK_MONOTONIC ns at send>:<publisher connection>:" padded with "x" to --size
bytes. Subscribers run on the same machine as the publisher and read the same clock, so publish-to-receive latency
needs no clock sync. Run it on the machine the daemon is on, or any machine that reaches it; point it at nginx to
include the proxy hop.

Deliberate choices, so nobody "fixes" them:
- Subscribers live in worker processes, not threads: parsing hundreds of thousands of events per second takes
  more than the one core a GIL allows. Publishers are threads: they mostly wait for the server's replies.
- A sequence number is counted once per stream; a second copy is a duplicate, not a delivery. Reordering is
  judged per publisher connection only: the connections race each other, so their events may interleave in any
  order, but the events of one keep-alive connection are published one after another and must arrive so.
- The bench polls the workers' shared counters (every 10-50 ms) instead of waiting for messages from them: a
  worker only ever writes its own slots and never waits for the bench.
"""

import argparse
import ctypes
import itertools
import json
import math
import multiprocessing
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:5000"
# The payload kinds: warm-up events make a stream count as live; only measured events count for latency.
WARM_UP = b"w"
MEASURED = b"b"

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How long the first connection to each URL may take: an address where nothing listens must be reported at once,
# not after --connect-timeout (which is for thousands of streams queueing at a busy server).
_PROBE_TIMEOUT = 3.0
# A publish the server has not answered in this long is an error (and a new connection), not a slow run.
_PUBLISH_TIMEOUT = 30
_RECV_BYTES = 262144  # one recv() per ready stream; large enough to take a whole burst of batched events
# How long the bench waits for the workers' reports, and then for each to exit, once they are told to stop.
_REPORT_TIMEOUT = 60
_JOIN_TIMEOUT = 10


# -- the latency histogram ---------------------------------------------------------------------------------------------
# Log-scale buckets: constant relative resolution from microseconds to minutes, and a histogram is a small dict of
# non-empty buckets, so each worker keeps its own and the bench merges them at the end.

_BUCKETS_PER_DOUBLING = 64  # ~1.1% latency resolution
Histogram = dict[int, int]  # bucket -> how many deliveries fell into it


def bucket_of(microseconds: float) -> int:
    return 0 if microseconds < 1 else int(math.log2(microseconds) * _BUCKETS_PER_DOUBLING) + 1


def value_of(bucket: int) -> float:
    """The bucket's middle, in microseconds."""
    return 0.0 if bucket == 0 else 2 ** ((bucket - 0.5) / _BUCKETS_PER_DOUBLING)


def percentile(histogram: Histogram, fraction: float) -> float | None:
    """The value of the smallest bucket at or below which `fraction` of the deliveries fall; None when empty."""
    total = sum(histogram.values())
    if not total:
        return None
    wanted = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= wanted:
            return value_of(bucket)
    return None


def merge(histograms: Iterable[Histogram]) -> Histogram:
    merged: Histogram = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            merged[bucket] = merged.get(bucket, 0) + count
    return merged


# -- where to connect --------------------------------------------------------------------------------------------------


class Target:
    """One server or proxy URL, and the requests the bench sends it, built once."""

    def __init__(self, url: str, subscribe_path: str, publish_path: str, token: str | None, batch: int = 0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url must look like http://HOST:PORT, not {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        prefix = parts.path.rstrip("/")
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.subscribe_request = (
            f"GET {prefix}{subscribe_path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Accept: text/event-stream\r\n{auth}\r\n"
        ).encode()
        self._publish_head = (
            f"POST {prefix}{publish_path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: text/plain\r\n{auth}"
        ).encode()
        self._batch_head = (
            f"POST {prefix}{publish_path.rstrip('/')}/batch HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/x-ndjson\r\n{auth}"
        ).encode()
        self.batch = batch

    def publish_request(self, body: bytes, key: bytes | None = None) -> bytes:
        """A single publish of `body` (with an Idempotency-Key header when `key` is given), or with --batch a
        batch: then `body` is the NDJSON already."""
        head = self._batch_head if self.batch else self._publish_head
        if key is not None:
            head += b"Idempotency-Key: %s\r\n" % key
        return head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    def probe(self) -> None:
        """Connect once, so that a URL where nothing listens fails the run within seconds, with one clear line."""
        try:
            socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT).close()
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.url}: {exc.strerror or exc}") from None


# -- what the bench and its workers share ------------------------------------------------------------------------------


class Phase(IntEnum):
    """Where the run is, set by the bench in a shared Value and read by every worker."""

    CONNECT = 0  # open streams, then warm up: events are counted, but no CPU time is
    MEASURE = 1  # the workers' CPU time counts from here (client_worker_cpu_util_max)
    STOP = 2  # report and exit


class Progress:
    """How far each subscriber worker has got, in shared memory: one slot per worker in each counter. A slot is
    written only by its own worker, so no update is lost; the bench polls the totals."""

    def __init__(self, context, workers: int):
        self.streaming = context.Array("q", workers)  # streams whose 200 response head has arrived
        self.warm = context.Array("q", workers)  # streams that have received any bench event
        self.delivered = context.Array("q", workers)  # measured events received, duplicates not counted

    def total_streaming(self) -> int:
        return sum(self.streaming[:])

    def total_warm(self) -> int:
        return sum(self.warm[:])

    def total_delivered(self) -> int:
        return sum(self.delivered[:])


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker is asked to do."""

    index: int
    streams: int
    targets: list[Target]
    connect_timeout: float
    parent_pid: int


@dataclass(frozen=True)
class WorkerReport:
    """What one worker sends back when told to stop."""

    histogram: Histogram
    delivered: int
    duplicates: int
    reordered: int
    ended: int  # streams that ended early: refused, closed by the server, or failed
    cpu_seconds: float  # spent while measuring


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` shares that differ by at most one, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- a subscriber worker (a separate process) --------------------------------------------------------------------------


class Tally:
    """One worker's counts. The three the bench waits on are also written to the worker's slots in Progress as
    they change; the rest travel in its WorkerReport at the end."""

    __slots__ = (
        "_progress",
        "_worker",
        "streaming",
        "warm",
        "delivered",
        "duplicates",
        "reordered",
        "ended",
        "histogram",
    )

    def __init__(self, progress: Progress, worker: int):
        self._progress = progress
        self._worker = worker
        self.streaming = self.warm = self.delivered = 0
        self.duplicates = self.reordered = self.ended = 0
        self.histogram: Histogram = {}

    def add_streaming(self) -> None:
        self.streaming += 1
        self._progress.streaming[self._worker] = self.streaming

    def add_warm(self) -> None:
        self.warm += 1
        self._progress.warm[self._worker] = self.warm

    def add_delivered(self, count: int) -> None:
        self.delivered += count
        self._progress.delivered[self._worker] = self.delivered

    def report(self, cpu_seconds: float) -> WorkerReport:
        return WorkerReport(self.histogram, self.delivered, self.duplicates, self.reordered, self.ended, cpu_seconds)


class Stream:
    """One subscriber stream in a worker: its socket, the bytes not parsed yet, and what it has received."""

    __slots__ = ("sock", "pending", "streaming", "warm", "seen", "last_seq")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = b""  # a response head or an event line cut by recv(), until the rest arrives
        self.streaming = False  # its 200 response head has arrived
        self.warm = False  # it has received a bench event (of either kind)
        self.seen: set[int] = set()  # the measured seqs received, to tell duplicates
        self.last_seq: dict[bytes, int] = {}  # publisher connection -> the last seq received from it

    def receive(self, chunk: bytes, now_ns: int, tally: Tally) -> bool:
        """Count what `chunk`, read at `now_ns`, completes. False when the server refused the stream (a status
        other than 200): the caller closes it."""
        data = self.pending + chunk
        if not self.streaming:
            head_end = data.find(b"\r\n\r\n")
            if head_end < 0:
                self.pending = data
                return True
            if not data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                return False
            self.streaming = True
            tally.add_streaming()
            data = data[head_end + 4 :]
        cut = data.rfind(b"\n")
        if cut < 0:
            self.pending = data
            return True
        self.pending = data[cut + 1 :]
        self._count_events(data[:cut].split(b"\n"), now_ns, tally)
        return True

    def _count_events(self, lines: list[bytes], now_ns: int, tally: Tally) -> None:
        # The hot loop of the whole bench (once per event per stream): plain locals, one shared-counter write per
        # chunk, not per event.
        histogram = tally.histogram
        delivered = 0
        for line in lines:
            if not line.startswith(b"data: "):
                continue  # id:, event:, retry:, heartbeats and blank lines carry nothing to count
            fields = line[6:].split(b":", 3)
            if len(fields) < 3:
                continue  # not a bench payload
            if not self.warm:
                self.warm = True
                tally.add_warm()
            if fields[0] != MEASURED:
                continue
            seq, sent_ns = int(fields[1]), int(fields[2])
            if seq in self.seen:
                tally.duplicates += 1
                continue
            self.seen.add(seq)
            connection = fields[3][:2] if len(fields) > 3 else b""  # the publisher connection's two digits
            if seq < self.last_seq.get(connection, -1):
                tally.reordered += 1
            self.last_seq[connection] = seq
            delivered += 1
            bucket = bucket_of((now_ns - sent_ns) / 1000)
            histogram[bucket] = histogram.get(bucket, 0) + 1
        if delivered:
            tally.add_delivered(delivered)


def subscriber_worker(plan: WorkerPlan, phase, progress: Progress, reports) -> None:
    """A worker process: open the plan's streams, count every event until the bench says stop, then report."""
    die_with_parent(plan.parent_pid)
    tally = Tally(progress, plan.index)
    selector = selectors.DefaultSelector()
    streams = open_streams(plan)
    for stream in streams:
        selector.register(stream.sock, selectors.EVENT_READ, stream)
    cpu_seconds = read_until_stopped(selector, phase, tally, plan.parent_pid)
    reports.put(tally.report(cpu_seconds))
    for stream in streams:
        stream.sock.close()


def die_with_parent(parent_pid: int) -> None:
    """Make this worker die with the bench: a killed bench (SIGTERM, SIGKILL) runs no cleanup of its own, and
    orphaned workers would go on holding streams open. Linux sends SIGKILL on the parent's death
    (PR_SET_PDEATHSIG); elsewhere the worker's loop notices that its parent changed."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl here: orphaned() below is the only guard
    if orphaned(parent_pid):  # the bench died before prctl() took effect
        os._exit(1)


def orphaned(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


def open_streams(plan: WorkerPlan) -> list[Stream]:
    """Open the plan's streams one after another, each request sent, until all are open or the connect timeout
    runs out; the streams that did open are measured (subs_connected says how many)."""
    deadline = time.monotonic() + plan.connect_timeout
    streams = []
    for number in range(plan.streams):
        # Round robin over the URLs, starting at the worker's index, so that workers with few streams each still
        # spread over every URL.
        target = plan.targets[(number + plan.index) % len(plan.targets)]
        sock = connect_by(target, deadline, plan.parent_pid)
        if sock is None:
            break
        sock.sendall(target.subscribe_request)
        sock.setblocking(False)
        streams.append(Stream(sock))
    return streams


def connect_by(target: Target, deadline: float, parent_pid: int) -> socket.socket | None:
    """Connect, retrying until `deadline`: thousands of streams opening at once overflow a server's listen queue,
    and that is load to wait out, not an error. None when time ran out (or the bench died)."""
    while True:
        try:
            return socket.create_connection((target.host, target.port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError:
            if time.monotonic() > deadline or orphaned(parent_pid):
                return None
            time.sleep(0.05)  # back off before retrying a refused connect (listen queue full)


def read_until_stopped(selector: selectors.BaseSelector, phase, tally: Tally, parent_pid: int) -> float:
    """Read every stream and count its events until the bench sets Phase.STOP. Returns the CPU seconds spent
    from Phase.MEASURE on."""
    cpu_at_measure = None
    while phase.value < Phase.STOP:
        if orphaned(parent_pid):
            os._exit(1)
        if cpu_at_measure is None and phase.value == Phase.MEASURE:
            cpu_at_measure = time.process_time()
        for key, _ in selector.select(0.05):  # the timeout bounds how late a phase change is noticed
            stream = key.data
            try:
                chunk = stream.sock.recv(_RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk or not stream.receive(chunk, time.monotonic_ns(), tally):
                selector.unregister(stream.sock)
                stream.sock.close()
                tally.ended += 1
    return time.process_time() - (cpu_at_measure or time.process_time())


# -- the bench's side of the workers -----------------------------------------------------------------------------------


class Workers:
    """The subscriber worker processes, seen from the bench: started at once; their progress; the phase they are
    told; their reports."""

    def __init__(self, targets: list[Target], subscribers: int, procs: int, connect_timeout: float):
        count = max(1, min(procs, subscribers)) if subscribers else 0
        # Forked, so that each worker inherits the targets and the shared memory as they are.
        context = multiprocessing.get_context("fork")
        self._phase = context.Value("i", Phase.CONNECT)
        self.progress = Progress(context, count)
        self._reports = context.Queue()
        parent_pid = os.getpid()
        self._processes = [
            context.Process(
                target=subscriber_worker,
                daemon=True,
                args=(
                    WorkerPlan(index, streams, targets, connect_timeout, parent_pid),
                    self._phase,
                    self.progress,
                    self._reports,
                ),
            )
            for index, streams in enumerate(split_evenly(subscribers, count))
        ]
        for process in self._processes:
            process.start()

    def start_measuring(self) -> None:
        self._phase.value = Phase.MEASURE

    def stop(self) -> list[WorkerReport]:
        self._phase.value = Phase.STOP
        reports = [self._reports.get(timeout=_REPORT_TIMEOUT) for _ in self._processes]
        for process in self._processes:
            process.join(_JOIN_TIMEOUT)
        return reports


def poll_until(done: Callable[[], bool], deadline: float, interval: float) -> None:
    """Wait until `done()` or `deadline`, whichever comes first. The counters it reads are written by other
    processes, so there is nothing to wait on but time."""
    while not done() and time.monotonic() < deadline:
        time.sleep(interval)


# -- the publisher (threads in the bench process) ----------------------------------------------------------------------


def payload(kind: bytes, seq: int, connection: int, size: int) -> bytes:
    """A bench event's data, stamped with the monotonic clock now, padded to `size` bytes (never cut)."""
    body = b"%s:%d:%d:%02d:" % (kind, seq, time.monotonic_ns(), connection)
    return body + b"x" * max(0, size - len(body))


class Connection:
    """One keep-alive publisher connection: a POST, then the whole response, so the next POST can follow."""

    def __init__(self, target: Target):
        self.target = target
        self.sock = socket.create_connection((target.host, target.port), timeout=_PUBLISH_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()  # received, not yet consumed

    def post(self, body: bytes, key: bytes | None = None) -> int:
        """Publish `body` (see Target.publish_request); returns the response's status code."""
        sock, buffer = self.sock, self._buffer
        sock.sendall(self.target.publish_request(body, key))
        while b"\r\n\r\n" not in buffer:
            buffer += self._recv()
        head_end = buffer.find(b"\r\n\r\n") + 4
        status = int(buffer[9:12])
        length = 0
        for line in bytes(buffer[:head_end]).split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(buffer) < head_end + length:
            buffer += self._recv()
        del buffer[: head_end + length]
        return status

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("publisher connection closed")
        return chunk

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Schedule:
    """When each measured event is due: seq × interval after the start (interval 0: as fast as possible)."""

    messages: int
    start_ns: int
    interval_ns: float
    stop_ns: int  # --duration: no event is sent after this

    def due_ns(self, seq: int) -> int:
        return self.start_ns + int(seq * self.interval_ns)


def ndjson(payloads: list[bytes], keys: list[bytes] | None) -> bytes:
    """A batch body: one line per payload (bench payloads need no JSON escaping), with its key if given."""
    if keys is None:
        return b"".join(b'{"data":"%s"}\n' % data for data in payloads)
    return b"".join(b'{"data":"%s","idempotency_key":"%s"}\n' % pair for pair in zip(payloads, keys, strict=True))


class Publisher:
    """Publishes the measured events over `connections` keep-alive connections, a thread each. The threads take
    sequence numbers from one counter and keep one schedule, so together they publish at the rate asked for.
    With the target's batch size N each request carries N events (the schedule paces the first of each). Its
    counts are read after run() returns."""

    def __init__(self, target: Target, connections: int, size: int, idempotency: bool = False):
        self.target = target
        self.connections = connections
        self.size = size
        # Keys unique to this run: a run must not meet an earlier run's keys, which the server still remembers.
        self.key_prefix = os.urandom(6).hex().encode() if idempotency else None
        # Sequence numbers, taken a request's worth at a time (the first of them): next() on an itertools.count is
        # atomic under the GIL, so threads need no lock for it, and each request's events have consecutive numbers.
        self._seqs = itertools.count(0, max(1, target.batch))
        self._lock = threading.Lock()  # every connection's thread writes what follows
        self.ok = 0  # events in publishes answered 2xx
        self.requests = 0  # publish requests answered 2xx
        self.errors = 0  # events in publishes answered otherwise, or lost with their connection
        self.start_ns = 0  # the schedule's start
        self.last_reply_ns = 0
        self.max_lag_ns = 0  # how late, at worst, an event was sent against its schedule
        self.round_trips: Histogram = {}  # answered publish requests by time from sending to the answer

    def run(self, messages: int, rate: float, duration: float) -> None:
        start_ns = time.monotonic_ns()
        self.start_ns = start_ns
        schedule = Schedule(messages, start_ns, 1e9 / rate if rate > 0 else 0, start_ns + int(duration * 1e9))
        threads = [
            threading.Thread(
                target=self._publish, args=(number, schedule), daemon=True, name=f"bench-publisher-{number}"
            )
            for number in range(self.connections)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _publish(self, number: int, schedule: Schedule) -> None:
        connection = Connection(self.target)
        per_request = max(1, self.target.batch)
        while seqs := range(first := next(self._seqs), min(first + per_request, schedule.messages)):
            if schedule.interval_ns:  # paced (--rate)
                self._wait_for_turn(seqs[0], schedule)
            if time.monotonic_ns() > schedule.stop_ns:
                break
            bodies = [payload(MEASURED, seq, number, self.size) for seq in seqs]
            keys = None if self.key_prefix is None else [b"%s-%d" % (self.key_prefix, seq) for seq in seqs]
            sent_ns = time.monotonic_ns()
            try:
                if self.target.batch:
                    status = connection.post(ndjson(bodies, keys))
                else:
                    status = connection.post(bodies[0], None if keys is None else keys[0])
            except OSError:
                with self._lock:
                    self.errors += len(seqs)
                connection.close()
                connection = Connection(self.target)
                continue
            answered_ns = time.monotonic_ns()
            bucket = bucket_of((answered_ns - sent_ns) / 1000)
            with self._lock:
                if 200 <= status < 300:
                    self.ok += len(seqs)
                    self.requests += 1
                else:
                    self.errors += len(seqs)
                self.round_trips[bucket] = self.round_trips.get(bucket, 0) + 1
                self.last_reply_ns = answered_ns
        connection.close()

    def _wait_for_turn(self, seq: int, schedule: Schedule) -> None:
        wait = schedule.due_ns(seq) - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)  # pacing the schedule, not synchronising
        else:
            with self._lock:
                self.max_lag_ns = max(self.max_lag_ns, -wait)


def warm_up(target: Target, size: int, progress: Progress, connected: int, timeout: float) -> int:
    """Publish warm-up events, one at a time, until every connected stream has received one or `timeout` runs out.
    Returns how many streams are warm: the ones whose deliveries are expected."""
    connection = Connection(target)
    deadline = time.monotonic() + timeout
    seq = 0
    while progress.total_warm() < connected and time.monotonic() < deadline:
        body = payload(WARM_UP, seq, 0, size)
        connection.post(ndjson([body], None) if target.batch else body)
        seq += 1
        poll_until(lambda: progress.total_warm() >= connected, time.monotonic() + 0.2, 0.01)
    connection.close()
    return progress.total_warm()


def machine_busy_seconds() -> float | None:
    """CPU-seconds all cores spent not idle since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / ticks


# -- the measurement and its verdict -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The measured interval, as the bench process saw it (times are time.monotonic() seconds)."""

    started: float  # publishing began
    published: float  # every publisher thread had finished
    ended: float  # every expected delivery had arrived, or --drain ran out
    publisher_cpu: float  # CPU seconds of the bench process (the publisher threads and the polling)
    machine_busy: float | None  # CPU seconds all cores spent busy; None where /proc/stat is missing


def measure(workers: Workers, publisher: Publisher, ready: int, args) -> Window:
    """Publish the measured events, then wait up to --drain seconds for every ready stream to receive them."""
    workers.start_measuring()
    cpu_before = time.process_time()
    busy_before = machine_busy_seconds()
    started = time.monotonic()
    publisher.run(args.msgs, args.rate, args.duration)
    published = time.monotonic()
    expected = ready * publisher.ok
    poll_until(lambda: workers.progress.total_delivered() >= expected, published + args.drain, 0.01)
    ended = time.monotonic()
    publisher_cpu = time.process_time() - cpu_before
    busy_after = machine_busy_seconds()
    return Window(
        started,
        published,
        ended,
        publisher_cpu,
        None if busy_before is None or busy_after is None else busy_after - busy_before,
    )


def behind_schedule(rate: float, msgs: int, duration: float, achieved: float) -> bool:
    """Whether a paced run (--rate) published more than 5% slower than asked: the pace is --rate, or less when
    --msgs over --duration asks for less."""
    return rate > 0 and achieved < 0.95 * min(rate, msgs / max(duration, 1e-9))


@dataclass(frozen=True)
class ClientLoad:
    """How hard the client itself worked over the measured window, as fractions."""

    worker_util: float  # the busiest worker's CPU time over the window
    publisher_util: float  # the bench process's CPU time over its publishing time
    behind_schedule: bool
    machine_util: float | None  # every core's busy time over (window × cores); None where unknown
    client_share: float  # the client's CPU time over (window × cores)

    def is_bottleneck(self) -> bool:
        # The client is the bottleneck when one of its processes ran flat out; when a paced publisher fell behind
        # its schedule while busy; or when the machine had no idle CPU left and the client took a large part of it
        # (then the server, on the same machine, was starved).
        return (
            self.worker_util > 0.85
            or self.publisher_util > 0.85
            or (self.behind_schedule and self.publisher_util > 0.6)
            or (self.machine_util is not None and self.machine_util > 0.9 and self.client_share > 0.3)
        )


def milliseconds(microseconds: float | None) -> float | None:
    return None if microseconds is None else round(microseconds / 1000, 3)


def summarize(
    args, urls: list[str], connected: int, ready: int, publisher: Publisher, window: Window, reports: list[WorkerReport]
) -> dict:
    """The JSON line: its keys and their meaning are a published interface (README), keep them."""
    histogram = merge(report.histogram for report in reports)
    delivered = sum(report.delivered for report in reports)
    expected = ready * publisher.ok
    measure_wall = max(1e-9, window.ended - window.started)
    publish_span = max(1e-9, (publisher.last_reply_ns - publisher.start_ns) / 1e9)
    achieved = publisher.ok / publish_span if publisher.ok else 0.0
    cores = os.cpu_count() or 1
    client_cpu = window.publisher_cpu + sum(report.cpu_seconds for report in reports)
    load = ClientLoad(
        worker_util=max((report.cpu_seconds / measure_wall for report in reports), default=0.0),
        publisher_util=window.publisher_cpu / max(1e-9, window.published - window.started),
        behind_schedule=behind_schedule(args.rate, args.msgs, args.duration, achieved),
        machine_util=None if window.machine_busy is None else window.machine_busy / (measure_wall * cores),
        client_share=client_cpu / (measure_wall * cores),
    )
    return {
        "url": urls[0] if len(urls) == 1 else urls,
        "subs": args.subs,
        "subs_connected": connected,
        "subs_ready": ready,
        "msgs": args.msgs,
        "rate": args.rate,
        "pub_conns": args.pub_conns,
        "size": args.size,
        "batch": args.batch,
        "idempotency": args.idempotency,
        "published": publisher.ok,
        "publish_requests": publisher.requests,
        "publish_errors": publisher.errors,
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "duplicates": sum(report.duplicates for report in reports),
        "reordered": sum(report.reordered for report in reports),
        "streams_ended": sum(report.ended for report in reports),
        "p50_ms": milliseconds(percentile(histogram, 0.50)),
        "p90_ms": milliseconds(percentile(histogram, 0.90)),
        "p99_ms": milliseconds(percentile(histogram, 0.99)),
        "max_ms": milliseconds(value_of(max(histogram)) if histogram else None),
        "publish_rtt_p50_ms": milliseconds(percentile(publisher.round_trips, 0.50)),
        "publish_rtt_p99_ms": milliseconds(percentile(publisher.round_trips, 0.99)),
        "publishes_per_s": round(achieved, 1),
        "deliveries_per_s": round(delivered / measure_wall, 1),
        "publisher_max_lag_ms": round(publisher.max_lag_ns / 1e6, 3),
        "client_worker_cpu_util_max": round(load.worker_util, 3),
        "client_publisher_cpu_util": round(load.publisher_util, 3),
        "client_cpu_share": round(load.client_share, 3),
        "machine_cpu_util": None if load.machine_util is None else round(load.machine_util, 3),
        # True means the numbers measure this client, not the server: add --procs, lower the load, or run the
        # client on another machine.
        "client_bottleneck": load.is_bottleneck(),
    }


# -- the run -----------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    urls = args.url or [DEFAULT_URL]
    targets = [Target(url, args.subscribe_path, args.publish_path, args.token, args.batch) for url in urls]
    for target in targets:
        target.probe()
    workers = Workers(targets, args.subs, args.procs, args.connect_timeout)
    connect_deadline = time.monotonic() + args.connect_timeout
    poll_until(lambda: workers.progress.total_streaming() >= args.subs, connect_deadline, 0.05)
    connected = workers.progress.total_streaming()
    # Publishes go to the first URL; subscribers are spread over all of them.
    ready = warm_up(targets[0], args.size, workers.progress, connected, args.connect_timeout)
    publisher = Publisher(targets[0], args.pub_conns, args.size, args.idempotency)
    window = measure(workers, publisher, ready, args)
    reports = workers.stop()
    return summarize(args, urls, connected, ready, publisher, window, reports)


# Options that must be at least this much; argparse checks only their type.
_MINIMUMS = {"subs": 0, "msgs": 0, "pub_conns": 1, "procs": 1, "batch": 0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m sseserver.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        action="append",
        help=f"base URL of the server or proxy (default {DEFAULT_URL}). Repeat it for a "
        "cluster: subscribers are spread over every URL, publishes go to the first",
    )
    parser.add_argument("--subscribe-path", default="/subscribe")
    parser.add_argument("--publish-path", default="/publish")
    parser.add_argument("--token", help="bearer token for publish and subscribe, if the server requires one")
    parser.add_argument("--subs", type=int, default=100, help="subscribers (N)")
    parser.add_argument("--msgs", type=int, default=1000, help="events to publish (M)")
    parser.add_argument("--rate", type=float, default=100, help="events per second (R); 0 = as fast as possible")
    parser.add_argument("--pub-conns", type=int, default=4, help="keep-alive publisher connections")
    parser.add_argument("--size", type=int, default=64, help="payload bytes")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="subscriber worker processes")
    parser.add_argument("--duration", type=float, default=60, help="stop publishing after this many seconds")
    parser.add_argument("--drain", type=float, default=10, help="seconds to wait for deliveries after publishing")
    parser.add_argument("--connect-timeout", type=float, default=60)
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="N",
        help="publish N events per request (POST <publish-path>/batch, NDJSON); 0 = one per POST <publish-path>",
    )
    parser.add_argument(
        "--idempotency", action="store_true", help="give every event a unique idempotency key (header or line field)"
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, minimum in _MINIMUMS.items():
        if getattr(args, name) < minimum:
            parser.exit(2, f"bench: --{name.replace('_', '-')} is too small\n")
    try:
        result = run(args)
    except ValueError as exc:  # a bad --url (or a response that is not HTTP)
        sys.stderr.write(f"bench: {exc}\n")
        return 2
    except OSError as exc:  # a server that cannot be reached, or a connection lost
        sys.stderr.write(f"bench: {exc}\n")
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

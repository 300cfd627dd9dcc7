"""`python3 -m sseserver.bench`: measure any sseserver deployment from the outside, as one JSON line.

Owns: a load-generating HTTP client (subscriber worker processes multiplexing their sockets with selectors, and
keep-alive publisher threads), the latency histogram, and the verdict on whether the client itself was the
bottleneck. Imports nothing else from the package: it is only an HTTP client, so it measures what users see,
including any proxy in front of the daemon.

Every payload is "b:<seq>:<CLOCK_MONOTONIC ns at send>:" padded to --size bytes; subscribers run on the same
machine and read the same clock, so publish-to-receive latency needs no clock sync. Run it on the machine the
daemon is on, or any machine that reaches it; point it at nginx to include the proxy hop.
"""

import argparse
import ctypes
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
from urllib.parse import urlsplit

_BUCKETS_PER_DOUBLING = 64  # ~1.1% latency resolution
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How long the first connection to each URL may take: an address where nothing listens must be reported at once,
# not after --connect-timeout (which is for thousands of streams queueing at a busy server).
_PROBE_TIMEOUT = 3.0


def bucket_of(microseconds: float) -> int:
    return 0 if microseconds < 1 else int(math.log2(microseconds) * _BUCKETS_PER_DOUBLING) + 1


def value_of(bucket: int) -> float:
    return 0.0 if bucket == 0 else 2 ** ((bucket - 0.5) / _BUCKETS_PER_DOUBLING)


def percentile(histogram: dict[int, int], fraction: float) -> float | None:
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


class Target:
    def __init__(self, url: str, subscribe_path: str, publish_path: str, token: str | None):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url must look like http://HOST:PORT, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.subscribe_path = self.prefix + subscribe_path
        self.publish_path = self.prefix + publish_path
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""


def probe(target: Target, url: str) -> None:
    """Connect once, so that a URL where nothing listens fails the run within seconds, with one clear line."""
    try:
        socket.create_connection((target.host, target.port), timeout=_PROBE_TIMEOUT).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {url}: {exc.strerror or exc}") from None


# -- subscriber workers (separate processes) ------------------------------------------------------------------

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


def subscriber_worker(targets: list[Target], count: int, connect_timeout: float, phase, counters, results,
                      index: int, parent_pid: int):
    """Open `count` streams (spread over `targets`, round robin), count every event, and report a histogram
    when told to stop. counters[index*3 + 0/1/2]: streams with headers, streams that got any event, measured
    deliveries."""
    die_with_parent(parent_pid)
    selector = selectors.DefaultSelector()
    streams = {}
    deadline = time.monotonic() + connect_timeout
    for number in range(count):
        target = targets[(number + index) % len(targets)]
        request = (f"GET {target.subscribe_path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                   f"Accept: text/event-stream\r\n{target.auth}\r\n").encode()
        while True:
            try:
                sock = socket.create_connection((target.host, target.port), timeout=max(0.1, deadline - time.monotonic()))
                break
            except OSError:
                if time.monotonic() > deadline or orphaned(parent_pid):
                    sock = None
                    break
                time.sleep(0.05)  # back off before retrying a refused connect (listen queue full)
        if sock is None:
            break
        sock.sendall(request)
        sock.setblocking(False)
        state = {"buf": b"", "headers": False, "warm": False, "last": {}, "seen": set()}
        streams[sock] = state
        selector.register(sock, selectors.EVENT_READ, state)
    histogram: dict[int, int] = {}
    delivered = dups = reordered = ended = 0
    cpu_at_measure = None
    base = index * 3
    while phase.value < 3:
        if orphaned(parent_pid):
            os._exit(1)
        if phase.value == 2 and cpu_at_measure is None:
            cpu_at_measure = time.process_time()
        for key, _ in selector.select(0.05):
            sock, state = key.fileobj, key.data
            try:
                chunk = sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                selector.unregister(sock)
                sock.close()
                ended += 1
                continue
            now = time.monotonic_ns()
            data = state["buf"] + chunk
            if not state["headers"]:
                head_end = data.find(b"\r\n\r\n")
                if head_end < 0:
                    state["buf"] = data
                    continue
                if not data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    selector.unregister(sock)
                    sock.close()
                    ended += 1
                    continue
                state["headers"] = True
                with counters.get_lock():
                    counters[base] += 1
                data = data[head_end + 4:]
            cut = data.rfind(b"\n")
            if cut < 0:
                state["buf"] = data
                continue
            state["buf"] = data[cut + 1:]
            for line in data[:cut].split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                fields = line[6:].split(b":", 3)
                if len(fields) < 3:
                    continue
                if not state["warm"]:
                    state["warm"] = True
                    with counters.get_lock():
                        counters[base + 1] += 1
                if fields[0] != b"b":
                    continue
                seq, sent_ns = int(fields[1]), int(fields[2])
                if seq in state["seen"]:
                    dups += 1
                    continue
                state["seen"].add(seq)
                connection = fields[3][:2] if len(fields) > 3 else b""
                if seq < state["last"].get(connection, -1):
                    reordered += 1
                state["last"][connection] = seq
                delivered += 1
                bucket = bucket_of((now - sent_ns) / 1000)
                histogram[bucket] = histogram.get(bucket, 0) + 1
            with counters.get_lock():
                counters[base + 2] = delivered
    cpu = time.process_time() - (cpu_at_measure or time.process_time())
    results.put({"index": index, "histogram": histogram, "delivered": delivered, "dups": dups,
                 "reordered": reordered, "ended": ended, "cpu": cpu})
    for sock in list(streams):
        sock.close()


# -- the publisher (threads in the main process) --------------------------------------------------------------

class Publisher:
    def __init__(self, target: Target, connections: int, size: int):
        self.target = target
        self.connections = connections
        self.size = size
        self.lock = threading.Lock()
        self.next_seq = 0
        self.ok = self.errors = 0
        self.first_send = self.last_reply = 0
        self.max_lag_ns = 0

    def _payload(self, kind: str, seq: int, connection: int) -> bytes:
        body = f"{kind}:{seq}:{time.monotonic_ns()}:{connection:02d}:".encode()
        return body + b"x" * max(0, self.size - len(body))

    def _post(self, sock, buffer: bytearray, body: bytes) -> int:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s"
                     % (self.target.publish_path.encode(), self.target.host.encode(), self.target.auth.encode(),
                        len(body), body))
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("publisher connection closed")
            buffer += chunk
        head_end = buffer.find(b"\r\n\r\n") + 4
        status = int(buffer[9:12])
        length = 0
        for line in bytes(buffer[:head_end]).split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(buffer) < head_end + length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("publisher connection closed")
            buffer += chunk
        del buffer[:head_end + length]
        return status

    def connect(self):
        sock = socket.create_connection((self.target.host, self.target.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def warm(self, sock, buffer, seq):
        return self._post(sock, buffer, self._payload("w", seq, 0))

    def run(self, messages: int, rate: float, duration: float):
        start = time.monotonic_ns()
        self.first_send = start
        stop_at = start + int(duration * 1e9)
        threads = [threading.Thread(target=self._loop, args=(i, messages, rate, start, stop_at), daemon=True)
                   for i in range(self.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _loop(self, connection: int, messages: int, rate: float, start: int, stop_at: int):
        sock, buffer = self.connect(), bytearray()
        interval = 1e9 / rate if rate > 0 else 0
        while True:
            with self.lock:
                seq = self.next_seq
                if seq >= messages:
                    break
                self.next_seq += 1
            if interval:
                due = start + int(seq * interval)
                wait = due - time.monotonic_ns()
                if wait > 0:
                    time.sleep(wait / 1e9)  # pacing the schedule, not synchronising
                else:
                    self.max_lag_ns = max(self.max_lag_ns, -wait)
            if time.monotonic_ns() > stop_at:
                break
            try:
                status = self._post(sock, buffer, self._payload("b", seq, connection))
            except OSError:
                with self.lock:
                    self.errors += 1
                sock.close()
                sock, buffer = self.connect(), bytearray()
                continue
            with self.lock:
                if 200 <= status < 300:
                    self.ok += 1
                else:
                    self.errors += 1
                self.last_reply = time.monotonic_ns()
        sock.close()


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


# -- the run ------------------------------------------------------------------------------------------------

def run(args) -> dict:
    urls = args.url or ["http://127.0.0.1:5000"]
    targets = [Target(url, args.subscribe_path, args.publish_path, args.token) for url in urls]
    target = targets[0]  # publishes go to the first URL; subscribers are spread over all of them
    for url, each in zip(urls, targets):
        probe(each, url)
    procs = max(1, min(args.procs, args.subs)) if args.subs else 0
    context = multiprocessing.get_context("fork")
    phase = context.Value("i", 0)
    counters = context.Array("q", max(1, procs) * 3)
    results = context.Queue()
    shares = [args.subs // procs + (1 if i < args.subs % procs else 0) for i in range(procs)]
    me = os.getpid()
    workers = [context.Process(target=subscriber_worker, daemon=True,
                               args=(targets, share, args.connect_timeout, phase, counters, results, i, me))
               for i, share in enumerate(shares)]
    for worker in workers:
        worker.start()

    def total(offset):
        return sum(counters[i * 3 + offset] for i in range(procs))

    deadline = time.monotonic() + args.connect_timeout
    while total(0) < args.subs and time.monotonic() < deadline:
        time.sleep(0.05)  # polling shared counters of other processes
    connected = total(0)
    # Warm-up: publish "w" events until every stream has received one (a server may register lazily).
    publisher = Publisher(target, args.pub_conns, args.size)
    sock, buffer = publisher.connect(), bytearray()
    warm_deadline = time.monotonic() + args.connect_timeout
    seq = 0
    while total(1) < connected and time.monotonic() < warm_deadline:
        publisher.warm(sock, buffer, seq)
        seq += 1
        wait_until = time.monotonic() + 0.2
        while total(1) < connected and time.monotonic() < wait_until:
            time.sleep(0.01)
    sock.close()
    ready = total(1)
    phase.value = 2
    cpu_before = time.process_time()
    busy_before = machine_busy_seconds()
    wall_start = time.monotonic()
    publisher.run(args.msgs, args.rate, args.duration)
    publish_end = time.monotonic()
    expected = ready * publisher.ok
    drain_deadline = publish_end + args.drain
    while total(2) < expected and time.monotonic() < drain_deadline:
        time.sleep(0.01)
    last_delivery = time.monotonic()
    publisher_cpu = time.process_time() - cpu_before
    busy_after = machine_busy_seconds()
    phase.value = 3
    reports = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
    histogram: dict[int, int] = {}
    for report in reports:
        for bucket, n in report["histogram"].items():
            histogram[bucket] = histogram.get(bucket, 0) + n
    delivered = sum(r["delivered"] for r in reports)
    measure_wall = max(1e-9, last_delivery - wall_start)
    publish_span = max(1e-9, (publisher.last_reply - publisher.first_send) / 1e9)
    worker_util = max((r["cpu"] / measure_wall for r in reports), default=0.0)
    publisher_util = publisher_cpu / max(1e-9, publish_end - wall_start)
    achieved = publisher.ok / publish_span if publisher.ok else 0.0
    behind_schedule = args.rate > 0 and achieved < 0.95 * min(args.rate, args.msgs / max(args.duration, 1e-9))
    cores = os.cpu_count() or 1
    client_cpu = publisher_cpu + sum(r["cpu"] for r in reports)
    machine_util = None if busy_before is None else (busy_after - busy_before) / (measure_wall * cores)
    client_share = client_cpu / (measure_wall * cores)
    # The client is the bottleneck when one of its processes ran flat out, or when the machine had no idle CPU
    # left and the client took a large part of it (then the server, on the same machine, was starved).
    bottleneck = (worker_util > 0.85 or publisher_util > 0.85 or bool(behind_schedule and publisher_util > 0.6)
                  or (machine_util is not None and machine_util > 0.9 and client_share > 0.3))

    def ms(value):
        return None if value is None else round(value / 1000, 3)

    return {
        "url": urls[0] if len(urls) == 1 else urls, "subs": args.subs, "subs_connected": connected, "subs_ready": ready,
        "msgs": args.msgs, "rate": args.rate, "pub_conns": args.pub_conns, "size": args.size,
        "published": publisher.ok, "publish_errors": publisher.errors,
        "expected": expected, "delivered": delivered, "lost": expected - delivered,
        "duplicates": sum(r["dups"] for r in reports), "reordered": sum(r["reordered"] for r in reports),
        "streams_ended": sum(r["ended"] for r in reports),
        "p50_ms": ms(percentile(histogram, 0.50)), "p90_ms": ms(percentile(histogram, 0.90)),
        "p99_ms": ms(percentile(histogram, 0.99)), "max_ms": ms(value_of(max(histogram)) if histogram else None),
        "publishes_per_s": round(achieved, 1), "deliveries_per_s": round(delivered / measure_wall, 1),
        "publisher_max_lag_ms": round(publisher.max_lag_ns / 1e6, 3),
        "client_worker_cpu_util_max": round(worker_util, 3), "client_publisher_cpu_util": round(publisher_util, 3),
        "client_cpu_share": round(client_share, 3),
        "machine_cpu_util": None if machine_util is None else round(machine_util, 3),
        # True means the numbers measure this client, not the server: add --procs, lower the load, or run the
        # client on another machine.
        "client_bottleneck": bottleneck,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m sseserver.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append",
                        help="base URL of the server or proxy (default http://127.0.0.1:5000). Repeat it for a "
                             "cluster: subscribers are spread over every URL, publishes go to the first")
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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("subs", "msgs", "pub_conns", "procs"):
        if getattr(args, name) < (1 if name in ("pub_conns", "procs") else 0):
            parser.exit(2, f"bench: --{name.replace('_', '-')} is too small\n")
    try:
        result = run(args)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"bench: {exc}\n")
        return 1 if isinstance(exc, OSError) else 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The publisher loop (sseserver/publisher_loop.py): keep-alive publisher connections parked in one epoll thread
and answered there, against a real server over raw sockets. What it must keep: every answer in order and well
framed, every acknowledged event delivered once in id order, other requests on a parked connection served as
before (on a thread), no client able to hold the loop up, and parked connections closed on idle and at stop."""

import fcntl
import json
import os
import random
import socket
import struct
import tempfile
import termios
import threading
import time
import unittest

from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    connect,
    read_response,
    request,
    wait_for_subscribers,
    wait_until,
)

SEED_VARIABLE = "SSESERVER_TEST_SEED"


def parked(port: int) -> int:
    """sseserver_parked_publishers from /metrics."""
    for line in request(port, "GET", "/metrics")[2].decode().splitlines():
        if line.startswith("sseserver_parked_publishers "):
            return int(float(line.split()[1]))
    raise AssertionError("/metrics has no sseserver_parked_publishers")


def publish_bytes(data: bytes, path: str = "/publish", headers: dict | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class Publisher:
    """One keep-alive connection and the bytes read past the last response."""

    def __init__(self, port: int):
        self.port = port
        self.open()

    @classmethod
    def over(cls, sock: socket.socket) -> "Publisher":
        publisher = cls.__new__(cls)
        publisher.port = sock.getpeername()[1]
        publisher.sock = sock
        publisher.buffer = bytearray()
        return publisher

    @classmethod
    def small(cls, port: int) -> "Publisher":
        """A publisher whose socket buffers are small (set before connecting, so the TCP window is small too)."""
        sock = socket.socket()
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 4096)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        return cls.over(sock)

    def open(self) -> None:
        self.sock = connect(self.port)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # split writes leave as separate segments
        self.buffer = bytearray()

    def reopen(self) -> None:
        self.sock.close()
        self.open()

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def answer(self) -> tuple[int, dict, bytes]:
        return read_response(self.sock, self.buffer)

    def interim(self) -> int:
        """An interim response (100 Continue: a status line and a blank line, no headers) -> its status."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "closed before an interim response"
            self.buffer += chunk
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer[:] = rest
        return int(head.split(b" ")[1])

    def publish(self, data: bytes, **headers) -> dict:
        self.send(publish_bytes(data, headers=headers))
        status, _, body = self.answer()
        assert status == 200, (status, body)
        return json.loads(body)

    def close(self) -> None:
        self.sock.close()


class ParkingTest(unittest.TestCase):
    def test_a_keep_alive_publisher_is_answered_by_the_loop_and_its_other_requests_by_threads(self):
        with RunningServer(heartbeat_interval=60) as server, server.subscribe() as stream:
            wait_for_subscribers(server.port, 1)
            publisher = Publisher(server.port)
            ids = [int(publisher.publish(b"first")["id"])]
            wait_until(lambda: parked(server.port) == 1, what="the publisher to be parked")
            ids += [int(publisher.publish(b"p%d" % n)["id"]) for n in range(50)]
            # Not a plain publish: each goes back to a thread, is answered there, and the next publish parks again.
            publisher.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            self.assertEqual(publisher.answer()[0], 200)
            ids.append(int(publisher.publish(b"keyed", **{"Idempotency-Key": "k1"})["id"]))
            publisher.send(publish_bytes(b'{"data": "b1"}\n{"data": "b2"}\n', "/publish/batch"))
            status, _, body = publisher.answer()
            self.assertEqual(status, 200, body)
            reply = json.loads(body)
            ids += range(int(reply["first_id"]), int(reply["last_id"]) + 1)
            publisher.send(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
            self.assertEqual(publisher.answer()[0], 404)
            ids.append(int(publisher.publish(b"last")["id"]))
            wait_until(lambda: parked(server.port) == 1, what="the publisher to be parked again")
            events = stream.read_events(len(ids))
            publisher.close()
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual([int(event.id) for event in events], ids)
        self.assertEqual(
            [event.data for event in events],
            ["first", *(f"p{n}" for n in range(50)), "keyed", "b1", "b2", "last"],
        )

    def test_an_idle_parked_connection_is_closed_after_keepalive_timeout(self):
        with RunningServer(keepalive_timeout=1) as server:
            publisher = Publisher(server.port)
            publisher.publish(b"one")
            publisher.publish(b"two")
            wait_until(lambda: parked(server.port) == 1, what="the publisher to be parked")
            publisher.sock.settimeout(IO_TIMEOUT)
            self.assertEqual(publisher.sock.recv(1), b"", "the idle connection was not closed")
            wait_until(lambda: parked(server.port) == 0, what="the parked count to drop")
            publisher.close()

    def test_stopping_closes_parked_connections_at_once_and_answers_nothing_wrong(self):
        server = RunningServer(shutdown_timeout=30)
        with server:
            publishers = [Publisher(server.port) for _ in range(3)]
            for publisher in publishers:
                publisher.publish(b"a")
                publisher.publish(b"b")
            wait_until(lambda: parked(server.port) == 3, what="three parked publishers")
            started = time.monotonic()
            server.request_stop()
            for publisher in publishers:
                publisher.sock.settimeout(IO_TIMEOUT)
                self.assertEqual(publisher.sock.recv(1), b"")
                publisher.close()
            server.stop()
            # Idle connections are closed at the start of the drain, not at its deadline (shutdown_timeout).
            self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(server.exit_code, 0)

    def test_with_fsync_always_publishers_keep_their_threads(self):
        # A publish that waits for an fsync would hold every other publisher up on the loop's one thread.
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "history.log")
            with RunningServer(history_file=path, history_fsync="always") as server:
                publisher = Publisher(server.port)
                for n in range(5):
                    publisher.publish(b"%d" % n)
                self.assertEqual(parked(server.port), 0)
                publisher.close()

    def test_an_answer_too_large_for_the_socket_arrives_whole_before_the_connection_closes(self):
        """The writer's thread sends what the socket takes and leaves the rest to a thread: a `Connection: close`
        answer too must arrive whole before the close, or the publisher would see no answer to a publish that
        happened (and its retry would publish it twice)."""
        origin = "https://" + "a" * 30_000 + ".example"  # an allowed origin is echoed: a 30 KB answer
        with RunningServer(cors_origins=[origin], max_header_bytes=65536) as server, server.subscribe() as stream:
            wait_for_subscribers(server.port, 1)
            # The answer's way is narrow (the server's send buffer, which the accepted socket inherits from the
            # listener, and the publisher's receive window), the request's is wide: it arrives in one piece and
            # is answered on the writer's thread, which cannot send all of it at once.
            server.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(IO_TIMEOUT)
            sock.connect(("127.0.0.1", server.port))
            publisher = Publisher.over(sock)
            publisher.publish(b"first")
            wait_until(lambda: parked(server.port) == 1, what="the publisher to be parked")
            publisher.send(publish_bytes(b"last", headers={"Origin": origin, "Connection": "close"}))
            status, headers, body = publisher.answer()  # read_response checks the body and the close after it
            self.assertEqual((status, headers.get("connection")), (200, "close"), body)
            self.assertEqual(headers.get("access-control-allow-origin"), origin)
            (first, last) = stream.read_events(2)
            self.assertEqual((last.data, last.id), ("last", json.loads(body)["id"]))
            publisher.close()

    def test_a_publisher_that_reads_no_answers_holds_up_nobody(self):
        """A keep-alive client pipelines publishes and reads none of the answers: the loop must not wait for it.
        Its connection goes back to a thread (which waits), and another publisher is answered meanwhile."""
        count = 5000
        request_bytes = publish_bytes(b"flood")
        with RunningServer(keepalive_timeout=60, request_timeout=60) as server:
            # Small socket buffers (accepted sockets inherit the listener's), so the flooder's unread answers
            # fill them within a few hundred publishes instead of megabytes.
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                server.server.socket.setsockopt(socket.SOL_SOCKET, option, 4096)
            flooder = Publisher.small(server.port)
            flooder.publish(b"first")  # parks it
            wait_until(lambda: parked(server.port) == 1, what="the flooder to be parked")
            sent = threading.Event()

            def flood():
                # One whole request per write (TCP_NODELAY): they reach the loop whole, so it answers them itself
                # until the answers no longer fit.
                flooder.sock.settimeout(None)
                flooder.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(count):
                    flooder.sock.sendall(request_bytes)
                sent.set()

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            wait_until(lambda: unread(flooder.sock) > 0, what="the first answers to the flood")
            other = Publisher(server.port)
            for n in range(20):
                other.publish(b"other %d" % n)
            # Proof that the flood was held back while the other publisher was answered: the flooder cannot have
            # sent everything without reading (the buffers hold a small part of it).
            self.assertFalse(sent.is_set(), "the flooder was never held back, so this proved nothing")
            other.close()
            flooder.sock.settimeout(IO_TIMEOUT)
            ids = []
            for _ in range(count):
                status, _, body = flooder.answer()
                self.assertEqual(status, 200)
                ids.append(int(json.loads(body)["id"]))
            sender.join(IO_TIMEOUT)
            self.assertTrue(sent.is_set())
            self.assertEqual(ids, sorted(set(ids)))
            flooder.close()


def unread(sock: socket.socket) -> int:
    """Bytes received on `sock` and not read yet (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


class RandomRequestMixTest(unittest.TestCase):
    """Seeded random steps over several keep-alive connections: plain publishes (the loop's), publishes
    pipelined and split into pieces, named events, keyed publishes and their repeats, batches, Expect:
    100-continue, errors that keep or close the connection, health checks. Invariants: each answer is the right
    one, in order; ids rise on every connection; the subscriber gets every acknowledged event exactly once, in id
    order, with its data and name. Replay a failure with SSESERVER_TEST_SEED=<seed>."""

    STEPS = 400
    CONNECTIONS = 3

    def test_random_request_mixes(self):
        seed = int(os.environ.get(SEED_VARIABLE) or random.randrange(1 << 30))
        rng = random.Random(seed)
        steps: list[str] = []
        try:
            self._run(rng, steps)
        except (AssertionError, OSError) as exc:
            raise AssertionError(
                f"{exc}\nseed {seed} (replay: {SEED_VARIABLE}={seed}); last steps: {steps[-15:]}"
            ) from None

    def _run(self, rng: random.Random, steps: list[str]) -> None:
        with RunningServer(heartbeat_interval=60, queue_size=100_000) as server, server.subscribe() as stream:
            wait_for_subscribers(server.port, 1)
            connections = [Publisher(server.port) for _ in range(self.CONNECTIONS)]
            expected: dict[int, tuple[str, str]] = {}  # id -> (event name, data)
            keyed: dict[str, tuple[bytes, int]] = {}  # idempotency key -> (data, id)
            last_id = [0] * self.CONNECTIONS

            def accept(index: int, event_id: int, name: str, data: str) -> None:
                self.assertGreater(event_id, last_id[index], "ids went back on one connection")
                last_id[index] = event_id
                self.assertNotIn(event_id, expected, "an id was handed out twice")
                expected[event_id] = (name, data)

            for step in range(self.STEPS):
                index = rng.randrange(self.CONNECTIONS)
                conn = connections[index]
                kind = rng.choice(KINDS)
                steps.append(f"{step}:{index}:{kind}")
                data = f"s{step} caf\u00e9" + ("\nsecond line" if rng.random() < 0.2 else "")
                raw = data.encode()
                if kind == "publish":
                    accept(index, int(conn.publish(raw)["id"]), "message", data)
                elif kind == "named":
                    conn.send(publish_bytes(raw, f"/publish?event=n{step % 3}"))
                    status, _, body = conn.answer()
                    self.assertEqual(status, 200, body)
                    accept(index, int(json.loads(body)["id"]), f"n{step % 3}", data)
                elif kind == "pipelined":
                    pieces = [f"{data} #{n}" for n in range(rng.randint(2, 6))]
                    conn.send(b"".join(publish_bytes(piece.encode()) for piece in pieces))
                    for piece in pieces:
                        status, _, body = conn.answer()
                        self.assertEqual(status, 200, body)
                        accept(index, int(json.loads(body)["id"]), "message", piece)
                elif kind == "split":
                    whole = publish_bytes(raw)
                    cuts = sorted(rng.sample(range(1, len(whole)), rng.randint(1, 3)))
                    for start, end in zip([0, *cuts], [*cuts, len(whole)], strict=True):
                        conn.send(whole[start:end])
                    status, _, body = conn.answer()
                    self.assertEqual(status, 200, body)
                    accept(index, int(json.loads(body)["id"]), "message", data)
                elif kind == "keyed":
                    if keyed and rng.random() < 0.4:
                        key = rng.choice(sorted(keyed))
                        original, original_id = keyed[key]
                        reply = conn.publish(original, **{"Idempotency-Key": key})
                        self.assertEqual((int(reply["id"]), reply.get("duplicate")), (original_id, True))
                    else:
                        key = f"key-{step}"
                        reply = conn.publish(raw, **{"Idempotency-Key": key})
                        accept(index, int(reply["id"]), "message", data)
                        keyed[key] = (raw, int(reply["id"]))
                elif kind == "batch":
                    lines = [json.dumps({"data": f"{data} b{n}"}) for n in range(rng.randint(1, 4))]
                    conn.send(publish_bytes(("\n".join(lines) + "\n").encode(), "/publish/batch"))
                    status, _, body = conn.answer()
                    self.assertEqual(status, 200, body)
                    reply = json.loads(body)
                    first = int(reply["first_id"])
                    for n in range(len(lines)):
                        accept(index, first + n, "message", f"{data} b{n}")
                    self.assertEqual(int(reply["last_id"]), first + len(lines) - 1)
                elif kind == "expect":
                    head, _, body = publish_bytes(raw, headers={"Expect": "100-continue"}).partition(b"\r\n\r\n")
                    conn.send(head + b"\r\n\r\n")
                    self.assertEqual(conn.interim(), 100)
                    conn.send(body)
                    status, _, reply = conn.answer()
                    self.assertEqual(status, 200, reply)
                    accept(index, int(json.loads(reply)["id"]), "message", data)
                elif kind == "health":
                    conn.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                    self.assertEqual(conn.answer()[0], 200)
                elif kind == "bad-name":  # 400 before the body is read, so the connection closes
                    conn.send(publish_bytes(raw, "/publish?event=bad%20name"))
                    status, headers, _ = conn.answer()
                    self.assertEqual((status, headers.get("connection")), (400, "close"))
                    conn.reopen()
                elif kind == "bad-length":  # 400 with Connection: close: the next step reconnects
                    conn.send(b"POST /publish HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n")
                    status, headers, _ = conn.answer()
                    self.assertEqual((status, headers.get("connection")), (400, "close"))
                    conn.reopen()
                elif kind == "close":
                    conn.send(publish_bytes(raw, headers={"Connection": "close"}))
                    status, headers, body = conn.answer()
                    self.assertEqual((status, headers.get("connection")), (200, "close"), body)
                    accept(index, int(json.loads(body)["id"]), "message", data)
                    conn.reopen()
            for conn in connections:
                conn.publish(b"parks it")  # the last request of each connection is a plain publish
            wait_until(lambda: parked(server.port) == self.CONNECTIONS, what="every publisher parked")
            events = stream.read_events(len(expected) + self.CONNECTIONS)[: len(expected)]
            for conn in connections:
                conn.close()
        got = [(int(event.id), event.type, event.data) for event in events]
        want = [(event_id, name, data) for event_id, (name, data) in sorted(expected.items())]
        self.assertEqual(got, want)


KINDS = (
    "publish",
    "publish",
    "publish",
    "named",
    "pipelined",
    "split",
    "keyed",
    "batch",
    "expect",
    "health",
    "bad-name",
    "bad-length",
    "close",
)


if __name__ == "__main__":
    unittest.main()

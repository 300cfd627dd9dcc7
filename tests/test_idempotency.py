"""Idempotency keys on real servers: a retried publish answers with the original reply and publishes nothing;
racing duplicates publish once, after a killed connection too; a key reused for another event is 409; keys expire
(idempotency_ttl) and are bounded (idempotency_max_keys); they survive kill -9 and compaction with a history file,
and hold across two instances through a real Redis. A seeded model test mixes all of it at random."""

import contextlib
import json
import os
import random
import signal
import socket
import struct
import tempfile
import threading
import unittest
import zlib

from sseserver import history
from sseserver.idempotency import KeyBusy, KeyConflict, KeyTable, Stamp
from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    SSEClient,
    assert_exit,
    connect,
    daemon_process,
    read_response,
    request,
    stop_daemon,
    wait_for_subscribers,
    wait_until,
    write_config,
)
from tests.test_cluster import RedisServer


def keyed(port, data: str, key: str | bytes | None, event: str | None = None, headers: dict | None = None):
    """POST /publish with an Idempotency-Key -> (status, reply)."""
    raw = b"POST /publish%s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" % (
        f"?event={event}".encode() if event else b""
    )
    for name, value in (headers or {}).items():
        raw += f"{name}: {value}\r\n".encode()
    if key is not None:
        raw += b"Idempotency-Key: " + (key.encode("latin-1") if isinstance(key, str) else key) + b"\r\n"
    body = data.encode()
    raw += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with connect(port) as sock:
        sock.sendall(raw)
        status, _, reply = read_response(sock)
    return status, json.loads(reply)


def batch(port, *events: dict):
    body = b"".join(json.dumps(event).encode() + b"\n" for event in events)
    status, _, reply = request(port, "POST", "/publish/batch", body)
    return status, json.loads(reply)


def marked(client: SSEClient, port, timeout: float = IO_TIMEOUT) -> list:
    """Every event the stream gets before a marker published now: what it got, and nothing more to come."""
    marker = f"marker-{random.random()}"
    assert request(port, "POST", "/publish", marker)[0] == 200
    events = []
    while not events or events[-1].data != marker:
        events += client.read_events(1, timeout)
    return events[:-1]


class KeyTableTest(unittest.TestCase):
    """idempotency.KeyTable on its own, on a clock the test moves (nothing waits for real time)."""

    def setUp(self):
        self.now = [100.0]
        self.table = KeyTable(ttl=10, max_keys=3, clock=lambda: self.now[0])

    def stamp(self, key: str, event_id: int) -> Stamp:
        return Stamp(key, b"f" * 16, event_id, 2, 0)

    def test_a_completed_key_is_a_duplicate_until_the_ttl_then_forgotten(self):
        self.assertEqual(self.table.claim(["k"], [b"f" * 16]), [None])
        self.table.complete([self.stamp("k", 7)])
        self.now[0] += 9.9
        (stamp,) = self.table.claim(["k"], [b"f" * 16])
        self.assertEqual((stamp.event_id, stamp.subscribers), (7, 2))
        with self.assertRaises(KeyConflict) as raised:
            self.table.claim(["other", "k"], [b"g" * 16, b"g" * 16])
        self.assertEqual(raised.exception.index, 1)
        self.assertEqual(len(self.table), 1)  # the conflict held nothing
        self.now[0] += 0.1
        self.assertEqual(self.table.claim(["k"], [b"g" * 16]), [None])  # expired: like a key never seen

    def test_a_released_key_can_be_claimed_again(self):
        self.table.claim(["k"], [b"f" * 16])
        self.table.release(["k"])
        self.assertEqual(self.table.claim(["k"], [b"f" * 16]), [None])

    def test_a_duplicate_waits_for_the_pending_claim_and_gets_its_outcome(self):
        self.table.claim(["k"], [b"f" * 16])
        with self.assertRaises(KeyBusy):
            self.table.claim(["k"], [b"f" * 16], timeout=0)
        got = []
        waiting = threading.Thread(target=lambda: got.append(self.table.claim(["k"], [b"f" * 16], timeout=IO_TIMEOUT)))
        waiting.start()  # whether it is waiting yet or comes after the outcome, it gets the outcome
        self.table.complete([self.stamp("k", 9)])
        waiting.join(IO_TIMEOUT)
        self.assertEqual([[stamp.event_id for stamp in found] for found in got], [[9]])

    def test_the_oldest_completed_keys_go_first_and_pending_ones_never(self):
        self.table.claim(["pending"], [b"f" * 16])
        for n, key in enumerate(["a", "b", "c", "d"]):
            self.table.claim([key], [b"f" * 16])
            self.table.complete([self.stamp(key, n)])
        self.assertEqual(len(self.table), 3)
        self.assertEqual(self.table.claim(["a"], [b"f" * 16]), [None])  # forgotten first
        with self.assertRaises(KeyBusy):
            self.table.claim(["pending"], [b"f" * 16], timeout=0)  # still held, never evicted
        self.assertEqual([s.key for s in self.table.stamps_before(None)], ["d"])
        self.assertEqual([s.key for s in self.table.stamps_before(3)], [])

    def test_restored_keys_keep_their_age(self):
        stamps = [Stamp("old", b"f" * 16, 1, 0, 1_000), Stamp("new", b"f" * 16, 2, 0, 9_000)]
        self.assertEqual(self.table.restore(stamps, now_ms=15_000), 1)  # "old" is 14 s old: past the TTL
        self.assertEqual(self.table.claim(["new"], [b"f" * 16])[0].event_id, 2)
        self.now[0] += 4.1  # "new" was 6 s old at the restore
        self.assertEqual(self.table.claim(["new"], [b"f" * 16]), [None])


class SingleInstanceTest(unittest.TestCase):
    def test_a_browser_may_send_a_key_cross_origin(self):
        with RunningServer(cors_origins=["https://app.example.com"]) as server:
            for path in ("/publish", "/publish/batch"):
                status, headers, _ = request(
                    server.port,
                    "OPTIONS",
                    path,
                    headers={"Origin": "https://app.example.com", "Access-Control-Request-Headers": "idempotency-key"},
                )
                self.assertEqual(status, 204)
                self.assertIn("Idempotency-Key", headers["access-control-allow-headers"])

    def test_a_repeated_key_gets_the_original_reply_and_publishes_nothing(self):
        with RunningServer() as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            status, first = keyed(server.port, "hello", "order-7-created")
            self.assertEqual((status, first), (200, {"id": first["id"], "subscribers": 1}))
            for _ in range(3):
                self.assertEqual(keyed(server.port, "hello", "order-7-created"), (200, {**first, "duplicate": True}))
            self.assertEqual([(e.id, e.data) for e in marked(client, server.port)], [(first["id"], "hello")])

    def test_a_key_reused_for_another_event_is_409_and_publishes_nothing(self):
        with RunningServer() as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            status, first = keyed(server.port, "one", "k", event="a.b")
            self.assertEqual(status, 200)
            for data, event in (("two", "a.b"), ("one", "c.d"), ("one", None)):
                status, reply = keyed(server.port, data, "k", event=event)
                self.assertEqual(status, 409, reply)
                self.assertIn("different event", reply["error"])
            status, reply = batch(server.port, {"data": "x"}, {"data": "two", "event": "a.b", "idempotency_key": "k"})
            self.assertEqual((status, reply["error"][:8]), (409, "line 2: "))
            self.assertEqual([e.data for e in marked(client, server.port)], ["one"])

    def test_malformed_keys_are_400_and_the_next_request_succeeds(self):
        with RunningServer() as server:
            for key in (b"", b"has space", b"k" * 256, b"caf\xe9", b"tab\there"):
                with self.subTest(key=key):
                    status, reply = keyed(server.port, "x", key)
                    self.assertEqual(status, 400, reply)
                    self.assertIn("Idempotency-Key must be", reply["error"])
            self.assertEqual(keyed(server.port, "x", "k" * 255)[0], 200)  # the longest key
            self.assertEqual(keyed(server.port, "x", "!#$%&'()*+,-./:;<=>?@[]^_`{|}~\"\\")[0], 200)

    def test_keys_belong_to_their_publish_token(self):
        tokens = ["first-token-1234", "second-token-1234"]
        with RunningServer(publish_tokens=tokens) as server:
            ids = set()
            for token in tokens:
                status, reply = keyed(server.port, "same", "k", headers={"Authorization": f"Bearer {token}"})
                self.assertEqual(status, 200)
                self.assertNotIn("duplicate", reply)
                ids.add(reply["id"])
            self.assertEqual(len(ids), 2)
            self.assertEqual(keyed(server.port, "same", "k")[0], 401)

    def test_racing_duplicates_publish_once(self):
        for mode in ("memory", "always"):
            with self.subTest(mode=mode), tempfile.TemporaryDirectory() as tmp:
                extra = {} if mode == "memory" else {"history_file": os.path.join(tmp, "h"), "history_fsync": mode}
                with RunningServer(**extra) as server, server.subscribe() as client:
                    wait_for_subscribers(server.port, 1)
                    for round_ in range(5):
                        replies = self.race(server.port, 16, lambda n: keyed(server.port, "racing", f"race-{round_}"))
                        self.assertEqual({status for status, _ in replies}, {200})
                        self.assertEqual(len({reply["id"] for _, reply in replies}), 1, replies)
                        self.assertEqual(sum(1 for _, reply in replies if not reply.get("duplicate")), 1, replies)
                    self.assertEqual([e.data for e in marked(client, server.port)], ["racing"] * 5)

    @staticmethod
    def race(port, threads: int, call) -> list:
        start = threading.Barrier(threads)
        replies: list = [None] * threads

        def run(n):
            start.wait(IO_TIMEOUT)
            replies[n] = call(n)

        workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(IO_TIMEOUT * 3)
        return replies

    def test_a_retry_after_the_connection_was_killed_publishes_once(self):
        """The client resets its connection right after sending (its reply is lost, or the request never read),
        then retries with the same key until it gets an answer: exactly one event either way."""
        with RunningServer() as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            ids = []
            for attempt in range(20):
                body = f"payment-{attempt}".encode()
                sock = connect(server.port)
                sock.sendall(
                    b"POST /publish HTTP/1.1\r\nIdempotency-Key: pay-%d\r\nContent-Length: %d\r\n\r\n%s"
                    % (attempt, len(body), body)
                )
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # RST
                status, reply = keyed(server.port, body.decode(), f"pay-{attempt}")
                self.assertEqual(status, 200, reply)
                ids.append(reply["id"])
            events = marked(client, server.port)
            self.assertEqual([(e.id, e.data) for e in events], [(ids[n], f"payment-{n}") for n in range(20)])

    def test_batch_lines_are_published_once_within_and_across_batches(self):
        with RunningServer() as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            status, first = batch(
                server.port,
                {"data": "a", "idempotency_key": "ka"},
                {"data": "plain"},
                {"data": "a", "idempotency_key": "ka"},  # repeats line 1
                {"data": "b", "idempotency_key": "kb"},
            )
            self.assertEqual(status, 200, first)
            self.assertEqual((first["count"], int(first["last_id"]) - int(first["first_id"])), (3, 2))
            self.assertEqual(first["duplicates"], [{"line": 3, "id": first["first_id"]}])
            status, again = batch(server.port, {"data": "b", "idempotency_key": "kb"}, {"data": "c"})
            self.assertEqual((status, again["count"]), (200, 1))
            self.assertEqual(again["duplicates"], [{"line": 1, "id": first["last_id"]}])
            status, only = batch(server.port, {"data": "b", "idempotency_key": "kb"})
            self.assertEqual(only, {"first_id": None, "last_id": None, "count": 0, "subscribers": 0, **only})
            self.assertEqual(
                keyed(server.port, "a", "ka"), (200, {"id": first["first_id"], "subscribers": 1, "duplicate": True})
            )
            self.assertEqual([e.data for e in marked(client, server.port)], ["a", "plain", "b", "c"])

    def test_a_key_is_forgotten_after_the_ttl(self):
        with RunningServer(idempotency_ttl=0.2) as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            status, first = keyed(server.port, "x", "k")
            again = wait_until(
                lambda: (reply := keyed(server.port, "x", "k")[1]).get("duplicate") is None and reply,
                what="the key to expire",
            )
            self.assertGreater(int(again["id"]), int(first["id"]))
            self.assertEqual([e.id for e in marked(client, server.port)], [first["id"], again["id"]])

    def test_beyond_max_keys_the_oldest_is_forgotten_first(self):
        with RunningServer(idempotency_max_keys=2) as server:
            ids = {key: keyed(server.port, key, key)[1]["id"] for key in ("k1", "k2", "k3")}
            self.assertEqual(keyed(server.port, "k3", "k3")[1], {"id": ids["k3"], "subscribers": 0, "duplicate": True})
            self.assertEqual(keyed(server.port, "k2", "k2")[1]["id"], ids["k2"])
            reply = keyed(server.port, "k1", "k1")[1]  # forgotten: published again
            self.assertNotIn("duplicate", reply)
            self.assertGreater(int(reply["id"]), int(ids["k3"]))
            status, reply = batch(server.port, *({"data": f"b{n}", "idempotency_key": f"b{n}"} for n in range(5)))
            self.assertEqual((status, reply["count"]), (200, 5))
            self.assertEqual(len(server.server.keys), 2)  # the bound holds within a batch too


class RestartTest(unittest.TestCase):
    def test_keys_survive_kill_9_and_compaction_with_a_history_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            conf = write_config(tmp, history_file=path, history_size=5, history_fsync="interval")
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                with SSEClient(port) as client:
                    wait_for_subscribers(port, 1)
                    status, single = keyed(port, "single", "k-single")
                    status, lines = batch(port, {"data": "line", "idempotency_key": "k-line"}, {"data": "plain"})
                    client.read_events(3)
                for n in range(150):  # past the compaction threshold: the keyed events' records are dropped
                    self.assertEqual(request(port, "POST", "/publish", f"filler-{n}")[0], 200)
                wait_until(lambda: history.decode_file(open(path, "rb").read(), path).keys, what="a compaction")
                status, last = keyed(port, "last", "k-last")  # a key in an event record, at the very end
                process.send_signal(signal.SIGKILL)
                assert_exit(process, -signal.SIGKILL)
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                self.assertTrue(any("3 idempotency keys" in line for line in process.log_lines), process.log_lines)
                self.assertEqual(keyed(port, "single", "k-single")[1], {**single, "duplicate": True})
                self.assertEqual(keyed(port, "last", "k-last")[1], {**last, "duplicate": True})
                status, again = batch(port, {"data": "line", "idempotency_key": "k-line"})
                self.assertEqual(again["duplicates"], [{"line": 1, "id": lines["first_id"]}])
                self.assertEqual(keyed(port, "other", "k-single")[0], 409)
                stop_daemon(process)

    def test_a_file_of_the_second_format_is_read_and_converted(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            v2 = history.MAGIC2
            for event_id, data in ((5, "a"), (6, "b")):
                payload = struct.pack(">QQB", event_id, event_id - 1, 7) + b"message" + data.encode()
                v2 += struct.pack(
                    ">III", len(payload), zlib.crc32(struct.pack(">I", len(payload))), zlib.crc32(payload)
                )
                v2 += payload
            with open(path, "wb") as handle:
                handle.write(v2)
            conf = write_config(tmp, history_file=path)
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                with SSEClient(port, headers={"Last-Event-ID": "4"}) as client:
                    self.assertEqual([(e.id, e.data) for e in client.read_events(2)], [("5", "a"), ("6", "b")])
                self.assertEqual(keyed(port, "c", "k")[0], 200)
                stop_daemon(process)
            with open(path, "rb") as handle:
                self.assertTrue(handle.read().startswith(history.MAGIC))
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                self.assertEqual(keyed(port, "c", "k")[1].get("duplicate"), True)
                stop_daemon(process)


class RedisTest(unittest.TestCase):
    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)

    def daemons(self, **keys):
        conf = write_config(self.redis.dir, "sseserver.toml", redis_url=self.redis.url(), **keys)
        return daemon_process("--port", "0", "-c", conf), daemon_process("--port", "0", "-c", conf)

    def test_racing_duplicates_on_two_instances_publish_once(self):
        first, second = self.daemons()
        with first as (a, port_a), second as (b, port_b), SSEClient(port_b) as client:
            wait_for_subscribers(port_b, 1)
            for round_ in range(5):
                ports = (port_a, port_b)
                replies = SingleInstanceTest.race(
                    port_a, 16, lambda n: keyed(ports[n % 2], "across", f"across-{round_}")
                )
                self.assertEqual({status for status, _ in replies}, {200}, replies)
                self.assertEqual(len({reply["id"] for _, reply in replies}), 1, replies)
                self.assertEqual(sum(1 for _, reply in replies if not reply.get("duplicate")), 1, replies)
            status, reply = keyed(port_a, "another body", "across-0")
            self.assertEqual(status, 409, reply)
            status, reply = batch(
                port_b, {"data": "x", "idempotency_key": "l1"}, {"data": "y", "idempotency_key": "l1"}
            )
            self.assertEqual((status, reply["error"][:8]), (409, "line 2: "))
            status, reply = batch(
                port_b, {"data": "x", "idempotency_key": "l1"}, {"data": "across", "idempotency_key": "across-1"}
            )
            self.assertEqual((status, reply["count"], len(reply["duplicates"])), (200, 1, 1))
            self.assertEqual([e.data for e in marked(client, port_a)], ["across"] * 5 + ["x"])
            for process in (a, b):
                stop_daemon(process)

    def test_ttl_and_max_keys_hold_in_redis(self):
        first, second = self.daemons(idempotency_ttl=0.3, idempotency_max_keys=2)
        with first as (a, port_a), second as (b, port_b):
            ids = {key: keyed(port_a, key, key)[1]["id"] for key in ("k1", "k2", "k3")}
            self.assertEqual(keyed(port_b, "k3", "k3")[1].get("duplicate"), True)
            self.assertNotIn("duplicate", keyed(port_b, "k1", "k1")[1])  # the oldest, forgotten
            self.assertLessEqual(self.redis.command("HLEN", "sseserver:keys"), 2)
            again = wait_until(
                lambda: (reply := keyed(port_b, "k3", "k3")[1]).get("duplicate") is None and reply,
                what="the key to expire",
            )
            self.assertGreater(int(again["id"]), int(ids["k3"]))
            for process in (a, b):
                stop_daemon(process)


class ModelTest(unittest.TestCase):
    """Random mixes of single publishes and batches, keyed and not, with keys drawn from a small pool (sometimes
    with another body, which must be 409), from several threads at once; then the stream is checked against what
    the replies said. A failure prints the seed and the requests."""

    SEEDS = [int(os.environ["SSESERVER_TEST_SEED"])] if os.environ.get("SSESERVER_TEST_SEED") else [1, 2, 3]

    def test_memory(self):
        self.check_modes(one_server)

    def test_history_file_always(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        files = iter(range(1_000_000))
        self.check_modes(
            lambda: one_server(history_file=os.path.join(tmp.name, f"h{next(files)}"), history_fsync="always")
        )

    def test_two_instances_through_redis(self):
        redis = RedisServer().start()
        self.addCleanup(redis.cleanup)
        conf = write_config(redis.dir, "sseserver.toml", redis_url=redis.url())
        self.check_modes(lambda: two_daemons(conf), flush=lambda: redis.command("FLUSHALL"))

    def check_modes(self, servers, flush=lambda: None):
        for seed in self.SEEDS:
            with self.subTest(seed=seed):
                flush()
                with servers() as ports:
                    self.run_seed(seed, ports)

    def run_seed(self, seed: int, ports: list[int]):
        rng = random.Random(seed)
        keys = [f"key-{n}" for n in range(10)]
        plan = []  # per thread: a list of requests, each a list of lines (data, key); a single has one line
        for thread in range(4):
            requests = []
            for n in range(25):
                count = 1 if rng.random() < 0.5 else rng.randint(1, 6)
                lines = []
                for line in range(count):
                    if rng.random() < 0.6:
                        key = rng.choice(keys)
                        body = key if rng.random() < 0.9 else f"{key}-other"  # another body: a 409 if seen
                        lines.append((body, key))
                    else:
                        lines.append((f"plain-{seed}-{thread}-{n}-{line}", None))
                requests.append((count == 1 and rng.random() < 0.5, lines))  # single: POST /publish
            plan.append(requests)
        results: list = []
        lock = threading.Lock()
        steps = json.dumps(plan)

        def run(thread: int):
            for number, (single, lines) in enumerate(plan[thread]):
                port = ports[(thread + number) % len(ports)]  # with two instances, both in turn
                if single:
                    ((data, key),) = lines
                    status, reply = keyed(port, data, key)
                else:
                    status, reply = batch(
                        port, *({"data": d, **({"idempotency_key": k} if k else {})} for d, k in lines)
                    )
                with lock:
                    results.append((single, lines, status, reply))

        with SSEClient(ports[-1]) as client:
            wait_for_subscribers(ports[-1], 1)
            threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            events = marked(client, ports[0], timeout=30)
        try:
            self.check(results, events)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}\nrequests per thread: {steps}") from None

    def check(self, results, events):
        stream = {int(e.id): e.data for e in events}
        ids = [int(e.id) for e in events]
        assert ids == sorted(set(ids)), "stream ids are not strictly increasing"
        fresh: dict[int, str] = {}  # id -> data: what the replies say was published
        by_key: dict[str, tuple[int, str]] = {}  # key -> (the id and data of its one event)
        for single, lines, status, reply in results:
            if status == 409:
                continue  # checked below, once by_key is complete
            assert status == 200, (lines, status, reply)
            if single:
                ((data, key),) = lines
                outcomes = [(int(reply["id"]), data, key, bool(reply.get("duplicate")))]
            else:
                duplicates = {d["line"]: int(d["id"]) for d in reply.get("duplicates", [])}
                next_id = int(reply["first_id"]) if reply["count"] else 0
                outcomes = []
                for number, (data, key) in enumerate(lines, 1):
                    if number in duplicates:
                        outcomes.append((duplicates[number], data, key, True))
                    else:
                        outcomes.append((next_id, data, key, False))
                        next_id += 1
                if reply["count"]:  # the fresh lines got consecutive ids, first_id to last_id
                    assert next_id - 1 == int(reply["last_id"]), reply
                    assert next_id - int(reply["first_id"]) == reply["count"], reply
            for event_id, data, key, duplicate in outcomes:
                if not duplicate:
                    assert event_id not in fresh, f"id {event_id} answered for two events"
                    fresh[event_id] = data
                if key is not None:
                    known = by_key.setdefault(key, (event_id, data))
                    assert known == (event_id, data), f"key {key} answered as {known} and as {(event_id, data)}"
        # Exactly what the replies published reached the stream: nothing of a refused request, no key twice.
        assert fresh == stream, f"replies published {sorted(fresh.items())}, the stream got {sorted(stream.items())}"
        for _, lines, status, reply in results:
            if status != 409:
                continue
            bodies: dict[str, set[str]] = {}
            for data, key in lines:
                if key is not None:
                    bodies.setdefault(key, set()).add(data)
            conflicts = [
                key for key, seen in bodies.items() if len(seen) > 1 or (key in by_key and by_key[key][1] not in seen)
            ]
            assert conflicts, f"409 without a conflicting key: {lines} {reply}"


@contextlib.contextmanager
def one_server(**config):
    with RunningServer(**config) as server:
        yield [server.port]


@contextlib.contextmanager
def two_daemons(conf: str):
    with (
        daemon_process("--port", "0", "-c", conf) as (a, port_a),
        daemon_process("--port", "0", "-c", conf) as (b, port_b),
    ):
        yield [port_a, port_b]
        for process in (a, b):
            stop_daemon(process)


if __name__ == "__main__":
    unittest.main()

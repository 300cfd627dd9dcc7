"""POST /publish/batch: the NDJSON format line by line (a table of bodies, pure), then real servers: every bad
body answered with its line and nothing published, scopes and limits per line, consecutive ids among concurrent
publishers, a burst that must not cost a healthy subscriber its stream, one fsync and one Redis round trip per
batch, and a batch cut by kill -9 that is all or nothing after the restart."""

import json
import os
import re
import signal
import socket
import tempfile
import threading
import unittest

from sseserver import access, config, history, publishing
from sseserver.bouncer import BURST_ROOM
from sseserver.errors import HTTPError
from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    SSEClient,
    assert_exit,
    connect,
    daemon_process,
    health,
    read_response,
    request,
    require_binary,
    stop_daemon,
    wait_for_subscribers,
    wait_until,
    write_config,
)
from tests.test_cluster import RedisServer

SCOPED = "scoped-token-1234 orders.*"


def lines(*objects) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


def batch(port, body: bytes | str, headers: dict | None = None):
    status, _, reply = request(port, "POST", "/publish/batch", body, headers=headers)
    return status, json.loads(reply)


def metric(port, name: str) -> float:
    text = request(port, "GET", "/metrics")[2].decode()
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))


# Bodies that must be refused: (body, status, the line named, words in the error). Each is also sent to a real
# server below, which must publish nothing.
BAD_BODIES = [
    (b'{"data": "a"}\n{"data": "b"\n', 400, 2, "not valid JSON"),
    (b'{"data": "a"}\n\n{data: "b"}\n', 400, 3, "not valid JSON"),
    (b'[{"data": "a"}]\n', 400, 1, "not a JSON object"),
    (b'{"data": "a"}\n"just a string"\n', 400, 2, "not a JSON object"),
    (b"42\n", 400, 1, "not a JSON object"),
    (b"null", 400, 1, "not a JSON object"),
    (b'{"event": "x"}\n', 400, 1, '"data" must be given'),
    (b'{"data": 7}\n', 400, 1, '"data" must be given'),
    (b'{"data": null}\n', 400, 1, '"data" must be given'),
    (b'{"data": ["a"]}\n', 400, 1, '"data" must be given'),
    (b'{"data": "a", "event": 5}\n', 400, 1, '"event" must be a string'),
    (b'{"data": "a", "event": "has space"}\n', 400, 1, "event name must be"),
    (b'{"data": "a", "event": ""}\n', 400, 1, "event name must be"),
    (b'{"data": "a", "event": "' + b"x" * 65 + b'"}\n', 400, 1, "event name must be"),
    (b'{"data": "a", "event": "sseserver.reset"}\n', 400, 1, "reserved"),
    (b'{"data": "a", "evnet": "x"}\n', 400, 1, "unknown field 'evnet'"),
    (b'{"data": "a", "id": "7"}\n', 400, 1, "unknown field 'id'"),
    (b'{"data": "a"} {"data": "b"}\n', 400, 1, "more than one JSON value"),
    (b'{"data": "a"}x\n', 400, 1, "more than one JSON value"),
    (b'{"data":\n"a"}\n', 400, 1, "on one line"),
    (b'{"data": "a"}\n{"data": "\xff"}\n', 400, 2, "not valid UTF-8"),
    (b'{"data": "a"}\r\n\r\n{"data": "\xc3"}', 400, 3, "not valid UTF-8"),
    (b'{"data": "\\ud800"}\n', 400, 1, "lone surrogate"),
    (b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 400, 1, "not valid JSON"),  # deeper than the stack
    (b'{"data": ' + b"7" * 5000 + b"}\n", 400, 1, "not valid JSON"),  # more digits than int() takes
    (b'{"data": NaN}\n', 400, 1, '"data" must be given'),
    (b'\n\n  \n\t\r\n{"data"\n', 400, 5, "not valid JSON"),
    (b'{"data": "a", "idempotency_key": 7}\n', 400, 1, '"idempotency_key" must be'),
    (b'{"data": "a", "idempotency_key": ""}\n', 400, 1, '"idempotency_key" must be'),
    (b'{"data": "a", "idempotency_key": "has space"}\n', 400, 1, '"idempotency_key" must be'),
    (b'{"data": "a", "idempotency_key": "caf\\u00e9"}\n', 400, 1, '"idempotency_key" must be'),
    (b'{"data": "a", "idempotency_key": "nul\\u0000"}\n', 400, 1, '"idempotency_key" must be'),
    (b'{"data": "a", "idempotency_key": "' + b"k" * 256 + b'"}\n', 400, 1, '"idempotency_key" must be'),
    (b'{"data": "' + b"x" * 101 + b'"}\n', 413, 1, "max_message_bytes"),
    (b'{"data": "a"}\n{"data": "' + "\u00e9".encode() * 51 + b'"}\n', 413, 2, "max_message_bytes"),  # 102 bytes
    (b'{"data": "' + b"\\u00e9" * 51 + b'"}\n', 413, 1, "max_message_bytes"),  # escaped, the same 102 bytes
]
MAX_MESSAGE_BYTES = 100  # the limit the table is written for


class BatchFormatTest(unittest.TestCase):
    """publishing.parse_batch() on its own: what a line may be, and the line an error names."""

    def setUp(self):
        self.policy = access.Policy(config.from_mapping({}))
        self.grant = publishing.authorize(self.policy, {}, "127.0.0.1")

    def parse(self, body: bytes):
        return publishing.parse_batch(body, self.policy, self.grant, MAX_MESSAGE_BYTES)

    def test_every_malformed_line_is_refused_naming_its_line(self):
        for body, status, line, words in BAD_BODIES:
            with self.subTest(body=body[:60]):
                with self.assertRaises(HTTPError) as raised:
                    self.parse(body)
                self.assertEqual(raised.exception.status, status)
                self.assertTrue(raised.exception.message.startswith(f"line {line}: "), raised.exception.message)
                self.assertIn(words, raised.exception.message)

    def test_blank_lines_are_skipped_but_counted_and_line_ends_may_be_crlf(self):
        body = b'\n  \t\n{"data": "a"}\r\n\r\n {"data": "b\\r\\nc", "event": "x.y"} \r\n{"data": ""}'
        drafts, numbers = self.parse(body)
        self.assertEqual([(d.name, d.data) for d in drafts], [("message", "a"), ("x.y", "b\r\nc"), ("message", "")])
        self.assertEqual(numbers, [3, 5, 6])
        self.assertTrue(all(d.key is None for d in drafts))

    def test_data_at_the_limit_in_utf8_bytes_is_accepted(self):
        (draft,), _ = self.parse(b'{"data": "' + "\u00e9".encode() * 50 + b'"}')
        self.assertEqual(len(draft.data.encode()), MAX_MESSAGE_BYTES)

    def test_a_body_without_events_is_refused(self):
        for body in (b"", b"\n", b" \r\n\t\n", b"\n" * (1 << 20)):
            with self.subTest(body=body), self.assertRaisesRegex(HTTPError, "no events"):
                self.parse(body)

    def test_more_events_than_a_batch_holds_is_413_at_the_first_line_too_many(self):
        body = b'{"data":""}\n' * (BURST_ROOM + 1)
        with self.assertRaises(HTTPError) as raised:
            self.parse(body)
        self.assertEqual(raised.exception.status, 413)
        self.assertTrue(raised.exception.message.startswith(f"line {BURST_ROOM + 1}: "))
        self.assertEqual(len(self.parse(body[: -len(b'{"data":""}\n')])[0]), BURST_ROOM)

    def test_a_line_outside_the_token_scope_is_403_naming_it(self):
        policy = access.Policy(config.from_mapping({"publish_tokens": [SCOPED]}))
        grant = publishing.authorize(policy, {"authorization": "Bearer scoped-token-1234"}, "127.0.0.1")
        body = lines({"data": "a", "event": "orders.new"}, {"data": "b"})
        with self.assertRaises(HTTPError) as raised:
            publishing.parse_batch(body, policy, grant, 100)
        self.assertEqual((raised.exception.status, raised.exception.message[:8]), (403, "line 2: "))

    def test_keys_are_scoped_to_the_publish_token(self):
        policy = access.Policy(config.from_mapping({"publish_tokens": ["first-token-1234", "second-token-1234"]}))
        body = lines({"data": "a", "idempotency_key": "k"})
        keys = set()
        for token in ("first-token-1234", "second-token-1234"):
            grant = publishing.authorize(policy, {"authorization": f"Bearer {token}"}, "127.0.0.1")
            keys.add(publishing.parse_batch(body, policy, grant, 100)[0][0].key)
        self.assertEqual(len(keys), 2)


class BatchHTTPTest(unittest.TestCase):
    def test_every_bad_body_publishes_nothing_and_the_connection_serves_the_next_request(self):
        with RunningServer(max_message_bytes=MAX_MESSAGE_BYTES) as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            before = health(server.port)["last_event_id"]
            with connect(server.port) as sock:
                buffer = bytearray()
                for body, status, line, words in BAD_BODIES:
                    sock.sendall(b"POST /publish/batch HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    got, headers, reply = read_response(sock, buffer)
                    self.assertEqual(got, status, (body[:60], reply))
                    self.assertEqual(headers["content-type"], "application/json")
                    error = json.loads(reply)["error"]
                    self.assertTrue(error.startswith(f"line {line}: ") and words in error, error)
                sock.sendall(b"POST /publish/batch HTTP/1.1\r\nContent-Length: 14\r\n\r\n" + b'{"data": "ok"}')
                status, _, reply = read_response(sock, buffer)
                self.assertEqual(status, 200, reply)
            self.assertNotEqual(health(server.port)["last_event_id"], before)
            self.assertEqual([e.data for e in client.read_events(1)], ["ok"])  # nothing came before it

    def test_the_reply_names_consecutive_ids_and_the_streams_they_reach(self):
        with RunningServer() as server:
            with server.subscribe() as everything, server.subscribe("/subscribe?event=b") as only_b:
                wait_for_subscribers(server.port, 2)
                status, reply = batch(server.port, lines({"data": "1", "event": "a"}, {"data": "2", "event": "b"}))
                self.assertEqual(status, 200, reply)
                self.assertEqual(reply["count"], 2)
                self.assertEqual(int(reply["last_id"]), int(reply["first_id"]) + 1)
                self.assertEqual(reply["subscribers"], 2)  # the most streams any one event reached
                self.assertNotIn("duplicates", reply)
                self.assertEqual(
                    [(e.id, e.type, e.data) for e in everything.read_events(2)],
                    [(reply["first_id"], "a", "1"), (reply["last_id"], "b", "2")],
                )
                self.assertEqual([e.id for e in only_b.read_events(1)], [reply["last_id"]])

    def test_body_limits_and_methods(self):
        with RunningServer(max_batch_bytes=1000) as server:
            body = lines(*({"data": "x" * 40} for _ in range(30)))  # over 1000 bytes
            status, reply = batch(server.port, body)
            self.assertEqual((status, reply["error"]), (413, "body is larger than max_batch_bytes (1000)"))
            chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            status, reply = batch(server.port, chunked, headers={"Transfer-Encoding": "chunked"})
            self.assertEqual((status, reply["error"]), (413, "body is larger than max_batch_bytes (1000)"))
            status, _, put = request(server.port, "PUT", "/publish/batch", lines({"data": "by PUT"}))
            self.assertEqual(status, 200, put)
            status, headers, _ = request(server.port, "GET", "/publish/batch")
            self.assertEqual((status, headers["allow"]), (405, "POST, PUT, OPTIONS"))
            status, reply = batch(server.port, lines({"data": "a"}), headers={"Idempotency-Key": "k"})
            self.assertEqual(status, 400)
            self.assertIn("idempotency_key on each line", reply["error"])
            self.assertEqual(request(server.port, "POST", "/publish", "the next request")[0], 200)

    def test_tokens_scopes_and_the_rate_limit_apply_per_batch_and_per_line(self):
        with RunningServer(publish_tokens=[SCOPED], publish_rate=0.001, publish_burst=2) as server:
            body = lines({"data": "a", "event": "orders.new"}, {"data": "b", "event": "orders.paid"})
            self.assertEqual(batch(server.port, body)[0], 401)
            auth = {"Authorization": "Bearer scoped-token-1234"}
            outside = lines({"data": "a", "event": "orders.new"}, {"data": "b", "event": "users.new"})
            status, reply = batch(server.port, outside, headers=auth)
            self.assertEqual((status, reply["error"]), (403, "line 2: token does not allow event 'users.new'"))
            before = health(server.port)["last_event_id"]
            status, reply = batch(server.port, body, headers=auth)  # a whole batch takes one token
            self.assertEqual((status, reply["count"]), (200, 2))
            self.assertEqual(batch(server.port, body, headers=auth)[0], 429)
            self.assertNotEqual(before, reply["last_id"])

    def test_concurrent_batches_and_single_publishes_keep_each_batch_consecutive_and_in_order(self):
        rounds, size = 30, 25
        with RunningServer(history_size=5000) as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            batches: list[tuple[int, list[str]]] = []
            singles: list[tuple[int, str]] = []
            lock = threading.Lock()

            def batcher(tag):
                for round_ in range(rounds):
                    data = [f"{tag}-{round_}-{i}" for i in range(size)]
                    status, reply = batch(server.port, lines(*({"data": d} for d in data)))
                    assert status == 200, reply
                    assert int(reply["last_id"]) - int(reply["first_id"]) == size - 1, reply
                    with lock:
                        batches.append((int(reply["first_id"]), data))

            def single(tag):
                for round_ in range(rounds * 2):
                    status, _, reply = request(server.port, "POST", "/publish", f"{tag}-{round_}")
                    assert status == 200, reply
                    with lock:
                        singles.append((int(json.loads(reply)["id"]), f"{tag}-{round_}"))

            threads = [threading.Thread(target=batcher, args=(f"b{t}",)) for t in range(3)]
            threads += [threading.Thread(target=single, args=(f"s{t}",)) for t in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            expected = {first + i: data for first, datas in batches for i, data in enumerate(datas)}
            expected.update(singles)
            self.assertEqual(len(expected), 3 * rounds * size + 3 * rounds * 2)  # no id given twice
            events = client.read_events(len(expected), timeout=60)
            self.assertEqual([(int(e.id), e.data) for e in events], sorted(expected.items()))

    def test_a_burst_does_not_drop_a_healthy_subscriber_whose_socket_is_momentarily_full(self):
        """queue_size 16 and batches of 1,000 events (about 0.5 MB each): the subscriber reads only once the burst
        is over, so its socket's buffers (at most ~4 MB on Linux) fill and the later batches arrive while it is
        blocked. Counting events waiting, the old rule dropped it at the first of them; a batch counts as one
        publish now, and the ring's room (4 x max_batch_bytes) holds what the socket has not taken."""
        batches, total = 16, 16 * 1000
        with RunningServer(queue_size=16, max_batch_bytes=4 << 20) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.settimeout(IO_TIMEOUT)
            sock.sendall(b"GET /subscribe HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_for_subscribers(server.port, 1)
            for round_ in range(batches):
                body = lines(*({"data": f"{round_}-{i}-" + "x" * 500} for i in range(1000)))
                status, reply = batch(server.port, body)
                self.assertEqual(status, 200, reply)
            received, tail = 0, b""
            while received < total:  # counted chunk by chunk: "\ndata: " may be cut between two reads
                chunk = sock.recv(65536)
                if not chunk:
                    break
                both = tail + chunk
                received += both.count(b"\ndata: ")
                tail = both[-6:]  # too short to hold a whole match: none is counted twice
            sock.close()
            self.assertEqual(received, total)
            self.assertEqual(metric(server.port, 'sseserver_subscribers_dropped_total{reason="slow"}'), 0)

    def test_a_stalled_subscriber_is_still_dropped_and_memory_stays_bounded(self):
        with RunningServer(queue_size=4, history_size=10, max_batch_bytes=100_000) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /subscribe HTTP/1.1\r\nHost: t\r\n\r\n")  # and never reads
            wait_for_subscribers(server.port, 1)
            body = lines(*({"data": "x" * 80} for _ in range(500)))

            def dropped():
                self.assertEqual(batch(server.port, body)[0], 200)
                return health(server.port)["subscribers"] == 0

            wait_until(dropped, what="the stalled subscriber to be dropped")
            sock.close()
            self.assertEqual(metric(server.port, 'sseserver_subscribers_dropped_total{reason="slow"}'), 1)
            bouncer = server.server.bouncer
            held = [bouncer.ring.get(pos) for pos in range(bouncer.head)]
            held = [event for event in held if event is not None]
            # The newest history_size + queue_size, and a room of at most 4 x max_batch_bytes beyond them.
            self.assertLessEqual(sum(len(e.wire) for e in held[:-14]), 400_000)


class BatchDurabilityTest(unittest.TestCase):
    def test_one_fsync_per_batch_with_fsync_always_and_ids_survive_a_restart(self):
        strace = require_binary("strace")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            trace = os.path.join(tmp, "trace")
            conf = write_config(tmp, history_file=path, history_fsync="always", history_size=10_000)
            prefix = [strace, "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", trace]
            with daemon_process("--port", "0", "-c", conf, prefix=prefix) as (process, port):

                def fsyncs():
                    with open(trace) as handle:
                        return sum(1 for line in handle if "fsync(" in line)

                before = fsyncs()
                status, reply = batch(port, lines(*({"data": f"e{i}"} for i in range(500))))
                self.assertEqual((status, reply["count"]), (200, 500))
                self.assertEqual(fsyncs() - before, 1)
                first = reply["first_id"]
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(IO_TIMEOUT)
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                with SSEClient(port, headers={"Last-Event-ID": str(int(first) - 1)}) as client:
                    events = client.read_events(500)
                self.assertEqual([e.id for e in events], [str(int(first) + i) for i in range(500)])
                stop_daemon(process)

    def test_a_batch_cut_by_a_crash_after_whole_records_is_dropped_whole_at_start(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            store = history.HistoryFile(path, "never", 1.0, 100)
            store.load()
            events = [history.StoredEvent(10 + i, 9 + i, "message", f"e{i}") for i in range(4)]
            store.append_many(events[:1])
            store.append_many(events[1:])
            store.close()
            whole = open(path, "rb").read()
            last = len(history.encode_record(13, 12, "message", "e3"))
            for cut, kept in ((0, 4), (last, 1), (last + 5, 1), (len(whole) - len(history.MAGIC), 0)):
                with self.subTest(cut=cut):
                    with open(path, "wb") as handle:
                        handle.write(whole[: len(whole) - cut])
                    store = history.HistoryFile(path, "never", 1.0, 100)
                    self.assertEqual([e.data for e in store.load()], [f"e{i}" for i in range(kept)])
                    store.close()
                    # The unfinished batch was cut off the file, so the next append follows a whole one.
                    self.assertEqual(len(history.decode_records(open(path, "rb").read(), path)[0]), kept)

    def test_kill_9_during_batches_leaves_each_batch_whole_or_absent(self):
        with tempfile.TemporaryDirectory() as tmp:
            conf = write_config(tmp, history_file=os.path.join(tmp, "h.log"), history_size=100_000)
            acknowledged: set[str] = set()
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                stop = threading.Event()

                def publisher(tag):
                    try:
                        with connect(port) as sock:
                            buffer = bytearray()
                            for round_ in range(10_000):
                                if stop.is_set():
                                    return
                                body = lines(*({"data": f"{tag}-{round_}-{i}"} for i in range(300)))
                                sock.sendall(b"POST /publish/batch HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
                                sock.sendall(body)
                                if read_response(sock, buffer)[0] == 200:
                                    acknowledged.add(f"{tag}-{round_}")
                    except (OSError, ValueError):
                        return

                threads = [threading.Thread(target=publisher, args=(t,)) for t in "ab"]
                for thread in threads:
                    thread.start()
                wait_until(lambda: len(acknowledged) >= 20, what="20 acknowledged batches")
                process.send_signal(signal.SIGKILL)
                assert_exit(process, -signal.SIGKILL)
                stop.set()
                for thread in threads:
                    thread.join(IO_TIMEOUT)
            with daemon_process("--port", "0", "-c", conf) as (process, port):
                stored = history.decode_records(open(os.path.join(tmp, "h.log"), "rb").read(), "h")[0]
                counts: dict[str, int] = {}
                for event in stored:
                    tag = event.data.rsplit("-", 1)[0]
                    counts[tag] = counts.get(tag, 0) + 1
                self.assertTrue(all(count == 300 for count in counts.values()), counts)
                self.assertLessEqual(acknowledged, set(counts))
                stop_daemon(process)


class BatchRedisTest(unittest.TestCase):
    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.config = write_config(self.redis.dir, "sseserver.toml", redis_url=self.redis.url(), history_size=50)

    def script_calls(self) -> int:
        stats = self.redis.command("INFO", "commandstats")
        stats = stats.decode() if isinstance(stats, bytes) else stats
        return sum(int(n) for n in re.findall(r"^cmdstat_(?:evalsha|eval):calls=(\d+)", stats, re.MULTILINE))

    def test_a_batch_is_one_round_trip_and_its_entries_chain_like_single_publishes(self):
        with daemon_process("--port", "0", "-c", self.config) as (a, port_a):
            with daemon_process("--port", "0", "-c", self.config) as (b, port_b), SSEClient(port_b) as on_b:
                wait_for_subscribers(port_b, 1)
                self.assertEqual(batch(port_a, lines({"data": "loads the script"}))[0], 200)
                single = json.loads(request(port_a, "POST", "/publish", "before")[2])["id"]
                on_b.read_events(1)
                calls = self.script_calls()  # from here on the script is loaded: one EVALSHA per batch
                size = 200  # more than history_size: the stream keeps room for a whole batch
                status, reply = batch(port_a, lines(*({"data": f"e{i}", "event": "n"} for i in range(size))))
                self.assertEqual(status, 200, reply)
                self.assertEqual(self.script_calls() - calls, 1)
                events = on_b.read_events(size + 1)
                self.assertEqual([e.type for e in events[1:]], ["n"] * size)
                self.assertEqual(
                    [e.id for e in events], [single] + [str(int(reply["first_id"]) + i) for i in range(size)]
                )
                entries = self.redis.command("XRANGE", "sseserver:events", "-", "+")
                fields = [dict(zip(f[::2], f[1::2])) for _, f in entries]
                ids = [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]
                for previous_id, previous, entry in zip(ids, fields, fields[1:]):
                    self.assertEqual(int(entry[b"p"]), previous_id)  # the chain the followers check
                    self.assertEqual(entry[b"q"], previous[b"k"])
                    self.assertIn(b"r", entry)
                self.assertEqual(ids[-size:], list(range(ids[-size], ids[-size] + size)))
                self.assertEqual(len({f[b"b"] for f in fields[-size:]}), 1)  # one batch mark
                self.assertNotIn(b"b", fields[-size - 1])  # not on a single publish
                self.assertEqual(metric(port_b, 'sseserver_subscribers_dropped_total{reason="slow"}'), 0)
                for process in (a, b):
                    stop_daemon(process)

    def test_back_to_back_full_batches_reach_every_instance_without_a_reset(self):
        """No fault, so nothing may be lost: an earlier version kept room for one batch beyond history_size in
        the stream (MAXLEN ~), and its followers, reading 1,000 entries at a time, fell further behind than that
        while full batches kept coming: most of them were trimmed before any instance read them (resets)."""
        with daemon_process("--port", "0", "-c", self.config) as (a, port_a):
            with daemon_process("--port", "0", "-c", self.config) as (b, port_b):
                with SSEClient(port_a) as on_a, SSEClient(port_b) as on_b:
                    wait_for_subscribers(port_a, 1)
                    wait_for_subscribers(port_b, 1)
                    sent = []
                    for number in range(6):
                        data = [f"b{number}:{i}" for i in range(BURST_ROOM)]
                        status, reply = batch(port_a, lines(*({"data": d} for d in data)))
                        self.assertEqual(status, 200, reply)
                        sent += data
                    for client in (on_a, on_b):
                        events = client.read_events(len(sent), timeout=120)
                        self.assertEqual([e.type for e in events if e.type != "message"], [])
                        self.assertEqual([e.data for e in events], sent)
                for process in (a, b):
                    stop_daemon(process)


if __name__ == "__main__":
    unittest.main()

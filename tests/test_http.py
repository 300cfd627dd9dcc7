"""The HTTP API against a real server on 127.0.0.1 port 0, with raw sockets as clients."""

import json
import socket
import threading
import unittest

from sseserver.delivery import EndReason
from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    connect,
    raw_exchange,
    read_response,
    request,
    wait_for_subscribers,
    wait_until,
)


class SubscribeAndPublishTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = RunningServer(heartbeat_interval=60)
        cls.server.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_stream_headers_and_retry_come_before_any_event(self):
        with self.server.subscribe() as client:
            self.assertEqual(client.status, 200)
            self.assertEqual(client.headers["content-type"], "text/event-stream; charset=utf-8")
            self.assertEqual(client.headers["cache-control"], "no-cache")
            self.assertEqual(client.headers["x-accel-buffering"], "no")
            client.wait_for(lambda c: c.retry is not None, what="retry line")
            self.assertEqual(client.retry, 3000)
            self.assertTrue(bytes(client.raw).startswith(b"retry: 3000\n\n"))

    def test_publish_reaches_every_subscriber_with_exact_bytes(self):
        with self.server.subscribe() as first, self.server.subscribe() as second:
            wait_for_subscribers(self.server.port, 2)
            status, headers, body = self.server.publish("Hey!")
            self.assertEqual(status, 200)
            self.assertEqual(headers["content-type"], "application/json")
            reply = json.loads(body)
            self.assertEqual(reply["subscribers"], 2)
            for client in (first, second):
                (event,) = client.read_events(1)
                self.assertEqual((event.type, event.data, event.id), ("message", "Hey!", reply["id"]))
                self.assertIn(f"id: {reply['id']}\ndata: Hey!\n\n".encode(), bytes(client.raw))

    def test_multiline_unicode_and_empty_payloads(self):
        payloads = ["a\r\nb\rc\nd", "", "caf\u00e9 \u2603", "x" * 60000, "\n"]
        with self.server.subscribe() as client:
            wait_for_subscribers(self.server.port, 1)
            for payload in payloads:
                self.assertEqual(self.server.publish(payload)[0], 200)
            got = client.read_events(len(payloads))
        self.assertEqual([e.data for e in got], ["a\nb\nc\nd", "", "caf\u00e9 \u2603", "x" * 60000, "\n"])

    def test_ids_strictly_increase(self):
        ids = [int(json.loads(self.server.publish("x")[2])["id"]) for _ in range(20)]
        self.assertEqual(ids, sorted(set(ids)))

    def test_an_event_filter_delivers_only_the_named_events(self):
        with self.server.subscribe("/subscribe?event=a&event=c") as client:
            wait_for_subscribers(self.server.port, 1)
            for name in ("a", "b", "c"):
                self.server.publish(name, event=name)
            self.server.publish("plain")
            self.server.publish("a2", event="a")
            got = client.read_events(3)
        self.assertEqual([(e.type, e.data) for e in got], [("a", "a"), ("c", "c"), ("a", "a2")])

    def test_message_filter_gets_unnamed_events(self):
        with self.server.subscribe("/subscribe?event=message") as client:
            wait_for_subscribers(self.server.port, 1)
            self.server.publish("named", event="other")
            self.server.publish("plain")
            (event,) = client.read_events(1)
        self.assertEqual(event.data, "plain")

    def test_keep_alive_publishes_on_one_connection(self):
        with connect(self.server.port) as sock:
            buffer = bytearray()
            for index in range(5):
                sock.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % index)
                status, headers, _ = read_response(sock, buffer)
                self.assertEqual((status, headers["connection"]), (200, "keep-alive"))

    def test_three_pipelined_requests_get_three_answers(self):
        raw = (
            b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\nA"
            b"GET /health HTTP/1.1\r\n\r\nPOST /publish HTTP/1.1\r\nConnection: close\r\nContent-Length: 1\r\n\r\nB"
        )
        out = raw_exchange(self.server.port, raw)
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 3)

    def test_a_chunked_publish_body_becomes_one_event(self):
        with connect(self.server.port) as sock:
            sock.sendall(
                b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"4\r\nHey \r\n7\r\nchunked\r\n0\r\n\r\n"
            )
            status, _, body = read_response(sock)
        self.assertEqual(status, 200)
        (event,) = [e for e in self.server.server.bouncer.history() if e.id == int(json.loads(body)["id"])]
        self.assertEqual(event.data, "Hey chunked")

    def test_put_is_an_alias_for_post(self):
        self.assertEqual(request(self.server.port, "PUT", "/publish", "x")[0], 200)

    def test_expect_100_continue_gets_the_interim_answer_before_the_body_is_sent(self):
        with connect(self.server.port) as sock:
            sock.sendall(
                b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            )
            interim = sock.recv(100)
            self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"hello")
            self.assertEqual(read_response(sock)[0], 200)

    def test_health_is_200_ok_with_its_fields_and_head_has_no_body(self):
        status, headers, body = request(self.server.port, "GET", "/health")
        self.assertEqual(status, 200)
        health = json.loads(body)
        self.assertEqual(health["status"], "ok")
        for key in ("subscribers", "last_event_id", "history_size", "uptime_s"):
            self.assertIn(key, health)
        # What streams get, for clients such as `sseserver doctor` that judge what they see by it.
        self.assertEqual((health["heartbeat_interval"], health["retry_ms"]), (60.0, 3000))
        status, headers, body = request(self.server.port, "HEAD", "/health")
        self.assertEqual((status, body), (200, b""))

    def test_an_http_1_0_client_gets_a_stream(self):
        with connect(self.server.port) as sock:
            sock.sendall(b"GET /subscribe HTTP/1.0\r\n\r\n")
            wait_for_subscribers(self.server.port, 1)
            self.server.publish("old client")
            data = bytearray()
            while b"old client" not in data:
                data += sock.recv(4096)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"))


class ErrorTest(unittest.TestCase):
    """Every bad input: its status, a JSON error, and the next request on the same server succeeds."""

    @classmethod
    def setUpClass(cls):
        cls.server = RunningServer(max_message_bytes=1000)
        cls.server.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    CASES = [
        ("POST", "/publish", b"\xff\xfe", {}, 400, "UTF-8"),
        ("POST", "/publish?event=bad%20name", b"x", {}, 400, "event name"),
        ("POST", "/publish?event=sseserver.reset", b"x", {}, 400, "reserved"),
        ("POST", "/publish?event=a&event=b", b"x", {}, 400, "at most one"),
        ("POST", "/publish", None, {}, 411, "Content-Length"),
        ("POST", "/publish", b"x" * 1001, {}, 413, "max_message_bytes"),
        ("GET", "/nothing-here", None, {}, 404, "no such path"),
        ("GET", "/publish", None, {}, 405, "not allowed"),
        ("POST", "/subscribe", b"", {}, 405, "not allowed"),
        ("GET", "/subscribe?event=a%0Ab", None, {}, 400, "bad event name"),
        ("POST", "/publish", b"x", {"Content-Length": "abc"}, 400, "Content-Length"),
        ("POST", "/publish", b"x", {"Transfer-Encoding": "gzip"}, 501, "chunked"),
    ]

    def test_each_error_then_a_good_request(self):
        for method, path, body, headers, status, phrase in self.CASES:
            with self.subTest(method=method, path=path, status=status):
                got, reply_headers, reply = request(self.server.port, method, path, body, headers)
                self.assertEqual(got, status)
                self.assertEqual(reply_headers["content-type"], "application/json")
                self.assertIn(phrase, json.loads(reply)["error"])
                if status == 405:
                    self.assertIn(reply_headers["allow"], ("POST, PUT, OPTIONS", "GET, OPTIONS"))
                self.assertEqual(self.server.publish("still fine")[0], 200)

    def test_nothing_is_broadcast_for_a_too_large_body(self):
        before = self.server.health()["last_event_id"]
        self.assertEqual(self.server.publish("y" * 5000)[0], 413)
        self.assertEqual(self.server.health()["last_event_id"], before)

    def test_too_large_with_expect_is_refused_before_the_body(self):
        with connect(self.server.port) as sock:
            sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
            status, headers, body = read_response(sock)
        self.assertEqual((status, headers["connection"]), (413, "close"))

    def test_an_unread_body_closes_the_connection_and_says_so(self):
        with connect(self.server.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nContent-Length: 26\r\n\r\nGET /health HTTP/1.1\r\n\r\n")
            status, headers, _ = read_response(sock)
            self.assertEqual((status, headers["connection"]), (200, "close"))
            self.assertEqual(sock.recv(100), b"")  # the body was not taken for a second request

    def test_a_garbage_request_line_is_400_with_a_json_error(self):
        out = raw_exchange(self.server.port, b"\x00\x01garbage\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "))
        self.assertIn(b'{"error": "malformed request line"}', out)
        self.assertEqual(self.server.publish("still fine")[0], 200)

    def test_keep_alive_survives_a_4xx(self):
        with connect(self.server.port) as sock:
            buffer = bytearray()
            sock.sendall(b"GET /nope HTTP/1.1\r\n\r\n")
            self.assertEqual(read_response(sock, buffer)[0], 404)
            sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
            self.assertEqual(read_response(sock, buffer)[0], 200)


class UnreadResponsesTest(unittest.TestCase):
    def test_a_client_that_never_reads_its_responses_is_closed_quietly(self):
        """Requests pipelined without reading one answer: once the send timeout runs out the server closes the
        connection. That is the client's timeout, not our failure: no traceback, no 500."""
        with RunningServer(request_timeout=0.5, keepalive_timeout=0.5) as server:
            with self.assertNoLogs("sseserver", level="WARNING"), socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
                sock.settimeout(IO_TIMEOUT)
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 2000)  # ~30 MB of demo pages asked for
                wait_for_subscribers(server.port, 0)
                wait_until(lambda: not server.server._connections, what="the connection to be given up")
                while sock.recv(65536):  # what the kernel buffered, then the end
                    pass
            self.assertNotIn(500, server.server.statuses.snapshot())
            self.assertEqual(request(server.port, "GET", "/health")[0], 200)


class ReplayTest(unittest.TestCase):
    def test_last_event_id_header_and_query(self):
        with RunningServer(history_size=100) as server:
            ids = [json.loads(server.publish(f"e{i}")[2])["id"] for i in range(5)]
            with server.subscribe(headers={"Last-Event-ID": ids[1]}) as client:
                self.assertEqual([e.data for e in client.read_events(3)], ["e2", "e3", "e4"])
                server.publish("live")
                self.assertEqual(client.read_events(1)[0].data, "live")
            with server.subscribe(f"/subscribe?last_event_id={ids[3]}") as client:
                self.assertEqual([e.data for e in client.read_events(2)], ["e4", "live"])
            # the header wins over the query (the URL never changes across browser reconnects)
            with server.subscribe(f"/subscribe?last_event_id={ids[0]}", {"Last-Event-ID": ids[3]}) as client:
                self.assertEqual([e.data for e in client.read_events(2)], ["e4", "live"])

    def test_a_replay_larger_than_one_batch_arrives_whole_and_in_order(self):
        with RunningServer(history_size=100, max_message_bytes=65536) as server:
            payloads = [f"{index:03d}" + "x" * 60000 for index in range(40)]  # ~2.4 MB: several 1 MiB batches
            for payload in payloads:
                self.assertEqual(server.publish(payload)[0], 200)
            with server.subscribe(headers={"Last-Event-ID": "0"}) as client:
                notice, *events = client.read_events(41)  # "0" is not one of our ids: a reset, then everything
                self.assertEqual(notice.type, "sseserver.reset")
                self.assertEqual([e.data for e in events], payloads)
                server.publish("live after the replay")
                self.assertEqual(client.read_events(1)[0].data, "live after the replay")

    def test_reset_for_an_id_older_than_history_or_not_an_integer(self):
        with RunningServer(history_size=3) as server:
            ids = [json.loads(server.publish(f"e{i}")[2])["id"] for i in range(6)]
            # "événement-7": EventSource sends the id as UTF-8, and the reset echoes it back as the page holds it.
            for last in (ids[1], "bogus", str(int(ids[-1]) + 1), "événement-7"):
                with self.subTest(last=last), server.subscribe(headers={"Last-Event-ID": last}) as client:
                    notice, *rest = client.read_events(4)
                    self.assertEqual(notice.type, "sseserver.reset")
                    self.assertEqual(json.loads(notice.data), {"last_event_id": last, "oldest_id": ids[3]})
                    self.assertEqual([e.data for e in rest], ["e3", "e4", "e5"])

    def test_replay_hand_over_under_concurrent_publishing(self):
        """Subscribers join with a Last-Event-ID while a publisher keeps publishing: each must see every id
        after its own, once, in order, across the switch from replay to live."""
        with RunningServer(history_size=5000, queue_size=5000) as server:
            stop = threading.Event()
            published = []

            def publisher():
                with connect(server.port) as sock:
                    buffer = bytearray()
                    while not stop.is_set() and len(published) < 3000:
                        sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\nx")
                        published.append(int(json.loads(read_response(sock, buffer)[2])["id"]))

            thread = threading.Thread(target=publisher)
            thread.start()
            try:
                clients = []
                for start in range(5):
                    wait_until(lambda: len(published) > (start + 1) * 100, what="publishes")
                    last = published[-50]
                    clients.append((last, server.subscribe(headers={"Last-Event-ID": str(last)})))
            finally:
                stop.set()
                thread.join(IO_TIMEOUT)
            final = published[-1]
            for last, client in clients:
                with client:
                    events = client.read_events(final - last)
                    self.assertEqual([int(e.id) for e in events], list(range(last + 1, final + 1)))


class BouncerBehaviourTest(unittest.TestCase):
    def test_heartbeat_comment_when_idle(self):
        with RunningServer(heartbeat_interval=0.2) as server, server.subscribe() as client:
            client.wait_for(lambda c: c.comments >= 2, what="two heartbeats")

    def test_filtered_stream_heartbeat_moves_the_last_id(self):
        with RunningServer(heartbeat_interval=0.2) as server, server.subscribe("/subscribe?event=a") as client:
            wait_for_subscribers(server.port, 1)
            reply = json.loads(server.publish("not for you", event="b")[2])
            client.wait_for(lambda c: c.last_id == reply["id"], what="id-only block")
            self.assertEqual(client.pending, [])

    def test_disconnected_subscriber_is_forgotten(self):
        with RunningServer(heartbeat_interval=60) as server:
            client = server.subscribe()
            wait_for_subscribers(server.port, 1)
            client.close()
            # well within one heartbeat interval: the writer watches every stream for EOF
            wait_for_subscribers(server.port, 0)

    def test_slow_subscriber_is_dropped_and_fast_one_is_not(self):
        with RunningServer(queue_size=4, history_size=10) as server:
            slow = socket.create_connection(("127.0.0.1", server.port))
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.sendall(b"GET /subscribe HTTP/1.1\r\n\r\n")
            with server.subscribe() as fast:
                wait_for_subscribers(server.port, 2)
                payload = "z" * 60000
                sent = 0
                # publish until the slow one (which never reads) is dropped; the fast one reads everything
                while server.health()["subscribers"] == 2:
                    self.assertLess(sent, 400, "slow subscriber never dropped")
                    self.assertEqual(server.publish(payload)[0], 200)
                    sent += 1
                    fast.read_events(1)
                self.assertEqual(server.health()["subscribers"], 1)
                self.assertEqual(server.server.delivery.dropped().get(EndReason.SLOW), 1)
                server.publish("after")
                self.assertEqual(fast.read_events(1)[0].data, "after")
            slow.close()

    def test_past_max_subscribers_a_client_gets_503_and_a_browser_a_retry_and_an_end(self):
        with RunningServer(max_subscribers=1) as server, server.subscribe():
            wait_for_subscribers(server.port, 1)
            status, headers, body = request(server.port, "GET", "/subscribe")
            self.assertEqual(status, 503)
            self.assertIn("retry-after", headers)
            self.assertIn("too many", json.loads(body)["error"])
            # a browser gets 200 + retry + end of stream: a 503 would make EventSource give up for good
            status, headers, body = request(server.port, "GET", "/subscribe", headers={"Accept": "text/event-stream"})
            self.assertEqual((status, headers["content-type"]), (200, "text/event-stream; charset=utf-8"))
            self.assertRegex(body, rb"^retry: \d+\n\n$")

    def test_while_stopping_health_is_503_and_work_is_turned_away(self):
        with RunningServer() as server:
            server.server.stop_accepting()  # what SIGTERM does first; the listener is still open in this test
            status, _, body = request(server.port, "GET", "/health")
            self.assertEqual((status, json.loads(body)["status"]), (503, "stopping"))
            status, headers, body = server.publish("late")
            self.assertEqual((status, json.loads(body)["error"]), (503, "shutting down"))
            self.assertIn("retry-after", headers)
            status, _, body = request(server.port, "GET", "/subscribe", headers={"Accept": "text/event-stream"})
            self.assertEqual(status, 200)
            self.assertRegex(body, rb"^retry: \d+\n\n$")

    def test_stop_ends_streams_with_retry_and_delivers_what_was_accepted(self):
        server = RunningServer(retry_ms=1000)
        with server:
            clients = [server.subscribe() for _ in range(3)]
            wait_for_subscribers(server.port, 3)
            server.publish("last words")
            server.request_stop()
            for client in clients:
                with client:
                    events = client.read_until_closed()
                    self.assertEqual([e.data for e in events], ["last words"])
                    self.assertTrue(bytes(client.raw).endswith(b"\n\n"))
                    self.assertRegex(bytes(client.raw), rb"retry: \d+\n\n$")
                    self.assertGreaterEqual(client.retry, 1000)
        self.assertEqual(server.exit_code, 0)


if __name__ == "__main__":
    unittest.main()

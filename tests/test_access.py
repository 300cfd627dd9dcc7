"""Access control and abuse resistance against a real server: tokens and scopes, CORS, limits, slowloris."""

import json
import os
import signal
import tempfile
import threading
import time
import unittest

from sseserver import access
from sseserver.config import ConfigError, ip_networks
from sseserver.errors import HTTPError
from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    SSEClient,
    connect,
    daemon_process,
    raw_exchange,
    read_response,
    request,
    run_cli,
    stop_daemon,
    wait_for_subscribers,
    wait_until,
    write_config,
)

PUB = "publisher-token-0001"
ORDERS = "orders-only-token-02"
SUB = "subscriber-token-003"
SUB_ORDERS = "sub-orders-token-004"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


class Clock:
    """A clock the test moves by hand, for the rate limiter (no test waits for real time to pass)."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class TokenTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = RunningServer(
            publish_tokens=[PUB, f"{ORDERS} orders.*"],
            subscribe_tokens=[SUB, f"{SUB_ORDERS} orders.*"],
            history_size=100,
        )
        cls.server.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def publish(self, data, event=None, token=PUB):
        return self.server.publish(data, event, headers=bearer(token) if token else None)

    def test_publish_needs_a_valid_token(self):
        status, headers, body = self.publish("x", token=None)
        self.assertEqual((status, headers["www-authenticate"]), (401, "Bearer"))
        self.assertIn("token", json.loads(body)["error"])
        status, headers, body = self.publish("x", token="wrong-token-123")
        self.assertEqual(status, 403)
        self.assertEqual(request(self.server.port, "POST", "/publish", "x", {"Authorization": "Basic abc"})[0], 401)
        self.assertEqual(self.publish("x")[0], 200)

    def test_a_non_bearer_authorization_counts_as_no_token(self):
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}  # what a proxy in front may add for itself
        status, headers, body = request(self.server.port, "POST", "/publish", "x", basic)
        self.assertEqual((status, headers["www-authenticate"]), (401, "Bearer"))
        self.assertIn("needs a token", json.loads(body)["error"])
        with self.server.subscribe(f"/subscribe?token={SUB}", headers=basic) as client:  # the query's token counts
            self.assertEqual(client.status, 200)

    def test_a_scoped_publish_token_publishes_only_event_names_in_its_scope(self):
        self.assertEqual(self.publish("x", "orders.created", ORDERS)[0], 200)
        status, _, body = self.publish("x", "invoices.paid", ORDERS)
        self.assertEqual(status, 403)
        self.assertIn("invoices.paid", json.loads(body)["error"])
        self.assertEqual(self.publish("x", None, ORDERS)[0], 403)  # unnamed = "message", outside orders.*

    def test_subscribe_needs_a_token_in_header_or_query(self):
        status, headers, _ = request(self.server.port, "GET", "/subscribe")
        self.assertEqual((status, headers["www-authenticate"]), (401, "Bearer"))
        self.assertEqual(request(self.server.port, "GET", "/subscribe?token=nope-nope-nope")[0], 403)
        with (
            self.server.subscribe(f"/subscribe?token={SUB}") as by_query,
            self.server.subscribe(headers=bearer(SUB)) as by_header,
        ):
            self.assertEqual((by_query.status, by_header.status), (200, 200))

    def test_subscribe_scope_applies_live_and_on_replay(self):
        first = json.loads(self.publish("before-order", "orders.created")[2])["id"]
        self.publish("before-invoice", "invoices.paid")
        with self.server.subscribe(
            f"/subscribe?token={SUB_ORDERS}", headers={"Last-Event-ID": str(int(first) - 1)}
        ) as scoped:
            self.assertEqual([e.data for e in scoped.read_events(1)], ["before-order"])
            self.publish("live-invoice", "invoices.paid")
            self.publish("live-order", "orders.shipped")
            self.assertEqual([e.type for e in scoped.read_events(1)], ["orders.shipped"])
        status, _, body = request(self.server.port, "GET", f"/subscribe?token={SUB_ORDERS}&event=invoices.paid")
        self.assertEqual(status, 403)
        with self.server.subscribe(f"/subscribe?token={SUB_ORDERS}&event=orders.paid") as narrowed:
            self.publish("x", "orders.created")
            self.publish("paid", "orders.paid")
            self.assertEqual([e.data for e in narrowed.read_events(1)], ["paid"])

    def test_queued_count_respects_scopes(self):
        with self.server.subscribe(headers=bearer(SUB_ORDERS)):
            wait_for_subscribers(self.server.port, 1)
            self.assertEqual(json.loads(self.publish("x", "orders.x")[2])["subscribers"], 1)
            self.assertEqual(json.loads(self.publish("x", "other")[2])["subscribers"], 0)

    def test_error_before_the_body_closes_the_connection(self):
        with connect(self.server.port) as sock:
            sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 30\r\n\r\nGET /health HTTP/1.1\r\n\r\n12345")
            status, headers, _ = read_response(sock)
            self.assertEqual((status, headers["connection"]), (401, "close"))
            self.assertEqual(sock.recv(100), b"")  # the unread body was not taken for a request


class OpenServerTest(unittest.TestCase):
    def test_other_authorization_schemes_are_ignored_when_no_tokens_are_configured(self):
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}
        with RunningServer() as server:
            self.assertEqual(request(server.port, "POST", "/publish", "x", basic)[0], 200)
            self.assertEqual(request(server.port, "GET", "/metrics", headers=basic)[0], 200)
            self.assertEqual(request(server.port, "POST", "/publish", "x", {"Authorization": "Bearer "})[0], 200)
            with server.subscribe(headers=basic) as client:
                self.assertEqual(client.status, 200)

    def test_stream_filters_are_forgotten_with_their_streams(self):
        """Per-request state dies with the request: the server's table of shared stream filters holds what open
        streams use, never every distinct ?event= set that clients (turned away or not) have asked for."""
        with RunningServer(max_subscribers=2) as server:
            table = server.server._filters
            with server.subscribe("/subscribe?event=kept") as kept:
                wait_for_subscribers(server.port, 1)
                baseline = len(table)
                for number in range(200):  # subscribe and disconnect (a stream, or a turn-away if the last
                    names = "&".join(f"event=n{number}.{index}" for index in range(50))  # is not yet forgotten)
                    with server.subscribe(f"/subscribe?{names}") as client:
                        self.assertEqual(client.status, 200)
                wait_for_subscribers(server.port, 1)
                wait_until(lambda: len(table) == baseline, what=f"the filter table back to {baseline}")
                with server.subscribe("/subscribe?event=kept") as same:  # full from here on
                    wait_for_subscribers(server.port, 2)
                    self.assertEqual(len(table), baseline)  # the same filter: shared, not added
                    for number in range(200):  # turned away
                        names = "&".join(f"event=t{number}.{index}" for index in range(50))
                        self.assertEqual(request(server.port, "GET", f"/subscribe?{names}")[0], 503)
                    server.publish("for both", event="kept")
                    self.assertEqual([e.data for e in same.read_events(1)], ["for both"])
                wait_for_subscribers(server.port, 1)
                wait_until(lambda: len(table) == baseline, what=f"the filter table back to {baseline}")
                server.publish("still delivered", event="kept")
                self.assertEqual([e.data for e in kept.read_events(2)], ["for both", "still delivered"])


class TokenUnitTest(unittest.TestCase):
    def test_token_entries_parse_with_their_scopes_and_short_or_non_ascii_tokens_are_refused(self):
        entries = access.parse_token_entries(["# comment", "", "abcdefgh", "ijklmnop a.* b"], "k")
        self.assertEqual(entries, [("abcdefgh", None), ("ijklmnop", ("a.*", "b"))])
        tokens = access.TokenSet(entries)
        self.assertEqual(tokens.match("ijklmnop")[:2], (True, ("a.*", "b")))
        self.assertEqual(tokens.match("ijklmnoq")[:2], (False, None))
        for bad in (["short"], ["caf\u00e9caf\u00e9caf\u00e9"]):
            with self.assertRaises(ConfigError):
                access.parse_token_entries(bad, "k")

    def test_a_stream_filter_is_narrowed_to_the_token_scope_and_names_outside_it_are_refused(self):
        self.assertIsNone(access.stream_filter([], None))
        self.assertEqual(access.stream_filter(["a"], None), frozenset({"a"}))
        scoped = access.stream_filter([], ("orders.*",))
        self.assertIn("orders.x", scoped)
        self.assertNotIn("invoices.x", scoped)
        with self.assertRaises(HTTPError):
            access.stream_filter(["invoices.x"], ("orders.*",))

    def test_x_forwarded_for_names_the_client_only_behind_a_trusted_proxy(self):
        trusted = ip_networks(("127.0.0.1", "10.0.0.0/8"))
        headers = {"x-forwarded-for": "203.0.113.9, 10.1.2.3"}
        self.assertEqual(access.client_address("127.0.0.1", headers, trusted), "203.0.113.9")
        self.assertEqual(access.client_address("198.51.100.1", headers, trusted), "198.51.100.1")
        self.assertEqual(access.client_address("127.0.0.1", {"x-forwarded-for": "garbage"}, trusted), "127.0.0.1")
        self.assertEqual(access.client_address("127.0.0.1", headers, ()), "127.0.0.1")

    def test_the_rate_limiter_allows_a_burst_then_answers_how_long_to_wait(self):
        clock = Clock(100.0)
        limiter = access.RateLimiter(rate=2, burst=3, clock=clock)
        self.assertEqual([limiter.allow("k") for _ in range(3)], [0, 0, 0])
        self.assertAlmostEqual(limiter.allow("k"), 0.5)
        clock.now = 100.5
        self.assertEqual(limiter.allow("k"), 0)
        self.assertEqual(limiter.allow("other"), 0)
        self.assertEqual(access.RateLimiter(0, 1).allow("k"), 0)

    def test_rate_limiter_table_stays_bounded_and_forgets_refilled_buckets(self):
        clock = Clock(1000.0)
        limiter = access.RateLimiter(rate=1, burst=2, max_keys=500, clock=clock)  # refilled after 2 s
        self.assertEqual([limiter.allow("steady") for _ in range(3)], [0, 0, 1.0])  # throttled
        # Many distinct clients at once, none of them refilled yet: the table stops at the cap.
        for number in range(5000):
            self.assertEqual(limiter.allow(f"client-{number}"), 0)
            self.assertLessEqual(len(limiter), 500)
        # Time passes: buckets that have refilled are forgotten as new keys come, however many there were.
        clock.now += 1.0
        self.assertEqual([limiter.allow("late"), limiter.allow("late")], [0, 0])  # its burst used up
        clock.now += 1.5  # every client-N bucket has refilled; "late" has not (1.5 of its 2 back)
        self.assertEqual(limiter.allow("another"), 0)
        self.assertEqual(len(limiter), 2)
        # Forgetting a refilled bucket changes nothing: a full burst, as for a key never seen.
        self.assertEqual([limiter.allow("client-4999") for _ in range(3)], [0, 0, 1.0])
        # A bucket still refilling is kept while there is room: it is not handed a fresh burst.
        self.assertEqual(limiter.allow("late"), 0)
        self.assertAlmostEqual(limiter.allow("late"), 0.5)


class TokenFileAndReloadTest(unittest.TestCase):
    def test_token_file_reload_swaps_tokens_without_dropping_subscribers(self):
        with tempfile.TemporaryDirectory() as tmp:
            tokens = os.path.join(tmp, "tokens")
            with open(tokens, "w") as handle:
                handle.write("# publishers\nfirst-token-1234\n")
            path = write_config(tmp, publish_tokens_file=tokens, log_level="debug")
            with daemon_process("--port", "0", "-c", path) as (process, port):
                with SSEClient(port) as client:
                    self.assertEqual(request(port, "POST", "/publish", "1", bearer("first-token-1234"))[0], 200)
                    with open(tokens, "w") as handle:
                        handle.write("second-token-5678\n")
                    process.send_signal(signal.SIGHUP)
                    wait_until(lambda: any("reloaded" in line for line in process.log_lines))
                    self.assertEqual(request(port, "POST", "/publish", "2", bearer("first-token-1234"))[0], 403)
                    self.assertEqual(request(port, "POST", "/publish", "3", bearer("second-token-5678"))[0], 200)
                    self.assertEqual([e.data for e in client.read_events(2)], ["1", "3"])
                    os.unlink(tokens)  # an unreadable token file: the reload fails, the old tokens stay
                    process.send_signal(signal.SIGHUP)
                    wait_until(lambda: any("reload failed" in line for line in process.log_lines))
                    self.assertEqual(request(port, "POST", "/publish", "4", bearer("second-token-5678"))[0], 200)
                stop_daemon(process)
            log = "\n".join(process.log_lines)
            for secret in ("first-token-1234", "second-token-5678"):
                self.assertNotIn(secret, log)

    def test_unreadable_token_file_at_start_is_exit_2(self):
        result = run_cli("--check-config", "-c", os.devnull)
        self.assertEqual(result.returncode, 0)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, subscribe_tokens_file="/nonexistent/tokens")
            result = run_cli("-c", path)
            self.assertEqual(result.returncode, 2)
            self.assertIn("subscribe_tokens_file", result.stderr.decode())


class CorsTest(unittest.TestCase):
    def test_listed_origin_wildcard_and_credentials(self):
        app = "https://app.example.com"
        with RunningServer(cors_origins=[app]) as server:
            _, headers, _ = request(server.port, "GET", "/health", headers={"Origin": app})
            self.assertEqual((headers["access-control-allow-origin"], headers["vary"]), (app, "Origin"))
            _, headers, _ = request(server.port, "GET", "/health", headers={"Origin": "https://evil.example"})
            self.assertNotIn("access-control-allow-origin", headers)
            with server.subscribe(headers={"Origin": app}) as client:
                self.assertEqual(client.headers["access-control-allow-origin"], app)
            status, headers, _ = request(
                server.port,
                "OPTIONS",
                "/publish",
                headers={
                    "Origin": app,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            self.assertEqual(status, 204)
            self.assertEqual(headers["access-control-allow-methods"], "POST, PUT, OPTIONS")
            self.assertIn("Authorization", headers["access-control-allow-headers"])
            status, headers, _ = request(server.port, "OPTIONS", "/publish", headers={"Origin": "https://evil.example"})
            self.assertEqual(status, 204)
            self.assertNotIn("access-control-allow-origin", headers)
        with RunningServer(cors_origins=["*"]) as server:
            _, headers, _ = request(server.port, "POST", "/publish", "x", headers={"Origin": "https://any.example"})
            self.assertEqual(headers["access-control-allow-origin"], "*")
            self.assertNotIn("access-control-allow-credentials", headers)
        with RunningServer(cors_origins=[app], cors_credentials=True) as server:
            _, headers, _ = request(server.port, "GET", "/health", headers={"Origin": app})
            self.assertEqual(
                (headers["access-control-allow-origin"], headers["access-control-allow-credentials"]), (app, "true")
            )

    def test_any_origin_with_credentials_is_refused_at_start_and_on_reload(self):
        """["*"] with credentials would hand every page on the web (and the sandboxed "null" origin) the
        visitor's credentialed access: a config error, never a running server."""
        app = "https://app.example.com"
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, cors_origins=["*"], cors_credentials=True)
            result = run_cli("-c", path)
            self.assertEqual(result.returncode, 2)
            lines = result.stderr.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("cors_credentials", lines[0])
            self.assertIn("cors_origins", lines[0])
            write_config(tmp, cors_origins=[app], cors_credentials=True)
            with daemon_process("--port", "0", "-c", path) as (process, port):
                write_config(tmp, cors_origins=["*"], cors_credentials=True)
                process.send_signal(signal.SIGHUP)
                failed = wait_until(
                    lambda: [line for line in process.log_lines if "reload failed" in line],
                    what="the reload to be refused",
                )
                self.assertIn("cors_credentials", failed[0])
                self.assertIn("cors_origins", failed[0])
                for origin in ("null", "https://evil.example"):  # the old config is kept
                    _, headers, _ = request(port, "GET", "/health", headers={"Origin": origin})
                    self.assertNotIn("access-control-allow-origin", headers)
                _, headers, _ = request(port, "GET", "/health", headers={"Origin": app})
                self.assertEqual(headers["access-control-allow-credentials"], "true")
                stop_daemon(process)


class LimitTest(unittest.TestCase):
    def test_max_subscribers_per_ip_honours_trusted_proxies(self):
        with RunningServer(max_subscribers_per_ip=1, trusted_proxies=["127.0.0.1"]) as server:
            with server.subscribe(headers={"X-Forwarded-For": "203.0.113.1"}):
                status, headers, body = request(
                    server.port, "GET", "/subscribe", headers={"X-Forwarded-For": "203.0.113.1"}
                )
                self.assertEqual((status, json.loads(body)["error"]), (503, "too many streams from this address"))
                self.assertIn("retry-after", headers)
                with server.subscribe(headers={"X-Forwarded-For": "203.0.113.2"}) as other:
                    self.assertEqual(other.status, 200)

    def test_publish_rate_limit(self):
        with RunningServer(publish_rate=1, publish_burst=2) as server, connect(server.port) as sock:
            buffer = bytearray()
            statuses = []
            for _ in range(3):
                sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\nx")
                status, headers, body = read_response(sock, buffer)
                statuses.append(status)
            self.assertEqual(statuses, [200, 200, 429])
            self.assertEqual(headers["retry-after"], "1")
            self.assertEqual(headers["connection"], "keep-alive")  # a throttled publisher keeps its connection
            self.assertIn("rate limit", json.loads(body)["error"])

    def test_slowloris_is_cut_off_and_others_are_served(self):
        with RunningServer(request_timeout=1.0) as server:
            slow = connect(server.port)
            stop = threading.Event()
            answer = []

            def drip():
                try:
                    for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                        if stop.wait(0.1):  # one byte every 100 ms: never a whole head within 1 s
                            return
                        slow.send(bytes([byte]))
                except OSError:
                    pass

            dripper = threading.Thread(target=drip)
            started = time.monotonic()
            dripper.start()
            try:
                for _ in range(5):  # meanwhile everyone else is served normally
                    self.assertEqual(server.publish("x")[0], 200)
                slow.settimeout(IO_TIMEOUT)
                data = bytearray()
                while chunk := slow.recv(4096):
                    data += chunk
                answer.append(bytes(data))
            finally:
                stop.set()
                dripper.join(IO_TIMEOUT)
                slow.close()
            self.assertTrue(answer[0].startswith(b"HTTP/1.1 408 "), answer)
            self.assertLess(time.monotonic() - started, 5)

    def test_an_over_long_request_line_is_414_and_over_long_headers_are_431(self):
        with RunningServer(max_header_bytes=1024) as server:
            out = raw_exchange(server.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n")
            self.assertTrue(out.startswith(b"HTTP/1.1 414 "))
            out = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
            self.assertTrue(out.startswith(b"HTTP/1.1 431 "))
            self.assertIn(b'"error"', out)
            self.assertEqual(server.publish("ok")[0], 200)

    def test_past_max_connections_a_new_connection_gets_503_until_one_closes(self):
        with RunningServer(max_connections=3) as server:
            held = [server.subscribe() for _ in range(3)]
            try:
                wait_until(lambda: server.server.bouncer.subscriber_count == 3)
                out = raw_exchange(server.port, b"GET /health HTTP/1.1\r\n\r\n")
                self.assertTrue(out.startswith(b"HTTP/1.1 503 "), out)
                self.assertIn(b"too many open connections", out)
            finally:
                for client in held:
                    client.close()
            wait_until(lambda: server.server.bouncer.subscriber_count == 0)
            self.assertEqual(request(server.port, "GET", "/health")[0], 200)


class InjectionTest(unittest.TestCase):
    def test_names_ids_and_headers_cannot_inject(self):
        with RunningServer() as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            for name in ("a%0Adata:%20x", "a%0D%0Aevent:%20b", "a%00"):
                self.assertEqual(request(server.port, "POST", f"/publish?event={name}", "x")[0], 400)
            out = raw_exchange(
                server.port, b"POST /publish HTTP/1.1\r\nX: a\r\n\r\nInjected: 1\r\nContent-Length: 1\r\n\r\nx"
            )
            self.assertTrue(out.startswith(b"HTTP/1.1 411 "))
            self.assertEqual(server.publish("data: fake\n\nid: 999\nevent: evil")[0], 200)
            (event,) = client.read_events(1)
            self.assertEqual((event.type, event.data), ("message", "data: fake\n\nid: 999\nevent: evil"))
            self.assertNotEqual(client.last_id, "999")


if __name__ == "__main__":
    unittest.main()

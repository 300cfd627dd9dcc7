"""/metrics parsed by a strict parser of the Prometheus text format 0.0.4; the access log; /health; the page."""

import io
import json
import logging
import re
import unittest

from sseserver import logs
from tests.support import RunningServer, request, wait_for_subscribers, wait_until

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)$")
VALUE = re.compile(r"^(?:[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]Inf|NaN)$")


def parse_exposition(text: str) -> dict:
    """Strictly parse text format 0.0.4 -> {family: {"type", "help", "samples": [(name, labels, value)]}}.
    Fails on anything out of place: a sample before its TYPE, a TYPE twice, a bad value, a histogram whose
    buckets are not cumulative or lack +Inf, _count disagreeing with the +Inf bucket."""
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(NAME, name), line
            families.setdefault(name, {"samples": []})["help"] = help_text
            continue
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert "type" not in families.get(name, {}), f"TYPE twice for {name}"
            assert not families.get(name, {}).get("samples"), f"TYPE after samples for {name}"
            families.setdefault(name, {"samples": []})["type"] = kind
            current = name
            continue
        assert not line.startswith("#") or line.startswith("# "), line
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        assert VALUE.match(value), f"bad value in {line!r}"
        family = current
        assert family and (
            name == family
            or (
                families[family]["type"] == "histogram"
                and name in (family + "_bucket", family + "_sum", family + "_count")
            )
        ), line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels_text or ""))
        families[family]["samples"].append((name, labels, float(value)))
    for name, family in families.items():
        assert "type" in family and "help" in family, f"{name} lacks TYPE or HELP"
        if family["type"] == "counter":
            assert name.endswith("_total"), f"counter {name} should end in _total"
        if family["type"] == "histogram":
            buckets = [(s[1]["le"], s[2]) for s in family["samples"] if s[0] == name + "_bucket"]
            assert buckets and buckets[-1][0] == "+Inf", f"{name} has no +Inf bucket"
            bounds = [float(le) for le, _ in buckets]
            assert bounds == sorted(bounds), f"{name} buckets out of order"
            counts = [count for _, count in buckets]
            assert counts == sorted(counts), f"{name} buckets are not cumulative"
            (count,) = [s[2] for s in family["samples"] if s[0] == name + "_count"]
            assert count == counts[-1], f"{name}_count disagrees with the +Inf bucket"
    return families


def value(families, name, **labels):
    family = name if name in families else name.rsplit("_", 1)[0]  # histogram series live in their family
    matches = [
        s[2] for s in families[family]["samples"] if s[0] == name and all(s[1].get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, labels, families[name]["samples"])
    return matches[0]


class MetricsTest(unittest.TestCase):
    def scrape(self, server, headers=None):
        status, response_headers, body = request(server.port, "GET", "/metrics", headers=headers)
        self.assertEqual(status, 200)
        self.assertEqual(response_headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        return parse_exposition(body.decode("utf-8"))

    def test_counters_move_as_events_flow(self):
        with RunningServer(queue_size=2, history_size=3) as server:
            before = self.scrape(server)
            for name in (
                "sseserver_subscribers",
                "sseserver_events_published_total",
                "sseserver_events_delivered_total",
                "sseserver_subscribers_dropped_total",
                "sseserver_replay_resets_total",
                "sseserver_http_requests_total",
                "sseserver_publish_to_write_seconds",
                "process_start_time_seconds",
                "sseserver_build_info",
            ):
                self.assertIn(name, before)
            self.assertEqual(before["sseserver_publish_to_write_seconds"]["type"], "histogram")
            with server.subscribe() as first, server.subscribe() as second:
                wait_for_subscribers(server.port, 2)
                for index in range(3):
                    server.publish(f"e{index}")
                first.read_events(3)
                second.read_events(3)
                during = self.scrape(server)
                self.assertEqual(value(during, "sseserver_subscribers"), 2)
                self.assertEqual(value(during, "sseserver_events_published_total"), 3)
                self.assertEqual(value(during, "sseserver_events_delivered_total"), 6)
                self.assertEqual(value(during, "sseserver_publish_to_write_seconds_count"), 3)
                self.assertGreater(value(during, "sseserver_publish_to_write_seconds_sum"), 0)
                self.assertGreaterEqual(value(during, "sseserver_http_requests_total", code="200"), 3)
            request(server.port, "GET", "/nope")
            with server.subscribe(headers={"Last-Event-ID": "garbage"}) as resetting:
                resetting.read_events(1)
            wait_until(
                lambda: value(self.scrape(server), "sseserver_subscribers_dropped_total", reason="disconnected") >= 3,
                what="disconnects counted",
            )
            after = self.scrape(server)
            self.assertEqual(value(after, "sseserver_replay_resets_total"), 1)
            self.assertEqual(value(after, "sseserver_http_requests_total", code="404"), 1)
            self.assertEqual(value(after, "sseserver_subscribers_dropped_total", reason="slow"), 0)
            self.assertGreater(value(after, "process_start_time_seconds"), 1.7e9)

    def test_publish_to_write_latency_counts_each_written_event_once(self):
        """Once per event however many writer threads there are, and only for events some socket received."""
        with RunningServer(writer_threads=2, heartbeat_interval=60) as server:

            def written():
                return value(self.scrape(server), "sseserver_publish_to_write_seconds_count")

            for index in range(3):
                server.publish(f"nobody {index}")  # no stream: never written
            with (
                server.subscribe() as first,
                server.subscribe() as second,
                server.subscribe("/subscribe?event=a") as only_a,
            ):
                wait_for_subscribers(server.port, 3)
                for name in ("a", "b", "c"):
                    server.publish(name, event=name)
                for client in (first, second):
                    self.assertEqual([e.data for e in client.read_events(3)], ["a", "b", "c"])
                self.assertEqual([e.data for e in only_a.read_events(1)], ["a"])
                wait_until(lambda: written() >= 3, what="three observations")
                self.assertEqual(written(), 3)
            server.publish("after everyone left")
            self.assertEqual(written(), 3)

    def test_metrics_with_a_token_configured_is_401_without_it_and_403_with_a_wrong_one(self):
        with RunningServer(metrics_token="metrics-secret-1") as server:
            self.assertEqual(request(server.port, "GET", "/metrics")[0], 401)
            status, headers, _ = request(server.port, "GET", "/metrics", headers={"Authorization": "Bearer wrong-one"})
            # Checked like the other roles' tokens, with the same answer (RFC 6750's invalid_token).
            self.assertEqual((status, headers.get("www-authenticate")), (403, 'Bearer error="invalid_token"'))
            self.scrape(server, {"Authorization": "Bearer metrics-secret-1"})

    def test_parser_is_strict(self):
        for bad in (
            "x 1\n",
            "# TYPE x counter\nx 1\n",
            "# HELP x h\n# TYPE x gauge\nx one\n",
            '# HELP x h\n# TYPE x gauge\nx{a="1"\n',
            "# HELP x_total h\n# TYPE x_total counter\ny_total 1\n",
        ):
            with self.subTest(bad=bad), self.assertRaises(AssertionError):
                parse_exposition(bad)


class AccessLogTest(unittest.TestCase):
    def test_one_line_per_request_and_per_stream_end_without_tokens(self):
        stream = io.StringIO()
        logger = logging.getLogger("sseserver")
        saved = (logger.handlers[:], logger.level, logger.propagate)
        logs.configure("info", stream=stream, environ={})
        try:
            with RunningServer(
                access_log=True, log_level="info", subscribe_tokens=["secret-sub-token", "hidden-pass-phrase-9"]
            ) as server:
                logs.set_level("info")
                server.publish("x", event="a")
                request(server.port, "GET", "/nope")
                with server.subscribe("/subscribe?token=secret-sub-token&event=a") as client:
                    wait_for_subscribers(server.port, 1)
                    server.publish("y", event="a")
                    client.read_events(1)
                wait_until(lambda: "stream end" in stream.getvalue(), what="stream end line")
                # The name is judged decoded, as the server reads it: tok%65n is token.
                with server.subscribe("/subscribe?tok%65n=hidden-pass-phrase-9&event=b") as client:
                    self.assertEqual(client.status, 200)
                wait_until(lambda: "event=b" in stream.getvalue(), what="the encoded-name line")
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
        text = stream.getvalue()
        self.assertRegex(text, r'127\.0\.0\.1 "POST /publish\?event=a" 200 \d+B [\d.]+ms')
        self.assertRegex(text, r'127\.0\.0\.1 "GET /nope" 404 \d+B')
        self.assertRegex(text, r'127\.0\.0\.1 "GET /subscribe\?event=a" 200')
        self.assertRegex(text, r"127\.0\.0\.1 stream end: 1 events in [\d.]+s, client gone")
        self.assertRegex(text, r'127\.0\.0\.1 "GET /subscribe\?event=b" 200')
        for secret in ("secret-sub-token", "hidden-pass-phrase-9"):
            self.assertNotIn(secret, text)

    def test_control_characters_are_escaped(self):
        self.assertEqual(logs.escape("a\nb\x1b[31m\tc"), "a\\x0ab\\x1b[31m\tc")


class HealthAndPageTest(unittest.TestCase):
    def test_health_reports_status_subscribers_last_id_history_size_and_uptime(self):
        with RunningServer() as server:
            published = json.loads(server.publish("x")[2])["id"]
            health = server.health()
            self.assertEqual(
                {k: health[k] for k in ("status", "subscribers", "last_event_id", "history_size")},
                {"status": "ok", "subscribers": 0, "last_event_id": published, "history_size": 1},
            )
            self.assertGreaterEqual(health["uptime_s"], 0)

    def test_page_is_self_contained_with_a_strict_csp(self):
        with RunningServer() as server:
            status, headers, body = request(server.port, "GET", "/")
            self.assertEqual((status, headers["content-type"]), (200, "text/html; charset=utf-8"))
            csp = headers["content-security-policy"]
            self.assertIn("default-src 'none'", csp)
            self.assertIn("script-src 'sha256-", csp)
            self.assertNotIn("unsafe-inline", csp)
            html = body.decode()
            self.assertNotRegex(html, r"(?:src|href)=\"(?:https?:)?//")  # nothing from elsewhere
            self.assertLess(len(body), 16000)
        with RunningServer(demo_page=False) as server:
            self.assertEqual(request(server.port, "GET", "/")[0], 404)


if __name__ == "__main__":
    unittest.main()

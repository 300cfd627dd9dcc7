"""`sseserver doctor URL`: whole runs against a real nginx in front of a real daemon, one nginx config per mistake
an operator makes (issue 14's list); the judgements as pure functions; the client's decoding over real sockets;
usage errors and unreachable URLs.

Every run is `python3 -m sseserver doctor ... --json` in a subprocess, so the exit code and the report are the
ones an operator gets. The nginx cases run in parallel threads, started in setUpClass (each test waits for its
own case), because each run holds an idle stream for a few seconds: one after another they would cost the suite
a minute. The daemon's heartbeat is HEARTBEAT_S and the doctor's --watch WATCH_S, so a run takes seconds, not
the default 45.
"""

import concurrent.futures
import contextlib
import dataclasses
import datetime
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest
import zlib

from sseserver import cli
from sseserver import findings as f
from sseserver.findings import Cause, Check, ReplayOutcome, Status
from sseserver.probe import (
    MAX_BODY,
    BaseURL,
    ChunkedDecoder,
    Stream,
    UsageError,
    base_after_redirect,
    certificate_expiry,
    parse_base_url,
)
from tests.support import daemon_process, listening_socket, require, require_binary, run_cli, write_config
from tests.test_nginx import Nginx

HEARTBEAT_S = 2.0
WATCH_S = "3"
# The bound: each problem is reported within this long of the doctor's start.
REPORT_WITHIN_S = 60.0
# A whole doctor run, as a subprocess; generous, because the machine runs other work.
RUN_TIMEOUT = 120
# An unreachable URL is exit 2 within this long, Python's start-up included.
UNREACHABLE_WITHIN_S = 5.0
TRUSTED = ("--cacert", "{cert}")
SUBSCRIBE_TOKEN = "subscribe-token-0123456789"


@dataclasses.dataclass(frozen=True)
class Run:
    returncode: int
    report: dict | None
    stderr: str
    elapsed: float

    def by_status(self, status: str) -> dict[str, str]:
        """check -> cause, for the checks with this status."""
        return {c["check"]: c["cause"] for c in self.report["checks"] if c["status"] == status}


def run_doctor(*args: str) -> Run:
    started = time.monotonic()
    result = run_cli("doctor", *args, "--json", timeout=RUN_TIMEOUT)
    stdout = result.stdout.decode()
    return Run(
        result.returncode,
        json.loads(stdout) if stdout.strip() else None,
        result.stderr.decode(),
        time.monotonic() - started,
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """One deployment (the daemon's config keys, Nginx's options) and the doctor runs against it: extra
    arguments per run ("{cert}" becomes nginx's certificate; a first one starting with "/" is the path instead
    of `path`); the URL and --watch are added."""

    runs: tuple[tuple[str, ...], ...] = (TRUSTED,)
    daemon: dict = dataclasses.field(default_factory=dict)
    nginx: dict = dataclasses.field(default_factory=dict)
    path: str = "/"


def readme_line(old: str, new: str) -> dict:
    return {"edits": ((old, new),)}


CASES = {
    "readme": Case(runs=(TRUSTED,) * 5),
    "buffering": Case(
        nginx=readme_line("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;")
    ),
    "gzip": Case(nginx=readme_line("proxy_cache off;", "proxy_cache off; gzip on; gzip_types text/event-stream;")),
    "read_timeout": Case(nginx=readme_line("proxy_read_timeout 1h;", "proxy_read_timeout 1s;")),
    "last_event_id": Case(
        nginx=readme_line("proxy_set_header Last-Event-ID $http_last_event_id;", 'proxy_set_header Last-Event-ID "";')
    ),
    "tls": Case(runs=(TRUSTED, (), ("--insecure",)), nginx={"http2": False}),
    "cors": Case(
        runs=(
            (*TRUSTED, "--origin", "https://elsewhere.example.com"),
            (*TRUSTED, "--origin", "https://app.example.com"),
        ),
        daemon={"cors_origins": ["https://app.example.com"]},
    ),
    "token": Case(
        runs=(TRUSTED, (*TRUSTED, "--token", SUBSCRIBE_TOKEN)), daemon={"subscribe_tokens": [SUBSCRIBE_TOKEN]}
    ),
    # The daemon under /sse/ (nginx strips the prefix); an old address that redirects there, and one that
    # redirects to another host name (localhost instead of 127.0.0.1).
    "prefix": Case(
        runs=(TRUSTED, ("/old/", *TRUSTED), ("/moved/", *TRUSTED), ("/moved/", *TRUSTED, "--token", SUBSCRIBE_TOKEN)),
        path="/sse/",
        nginx={
            "edits": (
                (
                    "location / {",
                    "location = /old/health { return 301 /sse/health; }\n"
                    "    location = /moved/health { return 301 https://localhost:$server_port/sse/health; }\n"
                    "    location /sse/ {",
                ),
                ("proxy_pass http://sseserver;", "proxy_pass http://sseserver/;"),
            )
        },
    ),
}


@contextlib.contextmanager
def deployment(case: Case):
    """The daemon (heartbeat HEARTBEAT_S) behind nginx on a TCP socket the test owns -> (base URL, cert path)."""
    directory = tempfile.mkdtemp(prefix="sseserver-doctor-")
    try:
        config = write_config(directory, heartbeat_interval=HEARTBEAT_S, **case.daemon)
        with listening_socket() as upstream, listening_socket() as front:
            with (
                daemon_process("-c", config, listen_socket=upstream),
                Nginx(upstream.getsockname()[1], listen_socket=front, **case.nginx) as nginx,
            ):
                yield f"https://127.0.0.1:{front.getsockname()[1]}", nginx.cert
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_case(case: Case) -> list[Run]:
    with deployment(case) as (origin, cert):
        runs = []
        for extra in case.runs:
            path, extra = (extra[0], extra[1:]) if extra and extra[0].startswith("/") else (case.path, extra)
            runs.append(run_doctor(origin + path, *(arg.format(cert=cert) for arg in extra), "--watch", WATCH_S))
        return runs


class DoctorThroughNginxTest(unittest.TestCase):
    """Each problem named by its cause, within REPORT_WITHIN_S, and nothing else reported as a problem."""

    @classmethod
    def setUpClass(cls):
        cls.pool = concurrent.futures.ThreadPoolExecutor(len(CASES), thread_name_prefix="test-doctor")
        cls.cases = {name: cls.pool.submit(run_case, case) for name, case in CASES.items()}

    @classmethod
    def tearDownClass(cls):
        cls.pool.shutdown(wait=True)

    def runs(self, name: str) -> list[Run]:
        return self.cases[name].result(timeout=RUN_TIMEOUT * len(CASES[name].runs) + 60)

    def assert_report(self, run: Run, problems: dict[str, str], warnings: dict[str, str] | None = None):
        """`problems` / `warnings`: check -> cause, exactly; exit 1 with a problem, else 0."""
        self.assertIsNotNone(run.report, run.stderr)
        context = json.dumps(run.report["checks"], indent=1)
        self.assertEqual(run.by_status("problem"), problems, context)
        if warnings is not None:
            self.assertEqual(run.by_status("warning"), warnings, context)
        self.assertEqual(run.returncode, 1 if problems else 0, context)
        self.assertEqual(run.report["exit_code"], run.returncode)
        self.assertLess(run.elapsed, REPORT_WITHIN_S)
        for check in run.report["checks"]:
            if check["status"] == "problem":
                self.assertLess(check["at_s"], REPORT_WITHIN_S)
                self.assertTrue(check["fix"], check)

    def test_readmes_nginx_block_has_no_problem_and_no_warning_in_five_runs(self):
        for run in self.runs("readme"):
            self.assert_report(run, {}, {})
            statuses = {c["check"]: c["status"] for c in run.report["checks"]}
            for check in ("tls", "http_version", "delivery", "heartbeat", "replay", "compression", "first_bytes"):
                self.assertEqual(statuses[check], "ok", check)
            self.assertEqual(run.report["probe_event"], "doctor.probe")
            self.assertGreaterEqual(run.report["published"], 3)

    def test_proxy_buffering_with_x_accel_buffering_ignored_is_reported_as_buffering(self):
        (run,) = self.runs("buffering")
        self.assert_report(run, {"first_bytes": "buffering", "delivery": "buffering"})

    def test_gzip_on_the_event_stream_is_reported_as_compression(self):
        (run,) = self.runs("gzip")
        self.assert_report(run, {"compression": "compression"})

    def test_a_read_timeout_shorter_than_the_heartbeat_is_reported_as_a_read_timeout(self):
        (run,) = self.runs("read_timeout")
        self.assert_report(run, {"heartbeat": "read_timeout"})

    def test_a_stripped_last_event_id_header_is_reported_as_such(self):
        (run,) = self.runs("last_event_id")
        self.assert_report(run, {"replay": "last_event_id"})

    def test_tls_without_http2_is_a_warning_and_an_untrusted_certificate_a_problem(self):
        trusted, untrusted, insecure = self.runs("tls")
        self.assert_report(trusted, {}, {"http_version": "http1"})
        # Without --cacert the self-signed certificate does not verify; the rest still runs (unverified).
        self.assert_report(untrusted, {"tls": "tls_invalid"}, {"http_version": "http1"})
        self.assert_report(insecure, {}, {"tls": "tls_unverified", "http_version": "http1"})

    def test_an_origin_not_in_cors_origins_is_reported_for_subscribe_and_preflight(self):
        refused, allowed = self.runs("cors")
        self.assert_report(refused, {"cors_subscribe": "cors", "cors_preflight": "cors"})
        self.assert_report(allowed, {}, {})

    def test_a_missing_subscribe_token_is_a_401_naming_the_token_and_the_token_mends_it(self):
        without, with_token = self.runs("token")
        self.assert_report(without, {"stream": "subscribe_token"})
        self.assert_report(with_token, {}, {})

    def test_a_path_prefix_works_and_a_redirect_to_it_is_followed_with_a_warning(self):
        direct, redirected, elsewhere, with_token = self.runs("prefix")
        self.assert_report(direct, {}, {})
        self.assertTrue(direct.report["url"].endswith("/sse/"), direct.report["url"])
        self.assert_report(redirected, {}, {"health": "redirect"})
        self.assertTrue(redirected.report["url"].endswith("/sse/"), redirected.report["url"])
        self.assert_report(elsewhere, {}, {"health": "redirect"})
        self.assertTrue(elsewhere.report["url"].startswith("https://localhost:"), elsewhere.report["url"])
        # With a token, a redirect to another host is not followed: the token goes only where it was meant to.
        self.assertEqual(with_token.returncode, 2, with_token.stderr)
        self.assertIn("redirects to another origin", with_token.stderr)


class DoctorCommandTest(unittest.TestCase):
    def test_usage_errors_are_one_line_and_exit_2(self):
        for args in (
            [],
            ["ftp://example.com"],
            ["http://example.com/subscribe"],
            ["http://h", "--watch", "0"],
            ["http://h", "--watch", "121"],
            ["http://h", "--event", "sseserver.x"],
            ["http://h", "--event", "a b"],
            ["http://h/?token=x"],
            ["http://u:p@h/"],
            ["http://h", "--origin", "app.example.com"],
            ["http://h", "--cacert", "/nonexistent.pem"],
            ["http://h:99999/"],
            ["http://h", "--insecure", "--cacert", "x"],
            ["http://h", "--bogus"],
        ):
            with self.subTest(args=args):
                # In-process (the same cli.main() as `python3 -m sseserver`), because fourteen interpreters
                # would cost seconds; the subprocess path is exercised by every other test here.
                stdout, stderr = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    try:
                        code = cli.main(["doctor", *args])
                    except SystemExit as exc:
                        code = exc.code
                self.assertEqual(code, 2)
                self.assertEqual(len(stderr.getvalue().strip().splitlines()), 1, stderr.getvalue())
                self.assertEqual(stdout.getvalue(), "")

    def test_an_unreachable_url_is_exit_2_within_5_seconds(self):
        with socket.socket() as closed, listening_socket() as silent:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            urls = (
                f"http://127.0.0.1:{closed.getsockname()[1]}/",
                f"http://127.0.0.1:{silent.getsockname()[1]}/",  # accepts (backlog), never answers
                f"https://127.0.0.1:{silent.getsockname()[1]}/",
            )  # no TLS handshake ever comes

            def timed(url):
                started = time.monotonic()
                return run_cli("doctor", url, "--json", timeout=30), time.monotonic() - started

            with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:  # each may wait its 4 s: at once
                results = list(pool.map(timed, urls))
        for url, (result, elapsed) in zip(urls, results):
            with self.subTest(url=url):
                self.assertLess(elapsed, UNREACHABLE_WITHIN_S)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertEqual(len(result.stderr.decode().strip().splitlines()), 1, result.stderr)
                self.assertEqual(json.loads(result.stdout)["exit_code"], 2)

    def test_an_ipv6_literal_url_reaches_the_daemon_and_the_report_says_what_was_published(self):
        with socket.socket(socket.AF_INET6) as probe:
            try:
                probe.bind(("::1", 0))
                has_ipv6 = True
            except OSError:
                has_ipv6 = False
        require(has_ipv6, "no IPv6 loopback (::1)")
        with tempfile.TemporaryDirectory() as directory:
            config = write_config(directory, heartbeat_interval=HEARTBEAT_S)
            with daemon_process("-c", config, "--host", "::1", "--port", "0") as (_, port):
                result = run_cli("doctor", f"http://[::1]:{port}", "--watch", "1", timeout=RUN_TIMEOUT)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertIn(f"sseserver doctor http://[::1]:{port}/", out)
        self.assertRegex(out, r'Publishes only its own probe events: \d named "doctor.probe"')
        self.assertRegex(out, r"(?m)^warning +http_version +plain http")  # browsers speak HTTP/1.1 to it
        self.assertIn("Fixes:", out)


class ClientTest(unittest.TestCase):
    """probe.py's pure parts, and its stream decoding over a real socket pair."""

    def test_base_urls(self):
        for text, expected in (
            ("https://events.example.com", BaseURL("https", "events.example.com", 443, "")),
            ("http://127.0.0.1:5000/", BaseURL("http", "127.0.0.1", 5000, "")),
            ("https://host/sse/", BaseURL("https", "host", 443, "/sse")),
            ("http://[::1]:8080/a b/", BaseURL("http", "::1", 8080, "/a%20b")),
            ("https://bücher.example/", BaseURL("https", "xn--bcher-kva.example", 443, "")),
        ):
            with self.subTest(text=text):
                self.assertEqual(parse_base_url(text), expected)
        self.assertEqual(parse_base_url("http://[::1]:8080/x").authority, "[::1]:8080")
        self.assertEqual(parse_base_url("https://h:443/x/").url("/subscribe"), "https://h/x/subscribe")
        for bad in ("events.example.com", "http://", "http://h/health", "http://h/#x", "http://h:0x/"):
            with self.subTest(bad=bad), self.assertRaises(UsageError):
                parse_base_url(bad)

    def test_redirects_move_the_base_only_when_they_keep_the_route(self):
        base = parse_base_url("http://old.example/app/")
        self.assertEqual(
            base_after_redirect(base, "https://new.example/sse/health", "/health"),
            parse_base_url("https://new.example/sse/"),
        )
        self.assertEqual(base_after_redirect(base, "/v2/health", "/health"), parse_base_url("http://old.example/v2/"))
        self.assertIsNone(base_after_redirect(base, "/login?next=/app/health", "/health"))

    def test_chunked_decoding_in_any_slicing(self):
        raw = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
        for step in (1, 2, 3, 7, len(raw)):
            with self.subTest(step=step):
                decoder, out = ChunkedDecoder(), b""
                for index in range(0, len(raw), step):
                    out += decoder.feed(raw[index : index + step])
                self.assertEqual((out, decoder.done), (b"helloabc", True))
        with self.assertRaises(ValueError):
            ChunkedDecoder().feed(b"zz\r\n")

    def test_a_gzip_chunked_stream_is_decoded_and_timestamped_event_by_event(self):
        body = b"retry: 3000\n\n:\n\nid: 7\r\nevent: doctor.probe\rdata: a\ndata: b\n\n: hb\n\n"
        compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        gz = compressor.compress(body) + compressor.flush()
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        wire = head + b"".join(b"%x\r\n%s\r\n" % (len(gz[i : i + 5]), gz[i : i + 5]) for i in range(0, len(gz), 5))
        server, client = socket.socketpair()
        with server, client:
            stream = Stream(client)
            server.sendall(wire)
            self.assertTrue(stream.read_until(lambda s: len(s.comments) == 2, time.monotonic() + 10))
            server.sendall(b"0\r\n\r\n")
            self.assertFalse(stream.read_until(lambda s: False, time.monotonic() + 10))
        self.assertEqual(stream.head.status, 200)
        self.assertEqual(stream.retry, 3000)
        self.assertEqual([(e.type, e.data, e.id) for e in stream.events], [("doctor.probe", "a\nb", "7")])
        self.assertIsNotNone(stream.first_line_at)
        self.assertIsNotNone(stream.ended_at)  # the last chunk ends the stream, before the socket closes

    def test_a_stream_keeps_only_wanted_events_and_stops_at_an_endless_line(self):
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
        server, client = socket.socketpair()
        with server, client:
            stream = Stream(client, keep=frozenset({"doctor.probe"}))
            server.sendall(head + b"data: other\n\ndata: x\nevent: doctor.probe\n\n")  # `event:` after `data:`
            self.assertTrue(stream.read_until(lambda s: s.events, time.monotonic() + 10))
            self.assertEqual(([e.data for e in stream.events], stream.other_events), (["x"], 1))
            # No line end, ever: the stream is over for the reader. Sent from a thread: the reader must read.
            sender = threading.Thread(target=server.sendall, args=(b"x" * (MAX_BODY + 1),), daemon=True)
            sender.start()
            self.assertFalse(stream.read_until(lambda s: False, time.monotonic() + 10))
            client.close()  # unblocks the sender if the reader stopped before taking everything
            sender.join(10)
        self.assertIn("line longer", stream.error)

    def test_the_certificate_expiry_is_read_from_der_in_both_time_formats(self):
        openssl = require_binary("openssl")
        with tempfile.TemporaryDirectory() as directory:
            for days in (30, 40000):  # UTCTime up to 2049, GeneralizedTime after
                with self.subTest(days=days):
                    cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
                    subprocess.run(
                        [
                            openssl,
                            "req",
                            "-x509",
                            "-newkey",
                            "rsa:2048",
                            "-nodes",
                            "-days",
                            str(days),
                            "-subj",
                            "/CN=x",
                            "-keyout",
                            key,
                            "-out",
                            cert,
                        ],
                        check=True,
                        capture_output=True,
                        timeout=60,
                    )
                    end = subprocess.run(
                        [openssl, "x509", "-enddate", "-noout", "-in", cert],
                        check=True,
                        capture_output=True,
                        text=True,
                        timeout=60,
                    ).stdout.strip()
                    expected = datetime.datetime.strptime(end.partition("=")[2], "%b %d %H:%M:%S %Y GMT")
                    with open(cert) as handle:
                        der = ssl.PEM_cert_to_DER_cert(handle.read())
                    self.assertEqual(certificate_expiry(der), expected.replace(tzinfo=datetime.UTC))
        with self.assertRaises(ValueError):
            certificate_expiry(b"\x30\x03\x02\x01\x00")


class JudgementTest(unittest.TestCase):
    """findings.py: each judgement from numbers and strings, table-driven."""

    def assert_finding(self, finding, status: Status, cause: Cause | None = None):
        self.assertEqual((finding.status, finding.cause), (status, cause), finding.figure)

    def test_health_gives_the_settings_or_assumes_the_defaults(self):
        finding, settings = f.judge_health(200, {"status": "ok", "heartbeat_interval": 2.5, "retry_ms": 100}, 0.01)
        self.assert_finding(finding, Status.OK)
        self.assertEqual((settings.heartbeat_interval, settings.retry_ms, settings.reported), (2.5, 100, True))
        for body in (None, {}, {"heartbeat_interval": True, "retry_ms": 1}, {"heartbeat_interval": 2, "retry_ms": "1"}):
            with self.subTest(body=body):
                finding, settings = f.judge_health(404 if body is None else 200, body, 0.01)
                self.assert_finding(finding, Status.WARNING, Cause.SETTINGS_UNKNOWN)
                self.assertEqual(settings.heartbeat_interval, f.DEFAULT_HEARTBEAT_S)
        self.assert_finding(f.judge_health(503, {"status": "stopping"}, 0.01)[0], Status.PROBLEM, Cause.STOPPING)
        self.assert_finding(
            f.judge_health(200, {"heartbeat_interval": 90, "retry_ms": 1}, 0.01)[0],
            Status.WARNING,
            Cause.LONG_HEARTBEAT,
        )
        self.assert_finding(
            f.judge_health(200, {"heartbeat_interval": 9, "retry_ms": 1}, 0.01, "https://x/")[0],
            Status.WARNING,
            Cause.REDIRECT,
        )
        self.assertEqual(f.default_watch(f.Settings(15.0, 3000, True)), 45.0)
        self.assertEqual(f.default_watch(f.Settings(60.0, 3000, True)), f.MAX_WATCH_S)

    def test_tls(self):
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        later = now + datetime.timedelta(days=90)
        soon = now + datetime.timedelta(days=3)
        past = now - datetime.timedelta(days=1)
        for args, status, cause in (
            ((True, None, False, later), Status.OK, None),
            ((True, None, False, soon), Status.WARNING, Cause.TLS_EXPIRY),
            ((True, None, False, past), Status.PROBLEM, Cause.TLS_EXPIRY),
            ((True, "self-signed certificate", False, later), Status.PROBLEM, Cause.TLS_INVALID),
            ((True, None, True, later), Status.WARNING, Cause.TLS_UNVERIFIED),
            ((True, None, True, past), Status.PROBLEM, Cause.TLS_EXPIRY),
            ((False, None, False, None), Status.SKIPPED, None),
        ):
            with self.subTest(args=args):
                self.assert_finding(f.judge_tls(*args, now), status, cause)

    def test_http_version(self):
        self.assert_finding(f.judge_http_version(True, "h2"), Status.OK)
        self.assert_finding(f.judge_http_version(True, "http/1.1"), Status.WARNING, Cause.HTTP1)
        self.assert_finding(f.judge_http_version(True, None), Status.WARNING, Cause.HTTP1)
        self.assert_finding(f.judge_http_version(False, None), Status.WARNING, Cause.PLAIN_HTTP)

    def test_the_streams_status(self):
        for status, content_type, expected, cause in (
            (200, "text/event-stream; charset=utf-8", Status.OK, None),
            (200, "text/html", Status.PROBLEM, Cause.NOT_SSE),
            (401, "application/json", Status.PROBLEM, Cause.SUBSCRIBE_TOKEN),
            (403, "application/json", Status.PROBLEM, Cause.TOKEN_REFUSED),
            (404, "text/html", Status.PROBLEM, Cause.NOT_SSE),
            (502, "text/html", Status.PROBLEM, Cause.UPSTREAM),
            (503, "application/json", Status.PROBLEM, Cause.REJECTED),
            (None, None, Status.SKIPPED, None),
        ):
            with self.subTest(status=status, content_type=content_type):
                self.assert_finding(f.judge_stream(status, content_type, 3), expected, cause)

    def test_first_bytes(self):
        for head, line, encoding, status, cause in (
            (0.01, 0.01, None, Status.OK, None),
            (0.01, None, None, Status.PROBLEM, Cause.BUFFERING),
            (None, None, None, Status.PROBLEM, Cause.BUFFERING),
            (1.5, 1.5, None, Status.PROBLEM, Cause.BUFFERING),
            (0.01, 2.0, "gzip", Status.PROBLEM, Cause.COMPRESSION),
        ):
            with self.subTest(head=head, line=line, encoding=encoding):
                self.assert_finding(f.judge_first_bytes(head, line, 3, encoding), status, cause)

    def test_delivery(self):
        for args, status, cause in (
            ((0.005, False, None, None), Status.OK, None),
            ((0.999, False, None, None), Status.OK, None),
            ((1.0, False, None, None), Status.PROBLEM, Cause.BUFFERING),
            ((3.2, True, None, None), Status.PROBLEM, Cause.BUFFERING),  # only when more data followed
            ((None, True, None, None), Status.PROBLEM, Cause.BUFFERING),
            ((None, True, "gzip", None), Status.PROBLEM, Cause.COMPRESSION),
            ((None, False, None, 1.0), Status.PROBLEM, Cause.READ_TIMEOUT),  # cut before the probe came
            ((None, False, None, 30.0), Status.PROBLEM, Cause.HEARTBEAT_LOST),
            ((None, False, None, 0.01), Status.PROBLEM, Cause.STREAM_CLOSED),
        ):  # turned away at once
            with self.subTest(args=args):
                latency, more, encoding, ended = args
                self.assert_finding(f.judge_delivery(latency, more, 6, encoding, ended, 2.0, False), status, cause)
        # Lost although head and first line came at once: buffering that passes heads, or unshared instances.
        self.assert_finding(f.judge_delivery(None, True, 6, None, None, 2.0, True), Status.PROBLEM, Cause.NOT_DELIVERED)
        self.assert_finding(f.judge_delivery(3.5, True, 6, None, None, 2.0, True), Status.PROBLEM, Cause.BUFFERING)

    def test_heartbeat(self):
        # (interval, watch, activity, comments, ended) -> status, cause
        for args, status, cause in (
            ((2.0, 3.0, [2.2], 1, None), Status.OK, None),
            ((15.0, 45.0, [15.4, 30.9, 46.0], 3, None), Status.OK, None),
            ((2.0, 1.0, [], 0, None), Status.OK, None),  # none due within the watch
            ((2.0, 3.0, [], 0, 1.0), Status.PROBLEM, Cause.READ_TIMEOUT),
            ((15.0, 45.0, [15.1], 1, 25.1), Status.PROBLEM, Cause.READ_TIMEOUT),  # cut 10 s after a beat
            ((2.0, 10.0, [], 0, 8.0), Status.PROBLEM, Cause.HEARTBEAT_LOST),  # no beat, then cut
            ((2.0, 10.0, [5.0], 0, 5.1), Status.PROBLEM, Cause.STREAM_CLOSED),  # ended right after data
            ((2.0, 10.0, [], 0, None), Status.PROBLEM, Cause.HEARTBEAT_LOST),  # open but silent
            ((2.0, 10.0, [2.1, 4.2], 2, None), Status.PROBLEM, Cause.HEARTBEAT_LOST),
        ):  # they stopped
            with self.subTest(args=args):
                self.assert_finding(f.judge_heartbeat(*args), status, cause)

    def test_replay(self):
        self.assert_finding(f.judge_replay(ReplayOutcome.REPLAYED, 0.003), Status.OK)
        self.assert_finding(f.judge_replay(ReplayOutcome.RESET, None), Status.WARNING, Cause.HISTORY)
        self.assert_finding(f.judge_replay(ReplayOutcome.QUERY_ONLY, None), Status.PROBLEM, Cause.LAST_EVENT_ID)
        self.assert_finding(f.judge_replay(ReplayOutcome.NOT_REPLAYED, None), Status.PROBLEM, Cause.REPLAY_BROKEN)

    def test_headers_compression_cache_and_cors(self):
        self.assert_finding(f.judge_compression(None, "gzip"), Status.OK)
        self.assert_finding(f.judge_compression("identity", "gzip"), Status.OK)
        self.assert_finding(f.judge_compression("br", "gzip"), Status.PROBLEM, Cause.COMPRESSION)
        self.assert_finding(f.judge_cache_control("no-cache"), Status.OK)
        self.assert_finding(f.judge_cache_control("private, no-store"), Status.OK)
        self.assert_finding(f.judge_cache_control(None), Status.PROBLEM, Cause.CACHE_CONTROL)
        self.assert_finding(f.judge_cache_control("public, max-age=60"), Status.PROBLEM, Cause.CACHE_CONTROL)
        origin = "https://app.example.com"
        self.assert_finding(f.judge_cors_subscribe(origin, origin), Status.OK)
        self.assert_finding(f.judge_cors_subscribe(origin, "*"), Status.OK)
        self.assert_finding(f.judge_cors_subscribe(origin, None), Status.PROBLEM, Cause.CORS)
        self.assert_finding(f.judge_cors_subscribe(origin, "https://other"), Status.PROBLEM, Cause.CORS)
        requested = ("authorization", "content-type")
        for args, status in (
            ((204, origin, "POST, OPTIONS", "Authorization, Content-Type"), Status.OK),
            ((204, "*", "*", "*"), Status.OK),
            ((204, None, None, None), Status.PROBLEM),
            ((403, origin, "POST", "Authorization, Content-Type"), Status.PROBLEM),
            ((204, origin, "GET", "Authorization, Content-Type"), Status.PROBLEM),
            ((204, origin, "POST", "Content-Type"), Status.PROBLEM),
        ):
            with self.subTest(args=args):
                finding = f.judge_cors_preflight(origin, *args, requested)
                self.assert_finding(finding, status, Cause.CORS if status is Status.PROBLEM else None)

    def test_publish_and_the_exit_code(self):
        self.assert_finding(f.judge_publish(200, None, 0.01), Status.OK)
        self.assert_finding(f.judge_publish(401, "publish needs a token", 0.01), Status.PROBLEM, Cause.PUBLISH_TOKEN)
        self.assert_finding(f.judge_publish(403, "invalid token", 0.01), Status.PROBLEM, Cause.TOKEN_REFUSED)
        self.assert_finding(f.judge_publish(429, "rate", 0.01), Status.PROBLEM, Cause.REJECTED)
        warn = f.warning(Check.HTTP_VERSION, "x", Cause.HTTP1)
        self.assertEqual(f.exit_code([f.ok(Check.HEALTH, "x"), warn, f.skipped(Check.TLS, "x")]), 0)
        self.assertEqual(f.exit_code([warn, f.problem(Check.REPLAY, "x", Cause.LAST_EVENT_ID)]), 1)

    def test_every_cause_has_a_distinct_label_and_a_fix(self):
        labels = [cause.label for cause in Cause]
        self.assertEqual(len(labels), len(set(labels)))
        self.assertTrue(all(len(cause.fix) > 40 for cause in Cause))


if __name__ == "__main__":
    unittest.main()

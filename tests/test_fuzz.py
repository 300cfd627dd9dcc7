"""A seeded random fuzz test (standard library only) against a real daemon process.

Thousands of malformed requests: broken request lines, bad methods, garbage and binary bytes, huge and negative
Content-Length, broken chunked bodies, odd query encodings, header injection attempts, truncated bodies, abrupt
resets mid-stream, mixed with valid requests. Properties: no 5xx other than a deliberate 503, every error is a
JSON body, no traceback in the daemon's log, no thread or file descriptor left behind, and a normal
publish/subscribe round trip afterwards. Set SSESERVER_FUZZ_CASES / SSESERVER_FUZZ_SEED to explore further.
"""

import concurrent.futures
import json
import os
import random
import socket
import struct
import tempfile
import unittest

from tests.support import (
    IO_TIMEOUT,
    SSEClient,
    daemon_process,
    request,
    split_responses,
    stop_daemon,
    wait_for_subscribers,
    wait_until,
    write_config,
)

CASES = int(os.environ.get("SSESERVER_FUZZ_CASES", "5000"))
SEED = int(os.environ.get("SSESERVER_FUZZ_SEED", "20261123"))
WORKERS = 8

METHODS = ["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "TRACE", "CONNECT", "get", "G\x00T", "", "POSTT"]
PATHS = [
    "/publish",
    "/subscribe",
    "/health",
    "/",
    "/publish?event=a",
    "/subscribe?event=x&event=y",
    "/publish?event=%zz",
    "/publish?event=%",
    "/publish?event=%00",
    "/publish?event=%C3%28",
    "/publish??event=a",
    "/publish?&&&=&",
    "/publish?event=",
    "/publish?event=" + "a" * 70,
    "/subscribe?last_event_id=%FF",
    "/subscribe?last_event_id=-5",
    "/subscribe?token=%0d%0aX:%201",
    "/publish?event=a%0d%0aX-Injected:%201",
    "/%2e%2e/%2e%2e/etc/passwd",
    "//publish",
    "/publish#frag",
    "*",
    "http://x/publish",
    "/" + "p" * 3000,
    "/subscribe?event=sseserver.reset",
]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/1", "http/1.1", "", "HTTP/1.1 extra"]
HEADER_SNIPPETS = [
    "Content-Length: 5",
    "Content-Length: -1",
    "Content-Length: 99999999999999999999",
    "Content-Length: 1e3",
    "Content-Length: 5, 5",
    "Content-Length:  3",
    "Content-Length: 0x10",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: identity",
    "Expect: 100-continue",
    "Expect: 200-ok",
    "Connection: close",
    "Connection: keep-alive",
    "Last-Event-ID: 0",
    "Last-Event-ID: \x7f\x01",
    "Last-Event-ID: 99999999999999999999999999",
    "Authorization: Bearer ",
    "Authorization: Basic Zm9vOmJhcg==",
    "Origin: https://x.example",
    "X-Forwarded-For: 1.2.3.4, garbage",
    "Host:",
    ": no-name",
    "No-Colon",
    " leading-space: x",
    "X-Injected: a\rb",
    "X-Nul: a\x00b",
    "X-Long: " + "x" * 20000,
    "Accept: text/event-stream",
    "X-Unicode: caf\u00e9",
]
CHUNKED_BODIES = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhel",
    b"5\r\nhelloXX0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"ffffffffffffffffff\r\n",
    b'5;ext="x"\r\nhello\r\n0\r\nT: v\r\n\r\n',
    b"0\r\n",
    b"\r\n\r\n",
    b"5\nhello\n0\n\n",
]


def make_case(rng: random.Random) -> dict:
    """One fuzz case: the bytes to send and how to end the connection."""
    kind = rng.choices(
        ["valid", "line", "garbage", "headers", "chunked", "truncated", "reset", "split"], [12, 18, 10, 25, 12, 8, 8, 7]
    )[0]
    ending = "shut"  # send, half-close, read until the server closes
    if kind == "valid":
        choice = rng.randrange(4)
        if choice == 0:
            raw = b"POST /publish?event=fuzz HTTP/1.1\r\nContent-Length: 4\r\n\r\nfuzz"
        elif choice == 1:
            raw = b"GET /health HTTP/1.0\r\n\r\n"
        elif choice == 2:
            raw = b"GET /subscribe?event=fuzz HTTP/1.1\r\nLast-Event-ID: 1\r\n\r\n"
        else:
            raw = b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + rng.choice(
                CHUNKED_BODIES[:1] + CHUNKED_BODIES[6:7]
            )
    elif kind == "line":
        parts = [rng.choice(METHODS), rng.choice(PATHS), rng.choice(VERSIONS)]
        separator = rng.choice([" ", " ", " ", "  ", "\t", ""])
        raw = separator.join(parts).encode("utf-8", "surrogateescape") + rng.choice([b"\r\n\r\n", b"\n\n", b"\r\n"])
        if rng.random() < 0.3:
            raw += rng.randbytes(rng.randrange(64))
    elif kind == "garbage":
        raw = rng.randbytes(rng.randrange(1, 4096))
        if rng.random() < 0.5:
            raw += b"\r\n\r\n"
    elif kind == "headers":
        method = rng.choice(["GET", "POST", "PUT", "OPTIONS", "HEAD"])
        lines = [f"{method} {rng.choice(PATHS)} HTTP/1.1"] + rng.sample(HEADER_SNIPPETS, rng.randrange(1, 6))
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        raw += rng.choice([b"", b"hello", rng.randbytes(rng.randrange(100))])
    elif kind == "chunked":
        raw = b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + rng.choice(CHUNKED_BODIES)
    elif kind == "truncated":
        length = rng.choice([10, 100, 5000])
        raw = b"POST /publish HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % length + b"x" * rng.randrange(length)
        if rng.random() < 0.2:
            ending = "stall"  # keep it open and silent: the server must time the request out
    elif kind == "reset":
        raw = rng.choice(
            [
                b"GET /subscribe HTTP/1.1\r\n\r\n",
                b"POST /publish HTTP/1.1\r\nContent-Length: 1000\r\n\r\nab",
                b"GET /health HTTP/1.1\r\nHost: x\r\n",
            ]
        )
        ending = "reset"
    else:  # split: a valid publish sent in random fragments
        raw = b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nsplit"
        ending = "fragments"
    return {"kind": kind, "raw": raw, "ending": ending, "fragment_seed": rng.randrange(1 << 30)}


def run_case(port: int, case: dict) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    try:
        raw = case["raw"]
        try:
            if case["ending"] == "fragments":
                rng = random.Random(case["fragment_seed"])
                while raw:
                    cut = rng.randrange(1, len(raw) + 1)
                    sock.sendall(raw[:cut])
                    raw = raw[cut:]
            else:
                sock.sendall(raw)
            if case["ending"] == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return b""
            if case["ending"] != "stall":
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed (e.g. 413 before the body): read what it said
        out = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        sock.close()


def process_counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


class FuzzTest(unittest.TestCase):
    def test_malformed_requests_never_break_the_server(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(
                tmp,
                "fuzz.toml",
                request_timeout=0.5,
                keepalive_timeout=0.5,
                max_message_bytes=4096,
                max_header_bytes=8192,
                heartbeat_interval=1,
            )
            with daemon_process("--port", "0", "-c", path, "--log-level", "debug") as (process, port):
                request(port, "GET", "/health")
                baseline = process_counts(process.pid)
                rng = random.Random(SEED)
                cases = [make_case(rng) for _ in range(CASES)]
                with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                    outputs = list(pool.map(lambda case: run_case(port, case), cases))
                kinds_answered = set()
                for case, output in zip(cases, outputs):
                    try:  # every Content-Length must match its body, whatever the request was
                        parsed = split_responses(output, head_request=case["raw"].startswith(b"HEAD "))
                    except AssertionError as exc:
                        raise AssertionError(f"case {case!r}: {exc}") from None
                    for status, _, body in parsed:
                        kinds_answered.add(case["kind"])
                        context = f"case {case!r} got {status}: {output[:300]!r}"
                        self.assertTrue(status < 500 or status in (503, 505, 501), context)
                        if status >= 400 and not case["raw"].startswith(b"HEAD "):  # HEAD: headers only
                            self.assertIn("error", json.loads(body), context)
                self.assertGreaterEqual(len(kinds_answered), 6, kinds_answered)
                # Nothing left behind: request threads end and sockets close (streams are forgotten on EOF).
                wait_until(
                    lambda: process_counts(process.pid) <= baseline,
                    timeout=30,
                    what=f"threads/fds back to {baseline}, now {process_counts(process.pid)}",
                )
                # And the daemon still does its job.
                with SSEClient(port) as client:
                    wait_for_subscribers(port, 1)
                    self.assertEqual(request(port, "POST", "/publish", "after the storm")[0], 200)
                    self.assertEqual(client.read_events(1)[0].data, "after the storm")
                stop_daemon(process)
            log = "\n".join(process.log_lines)
            self.assertNotIn("Traceback", log)
            self.assertNotIn("internal error", log)


if __name__ == "__main__":
    unittest.main()

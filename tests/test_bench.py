"""sseserver.bench as a user runs it: a subprocess pointed at a real server. Checks its accounting, never
its speed (speed is measured by benchmark runs, not by tests)."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import unittest

from sseserver import bench
from tests.support import ROOT, STOP_TIMEOUT, RunningServer, alive, children, wait_for_subscribers, wait_until


class BenchTest(unittest.TestCase):
    def test_counts_every_delivery_and_reports_one_json_line(self):
        with RunningServer(queue_size=1024) as server:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sseserver.bench",
                    "--url",
                    f"http://127.0.0.1:{server.port}",
                    "--subs",
                    "20",
                    "--msgs",
                    "50",
                    "--rate",
                    "0",
                    "--procs",
                    "2",
                    "--pub-conns",
                    "2",
                    "--drain",
                    "30",
                    "--connect-timeout",
                    "30",
                ],
                cwd=ROOT,
                capture_output=True,
                timeout=120,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            lines = result.stdout.decode().strip().splitlines()
            self.assertEqual(len(lines), 1)
            report = json.loads(lines[0])
            self.assertEqual((report["subs_ready"], report["published"]), (20, 50))
            self.assertEqual((report["expected"], report["delivered"], report["lost"]), (1000, 1000, 0))
            self.assertEqual((report["duplicates"], report["reordered"]), (0, 0))
            for key in (
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "max_ms",
                "deliveries_per_s",
                "publishes_per_s",
                "client_bottleneck",
            ):
                self.assertIn(key, report)
            self.assertLessEqual(report["p50_ms"], report["p99_ms"])
            # 50 publishes answered: their round trips, from sending the request to reading the answer
            self.assertGreater(report["publish_rtt_p50_ms"], 0)
            self.assertLessEqual(report["publish_rtt_p50_ms"], report["publish_rtt_p99_ms"])

    def test_batches_with_idempotency_keys_are_counted_per_event(self):
        with RunningServer(queue_size=1024) as server:
            argv = ["--subs", "3", "--msgs", "250", "--rate", "0", "--procs", "1", "--pub-conns", "2"]
            argv += ["--batch", "40", "--idempotency", "--drain", "30", "--connect-timeout", "30"]
            result = subprocess.run(
                [sys.executable, "-m", "sseserver.bench", "--url", f"http://127.0.0.1:{server.port}", *argv],
                cwd=ROOT,
                capture_output=True,
                timeout=120,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            report = json.loads(result.stdout)
            # 250 events in requests of 40: six full ones and one of 10
            self.assertEqual((report["published"], report["publish_requests"], report["publish_errors"]), (250, 7, 0))
            self.assertEqual((report["expected"], report["delivered"], report["duplicates"]), (750, 750, 0))
            self.assertEqual((report["batch"], report["idempotency"], report["reordered"]), (40, True, 0))
            self.assertEqual(len(server.server.keys), 250)  # each event had a key of its own

    def test_bad_url_is_exit_2(self):
        result = subprocess.run(
            [sys.executable, "-m", "sseserver.bench", "--url", "ftp://x"], cwd=ROOT, capture_output=True, timeout=60
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("--url", result.stderr.decode())

    def test_nothing_listening_fails_within_seconds_with_one_line(self):
        with socket.socket() as bound:  # bound but not listening: connections to it are refused
            bound.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{bound.getsockname()[1]}"
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "sseserver.bench", "--url", url, "--subs", "10"],
                cwd=ROOT,
                capture_output=True,
                timeout=60,
            )
            elapsed = time.monotonic() - started
        self.assertNotEqual(result.returncode, 0)
        self.assertLess(elapsed, 5.0)
        lines = result.stderr.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(url, lines[0])
        self.assertIn("refused", lines[0].lower())

    def test_killing_the_bench_kills_its_workers(self):
        """However the bench dies, its subscriber workers die with it: their streams close."""
        for how in (signal.SIGTERM, signal.SIGKILL):
            with self.subTest(signal=how.name), RunningServer(heartbeat_interval=60) as server:
                bench = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "sseserver.bench",
                        "--url",
                        f"http://127.0.0.1:{server.port}",
                        "--subs",
                        "6",
                        "--procs",
                        "2",
                        "--msgs",
                        "1000000",
                        "--rate",
                        "2",
                        "--duration",
                        "600",
                    ],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                workers = []
                try:
                    wait_for_subscribers(server.port, 6)  # the workers' streams
                    workers = children(bench.pid)
                    self.assertEqual(len(workers), 2, workers)
                    bench.send_signal(how)
                    self.assertEqual(bench.wait(STOP_TIMEOUT), -how)
                    wait_until(lambda: not [pid for pid in workers if alive(pid)], what=f"workers {workers} to die")
                    wait_for_subscribers(server.port, 0)  # their streams closed
                finally:
                    if bench.poll() is None:
                        bench.kill()
                        bench.wait(STOP_TIMEOUT)
                    for pid in workers:  # after a failure: leave nothing running
                        if alive(pid):
                            os.kill(pid, signal.SIGKILL)

    def test_bench_imports_nothing_else_of_the_package(self):
        with open(f"{ROOT}/sseserver/bench.py", encoding="utf-8") as handle:
            source = handle.read()
        self.assertNotIn("from . ", source)
        self.assertNotIn("from .", source.replace("from .bench", ""))
        self.assertNotIn("import sseserver", source)


RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
NOW_NS = 10_000_000_000
LATENCY_NS = 2_000_000  # every event below was sent 2 ms before it is read


def event(kind: bytes, seq: int, connection: int) -> bytes:
    """An event block as the daemon frames it, carrying a bench payload sent LATENCY_NS before NOW_NS."""
    data = b"%s:%d:%d:%02d:xxxx" % (kind, seq, NOW_NS - LATENCY_NS, connection)
    return b"id: %d\ndata: %s\n\n" % (seq, data)


# A stream's bytes after its response head: a warm-up event, five measured events from two publisher connections
# (seq 2 arrives after seq 3 from the same connection: reordered; seq 3 twice: a duplicate), and the lines that
# carry nothing to count.
STREAM_BODY = (
    b"retry: 1000\n\n"
    + event(b"w", 0, 0)
    + event(b"b", 0, 0)
    + event(b"b", 3, 0)
    + b":\n\n"
    + event(b"b", 1, 1)
    + event(b"b", 2, 0)
    + event(b"b", 3, 0)
    + b'event: sseserver.reset\ndata: {"reason": 1}\n\n'
)


class BenchAccountingTest(unittest.TestCase):
    """The bench's pure parts, without a server: the histogram, the split of streams over workers, a stream's
    accounting fed whole and byte by byte, and the client-bottleneck verdict."""

    def setUp(self):
        self.progress = bench.Progress(multiprocessing.get_context("fork"), 1)

    def feed(self, chunks: list[bytes]) -> tuple[bench.Tally, list[bool]]:
        tally = bench.Tally(self.progress, 0)
        stream = bench.Stream(sock=None)
        return tally, [stream.receive(chunk, NOW_NS, tally) for chunk in chunks]

    def test_a_bucket_stands_for_its_latency_within_one_percent(self):
        for microseconds in (1, 1.5, 10, 999, 12_345, 6e7):
            with self.subTest(microseconds=microseconds):
                value = bench.value_of(bench.bucket_of(microseconds))
                self.assertLess(abs(value / microseconds - 1), 0.01)
        self.assertEqual((bench.bucket_of(0.2), bench.value_of(0)), (0, 0.0))

    def test_a_percentile_is_the_smallest_bucket_holding_that_share_of_deliveries(self):
        fast, slow = bench.bucket_of(1000), bench.bucket_of(50_000)
        histogram = {slow: 1, fast: 99}
        for fraction, bucket in ((0.0, fast), (0.5, fast), (0.99, fast), (0.995, slow), (1.0, slow)):
            with self.subTest(fraction=fraction):
                self.assertEqual(bench.percentile(histogram, fraction), bench.value_of(bucket))
        self.assertIsNone(bench.percentile({}, 0.5))

    def test_workers_histograms_merge_bucket_by_bucket(self):
        self.assertEqual(bench.merge([{1: 2, 5: 1}, {}, {5: 3, 9: 1}]), {1: 2, 5: 4, 9: 1})

    def test_streams_are_split_over_workers_as_evenly_as_possible(self):
        for total, parts, shares in ((10, 3, [4, 3, 3]), (2, 2, [1, 1]), (1, 1, [1]), (0, 0, [])):
            with self.subTest(total=total, parts=parts):
                self.assertEqual(bench.split_evenly(total, parts), shares)

    def test_a_payload_is_padded_to_its_size_and_never_cut(self):
        self.assertEqual(len(bench.payload(bench.MEASURED, 7, 3, 64)), 64)
        short = bench.payload(bench.MEASURED, 7, 3, 4)
        self.assertTrue(short.startswith(b"b:7:") and short.endswith(b":03:"), short)

    def test_a_stream_counts_deliveries_duplicates_and_reordering_per_publisher_connection(self):
        for how, chunks in (
            ("whole", [RESPONSE_HEAD + STREAM_BODY]),
            ("byte by byte", [bytes([b]) for b in RESPONSE_HEAD + STREAM_BODY]),
        ):
            with self.subTest(how):
                self.progress = bench.Progress(multiprocessing.get_context("fork"), 1)
                tally, kept = self.feed(chunks)
                self.assertTrue(all(kept))
                self.assertEqual(
                    (tally.streaming, tally.warm, tally.delivered, tally.duplicates, tally.reordered), (1, 1, 4, 1, 1)
                )
                self.assertEqual(
                    (self.progress.total_streaming(), self.progress.total_warm(), self.progress.total_delivered()),
                    (1, 1, 4),
                )
                self.assertEqual(tally.histogram, {bench.bucket_of(LATENCY_NS / 1000): 4})

    def test_a_payload_from_the_publisher_is_counted_by_a_stream(self):
        tally, _ = self.feed([RESPONSE_HEAD, b"data: " + bench.payload(bench.MEASURED, 5, 2, 64) + b"\n\n"])
        self.assertEqual((tally.warm, tally.delivered), (1, 1))

    def test_a_stream_the_server_refuses_is_closed_and_counts_nothing(self):
        refusal = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        tally, kept = self.feed([refusal[:10], refusal[10:] + event(b"b", 0, 0)])
        self.assertEqual(kept, [True, False])
        self.assertEqual((tally.streaming, tally.delivered, self.progress.total_streaming()), (0, 0, 0))

    def test_a_paced_run_is_behind_schedule_below_95_percent_of_the_pace_asked_for(self):
        cases = (
            (0, 1000, 60, 1.0, False),  # unpaced: never behind
            (100, 1000, 10, 96.0, False),
            (100, 1000, 10, 94.0, True),
            # 1000 events in 60 s ask for only 16.7/s
            (100, 1000, 60, 16.0, False),
            (100, 1000, 60, 15.0, True),
        )
        for rate, msgs, duration, achieved, behind in cases:
            with self.subTest(rate=rate, msgs=msgs, duration=duration, achieved=achieved):
                self.assertIs(bench.behind_schedule(rate, msgs, duration, achieved), behind)

    def test_the_client_is_the_bottleneck_when_it_ran_flat_out_or_starved_the_machine(self):
        calm = {
            "worker_util": 0.3,
            "publisher_util": 0.2,
            "behind_schedule": False,
            "machine_util": 0.5,
            "client_share": 0.2,
        }
        cases = (
            ({}, False),
            ({"worker_util": 0.9}, True),
            ({"publisher_util": 0.9}, True),
            ({"behind_schedule": True}, False),
            ({"behind_schedule": True, "publisher_util": 0.7}, True),
            ({"machine_util": 0.95}, False),  # the server used the machine, not the client
            ({"machine_util": 0.95, "client_share": 0.4}, True),
            ({"machine_util": None, "client_share": 0.9}, False),
        )  # unknown machine load: no verdict from it
        for change, bottleneck in cases:
            with self.subTest(**change):
                self.assertIs(bench.ClientLoad(**{**calm, **change}).is_bottleneck(), bottleneck)


if __name__ == "__main__":
    unittest.main()

"""sseserver.bench as a user runs it: a subprocess pointed at a real server. Checks its accounting, never
its speed (speed is measured by benchmark runs, not by tests)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import unittest

from tests.support import ROOT, STOP_TIMEOUT, RunningServer, wait_for_subscribers, wait_until


def children(pid: int) -> list[int]:
    """The process's child processes (its threads' /proc children lists)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet (its parent died; init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class BenchTest(unittest.TestCase):
    def test_counts_every_delivery_and_reports_one_json_line(self):
        with RunningServer(queue_size=1024) as server:
            result = subprocess.run(
                [sys.executable, "-m", "sseserver.bench", "--url", f"http://127.0.0.1:{server.port}",
                 "--subs", "20", "--msgs", "50", "--rate", "0", "--procs", "2", "--pub-conns", "2",
                 "--drain", "30", "--connect-timeout", "30"],
                cwd=ROOT, capture_output=True, timeout=120)
            self.assertEqual(result.returncode, 0, result.stderr)
            lines = result.stdout.decode().strip().splitlines()
            self.assertEqual(len(lines), 1)
            report = json.loads(lines[0])
            self.assertEqual((report["subs_ready"], report["published"]), (20, 50))
            self.assertEqual((report["expected"], report["delivered"], report["lost"]), (1000, 1000, 0))
            self.assertEqual((report["duplicates"], report["reordered"]), (0, 0))
            for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "deliveries_per_s", "publishes_per_s",
                        "client_bottleneck"):
                self.assertIn(key, report)
            self.assertLessEqual(report["p50_ms"], report["p99_ms"])

    def test_bad_url_is_exit_2(self):
        result = subprocess.run([sys.executable, "-m", "sseserver.bench", "--url", "ftp://x"], cwd=ROOT,
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--url", result.stderr.decode())

    def test_nothing_listening_fails_within_seconds_with_one_line(self):
        with socket.socket() as bound:  # bound but not listening: connections to it are refused
            bound.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{bound.getsockname()[1]}"
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "sseserver.bench", "--url", url, "--subs", "10"],
                                    cwd=ROOT, capture_output=True, timeout=60)
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
                    [sys.executable, "-m", "sseserver.bench", "--url", f"http://127.0.0.1:{server.port}",
                     "--subs", "6", "--procs", "2", "--msgs", "1000000", "--rate", "2", "--duration", "600"],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


if __name__ == "__main__":
    unittest.main()

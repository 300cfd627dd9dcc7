"""sseserver.bench as a user runs it: a subprocess pointed at a real server. Checks its accounting, never
its speed (speed is measured by benchmark runs, not by tests)."""

import json
import subprocess
import sys
import unittest

from tests.support import ROOT, RunningServer


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

    def test_bench_imports_nothing_else_of_the_package(self):
        source = open(f"{ROOT}/sseserver/bench.py", encoding="utf-8").read()
        self.assertNotIn("from . ", source)
        self.assertNotIn("from .", source.replace("from .bench", ""))
        self.assertNotIn("import sseserver", source)


if __name__ == "__main__":
    unittest.main()

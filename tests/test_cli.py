"""The command line: flags, --version, --check-config, exit codes, one-line errors, and what the daemon prints
on stderr. What the running process does with signals (stop, drain, reload) is tests/test_lifecycle.py."""

import os
import socket
import tempfile
import unittest

from tests.support import daemon_process, request, run_cli, stop_daemon, write_config


class CommandLineTest(unittest.TestCase):
    def test_version_prints_the_version_and_help_exits_0(self):
        result = run_cli("--version")
        self.assertEqual(result.returncode, 0)
        self.assertRegex(result.stdout.decode(), r"^sseserver \d+\.\d+\.\d+\n$")
        self.assertEqual(run_cli("--help").returncode, 0)

    def test_usage_errors_are_one_line_exit_2(self):
        for args in (["--bogus"], ["--port", "http"], ["--log-level", "loud"], ["--port", "70000"]):
            with self.subTest(args=args):
                result = run_cli(*args)
                self.assertEqual(result.returncode, 2)
                self.assertEqual(len(result.stderr.decode().strip().splitlines()), 1, result.stderr)

    def test_check_config_is_exit_0_for_a_good_file_and_a_one_line_exit_2_naming_the_key_for_a_bad_one(self):
        with tempfile.TemporaryDirectory() as tmp:
            good = write_config(tmp, "good.toml", queue_size=32)
            bad = write_config(tmp, "bad.toml", queue_size=True)
            self.assertEqual(run_cli("--check-config", "-c", good).returncode, 0)
            result = run_cli("--check-config", "--config", bad)
            self.assertEqual(result.returncode, 2)
            line = result.stderr.decode().strip()
            self.assertNotIn("\n", line)
            self.assertIn("'queue_size'", line)
            result = run_cli("-c", os.path.join(tmp, "missing.toml"))
            self.assertEqual(result.returncode, 2)
            self.assertIn("cannot read", result.stderr.decode())

    def test_address_in_use_is_exit_1_without_traceback(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            result = run_cli("--port", str(taken.getsockname()[1]))
        self.assertEqual(result.returncode, 1)
        err = result.stderr.decode()
        self.assertIn("cannot listen", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1)


class ProcessOutputTest(unittest.TestCase):
    def test_log_lines_carry_journald_priorities_under_journald_and_timestamps_elsewhere(self):
        with daemon_process("--port", "0", env={"JOURNAL_STREAM": "8:12345"}) as (process, port):
            stop_daemon(process)
        self.assertRegex(process.log_lines[0], r"^<6>listening on http://127\.0\.0\.1:\d+ ")
        self.assertTrue(all(line.startswith("<") for line in process.log_lines), process.log_lines)
        with daemon_process("--port", "0", env={"JOURNAL_STREAM": ""}) as (process, port):
            stop_daemon(process)
        self.assertRegex(process.log_lines[0], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info listening on ")

    def test_port_zero_logs_the_bound_port(self):
        with daemon_process("--port", "0") as (process, port):
            self.assertNotEqual(port, 0)
            self.assertEqual(request(port, "GET", "/health")[0], 200)
            stop_daemon(process)


if __name__ == "__main__":
    unittest.main()

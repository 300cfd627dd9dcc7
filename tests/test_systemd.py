"""systemd integration, for real: a NOTIFY_SOCKET datagram socket the test reads back in order, socket activation
through the real systemd-socket-activate, and the shipped unit files checked by systemd-analyze."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from sseserver import systemd
from tests.support import (
    IO_TIMEOUT,
    ROOT,
    STOP_TIMEOUT,
    SSEClient,
    assert_exit,
    daemon_process,
    request,
    require_binary,
    stop_daemon,
    wait_for_subscribers,
    write_config,
)


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"sseserver-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
            self._dir = None
        else:
            self._dir = tempfile.mkdtemp()
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.messages: list[str] = []

    def next_matching(self, pattern: str, timeout: float = IO_TIMEOUT) -> str:
        """Read datagrams in order until one matches; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no datagram matching {pattern!r}; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if re.search(pattern, message):
                return message

    def close(self):
        self.sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)


class NotifyTest(unittest.TestCase):
    def test_ready_reload_stopping_in_order(self):
        notify = NotifySocket()
        self.addCleanup(notify.close)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, heartbeat_interval=5)
            with daemon_process("--port", "0", "-c", path, env={"NOTIFY_SOCKET": notify.address}) as (process, port):
                ready = notify.next_matching(r"^READY=1")
                self.assertRegex(ready, r"STATUS=0 subscribers")
                with SSEClient(port):
                    wait_for_subscribers(port, 1)
                    process.send_signal(signal.SIGHUP)
                    reloading = notify.next_matching(r"RELOADING=1")
                    self.assertRegex(reloading, r"MONOTONIC_USEC=\d+")
                    notify.next_matching(r"^READY=1")
                    process.send_signal(signal.SIGTERM)
                    notify.next_matching(r"^STOPPING=1$")
                    assert_exit(process, 0)
        kinds = [m.split("=")[0] for m in notify.messages if not m.startswith("STATUS=")]
        self.assertEqual(kinds, ["READY", "RELOADING", "READY", "STOPPING"])

    def test_an_abstract_notify_socket_gets_ready_and_then_watchdog_pings(self):
        notify = NotifySocket(abstract=True)
        self.addCleanup(notify.close)
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"}
        with daemon_process("--port", "0", env=env) as (process, _):
            notify.next_matching(r"^READY=1")
            for _ in range(3):
                notify.next_matching(r"^WATCHDOG=1$")
            stop_daemon(process)

    def test_notify_without_a_usable_socket_does_nothing_and_does_not_raise(self):
        self.assertFalse(systemd.notify("READY=1", environ={}))
        self.assertFalse(systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "/nonexistent/socket"}))
        self.assertFalse(systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "relative"}))

    def test_notify_gives_up_on_a_full_queue_at_once_or_after_a_bounded_wait(self):
        """systemd busy: its notify socket's queue (net.unix.max_dgram_qlen) is full. notify() blocked until it
        read again, so SIGTERM hung in STOPPING=1 far past shutdown_timeout. Now STATUS= and WATCHDOG=1 are
        dropped at once, and READY=1, STOPPING=1 (MAINPID=, RELOADING=1) wait at most NOTIFY_WAIT."""
        notify = NotifySocket()
        self.addCleanup(notify.close)
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(filler.close)
        filler.setblocking(False)
        with self.assertRaises(BlockingIOError):
            while True:
                filler.sendto(b"STATUS=filler", notify.address)
        environ = {"NOTIFY_SOCKET": notify.address}
        for message, longest in [("STATUS=x", 0.5), ("WATCHDOG=1", 0.5), ("STOPPING=1", systemd.NOTIFY_WAIT + 1.0)]:
            results: list[bool] = []
            started = time.monotonic()
            sender = threading.Thread(target=lambda: results.append(systemd.notify(message, environ)), daemon=True)
            sender.start()
            sender.join(IO_TIMEOUT)  # a thread, so that a blocking send fails the test instead of hanging it
            self.assertEqual(results, [False], f"{message} blocked on a full queue")
            self.assertLess(time.monotonic() - started, longest, message)
        notify.sock.recv(4096)  # room for one: the next one that matters gets through
        self.assertTrue(systemd.notify("READY=1", environ))

    def test_listen_fds_for_another_process_are_ignored(self):
        self.assertEqual(systemd.listen_sockets({"LISTEN_FDS": "1", "LISTEN_PID": "1"}), [])
        self.assertEqual(systemd.listen_sockets({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}), [])
        self.assertIsNone(systemd.watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}))
        self.assertEqual(systemd.watchdog_interval({"WATCHDOG_USEC": "1000000"}), 0.5)


class SocketActivationTest(unittest.TestCase):
    def test_serves_the_socket_passed_by_systemd_socket_activate(self):
        activate = require_binary("systemd-socket-activate")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))  # the test owns this socket; the daemon never binds
        listener.listen(128)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        # fd 3 in the child, and LISTEN_PID naming systemd-socket-activate itself ($$ survives exec), so it
        # receives the socket through sd_listen_fds() and passes it on to the daemon as LISTEN_FDS=1.
        script = (
            f"exec 3<&{fd}; LISTEN_FDS=1 LISTEN_PID=$$ exec {activate} -E PYTHONPATH={ROOT} "
            f"{sys.executable} -m sseserver --port 1 --log-level info"
        )
        # bash, not sh: dash cannot redirect from a descriptor above 9, which a test process may well hand out.
        process = subprocess.Popen(["bash", "-c", script], pass_fds=(fd,), cwd=ROOT, stderr=subprocess.PIPE)
        listener.close()
        try:
            status, _, body = request(port, "GET", "/health")  # the first connection makes it exec the daemon
            self.assertEqual(status, 200)
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                self.assertEqual(request(port, "POST", "/publish", "activated")[0], 200)
                self.assertEqual(client.read_events(1)[0].data, "activated")
            stop_daemon(process)
            log = process.stderr.read().decode()
            self.assertIn(f"listening on http://127.0.0.1:{port} (inherited socket", log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(STOP_TIMEOUT)
            process.stderr.close()


class UnitFileTest(unittest.TestCase):
    def setUp(self):
        self.analyze = require_binary("systemd-analyze")

    def test_units_pass_systemd_analyze_verify(self):
        with tempfile.TemporaryDirectory() as tmp:
            # The unit runs the console script `pip install .` puts in /usr/local/bin. That file is not installed
            # on a test machine, and verify checks that ExecStart exists, so this copy (and only this line)
            # points at the interpreter running the tests instead. Every other line is verified as shipped.
            for name in ("sseserver.service", "sseserver.socket"):
                with open(os.path.join(ROOT, "systemd", name)) as handle:
                    text = handle.read()
                text = text.replace("ExecStart=/usr/local/bin/sseserver", f"ExecStart={sys.executable} -m sseserver")
                with open(os.path.join(tmp, name), "w") as handle:
                    handle.write(text)
            result = subprocess.run(
                [self.analyze, "verify", os.path.join(tmp, "sseserver.service"), os.path.join(tmp, "sseserver.socket")],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp,
            )
            self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
            self.assertNotIn("sseserver", result.stderr, result.stderr)

    def test_service_exposure_score_at_most_2(self):
        result = subprocess.run(
            [self.analyze, "security", "--offline=true", os.path.join(ROOT, "systemd", "sseserver.service")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"Overall exposure level for sseserver\.service: (\d+\.\d+)", result.stdout)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        self.assertLessEqual(float(match.group(1)), 2.0)

    def test_unit_has_what_production_needs(self):
        with open(os.path.join(ROOT, "systemd", "sseserver.service")) as handle:
            unit = handle.read()
        for directive in (
            "Type=notify",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "WatchdogSec=",
            "/etc/sseserver/sseserver.toml",
            "LimitNOFILE=",
            "FileDescriptorStoreMax=",
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "RestrictAddressFamilies=",
            "SystemCallFilter=@system-service",
            "LoadCredential=",
        ):
            self.assertIn(directive, unit)


if __name__ == "__main__":
    unittest.main()

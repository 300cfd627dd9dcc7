"""The daemon process's life, as a subprocess with real signals: SIGTERM drains every stream and exits 0,
a second signal forces the exit, SIGHUP reloads without dropping a subscriber, a stop the moment the daemon
starts is still clean, and a request thread that cannot start is a 503, not a crash. (The command line itself,
its flags, exit codes and messages, is tests/test_cli.py.)"""

import ctypes
import json
import os
import platform
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from tests.support import (
    IO_TIMEOUT,
    REQUIRE_ALL,
    ROOT,
    STARTUP_TIMEOUT,
    STOP_TIMEOUT,
    SSEClient,
    assert_exit,
    connect,
    daemon_process,
    read_response,
    request,
    require_binary,
    stop_daemon,
    wait_for_subscribers,
    wait_until,
    write_config,
)


# Threads (and processes) the user running the daemon may have in the thread-failure test: the main, accept and
# writer threads, and a few request threads.
THREAD_LIMIT = 8


def fill_pipe(fd: int) -> int:
    """Write to a pipe until it is completely full; returns how many bytes that took."""
    os.set_blocking(fd, False)
    filled = 0
    for size in (4096, 1):
        try:
            while True:
                filled += os.write(fd, b"." * size)
        except BlockingIOError:
            pass
    os.set_blocking(fd, True)  # as the daemon inherits it: its write blocks
    return filled


def blocked_in(pid: int, syscall_prefix: str) -> bool:
    """Whether the process's main thread is inside this system call (/proc/PID/syscall: number, then args)."""
    try:
        with open(f"/proc/{pid}/syscall") as handle:
            return handle.read().startswith(syscall_prefix)
    except OSError:
        return False


class StopTest(unittest.TestCase):
    """SIGTERM (and SIGINT): stop accepting, end every stream with a `retry:` line, let in-flight publishes
    finish, exit 0 within shutdown_timeout; a second signal exits 1 at once."""

    def test_sigterm_ends_every_stream_with_a_retry_line_and_exits_0(self):
        with daemon_process("--port", "0") as (process, port):
            clients = [SSEClient(port) for _ in range(3)]
            wait_for_subscribers(port, 3)
            process.send_signal(signal.SIGTERM)
            for client in clients:  # each stream ends while the daemon is still stopping
                with client:
                    client.read_until_closed()
                    self.assertRegex(bytes(client.raw), rb"retry: \d+\n\n$")
            assert_exit(process, 0)

    def test_sigterm_with_1000_subscribers_exits_0_within_shutdown_timeout(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        with daemon_process("--port", "0") as (process, port):  # shutdown_timeout defaults to 5 s
            streams = [socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) for _ in range(1000)]
            try:
                for sock in streams:
                    sock.sendall(b"GET /subscribe HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n")
                wait_for_subscribers(port, 1000, timeout=60)
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                received = {sock: bytearray() for sock in streams}
                with selectors.DefaultSelector() as selector:
                    for sock in streams:
                        sock.setblocking(False)
                        selector.register(sock, selectors.EVENT_READ)
                    open_streams = len(streams)
                    deadline = started + 30
                    while open_streams and time.monotonic() < deadline:
                        for key, _ in selector.select(1):
                            chunk = key.fileobj.recv(65536)
                            if chunk:
                                received[key.fileobj] += chunk
                            else:
                                selector.unregister(key.fileobj)
                                open_streams -= 1
                assert_exit(process, 0)
                elapsed = time.monotonic() - started
                self.assertEqual(open_streams, 0, "some streams were never ended")
                self.assertLess(elapsed, 5.0 + 1.0, "exit took longer than shutdown_timeout")
                retries = set()
                for data in received.values():
                    tail = bytes(data).rsplit(b"retry: ", 1)[1]
                    self.assertRegex(tail, rb"^\d+\n\n$")
                    retries.add(int(tail))
                self.assertGreater(len(retries), 100, "retry delays are not jittered per stream")
            finally:
                for sock in streams:
                    sock.close()

    def test_an_in_flight_publish_finishes_during_shutdown(self):
        with daemon_process("--port", "0") as (process, port):
            with connect(port) as publisher, SSEClient(port) as subscriber:
                wait_for_subscribers(port, 1)
                # "100 Continue" comes back only once a request thread has parsed the head: from then on the
                # publish is in flight, and the stop must let it finish.
                publisher.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
                self.assertEqual(publisher.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
                publisher.sendall(b"half ")
                process.send_signal(signal.SIGTERM)
                wait_until(lambda: any("stopping" in line for line in process.log_lines), what="stop to begin")
                publisher.sendall(b"done!")
                status, headers, body = read_response(publisher)
                self.assertEqual((status, headers["connection"]), (200, "close"))
                self.assertEqual([e.data for e in subscriber.read_until_closed()], ["half done!"])
            assert_exit(process, 0)

    def test_a_second_sigterm_while_a_stalled_stream_holds_the_drain_exits_1_at_once(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, shutdown_timeout=60, queue_size=100000, history_size=10)
            with daemon_process("--port", "0", "-c", path) as (process, port):
                stalled = socket.create_connection(("127.0.0.1", port))
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.sendall(b"GET /subscribe HTTP/1.1\r\n\r\n")  # and never reads
                wait_for_subscribers(port, 1)
                for _ in range(100):  # far more than its socket buffers hold
                    self.assertEqual(request(port, "POST", "/publish", "x" * 60000)[0], 200)
                process.send_signal(signal.SIGTERM)
                wait_until(lambda: any("stopping" in line for line in process.log_lines))
                started = time.monotonic()
                stop_daemon(process, expected_exit=1)
                self.assertLess(time.monotonic() - started, STOP_TIMEOUT)
                self.assertTrue(any("second stop signal" in line for line in process.log_lines))
                stalled.close()

    def test_sigint_stops_cleanly_as_sigterm_does(self):
        with daemon_process("--port", "0") as (process, port):
            process.send_signal(signal.SIGINT)
            assert_exit(process, 0)

    def test_sigterm_the_moment_the_daemon_announces_itself_drains_and_exits_0(self):
        """A stop right after a start (systemd, a test) must be a clean stop. Made exact rather than lucky: the
        daemon's stderr is a pipe the test has filled, so writing its `listening on` line blocks, and SIGTERM
        arrives while the daemon is inside that very write."""
        write_syscall = {"x86_64": 1, "aarch64": 64}.get(platform.machine())
        if write_syscall is None:
            self.skipTest(f"no write(2) number known for {platform.machine()}")
        for attempt in range(3):
            with self.subTest(attempt=attempt):
                read_end, write_end = os.pipe()
                filler = fill_pipe(write_end)
                process = subprocess.Popen(
                    [sys.executable, "-m", "sseserver", "--port", "0"],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=write_end,
                )
                os.close(write_end)
                try:
                    wait_until(
                        lambda: blocked_in(process.pid, f"{write_syscall} 0x2 "),
                        STARTUP_TIMEOUT,
                        "the daemon to block writing its first log line",
                    )
                    process.send_signal(signal.SIGTERM)
                    with open(read_end, "rb") as pipe:
                        log = pipe.read()[filler:].decode()  # the daemon's whole stderr, until it exits
                    self.assertEqual(process.wait(STOP_TIMEOUT), 0, log)
                    self.assertRegex(log.splitlines()[0], r" info listening on http://")
                    self.assertIn("stopped", log)
                finally:
                    if process.poll() is None:
                        process.kill()
                        process.wait(STOP_TIMEOUT)


class SignalToAnyThreadTest(unittest.TestCase):
    def test_a_sigterm_the_kernel_gives_to_another_thread_stops_the_daemon_at_once(self):
        """The kernel may deliver a process's signal to any thread (under strace it often does). Python runs the
        handler on the main thread only, and an earlier version's main thread slept in a queue wait that such a
        signal does not interrupt: the stop waited for the control loop's next tick, about 5 s after start.
        Here the signal goes to another thread on purpose (tgkill), right after start."""
        tgkill = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
        if tgkill is None:
            self.skipTest(f"no tgkill number known for {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        with daemon_process("--port", "0", "--log-level", "info") as (process, port):
            # Any thread but the main one (the accept loop, a writer): Python 3.11 does not name them for the OS.
            other = max(int(tid) for tid in os.listdir(f"/proc/{process.pid}/task"))
            self.assertNotEqual(other, process.pid)
            sent = time.monotonic()
            self.assertEqual(libc.syscall(tgkill, process.pid, other, signal.SIGTERM), 0, ctypes.get_errno())
            wait_until(lambda: any("stopping:" in line for line in process.log_lines), what="the stop")
            self.assertLess(time.monotonic() - sent, 2.5, "the stop waited for the control loop's tick")
            assert_exit(process, 0)


class ReloadTest(unittest.TestCase):
    """SIGHUP: a valid file is swapped in with every subscriber kept; an invalid one is logged and the running
    configuration kept; flags from the command line win over the file every time."""

    def test_sighup_applies_a_valid_file_keeps_the_old_config_on_an_invalid_one_and_keeps_subscribers(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, max_message_bytes=10)
            with daemon_process("--port", "0", "-c", path) as (process, port):
                with SSEClient(port) as client:
                    self.assertEqual(request(port, "POST", "/publish", "x" * 20)[0], 413)
                    write_config(tmp, max_message_bytes=100, writer_threads=3)
                    process.send_signal(signal.SIGHUP)
                    wait_until(lambda: any("reloaded" in line for line in process.log_lines), what="reload")
                    self.assertTrue(
                        any("writer_threads cannot change" in line for line in process.log_lines), process.log_lines
                    )
                    self.assertEqual(request(port, "POST", "/publish", "x" * 20)[0], 200)
                    # an invalid file keeps the running config and the daemon serving
                    write_config(tmp, max_message_bytes="lots")
                    process.send_signal(signal.SIGHUP)
                    wait_until(lambda: any("reload failed" in line for line in process.log_lines))
                    self.assertEqual(request(port, "POST", "/publish", "y" * 20)[0], 200)
                    events = client.read_events(2)
                    self.assertEqual([e.data for e in events], ["x" * 20, "y" * 20])
                stop_daemon(process)

    def test_a_reload_keeps_what_the_command_line_said(self):
        """Flags win over the file at start and on every reload: a SIGHUP neither reverts --log-level nor warns
        that a --port it never tried to change cannot change."""
        with tempfile.TemporaryDirectory() as tmp:
            path = write_config(tmp, log_level="error", port=1, access_log=True)
            with daemon_process("--port", "0", "--log-level", "info", "-c", path) as (process, port):
                process.send_signal(signal.SIGHUP)
                wait_until(lambda: any("reloaded" in line for line in process.log_lines), what="reload at info")
                self.assertEqual(request(port, "GET", "/health")[0], 200)
                wait_until(
                    lambda: any('"GET /health" 200' in line for line in process.log_lines),
                    what="an access log line at info",
                )
                self.assertFalse([line for line in process.log_lines if "cannot change" in line])
                stop_daemon(process)


class ThreadExhaustionTest(unittest.TestCase):
    def test_a_request_thread_that_cannot_start_gets_503_and_the_daemon_carries_on(self):
        """Thread creation fails for real: the daemon runs as an unprivileged user whose process limit
        (RLIMIT_NPROC, which counts threads and which root ignores) leaves room for a few request threads."""
        if os.geteuid() != 0:
            if REQUIRE_ALL:
                raise AssertionError("needs root, to run the daemon as another user")
            self.skipTest("needs root, to run the daemon as another user")
        # A uid of its own, not `nobody`: RLIMIT_NPROC counts every process of the uid machine-wide, and nginx
        # workers (this suite's or anyone's) run as nobody, which would eat the few threads this test leaves.
        uid = 60000 + os.getpid() % 5000
        limited = [
            require_binary("prlimit"),
            f"--nproc={THREAD_LIMIT}",
            require_binary("setpriv"),
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)  # the daemon's user reads the config file
            path = write_config(tmp, request_timeout=60)
            os.chmod(path, 0o644)
            with daemon_process("--port", "0", "-c", path, prefix=limited) as (process, port):

                def threads():
                    return len(os.listdir(f"/proc/{process.pid}/task"))

                held, refused = [], None
                try:
                    while refused is None:
                        self.assertLess(len(held), 20, "every connection got a thread")
                        before = threads()
                        sock = connect(port)
                        sock.sendall(b"GET /health HTTP/1.1\r\n")  # a request thread waits for the rest
                        readable = selectors.DefaultSelector()
                        readable.register(sock, selectors.EVENT_READ)
                        wait_until(lambda: threads() > before or readable.select(0), what="a thread or an answer")
                        readable.close()
                        if threads() > before:
                            held.append(sock)
                        else:
                            refused = sock
                    with refused:
                        status, headers, body = read_response(refused)
                    self.assertEqual(
                        (status, headers["retry-after"], json.loads(body)), (503, "1", {"error": "server overloaded"})
                    )
                finally:
                    for sock in held:
                        sock.close()
                wait_until(lambda: request(port, "GET", "/health")[0] == 200, what="threads to start again")
                stop_daemon(process)
            log = "\n".join(process.log_lines)
            self.assertNotIn("Traceback", log)
            self.assertEqual(log.count("answering 503 to new connections"), 1, log)


if __name__ == "__main__":
    unittest.main()

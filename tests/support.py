"""Test helpers: a real server on 127.0.0.1 port 0, a raw-socket HTTP client, and an SSE reader that follows the
WHATWG parsing rules on its own (it shares no code with sseserver.framing, so it can catch framing bugs).

Synchronisation is always on something observable (a read with a deadline, a condition polled until a
deadline), never on a bare sleep. Timeouts are the named constants below: generous, because the CI machine has
two cores and runs other work.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import unittest

from sseserver import config as config_module
from sseserver.daemon import Daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_TIMEOUT = 15.0
IO_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0

# In CI a missing prerequisite (curl, nginx, ...) must fail the run instead of skipping the test.
REQUIRE_ALL = os.environ.get("SSESERVER_TEST_REQUIRE_ALL") == "1"


def require(present: bool, message: str) -> None:
    """Skip the test when a prerequisite is missing, or fail it under SSESERVER_TEST_REQUIRE_ALL=1."""
    if not present:
        if REQUIRE_ALL:
            raise AssertionError(message + " (SSESERVER_TEST_REQUIRE_ALL=1 forbids skipping)")
        raise unittest.SkipTest(message)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    return path


def wait_until(predicate, timeout: float = IO_TIMEOUT, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def sseserver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sseserver-") and t.is_alive()]


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


class RunningServer:
    """The real daemon (Daemon.run: server, writers, accept thread) on a thread, listening on port 0."""

    def __init__(self, **overrides):
        values = {"host": "127.0.0.1", "port": 0, "log_level": "warning"}
        values.update(overrides)
        self.config = config_module.from_mapping(values)
        self.daemon = Daemon(self.config, None, environ={})
        self.exit_code = None
        self._stop_requested = False
        self._thread = threading.Thread(target=self._run, name="test-daemon", daemon=True)

    def _run(self):
        self.exit_code = self.daemon.run()

    def __enter__(self):
        self._thread.start()
        if not self.daemon.ready.wait(STARTUP_TIMEOUT):
            raise AssertionError("server did not start")
        self.port = self.daemon.server.port
        self.server = self.daemon.server
        return self

    def __exit__(self, *exc):
        self.stop()

    def request_stop(self):
        """What SIGTERM does. Only once: a second request would force an immediate exit (code 1)."""
        if not self._stop_requested:
            self._stop_requested = True
            self.daemon.request_stop()

    def stop(self):
        if self._thread.is_alive():
            self.request_stop()
            self._thread.join(STOP_TIMEOUT)
        assert not self._thread.is_alive(), "daemon did not stop"
        wait_until(lambda: not sseserver_threads(), STOP_TIMEOUT, "sseserver threads to end")

    # conveniences
    def publish(self, data: str | bytes = "x", event: str | None = None, **kw):
        path = "/publish" + (f"?event={event}" if event else "")
        return request(self.port, "POST", path, data, **kw)

    def health(self) -> dict:
        return health(self.port)

    def subscribe(self, path: str = "/subscribe", headers: dict | None = None) -> "SSEClient":
        return SSEClient(self.port, path, headers)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def parse_head(head: bytes) -> tuple[int, dict]:
    """A response head (without its blank line) -> (status, headers with lower-cased names)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _read_to_end(sock: socket.socket) -> bytes:
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionError, ssl.SSLError):
        pass  # a reset ends the connection as surely as a FIN does
    return bytes(out)


def read_response(sock: socket.socket, buffer: bytearray | None = None, head_request: bool = False):
    """Read one HTTP response (Content-Length or close-delimited) -> (status, headers, body). Checks the framing
    on the way: nothing may follow a `Connection: close` response's Content-Length bytes, and on a kept-alive
    connection only the next response may (a wrong Content-Length would leave a body's tail there)."""
    data = buffer if buffer is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head: {bytes(data)!r}")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    if head_request or status == 204:
        assert status != 204 or "content-length" not in headers, "a 204 must not carry Content-Length"
        data[:] = rest
        return status, headers, b""
    if "content-length" in headers:
        length = int(headers["content-length"])
        body = bytearray(rest)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed inside a body")
            body += chunk
        after = bytes(body[length:])
        if headers.get("connection", "").lower() == "close":
            after += _read_to_end(sock)
            assert not after, f"{len(after)} bytes after a body of Content-Length {length}: {bytes(body)!r}"
        else:
            assert after == b"HTTP/1."[: len(after)] or after.startswith(b"HTTP/1."), (
                f"bytes after a body of Content-Length {length} are not a next response: {bytes(body)!r}"
            )
        data[:] = after
        return status, headers, bytes(body[:length])
    body = bytearray(rest)
    while chunk := sock.recv(65536):
        body += chunk
    data.clear()
    return status, headers, bytes(body)


def request(
    port,
    method: str,
    path: str,
    body: str | bytes | None = None,
    headers: dict | None = None,
    version: str = "HTTP/1.1",
):
    """One request on a fresh connection -> (status, headers, body). `port` is a port on 127.0.0.1, or a
    callable returning a connected socket (e.g. TLS to nginx)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    lines = [f"{method} {path} {version}", "Host: test", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with port() if callable(port) else connect(port) as sock:
        sock.sendall(raw)
        return read_response(sock, head_request=method == "HEAD")


def health(port) -> dict:
    """`GET /health` -> its JSON body, whatever the status (while stopping it is a 503 with the same fields)."""
    return json.loads(request(port, "GET", "/health")[2])


def wait_for_subscribers(port, n: int, timeout: float = IO_TIMEOUT) -> None:
    """Wait until `/health` counts exactly `n` open streams. The count is the integer parsed from the JSON, never
    a substring of the body: `"subscribers": 1` is also in `"subscribers": 10` and `"subscribers": 100`."""
    last = [None]

    def counted():
        last[0] = health(port)["subscribers"]
        return last[0] == n

    try:
        wait_until(counted, timeout, f"{n} subscribers in /health")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it last said {last[0]}") from None


def raw_exchange(port: int, raw: bytes, shut_write: bool = False) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (checked by split_responses())."""
    with connect(port) as sock:
        sock.sendall(raw)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := sock.recv(65536):
            out += chunk
    split_responses(bytes(out), head_request=raw.startswith(b"HEAD "))
    return bytes(out)


def split_responses(data: bytes, head_request: bool = False) -> list[tuple[int, dict, bytes]]:
    """Every response in a connection's output -> [(status, headers, body)], checking the framing: a body is
    exactly its Content-Length (one cut short, or bytes that belong to no response, fail the test). A response
    without Content-Length (a stream) runs to the end. `head_request`: the first final response may answer a
    HEAD and then has no body (unless the request could not be parsed as one: then a body follows)."""
    found: list[tuple[int, dict, bytes]] = []
    while data:
        head, blank, rest = data.partition(b"\r\n\r\n")
        assert data.startswith(b"HTTP/1.") and blank, f"not an HTTP response: {data[:200]!r}"
        status, headers = parse_head(head)
        answers_head = (
            head_request and not any(s >= 200 for s, _, _ in found) and (not rest or rest.startswith(b"HTTP/1."))
        )
        if status < 200 or status == 204 or answers_head:
            body, data = b"", rest  # interim (100 Continue) or the answer to HEAD: no body
        elif "content-length" not in headers:
            body, data = rest, b""
        else:
            length = int(headers["content-length"])
            assert len(rest) >= length, f"body shorter than its Content-Length {length}: {data[:300]!r}"
            body, data = rest[:length], rest[length:]
        found.append((status, headers, body))
    return found


class SSEEvent:
    def __init__(self, event_type, data, last_id):
        self.type, self.data, self.id = event_type, data, last_id

    def __repr__(self):
        return f"SSEEvent(type={self.type!r}, data={self.data!r}, id={self.id!r})"


class SSEClient:
    """A stream reader following the WHATWG event-stream interpretation rules."""

    def __init__(self, port, path: str = "/subscribe", headers: dict | None = None):
        self.sock = port() if callable(port) else connect(port)
        lines = [f"GET {path} HTTP/1.1", "Host: test", "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        self.init_parser()
        head = bytearray()
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"stream closed before headers: {bytes(head)!r}")
            head += chunk
        head_bytes, _, rest = bytes(head).partition(b"\r\n\r\n")
        self.status, self.headers = parse_head(head_bytes)
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "")
        self._feed(rest)

    def init_parser(self):
        self.raw = bytearray()
        self.buffer = bytearray()
        self.comments = 0
        self.retry = None
        self.last_id = ""
        self._data, self._type, self._data_seen = [], "", False
        self.pending: list[SSEEvent] = []
        self.closed = False
        self.ended = False  # the response body is complete (close, or a chunked body's last chunk)
        self._chunked = False
        self._wire = bytearray()  # chunked framing not yet decoded

    def _feed(self, chunk: bytes):
        """Body bytes in; `raw` and the line buffer get the decoded stream (through nginx it is chunked)."""
        if not self._chunked:
            self.raw += chunk
            self.buffer += chunk
            return
        self._wire += chunk
        while not self.ended:
            line_end = self._wire.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self._wire[:line_end]).split(b";")[0], 16)
            if size == 0:
                self.ended = True
                return
            if len(self._wire) < line_end + 2 + size + 2:
                return
            data = bytes(self._wire[line_end + 2 : line_end + 2 + size])
            del self._wire[: line_end + 2 + size + 2]
            self.raw += data
            self.buffer += data

    def _lines(self):
        """Complete lines from the buffer, split on CRLF, CR or LF."""
        while True:
            for index, byte in enumerate(self.buffer):
                if byte in (10, 13):
                    if byte == 13 and index + 1 == len(self.buffer):
                        return  # a CR at the end may be the first half of a CRLF
                    line = bytes(self.buffer[:index]).decode("utf-8")
                    skip = 2 if byte == 13 and self.buffer[index + 1] == 10 else 1
                    del self.buffer[: index + skip]
                    yield line
                    break
            else:
                return

    def _interpret(self):
        events = []
        for line in self._lines():
            if line == "":
                if self._data_seen:
                    data = "\n".join(self._data)
                    events.append(SSEEvent(self._type or "message", data, self.last_id))
                self._data, self._type, self._data_seen = [], "", False
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
                self._data_seen = True
            elif name == "event":
                self._type = value
            elif name == "id" and "\0" not in value:
                self.last_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry = int(value)
        return events

    def _receive(self, deadline: float, what: str) -> bool:
        """Wait for more of the body until the deadline. False once the body has ended (connection closed, or a
        chunked body's last chunk); raises on timeout."""
        while not self.ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = self.ended = True
                break
            self._feed(chunk)
            return True
        self.pending += self._interpret()
        return False

    def read_events(self, count: int, timeout: float = IO_TIMEOUT) -> list[SSEEvent]:
        """Exactly `count` events (fails on timeout or end of stream)."""
        deadline = time.monotonic() + timeout
        self.pending += self._interpret()
        while len(self.pending) < count:
            if not self._receive(deadline, f"{count} events (got {len(self.pending)}: {self.pending!r})"):
                if len(self.pending) < count:
                    raise AssertionError(f"stream ended after {len(self.pending)} of {count} events")
            self.pending += self._interpret()
        events, self.pending = self.pending[:count], self.pending[count:]
        return events

    def read_until_closed(self, timeout: float = IO_TIMEOUT) -> list[SSEEvent]:
        """Every remaining event until the server ends the stream."""
        deadline = time.monotonic() + timeout
        while self._receive(deadline, "the end of the stream"):
            pass
        self.pending += self._interpret()
        events, self.pending = self.pending, []
        return events

    def wait_for(self, predicate, timeout: float = IO_TIMEOUT, what: str = "stream condition"):
        """Read until predicate(self) holds (e.g. a comment arrived)."""
        deadline = time.monotonic() + timeout
        self.pending += self._interpret()
        while not predicate(self):
            if not self._receive(deadline, what) and not predicate(self):
                raise AssertionError(f"stream ended while waiting for {what}")
            self.pending += self._interpret()

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_cli(*args, env: dict | None = None, timeout: float = 60, input_bytes: bytes | None = None):
    """`python3 -m sseserver ARGS` to completion -> CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sseserver", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        timeout=timeout,
        input=input_bytes,
    )


def write_config(directory: str, name: str = "sseserver.toml", **values) -> str:
    """A TOML config file with these keys (JSON literals are valid TOML for strings, numbers and booleans)."""
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        for key, value in values.items():
            handle.write(f"{key} = {json.dumps(value)}\n")
    return path


def stop_daemon(process: subprocess.Popen, expected_exit: int = 0, pid: int | None = None) -> None:
    """SIGTERM, then assert the exit code within STOP_TIMEOUT: a clean stop is 0 (a second SIGTERM during a
    drain exits 1). `pid`: the process to signal when `process` is a wrapper around the daemon (strace, whose
    exit code is its child's)."""
    os.kill(process.pid if pid is None else pid, signal.SIGTERM)
    assert_exit(process, expected_exit)


def assert_exit(process: subprocess.Popen, expected_exit: int) -> None:
    """The daemon exits within STOP_TIMEOUT with this code (negative: killed by that signal). For a test that
    signals the daemon itself and watches the stop before it ends."""
    try:
        code = process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon did not exit within {STOP_TIMEOUT}s: {_log_tail(process)}") from None
    if code != expected_exit:
        raise AssertionError(f"the daemon exited {code}, not {expected_exit}: {_log_tail(process)}")


def _log_tail(process: subprocess.Popen) -> list[str]:
    """The last lines the daemon logged, when daemon_process() collected them (for a failure's message)."""
    return list(getattr(process, "log_lines", []))[-20:]


def listening_socket() -> socket.socket:
    """A listening TCP socket on 127.0.0.1, port 0, owned by the test (the daemon can inherit it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


# `python3 -c PASS_FDS FD... -- COMMAND...`: moves the descriptors FD... to 3, 4, ... and execs COMMAND with
# LISTEN_FDS and LISTEN_PID (its own pid, which exec keeps), as systemd starts a service. Python, not a shell
# script: thousands of descriptors (a restart benchmark's streams) make a `bash -c` script longer than one
# argument may be (128 KiB). Moved one by one, in place: a source sitting on a target not yet filled is first
# moved above every target (copying them all first could need twice as many descriptors as the limit allows).
PASS_FDS = """
import fcntl, os, sys
split = sys.argv.index("--")
sources, command = [int(fd) for fd in sys.argv[1:split]], sys.argv[split + 1 :]
where = {fd: fd for fd in sources}  # source -> the fd it is at now
holder = {fd: fd for fd in sources}  # fd -> the source it holds
for index, source in enumerate(sources):
    target, now = 3 + index, where[source]
    if now == target:
        continue
    if target in holder:
        other = holder.pop(target)
        moved = fcntl.fcntl(target, fcntl.F_DUPFD, 3 + len(sources))
        where[other], holder[moved] = moved, other
        os.close(target)
    os.dup2(now, target)
    os.close(now)
    del holder[now]
    where[source], holder[target] = target, source
os.environ.update(LISTEN_FDS=str(len(sources)), LISTEN_PID=str(os.getpid()))
os.execv(command[0], command)
"""


@contextlib.contextmanager
def daemon_process(
    *args,
    env: dict | None = None,
    listen_socket: socket.socket | None = None,
    prefix: list[str] | tuple = (),
    cwd: str = ROOT,
    fds: list[tuple[int, str]] | tuple = (),
):
    """The daemon as a real subprocess; yields (process, port) once it logs its `listening on` line. With
    `listen_socket` it inherits that socket as fd 3 through LISTEN_FDS, as under systemd socket activation. With
    `fds` ((fd, name) pairs) it inherits them as fds 3, 4, ... with LISTEN_FDS and LISTEN_FDNAMES, as systemd
    passes a socket unit's sockets and the fd store's descriptors.
    `prefix` runs it under another command (strace, nsenter: see tests/faults.py). `cwd`: where `python3 -m
    sseserver` finds the package (a copy a test can break)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    command = [*prefix, sys.executable, "-m", "sseserver", *args]
    pass_fds = ()
    if listen_socket is not None:
        fd = listen_socket.fileno()
        pass_fds = (fd,)
        # fd 3 in the child, and LISTEN_PID = the shell's pid, which exec keeps for the daemon. bash, not sh:
        # dash redirects only fds 0-9, and a test with several daemons at once holds higher ones.
        command = ["bash", "-c", f'exec 3<&{fd}; LISTEN_FDS=1 LISTEN_PID=$$ exec "$@"', "bash", *command]
    elif fds:
        pass_fds = tuple(fd for fd, _ in fds)
        full_env["LISTEN_FDNAMES"] = ":".join(name for _, name in fds)
        command = [sys.executable, "-c", PASS_FDS, *(str(fd) for fd in pass_fds), "--", *command]
    # Under a prefix the daemon is the wrapper's child (strace) or the wrapper itself (nsenter execs): give it a
    # process group of its own, so that cleanup kills the daemon too and never leaves it running unparented.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=full_env,
        start_new_session=bool(prefix),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        pass_fds=pass_fds,
    )
    log_lines: list[str] = []
    port_box: list[int] = []
    listening = threading.Event()

    def pump():
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            log_lines.append(line)
            if "listening on http://" in line and not port_box:
                port_box.append(int(line.split("listening on http://")[1].split(" ")[0].rsplit(":", 1)[1]))
                listening.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    process.log_lines = log_lines
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not listening.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {log_lines}")
        yield process, port_box[0]
    finally:
        if prefix:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif process.poll() is None:
            process.kill()
        process.wait(STOP_TIMEOUT)
        reader.join(STOP_TIMEOUT)
        process.stderr.close()

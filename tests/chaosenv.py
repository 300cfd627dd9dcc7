"""The world the chaos test's daemons run in: the processes, the small disk, Redis, and an HTTP client.

Owns: `DaemonProcess` (one `python3 -m sseserver` lifetime, maybe wrapped in nsenter and strace; its log, port,
real pid (after an upgrade in place, the process that took over; after a restart through systemd's fd store, the
next process, started with the stored descriptors), and fd/thread counts), `TmpfsHolder` (a private mount
namespace with a tmpfs the test can fill),
`RedisServer` (a throwaway redis-server and a minimal RESP client of our own), and one-shot and keep-alive HTTP
requests that tell "no answer, maybe acted on" (`NoAnswer.sent`) from "never sent".
Must not know: the plan, the model, what the daemon should answer.
"""

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.support import PASS_FDS, alive, children

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 30.0  # a daemon's "listening on" line (strace slows the start)
IO_TIMEOUT = 15.0  # one HTTP request
REDIS_TIMEOUT = 30.0  # redis-server answering PING; a daemon's follower reconnecting (backoff up to 5 s)
POLL = 0.02  # the sleep inside every polling loop that has a deadline
UPGRADED = re.compile(r"upgraded in place: pid (\d+) took over")  # the old process's last line (sseserver/daemon.py)
STOPPED = " info stopped"  # the daemon's last line before a clean exit 0 (after SIGTERM's drain)
STORED = " info stopped, streams kept in systemd's fd store: "  # its last line after SIGTERM stored the streams


# =================================================================================================================
# Processes: the daemon, redis-server, the namespace that holds the small disk.
# =================================================================================================================


def render_config(values: dict) -> str:
    """TOML: JSON literals are valid TOML for strings, numbers, booleans and lists of strings."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def clean_env() -> dict:
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    return env


class DaemonProcess:
    """One daemon lifetime: `python3 -m sseserver -c CONFIG`, maybe behind wrappers (nsenter into the tmpfs
    namespace, strace injecting faults). Knows its log, port, real pid (the wrappers' child under strace) and the
    fd and thread counts it started with.

    An upgrade in place (SIGUSR2) continues the lifetime in another process: `follow()` moves `pid` to it, and
    every later signal, wait and /proc count is the new process's. It inherited the old one's stderr, so the log
    pump reads on; the port is the same socket. It is not our child (its parent, the old process, exits), so
    `alive()` and `wait()` read /proc: a zombie nobody reaped yet counts as gone.

    A restart through systemd's fd store continues it too: once the process that stored its streams has exited,
    `start(fds)` starts the next one with the stored descriptors (as systemd does, through tests/support.py's
    trampoline), our child again; its log goes on in the same `lines`. `env`: added to every start's environment
    (NOTIFY_SOCKET and FDSTORE of the test's systemd)."""

    def __init__(
        self,
        label: str,
        config_path: str,
        log_path: str,
        wrapper: list[str],
        redis_port: int | None,
        env: dict | None = None,
    ):
        self.label = label
        self.env = dict(env or {})
        self.config_path = config_path
        self.log_path = log_path
        self.wrapper = wrapper
        self.redis_port = redis_port
        self.lines: list[str] = []
        self.port = None
        self.pid = None
        self.process = None
        self.successor = False  # `pid` took over in an upgrade in place: not our child
        self.followed_at = 0  # its first log line
        self.baseline = None  # (fds, threads) right after the start, before any client
        self.checked_lines = 0
        self.slow_explained = 0  # "dropped as slow" log lines already matched to a stream that ended
        self._listening = threading.Event()
        self._pump = None

    def start(self, fds: list[tuple[int, str]] | tuple = ()) -> None:
        """Start the process and wait for its `listening on` line. `fds`: (fd, name) pairs it gets at 3, 4, ...
        with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its own pid), as systemd passes its fd store."""
        argv = self.wrapper + [sys.executable, "-m", "sseserver", "-c", self.config_path]
        env = {**clean_env(), **self.env}
        if fds:
            assert not self.wrapper, "the trampoline execs the daemon itself: no wrapper in between"
            argv = [sys.executable, "-c", PASS_FDS, *(str(fd) for fd, _ in fds), "--", *argv]
            env["LISTEN_FDNAMES"] = ":".join(name for _, name in fds)
        if self._pump is not None:  # the process before (its stderr closed when it exited): every line is in
            self._pump.join(IO_TIMEOUT)
        self.port, self.successor = None, False
        self._listening.clear()
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=tuple(fd for fd, _ in fds),
        )
        self._pump = threading.Thread(target=self._read_log, name="chaos-log", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(POLL):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.poll()
                raise StartFailed(
                    f"{self.label} did not start (exit {self.process.returncode}): " + " | ".join(self.lines[-8:])
                )
        self.pid = self._find_pid(deadline)
        self.baseline = (self.fd_count()[0], self.thread_count())

    def _read_log(self) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"--- {self.label} started: {' '.join(self.wrapper)} ---\n")
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                log.write(f"[{self.label}] {line}\n")
                log.flush()
                if self.port is None and "listening on http://" in line:
                    self.port = int(line.split("listening on http://")[1].split(" ")[0].rsplit(":", 1)[1])
                    self._listening.set()

    def _find_pid(self, deadline: float) -> int:
        """The python process itself: the Popen pid, or (under strace) the descendant running sseserver."""
        while True:
            frontier = [self.process.pid]
            while frontier:
                pid = frontier.pop()
                if self._is_python(pid):
                    return pid
                with contextlib.suppress(OSError):
                    frontier.extend(children(pid))
            if time.monotonic() > deadline:
                raise StartFailed(f"{self.label}: cannot find the daemon's pid")
            time.sleep(POLL)

    @staticmethod
    def _is_python(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            return False
        return bool(argv) and b"python" in os.path.basename(argv[0]) and b"sseserver" in argv

    def alive(self) -> bool:
        if self.successor:
            return alive(self.pid)
        return self.process is not None and self.process.poll() is None

    def new_process(self, timeout: float) -> int | None:
        """The `python3 -m sseserver` the serving process started for an upgrade in place (before or after its
        exec), or None if none appears within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                for pid in children(self.pid):
                    if self._is_python(pid):
                        return pid
            if time.monotonic() > deadline or not self.alive():
                return None
            time.sleep(POLL)

    def successors(self) -> list[int]:
        """The pids that took over in upgrades in place, in order (from the old processes' log lines)."""
        return [int(match.group(1)) for line in list(self.lines) if (match := UPGRADED.search(line))]

    def follow(self, pid: int, timeout: float) -> int | None:
        """The serving process handed over to `pid` (it logged so after the commit): follow the new one at once,
        so `alive()` never says no in between, then wait until the old one has exited. Returns the old process's
        exit code: the real one for the process we started, 0 for an earlier successor that is gone (its status
        is not ours to read), None if it still runs after `timeout`. Never under strace: the wrapper's pid would
        be the one to wait for (the chaos plan upgrades those lifetimes only in file modes, where the daemon
        refuses)."""
        old, was_successor = self.pid, self.successor
        self.pid, self.successor, self.followed_at = pid, True, len(self.lines)
        if was_successor:
            return 0 if self._gone(old, timeout) else None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after `timeout`. A successor's exit status goes to whoever
        reaps it, not to us: its log stands in for it (the daemon logs `stopped` last before it returns 0)."""
        if not self.successor:
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        if not self._gone(self.pid, timeout):
            return None
        if self._pump is not None:
            self._pump.join(IO_TIMEOUT)  # the pipe closes with its last holder: every line is in
        lines = self.lines[self.followed_at :]
        return 0 if any(line.endswith(STOPPED) or STORED in line for line in lines) else -1

    @staticmethod
    def _gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        return True

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            if self.successor:
                self.wait(IO_TIMEOUT)
            else:
                try:
                    self.process.kill()  # strace too, if it outlived its tracee
                except OSError:
                    pass
                self.process.wait(IO_TIMEOUT)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # an old process still handing over when the run ended
            self.process.wait(IO_TIMEOUT)
        if self._pump is not None:
            self._pump.join(IO_TIMEOUT)

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if text in line)

    def slow_drops(self) -> int:
        return self.count("dropped as slow")

    def fd_count(self) -> tuple[int, list[str]]:
        """(fds that are not connections to Redis, all fd targets). Redis connections are pooled by design
        (bounded); they are checked separately."""
        redis_inodes = self._redis_inodes()
        targets = []
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    targets.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            return 0, []
        own = [t for t in targets if not (t.startswith("socket:[") and t[8:-1] in redis_inodes)]
        return len(own), targets

    def redis_connections(self) -> int:
        inodes = self._redis_inodes()
        count = 0
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                except OSError:
                    continue
                count += target.startswith("socket:[") and target[8:-1] in inodes
        except OSError:
            pass
        return count

    def _redis_inodes(self) -> set[str]:
        if self.redis_port is None:
            return set()
        inodes = set()
        try:
            with open(f"/proc/{self.pid}/net/tcp") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if int(fields[2].split(":")[1], 16) == self.redis_port:
                        inodes.add(fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            pass
        return inodes

    def thread_count(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return 0


class StartFailed(Exception):
    pass


class TmpfsHolder:
    """A private mount namespace with a small tmpfs at `directory`, held open by a sleeping process for the whole
    run. Daemons are started inside it with nsenter, so the history file lives on a disk the test can fill (through
    /proc/PID/root) and survives the daemon's restarts and crashes."""

    def __init__(self, directory: str, size: int):
        self.directory = directory
        self.size = size
        self.process = None
        self.filler_bytes = 0

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        user = [] if os.geteuid() == 0 else ["-r"]
        script = (
            f"mount -t tmpfs -o size={self.size},mode=0700 chaos-disk '{self.directory}' && echo ready "
            "&& exec sleep 1000000"
        )
        self.process = subprocess.Popen(
            ["unshare", *user, "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            error = self.process.stderr.read1(4096) if self.process.poll() is not None else b""
            self.stop()
            raise StartFailed(f"cannot mount a tmpfs in a private mount namespace: {error!r}")

    def enter(self) -> list[str]:
        user = [] if os.geteuid() == 0 else ["-U", "--preserve-credentials"]
        # setns() into a mount namespace moves the working directory to its root: name ours again.
        return ["nsenter", "-t", str(self.process.pid), *user, "-m", f"--wd={ROOT}", "--"]

    def path(self, name: str) -> str:
        """The namespace's file as the test (outside the namespace) reaches it."""
        return f"/proc/{self.process.pid}/root{self.directory}/{name}"

    def fill(self, leave_free: int) -> None:
        """Fill the disk, then give back `leave_free` bytes (tmpfs counts whole pages)."""
        path = self.path("filler")
        chunk = b"\0" * (1 << 20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    if os.write(fd, chunk) < len(chunk):
                        continue  # a short write: the next one meets ENOSPC
                except OSError:
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - leave_free))
        finally:
            os.close(fd)
        self.filler_bytes = max(0, size - leave_free)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path("filler"))
        self.filler_bytes = 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(IO_TIMEOUT)


class RedisServer:
    """A throwaway redis-server on a unix socket in `directory`: without persistence, or with appendonly and
    appendfsync always (then a restart, even after kill -9, keeps every event it acknowledged)."""

    def __init__(self, directory: str, persistent: bool):
        self.directory = directory
        self.persistent = persistent
        self.socket = os.path.join(directory, "redis.sock")
        self.process = None
        os.makedirs(directory, exist_ok=True)

    def start(self) -> None:
        argv = [
            shutil.which("redis-server"),
            "--port",
            "0",
            "--unixsocket",
            self.socket,
            "--unixsocketperm",
            "700",
            "--dir",
            self.directory,
            "--save",
            "",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_TIMEOUT
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, RedisReplyError):
                pass  # not listening yet, or -LOADING the append-only file
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise StartFailed("redis-server did not answer PING")
            time.sleep(POLL)

    def stop(self, how: str) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
            self.process.wait(REDIS_TIMEOUT)

    def command(self, *args: str):
        """One command over a fresh connection; a minimal RESP client of our own (the daemon's is under test)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect(self.socket)
            request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
            sock.sendall(request)
            return self._reply(sock.makefile("rb"))

    def _reply(self, reply):
        first = reply.readline()
        if first.startswith(b"-"):
            raise RedisReplyError(first[1:].decode().strip())
        if first.startswith(b"+"):
            return first[1:].decode().strip()
        if first.startswith(b":"):
            return int(first[1:])
        if first.startswith(b"$"):
            length = int(first[1:])
            return None if length < 0 else reply.read(length + 2)[:-2].decode("utf-8", "replace")
        if first.startswith(b"*"):
            length = int(first[1:])
            return None if length < 0 else [self._reply(reply) for _ in range(length)]
        raise RedisReplyError(f"unexpected reply {first!r}")


class RedisReplyError(Exception):
    pass


# =================================================================================================================
# HTTP: one request per connection (so Content-Length can be checked against the bytes that really came), and
# keep-alive publishers (a connection is one request thread in the daemon: strace counts its calls per thread).
# =================================================================================================================


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class NoAnswer(Exception):
    """No response came back. `sent`: the request went out, so the daemon may have acted on it."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


def _head_and_body(sock: socket.socket, buffer: bytearray, deadline: float, until_close: bool) -> Response:
    while b"\r\n\r\n" not in buffer:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    body = bytearray(rest)
    if status in (100,):
        buffer[:] = body
        return _head_and_body(sock, buffer, deadline, until_close)
    while (until_close or length < 0) or len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if length >= 0 and not until_close:
        buffer[:] = body[length:]
        body = body[:length]
    else:
        buffer.clear()
    response = Response(status, headers, bytes(body))
    response.length_ok = length < 0 or length == len(body)
    return response


def http(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = IO_TIMEOUT,
) -> Response:
    """One request with Connection: close; the body is read to the end, so a wrong Content-Length shows."""
    lines = [f"{method} {target} HTTP/1.1", "Host: chaos", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        raise NoAnswer(f"connect: {exc}", sent=False) from None
    with sock:
        try:
            sock.sendall(raw)
        except OSError as exc:
            raise NoAnswer(f"send: {exc}", sent=True) from None
        try:
            return _head_and_body(sock, bytearray(), time.monotonic() + timeout, until_close=True)
        except (OSError, ValueError, IndexError) as exc:
            raise NoAnswer(f"no response: {exc}", sent=True) from None


class KeepAlive:
    """A publisher that keeps its connection between publishes, as a backend does."""

    def __init__(self, port: int):
        self.port = port
        self.sock = None
        self.buffer = bytearray()

    def request(self, target: str, body: bytes, headers: dict) -> Response:
        if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
            # Readable while idle: the server closed it (keepalive_timeout, a stop). A client must not send a
            # request into that race, so, like every HTTP client library, open a new connection.
            self.close()
        if self.sock is None:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
            except OSError as exc:
                raise NoAnswer(f"connect: {exc}", sent=False) from None
            self.buffer = bytearray()
        lines = [f"POST {target} HTTP/1.1", "Host: chaos", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            response = _head_and_body(self.sock, self.buffer, time.monotonic() + IO_TIMEOUT, until_close=False)
        except (OSError, ValueError, IndexError) as exc:
            self.close()
            raise NoAnswer(f"keep-alive: {exc}", sent=True) from None
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

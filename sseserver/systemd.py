"""The systemd protocols we speak: sd_notify datagrams (with descriptors, for the fd store) and socket
activation (LISTEN_FDS, LISTEN_FDNAMES).

Owns: reading NOTIFY_SOCKET / LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID / WATCHDOG_USEC and turning them into
calls. Must not know: HTTP, config files, what the descriptors it carries are (fdstore.py names them).
notify() never raises and does nothing without NOTIFY_SOCKET, so callers need no `if systemd:` around it; a
Channel (a burst of messages with descriptors, which its caller must know failed) raises OSError.
"""

import array
import errno
import os
import select
import socket
import time
from collections.abc import Mapping, Sequence

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: inherited sockets start at fd 3
UNNAMED = "unknown"  # sd_listen_fds_with_names()'s name for a descriptor LISTEN_FDNAMES does not name


def _address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address[0] == "@":
        return "\0" + address[1:]  # abstract namespace
    if address[0] != "/":
        return None  # vsock and other forms are not for us
    return address


# How long notify() waits for room in systemd's queue (net.unix.max_dgram_qlen datagrams; it fills while
# systemd is busy) for a message systemd acts on: READY=1, STOPPING=1, RELOADING=1, MAINPID=. Bounded so that a
# stop is never held past its own deadlines by systemd; STATUS= and WATCHDOG=1 alone never wait (a lost one is
# replaced by the next, and the control loop must not stall on them).
NOTIFY_WAIT = 1.0
_WORTH_WAITING = ("READY=1", "STOPPING=1", "RELOADING=1", "MAINPID=")


def notify(message: str, environ=os.environ) -> bool:
    """Send one sd_notify datagram (e.g. "READY=1"). True if it was sent; False (never blocking longer than
    NOTIFY_WAIT) when systemd's queue stayed full."""
    address = _address(environ)
    if address is None:
        return False
    lines = message.split("\n")
    wait = NOTIFY_WAIT if any(line.startswith(_WORTH_WAITING) for line in lines) else 0.0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(wait)  # 0: non-blocking; a connected datagram socket waits for room in the peer's queue
            sock.connect(address)
            sock.send(message.encode("utf-8"))
        return True
    except OSError:  # TimeoutError and BlockingIOError among them
        return False


class Channel:
    """One connection to the notify socket for a burst of messages that carry descriptors (SCM_RIGHTS), each
    send bounded by `deadline` (time.monotonic()). Raises OSError when there is no usable NOTIFY_SOCKET or a
    send fails: unlike a lost READY=1, a descriptor systemd did not take changes what the caller must do.

    A send blocks while systemd's queue is full (a datagram socket queues net.unix.max_dgram_qlen messages,
    512 by default): thousands of messages in a row wait for systemd to read them, up to the deadline."""

    def __init__(self, environ: Mapping[str, str], deadline: float):
        address = _address(environ)
        if address is None:
            raise OSError(errno.ENOENT, "no usable NOTIFY_SOCKET")
        self.deadline = deadline
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(self._remaining())
            self._sock.connect(address)
        except BaseException:
            self._sock.close()
            raise

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "systemd did not take the messages in time")
        return remaining

    def send(self, message: str, fds: Sequence[int] = ()) -> None:
        self._sock.settimeout(self._remaining())
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self._sock.sendmsg([message.encode("utf-8")], ancillary)

    def barrier(self) -> None:
        """sd_notify_barrier(): returns once systemd has processed every message sent before it (it closes the
        descriptor BARRIER=1 carries); TimeoutError at the deadline. Without it, a process that exits right after
        its last FDSTORE=1 could be gone before systemd reads the message, which it then cannot tie to a unit."""
        reader, writer = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self.send("BARRIER=1", [writer])
            finally:
                os.close(writer)
            poller = select.poll()  # not select(): with thousands of streams open the pipe's fd is above 1024
            poller.register(reader, select.POLLHUP)
            while not poller.poll(self._remaining() * 1000):
                pass
        finally:
            os.close(reader)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen_fds(environ=os.environ, pid: int | None = None) -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(), pure: (fd, name) for each descriptor systemd passed to *us*, [] when none were
    (LISTEN_PID names another process when the variables were inherited by accident). A descriptor that
    LISTEN_FDNAMES does not name (it is absent, or shorter) is "unknown", as systemd's own parser says."""
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        target = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        return []
    if count <= 0 or target != (pid if pid is not None else os.getpid()):
        return []
    given = environ.get("LISTEN_FDNAMES")
    names = given.split(":") if given else []
    names += [UNNAMED] * (count - len(names))
    return [(LISTEN_FDS_START + index, names[index] or UNNAMED) for index in range(count)]


def listen_sockets(environ=os.environ, pid: int | None = None) -> list[socket.socket]:
    """Every descriptor systemd passed to this process, as sockets (socket activation without an fd store)."""
    sockets = []
    for fd, _ in listen_fds(environ, pid):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def watchdog_interval(environ=os.environ, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked for."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        target = int(environ.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        return None
    if usec <= 0 or (target and target != (pid if pid is not None else os.getpid())):
        return None
    return usec / 2_000_000

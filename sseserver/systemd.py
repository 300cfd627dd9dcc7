"""The two systemd protocols we speak: sd_notify datagrams and socket activation (LISTEN_FDS).

Owns: reading NOTIFY_SOCKET / LISTEN_FDS / LISTEN_PID / WATCHDOG_USEC and turning them into calls.
Must not know: HTTP, config files. notify() never raises and does nothing without NOTIFY_SOCKET, so callers
need no `if systemd:` around it.
"""

import os
import socket

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: inherited sockets start at fd 3


def notify(message: str, environ=os.environ) -> bool:
    """Send one sd_notify datagram (e.g. "READY=1"). True if it was sent."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    elif address[0] != "/":
        return False  # vsock and other forms are not for us
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError:
        return False


def listen_sockets(environ=os.environ, pid: int | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed to this process, or [] when none were passed to *us* (LISTEN_PID
    names another process when the variables were inherited by accident)."""
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        target = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        return []
    if count <= 0 or target != (pid if pid is not None else os.getpid()):
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
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

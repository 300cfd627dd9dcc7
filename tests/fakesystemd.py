"""systemd's side of the fd store, played by a test: a notify socket on a thread that keeps the descriptors a
stopping daemon sends with FDSTORE=1, drops them on FDSTOREREMOVE=1 and answers BARRIER=1. tests/test_fdstore.py
checks the protocol with it, tests/fdstore_bench.py measures with it, and tests/chaos.py serves a whole
fault-injection run with one; the next daemon gets `passed()` at fds 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES
and LISTEN_PID (tests/support.py's trampoline), as systemd does.
Must not know: what a daemon does with the descriptors, or what a test expects.
"""

import array
import os
import shutil
import socket
import tempfile
import threading

from tests.support import IO_TIMEOUT

STORE_SIZE = 4096  # FileDescriptorStoreMax= of the emulated unit
RECEIVE_POLL = 0.05  # how often the emulated systemd looks whether it is closed (not synchronisation)


class FakeSystemd:
    """systemd's side of sd_notify with descriptors, on a thread: FDSTORE=1 keeps the descriptors under their
    FDNAME in arrival order, FDSTOREREMOVE=1 closes every one of that name, BARRIER=1's descriptor is closed (which
    is the answer), and every message is recorded. The store is a dict by name, so that removing thousands of
    names one by one (the benchmark) costs what it costs systemd, not a scan of the store each.

    stop_reading() plays a busy systemd (a daemon-reload, its n^2 compares of a big store): nothing is read, so
    the socket's queue (net.unix.max_dgram_qlen messages) fills, and fill_queue() fills it at once. `hold_barriers`
    barriers are not answered (their descriptor is kept open) though everything else is handled."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="sseserver-fdstore-")
        self.address = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(RECEIVE_POLL)
        self.store: dict[str, list[int]] = {}
        self.messages: list[str] = []
        self.changed = threading.Condition()
        self.reading = threading.Event()
        self.reading.set()
        self.hold_barriers = 0
        self._held: list[int] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-systemd", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            if not self.reading.wait(RECEIVE_POLL):
                continue
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except TimeoutError:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            message = data.decode()
            fields = dict(line.partition("=")[::2] for line in message.split("\n") if line)
            with self.changed:
                self.messages.append(message)
                if fields.get("FDSTORE") == "1":
                    self.store.setdefault(fields.get("FDNAME", "stored"), []).extend(fds)
                    fds = array.array("i")
                elif fields.get("FDSTOREREMOVE") == "1":
                    fds.extend(self.store.pop(fields.get("FDNAME", ""), []))
                elif fields.get("BARRIER") == "1" and self.hold_barriers:
                    self.hold_barriers -= 1
                    self._held.extend(fds)
                    fds = array.array("i")
                for fd in fds:  # a barrier's, or removed ones
                    os.close(fd)
                self.changed.notify_all()

    def stop_reading(self) -> None:
        self.reading.clear()

    def start_reading(self) -> None:
        self.reading.set()

    def fill_queue(self) -> None:
        """While not reading: fill the socket's queue, so that a daemon's next message waits for room."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.setblocking(False)
            try:
                while True:
                    filler.sendto(b"STATUS=filler", self.address)
            except BlockingIOError:
                pass

    def names(self) -> list[str]:
        """One entry per stored descriptor, in the order they were stored."""
        return [name for _, name in self.passed()]

    def passed(self) -> list[tuple[int, str]]:
        """The store as the next start gets it: (fd, name) pairs (ours; systemd's copies stay in the store)."""
        with self.changed:
            return [(fd, name) for name, fds in self.store.items() for fd in fds]

    def replace(self, name: str, fds: list[int]) -> None:
        """Change the store behind the daemons' backs (a state from elsewhere, none, or two)."""
        with self.changed:
            for old in self.store.pop(name, []):
                os.close(old)
            if fds:
                self.store[name] = list(fds)

    def wait_for(self, predicate, what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, IO_TIMEOUT):
                raise AssertionError(f"timed out waiting for {what}; messages: {self.messages[-10:]}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(IO_TIMEOUT)
        self.sock.close()
        for fd in [fd for fd, _ in self.passed()] + self._held:
            os.close(fd)
        self.store.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

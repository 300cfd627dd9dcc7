"""Upgrade in place (SIGUSR2): hand the listening socket, every open stream and the in-memory state to a new
process running the code and config now on disk, without the clients noticing.

Owns: the state format (pure: encode()/decode(), versioned), the sealed memfd that carries it, starting the
successor with the sockets inherited at their own fd numbers, and the handshake on a socketpair between the two
processes (each step with a deadline).
Must not know: HTTP, signals, config files, how streams are written (the server hands over plain snapshots and
adopts them back); daemon.py drives the steps from its control loop.

The handshake, old process (Successor) on the left, new one (Adoption) on the right:

    start `python -m sseserver ARGV` (same cwd), SSESERVER_HANDOVER=CONTROL_FD,STATE_FD, every socket inherited
                                        reads and checks the state, builds its server, adopts the streams
                                        (its writers and accept loop are not started yet)
    <- "adopted"                        or "failed <why>" / EOF (bad config, ImportError, killed): the old
                                        process kills and reaps it and resumes serving; nothing was written
    -> "commit"
    <- "committed"                      from here on the new process owns the streams: it starts its writers
                                        and accept loop
    MAINPID=<new pid> to systemd, close our copies (no FIN: the new process holds every socket), exit 0
                                        EOF on the control socket: MAINPID=<own pid>, READY=1

Why two steps: until "committed" the new process has written nothing to any socket, so the old one can always
take over again; after it, the old one never writes again. A new process killed between "adopted" and
"committed" leaves the old one serving. Closing a socket that another process also holds sends no FIN (the
connection lives while any descriptor for it does), which is what makes the old process's exit invisible.

The state is JSON in a memfd sealed against writes (private to the two processes: it exists only as their
descriptors, never as a file), with `format` and `version` at the top: a process that reads a version it does
not know refuses it and says so, and the old one keeps serving.
"""

import dataclasses
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

FORMAT = "sseserver-handover"
VERSION = 1
ENV = "SSESERVER_HANDOVER"  # "CONTROL_FD,STATE_FD" in the new process's environment
# Variables the successor must not inherit: socket activation addressed to the old process.
# WATCHDOG_PID names the old process: kept, it would make the new one (the main pid after MAINPID=) send no
# WATCHDOG=1 at all, and systemd would kill the service one WatchdogSec after every upgrade. Without it the
# watchdog applies to whichever process reads WATCHDOG_USEC.
DROPPED_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID")
MESSAGE_LIMIT = 4096  # one handshake line, with a failure's reason
EXIT_GRACE = 1.0  # seconds a new process that closed the handshake gets to exit before we kill it


class HandoverError(Exception):
    """The hand-over cannot go on; the message says why in one line."""


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One ring entry. `wire` only for a gap notice (an event's bytes are encoded again from name and data)."""

    pos: int
    id: int
    prev_id: int
    name: str
    data: str
    published_ns: int
    notice: bool = False
    wire: str = ""
    batch: int = 0  # the publish it came in (a batch is one): the slow rule counts these


@dataclasses.dataclass(frozen=True, slots=True)
class IdSequence:
    """The bouncer's id sequence and ring bookkeeping: positions carry over unchanged, so stream cursors do."""

    head: int
    first_pos: int
    next_id: int
    last_id: int
    origin: int | None
    has_events: bool
    batches: int  # publishes so far (a batch is one)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamState:
    """One open stream: its socket's fd (inherited at that number), its filter, where it is in the ring, the
    bytes the old process had not yet got into the socket (whole events, or the tail of one already started),
    and what its access log line needs."""

    fd: int
    names: tuple[str, ...] | None  # the exact names it receives (None: any, within `patterns`)
    patterns: tuple[str, ...] | None  # its token's scope (None: unlimited)
    cursor: int
    live_from: int
    unsent: bytes
    last_id_sent: int | None
    peer: str
    age: float  # seconds it has been open
    events_sent: int
    received: int
    credential: str  # hex SHA-256 of the token it presented ("" for none): the new config's tokens judge it again


@dataclasses.dataclass(frozen=True, slots=True)
class State:
    listen_fd: int
    retry_ms: int  # what the streams were told at their start; the new process sends its own if it differs
    sequence: IdSequence
    entries: tuple[Entry, ...]
    streams: tuple[StreamState, ...]
    # Idempotency keys remembered: (key, fingerprint hex, event id, subscribers, published at, wall ms)
    keys: tuple[tuple[str, str, int, int, int], ...] = ()

    def fds(self) -> list[int]:
        return [self.listen_fd, *(stream.fd for stream in self.streams)]


# -- the format (pure) ----------------------------------------------------------------------------------------


def encode(state: State) -> bytes:
    """The state as the versioned JSON blob. Unsent bytes are latin-1 text (one char per byte), not base64:
    smaller, and JSON escapes what needs it."""
    return json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "listen_fd": state.listen_fd,
            "retry_ms": state.retry_ms,
            "sequence": dataclasses.asdict(state.sequence),
            "entries": [
                [e.pos, e.id, e.prev_id, e.name, e.data, e.published_ns, e.notice, e.wire, e.batch]
                for e in state.entries
            ],
            "streams": [
                [
                    s.fd,
                    None if s.names is None else list(s.names),
                    None if s.patterns is None else list(s.patterns),
                    s.cursor,
                    s.live_from,
                    s.unsent.decode("latin-1"),
                    s.last_id_sent,
                    s.peer,
                    s.age,
                    s.events_sent,
                    s.received,
                    s.credential,
                ]
                for s in state.streams
            ],
            "keys": [list(key) for key in state.keys],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def summary(state: State, blob: bytes, took: float) -> str:
    """What a hand-over carried, for its log line: its duration and the memory its state took."""
    unsent = sum(len(stream.unsent) for stream in state.streams)
    blocked = sum(1 for stream in state.streams if stream.unsent)
    return (
        f"{len(state.streams)} stream(s) and {len(state.entries)} event(s) in {took * 1000:.0f} ms (state"
        f" {len(blob)} bytes, of which {unsent} unsent to {blocked} blocked stream(s))"
    )


def decode(blob: bytes) -> State:
    """The blob back as a State. HandoverError for anything else than our format at our version, or damage."""
    try:
        document = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandoverError(f"the hand-over state is not readable: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise HandoverError("the hand-over state is not an sseserver state")
    version = document.get("version")
    if version != VERSION:
        raise HandoverError(f"the hand-over state has format version {version!r}; this code reads only {VERSION}")
    try:
        return State(
            int(document["listen_fd"]),
            int(document["retry_ms"]),
            IdSequence(**document["sequence"]),
            tuple(
                Entry(int(pos), int(id_), int(prev), str(name), str(data), int(ns), bool(notice), str(wire), int(batch))
                for pos, id_, prev, name, data, ns, notice, wire, batch in document["entries"]
            ),
            tuple(_stream_state(row) for row in document["streams"]),
            tuple(
                (str(key), str(fp), int(id_), int(n), int(at))
                for key, fp, id_, n, at in document.get("keys", ())  # absent: written before keys travelled
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HandoverError(f"the hand-over state is damaged: {exc!r}") from None


def _stream_state(row: list) -> StreamState:
    fd, names, patterns, cursor, live_from, unsent, last_id_sent, peer, age, events_sent, received, credential = row
    return StreamState(
        int(fd),
        None if names is None else tuple(names),
        None if patterns is None else tuple(patterns),
        int(cursor),
        int(live_from),
        unsent.encode("latin-1"),
        None if last_id_sent is None else int(last_id_sent),
        str(peer),
        float(age),
        int(events_sent),
        int(received),
        str(credential),
    )


# -- the memfd ------------------------------------------------------------------------------------------------


def sealed_memfd(blob: bytes) -> int:
    """A memfd holding `blob`, sealed so that nobody can change it afterwards, positioned at its start."""
    fd = os.memfd_create("sseserver-handover", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# -- the handshake --------------------------------------------------------------------------------------------


def _send(sock: socket.socket, message: str) -> None:
    sock.sendall(message.encode("utf-8", "replace")[: MESSAGE_LIMIT - 1] + b"\n")


def _receive(sock: socket.socket, deadline: float) -> str | None:
    """One line from the other process, or None at EOF, on an error, or at the deadline. (A socket timeout, not
    select(): with thousands of streams open the control socket's fd is far above select()'s 1024.)"""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1)  # a byte at a time: nothing after the line may be consumed
        except TimeoutError:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
        if len(data) >= MESSAGE_LIMIT:
            break
    return data.decode("utf-8", "replace").rstrip("\n")


class Successor:
    """The old process's side: the new process and the conversation with it."""

    def __init__(self, argv: Sequence[str], cwd: str, environ: Mapping[str, str], state: State, blob: bytes):
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        state_fd = sealed_memfd(blob)
        env = {name: value for name, value in environ.items() if name not in DROPPED_ENV}
        env[ENV] = f"{theirs.fileno()},{state_fd}"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sseserver", *argv],
                cwd=cwd,
                env=env,
                pass_fds=sorted({theirs.fileno(), state_fd, *state.fds()}),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
            os.close(state_fd)
        self.pid = self.process.pid

    def adopt(self, deadline: float) -> str | None:
        """Wait for "adopted", then commit. None when the new process now owns everything; otherwise why not
        (and it has been killed and reaped, having written nothing)."""
        answer = _receive(self._control, deadline)
        if answer != "adopted":
            return self._abort(answer, "adopting the streams")
        try:
            _send(self._control, "commit")
        except OSError:
            return self._abort(None, "being told to commit")
        answer = _receive(self._control, deadline)
        if answer != "committed":
            return self._abort(answer, "committing")
        return None

    def abort(self) -> None:
        """Give up on the new process because of a failure on our side: kill and reap it (it has written
        nothing to any stream)."""
        self._control.close()
        self.process.kill()
        try:
            self.process.wait(10.0)
        except subprocess.TimeoutExpired:
            pass

    def release(self) -> None:
        """The hand-over is done: our end closes, which tells the new process it is the only one now."""
        self._control.close()

    def _abort(self, answer: str | None, step: str) -> str:
        """Kill and reap the new process (it has written nothing to any stream) and say why it failed."""
        self._control.close()
        try:  # before our kill: has it died (the EOF we read), and how? A moment to be reaped
            code: int | None = self.process.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            code = None
        self.process.kill()
        try:
            self.process.wait(10.0)
        except subprocess.TimeoutExpired:
            pass
        if answer is not None and answer.startswith("failed "):
            return f"the new process refused: {answer[len('failed ') :]}"
        if answer is not None:
            return f"the new process said {answer!r} while {step}"
        if code is None:
            return f"the new process did not finish {step} in time"
        if code < 0:
            return f"the new process was killed by signal {-code} while {step}"
        return f"the new process exited with code {code} while {step} (its own log line says why)"


class Adoption:
    """The new process's side: the state it was given and the conversation with its predecessor."""

    def __init__(self, control_fd: int, state_fd: int):
        os.set_inheritable(control_fd, False)
        self._control = socket.socket(fileno=control_fd)
        try:
            self.blob = read_fd(state_fd)
        finally:
            os.close(state_fd)

    @classmethod
    def incoming(cls, environ: Mapping[str, str]) -> "Adoption | None":
        """The hand-over this process was started for, or None (an ordinary start)."""
        value = environ.get(ENV)
        if not value:
            return None
        control, _, state = value.partition(",")
        try:
            return cls(int(control), int(state))
        except (ValueError, OSError):
            return None

    def state(self) -> State:
        """The decoded state (HandoverError: refuse it, with fail())."""
        return decode(self.blob)

    def fail(self, why: str) -> None:
        """Tell the old process why we cannot take over; it keeps serving."""
        try:
            _send(self._control, f"failed {why}")
        except OSError:
            pass
        self._control.close()

    def adopted(self, deadline: float) -> bool:
        """Everything is adopted and nothing written yet: ask to commit. True when we own the streams now."""
        try:
            _send(self._control, "adopted")
        except OSError:
            return False
        if _receive(self._control, deadline) != "commit":
            return False
        try:
            _send(self._control, "committed")
        except OSError:
            return False
        return True

    def wait_released(self, deadline: float) -> None:
        """Until the old process lets go (EOF: it has told systemd our pid and is leaving), or the deadline."""
        _receive(self._control, deadline)
        self._control.close()


def report_failure(environ: Mapping[str, str], why: str) -> None:
    """For a new process that fails before it could build an Adoption (a bad config): tell the old one why."""
    adoption = Adoption.incoming(environ)
    if adoption is not None:
        adoption.fail(why)

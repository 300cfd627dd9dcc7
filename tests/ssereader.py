"""Event streams over raw sockets, read by one background thread and parsed by a parser of our own.

Used by tests/chaos.py. Owns: opening a stream (the request, the response head), reading every active stream
promptly from one selector thread (so a stream the test means to keep up never looks slow to the daemon),
pausing a stream (a stalled reader), closing one with a FIN or an RST, and turning bytes into items:
`Event`, `IdOnly` (a block that moves the last event id without an event, as a filtered stream's heartbeat
does), `Retry` and comments. It follows the WHATWG event-stream interpretation rules and shares no code with
sseserver.framing or tests/support.py, so a framing bug cannot hide behind a shared helper.
Must not know: what a stream should contain (tests/chaos.py judges that).
"""

import re
import selectors
import socket
import struct
import threading
import time

_LINE_BREAK = re.compile(rb"[\r\n]")
RECV_SIZE = 256 * 1024


class Event:
    __slots__ = ("name", "data", "id", "own_id")

    def __init__(self, name: str, data: str, last_id: str, own_id: bool):
        self.name, self.data, self.id = name, data, last_id
        self.own_id = own_id  # the block carried its own `id:` line (ours always must)

    def __repr__(self):
        data = self.data if len(self.data) < 60 else self.data[:57] + "..."
        return f"Event(id={self.id!r}, name={self.name!r}, data={data!r})"


class IdOnly:
    """`id: N` and a blank line with no data: the client's last event id moves, no event fires."""

    __slots__ = ("id",)

    def __init__(self, last_id: str):
        self.id = last_id

    def __repr__(self):
        return f"IdOnly({self.id!r})"


class Retry:
    __slots__ = ("ms",)

    def __init__(self, ms: int):
        self.ms = ms

    def __repr__(self):
        return f"Retry({self.ms})"


class Parser:
    """Bytes in, items out. Lines end in CRLF, CR or LF; a CR at the end of the input waits for the next byte
    (it may be half of a CRLF). Lines are decoded one by one, so a UTF-8 sequence split across reads is whole."""

    def __init__(self):
        self.buffer = bytearray()
        self.started = False
        self.bom = False  # the stream began with a BOM (a server must never send one)
        self.last_id = ""
        self.comments = 0
        self.decode_errors = 0
        self.unknown_fields: list[str] = []
        self._data: list[str] = []
        self._data_seen = False
        self._type = ""
        self._id_in_block = False

    def feed(self, chunk: bytes) -> list:
        self.buffer += chunk
        if not self.started:
            if len(self.buffer) < 3 and b"\xef\xbb\xbf".startswith(bytes(self.buffer)):
                return []
            self.started = True
            if self.buffer.startswith(b"\xef\xbb\xbf"):
                self.bom = True
                del self.buffer[:3]
        items = []
        start = 0
        buffer = self.buffer
        while True:
            match = _LINE_BREAK.search(buffer, start)
            if match is None:
                break
            end = match.start()
            if buffer[end] == 13:
                if end + 1 == len(buffer):
                    break  # maybe the first half of a CRLF
                after = end + 2 if buffer[end + 1] == 10 else end + 1
            else:
                after = end + 1
            raw = bytes(buffer[start:end])
            start = after
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.decode_errors += 1
                line = raw.decode("utf-8", "replace")
            self._line(line, items)
        del buffer[:start]
        return items

    def pending(self) -> bool:
        """True when the input stopped inside a block (an event without its blank line)."""
        return bool(self.buffer) or self._data_seen or self._id_in_block or bool(self._type)

    def _line(self, line: str, items: list) -> None:
        if line == "":
            if self._data_seen:
                items.append(Event(self._type or "message", "\n".join(self._data), self.last_id, self._id_in_block))
            elif self._id_in_block:
                items.append(IdOnly(self.last_id))
            self._data, self._data_seen, self._type, self._id_in_block = [], False, "", False
            return
        if line.startswith(":"):
            self.comments += 1
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_seen = True
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
                self._id_in_block = True
        elif name == "retry":
            if value.isascii() and value.isdigit():
                items.append(Retry(int(value)))
        else:
            self.unknown_fields.append(name)


class Stream:
    """One open event stream. `items` only grows; the reader thread appends under StreamReader.lock."""

    def __init__(self, sock: socket.socket, status: int, headers: dict, rest: bytes):
        self.sock = sock
        self.status = status
        self.headers = headers
        self.parser = Parser()
        self.items: list = []
        self.tail = b""  # the last bytes received (a graceful end is `retry: N` and a blank line)
        self.received = 0
        self.ended = False  # the server ended it (EOF) or the connection broke
        self.end_error = None  # "reset" when it broke rather than ended
        self.active = False  # being read by the reader thread
        self.closed = False  # closed by the test
        self._take(rest)

    def _take(self, chunk: bytes) -> None:
        if chunk:
            self.received += len(chunk)
            self.tail = (self.tail + chunk)[-256:]
            self.items.extend(self.parser.feed(chunk))


def read_head(sock: socket.socket, deadline: float) -> tuple[int, dict, bytes]:
    """Read a response head -> (status, lower-cased headers, bytes after the head)."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {bytes(data[:200])!r}")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def open_stream(port: int, target: str, headers: dict, timeout: float, rcvbuf: int | None = None):
    """GET `target` and read the head. Returns (status, headers, Stream) for an event stream, else
    (status, headers, body bytes). Raises OSError when the connection fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        lines = [f"GET {target} HTTP/1.1", "Host: chaos"] + [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        deadline = time.monotonic() + timeout
        status, response_headers, rest = read_head(sock, deadline)
        if status == 200 and response_headers.get("content-type", "").startswith("text/event-stream"):
            return status, response_headers, Stream(sock, status, response_headers, rest)
        body = bytearray(rest)
        length = int(response_headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        sock.close()
        return status, response_headers, bytes(body)
    except BaseException:
        sock.close()
        raise


class StreamReader:
    """The one thread that reads every active stream. Commands from the test's thread go through a queue and a
    wake-up socket, so only this thread touches the selector and the sockets it watches."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified whenever any stream gets data or ends
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: list = []
        self._done: set[int] = set()
        self._next_command = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="chaos-stream-reader", daemon=True)
        self._thread.start()

    # -- methods for the caller ----------------------------------------------------------------------------------

    def add(self, stream: Stream, active: bool = True) -> None:
        """Take over a stream; an inactive one is a stalled reader (its socket is never read)."""
        if active:
            self._command("resume", stream)

    def pause(self, stream: Stream) -> None:
        self._command("pause", stream)

    def resume(self, stream: Stream) -> None:
        self._command("resume", stream)

    def close(self, stream: Stream, how: str) -> None:
        """ "fin": shut our side down and read on until the server closes (a polite client); "rst": close at once
        with SO_LINGER 0, so the kernel sends a reset (a crashed client or a killed tab)."""
        self._command(how, stream)

    def wait(self, predicate, timeout: float) -> bool:
        """Wait until predicate() (called under the lock) holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.1))
            return True

    def stop(self) -> None:
        self._stop = True
        self._wake()
        self._thread.join(5.0)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- internals -----------------------------------------------------------------------------------------------

    def _command(self, kind: str, stream: Stream) -> None:
        with self.lock:
            self._commands.append((kind, stream))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(0.5):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._read(key.data)
            with self.lock:
                commands, self._commands = self._commands, []
            for kind, stream in commands:
                self._apply(kind, stream)

    def _read(self, stream: Stream) -> None:
        try:
            chunk = stream.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk, error = b"", "reset"
        else:
            error = None
        with self.changed:
            if chunk:
                stream._take(chunk)
            else:
                stream.ended = True
                stream.end_error = error
                self._unwatch(stream)
                stream.sock.close()  # nothing more can come; the test keeps only what was read
            self.changed.notify_all()

    def _watch(self, stream: Stream) -> None:
        # A stalled reader was opened with a tiny SO_RCVBUF (so that it fills fast). Reading on with it, a ~2 KB
        # window and delayed ACKs would crawl at a few KB/s and look like a stuck server: give it a normal buffer.
        try:
            stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError:
            pass
        stream.sock.setblocking(False)
        self._selector.register(stream.sock, selectors.EVENT_READ, stream)
        stream.active = True

    def _unwatch(self, stream: Stream) -> None:
        if stream.active:
            stream.active = False
            try:
                self._selector.unregister(stream.sock)
            except (KeyError, ValueError):
                pass

    def _apply(self, kind: str, stream: Stream) -> None:
        with self.changed:
            if kind == "resume":
                if not stream.active and not stream.ended and not stream.closed:
                    self._watch(stream)
            elif kind == "pause":
                self._unwatch(stream)
            elif kind == "fin" and not stream.closed:
                stream.closed = True
                if not stream.ended:
                    try:
                        stream.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    if not stream.active:  # keep reading until the server closes: that is a FIN's contract
                        self._watch(stream)
            elif kind == "rst" and not stream.closed and not stream.ended:
                stream.closed = True
                self._unwatch(stream)
                try:
                    stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                stream.sock.close()
                stream.ended = True
            self.changed.notify_all()

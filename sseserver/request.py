"""HTTP/1.x requests read off a socket: the head, then a Content-Length or chunked body, under one deadline.

Owns: the request syntax we accept and its limits (head size, body size, the time a client has to send a
request). parse_head() is pure; RequestReader is the only part that touches the socket.
Must not know: routes, events, config objects (limits arrive as numbers).

Why not BaseHTTPRequestHandler.parse_request(): it parses headers with email.parser, which costs more than the
whole rest of a publish, and its readline() loop has no total deadline, so a client sending a byte a second
(slowloris) could hold a thread forever. Here a request normally costs one recv(), and every recv() waits at
most until the request's deadline.
"""

import re
import socket
import struct
import time
from urllib.parse import parse_qsl, unquote

from .errors import ClientGone, HTTPError

_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# Checked with one regex search each instead of a Python loop over characters: parsing the head is most of a
# keep-alive publish's cost.
_TARGET_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f]")  # spaces and controls: the target must be one token
_VALUE_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than tab in a header value
_RECV_SIZE = 65536
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "keep_alive")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str]):
        self.method = method
        self.target = target
        raw_path, _, raw_query = target.partition("?")
        self.path = unquote(raw_path) if "%" in raw_path else raw_path
        self.query = parse_qsl(raw_query, keep_blank_values=True) if raw_query else []
        self.version = version
        self.headers = headers  # lower-cased names; repeated headers joined with ", "
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection

    def query_values(self, name: str) -> list[str]:
        return [value for key, value in self.query if key == name]

    def query_value(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None


def parse_head(head: bytes, max_line: int) -> Request:
    """Parse a request head (everything before the blank line, without it). Raises HTTPError for anything we
    will not serve. Header lines may end in CRLF or a lone LF; obsolete line folding is refused."""
    lines = head.split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    if len(request_line) > max_line:
        raise HTTPError(414, "request line too long", close=True)
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _METHOD_CHARS or not parts[1]:
        raise HTTPError(400, "malformed request line", close=True)
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
        raise HTTPError(400, "malformed request line", close=True)
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "request target must be ASCII (percent-encode the rest)", close=True) from None
    if target[:1] != b"/" or _TARGET_FORBIDDEN.search(target):
        raise HTTPError(400, "request target must be an absolute path", close=True)
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise HTTPError(400, "obsolete header line folding is not accepted", close=True)
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
            raise HTTPError(400, "malformed header line", close=True)
        try:
            key = name.decode("ascii").lower()
        except UnicodeDecodeError:
            raise HTTPError(400, "header names must be ASCII", close=True) from None
        value = value.strip(b" \t")
        if _VALUE_FORBIDDEN.search(value):
            raise HTTPError(400, "control characters in a header value", close=True)
        text = value.decode("latin-1")
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host"):
                raise HTTPError(400, f"repeated {key} header", close=True)
            headers[key] = headers[key] + ", " + text
        else:
            headers[key] = text
    return Request(method.decode("ascii"), target_text, version.decode("ascii"), headers)


def body_length(request: Request, max_bytes: int, limit_name: str = "max_message_bytes") -> int | None:
    """The Content-Length to read, None for a chunked body. Raises 411/413/400/501 as the headers demand (413
    names `limit_name`, the config key behind `max_bytes`)."""
    encoding = request.headers.get("transfer-encoding")
    length = request.headers.get("content-length")
    if encoding is not None:
        if length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding given", close=True)
        if encoding.strip().lower() != "chunked":
            raise HTTPError(501, "only chunked transfer encoding is supported", close=True)
        return None
    if length is None:
        raise HTTPError(411, "a body needs Content-Length or chunked Transfer-Encoding", close=True)
    if not length.isascii() or not length.isdigit() or len(length) > 18:
        raise HTTPError(400, "Content-Length must be a non-negative integer", close=True)
    size = int(length)
    if size > max_bytes:
        raise HTTPError(413, f"body is larger than {limit_name} ({max_bytes})", close=True)
    return size


class RequestReader:
    """Reads requests one after another off one connection, keeping bytes that arrived early (pipelining)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.deadline = 0.0
        self.timeout: float | None = None  # what SO_RCVTIMEO/SO_SNDTIMEO are set to
        # Timeouts are the kernel's (SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket), not Python's: a socket with
        # a Python timeout poll()s before every recv() and send(), two extra system calls per request.
        sock.settimeout(None)

    def set_timeout(self, seconds: float) -> None:
        """Bound every later recv()/send() on this socket to `seconds`. Changed only when it must grow or shrink
        by more than 10% (each change is two setsockopt() calls), so a deadline may be overshot by a tenth."""
        if self.timeout is None or seconds > self.timeout or seconds < 0.9 * self.timeout:
            seconds = max(seconds, 0.001)  # a zero timeval would mean "wait forever"
            timeval = _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            self.timeout = seconds

    def _fill(self) -> None:
        """One recv() into the buffer, waiting no later than (about) the deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.set_timeout(remaining)
        try:
            chunk = self.sock.recv(_RECV_SIZE)
        except BlockingIOError:  # EAGAIN from a blocking socket: SO_RCVTIMEO expired
            raise TimeoutError from None
        if not chunk:
            raise ClientGone
        self.buffer += chunk

    def read_available(self) -> bool | None:
        """Take what has arrived into the buffer without waiting (the publisher loop's read): True when something
        came, None when nothing had, False when the client closed or the connection failed."""
        try:
            chunk = self.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return False
        self.buffer += chunk
        return bool(chunk)

    def read_head(self, first_byte_timeout: float, request_timeout: float, max_head: int) -> bytes | None:
        """The next request's head, or None when the client closed (or went quiet) between requests. The
        request deadline starts with the request's first byte, so an idle keep-alive connection is governed by
        `first_byte_timeout` instead."""
        if not self.buffer:
            self.deadline = time.monotonic() + first_byte_timeout
            try:
                self._fill()
            except (ClientGone, TimeoutError, ConnectionError):
                return None
        self.deadline = time.monotonic() + request_timeout
        searched = 0
        while True:
            found = self._head_end(searched)
            if found is not None:
                end, rest = found
                break
            if len(self.buffer) > max_head:
                raise self._head_too_large(max_head)
            searched = max(0, len(self.buffer) - 2)
            self._fill_or_timeout()
        if end > max_head:
            raise self._head_too_large(max_head)
        return self._take_head(end, rest)

    def peek_head(self, max_head: int) -> tuple[bytes, int] | None:
        """The next request's head and how many buffered bytes it spans with its blank line, when all of it is
        already buffered (and within max_head); None otherwise. Takes nothing off the buffer (see consume())
        and never reads the socket."""
        found = self._head_end(0)
        if found is None or found[0] > max_head:
            return None
        end, rest = found
        return bytes(self.buffer[:end]).lstrip(b"\r\n"), rest

    def consume(self, count: int) -> None:
        del self.buffer[:count]

    def _head_end(self, searched: int) -> tuple[int, int] | None:
        """(where the head ends, where what follows it starts), searching from `searched`; None before the
        blank line. The head ends at the first blank line, whether lines end in CRLF or a lone LF."""
        crlf = self.buffer.find(b"\n\r\n", searched)
        lf = self.buffer.find(b"\n\n", searched)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return crlf, crlf + 3
        if lf >= 0:
            return lf, lf + 2
        return None

    def _take_head(self, end: int, rest: int) -> bytes:
        head = bytes(self.buffer[:end])
        del self.buffer[:rest]
        return head.lstrip(b"\r\n")  # tolerate stray line ends between pipelined requests

    def _head_too_large(self, max_head: int) -> HTTPError:
        first_line = self.buffer.find(b"\n")
        if first_line < 0 or first_line > max_head:
            return HTTPError(414, "request line too long", close=True)
        return HTTPError(431, "request headers too large", close=True)

    def read_body(self, length: int | None, max_bytes: int, limit_name: str = "max_message_bytes") -> bytes:
        """The body: `length` bytes, or a chunked body (length None) of at most max_bytes (413 naming
        `limit_name` beyond it)."""
        if length is not None:
            while len(self.buffer) < length:
                self._fill_or_timeout()
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            return body
        return self._read_chunked(max_bytes, limit_name)

    def _fill_or_timeout(self) -> None:
        try:
            self._fill()
        except TimeoutError:
            raise HTTPError(408, "request not received within request_timeout", close=True) from None

    def _line(self, limit: int) -> bytes:
        searched = 0
        while True:
            end = self.buffer.find(b"\n", searched)
            if end >= 0:
                line = bytes(self.buffer[:end]).rstrip(b"\r")
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > limit:
                raise HTTPError(400, "malformed chunked body", close=True)
            searched = len(self.buffer)
            self._fill_or_timeout()

    def _read_chunked(self, max_bytes: int, limit_name: str) -> bytes:
        body = bytearray()
        while True:
            size_line = self._line(1024).split(b";", 1)[0].strip()
            # int(x, 16) alone would also take "0x1f", "+1f" and "1_f", which no HTTP peer means.
            if not size_line or len(size_line) > 16 or not set(size_line) <= _HEX_DIGITS:
                raise HTTPError(400, "malformed chunk size", close=True)
            size = int(size_line, 16)
            if size == 0:
                while self._line(8192):  # trailers: read and ignore
                    pass
                return bytes(body)
            if len(body) + size > max_bytes:
                raise HTTPError(413, f"body is larger than {limit_name} ({max_bytes})", close=True)
            while len(self.buffer) < size + 1:
                self._fill_or_timeout()
            body += self.buffer[:size]
            del self.buffer[:size]
            if self._line(2):
                raise HTTPError(400, "malformed chunked body", close=True)

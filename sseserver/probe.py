"""The doctor's client: reach a deployment as a browser would, and record what arrives and when.

Owns: the base URL (parsing, redirects), resolving and connecting under a deadline, TLS (verification, ALPN,
the peer's certificate and its expiry), one-shot HTTP/1.1 requests, and a held event stream whose every arrival
is timestamped after decoding the chunked transfer coding, a gzip/deflate content coding and the WHATWG
event-stream format.
Must not know: thresholds, findings or fixes (findings.py judges what this module observed), nor anything of the
daemon's insides: it sees only what a browser sees, through every proxy on the way.

Deliberate choices, so nobody "fixes" them:
- Raw sockets, not http.client: a stream is read with a deadline per wait, and the file http.client reads
  through cannot be read again once a read has timed out.
- Name resolution runs on a helper thread that is waited for until the deadline: getaddrinfo() has no timeout
  of its own, and an unreachable URL must be reported within seconds even when DNS never answers.
- A certificate that does not verify is remembered (the doctor reports it) and the connection is made again
  without verification, so the checks of the streaming path still run; a browser would refuse that site.
- Streams offer only HTTP/1.1 in ALPN (this client speaks nothing else); a separate handshake offers h2 to learn
  what a browser would get.
- Whatever a server sends, memory stays bounded: replies are read up to MAX_BODY bytes, a stream's line, an
  event's data and what one read decompresses to are capped at MAX_BODY too (beyond: the stream counts as broken),
  and a stream keeps only the events it was told to keep (the rest are counted).
"""

import dataclasses
import datetime
import ipaddress
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from urllib.parse import quote, urljoin, urlsplit

MAX_HEAD = 65536
MAX_BODY = 1024 * 1024
_RECV = 65536
# Endpoint names a user may paste by mistake instead of the base URL.
_ENDPOINTS = ("/subscribe", "/publish", "/health", "/metrics")


class UsageError(ValueError):
    """A URL or option the doctor cannot use. `str()` is one line."""


class Unreachable(Exception):
    """Nothing answered within the deadline, or the connection could not be made at all."""


# -- the base URL ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseURL:
    """http(s)://host[:port][/prefix]: where the daemon's routes live, behind whatever proxy."""

    scheme: str
    host: str  # as connected to: an IDNA name or an IP address, without IPv6 brackets
    port: int
    prefix: str  # "" or "/events" (no trailing slash), already percent-encoded

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        """The Host header: brackets around an IPv6 address, the port only when it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    def target(self, path: str) -> str:
        """The request target for one of the daemon's routes, e.g. "/events/subscribe?event=x"."""
        return self.prefix + path

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://{self.authority}{self.target(path)}"


def parse_base_url(text: str) -> BaseURL:
    """The base URL as given on the command line, or UsageError saying what is wrong with it."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"not a URL: {text!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"the URL must start with http:// or https://, not {text!r}")
    if not parts.hostname:
        raise UsageError(f"the URL has no host: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise UsageError("credentials in the URL are not supported: give tokens with --token / --publish-token")
    if parts.query or parts.fragment:
        raise UsageError(f"give the base URL without ?query or #fragment, not {text!r}")
    path = parts.path.rstrip("/")
    for endpoint in _ENDPOINTS:
        if path.endswith(endpoint):
            raise UsageError(
                f"give the base URL, without {endpoint}: {scheme}://{parts.netloc}{path[: -len(endpoint)]}/"
            )
    try:
        host = parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
    except UnicodeError:
        raise UsageError(f"not a valid host name: {parts.hostname!r}") from None
    return BaseURL(scheme, host, port or (443 if scheme == "https" else 80), quote(path, safe="/%:@!$&'()*+,;=-._~"))


def base_after_redirect(base: BaseURL, location: str, route: str) -> BaseURL | None:
    """Where a redirect of `route` (e.g. "/health") points the base URL, or None when the new location does not
    end in the same route (a login page, say), so the base it implies is unknown."""
    absolute = urljoin(base.url(route), location)
    parts = urlsplit(absolute)
    if parts.query or not parts.path.rstrip("/").endswith(route):
        return None
    try:
        return parse_base_url(absolute[: absolute.rindex(route)] + "/")
    except UsageError:
        return None


# -- what a TLS handshake showed ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TLSInfo:
    alpn: str | None  # the protocol the server chose from what was offered, None when it chose none
    expires: datetime.datetime | None  # the certificate's notAfter (UTC), None when it could not be read
    version: str | None


def certificate_expiry(der: bytes) -> datetime.datetime:
    """The notAfter time of a DER certificate (UTC). Read from the DER itself, so it works when the certificate
    was not verified (--insecure), when ssl.getpeercert() returns nothing. ValueError for anything malformed."""
    certificate, _ = _der_element(der, 0, 0x30)
    tbs, _ = _der_element(certificate, 0, 0x30)
    offset = 0
    if tbs[:1] == b"\xa0":  # [0] EXPLICIT version
        offset = _der_skip(tbs, offset)
    for _ in range(3):  # serialNumber, signature AlgorithmIdentifier, issuer Name
        offset = _der_skip(tbs, offset)
    validity, _ = _der_element(tbs, offset, 0x30)
    not_before_end = _der_skip(validity, 0)
    tag = validity[not_before_end]
    not_after, _ = _der_element(validity, not_before_end, tag)
    text = not_after.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = str(1900 + year if year >= 50 else 2000 + year) + text[2:]
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError(f"notAfter has tag {tag:#x}, not a time")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)


def _der_header(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, length, offset of the contents) of the DER element at `offset`."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[offset], data[offset + 1]
    offset += 2
    if first < 0x80:
        return tag, first, offset
    count = first & 0x7F
    if not 1 <= count <= 4 or offset + count > len(data):
        raise ValueError("bad DER length")
    return tag, int.from_bytes(data[offset : offset + count], "big"), offset + count


def _der_element(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    found, length, start = _der_header(data, offset)
    if found != tag or start + length > len(data):
        raise ValueError(f"expected DER tag {tag:#x} at {offset}, found {found:#x}")
    return data[start : start + length], start + length


def _der_skip(data: bytes, offset: int) -> int:
    _, length, start = _der_header(data, offset)
    return start + length


# -- responses ------------------------------------------------------------------------------------------------


class Head:
    """A response's status line and headers (names lower-cased, in order, repeats kept)."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]]):
        self.status, self.reason, self.headers = status, reason, headers

    def get(self, name: str) -> str | None:
        """The header's value; repeated headers joined with ", " as RFC 9110 allows. None when absent."""
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


def parse_response_head(data: bytes) -> Head:
    """A response head (without its blank line) -> Head. ValueError when it is not HTTP/1.x."""
    lines = data.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit() and len(code) == 3):
        raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers.append((name.strip().lower(), value.strip()))
    return Head(int(code), reason, headers)


@dataclasses.dataclass(frozen=True)
class Response:
    head: Head
    body: bytes
    elapsed: float  # seconds from sending the request to the whole response

    @property
    def status(self) -> int:
        return self.head.status


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


# -- connections ----------------------------------------------------------------------------------------------


class Client:
    """Connections to one base URL. Remembers whether the certificate verified (see the module docstring).

    Methods: handshake(), request(), open_stream(); `verify_error` after any of them."""

    def __init__(self, base: BaseURL, cafile: str | None = None, insecure: bool = False):
        self.base = base
        self.cafile = cafile
        self.insecure = insecure
        self.verify_error: str | None = None  # why the certificate did not verify, once a handshake failed
        self._addresses: list | None = None
        self._contexts: dict[tuple[bool, tuple[str, ...]], ssl.SSLContext] = {}

    @property
    def verifying(self) -> bool:
        return not self.insecure and self.verify_error is None

    def _context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        key = (self.verifying, alpn)
        context = self._contexts.get(key)
        if context is None:
            if self.verifying:
                context = ssl.create_default_context(cafile=self.cafile)
                # As a browser: the name must be in subjectAltName; a CN-only certificate does not match.
                context.hostname_checks_common_name = False
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(list(alpn))
            self._contexts[key] = context
        return context

    def _resolve(self, deadline: float) -> list:
        """The host's addresses, from a helper thread waited for until the deadline (see the module docstring)."""
        if self._addresses is not None:
            return self._addresses
        host, port = self.base.host, self.base.port
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        box: dict = {}
        done = threading.Event()

        def lookup():
            try:
                box["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                box["error"] = exc
            finally:
                done.set()

        if literal:
            lookup()  # no DNS involved: nothing can hang
        else:
            threading.Thread(target=lookup, name="sseserver-doctor-resolve", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise Unreachable(f"the name {host} did not resolve in time")
        if "error" in box:
            exc = box["error"]
            raise Unreachable(f"cannot resolve {host}: {exc.strerror or exc}")
        self._addresses = box["addresses"]
        return self._addresses

    def _tcp(self, deadline: float) -> socket.socket:
        last = None
        addresses = self._resolve(deadline)
        for index, (family, kind, proto, _, address) in enumerate(addresses):
            sock = socket.socket(family, kind, proto)
            try:
                # Each address gets its share of what is left, so one that black-holes (an IPv6 route that goes
                # nowhere) leaves time to try the next.
                sock.settimeout(max(0.001, (deadline - time.monotonic()) / (len(addresses) - index)))
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
                if time.monotonic() >= deadline:
                    break
        if isinstance(last, TimeoutError) or last is None:
            raise Unreachable(f"cannot connect to {self.base.authority}: timed out")
        raise Unreachable(f"cannot connect to {self.base.authority}: {last.strerror or last}")

    def connect(self, deadline: float, alpn: tuple[str, ...] = ("http/1.1",)) -> socket.socket:
        """A connected socket (TLS for https), handshake done. Unreachable when that fails; a certificate that does
        not verify is noted in `verify_error` and the connection is made again without verification."""
        sock = self._tcp(deadline)
        if not self.base.tls:
            return sock
        verifying = self.verifying
        try:
            tls = self._context(alpn).wrap_socket(sock, server_hostname=self.base.host, do_handshake_on_connect=False)
            tls.settimeout(max(0.001, deadline - time.monotonic()))
            tls.do_handshake()
            return tls
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            if not verifying:
                raise Unreachable(f"TLS handshake with {self.base.authority} failed: {exc}") from None
            self.verify_error = exc.verify_message or str(exc)
            return self.connect(deadline, alpn)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            reason = "timed out" if isinstance(exc, TimeoutError) else (getattr(exc, "reason", None) or exc)
            hint = " (does it speak https?)" if "WRONG_VERSION" in str(exc) else ""
            raise Unreachable(f"TLS handshake with {self.base.authority} failed: {reason}{hint}") from None

    def handshake(self, deadline: float) -> TLSInfo:
        """A TLS handshake offering h2 and http/1.1, as a browser does; the connection is closed at once."""
        sock = self.connect(deadline, alpn=("h2", "http/1.1"))
        try:
            assert isinstance(sock, ssl.SSLSocket)  # alpn= is only for https://, which connect() wraps in TLS
            der = sock.getpeercert(binary_form=True)
            try:
                expires = certificate_expiry(der) if der else None
            except (ValueError, IndexError):
                expires = None
            return TLSInfo(sock.selected_alpn_protocol(), expires, sock.version())
        finally:
            sock.close()

    def _send(
        self, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes | None, deadline: float
    ) -> socket.socket:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.base.authority}",
            *(f"{name}: {value}" for name, value in headers),
        ]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        sock = self.connect(deadline)
        try:
            sock.settimeout(remaining(deadline))
            sock.sendall(raw)
        except (OSError, TimeoutError):
            sock.close()
            raise
        return sock

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        deadline: float | None = None,
        timeout: float = 10.0,
    ) -> Response:
        """One request on its own connection (`Connection: close`) -> Response. Unreachable when no connection
        could be made; TimeoutError when the answer did not come by the deadline."""
        deadline = deadline if deadline is not None else time.monotonic() + timeout
        started = time.monotonic()
        sock = self._send(method, self.base.target(path), [*headers, ("Connection", "close")], body, deadline)
        try:
            buffer = bytearray()
            head = _read_head(sock, buffer, deadline)
            if method == "HEAD" or head.status in (204, 304):
                payload = b""
            else:
                payload = _read_body(sock, head, buffer, deadline)
            return Response(head, payload, time.monotonic() - started)
        finally:
            sock.close()

    def open_stream(
        self, path: str, headers: list[tuple[str, str]], deadline: float, keep: frozenset[str] | None = None
    ) -> "Stream":
        """Send a stream's GET and return at once: the Stream's reads wait for its head and body."""
        sock = self._send("GET", self.base.target(path), list(headers), None, deadline)
        return Stream(sock, keep)


def _read_head(sock: socket.socket, buffer: bytearray, deadline: float) -> Head:
    """Read a final response head into Head (interim 1xx responses are skipped); the rest stays in `buffer`."""
    while True:
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > MAX_HEAD:
                raise ValueError("response head too large")
            sock.settimeout(remaining(deadline))
            chunk = sock.recv(_RECV)
            if not chunk:
                raise ConnectionError("the connection closed before a response head")
            buffer += chunk
        raw, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        head = parse_response_head(raw)
        if not 100 <= head.status < 200 or head.status == 101:
            return head


def _read_body(sock: socket.socket, head: Head, buffer: bytearray, deadline: float) -> bytes:
    decoder = ChunkedDecoder() if "chunked" in (head.get("transfer-encoding") or "").lower() else None
    length = head.get("content-length")
    want = int(length) if length and length.isdigit() and decoder is None else None
    body = bytearray()

    def take(data: bytes) -> None:
        body.extend(decoder.feed(data) if decoder else data)

    take(bytes(buffer))
    while not (decoder and decoder.done) and (want is None or len(body) < want) and len(body) <= MAX_BODY:
        sock.settimeout(remaining(deadline))
        chunk = sock.recv(_RECV)
        if not chunk:
            break
        take(chunk)
    return bytes(body[:want] if want is not None else body[:MAX_BODY])


# -- decoding a stream ----------------------------------------------------------------------------------------


class ChunkedDecoder:
    """HTTP/1.1 chunked transfer coding, fed as bytes arrive; `done` after the last chunk. ValueError for a
    malformed size line."""

    def __init__(self):
        self._buffer = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._crlf = False  # the CRLF after a chunk's data is still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self.done:
            if self._left:
                take = min(self._left, len(self._buffer))
                if not take:
                    break
                out += self._buffer[:take]
                del self._buffer[:take]
                self._left -= take
                continue
            if self._crlf:
                if len(self._buffer) < 2:
                    break
                del self._buffer[:2]
                self._crlf = False
            end = self._buffer.find(b"\r\n")
            if end < 0:
                break
            size_text = bytes(self._buffer[:end]).split(b";")[0].strip()
            del self._buffer[: end + 2]
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ValueError(f"bad chunk size {size_text[:20]!r}") from None
            self.done = size == 0  # trailers, if any, mean nothing here
            self._left, self._crlf = size, size > 0
        return bytes(out)


def content_decoder(encoding: str | None) -> Callable[[bytes], bytes] | None:
    """A function that undoes the Content-Encoding, as bytes arrive; identity for none; None when this client
    cannot undo it (br, zstd): then the stream's content cannot be read at all."""
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return lambda data: data
    if coding in ("gzip", "x-gzip", "deflate"):
        # 32 + MAX_WBITS accepts a gzip or a zlib header, and "deflate" in the wild is either.
        decompressor = zlib.decompressobj(32 + zlib.MAX_WBITS)

        def decompress(data: bytes) -> bytes:
            out = decompressor.decompress(data, MAX_BODY)
            if decompressor.unconsumed_tail:  # a compression bomb, not an event stream
                raise ValueError(f"{len(data)} compressed bytes expand to more than {MAX_BODY} bytes")
            return out

        return decompress
    return None


@dataclasses.dataclass(frozen=True)
class Event:
    at: float  # time.monotonic() when its dispatching blank line arrived
    type: str
    data: str
    id: str  # the stream's last event id at that point, as a browser would hold it


class Stream:
    """A GET /subscribe held open. Every read timestamps what it decodes: the head, the first complete body line,
    each event, each comment (heartbeat), any other data, and the end of the stream. `keep`: the event types to
    keep in `events` (None: all); others only count in `other_events`."""

    def __init__(self, sock: socket.socket, keep: frozenset[str] | None = None):
        self.sock = sock
        self.keep = keep
        self.other_events = 0
        self.sent_at = time.monotonic()
        self.head: Head | None = None
        self.head_at: float | None = None
        self.first_line_at: float | None = None
        self.undecodable: str | None = None  # a Content-Encoding this client cannot undo
        self.events: list[Event] = []
        self.comments: list[float] = []  # arrival time of each comment line
        self.activity: list[float] = []  # arrival time of each read that brought any body bytes
        self.retry: int | None = None
        self.last_id = ""
        self.ended_at: float | None = None
        self.error: str | None = None  # why the response could not be read, when it could not
        self._wire = bytearray()
        self._chunked: ChunkedDecoder | None = None
        self._decode: Callable[[bytes], bytes] | None = None
        self._text = bytearray()
        self._data: list[str] = []
        self._data_size = 0
        self._data_seen = False
        self._type = ""

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def read_until(self, predicate: Callable[["Stream"], bool], deadline: float) -> bool:
        """Read until predicate(self) holds (True), or the stream ends or the deadline passes (False)."""
        while not predicate(self):
            if self.ended:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(_RECV)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""  # a reset ends the stream as surely as a FIN
            now = time.monotonic()
            try:
                self._feed(chunk, now)
            except ValueError as exc:  # not HTTP, or broken chunked framing: the stream is over for us
                self.error = str(exc)
                self.ended_at = now
        return True

    def watch(self, until: float) -> None:
        """Read everything that arrives until the time `until` or the end of the stream."""
        self.read_until(lambda _: False, until)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _feed(self, chunk: bytes, now: float) -> None:
        if not chunk:
            self.ended_at = now
            return
        if self.head is None:
            self._wire += chunk
            if b"\r\n\r\n" not in self._wire:
                if len(self._wire) > MAX_HEAD:
                    self.ended_at = now
                return
            raw, _, rest = bytes(self._wire).partition(b"\r\n\r\n")
            self._wire.clear()
            self.head = parse_response_head(raw)
            self.head_at = now
            if "chunked" in (self.head.get("transfer-encoding") or "").lower():
                self._chunked = ChunkedDecoder()
            self._decode = content_decoder(self.head.get("content-encoding"))
            if self._decode is None:
                self.undecodable = self.head.get("content-encoding")
            chunk = rest
        if self._chunked is not None:
            chunk = self._chunked.feed(chunk)
            if self._chunked.done:
                self.ended_at = now
        if not chunk or self._decode is None:
            return
        try:
            text = self._decode(chunk)
        except zlib.error:
            self.undecodable = f"{self.head.get('content-encoding')} (corrupt)"
            self._decode = None
            return  # the head is fine; only the body cannot be read (the compression check names it)
        if text:
            self.activity.append(now)
            self._text += text
            self._lines(now)

    def _lines(self, now: float) -> None:
        """Complete lines, split on CRLF, CR or LF as the WHATWG spec says, interpreted one by one."""
        while True:
            cr, lf = self._text.find(b"\r"), self._text.find(b"\n")
            ends = [index for index in (cr, lf) if index >= 0]
            if not ends:
                if len(self._text) > MAX_BODY:
                    raise ValueError(f"a line longer than {MAX_BODY} bytes")
                return
            end = min(ends)
            if end == cr and end + 1 == len(self._text):
                return  # a CR at the end may be the first half of a CRLF
            skip = 2 if end == cr and self._text[end + 1 : end + 2] == b"\n" else 1
            line = bytes(self._text[:end]).decode("utf-8", "replace")
            del self._text[: end + skip]
            if self.first_line_at is None:
                self.first_line_at = now
            self._interpret(line, now)

    def _interpret(self, line: str, now: float) -> None:
        if line == "":
            kind = self._type or "message"
            if self._data_seen and (self.keep is None or kind in self.keep):
                self.events.append(Event(now, kind, "\n".join(self._data), self.last_id))
            elif self._data_seen:
                self.other_events += 1
            self._data, self._data_seen, self._type, self._data_size = [], False, "", 0
            return
        if line.startswith(":"):
            self.comments.append(now)
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > MAX_BODY:
                raise ValueError(f"an event with more than {MAX_BODY} bytes of data")
            self._data.append(value)  # kept or not is decided at dispatch: `event:` may come after `data:`
            self._data_seen = True
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)

"""The request handler: one connection, its requests one after another, each routed and answered.

Owns: routes, the HTTP responses (and the one place an HTTPError becomes a JSON body), reading publish bodies,
applying the access Policy to each request, and starting a stream: its headers, `retry:`, any reset notice, then
handing the socket to the delivery layer.
Must not know: how events reach sockets after that, how tokens are stored, or how config files are read.

It subclasses BaseHTTPRequestHandler for the shape and its status-phrase table, but replaces its parsing (see
request.py for why) and its response writing: a response is built as one bytes object and sent with one
sendall(), because a keep-alive publisher pays for every system call.
"""

import enum
import functools
import json
import logging
import random
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from . import __version__, access, framing, metrics, page, publishing
from .access import Policy
from .bouncer import EventNames, Refusal
from .errors import ClientGone, HTTPError
from .request import Request, RequestReader, body_length, parse_head

if TYPE_CHECKING:  # server.py imports this module
    from .config import Config
    from .server import SSEServer

log = logging.getLogger("sseserver.http")
access_log = logging.getLogger("sseserver.access")

SERVER_HEADER = f"sseserver/{__version__}"
JSON = "application/json"
HISTORY_LIMIT, HISTORY_MAX_LIMIT = 100, 1000  # events per GET /history answer: default, most
HISTORY_MAX_WAIT = 60.0  # seconds a GET /history?wait= may be held

ROUTES = {
    "/subscribe": ("GET", "OPTIONS"),
    "/history": ("GET", "OPTIONS"),
    "/publish": ("POST", "PUT", "OPTIONS"),
    "/publish/batch": ("POST", "PUT", "OPTIONS"),
    "/health": ("GET", "HEAD", "OPTIONS"),
    "/metrics": ("GET", "HEAD"),
    "/": ("GET", "HEAD"),
}


def _render_status_line(status: int) -> bytes:
    phrase = BaseHTTPRequestHandler.responses.get(status, ("Unknown",))[0]
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii")


_STATUS_LINES = {int(status): _render_status_line(int(status)) for status in BaseHTTPRequestHandler.responses}


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or _render_status_line(status)


# The headers of every event-stream response, a real stream or a turn-away.
STREAM_HEADERS = (
    b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
)


def header_lines(pairs) -> bytes:
    return "".join(f"{name}: {value}\r\n" for name, value in pairs).encode("latin-1")


_SERVER_LINE = f"Server: {SERVER_HEADER}\r\n".encode()


def common_headers(date: bytes, cors: tuple[tuple[str, str], ...] = ()) -> bytes:
    """What every response carries: Server, Date, and the CORS headers for the request's origin."""
    return b"%sDate: %s\r\n%s" % (_SERVER_LINE, date, header_lines(cors) if cors else b"")


def render_response(
    status: int, headers: bytes, body: bytes, keep_alive: bool = False, head_only: bool = False
) -> bytes:
    """The one place a whole response is rendered: the status line, `headers` (complete lines), a
    Content-Length computed from `body`, the Connection header, and the body (left out for HEAD, which still
    says the length a GET would get). Not built here: a live stream's head, whose body ends when the
    connection closes (see stream_head()), and the interim `100 Continue`, which has no headers at all."""
    # RFC 9110 8.6: no Content-Length on a 204 (a CORS preflight's answer); it never has a body.
    length = b"" if status == 204 else b"Content-Length: %d\r\n" % len(body)
    return b"".join(
        (
            status_line(status),
            headers,
            length,
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n",
            b"" if head_only or status == 204 else body,
        )
    )


def stream_head(common: bytes) -> bytes:
    """A live stream's head. Its body ends when the connection closes (no Content-Length, and no chunked
    encoding, which the SSE spec warns about), for HTTP/1.0 and 1.1 alike."""
    return status_line(200) + STREAM_HEADERS + common + b"Connection: close\r\n\r\n"


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def refusal(date: bytes, message: str, retry_after: int) -> bytes:
    """A 503 for a connection that gets no request thread (at the connection limit, or none could be
    started): sent by the accept loop without reading the request, then the connection is closed."""
    headers = common_headers(date) + header_lines((("Content-Type", JSON), ("Retry-After", str(retry_after))))
    return render_response(503, headers, error_body(message))


class Inline(enum.Enum):
    """What the publisher loop does with a parked connection after serve_inline()."""

    DONE = "done"  # answered; the connection stays parked
    RESUME = "resume"  # a thread serves it from here (the request, or the rest of an answer, is waiting)
    CLOSE = "close"  # answered with Connection: close (or the client is gone)


class Handler(BaseHTTPRequestHandler):
    server: "SSEServer"  # the methods it may call are listed in SSEServer's docstring
    config: "Config"  # the config of the request being answered (read once from the policy)
    server_version = SERVER_HEADER
    protocol_version = "HTTP/1.1"

    # -- socketserver's hooks ----------------------------------------------------------------------------------

    def setup(self) -> None:
        # No rfile/wfile: RequestReader reads the socket directly and responses go out with sendall().
        self.connection = self.request
        self.detached = False
        self.busy = False
        self.cors: tuple[tuple[str, str], ...] = ()
        self.body_pending = False
        self.started = time.monotonic()
        self.current_request: Request | None = None  # the Request being answered, for the access log
        # The publisher loop (publisher_loop.py): `parkable` after a request that may be followed by more of its
        # kind there, `inline` while the loop's thread answers a request, `unsent`, what of that answer the
        # socket could not take at once, and `idle_since`, the end of its last request there.
        self.parkable = False
        self.inline = False
        self.unsent = b""
        self.idle_since = 0.0
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a unix socket from socket activation): nothing to tune
        self.reader = RequestReader(self.connection)
        peer = self.client_address
        self.peer = peer[0] if isinstance(peer, tuple) and peer else "local"

    def handle(self) -> None:
        self.server.track(self)
        self._serve_on_thread(first=True)

    def resume(self) -> None:
        """Serve a parked connection on a thread again (the publisher loop met a request it does not answer, or
        an answer the socket could not take at once): the rest of that answer first, then the connection loop.
        The connection is closed here, as socketserver closes the ones it started, unless it parks again."""
        if not self._serve_on_thread(first=False):
            self.server.shutdown_request(self.connection)

    def _serve_on_thread(self, first: bool) -> bool:
        """The connection loop on this thread. True when the connection was parked: from that moment it is the
        publisher loop's (which may already have given it to another thread), and this thread must not touch
        it."""
        parked = False
        try:
            if self.unsent:  # the rest of an answer the writer's thread could not send at once
                unsent, self.unsent = self.unsent, b""
                self.connection.sendall(unsent)
                if not self.keep_open:  # that answer said `Connection: close`
                    return False
            parked = self._serve_connection(first)
        except (ClientGone, ConnectionError, TimeoutError):
            pass
        except OSError as exc:
            log.debug("connection from %s ended: %s", self.peer, exc)
        finally:
            if not parked:  # a parked connection stays tracked: the loop has it now
                self.server.untrack(self)
        return parked

    def finish(self) -> None:
        pass  # nothing buffered to flush; socketserver closes the socket unless it was handed off

    # -- the connection loop -----------------------------------------------------------------------------------

    def _serve_connection(self, first: bool) -> bool:
        """Requests one after another until the connection closes (False) or is parked (True)."""
        while not self.detached:
            config = self.config = self.server.config  # until a request reads the policy (_serve_request)
            wait = config.request_timeout if first else config.keepalive_timeout
            first = False
            try:
                head = self.reader.read_head(wait, config.request_timeout, config.max_header_bytes)
            except HTTPError as error:
                self._send_error(error, None)
                return False
            if head is None:
                return False
            self.started = time.monotonic()
            self.current_request = None
            self.busy = True
            try:
                keep_open = self._serve_request(head)
            finally:
                self.busy = False
                self.server.request_finished()
            if not keep_open:
                return False
            # A publisher waits for its next publish in the publisher loop, without a thread (publisher_loop.py).
            if self.parkable and not self.reader.buffer and self.server.park(self):
                return True
        return False

    def serve_inline(self) -> Inline:
        """On the publisher loop's thread: answer the buffered request if it is a single publish that waits for
        nothing (see publisher_loop.py for which those are) and has arrived whole; anything else is left in the
        buffer for a thread (Inline.RESUME), which then keeps the request's deadline and answers its errors."""
        config = self.server.config
        reader = self.reader
        peeked = reader.peek_head(config.max_header_bytes)
        if peeked is None:
            return Inline.RESUME
        head, head_size = peeked
        try:  # a bad head or body length is answered by the thread, which says what is wrong
            request = parse_head(head, config.max_header_bytes)
            length = body_length(request, config.max_message_bytes)
        except HTTPError:
            return Inline.RESUME
        headers = request.headers
        if (
            request.path != "/publish"
            or request.method not in ("POST", "PUT")
            or length is None  # chunked
            or "expect" in headers
            or "idempotency-key" in headers
            or len(reader.buffer) - head_size < length
        ):
            return Inline.RESUME
        reader.consume(head_size)
        self.started = time.monotonic()
        self.busy = self.inline = True
        try:
            keep_open = self._serve_request(head, request)
        finally:
            self.busy = self.inline = False
            self.server.request_finished()
        if self.unsent:  # a thread sends the rest, then closes the connection if the answer said so
            return Inline.RESUME
        if not keep_open:
            return Inline.CLOSE
        return Inline.DONE if self.parkable else Inline.RESUME

    def _serve_request(self, head: bytes, parsed: Request | None = None) -> bool:
        """Answer one request (`parsed`: its head, when the caller parsed it already); False when the connection
        must close afterwards (as the response said)."""
        policy = self.server.policy  # read once: a reload mid-request cannot mix two configs
        config = self.config = policy.config  # what _turn_away() and _account() read too
        request = None
        self.cors = ()
        self.body_pending = False
        self.parkable = False
        self.keep_open = False  # set by _respond(), the one place that writes the Connection header
        try:
            request = parsed or parse_head(head, config.max_header_bytes)
            self.current_request = request
            headers = request.headers
            # A body we never read would be parsed as the next request: such a connection must close.
            self.body_pending = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
            self.cors = policy.cors(headers.get("origin"))
            methods = ROUTES.get(request.path)
            if methods is None or (request.path == "/" and not config.demo_page):
                raise HTTPError(404, f"no such path: {request.path}")
            if request.method not in methods:
                raise HTTPError(405, f"{request.method} is not allowed here", headers=(("Allow", ", ".join(methods)),))
            client = access.client_address(self.peer, request.headers, policy.trusted)
            if request.method == "OPTIONS":
                self._preflight(methods)
            elif request.path == "/publish":
                self._publish(request, policy, client)
            elif request.path == "/publish/batch":
                self._publish_batch(request, policy, client)
            elif request.path == "/subscribe":
                self._subscribe(request, policy, client)
            elif request.path == "/history":
                self._history(request, policy, client)
            elif request.path == "/metrics":
                access.authorize(policy.metrics_tokens, access.bearer_token(headers), client, "metrics")
                self._respond(200, metrics.render(self.server.metric_families()).encode("utf-8"), metrics.CONTENT_TYPE)
            elif request.path == "/":
                self._respond(200, page.HTML, "text/html; charset=utf-8", page.HEADERS)
            else:
                self._health()
        except HTTPError as error:
            self._send_error(error, request)
        except (ClientGone, ConnectionError, TimeoutError):
            return False
        except BlockingIOError:
            # SO_SNDTIMEO ran out in sendall() (EAGAIN on a blocking socket): the client is not reading what it
            # asked for, e.g. it pipelines requests without reading answers. That is a timeout, not our bug.
            log.debug("connection from %s: response not read in time; closing", self.peer)
            return False
        except Exception:
            log.exception("internal error serving %s", request.path if request else "a request")
            self._send_error(HTTPError(500, "internal error", close=True), request)
        return self.keep_open

    # -- routes ------------------------------------------------------------------------------------------------

    def _preflight(self, methods: tuple[str, ...]) -> None:
        """A CORS preflight. An origin not on the list gets a 204 without CORS headers, which the browser
        treats as a refusal."""
        headers = access.preflight_headers(self.cors, methods) + (("Allow", ", ".join(methods)),)
        self.cors = ()  # already part of `headers`
        self._respond(204, b"", None, headers)

    def _publish(self, request: Request, policy: Policy, client: str) -> None:
        """POST /publish: what a publish means is publishing.py's; this reads the body and answers."""
        if self.server.stopping:
            raise HTTPError(503, "shutting down", headers=(("Retry-After", "1"),), close=True)
        grant = publishing.authorize(policy, request.headers, client)
        name = publishing.event_name(request.query_values("event"), grant)
        key = publishing.idempotency_key(request.headers.get("idempotency-key"), policy, grant)
        body = self._read_body(request, policy.config.max_message_bytes, "max_message_bytes")
        publishing.check_rate(policy, grant)
        data = publishing.body_text(body)
        if key is None:
            reply = publishing.publish(self.server, data, name)
            self.parkable = True
        else:
            reply = publishing.publish_keyed(self.server, data, name, key)
        self._respond(200, reply, JSON)

    def _publish_batch(self, request: Request, policy: Policy, client: str) -> None:
        """POST /publish/batch: NDJSON, one event per line, published all or none (see publishing.py)."""
        if self.server.stopping:
            raise HTTPError(503, "shutting down", headers=(("Retry-After", "1"),), close=True)
        if "idempotency-key" in request.headers:
            # A header for the whole batch would be silently ignored, and the publisher would think its retries
            # safe: keys go on the lines, where each event gets its own.
            raise HTTPError(400, "a batch takes idempotency_key on each line, not an Idempotency-Key header")
        grant = publishing.authorize(policy, request.headers, client)
        config = policy.config
        body = self._read_body(request, config.max_batch_bytes, "max_batch_bytes")
        publishing.check_rate(policy, grant)
        drafts, lines = publishing.parse_batch(body, policy, grant, config.max_message_bytes)
        self._respond(200, publishing.publish_batch(self.server, drafts, lines), JSON)

    def _read_body(self, request: Request, limit: int, limit_name: str) -> bytes:
        """A publish body of at most `limit` bytes (413 naming the config key beyond it)."""
        length = body_length(request, limit, limit_name)
        if request.headers.get("expect", "").lower() == "100-continue":
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.reader.read_body(length, limit, limit_name)
        self.body_pending = False
        return body

    def _health(self) -> None:
        server = self.server
        status = 503 if server.stopping else 200
        self._respond(status, json.dumps(server.health()).encode("utf-8"), JSON)

    def _reader_filter(self, request: Request, policy: Policy, client: str) -> EventNames:
        """The event filter of a reader (/subscribe, /history): its ?event= names within its token's scope."""
        return self._reader_access(request, policy, client)[0]

    def _reader_access(self, request: Request, policy: Policy, client: str) -> tuple[EventNames, bytes]:
        """A reader's filter and the digest of the token it presented (b"" for none): a stream keeps the digest
        so that an upgrade in place can check it against the next process's tokens."""
        names = request.query_values("event")
        for name in names:
            if not framing.EVENT_NAME.fullmatch(name):
                raise HTTPError(400, f"bad event name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
        token = access.bearer_token(request.headers)
        if token is None:
            token = request.query_value("token")  # EventSource cannot set headers
        grant = access.authorize(policy.subscribe_tokens, token, client, "subscribe")
        return access.stream_filter(names, grant.scope), grant.credential

    def _history(self, request: Request, policy: Policy, client: str) -> None:
        """Catch up without a stream: JSON of the retained events after ?after=, optionally held (?wait=) until
        one arrives. A held request is an ordinary connection (max_connections), never a subscriber."""
        wanted = self._reader_filter(request, policy, client)
        limit = _query_number(request, "limit", int, HISTORY_LIMIT, 1, HISTORY_MAX_LIMIT)
        wait = _query_number(request, "wait", float, 0.0, 0.0, HISTORY_MAX_WAIT)
        page = self.server.history_page(
            wanted, _single_query_value(request, "after"), limit, wait, lambda: _client_gone(self.connection)
        )
        if page is None:
            raise ClientGone  # hung up while held: nobody to answer
        body = json.dumps(
            {
                "events": [{"id": str(event.id), "event": event.name, "data": event.data} for event in page.events],
                "oldest_id": None if page.oldest_id is None else str(page.oldest_id),
                "last_id": str(page.last_id),
                "reset": page.reset,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        self._respond(200, body, JSON, (("Cache-Control", "no-store"),))

    def _subscribe(self, request: Request, policy: Policy, client: str) -> None:
        server = self.server
        config = policy.config
        wanted, credential = self._reader_access(request, policy, client)
        last_event_id = request.headers.get("last-event-id")
        if last_event_id is not None:
            # EventSource sends the id as UTF-8 and the parser keeps header octets as latin-1: decode it the way
            # the browser meant it, so a reset echoes back what the page holds (any non-digit id is reset anyway).
            last_event_id = last_event_id.encode("latin-1").decode("utf-8", "replace")
        else:
            last_event_id = request.query_value("last_event_id")  # first connect only; the header wins after
        if server.stopping:
            self._turn_away(request, "shutting down")
            return
        replay = server.subscribe(wanted, last_event_id, client, config)
        if isinstance(replay, Refusal):
            self._turn_away(request, replay.value)
            return
        server.hand_over(self)  # counted as a stream from here on, never as both a stream and a request
        preamble = [stream_head(self._common_headers()), framing.encode_retry(config.retry_ms)]
        if replay.reset is not None:
            preamble.append(replay.reset)
        sock = self.connection
        self._account(request, 200, 0)
        try:
            self.reader.set_timeout(config.request_timeout)
            sock.sendall(b"".join(preamble))
            stream = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        except OSError:
            server.abandon_stream(replay)
            return
        self.detached = True
        server.start_stream(replay, stream, credential)

    # -- responses ---------------------------------------------------------------------------------------------

    def _turn_away(self, request: Request, why: str) -> None:
        """No room (or stopping). A browser gets 200, a jittered `retry:` and an end of stream, because any
        non-200 makes EventSource give up for good; other clients get 503 with Retry-After."""
        retry_ms = self.config.retry_ms
        if "text/event-stream" in request.headers.get("accept", ""):
            retry = framing.encode_jittered_retry(retry_ms, random.random())
            self._account(request, 200, len(retry))
            self.connection.sendall(render_response(200, STREAM_HEADERS + self._common_headers(), retry))
            return
        seconds = max(1, (retry_ms + 999) // 1000)
        raise HTTPError(503, why, headers=(("Retry-After", str(seconds)),), close=True)

    def _common_headers(self) -> bytes:
        return common_headers(self.server.http_date(), self.cors)

    def _respond(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        extra: tuple[tuple[str, str], ...] = (),
        close: bool = False,
    ) -> None:
        """Send a whole response to the current request. Whether the connection stays open is decided here,
        once, and both the Connection header and the connection loop follow it: not when the client or the
        error asks to close, not while stopping, and not when a body was left unread (it would be taken for
        the next request)."""
        request = self.current_request
        keep_alive = self.keep_open = (
            not close
            and request is not None
            and request.keep_alive
            and not self.body_pending
            and not self.server.stopping
        )
        head_only = request is not None and request.method == "HEAD"
        headers = self._common_headers() + _content_type_line(content_type) + (header_lines(extra) if extra else b"")
        self._account(self.current_request, status, 0 if head_only else len(body))
        response = render_response(status, headers, body, keep_alive, head_only)
        if self.inline:
            # The publisher loop's thread never waits for one client: what the socket does not take now is
            # sent by the thread the connection resumes on (serve_inline() returns RESUME).
            try:
                sent = self.connection.send(response, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            self.unsent = response[sent:]
        else:
            # The reader keeps a timeout on the socket (at most keepalive_timeout); sendall() reuses it.
            self.connection.sendall(response)

    def _account(self, request, status: int, size: int) -> None:
        """Every response passes here once: the status counter, and the access log line if it is on."""
        server = self.server
        server.count_status(status)
        if self.config.access_log:
            if isinstance(request, Request):
                what = f"{request.method} {_without_token(request)}"
            else:
                what = "-"  # the request could not be parsed
            access_log.info(
                '%s "%s" %d %dB %.1fms', self.peer, what, status, size, (time.monotonic() - self.started) * 1000
            )

    def _send_error(self, error: HTTPError, request: Request | None) -> None:
        self.current_request = request
        try:
            self._respond(error.status, error_body(error.message), JSON, error.headers, close=error.close)
        except OSError:
            pass  # the client is gone; nothing to tell it

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.info("%s " + format, self.peer, *args)


@functools.cache
def _content_type_line(content_type: str | None) -> bytes:
    return header_lines((("Content-Type", content_type),)) if content_type else b""


def _single_query_value(request: Request, name: str) -> str | None:
    """A query parameter that may appear at most once (a repeat is a 400, never silently the first)."""
    values = request.query_values(name)
    if len(values) > 1:
        raise HTTPError(400, f"give {name} at most once")
    return values[0] if values else None


def _query_number(request: Request, name: str, kind, default, low, high):
    """A numeric query parameter within [low, high], or its default when absent; 400 otherwise. Plain ASCII
    digits (with one decimal point for a float): not the underscores, spaces and other scripts' digits that
    int() and float() would also take."""
    text = _single_query_value(request, name)
    if text is None:
        return default
    whole, point, fraction = text.partition(".")
    plain = (
        whole.isascii()
        and whole.isdigit()
        and (not point or (kind is float and fraction.isascii() and fraction.isdigit()))
    )
    value = kind(text) if plain else None
    if value is None or not low <= value <= high:
        raise HTTPError(400, f"{name} must be a number from {low} to {high}")
    return value


def _client_gone(sock: socket.socket) -> bool:
    """Whether the peer closed or reset the connection, without consuming what it may have sent (a pipelined
    next request): one non-blocking peek."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _without_token(request: Request) -> str:
    """The request target with any `token` query parameter removed: tokens never reach a log. Judged by the
    decoded name, the one the server reads the token by, so `?tok%65n=...` is removed too."""
    if not any(key == "token" for key, _ in request.query):
        return request.target
    kept = [(key, value) for key, value in request.query if key != "token"]
    return request.target.partition("?")[0] + ("?" + urlencode(kept) if kept else "")

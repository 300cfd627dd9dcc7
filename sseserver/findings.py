"""The doctor's judgements: given what was observed (timings, headers, statuses), what is the finding.

Owns: the checks and their order, the thresholds, the causes a problem or warning names, the exact fix for each
cause, and the exit code. Every judgement is a pure function of numbers and strings, so each is unit-tested on
its own, without a network.
Must not know: sockets, TLS, HTTP parsing (probe.py observes), argv or output formats (doctor.py).

Deliberate choices, so nobody "fixes" them:
- A check that cannot be observed because an earlier one failed is SKIPPED with the reason, never a problem: a
  buffered stream hides heartbeats and replay too, but the one cause to fix is the buffering. So the doctor
  names each cause once, and only causes it saw.
- A delay on a compressed stream is blamed on the compression (a compressor holds bytes until its block fills),
  a delay on an uncompressed one on buffering.
- `X-Accel-Buffering` is not checked: nginx consumes it and never passes it on, so its absence behind nginx says
  nothing.
"""

import dataclasses
import datetime
import enum
from typing import cast

# The promise: headers, first line and a probe event each arrive within this long.
PROMPT_S = 1.0
# A certificate that expires within this many days is a warning.
EXPIRY_WARNING_DAYS = 14
# Idle timeouts that common proxies and load balancers impose (AWS ALB 60 s, Cloudflare 100 s): a heartbeat
# interval at or above the shortest of them is a warning even when this path survives it.
COMMON_IDLE_TIMEOUT_S = 60.0
# The daemon's settings when /health does not report them (an older daemon): its built-in defaults.
DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_RETRY_MS = 3000
MAX_WATCH_S = 120.0
# A stream that ends sooner than this after its last data was ended on purpose, not cut for idleness (no proxy's
# idle timeout is that short).
ENDED_AT_ONCE_S = 0.5


class Status(enum.Enum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"
    SKIPPED = "skipped"


class Check(enum.Enum):
    """Every check, in the order the doctor reports them."""

    HEALTH = "health"
    TLS = "tls"
    HTTP_VERSION = "http_version"
    STREAM = "stream"
    FIRST_BYTES = "first_bytes"
    COMPRESSION = "compression"
    CACHE_CONTROL = "cache_control"
    CORS_SUBSCRIBE = "cors_subscribe"
    PUBLISH = "publish"
    DELIVERY = "delivery"
    HEARTBEAT = "heartbeat"
    REPLAY = "replay"
    CORS_PREFLIGHT = "cors_preflight"


class Cause(enum.Enum):
    """What a problem or warning blames, and the exact fix. The value is (name, fix)."""

    BUFFERING = (
        "buffering",
        "A proxy buffers the stream and passes events on in batches. nginx: "
        "`proxy_buffering off;` in the location that proxies /subscribe, and no `proxy_ignore_headers "
        "X-Accel-Buffering` (sseserver sends `X-Accel-Buffering: no`). Other proxies and CDNs: turn "
        "response buffering off for text/event-stream (Apache: `flushpackets=on` on the ProxyPass).",
    )
    COMPRESSION = (
        "compression",
        "Something compresses the stream; a compressor holds bytes until its block "
        "fills. nginx: remove text/event-stream from `gzip_types` (or `gzip off;` in the location "
        "that proxies /subscribe), likewise `brotli_types`. Middleware in front (Starlette "
        "GZipMiddleware, Express compression, Next.js compress) must skip text/event-stream.",
    )
    READ_TIMEOUT = (
        "read_timeout",
        "A proxy cuts idle streams before the heartbeat comes. nginx: "
        "`proxy_read_timeout 1h;` (anything well above heartbeat_interval); other proxies: raise their "
        "idle timeout, or set heartbeat_interval in sseserver.toml below the shortest idle timeout on "
        "the path (AWS ALB 60 s, Cloudflare 100 s) and reload with SIGHUP.",
    )
    HEARTBEAT_LOST = (
        "heartbeat_lost",
        "Heartbeats (`:` comment lines) do not reach the client: a proxy holds or "
        "strips them, so idle streams look dead and idle timeouts cut them. nginx: "
        "`proxy_buffering off;`, no `gzip` for text/event-stream, no body filter (`sub_filter`) on "
        "/subscribe; other proxies: pass the response through unmodified and unbuffered.",
    )
    LONG_HEARTBEAT = (
        "long_heartbeat",
        "heartbeat_interval is at or above common proxy idle timeouts (AWS ALB "
        "60 s, Cloudflare 100 s): set `heartbeat_interval = 15.0` in sseserver.toml (SIGHUP reloads).",
    )
    STREAM_CLOSED = (
        "stream_closed",
        "The stream was ended right after data, not for idleness: the daemon ends "
        "streams this way (with a `retry:`) when it is stopping or max_subscribers / "
        "max_subscribers_per_ip is reached; otherwise look in the proxy's error log.",
    )
    NOT_DELIVERED = (
        "not_delivered",
        "The stream opened promptly but the probe never reached it: either a proxy "
        "passes the head and holds events (see the buffering fix), or the URL balances over several "
        "sseserver instances that do not share events: give each the same redis_url in sseserver.toml.",
    )
    LAST_EVENT_ID = (
        "last_event_id",
        "The Last-Event-ID request header does not reach the daemon, so a "
        "reconnecting browser cannot resume where it was. nginx forwards it by default: remove "
        '`proxy_set_header Last-Event-ID "";` (or write `proxy_set_header Last-Event-ID '
        "$http_last_event_id;`); other proxies: forward the header.",
    )
    REPLAY_BROKEN = (
        "replay_broken",
        "A missed event was not replayed on reconnect, by header or by "
        "?last_event_id=: check that every instance behind the URL shares one history (redis_url) "
        "and that the proxy does not rewrite /subscribe's query string.",
    )
    HISTORY = (
        "history",
        "The daemon no longer held the probe's id when the doctor reconnected, so a reconnecting "
        "browser gets sseserver.reset instead of the events it missed: raise history_size in sseserver.toml.",
    )
    HTTP1 = (
        "http1",
        "Browsers open at most 6 HTTP/1.1 connections per origin, so a 7th tab's stream hangs "
        "silently. Serve HTTP/2 to browsers. nginx: `listen 443 ssl http2;` (nginx >= 1.25.1: `http2 on;`).",
    )
    PLAIN_HTTP = (
        "plain_http",
        "Browsers speak HTTP/1.1 to a plain http:// origin, which allows 6 streams per "
        'origin. Put TLS and HTTP/2 in front (see "Running behind nginx" in the README).',
    )
    CORS = (
        "cors",
        "Add the page's origin to `cors_origins` in sseserver.toml, e.g. `cors_origins = "
        '["https://app.example.com"]`, and reload with SIGHUP; a proxy in front must neither strip the '
        "Access-Control-* headers nor answer OPTIONS itself.",
    )
    CACHE_CONTROL = (
        "cache_control",
        "The stream's `Cache-Control: no-cache` does not reach the client, so a cache "
        "on the path may store it. nginx: `proxy_cache off;`, and no `expires`, `add_header "
        "Cache-Control` or `proxy_hide_header Cache-Control` for /subscribe; CDNs: bypass the cache for "
        "/subscribe.",
    )
    SUBSCRIBE_TOKEN = (
        "subscribe_token",
        "The daemon wants a subscribe token: run the doctor with `--token TOKEN` "
        "(an entry of subscribe_tokens); browsers pass it as `/subscribe?token=...`.",
    )
    PUBLISH_TOKEN = (
        "publish_token",
        "The daemon wants a publish token: run the doctor with `--publish-token TOKEN` (an entry of publish_tokens).",
    )
    TOKEN_REFUSED = (
        "token_refused",
        "The token was refused (403): check it against subscribe_tokens / "
        "publish_tokens, and that its event patterns allow the probe's name (`--event NAME`).",
    )
    NOT_SSE = (
        "not_sse",
        "No event stream at <URL>/subscribe: give the base URL that proxies to sseserver (the "
        "one where /subscribe and /publish live), and check that the proxy routes /subscribe to it.",
    )
    UPSTREAM = (
        "upstream",
        "The proxy could not get an answer from sseserver: check that the daemon runs and that "
        'the proxy\'s upstream points at its address (nginx error log: "connect() failed").',
    )
    REJECTED = (
        "rejected",
        "The request was refused: the status and body say why (the daemon answers JSON "
        '{"error": ...}: a limit, a shutdown; a 400 from nginx may mean http:// sent to an https port).',
    )
    SETTINGS_UNKNOWN = (
        "settings_unknown",
        "/health did not report heartbeat_interval and retry_ms (an older "
        "sseserver, or the proxy does not route /health): the doctor assumed the defaults. Route "
        "/health to sseserver, or upgrade it.",
    )
    STOPPING = (
        "stopping",
        'The daemon is shutting down (/health says "stopping"): run the doctor again once it has restarted.',
    )
    REDIRECT = (
        "redirect",
        "The URL redirects. EventSource follows redirects, but every connect and reconnect pays "
        "for the extra round trip: point clients at the final URL.",
    )
    TLS_INVALID = (
        "tls_invalid",
        "Browsers refuse this certificate: install one issued for this host name by a "
        "CA browsers trust, with its whole chain (nginx: `ssl_certificate` holds the certificate "
        "followed by the intermediates). To trust a private CA in the doctor: --cacert FILE.",
    )
    TLS_UNVERIFIED = (
        "tls_unverified",
        "--insecure: the certificate was not verified. Drop --insecure (or give "
        "--cacert FILE) to check it as a browser would.",
    )
    TLS_EXPIRY = (
        "tls_expiry",
        "Renew the certificate before it expires (certbot renew, or your CA's process) and reload the proxy.",
    )

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def fix(self) -> str:
        return self.value[1]


@dataclasses.dataclass(frozen=True)
class Finding:
    check: Check
    status: Status
    figure: str  # what was measured, in words and numbers
    cause: Cause | None = None
    values: dict = dataclasses.field(default_factory=dict)  # the measured figures, for --json


def ok(check: Check, figure: str, **values) -> Finding:
    return Finding(check, Status.OK, figure, None, values)


def warning(check: Check, figure: str, cause: Cause, **values) -> Finding:
    return Finding(check, Status.WARNING, figure, cause, values)


def problem(check: Check, figure: str, cause: Cause, **values) -> Finding:
    return Finding(check, Status.PROBLEM, figure, cause, values)


def skipped(check: Check, why: str) -> Finding:
    return Finding(check, Status.SKIPPED, why)


def exit_code(findings: list[Finding]) -> int:
    """0 when nothing is a problem (warnings allowed), 1 otherwise."""
    return 1 if any(f.status is Status.PROBLEM for f in findings) else 0


def ms(seconds: float | None) -> float | None:
    """Milliseconds, to a tenth below 10 ms (a local hop takes less than one)."""
    if seconds is None:
        return None
    value = seconds * 1000
    return round(value, 1) if value < 10 else round(value)


# -- settings from /health ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    heartbeat_interval: float
    retry_ms: int
    reported: bool  # False: /health did not say, these are the defaults


def judge_health(
    status: int | None,
    body: object,
    elapsed: float,
    redirected_to: str | None = None,
) -> tuple[Finding, Settings]:
    """/health's answer -> the finding and the settings to expect. `body` is the parsed JSON (anything else when
    it was not JSON)."""
    fields = body if isinstance(body, dict) else {}
    heartbeat, retry = fields.get("heartbeat_interval"), fields.get("retry_ms")
    reported = (
        isinstance(heartbeat, (int, float))
        and not isinstance(heartbeat, bool)
        and heartbeat > 0
        and isinstance(retry, int)
        and not isinstance(retry, bool)
        and retry >= 0
    )
    settings = (
        Settings(float(cast(float, heartbeat)), cast(int, retry), True)
        if reported
        else Settings(DEFAULT_HEARTBEAT_S, DEFAULT_RETRY_MS, False)
    )
    values = {
        "status": status,
        "ms": ms(elapsed),
        "heartbeat_interval": settings.heartbeat_interval,
        "retry_ms": settings.retry_ms,
        "reported": reported,
    }
    figure = f"{status} in {ms(elapsed)} ms"
    if fields.get("status") == "stopping":
        return problem(Check.HEALTH, figure + ", the daemon is stopping", Cause.STOPPING, **values), settings
    if redirected_to:
        return warning(
            Check.HEALTH,
            f"{figure} after a redirect to {redirected_to}",
            Cause.REDIRECT,
            redirected_to=redirected_to,
            **values,
        ), settings
    if not reported:
        return warning(
            Check.HEALTH,
            f"{figure}, no heartbeat_interval / retry_ms in it: assuming "
            f"{DEFAULT_HEARTBEAT_S:g} s / {DEFAULT_RETRY_MS} ms",
            Cause.SETTINGS_UNKNOWN,
            **values,
        ), settings
    if settings.heartbeat_interval >= COMMON_IDLE_TIMEOUT_S:
        return warning(
            Check.HEALTH,
            f"{figure}; heartbeat_interval {settings.heartbeat_interval:g} s",
            Cause.LONG_HEARTBEAT,
            **values,
        ), settings
    return ok(
        Check.HEALTH,
        f"{figure}; heartbeat_interval {settings.heartbeat_interval:g} s, retry_ms {settings.retry_ms}",
        **values,
    ), settings


def default_watch(settings: Settings) -> float:
    """Three heartbeat intervals, at most MAX_WATCH_S."""
    return min(MAX_WATCH_S, 3 * settings.heartbeat_interval)


# -- TLS and the HTTP version ---------------------------------------------------------------------------------


def judge_tls(
    tls: bool, verify_error: str | None, insecure: bool, expires: datetime.datetime | None, now: datetime.datetime
) -> Finding:
    if not tls:
        return skipped(Check.TLS, "plain http: no certificate")
    days = None if expires is None else (expires - now).total_seconds() / 86400
    when = "expiry unknown" if expires is None else f"expires {expires:%Y-%m-%d} (in {days:.0f} days)"
    values = {
        "verified": verify_error is None and not insecure,
        "verify_error": verify_error,
        "expires": None if expires is None else expires.isoformat(),
        "days_left": None if days is None else round(days, 1),
    }
    if verify_error:
        return problem(Check.TLS, f"certificate does not verify: {verify_error}; {when}", Cause.TLS_INVALID, **values)
    if days is not None and days <= 0:
        return problem(Check.TLS, f"certificate expired {expires:%Y-%m-%d}", Cause.TLS_EXPIRY, **values)
    if insecure:
        return warning(Check.TLS, f"certificate not verified (--insecure); {when}", Cause.TLS_UNVERIFIED, **values)
    if days is not None and days < EXPIRY_WARNING_DAYS:
        return warning(Check.TLS, f"certificate valid, {when}", Cause.TLS_EXPIRY, **values)
    return ok(Check.TLS, f"certificate valid, {when}", **values)


def judge_http_version(tls: bool, alpn: str | None) -> Finding:
    if not tls:
        return warning(
            Check.HTTP_VERSION, "plain http: browsers use HTTP/1.1 (6 streams per origin)", Cause.PLAIN_HTTP, alpn=None
        )
    if alpn == "h2":
        return ok(Check.HTTP_VERSION, "HTTP/2 offered (ALPN h2)", alpn=alpn)
    return warning(
        Check.HTTP_VERSION,
        f"no HTTP/2: ALPN chose {alpn or 'nothing'} when offered h2, http/1.1 "
        "(browsers then allow 6 streams per origin)",
        Cause.HTTP1,
        alpn=alpn,
    )


# -- the stream's response ------------------------------------------------------------------------------------


def judge_stream(status: int | None, content_type: str | None, waited: float) -> Finding:
    """The answer to GET /subscribe: 200 text/event-stream, or why not (EventSource gives up on anything else)."""
    if status is None:
        return skipped(Check.STREAM, f"no response head within {waited:g} s (see first_bytes)")
    essence = (content_type or "").split(";")[0].strip().lower()
    figure = f"{status}, Content-Type {content_type or '(none)'}"
    values = {"status": status, "content_type": content_type}
    if status == 200 and essence == "text/event-stream":
        return ok(Check.STREAM, figure, **values)
    cause = {
        401: Cause.SUBSCRIBE_TOKEN,
        403: Cause.TOKEN_REFUSED,
        404: Cause.NOT_SSE,
        405: Cause.NOT_SSE,
        502: Cause.UPSTREAM,
        504: Cause.UPSTREAM,
    }.get(status)
    if cause is None:
        cause = Cause.NOT_SSE if status < 400 else Cause.REJECTED
    return problem(
        Check.STREAM, figure + " (EventSource gives up on anything but 200 text/event-stream)", cause, **values
    )


def delay_cause(content_encoding: str | None) -> Cause:
    """Who holds the bytes: a compressor when the stream is compressed, otherwise a buffer."""
    coding = (content_encoding or "identity").strip().lower()
    return Cause.BUFFERING if coding == "identity" else Cause.COMPRESSION


def judge_first_bytes(
    head_s: float | None, first_line_s: float | None, waited: float, content_encoding: str | None
) -> Finding:
    """The head and the first body line (the `retry:` line) must both arrive within PROMPT_S of the request,
    before any event was published."""
    values = {"headers_ms": ms(head_s), "first_line_ms": ms(first_line_s)}
    heads = "no headers" if head_s is None else f"headers in {ms(head_s)} ms"
    line = f"no first line within {waited:g} s" if first_line_s is None else f"first line in {ms(first_line_s)} ms"
    figure = f"{heads}, {line}"
    if head_s is None or head_s >= PROMPT_S or first_line_s is None or first_line_s >= PROMPT_S:
        return problem(
            Check.FIRST_BYTES,
            figure + " (both must arrive at once, before any event)",
            delay_cause(content_encoding),
            **values,
        )
    return ok(Check.FIRST_BYTES, figure, **values)


def judge_compression(content_encoding: str | None, asked: str) -> Finding:
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity":
        return ok(
            Check.COMPRESSION, f"no Content-Encoding (asked with Accept-Encoding: {asked})", content_encoding=None
        )
    return problem(
        Check.COMPRESSION, f"Content-Encoding: {content_encoding}", Cause.COMPRESSION, content_encoding=content_encoding
    )


def judge_cache_control(value: str | None) -> Finding:
    directives = {part.strip().split("=")[0].lower() for part in (value or "").split(",")}
    if directives & {"no-cache", "no-store"}:
        return ok(Check.CACHE_CONTROL, f"Cache-Control: {value}", cache_control=value)
    return problem(
        Check.CACHE_CONTROL,
        f"Cache-Control: {value or '(none)'}, not no-cache",
        Cause.CACHE_CONTROL,
        cache_control=value,
    )


def judge_cors_subscribe(origin: str, allow_origin: str | None) -> Finding:
    values = {"origin": origin, "allow_origin": allow_origin}
    if allow_origin in (origin, "*"):
        return ok(Check.CORS_SUBSCRIBE, f"Access-Control-Allow-Origin: {allow_origin}", **values)
    seen = f"Access-Control-Allow-Origin: {allow_origin}" if allow_origin else "no Access-Control-Allow-Origin"
    return problem(Check.CORS_SUBSCRIBE, f"{seen} for Origin: {origin}", Cause.CORS, **values)


def judge_cors_preflight(
    origin: str,
    status: int,
    allow_origin: str | None,
    allow_methods: str | None,
    allow_headers: str | None,
    requested_headers: tuple[str, ...],
) -> Finding:
    """A browser's preflight for `POST /publish` with `requested_headers`: it needs a 2xx, the origin allowed, POST
    among the methods and every requested header among the allowed ones."""
    methods = {m.strip().upper() for m in (allow_methods or "").split(",")}
    allowed = {h.strip().lower() for h in (allow_headers or "").split(",")}
    missing = [h for h in requested_headers if h.lower() not in allowed and "*" not in allowed]
    values = {
        "origin": origin,
        "status": status,
        "allow_origin": allow_origin,
        "allow_methods": allow_methods,
        "allow_headers": allow_headers,
    }
    why = []
    if not 200 <= status < 300:
        why.append(f"status {status}")
    if allow_origin not in (origin, "*"):
        # The other headers come only with an allowed origin: their absence then says nothing more.
        why.append(
            "no Access-Control-Allow-Origin" if not allow_origin else f"Access-Control-Allow-Origin: {allow_origin}"
        )
    else:
        if "POST" not in methods and "*" not in methods:
            why.append("POST not in Access-Control-Allow-Methods")
        if missing:
            why.append(f"{', '.join(missing)} not in Access-Control-Allow-Headers")
    if why:
        return problem(Check.CORS_PREFLIGHT, f"OPTIONS /publish from {origin}: {'; '.join(why)}", Cause.CORS, **values)
    return ok(Check.CORS_PREFLIGHT, f"OPTIONS /publish: {status}, origin and POST allowed", **values)


# -- publishing and watching ----------------------------------------------------------------------------------


def judge_publish(status: int, error: str | None, elapsed: float) -> Finding:
    figure = f"POST /publish: {status} in {ms(elapsed)} ms" + (f" ({error})" if error else "")
    values = {"status": status, "ms": ms(elapsed)}
    if status == 200:
        return ok(Check.PUBLISH, figure, **values)
    cause = {
        401: Cause.PUBLISH_TOKEN,
        403: Cause.TOKEN_REFUSED,
        404: Cause.NOT_SSE,
        405: Cause.NOT_SSE,
        502: Cause.UPSTREAM,
        504: Cause.UPSTREAM,
    }.get(status, Cause.REJECTED)
    return problem(Check.PUBLISH, figure, cause, **values)


def idle_cut_cause(idle_s: float, interval: float) -> Cause:
    """A stream that ended `idle_s` after its last data. At once: it was ended on purpose (the daemon turning it
    away or stopping), not for idleness. Before a heartbeat was due: a proxy's idle timeout. Well after one was
    due: the heartbeats themselves did not arrive."""
    if idle_s < ENDED_AT_ONCE_S:
        return Cause.STREAM_CLOSED
    return Cause.READ_TIMEOUT if idle_s <= heartbeat_allowance(interval) else Cause.HEARTBEAT_LOST


def heartbeat_allowance(interval: float) -> float:
    """The longest silence a healthy stream shows: the interval, plus the daemon's check tick (at most 1 s) and
    scheduling slack on a busy machine."""
    return interval + max(1.0, interval * 0.5)


def judge_delivery(
    latency_s: float | None,
    after_more_data: bool,
    waited: float,
    content_encoding: str | None,
    ended_idle_s: float | None,
    interval: float,
    opened_promptly: bool,
) -> Finding:
    """The probe event's trip from its publish to the open stream. `after_more_data`: it arrived only once a
    second probe followed it. `ended_idle_s`: the stream ended before the probe arrived, after that long without
    data. `opened_promptly`: the head and first line came at once (first_bytes ok), so nothing held those."""
    values = {"latency_ms": ms(latency_s), "only_after_more_data": after_more_data}
    if latency_s is not None and not after_more_data and latency_s < PROMPT_S:
        return ok(Check.DELIVERY, f"the probe arrived {ms(latency_s)} ms after its publish", **values)
    if latency_s is None and ended_idle_s is not None:
        return problem(
            Check.DELIVERY,
            f"the stream ended after {ended_idle_s:.1f} s without data, before the probe arrived",
            idle_cut_cause(ended_idle_s, interval),
            **values,
        )
    if latency_s is None:
        figure = f"the probe did not arrive within {waited:g} s, not even when a second one followed"
        if opened_promptly and delay_cause(content_encoding) is Cause.BUFFERING:
            return problem(
                Check.DELIVERY, figure + ", although the stream opened promptly", Cause.NOT_DELIVERED, **values
            )
    elif after_more_data:
        figure = f"the probe arrived only when a second one followed ({latency_s:.1f} s after its publish)"
    else:
        figure = f"the probe arrived {latency_s:.1f} s after its publish"
    return problem(Check.DELIVERY, figure, delay_cause(content_encoding), **values)


def judge_heartbeat(
    interval: float, watch: float, activity: list[float], comments: int, ended_s: float | None
) -> Finding:
    """An idle stream held for `watch` seconds. `activity`: when anything arrived, in seconds since the watch
    began (its last data before); `comments`: how many comment lines (heartbeats) arrived; `ended_s`: when the
    stream ended, None when it was still open at the end. Every silence must stay within the heartbeat
    allowance, and the stream must survive."""
    allowance = heartbeat_allowance(interval)
    times = [0.0] + sorted(t for t in activity if 0 <= t <= watch)
    values = {"heartbeats": comments, "watch_s": watch, "interval_s": interval, "ended_after_s": ended_s}
    if ended_s is not None:
        idle = ended_s - max(t for t in times if t <= ended_s)
        values["idle_at_end_s"] = round(idle, 2)
        return problem(
            Check.HEARTBEAT,
            f"the stream was cut after {idle:.1f} s without data (heartbeats before: "
            f"{comments}; heartbeat_interval {interval:g} s)",
            idle_cut_cause(idle, interval),
            **values,
        )
    gaps = [later - earlier for earlier, later in zip(times, times[1:] + [watch])]
    largest = max(gaps)
    values["largest_silence_s"] = round(largest, 2)
    if largest > allowance:
        return problem(
            Check.HEARTBEAT,
            f"a silence of {largest:.1f} s in {watch:g} s idle (heartbeats: {comments}; "
            f"heartbeat_interval {interval:g} s)",
            Cause.HEARTBEAT_LOST,
            **values,
        )
    note = "" if watch >= interval else f"; none due within --watch {watch:g} s"
    return ok(
        Check.HEARTBEAT,
        f"open after {watch:g} s idle, heartbeats: {comments}, largest silence "
        f"{largest:.1f} s (heartbeat_interval {interval:g} s){note}",
        **values,
    )


class ReplayOutcome(enum.Enum):
    REPLAYED = "replayed"  # the reconnect with Last-Event-ID got the missed probe first
    RESET = "reset"  # the daemon got the header but no longer held the id: sseserver.reset
    QUERY_ONLY = "query_only"  # the header did nothing, ?last_event_id= replayed: the header is dropped
    NOT_REPLAYED = "not_replayed"  # neither replayed


def judge_replay(outcome: ReplayOutcome, latency_s: float | None) -> Finding:
    values = {"outcome": outcome.value, "latency_ms": ms(latency_s)}
    if outcome is ReplayOutcome.REPLAYED:
        return ok(Check.REPLAY, f"a reconnect with Last-Event-ID got the missed probe in {ms(latency_s)} ms", **values)
    if outcome is ReplayOutcome.RESET:
        return warning(
            Check.REPLAY,
            "a reconnect with Last-Event-ID got sseserver.reset instead of the missed probe",
            Cause.HISTORY,
            **values,
        )
    if outcome is ReplayOutcome.QUERY_ONLY:
        return problem(
            Check.REPLAY,
            "a reconnect with Last-Event-ID did not get the missed probe, one with "
            "?last_event_id= did: the header is dropped on the way",
            Cause.LAST_EVENT_ID,
            **values,
        )
    return problem(
        Check.REPLAY,
        "a reconnect did not get the missed probe, neither with Last-Event-ID nor with ?last_event_id=",
        Cause.REPLAY_BROKEN,
        **values,
    )

"""`sseserver doctor URL`: find what breaks streaming between a deployment and its browsers.

Owns: the doctor's flags, the order of its run (below), the probe events it publishes, the report (one line per
check, then the fixes; or one JSON object) and its exit code: 0 no problem (warnings allowed), 1 a problem, 2 bad
usage, a URL that does not answer within REACH_TIMEOUT, or one that redirects to another host while tokens were
given.
Must not know: the daemon's internals. It is a client like a browser (probe.py observes, findings.py judges);
from the package it borrows only the rules for event names and origins, so a bad --event or --origin is refused
with the daemon's own words.

A run, in order:
1. GET /health (following up to MAX_REDIRECTS redirects that keep /health; to another host only without tokens):
   reachability and the settings to expect (heartbeat_interval, retry_ms).
2. With https, a TLS handshake offering h2 and http/1.1: certificate and ALPN.
3. GET /subscribe?event=<probe name> as a browser sends it (Accept-Encoding: gzip, deflate, br; Cache-Control:
   no-cache; Origin with --origin): the status, the headers, and how soon the head and the first line come.
4. POST /publish?event=<probe name>: the PROBE, timed until it reaches the open stream; when it has not come
   within DELIVERY_WAIT, MORE_DATA follows, to tell "held until more data follows" from "lost".
5. Hold the stream idle for --watch seconds: heartbeat gaps, and whether the stream survives.
6. Close it, publish the MISSED probe, reconnect with Last-Event-ID, publish a MARKER: MISSED must come before
   the marker. If not, reconnect once more with ?last_event_id= (and another marker): when that replays, the
   header is dropped on the way.
7. With --origin: a CORS preflight for POST /publish.

Only probe events are published, each named --event (default doctor.probe), so a browser's onmessage never
sees them (it fires for unnamed events only); the report says how many and what they carried.
"""

import argparse
import datetime
import json
import secrets
import ssl
import sys
import textwrap
import time
from urllib.parse import quote

from . import __version__
from . import config as config_module
from . import framing
from .findings import (
    Cause,
    Check,
    Finding,
    ReplayOutcome,
    Settings,
    Status,
    default_watch,
    exit_code,
    judge_cache_control,
    judge_compression,
    judge_cors_preflight,
    judge_cors_subscribe,
    judge_delivery,
    judge_first_bytes,
    judge_health,
    judge_heartbeat,
    judge_http_version,
    judge_publish,
    judge_replay,
    judge_stream,
    judge_tls,
    problem,
    skipped,
    MAX_WATCH_S,
)
from .probe import BaseURL, Client, Event, Stream, Unreachable, UsageError, base_after_redirect, parse_base_url

# The whole of step 1 (resolve, connect, TLS, /health's answer) must fit in this, so that an unreachable URL is
# exit 2 within 5 s of starting, with room for Python's start-up on a busy machine.
REACH_TIMEOUT = 3.5
# Any later request or connection: generous, because a slow answer is reported by the checks, not by a timeout.
IO_TIMEOUT = 10.0
# How long to wait for the stream's head and first line before publishing anyway (a buffering proxy may hold
# them until data follows).
FIRST_BYTES_WAIT = 3.0
# How long a probe may take to reach the stream before a second one is published, and again after it.
DELIVERY_WAIT = 3.0
# How long a reconnect may take to show the marker probe (it normally takes milliseconds).
REPLAY_WAIT = 10.0
MAX_REDIRECTS = 3
ACCEPT_ENCODING = "gzip, deflate, br"
# The probes, by number in their data: the one timed to the open stream, the one that follows it when it is late,
# the one published while no stream is open (replay must bring it), and the markers published on each reconnect.
PROBE, MORE_DATA, MISSED, MARKER, QUERY_MARKER = 1, 2, 3, 4, 5
RESET_EVENT = "sseserver.reset"
PREFLIGHT_HEADERS = ("authorization", "content-type")
USER_AGENT = f"sseserver-doctor/{__version__}"


class RedirectedAway(UsageError):
    """/health redirects to another host while tokens were given: the URL given is not the one to check."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"sseserver doctor: {message} (see --help)\n")  # one line, as the daemon's own flags
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sseserver doctor",
        description=(
            "Check the path between a deployment of sseserver and its browsers: buffering, compression, idle "
            "timeouts, Last-Event-ID, HTTP/2, CORS, TLS. Publishes only its own probe events."
        ),
    )
    parser.add_argument("url", metavar="URL", help="the public base URL, e.g. https://events.example.com/")
    parser.add_argument("--token", help="a subscribe token (sent as Authorization: Bearer)")
    parser.add_argument("--publish-token", help="a publish token (default: --token)")
    parser.add_argument("--origin", help="check CORS as a page on this origin would, e.g. https://app.example.com")
    parser.add_argument("--event", default="doctor.probe", help="the probe events' name (default doctor.probe)")
    parser.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help=f"how long to hold an idle stream (default three heartbeat intervals, at most {MAX_WATCH_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--cacert", metavar="FILE", help="trust this CA (PEM) instead of the system's")
    trust.add_argument("--insecure", action="store_true", help="do not verify the certificate (reported)")
    return parser


class Options:
    """The validated flags."""

    def __init__(self, args: argparse.Namespace):
        self.base: BaseURL = parse_base_url(args.url)
        self.token = args.token
        self.publish_token = args.publish_token if args.publish_token is not None else args.token
        self.origin = args.origin
        if self.origin is not None:
            problem_text = config_module.origins([self.origin])
            if problem_text or self.origin == "*":
                raise UsageError(f"--origin: {problem_text or 'give one origin, not *'}")
        self.event = args.event
        name_problem = framing.event_name_error(self.event)
        if name_problem:
            raise UsageError(f"--event: {name_problem}")
        if args.watch is not None and not 0 < args.watch <= MAX_WATCH_S:
            raise UsageError(f"--watch must be more than 0 and at most {MAX_WATCH_S:g} seconds, not {args.watch:g}")
        self.watch = args.watch
        self.json = args.json
        self.cacert = args.cacert
        self.insecure = args.insecure
        if self.cacert is not None:
            try:  # read now, so that a bad file is a usage error and not a TLS finding
                ssl.create_default_context(cafile=self.cacert)
            except (OSError, ValueError) as exc:
                raise UsageError(f"--cacert {self.cacert}: {getattr(exc, 'strerror', None) or exc}") from None
        for flag, value in (("--token", self.token), ("--publish-token", self.publish_token)):
            if value is not None and (not value.isascii() or not value.isprintable() or " " in value):
                raise UsageError(f"{flag} must be printable ASCII without spaces")


class Probes:
    """The probe events this run publishes: their data, and how many went out."""

    def __init__(self, name: str):
        self.name = name
        self.run = secrets.token_hex(4)  # tells this run's probes from another doctor's on the same daemon
        self.published = 0

    def data(self, number: int) -> str:
        return json.dumps({"doctor": self.run, "probe": number})

    @property
    def template(self) -> str:
        return self.data(0).replace(": 0}", ": N}")

    def arrival(self, stream: Stream, number: int) -> Event | None:
        """The probe's Event on the stream, or None."""
        wanted = self.data(number)
        return next((e for e in stream.events if e.type == self.name and e.data == wanted), None)


class Doctor:
    """One run against one base URL (see the module docstring for the order)."""

    # What cannot be observed without a stream.
    after_stream = (
        Check.FIRST_BYTES,
        Check.COMPRESSION,
        Check.CACHE_CONTROL,
        Check.PUBLISH,
        Check.DELIVERY,
        Check.HEARTBEAT,
        Check.REPLAY,
    )

    def __init__(self, options: Options):
        self.options = options
        self.client = Client(options.base, options.cacert, options.insecure)
        self.probes = Probes(options.event)
        self.findings: list[Finding] = []
        self.started = time.monotonic()
        self.settings: Settings | None = None
        self.watch: float | None = None
        self._timing: dict[Check, float] = {}

    @property
    def base(self) -> BaseURL:
        return self.client.base

    def add(self, finding: Finding) -> None:
        self._timing[finding.check] = time.monotonic() - self.started
        self.findings.append(finding)

    def skip(self, why: str, *checks: Check) -> None:
        for check in checks:
            self.add(skipped(check, why))

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Every check, in order. Unreachable (exit 2) only from step 1."""
        self.settings = self.reach()
        self.watch = self.options.watch or default_watch(self.settings)
        self.check_tls()
        stream = self.open_stream()
        if stream is not None:
            try:
                resume_from = self.check_stream(stream)
            finally:
                stream.close()
            if resume_from is not None:
                self.check_replay(resume_from)
        self.check_preflight()

    def reach(self) -> Settings:
        deadline = self.started + REACH_TIMEOUT
        redirected = None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self.client.request("GET", "/health", self.headers("application/json"), deadline=deadline)
            except (OSError, ValueError) as exc:  # TimeoutError included: connected, but no answer in time
                why = "no answer" if isinstance(exc, TimeoutError) else f"no usable answer ({exc})"
                raise Unreachable(f"{why} from {self.base.url('/health')} within {REACH_TIMEOUT:g} s") from None
            location = response.head.get("location")
            if response.status in (301, 302, 303, 307, 308) and location:
                moved = base_after_redirect(self.base, location, "/health")
                if moved is not None and moved != self.base:
                    other_origin = (moved.scheme, moved.host, moved.port) != (
                        self.base.scheme,
                        self.base.host,
                        self.base.port,
                    )
                    if other_origin and (self.options.token or self.options.publish_token):
                        # A browser's fetch drops Authorization on a redirect to another origin (scheme, host or
                        # port: https -> http would send the token in clear); so does the doctor, by not
                        # following: the operator names the origin that may see the tokens.
                        raise RedirectedAway(
                            f"{self.base.url('/health')} redirects to another origin, {moved.url()}: "
                            "run the doctor against that URL (tokens are not sent to an origin that "
                            "was not named)"
                        )
                    self.client = Client(moved, self.options.cacert, self.options.insecure)
                    redirected = moved.url()
                    continue
            break
        try:
            body = json.loads(response.body) if response.status in (200, 503) else None
        except ValueError:
            body = None
        finding, settings = judge_health(response.status, body, response.elapsed, redirected)
        self.add(finding)
        return settings

    def check_tls(self) -> None:
        if not self.base.tls:
            self.add(judge_tls(False, None, False, None, now()))
            self.add(judge_http_version(False, None))
            return
        try:
            info = self.client.handshake(time.monotonic() + IO_TIMEOUT)
        except Unreachable as exc:
            self.skip(f"the handshake failed this time: {exc}", Check.TLS, Check.HTTP_VERSION)
            return
        self.add(judge_tls(True, self.client.verify_error, self.options.insecure, info.expires, now()))
        self.add(judge_http_version(True, info.alpn))

    def open_stream(self) -> Stream | None:
        """Step 3's request; the stream is read until its first line, a refusal, or FIRST_BYTES_WAIT."""
        try:
            stream = self.client.open_stream(
                self.stream_path(), self.stream_headers(), time.monotonic() + IO_TIMEOUT, self.kept_events
            )
        except (Unreachable, OSError) as exc:
            self.add(problem(Check.STREAM, f"GET /subscribe failed: {exc}", Cause.UPSTREAM))
            self.skip("no stream", *self.after_stream, *self.cors_checks(Check.CORS_SUBSCRIBE))
            return None
        stream.read_until(
            lambda s: (
                s.first_line_at is not None
                or s.undecodable is not None
                or (s.head is not None and s.head.status != 200)
            ),
            stream.sent_at + FIRST_BYTES_WAIT,
        )
        return stream

    def check_stream(self, stream: Stream) -> str | None:
        """Steps 3 to 5 on the open stream. Returns the id to resume from when the replay check can run (the
        probe came through promptly, or the stream was cut for idleness), else None."""
        if stream.head is None and stream.ended:  # closed or reset without a word: nothing held it, it failed
            error = f" ({stream.error})" if stream.error else ""
            self.add(problem(Check.STREAM, f"the connection closed without a response{error}", Cause.UPSTREAM))
            self.skip("no stream", *self.after_stream, *self.cors_checks(Check.CORS_SUBSCRIBE))
            return None
        if stream.head is not None and not self.judge_head(stream):
            self.skip("no stream", Check.FIRST_BYTES, Check.PUBLISH, Check.DELIVERY, Check.HEARTBEAT, Check.REPLAY)
            return None
        encoding = stream.head.get("content-encoding") if stream.head else None
        if stream.undecodable:
            self.add(skipped(Check.FIRST_BYTES, f"Content-Encoding {stream.undecodable} cannot be read"))
        else:
            self.add(
                judge_first_bytes(
                    since(stream.sent_at, stream.head_at),
                    since(stream.sent_at, stream.first_line_at),
                    FIRST_BYTES_WAIT,
                    encoding,
                )
            )
        published = self.publish(PROBE)
        if stream.head is None:  # a buffer holds even the head: judge it once the probe has shaken it loose
            stream.read_until(lambda s: s.head is not None, time.monotonic() + DELIVERY_WAIT)
            if not self.judge_head(stream) and stream.head is not None:
                self.skip("no stream", Check.DELIVERY, Check.HEARTBEAT, Check.REPLAY)
                return None
        if stream.undecodable:
            why = f"the stream's Content-Encoding {stream.undecodable} cannot be read"
            self.skip(why, Check.DELIVERY, Check.HEARTBEAT, Check.REPLAY)
            return None
        if published is None:
            self.skip("the probe could not be published", Check.DELIVERY, Check.REPLAY)
            self.watch_idle(stream)
            return None
        sent_at, event_id = published
        delivery = self.wait_for_probe(stream, sent_at)
        self.add(delivery)
        if delivery.status is Status.OK:
            self.watch_idle(stream)
            return stream.last_id or event_id
        if delivery.cause in (Cause.READ_TIMEOUT, Cause.HEARTBEAT_LOST, Cause.STREAM_CLOSED):
            self.skip("the stream was cut before the watch (see delivery)", Check.HEARTBEAT)
            return stream.last_id or event_id
        self.skip(
            "the stream is held on the way, so heartbeats and replay cannot be seen through it (see delivery)",
            Check.HEARTBEAT,
            Check.REPLAY,
        )
        return None

    def judge_head(self, stream: Stream) -> bool:
        """The checks on the stream's response head; False when it is no event stream (or did not come)."""
        head = stream.head
        finding = judge_stream(
            head.status if head else None, head.get("content-type") if head else None, FIRST_BYTES_WAIT + DELIVERY_WAIT
        )
        self.add(finding)
        if finding.status is not Status.OK:
            why = "no response head" if head is None else "no stream"
            self.skip(why, Check.COMPRESSION, Check.CACHE_CONTROL, *self.cors_checks(Check.CORS_SUBSCRIBE))
            return False
        assert head is not None  # judge_stream() found a stream, so it has a head
        self.add(judge_compression(head.get("content-encoding"), ACCEPT_ENCODING))
        self.add(judge_cache_control(head.get("cache-control")))
        if self.options.origin:
            self.add(judge_cors_subscribe(self.options.origin, head.get("access-control-allow-origin")))
        return True

    def wait_for_probe(self, stream: Stream, sent_at: float) -> Finding:
        """Step 4: the probe's trip to the stream, and a second probe when the first is not there in time."""
        encoding = stream.head.get("content-encoding") if stream.head else None
        arrived = lambda s: self.probes.arrival(s, PROBE) is not None  # noqa: E731 - a predicate, used twice
        after_more_data = False
        if not stream.read_until(arrived, sent_at + DELIVERY_WAIT) and not stream.ended:
            after_more_data = True
            self.publish(MORE_DATA)  # a buffer that holds the first probe may let it go now
            stream.read_until(arrived, time.monotonic() + DELIVERY_WAIT)
        event = self.probes.arrival(stream, PROBE)
        ended_idle = None
        if event is None and stream.ended_at is not None:
            ended_idle = stream.ended_at - max([stream.head_at or stream.sent_at, *stream.activity])
        settings = self.settings
        assert settings is not None  # run() reads them before any step
        return judge_delivery(
            since(sent_at, event.at if event else None),
            after_more_data,
            2 * DELIVERY_WAIT,
            encoding,
            ended_idle,
            settings.heartbeat_interval,
            self.opened_promptly(),
        )

    def opened_promptly(self) -> bool:
        return any(f.check is Check.FIRST_BYTES and f.status is Status.OK for f in self.findings)

    def watch_idle(self, stream: Stream) -> None:
        """Step 5: hold the stream idle for --watch seconds from its last data, then judge the heartbeats."""
        settings, watch = self.settings, self.watch
        assert settings is not None and watch is not None  # run() sets both before any step
        begin = max([stream.head_at or stream.sent_at, *stream.activity])
        comments_before = len(stream.comments)
        if not self.options.json and sys.stderr.isatty():
            sys.stderr.write(f"holding an idle stream for {watch:g} s (--watch) ...\n")
        stream.watch(begin + watch)
        ended = stream.ended_at
        self.add(
            judge_heartbeat(
                settings.heartbeat_interval,
                watch,
                [t - begin for t in stream.activity if t > begin],
                len(stream.comments) - comments_before,
                None if ended is None or ended > begin + watch else ended - begin,
            )
        )

    def check_replay(self, last_id: str) -> None:
        """Step 6: a probe published while no stream is open must be replayed to a reconnect carrying the last
        id seen. The header first, as a browser sends it; if that fails, the query parameter tells a dropped
        header from a replay that does not work at all."""
        if self.publish(MISSED) is None:
            self.skip("the probe could not be published", Check.REPLAY)
            return
        outcome, latency = self.reconnect(self.stream_path(), [("Last-Event-ID", last_id)], MARKER)
        if outcome is ReplayOutcome.NOT_REPLAYED:
            by_query, _ = self.reconnect(self.stream_path(last_id), [], QUERY_MARKER)
            if by_query is not ReplayOutcome.NOT_REPLAYED:
                outcome = ReplayOutcome.QUERY_ONLY
        self.add(judge_replay(outcome, latency))

    def reconnect(self, path: str, extra: list[tuple[str, str]], marker: int) -> tuple[ReplayOutcome, float | None]:
        """A stream that should start with the MISSED probe. Once its head is in, the `marker` probe is
        published: the daemon sends replay before live events, so the marker arriving without MISSED before it
        proves that no replay is coming, without guessing at a timeout."""
        try:
            stream = self.client.open_stream(
                path, [*self.stream_headers(), *extra], time.monotonic() + IO_TIMEOUT, self.kept_events
            )
        except (Unreachable, OSError):
            return ReplayOutcome.NOT_REPLAYED, None
        try:
            deadline = time.monotonic() + REPLAY_WAIT
            if not stream.read_until(lambda s: s.first_line_at is not None, deadline) or self.publish(marker) is None:
                return ReplayOutcome.NOT_REPLAYED, None

            def reset(s: Stream) -> bool:
                return any(e.type == RESET_EVENT for e in s.events)

            stream.read_until(lambda s: self.probes.arrival(s, marker) is not None or reset(s), deadline)
            if reset(stream):
                return ReplayOutcome.RESET, None
            missed = self.probes.arrival(stream, MISSED)
            if missed is not None:
                return ReplayOutcome.REPLAYED, missed.at - stream.sent_at
            return ReplayOutcome.NOT_REPLAYED, None
        finally:
            stream.close()

    def check_preflight(self) -> None:
        origin = self.options.origin
        if origin is None:
            self.add(skipped(Check.CORS_PREFLIGHT, "no --origin given"))
            return
        headers = [
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", ", ".join(PREFLIGHT_HEADERS)),
            ("User-Agent", USER_AGENT),
        ]
        try:
            response = self.client.request("OPTIONS", self.publish_path(), headers, timeout=IO_TIMEOUT)
        except (Unreachable, OSError, ValueError) as exc:
            self.add(problem(Check.CORS_PREFLIGHT, f"OPTIONS /publish failed: {exc}", Cause.UPSTREAM))
            return
        head = response.head
        self.add(
            judge_cors_preflight(
                origin,
                response.status,
                head.get("access-control-allow-origin"),
                head.get("access-control-allow-methods"),
                head.get("access-control-allow-headers"),
                PREFLIGHT_HEADERS,
            )
        )

    # -- requests -------------------------------------------------------------------------------------------

    @property
    def kept_events(self) -> frozenset[str]:
        """What the doctor's streams keep: its probes and resets (a proxy that drops ?event= must not fill memory)."""
        return frozenset((self.probes.name, RESET_EVENT))

    def cors_checks(self, *checks: Check) -> tuple[Check, ...]:
        return checks if self.options.origin else ()

    def headers(self, accept: str) -> list[tuple[str, str]]:
        headers = [("Accept", accept), ("User-Agent", USER_AGENT)]
        if self.options.origin:
            headers.append(("Origin", self.options.origin))
        return headers

    def stream_headers(self) -> list[tuple[str, str]]:
        """What a browser's EventSource sends, plus the token (the doctor can set headers; a page uses ?token=)."""
        headers = [
            *self.headers("text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Accept-Encoding", ACCEPT_ENCODING),
        ]
        if self.options.token:
            headers.append(("Authorization", f"Bearer {self.options.token}"))
        return headers

    def stream_path(self, last_event_id: str | None = None) -> str:
        path = f"/subscribe?event={quote(self.probes.name)}"
        return path + (f"&last_event_id={quote(last_event_id)}" if last_event_id is not None else "")

    def publish_path(self) -> str:
        return f"/publish?event={quote(self.probes.name)}"

    def publish(self, number: int) -> tuple[float, str] | None:
        """Publish probe `number` -> (when it was sent, its id); None when the daemon did not take it. The first
        publish is judged (Check.PUBLISH); later ones only count."""
        headers = [*self.headers("application/json"), ("Content-Type", "text/plain; charset=utf-8")]
        if self.options.publish_token:
            headers.append(("Authorization", f"Bearer {self.options.publish_token}"))
        sent_at = time.monotonic()
        first = Check.PUBLISH not in self._timing
        try:
            response = self.client.request(
                "POST", self.publish_path(), headers, self.probes.data(number).encode(), timeout=IO_TIMEOUT
            )
        except (Unreachable, OSError, ValueError) as exc:
            if first:
                self.add(problem(Check.PUBLISH, f"POST /publish failed: {exc}", Cause.UPSTREAM))
            return None
        error, event_id = None, None
        try:
            reply = json.loads(response.body)
            error, event_id = reply.get("error"), reply.get("id")
        except (ValueError, AttributeError):
            pass
        if response.status == 200:
            self.probes.published += 1
        if first:
            self.add(judge_publish(response.status, error, response.elapsed))
        if response.status != 200 or not isinstance(event_id, str):
            return None
        return sent_at, event_id

    # -- the report -----------------------------------------------------------------------------------------

    def report(self) -> dict:
        order = list(Check)
        findings = sorted(self.findings, key=lambda f: order.index(f.check))
        settings = self.settings
        return {
            "url": self.base.url(),
            "probe_event": self.probes.name,
            "probe_data": self.probes.template,
            "published": self.probes.published,
            "settings": None
            if settings is None
            else {
                "heartbeat_interval": settings.heartbeat_interval,
                "retry_ms": settings.retry_ms,
                "from_health": settings.reported,
            },
            "watch_s": self.watch,
            "checks": [
                {
                    "check": f.check.value,
                    "status": f.status.value,
                    "figure": f.figure,
                    "cause": f.cause.label if f.cause else None,
                    "fix": f.cause.fix if f.cause else None,
                    "at_s": round(self._timing[f.check], 3),
                    "values": f.values,
                }
                for f in findings
            ],
            "problems": sum(f.status is Status.PROBLEM for f in findings),
            "warnings": sum(f.status is Status.WARNING for f in findings),
            "exit_code": exit_code(findings),
        }


def since(start: float, moment: float | None) -> float | None:
    return None if moment is None else moment - start


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def render_text(report: dict) -> str:
    """One line per check, then one fix per cause, then the verdict."""
    settings = report["settings"]
    lines = [
        f"sseserver doctor {report['url']}: heartbeat_interval {settings['heartbeat_interval']:g} s, "
        f"retry_ms {settings['retry_ms']}{'' if settings['from_health'] else ' (assumed)'}, "
        f"watch {report['watch_s']:g} s",
        textwrap.fill(
            f"Publishes only its own probe events: {report['published']} named "
            f'"{report["probe_event"]}" with data {report["probe_data"]}; streams that do not '
            "filter by name get them too (onmessage ignores named events).",
            110,
            break_on_hyphens=False,
        ),
        "",
    ]
    width = max(len(check.value) for check in Check)
    for check in report["checks"]:
        lines.append(f"{check['status']:<8} {check['check']:<{width}}  {check['figure']}")
    fixes: dict[str, tuple[str, str]] = {}
    for check in report["checks"]:
        if check["cause"] and check["status"] in ("problem", "warning"):
            fixes.setdefault(check["cause"], (check["status"], check["fix"]))
    if fixes:
        lines += ["", "Fixes:"]
        for cause, (status, fix) in fixes.items():
            lines.append(f"- {cause} ({status}):")
            lines.append(
                textwrap.fill(
                    fix,
                    100,
                    initial_indent="    ",
                    subsequent_indent="    ",
                    break_on_hyphens=False,
                    break_long_words=False,
                )
            )
    lines += ["", f"{report['problems']} problem(s), {report['warnings']} warning(s): exit {report['exit_code']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = Options(args)
    except UsageError as exc:
        sys.stderr.write(f"sseserver doctor: {exc}\n")
        return 2
    doctor = Doctor(options)
    try:
        doctor.run()
    except RedirectedAway as exc:
        sys.stderr.write(f"sseserver doctor: {exc}\n")
        return 2
    except Unreachable as exc:
        sys.stderr.write(f"sseserver doctor: cannot reach {options.base.url()}: {exc}\n")
        if options.json:
            print(json.dumps({"url": options.base.url(), "error": str(exc), "exit_code": 2}))
        return 2
    except KeyboardInterrupt:
        return 130
    report = doctor.report()
    sys.stdout.write(json.dumps(report) + "\n" if options.json else render_text(report))
    return report["exit_code"]

"""The fault-injection model test: real daemons driven through seeded random operations, checked after each step.

    python3 -m tests.chaos --mode MODE --seed N --steps N [--verbose] [--keep-going] [--only 3,5,9-12]
    modes: memory, file-always, file-interval, file-never, redis, redis-aof

The promise under test (README): an event answered `200` reaches every matching live stream exactly once, in id
order, or that stream is told in-band (an `sseserver.reset` event) that it missed something: across reloads,
restarts, crashes, full disks, failing fsync/write calls and Redis outages.

How it works. `make_plan()` turns (mode, seed, steps) into a list of operations from a seeded generator that
never looks at what the daemon does, so the same seed always gives the same list (`--only` replays a subset of
it, which is how a failure is cut down to a minimal reproduction). `Chaos` runs the list against real
`python3 -m sseserver` subprocesses (DaemonProcess), keeps a `Model` of every publish and what the daemon
answered, and after every step waits for the streams to settle and checks the invariants:
- no 5xx except the documented 503s, and a 503 only while a fault can explain it ("not published": a 503'd event
  must never appear; in Redis mode a 503 may have been stored, so it may appear once, in order);
- every stream (a raw socket read by tests/ssereader.py) is [reset] + runs of acknowledged matching events,
  strictly in id order, with no duplicate and no gap except right after an in-band `sseserver.reset`;
- replay after any Last-Event-ID equals the retained set: exact replay for an id the daemon holds, a reset
  followed by at least every event that must still be retained for any other id;
- ids strictly increase over the whole run (across restarts and Redis faults) and are never reused;
- `/health` subscriber counts are true, `last_event_id` is the newest id, `history_size` is plausible;
- the daemon's file descriptors and threads return to their baseline once the clients are gone; its log never
  shows a traceback; SIGTERM ends every stream with `retry:` and exits 0.

What "must still be retained" means (the Model's `Domain.floor_id`): the newest `history_size` acknowledged
events of the retention domain (this process lifetime in memory mode; the whole run with a history file; the
Redis stream since the last time it lost data), where any reload that shrank history_size may have evicted
older ones for good, so the floor only ever rises. Events below the floor may or may not be replayed; if they
are, they must still be gap-free.

Faults are real: SIGHUP with a rewritten config, SIGTERM and kill -9 restarts (also in the middle of a publish
burst), a full disk (the history file lives on a small tmpfs in a private mount namespace held by a
`TmpfsHolder`, filled through /proc/PID/root), fsync and write errors (strace -e inject on the history file's
path), Redis restarts with and without persistence, FLUSHALL, a cut or black-holed link (tests/tcpproxy.py),
and a second instance joining late.

Synchronisation is on observable events only: log lines, /health polled until a deadline, stream reads with a
deadline. All timeouts are the named constants below.
"""

import argparse
import bisect
import contextlib
import dataclasses
import fnmatch
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tests.ssereader import Event, IdOnly, Retry, StreamReader, open_stream
from tests.tcpproxy import TcpProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("memory", "file-always", "file-interval", "file-never", "redis", "redis-aof")

# -- timeouts (generous: the CI machine has two cores shared with other work) -----------------------------------
START_TIMEOUT = 30.0  # a daemon's "listening on" line (strace slows the start)
IO_TIMEOUT = 15.0  # one HTTP request
SETTLE_TIMEOUT = 15.0  # streams receiving every event they must have
HEALTH_TIMEOUT = 15.0  # /health agreeing with the model (a closed stream takes a moment to be noticed)
QUIESCE_TIMEOUT = 20.0  # fds and threads back at their baseline
REDIS_TIMEOUT = 30.0  # redis-server answering PING; a daemon's follower reconnecting (backoff up to 5 s)
BURST_TIMEOUT = 30.0  # a concurrent publish burst
POLL = 0.02  # the sleep inside every polling loop that has a deadline

# -- the daemon's configuration under test ------------------------------------------------------------------------
LIMIT = 16384  # max_message_bytes
RETRY_MS = 250
SHUTDOWN_TIMEOUT = 2.0
FSYNC_INTERVAL = 0.2
TMPFS_SIZE = 16 * 1024 * 1024
NAMES = ("message", "a.one", "a.two", "b", "c:x-y")
PUBLISH_TOKEN = "chaos-publisher-token-1"
SUBSCRIBE_TOKEN = "chaos-subscriber-token-1"
SCOPED_TOKEN, SCOPE = "chaos-scoped-token-1", "a.*"
FUTURE_MARGIN = 10 ** 12  # a "future" Last-Event-ID is this far beyond every id handed out
GARBAGE_IDS = ("abc", "-1", "1e5", "0x10", "12345678901234567890123", "18446744073709551616", "\u0663\u0664",
               "7;8", "9.5", "+3", "null", "undefined")
HISTORY_SIZES = (0, 1, 3, 10, 50, 200, 1000)
QUEUE_SIZES = (1, 2, 4, 16, 256)
HEARTBEATS = (0.2, 0.5, 1.0, 5.0)


# =================================================================================================================
# The plan: a seeded list of operations that never depends on what the daemon does.
# =================================================================================================================

@dataclasses.dataclass
class Op:
    kind: str
    args: dict

    def __str__(self) -> str:
        shown = []
        for key, value in self.args.items():
            if key == "payloads":
                value = f"[{sum(len(p) for p in value)} publishes on {len(value)} connections]"
            elif key == "burst" and value:
                value = f"[{sum(len(p) for p in value)} publishes on {len(value)} connections]"
            shown.append(f"{key}={value}")
        return f"{self.kind} {' '.join(shown)}".strip()


class Planner:
    """Draws operations with weights that depend on the mode and on the structural state the plan itself creates
    (which instances run, which fault is active). Faults are healed by a later operation of the plan."""

    def __init__(self, mode: str, seed: int):
        self.mode = mode
        self.rng = random.Random(f"sseserver-chaos:{mode}:{seed}")
        self.redis = mode.startswith("redis")
        self.file = mode.startswith("file")
        self.serial = 0  # payload tags: unique over the plan
        self.second = False  # redis modes: the second instance runs
        self.disk_full = 0  # steps left until the plan frees the disk (0: the disk is not full)
        self.traced = 0  # steps left in a lifetime under strace fault injection
        self.redis_down = 0
        self.link = 0  # steps left with the link to Redis cut
        self.link_how = ""
        self.tokens = False
        self.config = self.random_config(initial=True)

    def random_config(self, initial: bool = False) -> dict:
        rng = self.rng
        sizes = HISTORY_SIZES if not initial else HISTORY_SIZES[1:]
        config = {
            "history_size": rng.choice(sizes),
            "queue_size": rng.choice(QUEUE_SIZES),
            "heartbeat_interval": rng.choice(HEARTBEATS),
        }
        if not initial and rng.random() < 0.3:
            self.tokens = not self.tokens
        config["tokens"] = self.tokens
        return config

    def payload(self, rng=None) -> tuple:
        rng = rng or self.rng
        self.serial += 1
        kind = rng.choices(("plain", "lines", "sse", "unicode", "record", "empty", "max", "over"),
                           (30, 20, 10, 15, 8, 4, 4, 4))[0]
        size = rng.choice((rng.randint(0, 80), rng.randint(0, 80), rng.randint(80, 2000), rng.randint(2000, LIMIT)))
        name = rng.choice(NAMES)
        return (self.serial, name, kind, size, rng.randrange(1 << 30))

    def burst(self) -> list:
        threads = self.rng.randint(2, 4)
        return [[self.payload() for _ in range(self.rng.randint(3, 12))] for _ in range(threads)]

    def next(self) -> Op:
        for counter in ("disk_full", "traced", "redis_down", "link"):
            if getattr(self, counter):
                setattr(self, counter, getattr(self, counter) - 1)
        rng = self.rng
        # Heals come when their time is up.
        if self.file and self.disk_full == 1:
            self.disk_full = 0
            return Op("disk_free", {})
        if self.file and self.traced == 1:
            self.traced = 0
            return self.restart(plain=True)
        if self.redis and self.redis_down == 1:
            self.redis_down = 0
            return Op("redis_start", {})
        if self.redis and self.link == 1:
            self.link = 0
            return Op("link_restore", {})
        if self.link and self.link_how == "blackhole":
            # Every Redis command hangs for the daemon's command timeout: publish once (the reply can be lost),
            # then restore the link.
            self.link = 2
            return Op("publish", {"instance": round(rng.random(), 4), "payload": self.payload(), "keepalive": False})
        choices = {
            "publish": 30, "burst": 5, "subscribe": 16, "disconnect": 8, "resume": 3, "reload": 4,
            "restart": 4, "quiesce": 2, "bad_requests": 3,
        }
        if self.file:
            choices["disk_full"] = 0 if self.disk_full else 2.5
            if self.traced:
                choices["restart"] = 0  # the traced lifetime ends when the plan says so
        if self.redis:
            choices["redis_stop"] = 0 if (self.redis_down or self.link) else 1.5
            choices["flushall"] = 0 if (self.redis_down or self.link) else 1.0
            choices["link_cut"] = 0 if (self.redis_down or self.link) else 2.0
            choices["join"] = 0 if self.second else 2.0
            choices["leave"] = 1.0 if self.second else 0
        kind = rng.choices(list(choices), list(choices.values()))[0]
        return getattr(self, "op_" + kind)()

    # -- one method per operation kind: the arguments are all drawn here ---------------------------------------

    def op_publish(self) -> Op:
        return Op("publish", {"instance": round(self.rng.random(), 4), "payload": self.payload(),
                              "keepalive": self.rng.random() < 0.4})

    def op_burst(self) -> Op:
        return Op("burst", {"instance": round(self.rng.random(), 4), "payloads": self.burst()})

    def op_subscribe(self) -> Op:
        rng = self.rng
        names = None if rng.random() < 0.5 else tuple(sorted(rng.sample(NAMES, rng.randint(1, 3))))
        last = rng.choices(("none", "current", "stale", "previous", "future", "garbage", "zero", "newest"),
                           (30, 22, 10, 6, 5, 10, 4, 13))[0]
        return Op("subscribe", {
            "instance": round(rng.random(), 4), "names": names, "last": last, "pick": round(rng.random(), 4),
            "query": rng.random() < 0.15, "scoped": rng.random() < 0.15, "stalled": rng.random() < 0.12,
        })

    def op_disconnect(self) -> Op:
        return Op("disconnect", {"pick": round(self.rng.random(), 4), "how": self.rng.choice(("fin", "rst"))})

    def op_resume(self) -> Op:
        return Op("resume", {"pick": round(self.rng.random(), 4)})

    def op_reload(self) -> Op:
        self.config = self.random_config()
        return Op("reload", dict(self.config))

    def op_restart(self) -> Op:
        return self.restart(plain=False)

    def restart(self, plain: bool) -> Op:
        rng = self.rng
        args = {"instance": round(rng.random(), 4), "how": rng.choice(("term", "kill")), "burst": None, "wrapper": "plain"}
        if rng.random() < 0.25:
            args["burst"] = self.burst()
        if self.file and not plain and rng.random() < 0.4:
            args["wrapper"] = rng.choice(("fsync", "write"))
            args["when"] = rng.choice(("1+", "2+", "1+2", "3+"))
            self.traced = rng.randint(3, 8)
        return Op("restart", args)

    def op_quiesce(self) -> Op:
        return Op("quiesce", {})

    def op_bad_requests(self) -> Op:
        kinds = ("reserved_name", "bad_name", "too_big", "not_utf8", "wrong_token", "no_token", "bad_filter",
                 "scope_outside")
        return Op("bad_requests", {"instance": round(self.rng.random(), 4),
                                   "which": tuple(self.rng.sample(kinds, self.rng.randint(1, 3)))})

    def op_disk_full(self) -> Op:
        self.disk_full = self.rng.randint(2, 8)
        return Op("disk_full", {"free": self.rng.choice((0, 4096, 16384, 65536))})

    def op_redis_stop(self) -> Op:
        self.redis_down = self.rng.randint(2, 6)
        return Op("redis_stop", {"how": self.rng.choice(("term", "kill"))})

    def op_flushall(self) -> Op:
        return Op("flushall", {})

    def op_link_cut(self) -> Op:
        self.link_how = "blackhole" if self.rng.random() < 0.15 else "reset"
        self.link = self.rng.randint(2, 6) if self.link_how == "reset" else 3
        return Op("link_cut", {"how": self.link_how, "burst": self.burst() if self.rng.random() < 0.3 else None})

    def op_join(self) -> Op:
        self.second = True
        return Op("join", {})

    def op_leave(self) -> Op:
        self.second = False
        return Op("leave", {"how": self.rng.choice(("term", "kill"))})


def make_plan(mode: str, seed: int, steps: int) -> tuple[dict, list[Op]]:
    """(initial config, operations): a pure function of its arguments."""
    planner = Planner(mode, seed)
    initial = dict(planner.config)
    return initial, [planner.next() for _ in range(steps)]


# =================================================================================================================
# Payloads: what publishers send. Every payload but the empty one starts with a unique tag, so a delivered event
# can be traced back to its publish even when its id is unknown (a Redis publish answered 503).
# =================================================================================================================

_TAG = re.compile(r"^<(\d+)>")
_UNICODE = ("\u00e9", "\u00df", "\u4e2d", "\u6587", "\U0001f642", "\U0001f680", "\u2028", "\u2029", "\u0085",
            "\ufeff", "\ufffd", "\x00", "\x1b", "\x7f", "\t", "\v", "\f", "\x1c", "\x1d", "\x1e", "\u200b",
            "\U0010ffff", "a", "z", " ", ":", "\u00a0")
_SSE_LIKE = ("id: 1", "id: 999999999999999", "id:", "event: sseserver.reset", "event: message",
             "data: {\"last_event_id\": \"1\", \"oldest_id\": null}", "data:", "retry: 1", ": comment", ":",
             "", "HTTP/1.1 200 OK", "Content-Length: 0", "\x00", "id: 5\x00")
_BREAKS = ("\n", "\r", "\r\n")


def wire_form(data: str) -> str:
    """What a client reads back: the SSE format turns CRLF and lone CR into LF."""
    return data.replace("\r\n", "\n").replace("\r", "\n")


def _record_like(rng: random.Random, id_hint: int) -> str:
    """Text whose UTF-8 bytes are a valid record of the history file's current format (with its magic), so
    a torn write next to it can look like a whole record. Falls back to a look-alike if the format is unknown."""
    try:
        from sseserver import history
        import inspect
        encode = history.encode_record
        arity = len(inspect.signature(encode).parameters)
        magic = getattr(history, "MAGIC", b"")
    except (ImportError, AttributeError, TypeError, ValueError):
        return "SSEHIST2\n\x00\x00\x00\x20fake-record"
    # Clear the high bit of every byte of the ids (so they are ASCII) and retry the data until the CRC is too.
    event_id = id_hint & 0x7F7F7F7F7F7F7F7F
    for _ in range(400):
        data = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(rng.randint(1, 60)))
        try:
            args = (event_id, event_id - 1, "message", data) if arity == 4 else (event_id, "message", data)
            blob = magic + encode(*args)
            return blob.decode("utf-8") + blob.decode("utf-8")[len(magic):]
        except (UnicodeDecodeError, TypeError, ValueError, OverflowError):
            continue
    return "SSEHIST2\n\x00\x00\x00\x20fake-record"


def make_payload(spec: tuple, id_hint: int) -> tuple[str, str, bytes]:
    """(tag, event name, body bytes) for a payload spec from the plan."""
    serial, name, kind, size, seed = spec
    rng = random.Random(seed)
    tag = f"<{serial}>"
    if kind == "empty":
        return tag, name, b""
    if kind in ("max", "over"):
        target = LIMIT if kind == "max" else LIMIT + 1 + rng.randint(0, 100)
        return tag, name, (tag + "m" * (target - len(tag))).encode()
    if kind == "plain":
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ABC.,-0123456789") for _ in range(size))
    elif kind == "lines":
        pieces = ["".join(rng.choice("abcxyz ") for _ in range(rng.randint(0, 12))) for _ in range(max(1, size // 8))]
        text = "".join(piece + rng.choice(_BREAKS) for piece in pieces)
        if rng.random() < 0.5:
            text = rng.choice(_BREAKS) + text
        if rng.random() < 0.5:
            text = text.rstrip("\r\n")
    elif kind == "sse":
        text = rng.choice(_BREAKS) + "".join(rng.choice(_SSE_LIKE) + rng.choice(_BREAKS)
                                             for _ in range(max(1, size // 12)))
    elif kind == "unicode":
        text = "".join(rng.choice(_UNICODE) for _ in range(max(1, size // 2)))
    else:  # record
        text = _record_like(rng, id_hint) * max(1, size // 400)
    body = (tag + text).encode("utf-8")
    if len(body) > LIMIT:
        body = body[:LIMIT].decode("utf-8", "ignore").encode("utf-8")
    return tag, name, body


# =================================================================================================================
# The model: every publish, what the daemon answered, and which events each daemon must still hold.
# =================================================================================================================

PENDING, ACKED, MAYBE, REFUSED = "pending", "acknowledged", "maybe stored", "refused"
ABSENT = "not in Redis"  # a Redis-mode 503 that the stream shows was not stored (it may still arrive late)


class Publish:
    __slots__ = ("tag", "name", "wire", "status", "id", "sent_seq", "ack_seq", "id_floor", "domain", "instance")

    def __init__(self, tag, name, wire, sent_seq, id_floor, domain, instance):
        self.tag, self.name, self.wire = tag, name, wire
        self.status = PENDING
        self.id = None
        self.sent_seq, self.ack_seq = sent_seq, None
        self.id_floor = id_floor  # every id acknowledged before this publish was sent
        self.domain = domain
        self.instance = instance


class Index:
    """Event ids, sorted, overall and per name, for "which matching events lie between two ids"."""

    def __init__(self):
        self.ids: list[int] = []
        self.by_name: dict[str, list[int]] = {name: [] for name in NAMES}

    def add(self, event_id: int, name: str) -> None:
        bisect.insort(self.ids, event_id)
        bisect.insort(self.by_name[name], event_id)

    def between(self, low: int | None, high: int | None, names: frozenset) -> list[int]:
        """Ids of events named in `names` with low < id < high (None: unbounded)."""
        found = []
        for name in names:
            ids = self.by_name[name]
            start = 0 if low is None else bisect.bisect_right(ids, low)
            end = len(ids) if high is None else bisect.bisect_left(ids, high)
            found.extend(ids[start:end])
        return sorted(found)

    def newest(self, names: frozenset) -> int | None:
        tops = [self.by_name[name][-1] for name in names if self.by_name[name]]
        return max(tops) if tops else None


class Domain(Index):
    """Events that share one retention: one process lifetime (memory), the history file (the whole run), or the
    Redis stream between two losses of its data (an epoch). `floor_id`: every event of the domain with an id at
    or above it must still be retained; it only rises (a reload that shrinks history_size evicts for good)."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.floor_id = 0
        self.unresolved = 0  # publishes that may have been stored (ids unknown): they take room in history too
        self.refused = 0  # 503s and lost replies: the daemon may have spent an id on them

    def raise_floor(self, history_size: int) -> None:
        keep = max(0, history_size - self.unresolved)
        if not self.ids:
            return
        if keep == 0:
            self.floor_id = max(self.floor_id, self.ids[-1] + 1)
        elif len(self.ids) > keep:
            self.floor_id = max(self.floor_id, self.ids[-keep])

    def must(self) -> list[int]:
        return self.ids[bisect.bisect_left(self.ids, self.floor_id):]

    def floor_index(self) -> int:
        return bisect.bisect_left(self.ids, self.floor_id)


class Model:
    """What was acknowledged. Publishes may run on several threads (bursts): everything goes through the lock."""

    def __init__(self, mode: str):
        self.mode = mode
        self.redis = mode.startswith("redis")
        self.lock = threading.Lock()
        self.seq = 0  # a logical clock: publishes sent and answered, streams opened
        self.publishes: dict[str, Publish] = {}
        self.by_id: dict[int, Publish] = {}
        self.max_acked = 0
        self.acknowledged = 0
        self.everything = Index()  # every event of the run (the gap space outside memory mode)
        self.domains: list[Domain] = []
        self.domain = self.new_domain("start")
        self.problems: list[tuple[str, str]] = []  # (kind, message) found on publisher threads

    def tick(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def new_domain(self, key: str) -> Domain:
        domain = Domain(key)
        self.domains.append(domain)
        self.domain = domain
        return domain

    def begin(self, tag: str, name: str, body: bytes, instance: str) -> Publish:
        with self.lock:
            self.seq += 1
            publish = Publish(tag, name, wire_form(body.decode("utf-8", "replace")), self.seq, self.max_acked,
                              self.domain, instance)
            self.publishes[tag] = publish
            return publish

    def acknowledge(self, publish: Publish, event_id: int) -> None:
        with self.lock:
            self.seq += 1
            publish.ack_seq = self.seq
            self._assign(publish, event_id)
            publish.status = ACKED
            self.acknowledged += 1
            self.max_acked = max(self.max_acked, event_id)

    def _assign(self, publish: Publish, event_id: int) -> None:
        if event_id <= publish.id_floor:
            self.problems.append(("ids go backwards", f"publish {publish.tag} got id {event_id}, but id "
                                  f"{publish.id_floor} had already been acknowledged before it was sent"))
        other = self.by_id.get(event_id)
        if other is not None and other is not publish:
            self.problems.append(("id reused", f"id {event_id} was given to {other.tag} ({other.status}) and "
                                  f"again to {publish.tag}"))
        publish.id = event_id
        self.by_id[event_id] = publish
        publish.domain.add(event_id, publish.name)
        self.everything.add(event_id, publish.name)

    def fail(self, publish: Publish, maybe: bool) -> None:
        with self.lock:
            self.seq += 1
            publish.status = MAYBE if maybe else REFUSED
            publish.domain.refused += 1
            if maybe:
                publish.domain.unresolved += 1

    def promote(self, publish: Publish, event_id: int) -> None:
        """A publish that may have been stored was seen in a stream: from now on every matching stream needs it."""
        with self.lock:
            self._assign(publish, event_id)
            if publish.status == MAYBE:
                publish.domain.unresolved -= 1
            publish.status = ACKED

    def resolve_absent(self, publish: Publish) -> None:
        """Redis shows this maybe-stored publish was not stored: it no longer takes room in the retained set."""
        with self.lock:
            if publish.status == MAYBE:
                publish.status = ABSENT
                publish.domain.unresolved -= 1

    def take_problems(self) -> list[tuple[str, str]]:
        with self.lock:
            problems, self.problems = self.problems, []
            return problems

    def unresolved(self) -> int:
        return sum(domain.unresolved for domain in self.domains)

    def classify(self, text: str | None, domain: Domain, foreign: bool) -> str:
        """What a stream opened with this Last-Event-ID must start with: "live" (no id), "exact" (replay exactly
        the events after it, no reset), "reset" (a reset, then everything retained) or "either" (the model cannot
        know whether the daemon still holds that id: both are right if what follows is)."""
        if text is None:
            return "live"
        if not (text.isascii() and text.isdigit() and len(text) <= 20):
            return "reset"
        value = int(text)
        if foreign:  # from an earlier process lifetime (memory mode): never honoured
            return "reset"
        everything = self.everything.ids
        if everything and value > everything[-1] + FUTURE_MARGIN // 2:
            return "reset"
        ids = domain.ids
        if not ids:
            return "reset" if self.mode == "memory" else "either"
        if value > ids[-1]:
            return "either" if self.redis else "reset"
        index = bisect.bisect_left(ids, value)
        floor = domain.floor_index()
        if floor == len(ids):
            return "either"  # nothing must be retained (history_size 0 at some point)
        if ids[index] == value:
            if index >= floor - 1:
                return "exact"
            return "either"
        if ids[index] == value + 1:  # the predecessor of a retained (or evicted) event
            return "exact" if index == floor == 0 and len(self.domains) == 1 and not self.redis else "either"
        if self.redis or domain.unresolved:
            return "either"
        return "reset"


# =================================================================================================================
# Processes: the daemon, redis-server, the namespace that holds the small disk.
# =================================================================================================================

def render_config(values: dict) -> str:
    """TOML: JSON literals are valid TOML for strings, numbers, booleans and lists of strings."""
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def clean_env() -> dict:
    env = dict(os.environ)
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    return env


class DaemonProcess:
    """One daemon lifetime: `python3 -m sseserver -c CONFIG`, maybe behind wrappers (nsenter into the tmpfs
    namespace, strace injecting faults). Knows its log, port, real pid (the wrappers' child under strace) and the
    fd and thread counts it started with."""

    def __init__(self, label: str, config_path: str, log_path: str, wrapper: list[str], redis_port: int | None):
        self.label = label
        self.config_path = config_path
        self.log_path = log_path
        self.wrapper = wrapper
        self.redis_port = redis_port
        self.lines: list[str] = []
        self.port = None
        self.pid = None
        self.process = None
        self.baseline = None  # (fds, threads) right after the start, before any client
        self.checked_lines = 0
        self.slow_explained = 0  # "dropped as slow" log lines already matched to a stream that ended
        self._listening = threading.Event()
        self._pump = None

    def start(self) -> None:
        argv = self.wrapper + [sys.executable, "-m", "sseserver", "-c", self.config_path]
        self.process = subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self._pump = threading.Thread(target=self._read_log, name="chaos-log", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening.wait(POLL):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.poll()
                raise StartFailed(f"{self.label} did not start (exit {self.process.returncode}): "
                                  + " | ".join(self.lines[-8:]))
        self.pid = self._find_pid(deadline)
        self.baseline = (self.fd_count()[0], self.thread_count())

    def _read_log(self) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"--- {self.label} started: {' '.join(self.wrapper)} ---\n")
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                log.write(f"[{self.label}] {line}\n")
                log.flush()
                if self.port is None and "listening on http://" in line:
                    self.port = int(line.split("listening on http://")[1].split(" ")[0].rsplit(":", 1)[1])
                    self._listening.set()

    def _find_pid(self, deadline: float) -> int:
        """The python process itself: the Popen pid, or (under strace) the descendant running sseserver."""
        while True:
            frontier = [self.process.pid]
            while frontier:
                pid = frontier.pop()
                if self._is_python(pid):
                    return pid
                try:
                    for task in os.listdir(f"/proc/{pid}/task"):
                        with open(f"/proc/{pid}/task/{task}/children") as handle:
                            frontier.extend(int(child) for child in handle.read().split())
                except OSError:
                    continue
            if time.monotonic() > deadline:
                raise StartFailed(f"{self.label}: cannot find the daemon's pid")
            time.sleep(POLL)

    @staticmethod
    def _is_python(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            return False
        return bool(argv) and b"python" in os.path.basename(argv[0]) and b"sseserver" in argv

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            try:
                self.process.kill()  # strace too, if it outlived its tracee
            except OSError:
                pass
            self.process.wait(IO_TIMEOUT)
        if self._pump is not None:
            self._pump.join(IO_TIMEOUT)

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if text in line)

    def slow_drops(self) -> int:
        return self.count("dropped as slow")

    def fd_count(self) -> tuple[int, list[str]]:
        """(fds that are not connections to Redis, all fd targets). Redis connections are pooled by design
        (bounded); they are checked separately."""
        redis_inodes = self._redis_inodes()
        targets = []
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    targets.append(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            return 0, []
        own = [t for t in targets if not (t.startswith("socket:[") and t[8:-1] in redis_inodes)]
        return len(own), targets

    def redis_connections(self) -> int:
        inodes = self._redis_inodes()
        count = 0
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                except OSError:
                    continue
                count += target.startswith("socket:[") and target[8:-1] in inodes
        except OSError:
            pass
        return count

    def _redis_inodes(self) -> set[str]:
        if self.redis_port is None:
            return set()
        inodes = set()
        try:
            with open(f"/proc/{self.pid}/net/tcp") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    if int(fields[2].split(":")[1], 16) == self.redis_port:
                        inodes.add(fields[9])
        except (OSError, StopIteration, IndexError, ValueError):
            pass
        return inodes

    def thread_count(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return 0


class StartFailed(Exception):
    pass


class TmpfsHolder:
    """A private mount namespace with a small tmpfs at `directory`, held open by a sleeping process for the whole
    run. Daemons are started inside it with nsenter, so the history file lives on a disk the test can fill (through
    /proc/PID/root) and survives the daemon's restarts and crashes."""

    def __init__(self, directory: str, size: int):
        self.directory = directory
        self.size = size
        self.process = None
        self.filler_bytes = 0

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        user = [] if os.geteuid() == 0 else ["-r"]
        script = (f"mount -t tmpfs -o size={self.size},mode=0700 chaos-disk '{self.directory}' && echo ready "
                  "&& exec sleep 1000000")
        self.process = subprocess.Popen(["unshare", *user, "-m", "--propagation", "private", "sh", "-c", script],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            error = self.process.stderr.read1(4096) if self.process.poll() is not None else b""
            self.stop()
            raise StartFailed(f"cannot mount a tmpfs in a private mount namespace: {error!r}")

    def enter(self) -> list[str]:
        user = [] if os.geteuid() == 0 else ["-U", "--preserve-credentials"]
        # setns() into a mount namespace moves the working directory to its root: name ours again.
        return ["nsenter", "-t", str(self.process.pid), *user, "-m", f"--wd={ROOT}", "--"]

    def path(self, name: str) -> str:
        """The namespace's file as the test (outside the namespace) reaches it."""
        return f"/proc/{self.process.pid}/root{self.directory}/{name}"

    def fill(self, leave_free: int) -> None:
        """Fill the disk, then give back `leave_free` bytes (tmpfs counts whole pages)."""
        path = self.path("filler")
        chunk = b"\0" * (1 << 20)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                try:
                    if os.write(fd, chunk) < len(chunk):
                        continue  # a short write: the next one meets ENOSPC
                except OSError:
                    break
            size = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, size - leave_free))
        finally:
            os.close(fd)
        self.filler_bytes = max(0, size - leave_free)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path("filler"))
        self.filler_bytes = 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(IO_TIMEOUT)


class RedisServer:
    """A throwaway redis-server on a unix socket in `directory`: without persistence, or with appendonly and
    appendfsync always (then a restart, even after kill -9, keeps every event it acknowledged)."""

    def __init__(self, directory: str, persistent: bool):
        self.directory = directory
        self.persistent = persistent
        self.socket = os.path.join(directory, "redis.sock")
        self.process = None
        os.makedirs(directory, exist_ok=True)

    def start(self) -> None:
        argv = [shutil.which("redis-server"), "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
                "--dir", self.directory, "--save", "", "--logfile", os.path.join(self.directory, "redis.log"),
                "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + REDIS_TIMEOUT
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, RedisReplyError):
                pass  # not listening yet, or -LOADING the append-only file
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise StartFailed("redis-server did not answer PING")
            time.sleep(POLL)

    def stop(self, how: str) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
            self.process.wait(REDIS_TIMEOUT)

    def command(self, *args: str):
        """One command over a fresh connection; a minimal RESP client of our own (the daemon's is under test)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect(self.socket)
            request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
            sock.sendall(request)
            return self._reply(sock.makefile("rb"))

    def _reply(self, reply):
        first = reply.readline()
        if first.startswith(b"-"):
            raise RedisReplyError(first[1:].decode().strip())
        if first.startswith(b"+"):
            return first[1:].decode().strip()
        if first.startswith(b":"):
            return int(first[1:])
        if first.startswith(b"$"):
            length = int(first[1:])
            return None if length < 0 else reply.read(length + 2)[:-2].decode("utf-8", "replace")
        if first.startswith(b"*"):
            length = int(first[1:])
            return None if length < 0 else [self._reply(reply) for _ in range(length)]
        raise RedisReplyError(f"unexpected reply {first!r}")


class RedisReplyError(Exception):
    pass


# =================================================================================================================
# HTTP: one request per connection (so Content-Length can be checked against the bytes that really came), and
# keep-alive publishers (a connection is one request thread in the daemon: strace counts its calls per thread).
# =================================================================================================================

class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class NoAnswer(Exception):
    """No response came back. `sent`: the request went out, so the daemon may have acted on it."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


def _head_and_body(sock: socket.socket, buffer: bytearray, deadline: float, until_close: bool) -> Response:
    while b"\r\n\r\n" not in buffer:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    body = bytearray(rest)
    if status in (100,):
        buffer[:] = body
        return _head_and_body(sock, buffer, deadline, until_close)
    while (until_close or length < 0) or len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    if length >= 0 and not until_close:
        buffer[:] = body[length:]
        body = body[:length]
    else:
        buffer.clear()
    response = Response(status, headers, bytes(body))
    response.length_ok = length < 0 or length == len(body)
    return response


def http(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = IO_TIMEOUT) -> Response:
    """One request with Connection: close; the body is read to the end, so a wrong Content-Length shows."""
    lines = [f"{method} {target} HTTP/1.1", "Host: chaos", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        raise NoAnswer(f"connect: {exc}", sent=False) from None
    with sock:
        try:
            sock.sendall(raw)
        except OSError as exc:
            raise NoAnswer(f"send: {exc}", sent=True) from None
        try:
            return _head_and_body(sock, bytearray(), time.monotonic() + timeout, until_close=True)
        except (OSError, ValueError, IndexError) as exc:
            raise NoAnswer(f"no response: {exc}", sent=True) from None


class KeepAlive:
    """A publisher that keeps its connection between publishes, as a backend does."""

    def __init__(self, port: int):
        self.port = port
        self.sock = None
        self.buffer = bytearray()

    def request(self, target: str, body: bytes, headers: dict) -> Response:
        if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
            # Readable while idle: the server closed it (keepalive_timeout, a stop). A client must not send a
            # request into that race, so, like every HTTP client library, open a new connection.
            self.close()
        if self.sock is None:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
            except OSError as exc:
                raise NoAnswer(f"connect: {exc}", sent=False) from None
            self.buffer = bytearray()
        lines = [f"POST {target} HTTP/1.1", "Host: chaos", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            response = _head_and_body(self.sock, self.buffer, time.monotonic() + IO_TIMEOUT, until_close=False)
        except (OSError, ValueError, IndexError) as exc:
            self.close()
            raise NoAnswer(f"keep-alive: {exc}", sent=True) from None
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# =================================================================================================================
# Instances and streams as the runner sees them.
# =================================================================================================================

class Instance:
    """A daemon slot (0, and 1 for the second Redis instance) and its current lifetime."""

    def __init__(self, slot: int):
        self.slot = slot
        self.daemon: DaemonProcess | None = None
        self.lifetime = 0
        self.domain: Domain | None = None  # memory mode: this lifetime's events
        self.history_sizes: set[int] = set()  # the history_size in force (two while a reload is ambiguous)
        self.start_history_size = 0
        self.wrapper = "plain"
        self.keepalive: KeepAlive | None = None
        self.stopping = False

    @property
    def name(self) -> str:
        return f"instance {self.slot} (lifetime {self.lifetime})"


class Watch:
    """The model's view of one stream: what it asked for, where it must start, and how far it has been checked."""

    def __init__(self, number: int, instance: Instance, stream, names: frozenset, last_id: str | None,
                 start: str, domain: Domain, gap_space: Index, sent_seq: int, why: str):
        self.number = number
        self.instance = instance
        self.daemon = instance.daemon
        self.stream = stream
        self.names = names
        self.last_id = last_id
        self.start = start
        self.domain = domain
        self.gap_space = gap_space
        self.sent_seq = sent_seq
        self.sure_seq = None  # the response head came back: every publish sent after this is live for it
        self.sure_max_id = 0
        self.must_floor = None  # the oldest id that had to be retained when it subscribed
        self.must_count = 0
        self.replay_target = None  # the newest matching id its replay must reach
        self.why = why  # how it was opened, for messages
        self.stalled = False
        self.was_stalled = False
        self.closed_by = None  # "fin" / "rst": the test closed it
        self.end_expected = None  # "stop" / "kill": its daemon went away
        self.end_noted = False
        self.checked = 0  # items validated
        self.scanned = 0  # items looked at for the newest event id
        self.newest_seen = 0
        self.reported_missing = 0  # a missing event is reported once per stream
        self.last_event = None  # id of the last event delivered
        self.prev = None  # where the next gap check starts (last event, a heartbeat's id, or the Last-Event-ID)
        self.gap_ok = False  # right after a reset: a gap is allowed once
        self.seen_any = False
        self.leading_reset = False  # the replay began with its sseserver.reset
        self.resets = 0  # other resets: gap notices

    def describe(self) -> str:
        names = "all" if len(self.names) == len(NAMES) else ",".join(sorted(self.names))
        return (f"stream #{self.number} on {self.instance.name} [{self.why}; names={names}; "
                f"Last-Event-ID={self.last_id!r} -> {self.start}]")

    def open(self) -> bool:
        return not self.stream.ended and self.closed_by is None and self.end_expected is None


# =================================================================================================================
# The runner.
# =================================================================================================================

@dataclasses.dataclass
class Violation:
    step: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"step {self.step}: [{self.kind}] {self.message}"


class Chaos:
    def __init__(self, mode: str, seed: int, steps: int, verbose: bool = False, keep_going: bool = False,
                 only: set[int] | None = None, out=sys.stdout, workdir: str | None = None, keep: bool = False):
        assert mode in MODES, mode
        self.mode, self.seed, self.steps = mode, seed, steps
        self.verbose, self.keep_going, self.only, self.out = verbose, keep_going, only, out
        self.keep = keep  # keep the work directory (daemon logs, history file) even when nothing failed
        self.redis_mode = mode.startswith("redis")
        self.file_mode = mode.startswith("file")
        self.initial_config, self.plan = make_plan(mode, seed, steps)
        self.model = Model(mode)
        self.violations: list[Violation] = []
        self.executed: list[tuple[int, Op]] = []
        self.faults: dict[str, int] = {}
        self.stats: dict[str, int] = {}
        self.step = -1
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"chaos-{mode}-{seed}-")
        self.log_path = os.path.join(self.workdir, "daemons.log")
        self.config_path = os.path.join(self.workdir, "sseserver.toml")
        self.config = dict(self.initial_config)
        self.instances: list[Instance] = [Instance(0), Instance(1)]
        self.watches: list[Watch] = []
        self.retired: list[Watch] = []
        self.watch_numbers = 0
        self.reader = None
        self.holder = None
        self.redis = None
        self.proxy = None
        self.disk_full = False
        self.redis_fault = None  # "down", "reset", "blackhole", or None
        self.previous_ids: list[int] = []  # last ids of earlier lifetimes/epochs ("previous" Last-Event-IDs)
        self.started = time.monotonic()

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def violate(self, kind: str, message: str) -> None:
        violation = Violation(self.step, kind, message)
        self.violations.append(violation)
        print(f"VIOLATION {violation}", file=self.out, flush=True)

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def count(self, kind: str, n: int = 1) -> None:
        self.stats[kind] = self.stats.get(kind, 0) + n

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"  {time.monotonic() - self.started:7.2f}s {text}", file=self.out, flush=True)

    def running(self) -> list[Instance]:
        return [inst for inst in self.instances if inst.daemon is not None and inst.daemon.alive()]

    def pick_instance(self, fraction: float) -> Instance | None:
        running = self.running()
        return running[int(fraction * len(running)) % len(running)] if running else None

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self) -> bool:
        print(f"chaos: mode={self.mode} seed={self.seed} steps={self.steps} workdir={self.workdir}", file=self.out,
              flush=True)
        try:
            self.setup()
            for index, op in enumerate(self.plan):
                if self.only is not None and index not in self.only:
                    continue
                self.step = index
                self.executed.append((index, op))
                self.log(f"step {index}: {op}")
                self.apply(op)
                self.check()
                if self.violations and not self.keep_going:
                    break
            self.step = len(self.plan)
            if not self.violations or self.keep_going:
                self.finish()
        except StartFailed as exc:
            self.violate("daemon cannot start", str(exc))
        finally:
            self.teardown()
        self.report()
        return not self.violations

    def setup(self) -> None:
        self.reader = StreamReader()
        if self.file_mode:
            self.holder = TmpfsHolder(os.path.join(self.workdir, "disk"), TMPFS_SIZE)
            self.holder.start()
        if self.redis_mode:
            self.redis = RedisServer(os.path.join(self.workdir, "redis"), persistent=self.mode == "redis-aof")
            self.redis.start()
            self.proxy = TcpProxy(self.redis.socket).start()
        self.write_config()
        self.start_instance(self.instances[0], "plain")

    def history_path(self) -> str:
        return os.path.join(self.holder.directory, "history.log")

    def write_config(self) -> None:
        values = {
            "host": "127.0.0.1", "port": 0, "log_level": "info",
            "history_size": self.config["history_size"], "queue_size": self.config["queue_size"],
            "heartbeat_interval": self.config["heartbeat_interval"], "retry_ms": RETRY_MS,
            "max_message_bytes": LIMIT, "shutdown_timeout": SHUTDOWN_TIMEOUT,
            # Far beyond any step's waits, so the daemon never closes an idle keep-alive publisher just as it
            # sends (a race every HTTP client has, and not the one under test).
            "keepalive_timeout": 300.0,
            # One line per ended stream says why ("dropped as slow"): how the test tells a stream dropped for
            # being slow from one that ended for no documented reason, even after the daemon has exited.
            "access_log": True,
        }
        if self.file_mode:
            values.update(history_file=self.history_path(), history_fsync=self.mode.split("-")[1],
                          history_fsync_interval=FSYNC_INTERVAL)
        if self.redis_mode:
            values["redis_url"] = f"redis://127.0.0.1:{self.proxy.port}/0"
        if self.config["tokens"]:
            values["publish_tokens"] = [PUBLISH_TOKEN]
            values["subscribe_tokens"] = [SUBSCRIBE_TOKEN, f"{SCOPED_TOKEN} {SCOPE}"]
        temp = self.config_path + ".tmp"
        with open(temp, "w") as handle:
            handle.write(render_config(values))
        os.replace(temp, self.config_path)  # a reload never reads half a file

    def wrapper_argv(self, wrapper: str, when: str = "1+") -> list[str]:
        argv = self.holder.enter() if self.holder else []
        if wrapper in ("fsync", "write"):
            path = self.history_path()
            error = "EIO" if wrapper == "fsync" else "ENOSPC"
            argv += [shutil.which("strace") or "strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null",
                     "-e", f"trace={wrapper}", "-P", path, "-P", path + ".compact",
                     "-e", f"inject={wrapper}:error={error}:when={when}"]
        return argv

    def start_instance(self, inst: Instance, wrapper: str, when: str = "1+") -> None:
        inst.lifetime += 1
        inst.wrapper = wrapper
        inst.stopping = False
        inst.keepalive = None
        label = f"instance {inst.slot} lifetime {inst.lifetime}"
        inst.daemon = DaemonProcess(label, self.config_path, self.log_path, self.wrapper_argv(wrapper, when),
                                    self.proxy.port if self.proxy else None)
        inst.history_sizes = {self.config["history_size"]}
        inst.start_history_size = self.config["history_size"]
        if self.mode == "memory":
            if self.model.domain.ids:
                self.previous_ids.append(self.model.domain.ids[-1])
            inst.domain = self.model.new_domain(f"lifetime {inst.lifetime}")
        else:
            inst.domain = self.model.domain
        inst.daemon.start()
        self.log(f"{label} listening on {inst.daemon.port} (pid {inst.daemon.pid}, wrapper {wrapper})")
        self.raise_floors()
        inst.keepalive = KeepAlive(inst.daemon.port)
        if self.redis_mode and self.redis_fault is None:
            self.wait_caught_up(inst)
        if self.redis_mode and self.redis_fault is not None:
            return  # its follower cannot have the history yet
        # Replay right after a start: a reset and everything retained must come back (the must-set check).
        probe = self.subscribe(inst, None, "garbage-after-start", GARBAGE_IDS[inst.lifetime % len(GARBAGE_IDS)],
                               foreign=False, query=False, scoped=False, stalled=False)
        if self.redis_mode:
            self.resolve_from_redis()
        elif self.file_mode and probe is not None:
            self.resolve_from_replay(inst, probe)

    def resolve_from_replay(self, inst: Instance, probe: Watch) -> None:
        """After a crash with publishes in flight (no answer: maybe stored), the full replay of the new lifetime
        shows which of them reached the history file. Those it shows become ordinary events; those it does not,
        although they would be retained, were not stored. Either way they stop weakening the retention check."""
        maybes = [p for p in list(self.model.publishes.values())
                  if p.status == MAYBE and p.domain is self.model.domain]
        if not maybes:
            return
        health = self.health(inst) or {}
        last = health.get("last_event_id")
        newest = int(last) if isinstance(last, str) and last.isdigit() else 0

        def replayed() -> bool:
            for item in probe.stream.items:
                if not isinstance(item, Event):
                    continue
                if item.name == "sseserver.reset" and '"oldest_id": null' in item.data:
                    return True  # nothing is retained (history_size 0): nothing to wait for
                if item.name != "sseserver.reset" and item.id.isdigit() and int(item.id) >= newest:
                    return True
            return probe.stream.ended

        if not self.reader.wait(replayed, SETTLE_TIMEOUT) or probe.stream.ended:
            return  # the checks after this step report what is missing
        self.promote_maybes()
        with self.reader.lock:
            resets = [i for i in probe.stream.items if isinstance(i, Event) and i.name == "sseserver.reset"]
        try:
            oldest = json.loads(resets[0].data)["oldest_id"] if resets else None
        except (ValueError, KeyError, TypeError):
            return
        if oldest is None or not str(oldest).isdigit():
            return
        for publish in maybes:
            if publish.status == MAYBE and publish.id_floor >= int(oldest):
                self.model.resolve_absent(publish)
                self.count("maybe-stored publishes absent from the replay")

    def raise_floors(self) -> None:
        """After every acknowledgement and every change of history_size: the oldest event that must still be
        retained. In Redis mode the stream is trimmed by each instance's history_size at its start (MAXLEN ~,
        which keeps at least that many) and each instance's ring by its current one: the smallest counts."""
        running = self.running()
        sizes = [size for inst in running for size in inst.history_sizes]
        if self.redis_mode:
            sizes += [inst.start_history_size for inst in running]
        if not sizes:
            return
        with self.model.lock:
            if self.mode == "memory":
                for inst in running:
                    inst.domain.raise_floor(min(inst.history_sizes))
            else:
                self.model.domain.raise_floor(min(sizes))

    def teardown(self) -> None:
        for watch in self.watches:
            if not watch.stream.closed and not watch.stream.ended:
                with contextlib.suppress(OSError):
                    watch.stream.sock.close()
        for inst in self.instances:
            if inst.keepalive:
                inst.keepalive.close()
            if inst.daemon is not None:
                inst.daemon.kill()
        if self.reader:
            self.reader.stop()
        if self.proxy:
            self.proxy.stop()
        if self.redis:
            self.redis.stop("kill")
        if self.holder:
            self.holder.stop()

    # -- operations ----------------------------------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        getattr(self, "do_" + op.kind)(**op.args)

    def headers_for_publish(self) -> dict:
        return {"Authorization": f"Bearer {PUBLISH_TOKEN}"} if self.config["tokens"] else {}

    def store_fault(self, inst: Instance) -> bool:
        """A fault is active that may make a publish answer 503."""
        if self.file_mode:
            return self.disk_full or inst.wrapper != "plain"
        if self.redis_mode:
            return self.redis_fault is not None
        return False

    def publish(self, inst: Instance, spec: tuple, keepalive: KeepAlive | None) -> None:
        """One publish, judged by its answer; the model learns what was acknowledged."""
        tag, name, body = make_payload(spec, self.model.max_acked + 1)
        target = "/publish" if name == "message" and spec[4] % 2 else f"/publish?event={name}"
        publish = self.model.begin(tag, name, body, inst.name)
        oversize = len(body) > LIMIT
        stopping = inst.stopping
        try:
            if keepalive is not None:
                response = keepalive.request(target, body, self.headers_for_publish())
            else:
                response = http(inst.daemon.port, "POST", target, body, self.headers_for_publish())
        except NoAnswer as exc:
            self.model.fail(publish, maybe=exc.sent)
            if not (stopping or self.store_fault(inst) or not inst.daemon.alive() or inst.stopping):
                self.violate("publish got no answer", f"{inst.name}: {exc}")
            return
        status = response.status
        self.check_response(response, f"POST {target}")
        if status == 200 and not oversize:
            try:
                reply = response.json()
                event_id = int(reply["id"]) if str(reply["id"]).isdigit() else None
            except (ValueError, KeyError, TypeError):
                event_id = None
            if event_id is None:
                self.model.fail(publish, maybe=True)
                self.violate("bad publish reply", f"{response.body[:200]!r}")
                return
            self.model.acknowledge(publish, event_id)
            self.raise_floors()
            return
        self.model.fail(publish, maybe=self.redis_mode and status == 503)
        if oversize and status == 413:
            return
        if status == 503 and (stopping or inst.stopping or self.store_fault(inst)):
            self.count("publish 503 under a fault")
            return
        self.violate("unexpected publish status", f"{inst.name}: {status} for a {len(body)}-byte publish of "
                     f"{name!r} ({spec[2]}; expected {413 if oversize else 200}): {response.body[:200]!r}")

    def check_response(self, response: Response, what: str) -> None:
        if response.status >= 500 and response.status != 503:
            self.violate("5xx", f"{what} answered {response.status}: {response.body[:300]!r}")
        if not getattr(response, "length_ok", True):
            self.violate("content-length", f"{what}: Content-Length {response.headers.get('content-length')} "
                         f"but {len(response.body)} body bytes")

    def do_publish(self, instance: float, payload: tuple, keepalive: bool) -> None:
        inst = self.pick_instance(instance)
        if inst is None:
            return
        self.count("publishes")
        self.publish(inst, payload, inst.keepalive if keepalive else None)

    def run_burst(self, inst: Instance, payloads: list, during=None) -> None:
        """Publishers on several threads at once (each its own keep-alive connection); `during()` runs on this
        thread once the burst is under way (a kill, a stop, a cut)."""
        done = threading.Event()
        acknowledged_before = self.model.acknowledged

        def publisher(specs):
            connection = KeepAlive(inst.daemon.port)
            for spec in specs:
                if done.is_set() and during is None:
                    break
                self.publish(inst, spec, connection)
            connection.close()

        threads = [threading.Thread(target=publisher, args=(specs,), name="chaos-publisher") for specs in payloads]
        for thread in threads:
            thread.start()
        if during is not None:
            # Let a few publishes through first, so the fault lands in the middle of the burst.
            wanted = acknowledged_before + min(3, sum(len(p) for p in payloads))
            deadline = time.monotonic() + BURST_TIMEOUT
            while (self.model.acknowledged < wanted and time.monotonic() < deadline
                   and any(t.is_alive() for t in threads)):
                time.sleep(POLL)
            during()
        for thread in threads:
            thread.join(BURST_TIMEOUT + IO_TIMEOUT)
            if thread.is_alive():
                self.violate("burst hung", f"a publisher thread did not finish within {BURST_TIMEOUT}s")
        done.set()
        self.count("publishes", sum(len(p) for p in payloads))

    def do_burst(self, instance: float, payloads: list) -> None:
        inst = self.pick_instance(instance)
        if inst is not None:
            self.run_burst(inst, payloads)

    def resolve_last_id(self, kind: str, pick: float, inst: Instance) -> tuple[str | None, bool]:
        """(Last-Event-ID to send, whether it comes from an earlier memory-mode lifetime)."""
        domain = inst.domain if self.mode == "memory" else self.model.domain
        ids = domain.ids
        if kind == "current":
            candidates = [w for w in self.watches + self.retired[-20:] if w.instance is inst or self.redis_mode]
            if not candidates:
                return None, False
            watch = candidates[int(pick * len(candidates)) % len(candidates)]
            with self.reader.lock:
                last = watch.stream.parser.last_id
            foreign = self.mode == "memory" and watch.daemon is not inst.daemon
            return (last or None), foreign
        if kind == "stale" and ids:
            return str(ids[int(pick * len(ids)) % len(ids)]), False
        if kind == "previous" and self.previous_ids:
            return str(self.previous_ids[int(pick * len(self.previous_ids)) % len(self.previous_ids)]), \
                self.mode == "memory"
        if kind == "future":
            return str(max(self.model.everything.ids[-1:] or [0]) + FUTURE_MARGIN), False
        if kind == "garbage":
            return GARBAGE_IDS[int(pick * len(GARBAGE_IDS)) % len(GARBAGE_IDS)], False
        if kind == "zero":
            return "0", False
        if kind == "newest" and ids:
            return str(ids[-1]), False
        return None, False

    def do_subscribe(self, instance: float, names, last: str, pick: float, query: bool, scoped: bool,
                     stalled: bool) -> None:
        inst = self.pick_instance(instance)
        if inst is None:
            return
        last_id, foreign = self.resolve_last_id(last, pick, inst)
        self.subscribe(inst, names, last, last_id, foreign, query, scoped, stalled)

    def subscribe(self, inst: Instance, names, why: str, last_id: str | None, foreign: bool, query: bool,
                  scoped: bool, stalled: bool) -> Watch | None:
        model = self.model
        tokens = self.config["tokens"]
        accepted = frozenset(names) if names else frozenset(NAMES)
        if tokens and scoped:
            accepted = frozenset(n for n in accepted if fnmatch.fnmatchcase(n, SCOPE))
        outside_scope = tokens and scoped and names and any(not fnmatch.fnmatchcase(n, SCOPE) for n in names)
        params = [("event", n) for n in names or ()]
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            if query:
                params.append(("last_event_id", last_id))
            else:
                headers["Last-Event-ID"] = last_id
        if tokens:
            token = SCOPED_TOKEN if scoped else SUBSCRIBE_TOKEN
            if query:
                params.append(("token", token))
            else:
                headers["Authorization"] = f"Bearer {token}"
        from urllib.parse import urlencode
        target = "/subscribe" + ("?" + urlencode(params) if params else "")
        domain = inst.domain if self.mode == "memory" else model.domain
        start = model.classify(last_id, domain, foreign)
        self.watch_numbers += 1
        gap_space = domain if self.mode == "memory" else model.everything
        watch = Watch(self.watch_numbers, inst, None, accepted, last_id, start, domain, gap_space, model.tick(),
                      f"{why}{' stalled' if stalled else ''}")
        must = domain.must()
        watch.must_floor = must[0] if must else None
        watch.must_count = len(must)
        matching_must = [i for i in must if model.by_id[i].name in accepted]
        if matching_must and start != "live":
            target_id = matching_must[-1]
            if start == "reset" or target_id > int(last_id):
                watch.replay_target = target_id
        try:
            status, response_headers, stream = open_stream(inst.daemon.port, target, headers, IO_TIMEOUT,
                                                           rcvbuf=4096 if stalled else None)
        except OSError as exc:
            if inst.daemon.alive() and not inst.stopping:
                self.violate("subscribe failed", f"{inst.name} {target}: {exc}")
            return None
        watch.sure_seq = model.tick()
        watch.sure_max_id = model.max_acked
        expected = 403 if outside_scope else 200
        if status != expected or (status == 200 and not hasattr(stream, "items")):
            body = stream if isinstance(stream, bytes) else b"(a stream)"
            if status >= 500 and status != 503:
                self.violate("5xx", f"GET {target} answered {status}: {body[:200]!r}")
            else:
                self.violate("unexpected subscribe status", f"GET {target} with {headers}: {status} (expected "
                             f"{expected}): {body[:200]!r}")
            if hasattr(stream, "sock"):
                stream.sock.close()
            return None
        if status != 200:
            return None
        if "content-length" in response_headers:
            self.violate("stream turned away", f"GET {target}: a 200 with Content-Length (a turn-away) although "
                         f"max_subscribers is far away")
        watch.stream = stream
        watch.stalled = watch.was_stalled = stalled
        self.watches.append(watch)
        self.reader.add(stream, active=not stalled)
        self.count("streams opened")
        if stalled:
            self.fault("stalled reader")
        return watch

    def pick_watch(self, fraction: float, condition) -> Watch | None:
        candidates = [w for w in self.watches if condition(w)]
        return candidates[int(fraction * len(candidates)) % len(candidates)] if candidates else None

    def do_disconnect(self, pick: float, how: str) -> None:
        watch = self.pick_watch(pick, lambda w: w.open())
        if watch is None:
            return
        watch.closed_by = how
        self.reader.close(watch.stream, how)
        self.fault(f"client disconnect ({how.upper()})")

    def do_resume(self, pick: float) -> None:
        watch = self.pick_watch(pick, lambda w: w.stalled and w.closed_by is None)
        if watch is None:
            return
        watch.stalled = False
        self.reader.resume(watch.stream)

    def do_reload(self, history_size: int, queue_size: int, heartbeat_interval: float, tokens: bool) -> None:
        self.config.update(history_size=history_size, queue_size=queue_size, heartbeat_interval=heartbeat_interval,
                           tokens=tokens)
        self.write_config()
        for inst in self.running():
            daemon = inst.daemon
            before = len(daemon.lines)
            done = daemon.count("reloaded") + daemon.count("reload failed")
            daemon.signal(signal.SIGHUP)
            self.fault("SIGHUP reload")
            deadline = time.monotonic() + IO_TIMEOUT
            while daemon.count("reloaded") + daemon.count("reload failed") == done:
                if time.monotonic() > deadline or not daemon.alive():
                    self.violate("reload not done", f"{inst.name}: no 'reloaded' log line within {IO_TIMEOUT}s")
                    break
                time.sleep(POLL)
            lines = daemon.lines[before:]
            if any("reload failed" in line for line in lines):
                self.violate("reload failed", f"{inst.name}: a valid config was refused: {lines}")
                continue
            ignored = any("history_size" in line and "ignored" in line for line in lines)
            if not ignored:
                inst.history_sizes = {history_size}
        self.raise_floors()

    def do_restart(self, instance: float, how: str, burst, wrapper: str, when: str = "1+") -> None:
        inst = self.pick_instance(instance)
        if inst is None:
            inst = self.instances[0]  # it died: bring it back
            if inst.daemon is not None and inst.daemon.alive():
                return
            self.start_instance(inst, wrapper, when)
            return
        self.stop_instance(inst, how, burst)
        if wrapper != "plain":
            self.fault(f"{wrapper} errors (strace inject when={when})")
        self.start_instance(inst, wrapper, when)

    def stop_instance(self, inst: Instance, how: str, burst=None) -> None:
        """SIGTERM (every stream gets everything acknowledged, then `retry:` and an end; exit 0) or kill -9."""
        daemon = inst.daemon
        self.fault("SIGTERM restart" if how == "term" else "kill -9 restart")
        for watch in self.watches:
            if watch.daemon is daemon and watch.end_expected is None:
                watch.end_expected = "stop" if how == "term" else "kill"

        def stop():
            inst.stopping = True
            daemon.signal(signal.SIGTERM if how == "term" else signal.SIGKILL)

        if burst:
            self.fault(f"{'SIGTERM' if how == 'term' else 'kill -9'} during a publish burst")
            self.run_burst(inst, burst, during=stop)
        else:
            stop()
        code = daemon.wait(SHUTDOWN_TIMEOUT + IO_TIMEOUT)
        if code is None:
            self.violate("stop hung", f"{inst.name} still running {SHUTDOWN_TIMEOUT + IO_TIMEOUT}s after "
                         f"{'SIGTERM' if how == 'term' else 'SIGKILL'}")
            daemon.kill()
        elif how == "term" and code != 0:
            kind = "exit code under a store fault" if self.store_fault(inst) else "exit code"
            self.violate(kind, f"{inst.name} exited {code} after SIGTERM: {daemon.lines[-5:]}")
        daemon.kill()  # reaps strace and the log pump
        if inst.keepalive:
            inst.keepalive.close()
        if how == "term":
            self.check_graceful_ends(inst, daemon)
        for watch in self.watches:
            if watch.daemon is daemon and not watch.stream.ended and watch.closed_by is None:
                watch.closed_by = "rst"
                self.reader.close(watch.stream, "rst")
        self.check_logs()

    def check_graceful_ends(self, inst: Instance, daemon: DaemonProcess) -> None:
        """After SIGTERM: each stream that was being read has every acknowledged matching event (in Redis mode:
        those this instance acknowledged itself), then `retry: N` with N jittered, then the end."""
        watches = [w for w in self.watches if w.daemon is daemon and not w.stalled and w.closed_by is None]
        self.reader.wait(lambda: all(w.stream.ended for w in watches), IO_TIMEOUT)
        self.validate_all()
        for watch in watches:
            stream = watch.stream
            if not stream.ended:
                self.violate("stream not ended at stop", f"{watch.describe()} still open after the daemon exited")
                continue
            match = re.search(rb"retry: (\d+)\n\n$", stream.tail)
            if (stream.end_error or not match) and self.explained_as_slow(watch):
                watch.end_noted = True
                continue
            if stream.end_error or not match:
                self.violate("stop without retry", f"{watch.describe()} ended without `retry:` and a blank line "
                             f"({stream.end_error or 'closed'}); tail {stream.tail[-80:]!r}")
            elif not RETRY_MS <= int(match.group(1)) <= RETRY_MS + 2 * max(RETRY_MS, 1000):
                self.violate("stop retry", f"{watch.describe()}: retry {match.group(1)} outside the jitter range")
            required = self.required_newest(watch, own_only=self.redis_mode)
            if required is not None and (watch.last_event or 0) < required:
                self.violate("stop lost events", f"{watch.describe()} ended at SIGTERM with event "
                             f"{watch.last_event}, without acknowledged event {required} (every event already "
                             f"accepted must be delivered before `retry:`)")
            watch.end_noted = True

    def do_quiesce(self) -> None:
        """Every client goes away; the daemons' fds and threads must return to where they started."""
        for watch in self.watches:
            if watch.closed_by is None and not watch.stream.ended:
                watch.closed_by = "rst" if watch.stalled else "fin"
                self.reader.close(watch.stream, watch.closed_by)
        for inst in self.running():
            if inst.keepalive:
                inst.keepalive.close()
        self.check()
        for inst in self.running():
            daemon = inst.daemon
            fds, threads = daemon.baseline
            deadline = time.monotonic() + QUIESCE_TIMEOUT
            while True:
                now_fds, targets = daemon.fd_count()
                now_threads = daemon.thread_count()
                if now_fds <= fds and now_threads <= threads:
                    break
                if time.monotonic() > deadline:
                    self.violate("leak", f"{inst.name}: {now_fds} fds (baseline {fds}) and {now_threads} threads "
                                 f"(baseline {threads}) {QUIESCE_TIMEOUT}s after every client left; fds: "
                                 f"{sorted(targets)}")
                    break
                time.sleep(POLL * 5)
            if self.redis_mode and daemon.redis_connections() > 12:
                self.violate("redis connections", f"{inst.name}: {daemon.redis_connections()} connections to Redis "
                             f"with no client (the pool is bounded)")
        self.count("quiesce checks")

    def do_bad_requests(self, instance: float, which: tuple) -> None:
        """Requests that must be refused with their documented status, publish nothing, and leave the daemon
        serving."""
        inst = self.pick_instance(instance)
        if inst is None:
            return
        tokens = self.config["tokens"]
        good = self.headers_for_publish()
        port = inst.daemon.port
        for kind in which:
            tag = f"<bad-{self.step}-{kind}>"
            body, target, headers, expected = tag.encode(), "/publish?event=x", dict(good), 400
            if kind == "reserved_name":
                target = "/publish?event=sseserver.reset"
            elif kind == "bad_name":
                target = "/publish?event=bad%20name"
            elif kind == "too_big":
                body, expected = (tag + "z" * LIMIT).encode(), 413
            elif kind == "not_utf8":
                body = tag.encode() + b"\xff\xfe\xc3"
            elif kind == "wrong_token":
                if not tokens:
                    continue
                headers, expected = {"Authorization": "Bearer wrong-token-12345"}, 403
            elif kind == "no_token":
                if not tokens:
                    continue
                headers, expected = {}, 401
            elif kind in ("bad_filter", "scope_outside"):
                if kind == "scope_outside" and not tokens:
                    continue
                query = "event=bad%20name" if kind == "bad_filter" else "event=b"
                auth = {"Authorization": f"Bearer {SCOPED_TOKEN if kind == 'scope_outside' else SUBSCRIBE_TOKEN}"}
                try:
                    response = http(port, "GET", f"/subscribe?{query}", None, auth if tokens else {})
                except NoAnswer as exc:
                    self.violate("no answer", f"GET /subscribe?{query}: {exc}")
                    continue
                self.check_response(response, f"GET /subscribe?{query}")
                want = 400 if kind == "bad_filter" else 403
                if response.status != want:
                    self.violate("unexpected status", f"GET /subscribe?{query}: {response.status}, expected {want}")
                continue
            publish = self.model.begin(tag, "x", body, inst.name)
            try:
                response = http(port, "POST", target, body, headers)
            except NoAnswer as exc:
                self.model.fail(publish, maybe=exc.sent)
                self.violate("no answer", f"{kind}: {exc}")
                continue
            self.model.fail(publish, maybe=False)
            self.check_response(response, f"{kind} publish")
            if response.status != expected:
                self.violate("unexpected status", f"{kind}: {response.status}, expected {expected}: "
                             f"{response.body[:200]!r}")
            self.count("bad requests")

    def do_disk_full(self, free: int) -> None:
        self.holder.fill(free)
        self.disk_full = True
        self.fault("disk full")

    def do_disk_free(self) -> None:
        self.holder.free()
        self.disk_full = False

    def new_epoch(self, why: str) -> None:
        """Redis lost its data: events acknowledged so far may never arrive anywhere (streams that miss them must
        be told), and what must be retained starts again from nothing."""
        if self.model.domain.ids:
            self.previous_ids.append(self.model.domain.ids[-1])
        domain = self.model.new_domain(why)
        for inst in self.instances:
            inst.domain = domain

    def do_redis_stop(self, how: str) -> None:
        self.redis.stop(how)
        self.redis_fault = "down"
        self.fault(f"redis {'SIGTERM' if how == 'term' else 'kill -9'} ({'AOF' if self.redis.persistent else 'no persistence'})")
        if not self.redis.persistent:
            self.new_epoch("redis restarted without persistence")

    def do_redis_start(self) -> None:
        self.redis.start()
        self.redis_fault = None
        for inst in self.running():
            self.wait_caught_up(inst)
        self.resolve_from_redis()

    def resolve_from_redis(self) -> None:
        """Publishes answered 503 (or not at all) in Redis mode may have been stored. Read the stream: a tag that
        is there has its id; one that is not, while the stream still reaches back past the moment it was sent,
        was not stored. Either way it stops weakening what the model can require."""
        maybes = [p for p in list(self.model.publishes.values())
                  if p.status == MAYBE and p.domain is self.model.domain]
        if not maybes:
            return
        try:
            entries = self.redis.command("XRANGE", "sseserver:events", "-", "+")
        except (OSError, RedisReplyError):
            return
        if not entries:
            return
        stored = {}
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2]))
            match = _TAG.match(values.get("d", ""))
            if match:
                stored[match.group(0)] = int(entry_id.split("-")[0])
        oldest = int(entries[0][0].split("-")[0])
        for publish in maybes:
            if publish.tag in stored:
                self.model.promote(publish, stored[publish.tag])
                self.count("maybe-stored publishes found in Redis")
            elif oldest <= publish.id_floor:
                self.model.resolve_absent(publish)
                self.count("maybe-stored publishes absent from Redis")

    def do_flushall(self) -> None:
        self.redis.command("FLUSHALL")
        self.fault("redis FLUSHALL")
        self.new_epoch("FLUSHALL")

    def do_link_cut(self, how: str, burst) -> None:
        inst = self.pick_instance(0.0)
        self.fault(f"redis link cut ({how})")
        if burst and inst is not None:
            self.fault("link cut during a publish burst")
            self.run_burst(inst, burst, during=lambda: self._cut(how))
        else:
            self._cut(how)

    def _cut(self, how: str) -> None:
        self.redis_fault = how
        self.proxy.cut(how)

    def do_link_restore(self) -> None:
        self.proxy.restore()
        self.redis_fault = None
        for inst in self.running():
            self.wait_caught_up(inst)
        self.resolve_from_redis()

    def do_join(self) -> None:
        inst = self.instances[1]
        if inst.daemon is not None and inst.daemon.alive():
            return
        self.fault("second instance joins")
        self.start_instance(inst, "plain")

    def do_leave(self, how: str) -> None:
        inst = self.instances[1]
        if inst.daemon is None or not inst.daemon.alive():
            return
        self.stop_instance(inst, how)

    def wait_caught_up(self, inst: Instance) -> None:
        """Redis mode: the instance's follower is up and has read everything acknowledged in this epoch."""
        newest = self.model.domain.ids[-1] if self.model.domain.ids else 0
        deadline = time.monotonic() + REDIS_TIMEOUT
        health = None
        while time.monotonic() < deadline:
            health = self.health(inst)
            if health is not None and health.get("redis") == "up" and int(health.get("last_event_id") or 0) >= newest:
                return
            time.sleep(POLL * 5)
        self.violate("redis follower", f"{inst.name} not caught up with the stream (newest acknowledged {newest}) "
                     f"within {REDIS_TIMEOUT}s: {health}")

    def health(self, inst: Instance) -> dict | None:
        try:
            response = http(inst.daemon.port, "GET", "/health")
        except NoAnswer:
            return None
        self.check_response(response, "GET /health")
        if response.status != 200:
            if not inst.stopping:
                self.violate("health", f"{inst.name}: /health answered {response.status}: {response.body[:200]!r}")
            return None
        try:
            return response.json()
        except ValueError:
            self.violate("health", f"{inst.name}: /health is not JSON: {response.body[:200]!r}")
            return None

    # -- the checks after every step -----------------------------------------------------------------------------

    def check(self) -> None:
        for kind, message in self.model.take_problems():
            self.violate(kind, message)
        for phase in (self.settle, self.validate_all, self.check_ends, self.check_health, self.check_logs):
            started = time.monotonic()
            phase()
            if time.monotonic() - started > 1.0:
                self.log(f"(slow check: {phase.__name__} took {time.monotonic() - started:.1f}s)")
        for kind, message in self.model.take_problems():
            self.violate(kind, message)

    def required_newest(self, watch: Watch, own_only: bool = False) -> int | None:
        """The newest event id this stream must have received by now (None: nothing required yet)."""
        model = self.model
        domain = watch.domain if self.mode == "memory" else model.domain
        required = None
        newest = domain.newest(watch.names)
        if newest is not None:
            publish = model.by_id[newest]
            if publish.sent_seq > (watch.sure_seq or 0) and (not own_only or publish.instance == watch.instance.name):
                required = newest
            elif own_only:
                for event_id in reversed(domain.between(watch.sure_max_id, None, watch.names)):
                    p = model.by_id[event_id]
                    if p.sent_seq > watch.sure_seq and p.instance == watch.instance.name:
                        required = event_id
                        break
        if watch.replay_target is not None and model.by_id[watch.replay_target].domain is domain:
            required = max(required or 0, watch.replay_target)
        return required

    def promote_maybes(self) -> int:
        """Events whose publish got no clear answer (a Redis 503, a lost reply) that showed up in a stream: from
        now on they are events like any other. A refused publish that shows up is a violation."""
        promoted = 0
        with self.reader.lock:
            snapshot = [(watch, watch.stream.items[watch.checked:]) for watch in self.watches]
        for watch, items in snapshot:
            for item in items:
                if not isinstance(item, Event) or item.name == "sseserver.reset":
                    continue
                if not (item.id.isascii() and item.id.isdigit()):
                    continue
                event_id = int(item.id)
                if event_id in self.model.by_id:
                    continue
                publish = self.find_publish(item)
                if publish is None:
                    continue
                if publish.status in (MAYBE, ABSENT):
                    self.count("maybe-stored publishes seen in a stream" if publish.status == MAYBE
                               else "publishes stored after Redis showed them absent (a held command)")
                    self.model.promote(publish, event_id)
                    promoted += 1
                elif publish.status == REFUSED:
                    publish.status = "refused, yet delivered"
                    self.violate("refused publish delivered", f"{watch.describe()} received {item!r}, whose publish "
                                 f"was answered with an error (a non-200 must mean 'not published')")
        return promoted

    def find_publish(self, item: Event) -> Publish | None:
        match = _TAG.match(item.data)
        if match:
            return self.model.publishes.get(match.group(0))
        for publish in self.model.publishes.values():  # an empty payload has no tag
            if publish.status == MAYBE and publish.wire == item.data and publish.name == item.name:
                return publish
        return None

    def settle(self) -> None:
        """Wait until every stream being read has received every event it must have by now."""
        if self.redis_mode and self.redis_fault is not None:
            return  # events wait in Redis (or are lost) until the link is back; the heal step checks them
        for _ in range(5):
            self.promote_maybes()
            targets = {}
            for watch in self.watches:
                if watch.open() and not watch.stalled:
                    required = self.required_newest(watch)
                    if required is not None and required > watch.reported_missing:
                        targets[watch] = required

            def behind() -> list[Watch]:  # called with the reader's lock held
                late = []
                for watch, required in targets.items():
                    items = watch.stream.items
                    for item in items[watch.scanned:]:
                        if isinstance(item, Event) and item.id.isdigit() and item.name != "sseserver.reset":
                            watch.newest_seen = max(watch.newest_seen, int(item.id))
                    watch.scanned = len(items)
                    if watch.newest_seen < required and not watch.stream.ended:
                        late.append(watch)
                return late

            if self.reader.wait(lambda: not behind(), SETTLE_TIMEOUT):
                if self.promote_maybes():
                    continue  # a newly seen event may be required elsewhere: wait again
                return
            if self.promote_maybes():
                continue
            with self.reader.lock:
                late = behind()
            for watch in late:
                required = targets[watch]
                watch.reported_missing = required
                self.violate("missing events", f"{watch.describe()} has not received acknowledged event {required} "
                             f"({self.model.by_id[required].tag}) within {SETTLE_TIMEOUT}s; newest received "
                             f"{watch.newest_seen or None}")
            return

    def validate_all(self) -> None:
        self.promote_maybes()
        with self.reader.lock:
            snapshot = [(watch, watch.stream.items[watch.checked:]) for watch in self.watches]
        for watch, items in snapshot:
            for item in items:
                self.validate(watch, item)
                watch.checked += 1
            parser = watch.stream.parser
            if parser.bom or parser.decode_errors or parser.unknown_fields:
                self.violate("framing", f"{watch.describe()}: BOM {parser.bom}, {parser.decode_errors} lines not "
                             f"UTF-8, unknown fields {parser.unknown_fields[:5]}")
                parser.bom, parser.decode_errors, parser.unknown_fields = False, 0, []
        # Retire streams that are over and fully checked, so long runs do not slow down.
        keep = []
        for watch in self.watches:
            if watch.stream.ended and watch.end_noted and watch.checked == len(watch.stream.items):
                self.retired.append(watch)
            else:
                keep.append(watch)
        self.watches = keep
        self.retired = self.retired[-50:]

    def validate(self, watch: Watch, item) -> None:
        model = self.model
        if isinstance(item, Retry):
            return
        if isinstance(item, IdOnly):
            self.validate_cursor(watch, item)
            return
        if item.name == "sseserver.reset":
            self.validate_reset(watch, item)
            return
        where = watch.describe()
        if not item.own_id or not (item.id.isascii() and item.id.isdigit()):
            self.violate("event id", f"{where}: event without its own decimal `id:` line: {item!r}")
            return
        event_id = int(item.id)
        publish = model.by_id.get(event_id)
        if publish is None:
            self.violate("unknown event", f"{where} received {item!r}: no acknowledged publish has that id")
            return
        if publish.name != item.name or publish.wire != item.data:
            found = self.find_publish(item)
            self.violate("wrong event", f"{where} received id {event_id} as {item!r}, but that id belongs to "
                         f"{publish.tag} {publish.name!r} {publish.wire[:40]!r}"
                         + (f"; the data is {found.tag}'s ({found.status}, id {found.id})" if found else ""))
            return
        if item.name not in watch.names:
            self.violate("filter", f"{where} received {item!r}, which its filter excludes")
        if self.mode == "memory" and publish.domain is not watch.domain:
            self.violate("event from another lifetime", f"{where} received {item!r} from {publish.domain.key}")
        if watch.last_event is not None and event_id <= watch.last_event:
            kind = "duplicate" if event_id == watch.last_event else "out of order"
            self.violate(kind, f"{where} received id {event_id} after id {watch.last_event}")
            return
        self.count("events checked in streams")
        if not watch.seen_any:
            self.validate_first(watch, publish, event_id)
        elif not watch.gap_ok:
            self.check_gap(watch, watch.prev, event_id, "between two events")
        watch.seen_any = True
        watch.gap_ok = False
        watch.last_event = event_id
        watch.prev = event_id

    def validate_first(self, watch: Watch, publish: Publish, event_id: int) -> None:
        """The first event of a stream: where the replay (or the live part) must begin."""
        where = watch.describe()
        if watch.start == "reset" and not watch.leading_reset:
            self.violate("missing reset", f"{where}: first event {event_id} without the sseserver.reset that a "
                         f"Last-Event-ID the daemon cannot honour requires")
            return
        if watch.leading_reset or watch.resets:
            if not watch.gap_ok:
                self.check_gap(watch, watch.prev, event_id, "after the reset")
            return
        if watch.start in ("exact", "either"):
            self.count("exact replays checked")
            self.check_gap(watch, int(watch.last_id), event_id, "replay after Last-Event-ID")
            return
        # A stream without Last-Event-ID starts with live events.
        if not self.redis_mode and publish.ack_seq is not None and publish.ack_seq < watch.sent_seq:
            self.violate("replay without Last-Event-ID", f"{where}: first event {event_id} was acknowledged before "
                         f"the stream was requested")
        self.check_live_start(watch, event_id)

    def check_live_start(self, watch: Watch, before: int) -> None:
        missed = [i for i in watch.gap_space.between(watch.sure_max_id, before, watch.names)
                  if self.model.by_id[i].sent_seq > watch.sure_seq]
        if missed:
            self.violate("gap", f"{watch.describe()}: live events {missed[:10]} published after the stream was open "
                         f"never arrived (the stream went on at {before})")

    def check_gap(self, watch: Watch, low: int | None, high: int, where: str) -> None:
        if low is None:
            self.check_live_start(watch, high)
            return
        missing = watch.gap_space.between(low, high, watch.names)
        if missing:
            self.violate("gap", f"{watch.describe()}: {where}, {high} came after {low} but acknowledged matching "
                         f"events {missing[:10]}{'...' if len(missing) > 10 else ''} never did, and no "
                         f"sseserver.reset said so")

    def validate_cursor(self, watch: Watch, item: IdOnly) -> None:
        """A block with only `id:` (a filtered stream's heartbeat): a reconnect from it skips every event up to
        it, so each matching one must already have been delivered."""
        where = watch.describe()
        if not (item.id.isascii() and item.id.isdigit()):
            self.violate("heartbeat id", f"{where}: id-only block with {item.id!r}")
            return
        cursor = int(item.id)
        if cursor not in self.model.by_id and not (self.redis_mode and self.model.unresolved()):
            self.violate("heartbeat id", f"{where}: heartbeat moved the cursor to {cursor}, which is no event's id")
        if watch.last_event is not None and cursor < watch.last_event:
            self.violate("heartbeat id", f"{where}: heartbeat moved the cursor back to {cursor} after event "
                         f"{watch.last_event}")
            return
        fresh = not watch.seen_any and not watch.leading_reset and not watch.resets
        if not watch.seen_any and watch.start == "reset" and not watch.leading_reset:
            self.violate("missing reset", f"{where}: a heartbeat id came before the sseserver.reset that a "
                         f"Last-Event-ID the daemon cannot honour requires")
        elif fresh and watch.start in ("exact", "either"):
            self.check_gap(watch, int(watch.last_id), cursor + 1, "heartbeat cursor after Last-Event-ID")
        elif fresh:
            self.check_live_start(watch, cursor + 1)
        elif not watch.gap_ok and watch.prev is not None:
            self.check_gap(watch, watch.prev, cursor + 1, "heartbeat cursor")
        watch.prev = cursor
        watch.gap_ok = False
        watch.seen_any = True

    def validate_reset(self, watch: Watch, item: Event) -> None:
        where = watch.describe()
        try:
            data = json.loads(item.data)
            oldest = data["oldest_id"]
            echoed = data["last_event_id"]
        except (ValueError, KeyError, TypeError):
            self.violate("reset format", f"{where}: sseserver.reset with data {item.data!r}")
            return
        watch.gap_ok = True
        self.count("resets")
        # The replay's reset carries an `id:` (where a reconnect resumes); a gap notice does not.
        leading = (not watch.seen_any and not watch.leading_reset and not watch.resets
                   and watch.start in ("reset", "either") and item.own_id)
        if leading:
            watch.leading_reset = True
        else:
            watch.resets += 1
        if not leading:
            # In Redis mode a stream is told in-band when the shared stream lost events (a gap): allowed anywhere.
            self.count("resets in a live stream or an exact replay")
            if self.redis_mode:
                return
            if watch.seen_any:
                self.violate("reset mid-stream", f"{where}: sseserver.reset after events: {item!r}")
            elif watch.start == "exact":
                self.violate("needless reset", f"{where}: sseserver.reset although the daemon must still hold "
                             f"Last-Event-ID {watch.last_id} (replay must be exact): {item.data}")
            else:
                self.violate("needless reset", f"{where}: sseserver.reset on a stream opened without "
                             f"Last-Event-ID: {item.data}")
            return
        self.count("reset replays checked")
        if echoed != watch.last_id:
            if echoed == watch.last_id.encode("utf-8").decode("latin-1"):
                # HTTP header bytes read as latin-1: a browser sends Last-Event-ID in UTF-8. Cosmetic; counted.
                self.count("non-ASCII Last-Event-ID echoed as latin-1")
            else:
                self.violate("reset format", f"{where}: reset echoes last_event_id {echoed!r}, sent "
                             f"{watch.last_id!r}")
        if oldest is None:
            watch.prev = None
            if watch.must_count:
                self.violate("retained too few", f"{where}: reset says nothing is retained, but "
                             f"{watch.must_count} events (from id {watch.must_floor}) must be")
            watch.prev = watch.sure_max_id
            watch.gap_ok = False
            return
        if not (isinstance(oldest, str) and oldest.isdigit()):
            self.violate("reset format", f"{where}: oldest_id {oldest!r} is not a decimal id string")
            return
        oldest_id = int(oldest)
        self.check_reset_cursor(watch, item, oldest_id)
        publish = self.model.by_id.get(oldest_id)
        if publish is None and not (self.redis_mode and self.model.unresolved()):
            self.violate("reset oldest", f"{where}: oldest_id {oldest_id} is not an acknowledged event")
        elif publish is not None and self.mode == "memory" and publish.domain is not watch.domain:
            self.violate("reset oldest", f"{where}: oldest_id {oldest_id} is from {publish.domain.key}")
        if watch.must_floor is not None and oldest_id > watch.must_floor:
            self.violate("retained too few", f"{where}: replay starts at {oldest_id}, but every event from "
                         f"{watch.must_floor} on ({watch.must_count} events) must still be retained")
        # Everything from oldest_id on that matches must now follow, without a gap.
        watch.prev = oldest_id - 1
        watch.gap_ok = False

    def check_reset_cursor(self, watch: Watch, item: Event, oldest_id: int) -> None:
        """The reset's `id:` is the id just before the oldest retained event, so a reconnect from it replays
        exactly (README). The model knows that id when an acknowledged event precedes the oldest one; before a
        lifetime's first event it is an origin the model cannot see, so only "below oldest_id" is checked."""
        where = watch.describe()
        if not (item.id.isascii() and item.id.isdigit()) or int(item.id) >= oldest_id:
            self.violate("reset format", f"{where}: reset carries id {item.id!r}, not the id before oldest_id "
                         f"{oldest_id}")
            return
        if self.redis_mode or watch.domain.unresolved:
            return
        before = watch.gap_space.between(None, oldest_id, frozenset(NAMES))
        if before and int(item.id) != before[-1] and int(item.id) not in self.model.by_id:
            self.violate("reset format", f"{where}: reset carries id {item.id}, but the event before oldest_id "
                         f"{oldest_id} is {before[-1]}")

    def check_ends(self) -> None:
        """A stream may end because its daemon stopped, it was slow, or the client left: nothing else."""
        unexplained = []
        for watch in self.watches:
            if watch.end_noted or not watch.stream.ended:
                continue
            watch.end_noted = True
            if watch.closed_by or watch.end_expected:
                continue
            if watch.was_stalled:
                self.count("stalled streams dropped as slow")
                watch.daemon.slow_explained += 1
                continue
            unexplained.append(watch)
        for watch in unexplained:
            if self.explained_as_slow(watch):
                continue
            self.violate("stream ended", f"{watch.describe()} ended ({watch.stream.end_error or 'EOF'}) although "
                         f"its daemon runs, it was not slow ({watch.daemon.slow_drops()} slow drops logged) and "
                         f"the client stayed; tail {watch.stream.tail[-80:]!r}")

    def explained_as_slow(self, watch: Watch) -> bool:
        """A stream the test reads can still be dropped as slow (queue_size 1 and a burst of large events outrun
        any reader for a moment): the daemon's access log says so, one line per drop."""
        daemon = watch.daemon
        deadline = time.monotonic() + (HEALTH_TIMEOUT if daemon.alive() else 0)
        while daemon.slow_drops() <= watch.daemon.slow_explained:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        watch.daemon.slow_explained += 1
        self.count("streams read by the test dropped as slow")
        return True

    def check_health(self) -> None:
        for inst in self.running():
            if inst.stopping:
                continue
            deadline = time.monotonic() + HEALTH_TIMEOUT
            while True:
                health = self.health(inst)
                problem = self.health_problem(inst, health)
                if problem is None:
                    break
                if time.monotonic() > deadline:
                    self.violate("health", f"{inst.name}: {problem}; /health said {health}")
                    break
                time.sleep(POLL * 2)

    def health_problem(self, inst: Instance, health: dict | None) -> str | None:
        if health is None:
            return "no /health answer"
        with self.reader.lock:
            mine = [w for w in self.watches if w.instance is inst and w.daemon is inst.daemon and w.open()]
            active = sum(1 for w in mine if not w.stalled)
            stalled = sum(1 for w in mine if w.stalled)
        subscribers = health.get("subscribers")
        if not isinstance(subscribers, int) or not active <= subscribers <= active + stalled:
            return (f"subscribers {subscribers!r}, but the test holds {active} streams open"
                    + (f" and {stalled} stalled ones" if stalled else ""))
        domain = inst.domain if self.mode == "memory" else self.model.domain
        newest = domain.ids[-1] if domain.ids else None
        last = health.get("last_event_id")
        last_value = int(last) if isinstance(last, str) and last.isdigit() else None
        if newest is not None and not (self.redis_mode and self.redis_fault is not None):
            if last_value is None or last_value < newest:
                return f"last_event_id {last!r}, but {newest} was acknowledged"
            if last_value != newest and not self.redis_mode and not domain.refused:
                return f"last_event_id {last!r}, but the newest event is {newest}"
        if self.redis_mode and self.redis_fault is None and health.get("redis") not in (None, "up"):
            return f"redis {health.get('redis')!r} although Redis is reachable"
        retained = health.get("history_size")
        must = len(domain.must())
        largest = max(inst.history_sizes)
        if isinstance(retained, int):
            if retained < must and not self.redis_mode:
                return f"history_size {retained}, but {must} events must be retained"
            if retained > largest:
                return f"history_size {retained} retained, more than history_size = {largest}"
        return None

    def check_logs(self) -> None:
        for inst in self.instances:
            daemon = inst.daemon
            if daemon is None:
                continue
            lines = daemon.lines[daemon.checked_lines:]
            daemon.checked_lines += len(lines)
            for index, line in enumerate(lines):
                if "Traceback" in line:
                    self.violate("traceback", f"{daemon.label} logged a traceback: "
                                 + " | ".join(lines[index:index + 12]))
                    break

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Heal every fault, then every client leaves (fds and threads back to baseline), then SIGTERM."""
        if self.disk_full:
            self.do_disk_free()
        if self.redis_mode and self.redis_fault == "down":
            self.do_redis_start()
        elif self.redis_mode and self.redis_fault:
            self.do_link_restore()
        self.check()
        self.do_quiesce()
        for inst in self.running():
            self.stop_instance(inst, "term")
        self.check_logs()

    def report(self) -> None:
        out = self.out
        elapsed = time.monotonic() - self.started
        published = sum(1 for p in self.model.publishes.values() if p.status == ACKED)
        print(f"chaos summary: mode={self.mode} seed={self.seed}: {len(self.executed)} steps in {elapsed:.1f}s, "
              f"{published} events acknowledged, {self.stats.get('streams opened', 0)} streams", file=out)
        print("  faults injected: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.faults.items())) or "none"),
              file=out)
        print("  observed: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.stats.items())) or "nothing"), file=out)
        if not self.violations:
            print("  violations: none", file=out)
            if self.keep:
                print(f"  work directory kept: {self.workdir}", file=out)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        kinds: dict[str, int] = {}
        for violation in self.violations:
            kinds[violation.kind] = kinds.get(violation.kind, 0) + 1
        print(f"  violations: {len(self.violations)} (" + ", ".join(f"{k} x{v}" for k, v in kinds.items()) + ")",
              file=out)
        first = self.violations[0].step
        steps = [f"    step {index}: {op}" for index, op in self.executed if index <= first]
        with open(os.path.join(self.workdir, "steps.txt"), "w") as handle:
            handle.write("\n".join(f"step {index}: {op}" for index, op in self.executed) + "\n")
        print(f"  first violation at step {first}; steps up to it"
              + (f" (last 40 of {len(steps)}; all in {self.workdir}/steps.txt)" if len(steps) > 40 else "") + ":",
              file=out)
        print("\n".join(steps[-40:]), file=out)
        for violation in self.violations[:20]:
            print(f"  {violation}", file=out)
        print(f"  daemon logs: {self.log_path}", file=out)
        only = f" --only {','.join(str(i) for i in sorted(self.only))}" if self.only is not None else ""
        print(f"  replay: python3 -m tests.chaos --mode {self.mode} --seed {self.seed} --steps {first + 1}{only}",
              file=out, flush=True)


def parse_only(text: str) -> set[int]:
    chosen = set()
    for part in text.split(","):
        if "-" in part:
            low, high = part.split("-")
            chosen.update(range(int(low), int(high) + 1))
        elif part:
            chosen.add(int(part))
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--verbose", action="store_true", help="print every step as it runs")
    parser.add_argument("--keep-going", action="store_true", help="go on after a violation")
    parser.add_argument("--only", type=parse_only, help="run only these steps of the plan, e.g. 0-5,9")
    parser.add_argument("--print-plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) after a clean run")
    args = parser.parse_args(argv)
    if args.print_plan:
        initial, plan = make_plan(args.mode, args.seed, args.steps)
        print(f"initial config: {initial}")
        for index, op in enumerate(plan):
            print(f"step {index}: {op}")
        return 0
    chaos = Chaos(args.mode, args.seed, args.steps, verbose=args.verbose, keep_going=args.keep_going, only=args.only,
                  keep=args.keep)
    return 0 if chaos.run() else 1


if __name__ == "__main__":
    sys.exit(main())

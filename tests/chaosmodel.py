"""The chaos test's plan and model: pure, no I/O (tests/chaos.py runs them against real daemons).

Owns: the seeded plan (`make_plan`: mode, seed, steps -> the same list of operations every time, drawn without
ever looking at what a daemon does), the payloads publishers send (each traceable to its publish by a tag), and
the `Model` of what was acknowledged: every publish and its answer, the ids in order, and per retention domain
the oldest id that must still be retained (`Domain.floor_id`). `Model.classify` says how a stream opened with a
given Last-Event-ID must begin.
Must not know: sockets, processes, how a daemon is run or faulted.
"""

import bisect
import dataclasses
import enum
import random
import re
import threading

MODES = ("memory", "file-always", "file-interval", "file-never", "redis", "redis-aof")
LIMIT = 16384  # max_message_bytes of the daemons under test
NAMES = ("message", "a.one", "a.two", "b", "c:x-y")  # every event name the plan uses
FUTURE_MARGIN = 10**12  # a "future" Last-Event-ID is this far beyond every id handed out
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
        kind = rng.choices(
            ("plain", "lines", "sse", "unicode", "record", "empty", "max", "over"), (30, 20, 10, 15, 8, 4, 4, 4)
        )[0]
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
            "publish": 30,
            "burst": 5,
            "subscribe": 16,
            "disconnect": 8,
            "stall": 2,
            "resume": 3,
            "reload": 4,
            "restart": 4,
            "quiesce": 2,
            "bad_requests": 3,
            "upgrade": 2,  # SIGUSR2: in memory mode a hand-over to a new process, otherwise refused (README)
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
        return Op(
            "publish",
            {"instance": round(self.rng.random(), 4), "payload": self.payload(), "keepalive": self.rng.random() < 0.4},
        )

    def op_burst(self) -> Op:
        return Op("burst", {"instance": round(self.rng.random(), 4), "payloads": self.burst()})

    def op_subscribe(self) -> Op:
        rng = self.rng
        names = None if rng.random() < 0.5 else tuple(sorted(rng.sample(NAMES, rng.randint(1, 3))))
        last = rng.choices(
            ("none", "current", "stale", "previous", "future", "garbage", "zero", "newest"),
            (30, 22, 10, 6, 5, 10, 4, 13),
        )[0]
        return Op(
            "subscribe",
            {
                "instance": round(rng.random(), 4),
                "names": names,
                "last": last,
                "pick": round(rng.random(), 4),
                "query": rng.random() < 0.15,
                "scoped": rng.random() < 0.15,
                "stalled": rng.random() < 0.12,
            },
        )

    def op_disconnect(self) -> Op:
        return Op("disconnect", {"pick": round(self.rng.random(), 4), "how": self.rng.choice(("fin", "rst"))})

    def op_stall(self) -> Op:
        return Op("stall", {"pick": round(self.rng.random(), 4)})

    def op_resume(self) -> Op:
        return Op("resume", {"pick": round(self.rng.random(), 4)})

    def op_reload(self) -> Op:
        self.config = self.random_config()
        return Op("reload", dict(self.config))

    def op_restart(self) -> Op:
        return self.restart(plain=False)

    def restart(self, plain: bool) -> Op:
        rng = self.rng
        args = {
            "instance": round(rng.random(), 4),
            "how": rng.choice(("term", "kill")),
            "burst": None,
            "wrapper": "plain",
        }
        if rng.random() < 0.25:
            args["burst"] = self.burst()
        if self.file and not plain and rng.random() < 0.4:
            args["wrapper"] = rng.choice(("fsync", "write"))
            args["when"] = rng.choice(("1+", "2+", "1+2", "3+"))
            self.traced = rng.randint(3, 8)
        # The new lifetime runs under systemd with an fd store (never under strace): its SIGTERM is then a
        # `systemctl restart` through the store in memory mode, and a refused store (a drain) otherwise.
        args["store"] = rng.random() < 0.6
        return Op("restart", args)

    def op_upgrade(self) -> Op:
        burst = self.burst() if self.rng.random() < 0.3 else None
        kill = self.rng.random() < 0.25  # kill -9 the new process as soon as it exists, before it can take over
        return Op("upgrade", {"instance": round(self.rng.random(), 4), "burst": burst, "kill": kill})

    def op_quiesce(self) -> Op:
        return Op("quiesce", {})

    def op_bad_requests(self) -> Op:
        kinds = (
            "reserved_name",
            "bad_name",
            "too_big",
            "not_utf8",
            "wrong_token",
            "no_token",
            "bad_filter",
            "scope_outside",
        )
        return Op(
            "bad_requests",
            {"instance": round(self.rng.random(), 4), "which": tuple(self.rng.sample(kinds, self.rng.randint(1, 3)))},
        )

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
        burst = self.burst() if self.rng.random() < 0.3 else None
        if self.link_how == "blackhole":
            burst = None  # every publish would hang for the daemon's command timeout: one is enough (drawn anyway,
            #               so the rest of the plan stays what it was)
        return Op("link_cut", {"how": self.link_how, "burst": burst})

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

TAG = re.compile(r"^<(\d+)>")
_UNICODE = (
    "\u00e9",
    "\u00df",
    "\u4e2d",
    "\u6587",
    "\U0001f642",
    "\U0001f680",
    "\u2028",
    "\u2029",
    "\u0085",
    "\ufeff",
    "\ufffd",
    "\x00",
    "\x1b",
    "\x7f",
    "\t",
    "\v",
    "\f",
    "\x1c",
    "\x1d",
    "\x1e",
    "\u200b",
    "\U0010ffff",
    "a",
    "z",
    " ",
    ":",
    "\u00a0",
)
_SSE_LIKE = (
    "id: 1",
    "id: 999999999999999",
    "id:",
    "event: sseserver.reset",
    "event: message",
    'data: {"last_event_id": "1", "oldest_id": null}',
    "data:",
    "retry: 1",
    ": comment",
    ":",
    "",
    "HTTP/1.1 200 OK",
    "Content-Length: 0",
    "\x00",
    "id: 5\x00",
)
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
            return blob.decode("utf-8") + blob.decode("utf-8")[len(magic) :]
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
        text = rng.choice(_BREAKS) + "".join(
            rng.choice(_SSE_LIKE) + rng.choice(_BREAKS) for _ in range(max(1, size // 12))
        )
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


class Status(enum.Enum):
    """What became of a publish, as far as the test can tell."""

    PENDING = "pending"
    ACKED = "acknowledged"  # 200 with an id (or seen in a stream after an unclear answer)
    MAYBE = "maybe stored"  # no answer after the request went out, or a Redis-mode 503
    REFUSED = "refused"  # any other answer: it must never appear
    ABSENT = "not stored"  # was MAYBE, and the replay or the Redis stream shows it was not stored (in Redis mode
    #                        it may still arrive late, from a command a black-holed link held back)
    DELIVERED_ANYWAY = "refused, yet delivered"  # reported once


PENDING, ACKED, MAYBE, REFUSED, ABSENT = Status.PENDING, Status.ACKED, Status.MAYBE, Status.REFUSED, Status.ABSENT


class Start(enum.Enum):
    """How a stream opened with a given Last-Event-ID must begin."""

    LIVE = "live"  # no Last-Event-ID: live events from the moment it is open
    EXACT = "exact"  # an id the daemon must still hold: exactly the events after it, no reset
    RESET = "reset"  # an id it cannot honour: a reset, then at least everything that must be retained
    EITHER = "either"  # the model cannot know whether the daemon still holds it: both, if what follows is right


class Publish:
    __slots__ = ("tag", "name", "wire", "status", "id", "sent_seq", "ack_seq", "id_floor", "domain", "instance", "step")

    def __init__(self, tag, name, wire, sent_seq, id_floor, domain, instance):
        self.tag, self.name, self.wire = tag, name, wire
        self.status = PENDING
        self.id = None
        self.sent_seq, self.ack_seq = sent_seq, None
        self.id_floor = id_floor  # every id acknowledged before this publish was sent
        self.domain = domain
        self.instance = instance
        self.step = None  # the plan step that published it (for reports)


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
        self.size = None  # the history_size the floor was last raised with
        self.refused = 0  # 503s and lost replies: the daemon may have spent an id on them

    def raise_floor(self, history_size: int) -> None:
        self.size = history_size
        keep = max(0, history_size - self.unresolved)
        if not self.ids:
            return
        if keep == 0:
            self.floor_id = max(self.floor_id, self.ids[-1] + 1)
        elif len(self.ids) > keep:
            self.floor_id = max(self.floor_id, self.ids[-keep])

    def must(self) -> list[int]:
        return self.ids[bisect.bisect_left(self.ids, self.floor_id) :]

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
        self.step = -1  # the plan step being run (stamped on each publish, for reports)

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
            publish = Publish(
                tag, name, wire_form(body.decode("utf-8", "replace")), self.seq, self.max_acked, self.domain, instance
            )
            publish.step = self.step
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
            self.problems.append(
                (
                    "ids go backwards",
                    f"publish {publish.tag} got id {event_id}, but id "
                    f"{publish.id_floor} had already been acknowledged before it was sent",
                )
            )
        other = self.by_id.get(event_id)
        if other is not None and other is not publish:
            self.problems.append(
                (
                    "id reused",
                    f"id {event_id} was given to {other.tag} ({other.status.value}) and again to {publish.tag}",
                )
            )
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
                if publish.domain.size is not None:
                    # It may hold one of the retained slots from now on (a crash's in-flight publish answers
                    # only after the acknowledged ones raised the floor).
                    publish.domain.raise_floor(publish.domain.size)

    def promote(self, publish: Publish, event_id: int) -> None:
        """A publish that may have been stored was seen in a stream: from now on every matching stream needs it."""
        with self.lock:
            domain = publish.domain
            floor = domain.floor_id
            self._assign(publish, event_id)
            if publish.status == MAYBE:
                domain.unresolved -= 1
            publish.status = ACKED
            if domain.ids and event_id >= floor and floor <= domain.ids[-1]:
                # It was stored when the floor was last raised, possibly before it counted as unresolved: it took
                # one of the retained slots then, so what must be retained does not grow by it.
                index = bisect.bisect_right(domain.ids, floor)
                domain.floor_id = domain.ids[index] if index < len(domain.ids) else domain.ids[-1] + 1

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

    def classify(self, text: str | None, domain: Domain, foreign: bool, from_stream: bool = False) -> "Start":
        """How a stream opened with this Last-Event-ID must begin (see Start). `from_stream`: the id is one the
        daemon itself sent (a reconnect), not one a client made up."""
        if text is None:
            return Start.LIVE
        if not (text.isascii() and text.isdigit() and len(text) <= 20):
            return Start.RESET
        value = int(text)
        if foreign:  # from an earlier process lifetime (memory mode): never honoured
            return Start.RESET
        if value == 0 and not from_stream:
            # README: "Last-Event-ID: 0 gets the reset, then everything"; with Redis, 0 is the predecessor of the
            # shared stream's first entry, honoured without a reset while that entry is retained.
            return Start.EITHER if self.redis else Start.RESET
        everything = self.everything.ids
        if everything and value > everything[-1] + FUTURE_MARGIN // 2:
            return Start.RESET
        ids = domain.ids
        if not ids:
            # Nothing published yet: the one id honoured is the lifetime's origin, which the model cannot see
            # (a client learns it from this lifetime's own reset notice).
            return Start.EITHER
        if value > ids[-1]:
            # Past every id the model knows: a made-up id, or (from the daemon's own stream) the id of a publish
            # whose answer was lost and that is stored after all, handed out as a reset's cursor (with nothing
            # retained, the cursor is the last id): the daemon rightly honours it.
            return Start.EITHER if self.redis or from_stream else Start.RESET
        index = bisect.bisect_left(ids, value)
        floor = domain.floor_index()
        if floor == len(ids):
            return Start.EITHER  # nothing must be retained (history_size 0 at some point)
        if ids[index] == value:
            if index >= floor - 1:
                return Start.EXACT
            return Start.EITHER
        if ids[index] == value + 1:  # the predecessor of a retained (or evicted) event
            return Start.EXACT if index == floor == 0 and len(self.domains) == 1 and not self.redis else Start.EITHER
        if self.redis or domain.unresolved:
            return Start.EITHER
        return Start.RESET

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
- no 5xx but the documented ones, and those only while a fault can explain them: a 503 means "not published"
  (that event must never appear anywhere), a 504 (Redis: the reply was lost) "maybe published" (it may appear
  once, in order, or never);
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
burst), SIGUSR2 upgrades in place (also in a burst, and with the new process killed -9 before it can take over:
in memory mode the lifetime goes on in the new pid with every stream open, its history and its ids; with a history
file or Redis the daemon refuses once and serves on), `systemctl restart` through systemd's fd store (a lifetime
may run under the test's systemd, tests/fakesystemd.py, with $FDSTORE: in memory mode its SIGTERM stores the
streams and the next process started with them continues the lifetime, as after an upgrade; with a history file
or Redis the stop refuses the store in one line and drains as always), a full disk (the history file lives on a
small tmpfs in a private mount namespace held by a `TmpfsHolder`, filled through /proc/PID/root), fsync and write
errors (strace -e inject on the history file's path), Redis restarts with and without persistence, FLUSHALL, a
cut or black-holed link (tests/tcpproxy.py), and a second instance joining late.

Synchronisation is on observable events only: log lines, /health polled until a deadline, stream reads with a
deadline. All timeouts are the named constants below.
"""

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from urllib.parse import urlencode

from sseserver import fdstore
from tests.chaosenv import (
    IO_TIMEOUT,
    POLL,
    REDIS_TIMEOUT,
    STORED,
    DaemonProcess,
    KeepAlive,
    NoAnswer,
    RedisReplyError,
    RedisServer,
    Response,
    StartFailed,
    TmpfsHolder,
    http,
    render_config,
)
from tests.fakesystemd import STORE_SIZE, FakeSystemd
from tests.chaosmodel import (
    ABSENT,
    ACKED,
    FUTURE_MARGIN,
    LIMIT,
    MAYBE,
    MODES,
    NAMES,
    REFUSED,
    TAG,
    Domain,
    Index,
    Model,
    Op,
    Publish,
    Start,
    Status,
    make_payload,
    make_plan,
)
from tests.ssereader import Event, IdOnly, Retry, StreamReader, open_stream
from tests.tcpproxy import TcpProxy

# -- timeouts (generous: the CI machine has two cores shared with other work) -----------------------------------
SETTLE_TIMEOUT = 15.0  # streams receiving every event they must have
HEALTH_TIMEOUT = 15.0  # /health agreeing with the model (a closed stream takes a moment to be noticed)
QUIESCE_TIMEOUT = 20.0  # fds and threads back at their baseline
BURST_TIMEOUT = 30.0  # a concurrent publish burst
REDIS_COMMAND_TIMEOUT = 5.0  # sseserver.cluster.COMMAND_TIMEOUT: how long one publish may wait for Redis
UPGRADE_TIMEOUT = 30.0  # SIGUSR2 to the old process's exit (the daemon gives up at its upgrade_timeout, 10 s)
# -- what the daemon logs about its fd store (sseserver/daemon.py) --------------------------------------------------
STORE_REFUSED = "stopping without the fd store: history_file or redis_url is set"
STORE_NOT_USED = "fd store not used"  # a stop that could not store drains: its streams would end
ADOPTED = "restart: adopted "
NOT_ADOPTED = "restart: ending "  # stored streams the next start ends instead of adopting
PROGRESS_EVERY = 1000  # steps between progress lines in a long run

# -- the daemon's configuration under test ------------------------------------------------------------------------
RETRY_MS = 250
SHUTDOWN_TIMEOUT = 2.0
FSYNC_INTERVAL = 0.2
TMPFS_SIZE = 16 * 1024 * 1024
PUBLISH_TOKEN = "chaos-publisher-token-1"
SUBSCRIBE_TOKEN = "chaos-subscriber-token-1"
SCOPED_TOKEN, SCOPE = "chaos-scoped-token-1", "a.*"
# What a publish's error statuses mean. 503 always means "not published" (it must never appear anywhere); 504
# means the store did not confirm in time (a Redis reply lost with its connection): it may have been stored, so
# it may appear at most once, in order, or not at all. Set REDIS_503_MAY_BE_STORED to test the older contract in
# which a Redis-mode 503 could also have been stored.
MAYBE_STORED_STATUS = 504
REDIS_503_MAY_BE_STORED = False
GARBAGE_IDS = (
    "abc",
    "-1",
    "1e5",
    "0x10",
    "12345678901234567890123",
    "18446744073709551616",
    "\u0663\u0664",
    "7;8",
    "9.5",
    "+3",
    "null",
    "undefined",
)


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
        self.handing_over = False  # SIGUSR2 or a stop into the fd store, not over: a publish may get 503 (or no answer)
        self.fdstore = False  # this lifetime runs under the test's systemd, with an fd store ($FDSTORE)
        self.caught_up = True  # Redis mode: its follower has read the stream since this lifetime started

    @property
    def name(self) -> str:
        return f"instance {self.slot} (lifetime {self.lifetime})"


class Watch:
    """The model's view of one stream: what it asked for, where it must start, and how far it has been checked."""

    def __init__(
        self,
        number: int,
        instance: Instance,
        stream,
        names: frozenset,
        last_id: str | None,
        start: str,
        domain: Domain,
        gap_space: Index,
        sent_seq: int,
        why: str,
    ):
        self.number = number
        self.instance = instance
        self.daemon = instance.daemon
        self.where = instance.name  # the instance and lifetime it was opened on (the instance moves on)
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
        self.token = None  # the subscribe token it presented (an upgrade's new process checks it again)
        self.all_names = False  # no ?event= names: its filter is its token's scope, or everything
        self.retries = 0  # `retry:` blocks: the one at its start, and a farewell only when its daemon stops
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
        self.reset_checks = 0  # checks that saw its preamble without the reset it needs
        self.from_stream = False  # its Last-Event-ID is one the daemon sent (a reconnect)
        self.resets = 0  # other resets: gap notices

    def describe(self) -> str:
        names = "all" if len(self.names) == len(NAMES) else ",".join(sorted(self.names))
        return (
            f"stream #{self.number} on {self.where} [{self.why}; names={names}; "
            f"Last-Event-ID={self.last_id!r} -> {self.start.value}]"
        )

    def open(self) -> bool:
        return not self.stream.ended and self.closed_by is None and self.end_expected is None


# =================================================================================================================
# The runner.
# =================================================================================================================


class Faults:
    """Every fault a run can inject, what is active right now, and how often each kind was injected.

    Owns the machinery: the tmpfs holder (file modes: the history file lives on a disk the test fills), the
    redis-server and the TCP proxy between it and the daemons (Redis modes), the strace wrappers that make a
    daemon lifetime's fsync or write calls on the history file fail, and the test's systemd (every mode: the
    notify socket and fd store of the lifetimes that run with one). The runner decides when; this class does it
    and remembers, so `store_fault()` can say whether a 503 is explained."""

    def __init__(self, mode: str, workdir: str):
        self.mode = mode
        self.workdir = workdir
        self.counts: dict[str, int] = {}
        self.holder: TmpfsHolder | None = None
        self.redis: RedisServer | None = None
        self.proxy: TcpProxy | None = None
        self.disk_full = False
        self.redis_down = False
        self.link = None  # "reset" or "blackhole" while the link to Redis is cut
        self.systemd: FakeSystemd | None = None  # the notify socket and fd store of lifetimes run "under systemd"

    def injected(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def start(self) -> None:
        self.systemd = FakeSystemd()
        if self.mode.startswith("file"):
            self.holder = TmpfsHolder(os.path.join(self.workdir, "disk"), TMPFS_SIZE)
            self.holder.start()
        if self.mode.startswith("redis"):
            self.redis = RedisServer(os.path.join(self.workdir, "redis"), persistent=self.mode == "redis-aof")
            self.redis.start()
            self.proxy = TcpProxy(self.redis.socket).start()

    def stop(self, keep_disk: bool = False) -> None:
        if self.systemd:
            self.systemd.close()
        if self.proxy:
            self.proxy.stop()
        if self.redis:
            self.redis.stop("kill")
        if self.holder:
            if keep_disk:  # the tmpfs dies with its namespace: keep its files for the report
                kept = os.path.join(self.workdir, "disk-at-exit")
                with contextlib.suppress(OSError):
                    shutil.copytree(self.holder.path(""), kept, ignore=shutil.ignore_patterns("filler"))
            self.holder.stop()

    def systemd_env(self) -> dict:
        """What systemd (254 and later) gives a service whose unit sets FileDescriptorStoreMax=."""
        return {"NOTIFY_SOCKET": self.systemd.address, "FDSTORE": str(STORE_SIZE)}

    def empty_store(self) -> None:
        """`systemctl stop`: systemd closes what the service left in its fd store."""
        for name in set(self.systemd.names()):
            self.systemd.replace(name, [])

    @property
    def redis_unreachable(self) -> bool:
        return self.redis_down or self.link is not None

    def store_fault(self, wrapper: str) -> bool:
        """A fault is active that may make a publish answer 503 (`wrapper`: the daemon lifetime's)."""
        return self.disk_full or wrapper != "plain" or self.redis_unreachable

    def history_path(self) -> str:
        return os.path.join(self.holder.directory, "history.log")

    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    def wrapper(self, kind: str, when: str) -> list[str]:
        """The argv in front of `python3 -m sseserver`: into the tmpfs namespace, and for a "fsync" or "write"
        lifetime under strace, which makes that call on the history file fail from invocation `when` on (counted
        per thread, see `man strace`; -P limits it to the history file, never a socket or the log)."""
        argv = self.holder.enter() if self.holder else []
        if kind in ("fsync", "write"):
            path = self.history_path()
            error = "EIO" if kind == "fsync" else "ENOSPC"
            argv += [
                shutil.which("strace") or "strace",
                "-f",
                "--seccomp-bpf",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                f"trace={kind}",
                "-P",
                path,
                "-P",
                path + ".compact",
                "-e",
                f"inject={kind}:error={error}:when={when}",
            ]
            self.injected(f"{kind} errors (strace inject when={when})")
        return argv

    def fill_disk(self, free: int) -> None:
        self.holder.fill(free)
        self.disk_full = True
        self.injected("disk full")

    def free_disk(self) -> None:
        self.holder.free()
        self.disk_full = False

    def stop_redis(self, how: str) -> bool:
        """Stop redis-server; True when its data is gone with it (no persistence)."""
        self.redis.stop(how)
        self.redis_down = True
        persistence = "AOF" if self.redis.persistent else "no persistence"
        self.injected(f"redis {'SIGTERM' if how == 'term' else 'kill -9'} ({persistence})")
        return not self.redis.persistent

    def start_redis(self) -> None:
        self.redis.start()
        self.redis_down = False

    def flushall(self) -> None:
        self.redis.command("FLUSHALL")
        self.injected("redis FLUSHALL")

    def cut_link(self, how: str) -> None:
        self.link = how
        self.proxy.cut(how)
        self.injected(f"redis link cut ({how})")

    def restore_link(self) -> None:
        self.proxy.restore()
        self.link = None

    def redis_stream(self) -> list | None:
        """The shared stream's entries as [(id, {field: value})], or None when Redis cannot say."""
        try:
            entries = self.redis.command("XRANGE", "sseserver:events", "-", "+")
        except (OSError, RedisReplyError):
            return None
        return [(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in entries or []]


@dataclasses.dataclass
class Violation:
    step: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"step {self.step}: [{self.kind}] {self.message}"


class Chaos:
    def __init__(
        self,
        mode: str,
        seed: int,
        steps: int,
        verbose: bool = False,
        keep_going: bool = False,
        only: set[int] | None = None,
        out=sys.stdout,
        workdir: str | None = None,
        keep: bool = False,
    ):
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
        self.faults = Faults(mode, self.workdir)
        self.previous_ids: list[int] = []  # last ids of earlier lifetimes/epochs ("previous" Last-Event-IDs)
        self.started = time.monotonic()

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def violate(self, kind: str, message: str) -> None:
        violation = Violation(self.step, kind, message)
        self.violations.append(violation)
        print(f"VIOLATION {violation}", file=self.out, flush=True)

    def fault(self, kind: str) -> None:
        self.faults.injected(kind)

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
        print(
            f"chaos: mode={self.mode} seed={self.seed} steps={self.steps} workdir={self.workdir}",
            file=self.out,
            flush=True,
        )
        try:
            self.setup()
            for index, op in enumerate(self.plan):
                if self.only is not None and index not in self.only:
                    continue
                self.step = self.model.step = index
                self.executed.append((index, op))
                self.log(f"step {index}: {op}")
                if not self.verbose and index and index % PROGRESS_EVERY == 0:
                    print(
                        f"  ... step {index}, {time.monotonic() - self.started:.0f}s, "
                        f"{len(self.violations)} violations",
                        file=self.out,
                        flush=True,
                    )
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
        self.faults.start()
        self.write_config()
        self.start_instance(self.instances[0], "plain")

    def write_config(self) -> None:
        values = {
            "host": "127.0.0.1",
            "port": 0,
            "log_level": "info",
            "history_size": self.config["history_size"],
            "queue_size": self.config["queue_size"],
            "heartbeat_interval": self.config["heartbeat_interval"],
            "retry_ms": RETRY_MS,
            "max_message_bytes": LIMIT,
            "shutdown_timeout": SHUTDOWN_TIMEOUT,
            # Far beyond any step's waits, so the daemon never closes an idle keep-alive publisher just as it
            # sends (a race every HTTP client has, and not the one under test).
            "keepalive_timeout": 300.0,
            # One line per ended stream says why ("dropped as slow"): how the test tells a stream dropped for
            # being slow from one that ended for no documented reason, even after the daemon has exited.
            "access_log": True,
        }
        if self.file_mode:
            values.update(
                history_file=self.faults.history_path(),
                history_fsync=self.mode.split("-")[1],
                history_fsync_interval=FSYNC_INTERVAL,
            )
        if self.redis_mode:
            values["redis_url"] = self.faults.redis_url()
        if self.config["tokens"]:
            values["publish_tokens"] = [PUBLISH_TOKEN]
            values["subscribe_tokens"] = [SUBSCRIBE_TOKEN, f"{SCOPED_TOKEN} {SCOPE}"]
        temp = self.config_path + ".tmp"
        with open(temp, "w") as handle:
            handle.write(render_config(values))
        os.replace(temp, self.config_path)  # a reload never reads half a file

    def start_instance(self, inst: Instance, wrapper: str, when: str = "1+", store: bool = True) -> None:
        """A new lifetime. `store`: it runs under the test's systemd with an fd store (NOTIFY_SOCKET, FDSTORE), as
        the shipped unit does; never under strace (a restart through the store starts the next process itself)."""
        inst.lifetime += 1
        inst.wrapper = wrapper
        inst.stopping = False
        inst.keepalive = None
        inst.fdstore = store and wrapper == "plain"
        label = f"instance {inst.slot} lifetime {inst.lifetime}"
        inst.daemon = DaemonProcess(
            label,
            self.config_path,
            self.log_path,
            self.faults.wrapper(wrapper, when),
            self.faults.proxy.port if self.faults.proxy else None,
            env=self.faults.systemd_env() if inst.fdstore else None,
        )
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
        inst.caught_up = not self.redis_mode
        if self.redis_mode and not self.faults.redis_unreachable:
            self.wait_caught_up(inst)
        if self.redis_mode and self.faults.redis_unreachable:
            return  # its follower cannot have the history yet
        if self.redis_mode:
            self.resolve_from_redis()  # in-flight publishes of a crash: stored or not, before judging the replay
        # Replay right after a start: a reset and everything retained must come back (the must-set check).
        probe = self.subscribe(
            inst,
            None,
            "garbage-after-start",
            GARBAGE_IDS[inst.lifetime % len(GARBAGE_IDS)],
            foreign=False,
            query=False,
            scoped=False,
            stalled=False,
        )
        if self.file_mode and probe is not None:
            self.resolve_from_replay(inst, probe)

    def resolve_from_replay(self, inst: Instance, probe: Watch) -> None:
        """After a crash with publishes in flight (no answer: maybe stored), the full replay of the new lifetime
        shows which of them reached the history file. Those it shows become ordinary events; those it does not,
        although they would be retained, were not stored. Either way they stop weakening the retention check."""
        maybes = [p for p in list(self.model.publishes.values()) if p.status == MAYBE and p.domain is self.model.domain]
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
        self.faults.stop(keep_disk=bool(self.violations) or self.keep)

    # -- operations ----------------------------------------------------------------------------------------------

    def apply(self, op: Op) -> None:
        getattr(self, "do_" + op.kind)(**op.args)

    def headers_for_publish(self) -> dict:
        return {"Authorization": f"Bearer {PUBLISH_TOKEN}"} if self.config["tokens"] else {}

    def store_fault(self, inst: Instance) -> bool:
        """A fault is active that may make a publish answer 503."""
        return self.faults.store_fault(inst.wrapper)

    def publish(self, inst: Instance, spec: tuple, keepalive: KeepAlive | None) -> None:
        """One publish, judged by its answer; the model learns what was acknowledged."""
        tag, name, body = make_payload(spec, self.model.max_acked + 1)
        target = "/publish" if name == "message" and spec[4] % 2 else f"/publish?event={name}"
        publish = self.model.begin(tag, name, body, inst.name)
        oversize = len(body) > LIMIT
        stopping = inst.stopping
        handing_over = inst.handing_over
        try:
            if keepalive is not None:
                response = keepalive.request(target, body, self.headers_for_publish())
            else:
                response = http(inst.daemon.port, "POST", target, body, self.headers_for_publish())
        except NoAnswer as exc:
            self.model.fail(publish, maybe=exc.sent)
            if handing_over or inst.handing_over:
                self.count("publishes unanswered during a hand-over")
            elif not (stopping or self.store_fault(inst) or not inst.daemon.alive() or inst.stopping):
                self.violate("publish got no answer", f"{inst.name}: {exc}")
            return
        status = response.status
        self.check_response(response, f"POST {target}", allowed=(503, MAYBE_STORED_STATUS))
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
        maybe = status == MAYBE_STORED_STATUS or (status == 503 and self.redis_mode and REDIS_503_MAY_BE_STORED)
        self.model.fail(publish, maybe=maybe)
        if oversize and status == 413:
            return
        if status in (503, MAYBE_STORED_STATUS) and (stopping or inst.stopping or self.store_fault(inst)):
            self.count(f"publish {status} under a fault")
            return
        if status == 503 and (handing_over or inst.handing_over):
            self.count("publish 503 during a hand-over")  # not published: it must never appear (REFUSED)
            return
        self.violate(
            "unexpected publish status",
            f"{inst.name}: {status} for a {len(body)}-byte publish of "
            f"{name!r} ({spec[2]}; expected {413 if oversize else 200}): {response.body[:200]!r}",
        )

    def check_response(self, response: Response, what: str, allowed: tuple = (503,)) -> None:
        if response.status >= 500 and response.status not in allowed:
            self.violate("5xx", f"{what} answered {response.status}: {response.body[:300]!r}")
        if not getattr(response, "length_ok", True):
            self.violate(
                "content-length",
                f"{what}: Content-Length {response.headers.get('content-length')} but {len(response.body)} body bytes",
            )

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
            while (
                self.model.acknowledged < wanted and time.monotonic() < deadline and any(t.is_alive() for t in threads)
            ):
                time.sleep(POLL)
            during()
        # With the Redis link black-holed every publish waits out the daemon's Redis command timeout (then 504),
        # one after another on each keep-alive connection: allow that on top of the burst's own deadline.
        allowed = BURST_TIMEOUT + REDIS_COMMAND_TIMEOUT * max((len(p) for p in payloads), default=0)
        for thread in threads:
            thread.join(allowed + IO_TIMEOUT)
            if thread.is_alive():
                self.violate("burst hung", f"a publisher thread did not finish within {allowed}s")
        done.set()
        self.count("publishes", sum(len(p) for p in payloads))

    def in_burst(self, inst: Instance, burst, fault: str, action) -> None:
        """`action()` in the middle of `burst` (a plan's list of payload lists), or alone when there is none."""
        if burst:
            self.fault(f"{fault} during a publish burst")
            self.run_burst(inst, burst, during=action)
        else:
            action()

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
            return str(
                self.previous_ids[int(pick * len(self.previous_ids)) % len(self.previous_ids)]
            ), self.mode == "memory"
        if kind == "future":
            return str(max(self.model.everything.ids[-1:] or [0]) + FUTURE_MARGIN), False
        if kind == "garbage":
            return GARBAGE_IDS[int(pick * len(GARBAGE_IDS)) % len(GARBAGE_IDS)], False
        if kind == "zero":
            return "0", False
        if kind == "newest" and ids:
            return str(ids[-1]), False
        return None, False

    def do_subscribe(
        self, instance: float, names, last: str, pick: float, query: bool, scoped: bool, stalled: bool
    ) -> None:
        inst = self.pick_instance(instance)
        if inst is None:
            return
        last_id, foreign = self.resolve_last_id(last, pick, inst)
        self.subscribe(inst, names, last, last_id, foreign, query, scoped, stalled, from_stream=last == "current")

    def subscribe(
        self,
        inst: Instance,
        names,
        why: str,
        last_id: str | None,
        foreign: bool,
        query: bool,
        scoped: bool,
        stalled: bool,
        from_stream: bool = False,
    ) -> Watch | None:
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
        target = "/subscribe" + ("?" + urlencode(params) if params else "")
        domain = inst.domain if self.mode == "memory" else model.domain
        start = model.classify(last_id, domain, foreign, from_stream)
        self.watch_numbers += 1
        gap_space = domain if self.mode == "memory" else model.everything
        watch = Watch(
            self.watch_numbers,
            inst,
            None,
            accepted,
            last_id,
            start,
            domain,
            gap_space,
            model.tick(),
            f"{why}{' stalled' if stalled else ''}",
        )
        watch.from_stream = from_stream
        watch.all_names = not names
        if tokens:
            watch.token = SCOPED_TOKEN if scoped else SUBSCRIBE_TOKEN
        must = domain.must()
        if not inst.caught_up:
            # Started while Redis was unreachable: it has read nothing of the stream yet, so it holds nothing the
            # model could require, and may not hold an id it would otherwise have to.
            must = []
            if watch.start is Start.EXACT:
                watch.start = Start.EITHER
        watch.must_floor = must[0] if must else None
        watch.must_count = len(must)
        matching_must = [i for i in must if model.by_id[i].name in accepted]
        if matching_must and start is not Start.LIVE:
            target_id = matching_must[-1]
            if start is Start.RESET or target_id > int(last_id):
                watch.replay_target = target_id
        try:
            status, response_headers, stream = open_stream(
                inst.daemon.port, target, headers, IO_TIMEOUT, rcvbuf=4096 if stalled else None
            )
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
                self.violate(
                    "unexpected subscribe status",
                    f"GET {target} with {headers}: {status} (expected {expected}): {body[:200]!r}",
                )
            if hasattr(stream, "sock"):
                stream.sock.close()
            return None
        if status != 200:
            return None
        if "content-length" in response_headers:
            self.violate(
                "stream turned away",
                f"GET {target}: a 200 with Content-Length (a turn-away) although max_subscribers is far away",
            )
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

    def do_stall(self, pick: float) -> None:
        """A reader that stops reading in the middle of its stream: it must be dropped as slow or keep up, and
        never hold up anyone else."""
        watch = self.pick_watch(pick, lambda w: w.open() and not w.stalled)
        if watch is None:
            return
        watch.stalled = watch.was_stalled = True
        self.reader.pause(watch.stream)
        self.fault("stalled reader (mid-stream)")

    def do_resume(self, pick: float) -> None:
        watch = self.pick_watch(pick, lambda w: w.stalled and w.closed_by is None)
        if watch is None:
            return
        watch.stalled = False
        self.reader.resume(watch.stream)

    def do_reload(self, history_size: int, queue_size: int, heartbeat_interval: float, tokens: bool) -> None:
        self.config.update(
            history_size=history_size, queue_size=queue_size, heartbeat_interval=heartbeat_interval, tokens=tokens
        )
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

    def do_restart(self, instance: float, how: str, burst, wrapper: str, when: str = "1+", store: bool = True) -> None:
        """kill -9 or SIGTERM, then a new lifetime (`store`: under systemd with an fd store). SIGTERM to a memory-mode
        lifetime with an fd store is `systemctl restart`: the lifetime goes on (restart_through_store)."""
        inst = self.pick_instance(instance)
        if inst is None:
            inst = self.instances[0]  # it died: bring it back
            if inst.daemon is not None and inst.daemon.alive():
                return
            self.start_instance(inst, wrapper, when, store)
            return
        if how == "term" and inst.fdstore and self.mode == "memory":
            self.restart_through_store(inst, burst)
            return
        self.stop_instance(inst, how, burst)
        self.start_instance(inst, wrapper, when, store)

    def stop_instance(self, inst: Instance, how: str, burst=None) -> None:
        """SIGTERM (every stream gets everything acknowledged, then `retry:` and an end; exit 0) or kill -9."""
        daemon = inst.daemon
        self.fault("SIGTERM restart" if how == "term" else "kill -9 restart")
        refusals = daemon.count(STORE_REFUSED)
        if how == "term" and inst.fdstore and self.mode != "memory":
            self.fault("SIGTERM with an fd store (refused: state on disk/Redis)")
        for watch in self.watches:
            if watch.daemon is daemon and watch.end_expected is None:
                watch.end_expected = "stop" if how == "term" else "kill"

        def stop():
            inst.stopping = True
            daemon.signal(signal.SIGTERM if how == "term" else signal.SIGKILL)

        self.in_burst(inst, burst, "SIGTERM" if how == "term" else "kill -9", stop)
        code = daemon.wait(SHUTDOWN_TIMEOUT + IO_TIMEOUT)
        if code is None:
            self.violate(
                "stop hung",
                f"{inst.name} still running {SHUTDOWN_TIMEOUT + IO_TIMEOUT}s after "
                f"{'SIGTERM' if how == 'term' else 'SIGKILL'}",
            )
            daemon.kill()
        elif how == "term" and code != 0:
            kind = "exit code under a store fault" if self.store_fault(inst) else "exit code"
            self.violate(kind, f"{inst.name} exited {code} after SIGTERM: {daemon.lines[-5:]}")
        if how == "term":
            daemon.kill()  # reaps strace and the log pump
            if inst.fdstore and self.mode == "memory":
                # Only the end of the run stops a memory-mode lifetime with a store this way (no client is left):
                # `systemctl stop`, and systemd closes what it stored.
                self.faults.empty_store()
            elif inst.fdstore and code == 0:
                self.check_store_refused(inst, daemon.count(STORE_REFUSED) - refusals)
            self.check_graceful_ends(inst, daemon)
        self.gone(inst)

    def check_store_refused(self, inst: Instance, lines: int) -> None:
        """With history_file or redis_url the stop drains as without a store, one line says why, and nothing of
        it is left in the store."""
        stored = self.faults.systemd.names()
        if lines != 1 or stored:
            self.violate(
                "fd store refusal",
                f"{inst.name}: SIGTERM with an fd store and the state on disk/Redis logged {lines} "
                f"'{STORE_REFUSED}' line(s) (expected 1) and left {stored} in the store",
            )
            self.faults.empty_store()
        else:
            self.count("stops that refused the fd store")

    def check_graceful_ends(self, inst: Instance, daemon: DaemonProcess) -> None:
        """After SIGTERM: each stream that was being read has every acknowledged matching event (in Redis mode:
        those this instance acknowledged itself), then `retry: N` with N jittered, then the end."""
        watches = [
            w for w in self.watches if w.daemon is daemon and not w.stalled and w.closed_by is None and not w.end_noted
        ]
        self.reader.wait(lambda: all(w.stream.ended for w in watches), IO_TIMEOUT)
        self.validate_all()
        for watch in watches:
            stream = watch.stream
            if not stream.ended:
                self.violate("stream not ended at stop", f"{watch.describe()} still open after the daemon exited")
                continue
            with self.reader.lock:
                retries = sum(1 for item in stream.items if isinstance(item, Retry))
            # The stream began with `retry:` too: only a second one, last, is the farewell.
            match = re.search(rb"retry: (\d+)\n\n$", stream.tail) if retries >= 2 else None
            if (stream.end_error or not match) and self.explained_as_slow(watch):
                watch.end_noted = True
                continue
            if stream.end_error or not match:
                self.violate(
                    "stop without retry",
                    f"{watch.describe()} ended without `retry:` and a blank line "
                    f"({stream.end_error or 'closed'}); tail {stream.tail[-80:]!r}",
                )
            elif not RETRY_MS <= int(match.group(1)) <= RETRY_MS + 2 * max(RETRY_MS, 1000):
                self.violate("stop retry", f"{watch.describe()}: retry {match.group(1)} outside the jitter range")
            required = self.required_newest(watch, own_only=self.redis_mode)
            if required is not None and (watch.last_event or 0) < required:
                self.violate(
                    "stop lost events",
                    f"{watch.describe()} ended at SIGTERM with event "
                    f"{watch.last_event}, without acknowledged event {required} (every event already "
                    f"accepted must be delivered before `retry:`)",
                )
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
                    self.violate(
                        "leak",
                        f"{inst.name}: {now_fds} fds (baseline {fds}) and {now_threads} threads "
                        f"(baseline {threads}) {QUIESCE_TIMEOUT}s after every client left; fds: "
                        f"{sorted(targets)}",
                    )
                    break
                time.sleep(POLL * 5)
            if self.redis_mode and daemon.redis_connections() > 12:
                self.violate(
                    "redis connections",
                    f"{inst.name}: {daemon.redis_connections()} connections to Redis "
                    f"with no client (the pool is bounded)",
                )
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
                self.violate(
                    "unexpected status", f"{kind}: {response.status}, expected {expected}: {response.body[:200]!r}"
                )
            self.count("bad requests")

    def do_disk_full(self, free: int) -> None:
        self.faults.fill_disk(free)

    def do_disk_free(self) -> None:
        if self.faults.disk_full:
            self.faults.free_disk()

    def new_epoch(self, why: str) -> None:
        """Redis lost its data: events acknowledged so far may never arrive anywhere (streams that miss them must
        be told), and what must be retained starts again from nothing."""
        if self.model.domain.ids:
            self.previous_ids.append(self.model.domain.ids[-1])
        domain = self.model.new_domain(why)
        for inst in self.instances:
            inst.domain = domain

    # A subset of a plan (--only, --minimize) can ask for a fault in a state the whole plan never produces (a
    # FLUSHALL while Redis is down): such an operation does nothing.

    def do_redis_stop(self, how: str) -> None:
        if self.faults.redis_down:
            return
        if self.faults.stop_redis(how):
            self.new_epoch("redis restarted without persistence")

    def do_redis_start(self) -> None:
        if not self.faults.redis_down:
            return
        self.faults.start_redis()
        for inst in self.running():
            self.wait_caught_up(inst)
        self.resolve_from_redis()

    def resolve_from_redis(self) -> None:
        """Publishes answered 503 (or not at all) in Redis mode may have been stored. Read the stream: a tag that
        is there has its id; one that is not, while the stream still reaches back past the moment it was sent,
        was not stored. Either way it stops weakening what the model can require."""
        maybes = [p for p in list(self.model.publishes.values()) if p.status == MAYBE and p.domain is self.model.domain]
        if not maybes:
            return
        entries = self.faults.redis_stream()
        if not entries:
            return
        stored = {}
        untagged = []  # (id, name) of stored events with empty data: those carry no tag
        for entry_id, values in entries:
            event_id = int(entry_id.split("-")[0])
            match = TAG.match(values.get("d", ""))
            if match:
                stored[match.group(0)] = event_id
            elif values.get("d") == "" and event_id not in self.model.by_id:
                untagged.append((event_id, values.get("n")))
        oldest = int(entries[0][0].split("-")[0])
        for publish in maybes:
            if not publish.wire:  # an empty publish: any unclaimed empty entry of its name above its floor
                found = next((i for i, name in untagged if name == publish.name and i > publish.id_floor), None)
                if found is not None:
                    untagged.remove((found, publish.name))
                    stored[publish.tag] = found
            if publish.tag in stored:
                self.model.promote(publish, stored[publish.tag])
                self.raise_floors()
                self.count("maybe-stored publishes found in Redis")
            elif oldest <= publish.id_floor:
                self.model.resolve_absent(publish)
                self.count("maybe-stored publishes absent from Redis")

    def do_flushall(self) -> None:
        if self.faults.redis_unreachable:
            return
        self.faults.flushall()
        self.new_epoch("FLUSHALL")

    def do_link_cut(self, how: str, burst) -> None:
        if self.faults.redis_unreachable:
            return
        inst = self.pick_instance(0.0)
        if burst and inst is not None:
            self.fault("link cut during a publish burst")
            self.run_burst(inst, burst, during=lambda: self.faults.cut_link(how))
        else:
            self.faults.cut_link(how)

    def do_link_restore(self) -> None:
        if not self.faults.link:
            return
        self.faults.restore_link()
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

    def do_upgrade(self, instance: float, burst, kill: bool) -> None:
        """SIGUSR2, maybe in the middle of a publish burst (README, "Upgrades without disconnects").

        Memory mode: the daemon hands everything to a new process and exits 0; the instance's lifetime (its
        Domain: history, ids, replay) goes on in the new pid. Every stream stays open and gets every event
        acknowledged before, during and after exactly once, in order, with no reset and no second `retry:`
        (the checks after every step); a publish during the hand-over may get 503 (not published: it must never
        appear) or lose its answer (maybe published). The one stream end allowed: tokens were turned on by a
        reload after the stream opened without one, and the new process checks its token again as for a
        reconnect. A replay from before the upgrade, asked for after it, is exact.
        `kill`: the new process is killed (-9) as soon as it exists. The old one must notice, log one `upgrade
        failed, still serving` line and go on serving as if nothing happened. Should the new process have
        committed first (the test was that slow), the service is gone: a crash, and the instance restarts.

        Other modes: history_file or redis_url is set, so the daemon refuses with one `still serving` line and
        goes on as if nothing happened: same pid, nothing refused, nothing lost. Lifetimes under strace (file
        modes) get the signal too: the refusal comes before anything that strace could make fail, so the pid
        logic never has to find a new process behind strace."""
        inst = self.pick_instance(instance)
        if inst is None:
            return
        daemon = inst.daemon
        hands_over = self.mode == "memory"
        kill = kill and hands_over
        self.fault(
            ("SIGUSR2, then kill -9 of the new process" if kill else "SIGUSR2 upgrade in place")
            if hands_over
            else "SIGUSR2 upgrade (refused: state on disk/Redis)"
        )
        refused_streams = self.before_hand_over(inst) if hands_over else []
        old_pid, upgrades, refusals = daemon.pid, len(daemon.successors()), daemon.count("still serving")
        outcome: dict[str, int | None] = {}

        def upgrade() -> None:
            inst.handing_over = hands_over
            daemon.signal(signal.SIGUSR2)
            if kill:
                outcome["killed"] = child = daemon.new_process(UPGRADE_TIMEOUT)
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
            # Until a line says how it went (the old process logs it before it exits; a crash costs the timeout).
            deadline = time.monotonic() + UPGRADE_TIMEOUT
            while len(daemon.successors()) == upgrades and daemon.count("still serving") == refusals:
                if time.monotonic() > deadline:
                    break
                time.sleep(POLL)
            successors = daemon.successors()
            if len(successors) > upgrades:
                outcome["pid"] = successors[upgrades]
                outcome["code"] = daemon.follow(successors[upgrades], UPGRADE_TIMEOUT)
            inst.handing_over = False

        self.in_burst(inst, burst, "SIGUSR2", upgrade)
        failures = [line for line in daemon.lines if "still serving" in line][refusals:]
        if "pid" not in outcome:
            # A refusal is right when the daemon cannot hand over, or the test killed the new process.
            self.upgrade_refused(inst, old_pid, failures, not hands_over or outcome.get("killed") is not None)
            for watch in refused_streams:
                watch.end_expected = None  # no new process checked them
            return
        new_pid, code = outcome["pid"], outcome["code"]
        if not hands_over or failures:
            self.violate("upgrade", f"{inst.name}: handed over to pid {new_pid} (expected a refusal), {failures}")
        if code is None:
            self.violate("upgrade", f"{inst.name}: old pid {old_pid} still runs {UPGRADE_TIMEOUT}s after handing over")
            return
        if code != 0:
            self.violate("upgrade", f"{inst.name}: old pid {old_pid} exited {code} after handing over")
        self.log(f"{inst.name}: upgraded in place, pid {old_pid} -> {new_pid}")
        if kill and outcome.get("killed") == new_pid:
            self.count("new processes killed after they took over (a crash)")
            self.gone(inst)
            self.start_instance(inst, "plain")
            return
        self.count("upgrades in place")
        if not daemon.alive():
            self.violate("upgrade", f"{inst.name}: pid {new_pid} took over and is gone: {daemon.lines[-5:]}")
            return
        self.after_hand_over(inst, refused_streams, "replay-across-upgrade")

    def before_hand_over(self, inst: Instance) -> list[Watch]:
        """Before an upgrade in place or a restart through the fd store (memory mode): the next process judges each
        stream it adopts by the config as for its reconnect (README). Returns the streams it must end: opened
        without a token while tokens are required now."""
        daemon = inst.daemon
        refused_streams = []
        if self.config["tokens"]:
            refused_streams = [w for w in self.watches if w.daemon is daemon and w.open() and w.token is None]
        for watch in refused_streams:
            watch.end_expected = "upgrade"
        if not self.config["tokens"]:
            # A stream that asked for no names under a scoped token, now that no token is required, gets every
            # name from the hand-over on. The model keeps one filter per stream, so such a stream's client leaves
            # first.
            for watch in self.watches:
                if watch.daemon is daemon and watch.open() and watch.token == SCOPED_TOKEN and watch.all_names:
                    watch.closed_by = "fin"
                    self.reader.close(watch.stream, "fin")
                    self.count("streams left before a hand-over widens their filter")
        return refused_streams

    def after_hand_over(self, inst: Instance, refused_streams: list[Watch], why: str) -> None:
        """The next process serves the same lifetime: the streams it had to end did end, and a replay from before
        the hand-over, asked for after it, is exact (the checks after the step)."""
        for watch in refused_streams:
            if watch.stalled:  # a stream nobody reads shows no end: read it to see that it ended
                watch.stalled = False
                self.reader.resume(watch.stream)
        self.reader.wait(lambda: all(w.stream.ended for w in refused_streams), IO_TIMEOUT)
        for watch in refused_streams:
            if watch.stream.ended:
                self.count("streams ended at a hand-over (no token, tokens required now)")
            else:
                self.violate(
                    "stream kept at hand-over",
                    f"{watch.describe()} presented no token and tokens are required now, but pid "
                    f"{inst.daemon.pid} did not end it within {IO_TIMEOUT}s",
                )
        must = inst.domain.must()
        if must:
            self.subscribe(inst, None, why, str(must[0]), False, False, False, False)

    def restart_through_store(self, inst: Instance, burst) -> None:
        """`systemctl restart` of a memory-mode lifetime with an fd store, maybe in the middle of a publish burst
        (README, "Restarts without disconnects"): SIGTERM, and the daemon stores its listener, every stream, a
        claim and its state in the test's systemd and exits 0; then the next process starts with the stored
        descriptors (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), empties the store before it says READY=1, and adopts
        everything. For the model the lifetime goes on, as after an upgrade in place: every stream stays open
        and gets every acknowledged event exactly once, in order, with no reset and no second `retry:`; ids and
        replay continue; a publish during the stop may get 503 (not published) or lose its answer (maybe), and
        one that reaches the listening socket while no process runs waits there for the next one."""
        daemon, systemd = inst.daemon, self.faults.systemd
        self.fault("SIGTERM restart through systemd's fd store")
        refused_streams = self.before_hand_over(inst)
        port, baseline, lines = daemon.port, daemon.baseline, len(daemon.lines)
        outcome: dict[str, object] = {}

        def restart() -> None:
            inst.handing_over = True
            try:
                daemon.signal(signal.SIGTERM)
                outcome["code"] = code = daemon.wait(UPGRADE_TIMEOUT)
                if code != 0:
                    return
                outcome["stored"] = systemd.names()
                mark = len(systemd.messages)
                daemon.start(systemd.passed())
                ready = lambda: any(m.startswith("READY=1") for m in systemd.messages[mark:])  # noqa: E731
                with contextlib.suppress(AssertionError):
                    systemd.wait_for(ready, "READY=1")
                outcome["ready"] = ready()
                outcome["left"] = systemd.names()  # READY=1 comes after the store was emptied
            finally:
                inst.handing_over = False

        self.in_burst(inst, burst, "fd-store restart", restart)
        code = outcome.get("code")
        stop_lines = daemon.lines[lines:]
        if code != 0:
            self.violate(
                "fd store restart",
                f"{inst.name}: "
                + (f"exited {code}" if code is not None else f"still running {UPGRADE_TIMEOUT}s")
                + f" after SIGTERM with an fd store: {stop_lines[-5:]}",
            )
            self.gone(inst)
            self.faults.empty_store()
            self.start_instance(inst, "plain")
            return
        daemon.baseline = baseline  # the lifetime's, as after an upgrade in place (the next process adopted streams)
        stored, problems = outcome["stored"], []
        if not any(STORED in line for line in stop_lines) or any(STORE_NOT_USED in line for line in stop_lines):
            problems.append("the stop did not store its streams")
        if stored[:1] != [fdstore.LISTEN] or stored[-2:] != [fdstore.CLAIM, fdstore.STATE]:
            problems.append(f"stored {stored[:3]}...{stored[-3:]}, not the listener first and the claim and state last")
        if daemon.port != port:
            problems.append(f"the next process listens on {daemon.port}, not on the stored listener's port {port}")
        if not outcome["ready"]:
            problems.append("the next process did not say READY=1")
        if outcome["left"]:
            problems.append(f"the store still holds {outcome['left'][:5]} after the next start")
        if not any(ADOPTED in line for line in daemon.lines[lines:]):
            problems.append("the next process adopted nothing")
        problems += [line for line in daemon.lines[lines:] if NOT_ADOPTED in line]
        if problems:
            self.violate("fd store restart", f"{inst.name}: " + "; ".join(problems) + f"; log: {stop_lines[-3:]}")
        self.count("restarts through the fd store")
        self.raise_floors()
        self.after_hand_over(inst, refused_streams, "replay-across-fd-store-restart")

    def upgrade_refused(self, inst: Instance, old_pid: int, failures: list[str], expected: bool) -> None:
        """No new process took over: the old one must say why once, and serve on as before."""
        daemon = inst.daemon
        if not expected or len(failures) != 1 or not daemon.alive() or daemon.pid != old_pid:
            self.violate(
                "upgrade refusal" if self.mode != "memory" else "upgrade failed",
                f"{inst.name}: SIGUSR2 to pid {old_pid}: "
                + (f"{failures}" if failures else f"no outcome logged within {UPGRADE_TIMEOUT}s")
                + ("" if daemon.alive() else f"; the daemon is gone: {daemon.lines[-5:]}"),
            )
        elif self.mode != "memory" and not any(why in failures[0] for why in ("history_file", "redis_url")):
            self.violate("upgrade refusal", f"{inst.name}: refused for another reason: {failures[0]}")
        else:
            self.count("upgrades refused, still serving" if self.mode != "memory" else "upgrades failed, still serving")

    def gone(self, inst: Instance) -> None:
        """The instance's process is gone (stopped, or killed under the test): close what is left of it."""
        daemon = inst.daemon
        for watch in self.watches:
            if watch.daemon is daemon and watch.end_expected is None:
                watch.end_expected = "kill"
        daemon.kill()  # reaps the log pump
        if inst.keepalive:
            inst.keepalive.close()
        for watch in self.watches:
            if watch.daemon is daemon and not watch.stream.ended and watch.closed_by is None:
                watch.closed_by = "rst"
                self.reader.close(watch.stream, "rst")
        self.check_logs()

    def wait_caught_up(self, inst: Instance) -> None:
        """Redis mode: the instance's follower is up and has read everything acknowledged in this epoch."""
        newest = self.model.domain.ids[-1] if self.model.domain.ids else 0
        deadline = time.monotonic() + REDIS_TIMEOUT
        health = None
        while time.monotonic() < deadline:
            health = self.health(inst)
            if health is not None and health.get("redis") == "up" and int(health.get("last_event_id") or 0) >= newest:
                inst.caught_up = True
                return
            time.sleep(POLL * 5)
        self.violate(
            "redis follower",
            f"{inst.name} not caught up with the stream (newest acknowledged {newest}) "
            f"within {REDIS_TIMEOUT}s: {health}",
        )

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
        if newest is not None and self.redis_mode and newest < domain.floor_id:
            newest = None  # the shared stream may have trimmed it (MAXLEN ~) before this instance read it
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
            snapshot = [(watch, watch.stream.items[watch.checked :]) for watch in self.watches]
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
                    self.count(
                        "maybe-stored publishes seen in a stream"
                        if publish.status == MAYBE
                        else "publishes stored after Redis showed them absent (a held command)"
                    )
                    self.model.promote(publish, event_id)
                    promoted += 1
                elif publish.status == REFUSED:
                    publish.status = Status.DELIVERED_ANYWAY
                    self.violate(
                        "refused publish delivered",
                        f"{watch.describe()} received {item!r}, whose publish "
                        f"was answered with an error (a non-200 must mean 'not published')",
                    )
        if promoted:
            self.raise_floors()  # a promoted event counts toward history_size like any other
        return promoted

    def find_publish(self, item: Event) -> Publish | None:
        match = TAG.match(item.data)
        if match:
            return self.model.publishes.get(match.group(0))
        for publish in list(self.model.publishes.values()):  # an empty payload has no tag
            if publish.status in (MAYBE, ABSENT) and publish.wire == item.data and publish.name == item.name:
                return publish
        return None

    def settle(self) -> None:
        """Wait until every stream being read has received every event it must have by now."""
        if self.redis_mode and self.faults.redis_unreachable:
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
                    for item in items[watch.scanned :]:
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
                self.violate(
                    "missing events",
                    f"{watch.describe()} has not received acknowledged event {required} "
                    f"({self.model.by_id[required].tag}) within {SETTLE_TIMEOUT}s; newest received "
                    f"{watch.newest_seen or None}",
                )
            return

    def validate_all(self) -> None:
        self.promote_maybes()
        with self.reader.lock:
            snapshot = [(watch, watch.stream.items[watch.checked :]) for watch in self.watches]
        for watch, items in snapshot:
            for item in items:
                self.validate(watch, item)
                watch.checked += 1
            self.check_reset_in_preamble(watch)
            parser = watch.stream.parser
            if parser.bom or parser.decode_errors or parser.unknown_fields:
                self.violate(
                    "framing",
                    f"{watch.describe()}: BOM {parser.bom}, {parser.decode_errors} lines not "
                    f"UTF-8, unknown fields {parser.unknown_fields[:5]}",
                )
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

    def check_reset_in_preamble(self, watch: Watch) -> None:
        """The reset a Last-Event-ID needs goes out with the stream's head and `retry:` (one write), so a stream that
        must start with one and has its `retry:` but no reset, two checks in a row, will not get it (even if no
        matching event ever comes to show the omission)."""
        if watch.start is not Start.RESET or watch.leading_reset or watch.seen_any or watch.stream.ended:
            return
        with self.reader.lock:
            preamble_in = any(isinstance(i, Retry) for i in watch.stream.items) and not watch.stream.parser.pending()
        if not preamble_in:
            return
        watch.reset_checks += 1
        if watch.reset_checks == 2:
            self.violate(
                "missing reset",
                f"{watch.describe()}: the stream began without the sseserver.reset that "
                f"a Last-Event-ID the daemon cannot honour requires",
            )

    def validate(self, watch: Watch, item) -> None:
        model = self.model
        if isinstance(item, Retry):
            watch.retries += 1
            if watch.retries > 1 and watch.end_expected is None:
                # A second `retry:` is the farewell of a stop (or a changed retry_ms, which the test never
                # changes): a stream must not get one across a reload or an upgrade in place.
                self.violate("retry mid-stream", f"{watch.describe()}: a second `retry:` while its daemon runs on")
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
            self.violate(
                "wrong event",
                f"{where} received id {event_id} as {item!r}, but that id belongs to "
                f"{publish.tag} {publish.name!r} {publish.wire[:40]!r}"
                + (f"; the data is {found.tag}'s ({found.status.value}, id {found.id})" if found else ""),
            )
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
        if watch.start is Start.RESET and not watch.leading_reset:
            self.violate(
                "missing reset",
                f"{where}: first event {event_id} without the sseserver.reset that a "
                f"Last-Event-ID the daemon cannot honour requires",
            )
            return
        if watch.leading_reset or watch.resets:
            if not watch.gap_ok:
                self.check_gap(watch, watch.prev, event_id, "after the reset")
            return
        if watch.start in (Start.EXACT, Start.EITHER):
            self.count("exact replays checked")
            self.check_gap(
                watch, int(watch.last_id), event_id, "replay after Last-Event-ID", space=self.replay_space(watch)
            )
            return
        # A stream without Last-Event-ID starts with live events.
        if not self.redis_mode and publish.ack_seq is not None and publish.ack_seq < watch.sent_seq:
            self.violate(
                "replay without Last-Event-ID",
                f"{where}: first event {event_id} was acknowledged before the stream was requested",
            )
        self.check_live_start(watch, event_id)

    def check_live_start(self, watch: Watch, before: int) -> None:
        missed = [
            i
            for i in watch.gap_space.between(watch.sure_max_id, before, watch.names)
            if self.model.by_id[i].sent_seq > watch.sure_seq
        ]
        if missed:
            self.violate(
                "gap",
                f"{watch.describe()}: live events {self.describe_ids(missed)} published after the "
                f"stream was open never arrived (the stream went on at {before})",
            )

    def replay_space(self, watch: Watch) -> Index:
        """Where a replay from the Last-Event-ID must be gap-free. A `0` the daemon itself handed out in Redis mode
        is the predecessor of the stream's first entry after a loss: the client was told of the loss by the reset
        that gave it that cursor, so only this epoch counts."""
        if self.redis_mode and watch.from_stream and watch.last_id == "0":
            return watch.domain
        return watch.gap_space

    def check_gap(self, watch: Watch, low: int | None, high: int, where: str, space: Index | None = None) -> None:
        if low is None:
            self.check_live_start(watch, high)
            return
        missing = (space or watch.gap_space).between(low, high, watch.names)
        if missing:
            self.violate(
                "gap",
                f"{watch.describe()}: {where}, {high} came after {low} but acknowledged matching "
                f"events {self.describe_ids(missing)} never did, and no sseserver.reset said so",
            )

    def describe_ids(self, ids: list[int]) -> str:
        """Ids with the publish behind each (tag, how it was answered, the step that published it)."""
        shown = []
        for event_id in ids[:5]:
            publish = self.model.by_id.get(event_id)
            shown.append(
                f"{event_id} ({publish.tag} {publish.name}, {publish.status.value} at step {publish.step})"
                if publish
                else str(event_id)
            )
        return "[" + ", ".join(shown) + (f", ... {len(ids)} in all" if len(ids) > 5 else "") + "]"

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
            self.violate(
                "heartbeat id", f"{where}: heartbeat moved the cursor back to {cursor} after event {watch.last_event}"
            )
            return
        fresh = not watch.seen_any and not watch.leading_reset and not watch.resets
        if not watch.seen_any and watch.start is Start.RESET and not watch.leading_reset:
            self.violate(
                "missing reset",
                f"{where}: a heartbeat id came before the sseserver.reset that a "
                f"Last-Event-ID the daemon cannot honour requires",
            )
        elif fresh and watch.start in (Start.EXACT, Start.EITHER):
            self.check_gap(
                watch,
                int(watch.last_id),
                cursor + 1,
                "heartbeat cursor after Last-Event-ID",
                space=self.replay_space(watch),
            )
        elif fresh:
            self.check_live_start(watch, cursor + 1)
        elif not watch.gap_ok:
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
        leading = (
            not watch.seen_any
            and not watch.leading_reset
            and not watch.resets
            and watch.start in (Start.RESET, Start.EITHER)
            and item.own_id
        )
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
            elif watch.start is Start.EXACT:
                self.violate(
                    "needless reset",
                    f"{where}: sseserver.reset although the daemon must still hold "
                    f"Last-Event-ID {watch.last_id} (replay must be exact): {item.data}",
                )
            else:
                self.violate(
                    "needless reset", f"{where}: sseserver.reset on a stream opened without Last-Event-ID: {item.data}"
                )
            return
        self.count("reset replays checked")
        if echoed != watch.last_id:
            if echoed == watch.last_id.encode("utf-8").decode("latin-1"):
                # HTTP header bytes read as latin-1: a browser sends Last-Event-ID in UTF-8. Cosmetic; counted.
                self.count("non-ASCII Last-Event-ID echoed as latin-1")
            else:
                self.violate("reset format", f"{where}: reset echoes last_event_id {echoed!r}, sent {watch.last_id!r}")
        if oldest is None:
            if watch.must_count:
                self.violate(
                    "retained too few",
                    f"{where}: reset says nothing is retained, but "
                    f"{watch.must_count} events (from id {watch.must_floor}) must be",
                )
            watch.prev = None  # nothing to replay: from here on it is a live stream (check_live_start)
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
            self.violate(
                "retained too few",
                f"{where}: replay starts at {oldest_id}, but every event from "
                f"{watch.must_floor} on ({watch.must_count} events) must still be retained",
            )
        # Everything from oldest_id on that matches must now follow, without a gap.
        watch.prev = oldest_id - 1
        watch.gap_ok = False

    def check_reset_cursor(self, watch: Watch, item: Event, oldest_id: int) -> None:
        """The reset's `id:` is the id just before the oldest retained event, so a reconnect from it replays
        exactly (README). The model knows that id when an acknowledged event precedes the oldest one; before a
        lifetime's first event it is an origin the model cannot see, so only "below oldest_id" is checked."""
        where = watch.describe()
        if not (item.id.isascii() and item.id.isdigit()) or int(item.id) >= oldest_id:
            self.violate(
                "reset format", f"{where}: reset carries id {item.id!r}, not the id before oldest_id {oldest_id}"
            )
            return
        if self.redis_mode or watch.domain.unresolved:
            return
        before = watch.gap_space.between(None, oldest_id, frozenset(NAMES))
        # The oldest may be a lifetime's first event with nothing stored before it (history_size 0 emptied the
        # file): its predecessor is that lifetime's origin, `first id - 1`, and a reconnect from it is exact too.
        if before and int(item.id) not in (before[-1], oldest_id - 1) and int(item.id) not in self.model.by_id:
            self.violate(
                "reset format",
                f"{where}: reset carries id {item.id}, but the event before oldest_id {oldest_id} is {before[-1]}",
            )

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
            self.violate(
                "stream ended",
                f"{watch.describe()} ended ({watch.stream.end_error or 'EOF'}) although "
                f"its daemon runs, it was not slow ({watch.daemon.slow_drops()} slow drops logged) and "
                f"the client stayed; tail {watch.stream.tail[-80:]!r}",
            )

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
            return f"subscribers {subscribers!r}, but the test holds {active} streams open" + (
                f" and {stalled} stalled ones" if stalled else ""
            )
        domain = inst.domain if self.mode == "memory" else self.model.domain
        newest = domain.ids[-1] if domain.ids else None
        last = health.get("last_event_id")
        last_value = int(last) if isinstance(last, str) and last.isdigit() else None
        nothing_retained = not domain.must()  # e.g. history_size 0 across a restart: the daemon cannot know
        if (
            newest is not None
            and not (self.redis_mode and self.faults.redis_unreachable)
            and not (nothing_retained and last_value is None)
        ):
            if last_value is None or last_value < newest:
                return f"last_event_id {last!r}, but {newest} was acknowledged"
            if last_value != newest and not self.redis_mode and not domain.refused:
                return f"last_event_id {last!r}, but the newest event is {newest}"
        if self.redis_mode and not self.faults.redis_unreachable and health.get("redis") not in (None, "up"):
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
            lines = daemon.lines[daemon.checked_lines :]
            daemon.checked_lines += len(lines)
            for index, line in enumerate(lines):
                if "Traceback" in line:
                    self.violate(
                        "traceback", f"{daemon.label} logged a traceback: " + " | ".join(lines[index : index + 12])
                    )
                    break

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Heal every fault, then every client leaves (fds and threads back to baseline), then SIGTERM."""
        if self.faults.disk_full:
            self.do_disk_free()
        if self.faults.redis_down:
            self.do_redis_start()
        if self.faults.link:
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
        print(
            f"chaos summary: mode={self.mode} seed={self.seed}: {len(self.executed)} steps in {elapsed:.1f}s, "
            f"{published} events acknowledged, {self.stats.get('streams opened', 0)} streams",
            file=out,
        )
        print(
            "  faults injected: " + (", ".join(f"{k} x{v}" for k, v in sorted(self.faults.counts.items())) or "none"),
            file=out,
        )
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
        print(
            f"  violations: {len(self.violations)} (" + ", ".join(f"{k} x{v}" for k, v in kinds.items()) + ")", file=out
        )
        first = self.violations[0].step
        steps = [f"    step {index}: {op}" for index, op in self.executed if index <= first]
        with open(os.path.join(self.workdir, "steps.txt"), "w") as handle:
            handle.write("\n".join(f"step {index}: {op}" for index, op in self.executed) + "\n")
        print(
            f"  first violation at step {first}; steps up to it"
            + (f" (last 40 of {len(steps)}; all in {self.workdir}/steps.txt)" if len(steps) > 40 else "")
            + ":",
            file=out,
        )
        print("\n".join(steps[-40:]), file=out)
        for violation in self.violations[:20]:
            print(f"  {violation}", file=out)
        print(f"  daemon logs: {self.log_path}", file=out)
        only = f" --only {','.join(str(i) for i in sorted(self.only))}" if self.only is not None else ""
        print(
            f"  replay: python3 -m tests.chaos --mode {self.mode} --seed {self.seed} --steps {first + 1}{only}",
            file=out,
            flush=True,
        )


def minimize(mode: str, seed: int, steps: int, kind: str, out=sys.stdout) -> list[int] | None:
    """Cut the plan's first `steps` steps down to a small subset that still produces a violation of `kind`
    (greedy removal of ever smaller chunks; each trial is a fresh run). Timing-dependent failures may need a few
    tries: a trial counts as reproducing if any of TRIES runs does."""
    tries = 2

    def reproduces(subset: list[int]) -> bool:
        for _ in range(tries):
            with open(os.devnull, "w") as quiet:
                chaos = Chaos(mode, seed, steps, only=set(subset), out=quiet)
                chaos.run()
            if any(v.kind == kind for v in chaos.violations):
                return True
        return False

    current = list(range(steps))
    if not reproduces(current):
        print(f"minimize: no [{kind}] violation in the first {steps} steps", file=out)
        return None
    chunk = max(1, len(current) // 2)
    while True:
        index, changed = 0, False
        while index < len(current):
            candidate = current[:index] + current[index + chunk :]
            if candidate and reproduces(candidate):
                current, changed = candidate, True
                print(f"minimize: {len(current)} steps left", file=out, flush=True)
            else:
                index += chunk
        if chunk == 1 and not changed:
            break
        chunk = max(1, chunk // 2) if not changed else chunk
    only = ",".join(str(i) for i in current)
    print(
        f"minimal reproduction ({len(current)} steps): python3 -m tests.chaos --mode {mode} --seed {seed} "
        f"--steps {steps} --only {only}",
        file=out,
    )
    _, plan = make_plan(mode, seed, steps)
    for index in current:
        print(f"    step {index}: {plan[index]}", file=out)
    return current


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
    parser.add_argument(
        "--minimize",
        metavar="KIND",
        help="find a small subset of the first --steps steps that still shows a violation of KIND",
    )
    args = parser.parse_args(argv)
    # A timeout's SIGTERM must still run the cleanup (daemons, redis-server, the namespace holder).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.minimize:
        return 0 if minimize(args.mode, args.seed, args.steps, args.minimize) else 1
    if args.print_plan:
        initial, plan = make_plan(args.mode, args.seed, args.steps)
        print(f"initial config: {initial}")
        for index, op in enumerate(plan):
            print(f"step {index}: {op}")
        return 0
    chaos = Chaos(
        args.mode,
        args.seed,
        args.steps,
        verbose=args.verbose,
        keep_going=args.keep_going,
        only=args.only,
        keep=args.keep,
    )
    return 0 if chaos.run() else 1


if __name__ == "__main__":
    sys.exit(main())

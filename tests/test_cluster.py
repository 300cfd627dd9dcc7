"""Scale-out through a real redis-server (on a unix socket in the test's directory): two daemons, one stream, and
the Redis faults an operator meets (restart with and without persistence, FLUSHALL, a stream trimmed while an
instance was cut off, auth errors, a key of the wrong type, a dataset still loading)."""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest

from sseserver import resp
from sseserver.bouncer import Bouncer
from sseserver.cluster import RedisBridge
from sseserver.config import ConfigError
from tests.tcpproxy import TcpProxy
from tests.test_framing import FeedReader
from tests.support import (
    IO_TIMEOUT,
    STOP_TIMEOUT,
    RunningServer,
    SSEClient,
    assert_exit,
    daemon_process,
    health,
    request,
    require_binary,
    run_cli,
    stop_daemon,
    wait_for_subscribers,
    wait_until,
    write_config,
)

# The follower's backoff doubles from 0.1 s to 5 s: after a fault is mended it is back within this.
RECOVERY_TIMEOUT = 20.0
STREAM_KEY = "sseserver:events"  # redis_key_prefix's default


class RedisServer:
    """A throwaway redis-server on a unix socket in its own directory. `persistent`: an append-only file fsynced
    on every write, so a restart keeps the stream; otherwise no persistence at all (a restart loses everything
    unless the test SAVEs a snapshot first). `password`: requirepass for the default user."""

    def __init__(self, persistent: bool = True, password: str | None = None):
        self.binary = require_binary("redis-server")
        self.dir = tempfile.mkdtemp(prefix="ssr-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.persistent = persistent
        self.password = password  # what the test's own commands log in with
        self.process = None
        self.saw_loading = False  # the readiness probe met a -LOADING reply and waited

    def url(self, username: str | None = None, password: str | None = None) -> str:
        """The URL a daemon is given (by default the default user with no password)."""
        if password is None:
            return f"unix://{self.socket}"
        return f"unix://{username or ''}:{password}@{self.socket}"

    def start(self, *extra: str):
        durability = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                "0",
                "--unixsocket",
                self.socket,
                "--unixsocketperm",
                "700",
                "--dir",
                self.dir,
                "--save",
                "",
                *durability,
                *auth,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._pings, what="redis-server to answer")
        return self

    def restart(self, *extra: str):
        self.stop()
        return self.start(*extra)

    def _pings(self):
        """Ready = PONG. A redis-server still loading its data answers -LOADING: that is a wait, not a failure."""
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.process.returncode}")
        try:
            connection = resp.Connection(resp.parse_url(self.url(password=self.password)), 1.0)
        except resp.RedisUnavailable:
            return False
        except resp.RedisError as exc:
            return self._loading(exc)
        try:
            return connection.command("PING") == "PONG"
        except resp.RedisUnavailable:
            return False
        except resp.RedisError as exc:
            return self._loading(exc)
        finally:
            connection.close()

    def _loading(self, exc: resp.RedisError) -> bool:
        if not str(exc).startswith("LOADING"):
            raise exc
        self.saw_loading = True
        return False

    def command(self, *args):
        connection = resp.Connection(resp.parse_url(self.url(password=self.password)), IO_TIMEOUT)
        try:
            return connection.command(*args)
        finally:
            connection.close()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_stalls(redis) -> bool:
    """True while redis-server takes commands but does not answer them (DEBUG SLEEP)."""
    try:
        connection = resp.Connection(resp.parse_url(redis.url(password=redis.password)), 0.3)
    except resp.RedisUnavailable:
        return False
    try:
        connection.command("PING")
        return False
    except resp.RedisUnavailable:
        return True
    finally:
        connection.close()


def publish(port, data, event=None):
    status, _, body = request(port, "POST", "/publish" + (f"?event={event}" if event else ""), data)
    return status, json.loads(body)


def published_id(port, data) -> int:
    status, reply = publish(port, data)
    assert status == 200, (status, reply)
    return int(reply["id"])


def metric(port, name) -> float:
    text = request(port, "GET", "/metrics")[2].decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def redis_is_up(port) -> bool:
    return health(port)["redis"] == "up"


def log_lines_with(process, text) -> list[str]:
    return [line for line in list(process.log_lines) if text in line]


class ClusterTest(unittest.TestCase):
    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.config = write_config(self.redis.dir, "sseserver.toml", redis_url=self.redis.url(), retry_ms=200)

    def two_daemons(self):
        return daemon_process("--port", "0", "-c", self.config), daemon_process("--port", "0", "-c", self.config)

    def test_publish_to_either_instance_reaches_subscribers_of_both_once_in_order(self):
        first, second = self.two_daemons()
        with first as (a, port_a), second as (b, port_b):
            with SSEClient(port_a) as on_a, SSEClient(port_b) as on_b:
                wait_for_subscribers(port_a, 1)
                wait_for_subscribers(port_b, 1)
                ids = []
                for index in range(20):
                    floor = time.time_ns() // 1000
                    ids.append(published_id(port_a if index % 2 else port_b, f"event {index}"))
                    self.assertGreaterEqual(ids[-1], floor)  # ids are wall-clock microseconds or above
                self.assertEqual(ids, sorted(set(ids)))  # one strictly increasing sequence across instances
                for client in (on_a, on_b):
                    events = client.read_events(20)
                    self.assertEqual([(e.id, e.data) for e in events], [(str(ids[i]), f"event {i}") for i in range(20)])
            self.assertEqual(health(port_a)["redis"], "up")
            for process in (a, b):
                stop_daemon(process)

    def test_a_browser_moving_to_the_other_instance_resumes_without_gap_or_duplicate(self):
        first, second = self.two_daemons()
        with first as (a, port_a), second as (b, port_b):
            with SSEClient(port_a) as on_a:
                wait_for_subscribers(port_a, 1)
                for index in range(5):
                    publish(port_a, f"e{index}")
                seen = on_a.read_events(5)
            last_id = seen[-1].id
            for index in range(5, 8):
                publish(port_a, f"e{index}")
            with SSEClient(port_b, headers={"Last-Event-ID": last_id}) as on_b:
                events = on_b.read_events(3)
                self.assertEqual([e.data for e in events], ["e5", "e6", "e7"])
                self.assertEqual([int(e.id) for e in events], sorted({int(e.id) for e in events}))
                self.assertGreater(int(events[0].id), int(last_id))
            # A Last-Event-ID that B's follower may not have reached yet is waited for, not reset.
            _, reply = publish(port_a, "fresh")
            with SSEClient(port_b, headers={"Last-Event-ID": reply["id"]}) as ahead:
                publish(port_b, "next")
                (event,) = ahead.read_events(1)
                self.assertEqual(event.data, "next")
            # A new instance starts with the stream's history: `0` gets the reset, then everything (0 is no id of
            # this stream, whose first entry's predecessor is its own id - 1: see test_flushall_...).
            with daemon_process("--port", "0", "-c", self.config) as (c, port_c):
                with SSEClient(port_c, headers={"Last-Event-ID": "0"}) as on_c:
                    events = on_c.read_events(10)
                    self.assertEqual(events[0].type, "sseserver.reset")
                    self.assertEqual([e.data for e in events[1:4]], ["e0", "e1", "e2"])
                stop_daemon(c)

    def test_redis_down_then_back_streams_stay_open_and_nothing_stored_is_missed(self):
        first, second = self.two_daemons()
        with first as (a, port_a), second as (b, port_b):
            with SSEClient(port_a) as client:
                wait_for_subscribers(port_a, 1)
                for index in range(3):
                    publish(port_b, f"before {index}")
                self.assertEqual(len(client.read_events(3)), 3)
                # The followers lose their links while B keeps publishing: they must resume from the last id.
                stop = threading.Event()
                published = []

                def keep_publishing():
                    index = 0
                    while not stop.is_set():
                        status, reply = publish(port_b, f"during {index}")
                        if status == 200:
                            published.append(reply["id"])
                        index += 1

                publisher = threading.Thread(target=keep_publishing)
                publisher.start()
                for _ in range(5):
                    wait_until(lambda: len(published) >= 5)
                    self.redis.command("CLIENT", "KILL", "TYPE", "normal")
                stop.set()
                publisher.join(IO_TIMEOUT)
                # Every acknowledged event arrives, in order, once. (A publish whose reply was lost with its
                # connection is answered 503 but may have been stored: it may arrive too, in its place.)
                received = []
                while not received or int(received[-1]) < int(published[-1]):
                    received.append(client.read_events(1)[0].id)
                self.assertEqual([int(i) for i in received], sorted({int(i) for i in received}))
                self.assertLessEqual(set(published), set(received))
                # Redis itself goes away: publishing is refused, streams stay open, health says so.
                self.redis.stop()
                wait_until(lambda: health(port_a).get("redis") == "down", what="redis down in /health")
                status, reply = publish(port_a, "refused")
                self.assertEqual(status, 503)
                self.assertIn("not published", reply["error"])
                self.assertEqual(health(port_a)["subscribers"], 1)
                self.redis.start()  # same append-only file: the stream is back with its ids
                wait_until(lambda: health(port_a)["redis"] == "up", timeout=30, what="redis up again")
                status, reply = publish(port_a, "after")
                self.assertEqual(status, 200)
                while True:  # possibly after a stored-but-unacknowledged "during" event, never anything else
                    event = client.read_events(1)[0]
                    self.assertGreater(int(event.id), int(received[-1]))
                    received.append(event.id)
                    if event.data == "after":
                        break
                    self.assertTrue(event.data.startswith("during "), event.data)
                self.assertEqual(event.id, reply["id"])
            metrics = request(port_a, "GET", "/metrics")[2].decode()
            self.assertIn("sseserver_redis_up 1", metrics)
            self.assertRegex(metrics, r"sseserver_redis_reconnects_total [1-9]")

    def test_two_instances_behind_an_nginx_upstream(self):
        from tests.test_nginx import Nginx

        first, second = self.two_daemons()
        with first as (_, port_a), second as (__, port_b), Nginx([port_a, port_b]) as nginx:
            clients = [SSEClient(nginx.connect) for _ in range(4)]  # round robin: two on each instance
            try:
                wait_for_subscribers(port_a, 2)
                wait_for_subscribers(port_b, 2)
                ids = [
                    json.loads(request(nginx.connect, "POST", "/publish", f"via nginx {i}")[2])["id"] for i in range(6)
                ]
                for client in clients:
                    self.assertEqual([e.id for e in client.read_events(6)], ids)
            finally:
                for client in clients:
                    client.close()

    def test_bench_cluster_mode_counts_every_delivery(self):
        import sys
        from tests.support import ROOT

        first, second = self.two_daemons()
        with first as (_, port_a), second as (__, port_b):
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sseserver.bench",
                    "--url",
                    f"http://127.0.0.1:{port_a}",
                    "--url",
                    f"http://127.0.0.1:{port_b}",
                    "--subs",
                    "20",
                    "--msgs",
                    "40",
                    "--rate",
                    "0",
                    "--procs",
                    "2",
                    "--pub-conns",
                    "2",
                    "--drain",
                    "30",
                    "--connect-timeout",
                    "30",
                ],
                cwd=ROOT,
                capture_output=True,
                timeout=120,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            report = json.loads(result.stdout)
            self.assertEqual(report["url"], [f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"])
            self.assertEqual(
                (report["expected"], report["delivered"], report["lost"], report["duplicates"]),
                (20 * 40, 20 * 40, 0, 0),
            )


class RedisFaultTest(unittest.TestCase):
    """Each Redis fault: what an open stream sees, what a publisher is told, and that the instance recovers by
    itself, without a restart."""

    def start_redis(self, **options) -> RedisServer:
        redis = RedisServer(**options).start()
        self.addCleanup(redis.cleanup)
        return redis

    def config(self, redis: RedisServer, name: str = "sseserver.toml", **values) -> str:
        return write_config(redis.dir, name, **{"redis_url": redis.url(), "retry_ms": 200, **values})

    def test_flushall_resets_open_streams_and_later_events_arrive_with_ids_never_used_before(self):
        redis = self.start_redis()
        config = self.config(redis)
        first, second = daemon_process("--port", "0", "-c", config), daemon_process("--port", "0", "-c", config)
        with first as (_, port_a), second as (__, port_b):
            with SSEClient(port_a) as on_a, SSEClient(port_b) as on_b:
                wait_for_subscribers(port_a, 1)
                wait_for_subscribers(port_b, 1)
                before = [published_id(port_a, f"before {i}") for i in range(3)]
                for client in (on_a, on_b):
                    self.assertEqual([e.data for e in client.read_events(3)], ["before 0", "before 1", "before 2"])
                redis.command("FLUSHALL")
                after = published_id(port_b, "after the flush")
                later = [published_id(port_a if index % 2 else port_b, f"later {index}") for index in range(4)]
                ids = before + [after] + later
                self.assertEqual(ids, sorted(set(ids)))  # above everything handed out before: never reused
                for client in (on_a, on_b):
                    reset, *events = client.read_events(6)
                    self.assertEqual(reset.type, "sseserver.reset")
                    self.assertEqual(
                        [(e.type, e.data, int(e.id)) for e in events],
                        [("message", "after the flush", after)]
                        + [("message", f"later {i}", later[i]) for i in range(4)],
                    )
            # Replay across the flush carries the reset too: a browser that had seen "before 1" is told.
            with SSEClient(port_a, headers={"Last-Event-ID": str(before[1])}) as resumed:
                events = resumed.read_events(7)
                self.assertEqual([e.type for e in events], ["message", "sseserver.reset"] + ["message"] * 5)
                self.assertEqual(
                    [e.data for e in events[:1] + events[2:]],
                    ["before 2", "after the flush"] + [f"later {i}" for i in range(4)],
                )
            # An instance started after the flush sees a stream that begins at "after the flush". A `0` (which a
            # client may hold from the stream's first life) is reset, not taken as that entry's predecessor;
            # the reset's own cursor then resumes exactly.
            with daemon_process("--port", "0", "-c", config) as (_, port_c):
                with SSEClient(port_c, headers={"Last-Event-ID": "0"}) as from_zero:
                    reset, *events = from_zero.read_events(6)
                    self.assertEqual(reset.type, "sseserver.reset")
                    self.assertEqual([int(e.id) for e in events], [after] + later)
                with SSEClient(port_c, headers={"Last-Event-ID": reset.id}) as resumed:
                    self.assertEqual([int(e.id) for e in resumed.read_events(5)], [after] + later)

    def test_an_event_acknowledged_just_before_sigterm_reaches_this_instances_streams_before_they_end(self):
        """An instance hears its own publishes back from the stream. An earlier version ended its streams at
        SIGTERM without waiting for that, so an event answered 200 a moment before never reached them. Here the
        follower's connection is held (a test-controlled proxy) while the publish gets through on a new one."""
        redis = self.start_redis()
        proxy = TcpProxy(redis.socket).start()
        self.addCleanup(proxy.stop)
        config = write_config(
            redis.dir,
            "sseserver.toml",
            redis_url=f"redis://127.0.0.1:{proxy.port}",
            retry_ms=200,
            shutdown_timeout=30.0,
        )
        with daemon_process("--port", "0", "-c", config) as (process, port):
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                wait_until(lambda: redis_is_up(port), what="the follower to be up")
                proxy.freeze_open()  # the follower's connection: its next read is held
                event_id = published_id(port, "last words")
                process.send_signal(signal.SIGTERM)
                wait_until(
                    lambda: any("come back from Redis" in line for line in process.log_lines),
                    what="the drain to wait for the follower",
                )
                proxy.thaw()
                (event,) = client.read_events(1)
                self.assertEqual((event.data, int(event.id)), ("last words", event_id))
            assert_exit(process, 0)

    def test_an_id_handed_out_twice_after_a_loss_is_a_reset_on_both_instances(self):
        """An entry from an instance whose clock is an hour ahead raises every floor (highest id seen + 1) above
        the clock. B publishes id F+1 while A's follower is stalled, Redis loses it (FLUSHALL), and A is handed
        F+1 again. No id shows the loss (B's follower even skips A's entry: it has read F+1), so the follower
        compares the chain keys (`q` of an entry, `k` of the one it read before): every stream is told."""
        redis = self.start_redis()
        proxy = TcpProxy(redis.socket).start()
        self.addCleanup(proxy.stop)
        config_a = write_config(redis.dir, "a.toml", redis_url=f"redis://127.0.0.1:{proxy.port}", retry_ms=200)
        with (
            daemon_process("--port", "0", "-c", config_a) as (_, port_a),
            daemon_process("--port", "0", "-c", self.config(redis, "b.toml")) as (__, port_b),
        ):
            future = time.time_ns() // 1000 + 3600 * 10**6
            redis.command(
                "XADD",
                STREAM_KEY,
                f"{future}-0",
                "p",
                str(future - 1),
                "k",
                "fast-clock",
                "q",
                "",
                "n",
                "message",
                "d",
                "from a fast clock",
            )
            for port in (port_a, port_b):
                wait_until(lambda: health(port)["last_event_id"] == str(future), what="the fast entry")
            with SSEClient(port_a) as on_a, SSEClient(port_b) as on_b:
                wait_for_subscribers(port_a, 1)
                wait_for_subscribers(port_b, 1)
                proxy.freeze_open()  # A's follower stalls (A has no pooled publish connection yet)
                self.assertEqual(published_id(port_b, "B's event"), future + 1)
                self.assertEqual(on_b.read_events(1)[0].data, "B's event")
                redis.command("FLUSHALL")
                self.assertEqual(published_id(port_a, "A's event"), future + 1)  # handed out again
                proxy.thaw()
                published_id(port_b, "after")
                for name, client in (("A", on_a), ("B", on_b)):
                    seen = []
                    while not seen or seen[-1].data != "after":
                        seen += client.read_events(1)
                        self.assertLess(len(seen), 5, seen)
                    self.assertIn("sseserver.reset", [e.type for e in seen], f"{name} crossed the loss in silence")

    def test_sigterm_with_a_black_holed_redis_still_exits_within_the_shutdown_timeout(self):
        """The follower blocks in an XREAD whose socket timeout is 6 s; an earlier version's stop waited it out,
        so the process exited seconds after shutdown_timeout. The bound is generous (the old code takes > 6 s)."""
        redis = self.start_redis()
        proxy = TcpProxy(redis.socket).start()
        self.addCleanup(proxy.stop)
        config = write_config(
            redis.dir, "sseserver.toml", redis_url=f"redis://127.0.0.1:{proxy.port}", shutdown_timeout=1.0
        )
        with daemon_process("--port", "0", "-c", config) as (process, port):
            wait_until(lambda: redis_is_up(port), what="the follower to be up")
            proxy.cut("blackhole")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert_exit(process, 0)
            self.assertLess(time.monotonic() - started, 4.5, process.log_lines[-5:])

    def test_a_redis_that_stalls_past_the_timeout_gets_504_may_have_been_published_never_503(self):
        """A 503 means "not published". A command Redis received but did not answer in time may still run: that
        is a 504, and the event may then arrive (exactly once)."""
        redis = RedisServer().start("--enable-debug-command", "yes")
        self.addCleanup(redis.cleanup)
        with daemon_process("--port", "0", "-c", self.config(redis)) as (process, port):
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                published_id(port, "warm")  # a pooled connection exists, so the next publish is sent at once
                self.assertEqual(client.read_events(1)[0].data, "warm")
                stall = threading.Thread(target=redis.command, args=("DEBUG", "SLEEP", "7"))
                stall.start()
                wait_until(lambda: redis_stalls(redis), what="redis-server to stall")
                status, reply = publish(port, "during the stall")
                stall.join(IO_TIMEOUT + 10)
                self.assertEqual(status, 504, reply)
                self.assertIn("may have been published", reply["error"])
                # Redis ran it once the stall ended: the event arrives once, and nothing said it was not published.
                self.assertEqual(client.read_events(1, timeout=IO_TIMEOUT + 10)[0].data, "during the stall")
                after = published_id(port, "after")
                self.assertEqual([(e.data, int(e.id)) for e in client.read_events(1)], [("after", after)])
                stop_daemon(process)

    def test_a_restart_from_an_older_snapshot_is_a_reset_even_for_an_instance_that_never_saw_the_lost_events(self):
        """Redis without an append-only file restarts from a snapshot taken before the newest events. An instance
        that starts afterwards never saw those events, and the stream's predecessor chain shows no hole: only the
        change of the entries' writer (`r`) tells it, and a client resuming there must get a reset."""
        redis = self.start_redis(persistent=False)
        config = self.config(redis)
        with daemon_process("--port", "0", "-c", config) as (first, port_a):
            kept = [published_id(port_a, f"kept {i}") for i in range(3)]
            redis.command("SAVE")
            lost = [published_id(port_a, f"lost {i}") for i in range(3)]
            redis.restart()  # loads the snapshot: the "lost" entries are gone
            self.assertEqual(len(redis.command("XRANGE", STREAM_KEY, "-", "+")), 3)
            wait_until(lambda: redis_is_up(port_a), RECOVERY_TIMEOUT, "the follower on the restarted redis")
            after = published_id(port_a, "after the restart")
            self.assertGreater(after, lost[-1])
            with daemon_process("--port", "0", "-c", config) as (second, port_b):
                wait_until(lambda: redis_is_up(port_b), RECOVERY_TIMEOUT, "the late instance following")
                with SSEClient(port_b, headers={"Last-Event-ID": str(kept[1])}) as resumed:
                    events = resumed.read_events(3)
                    self.assertEqual(
                        [(e.type, e.data) for e in events[:1] + events[2:]],
                        [("message", "kept 2"), ("message", "after the restart")],
                    )
                    self.assertEqual(events[1].type, "sseserver.reset")
                stop_daemon(second)
            stop_daemon(first)

    def test_a_restart_without_persistence_resets_open_streams_and_later_events_arrive(self):
        redis = self.start_redis(persistent=False)
        with daemon_process("--port", "0", "-c", self.config(redis)) as (_, port):
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                before = [published_id(port, f"before {i}") for i in range(3)]
                self.assertEqual(len(client.read_events(3)), 3)
                redis.restart()
                self.assertEqual(redis.command("EXISTS", STREAM_KEY), 0)  # the stream is gone
                wait_until(lambda: redis_is_up(port), RECOVERY_TIMEOUT, "the follower on the new redis-server")
                after = published_id(port, "after the restart")
                self.assertGreater(after, before[-1])
                reset, event = client.read_events(2, RECOVERY_TIMEOUT)
                self.assertEqual(reset.type, "sseserver.reset")
                self.assertEqual((event.type, event.data, int(event.id)), ("message", "after the restart", after))
                self.assertGreater(published_id(port, "next"), after)
                self.assertEqual(client.read_events(1)[0].data, "next")

    def test_the_first_publish_after_a_redis_restart_is_stored_although_pooled_connections_went_stale(self):
        redis = self.start_redis()
        with daemon_process("--port", "0", "-c", self.config(redis)) as (_, port):
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                before = [published_id(port, f"before {i}") for i in range(3)]  # leaves a pooled connection
                self.assertEqual(len(client.read_events(3)), 3)
                redis.restart()  # the append-only file keeps the stream; every pooled connection is now dead
                wait_until(lambda: redis_is_up(port), RECOVERY_TIMEOUT, "the follower on the new redis-server")
                status, reply = publish(port, "first after the restart")
                self.assertEqual(status, 200, reply)
                self.assertGreater(int(reply["id"]), before[-1])
                (event,) = client.read_events(1)  # the stream survived: no reset
                self.assertEqual(
                    (event.type, event.data, event.id), ("message", "first after the restart", reply["id"])
                )

    def test_a_wrong_password_shows_in_health_and_the_follower_recovers_once_redis_accepts_it(self):
        redis = self.start_redis(password="right-password")
        config = self.config(redis, redis_url=redis.url(password="wrong-password"))
        with daemon_process("--port", "0", "-c", config) as (process, port):
            down = wait_until(lambda: (reply := health(port)).get("redis_error") and reply, what="/health's reason")
            self.assertEqual(down["redis"], "down")
            self.assertIn("WRONGPASS", down["redis_error"])
            self.assertEqual(publish(port, "refused")[0], 503)
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                redis.command("CONFIG", "SET", "requirepass", "wrong-password")  # the operator mends Redis's side
                redis.password = "wrong-password"
                wait_until(lambda: redis_is_up(port), RECOVERY_TIMEOUT, "the follower to log in")
                self.assertNotIn("redis_error", health(port))
                event_id = published_id(port, "after the fix")
                (event,) = client.read_events(1)
                self.assertEqual((event.data, int(event.id)), ("after the fix", event_id))
            # One line per distinct failure (and per REPEAT_LOG_INTERVAL), not one per attempt.
            self.assertEqual(len(log_lines_with(process, "redis link down: WRONGPASS")), 1, process.log_lines)

    def test_the_watchdog_needs_a_live_follower_but_not_a_reachable_redis(self):
        redis = self.start_redis(password="right-password")
        # The refusal is logged (captured here, not printed) from the follower's first attempt on.
        with (
            self.assertLogs("sseserver.cluster", "ERROR") as logged,
            RunningServer(redis_url=redis.url(password="wrong-password")) as running,
        ):
            wait_until(lambda: logged.output, what="the refusal to be logged")
            self.assertIn("WRONGPASS", logged.output[0])
            self.assertIn("WRONGPASS", running.health()["redis_error"])
            # Refused and retrying is alive: a watchdog restart could not mend Redis and would cut every stream.
            self.assertTrue(running.server.healthy())
            running.server.cluster.stop()  # the follower thread ends, as one that died would
            self.assertFalse(running.server.healthy())

    def test_a_stream_key_of_the_wrong_type_is_retried_with_backoff_logged_once_and_recovered_from(self):
        redis = self.start_redis()
        with daemon_process("--port", "0", "-c", self.config(redis)) as (process, port):
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                published_id(port, "before")
                self.assertEqual(client.read_events(1)[0].data, "before")
                failures = metric(port, "sseserver_redis_reconnects_total")
                started = time.monotonic()
                redis.command("DEL", STREAM_KEY)
                redis.command("SET", STREAM_KEY, "not a stream")
                wait_until(
                    lambda: metric(port, "sseserver_redis_reconnects_total") >= failures + 5,
                    RECOVERY_TIMEOUT,
                    "five failed attempts",
                )
                # Between five attempts the backoff waits 0.1 + 0.2 + 0.4 + 0.8 s (a hot loop made thousands).
                self.assertGreaterEqual(time.monotonic() - started, 1.5)
                down = health(port)
                self.assertEqual(down["redis"], "down")
                self.assertIn("WRONGTYPE", down["redis_error"])
                self.assertEqual(len(log_lines_with(process, "WRONGTYPE")), 1, process.log_lines)
                redis.command("DEL", STREAM_KEY)
                wait_until(lambda: redis_is_up(port), RECOVERY_TIMEOUT, "the follower to read again")
                after = published_id(port, "after the fix")
                reset, event = client.read_events(2)  # the stream began again from nothing: a reset first
                self.assertEqual((reset.type, event.data, int(event.id)), ("sseserver.reset", "after the fix", after))

    def test_a_redis_still_loading_its_data_is_waited_for_by_probe_and_follower(self):
        redis = self.start_redis(persistent=False)
        with daemon_process("--port", "0", "-c", self.config(redis)) as (process, port):
            with SSEClient(port) as client:
                wait_for_subscribers(port, 1)
                published_id(port, "before")
                self.assertEqual(client.read_events(1)[0].data, "before")
                # A snapshot with enough keys, each loaded with a delay, that the restarted redis-server answers
                # -LOADING for about 1.5 s, to the test's readiness probe and to the follower alike.
                redis.command("MSET", *[part for i in range(300) for part in (f"filler:{i}", "x" * 100)])
                redis.command("SAVE")
                redis.restart("--key-load-delay", "5000", "--loading-process-events-interval-bytes", "1024")
                self.assertTrue(redis.saw_loading)
                wait_until(lambda: redis_is_up(port), RECOVERY_TIMEOUT, "the follower after loading")
                after = published_id(port, "after loading")
                # The snapshot kept the stream, but no instance can know that a restart without an append-only
                # file lost nothing: one reset (the writer changed), then the event.
                reset, event = client.read_events(2)
                self.assertEqual(reset.type, "sseserver.reset")
                self.assertEqual((event.type, event.data, int(event.id)), ("message", "after loading", after))
            self.assertLessEqual(len(log_lines_with(process, "LOADING")), 1, process.log_lines)

    def test_entries_trimmed_while_an_instance_was_cut_off_reach_its_streams_as_a_reset(self):
        redis = self.start_redis()
        redis.command("ACL", "SETUSER", "instance-a", "on", ">secret-a", "~*", "&*", "+@all")
        config_a = self.config(redis, "a.toml", redis_url=redis.url("instance-a", "secret-a"))
        config_b = self.config(redis, "b.toml")
        first, second = daemon_process("--port", "0", "-c", config_a), daemon_process("--port", "0", "-c", config_b)
        with first as (_, port_a), second as (__, port_b):
            with SSEClient(port_a) as on_a, SSEClient(port_b) as on_b:
                wait_for_subscribers(port_a, 1)
                wait_for_subscribers(port_b, 1)
                for index in range(3):
                    published_id(port_b, f"before {index}")
                for client in (on_a, on_b):
                    self.assertEqual(len(client.read_events(3)), 3)
                # Cut A off: it cannot log in again, and loses the connections it has.
                redis.command("ACL", "SETUSER", "instance-a", "off")
                redis.command("CLIENT", "KILL", "USER", "instance-a")
                wait_until(lambda: "WRONGPASS" in health(port_a).get("redis_error", ""), what="A cut off")
                for index in range(6):
                    published_id(port_b, f"missed {index}")
                self.assertEqual([e.data for e in on_b.read_events(6)], [f"missed {i}" for i in range(6)])
                redis.command("XTRIM", STREAM_KEY, "MAXLEN", 2)  # what followed A's position is partly gone
                redis.command("ACL", "SETUSER", "instance-a", "on")
                events = on_a.read_events(3, RECOVERY_TIMEOUT)
                self.assertEqual(
                    [(e.type, e.data) for e in events[1:]], [("message", "missed 4"), ("message", "missed 5")]
                )
                self.assertEqual(events[0].type, "sseserver.reset")
                # From here on both instances agree again, without a further reset.
                together = published_id(port_a, "together again")
                for client in (on_a, on_b):
                    (event,) = client.read_events(1)
                    self.assertEqual((event.type, event.data, int(event.id)), ("message", "together again", together))


class OwnPublishLostTest(unittest.TestCase):
    def test_an_own_acknowledged_event_lost_before_it_was_read_back_is_a_reset(self):
        """A failover to a replica that never got the newest entry: nothing in the stream shows the loss (the
        next entry's predecessor is one this instance read), but the instance knows it acknowledged that id.
        The follower's reads are done by the test here (XREAD, then the bridge's own handling of the reply), so
        that the loss can happen exactly between the publish and the read-back."""
        redis = RedisServer(persistent=False).start()
        self.addCleanup(redis.cleanup)
        bouncer = Bouncer(history_size=100, queue_size=10, first_id=1)
        bridge = RedisBridge(redis.url(), "lost", 100, bouncer)

        def read_back():
            reply = redis.command("XREAD", "COUNT", 1000, "STREAMS", bridge.stream_key, bridge.last_seen)
            bridge._ingest(reply[0][1] if reply else [])

        first = bridge.publish("w", "message")
        read_back()
        stream = bouncer.subscribe(None, None).subscriber
        lost = bridge.publish("x", "message")
        redis.command("XDEL", bridge.stream_key, f"{lost}-0")  # gone before this instance read it back
        after = bridge.publish("y", "message")
        self.assertEqual(redis.command("XRANGE", bridge.stream_key, f"{after}-0", "+")[0][1][1], str(first).encode())
        read_back()
        data, _, _, _ = bouncer.collect(bouncer.ring, stream.cursor, bouncer.head, None)
        self.assertEqual([(e.type, e.data) for e in FeedReader().feed(data)][1:], [("message", "y")])
        self.assertEqual(FeedReader().feed(data)[0].type, "sseserver.reset")
        # Replay across the spot tells a reconnecting client too.
        self.assertIn(
            b"sseserver.reset",
            bouncer.collect(bouncer.ring, bouncer.subscribe(None, str(first)).subscriber.cursor, bouncer.head, None)[0],
        )


class RespConnectionTest(unittest.TestCase):
    """How the client classifies a broken connection, over real TCP, where send() does not notice a closed peer
    (the tests' redis-server listens on a unix socket, where it does). The test plays Redis on 127.0.0.1:0."""

    def connect(self) -> tuple[resp.Connection, socket.socket]:
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(IO_TIMEOUT)
        client = resp.Connection(resp.parse_url(f"redis://127.0.0.1:{listener.getsockname()[1]}/0"), IO_TIMEOUT)
        self.addCleanup(client.close)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        peer.settimeout(IO_TIMEOUT)
        peer.sendall(b"+PONG\r\n")  # answered before it is asked: the client reads it after sending
        self.assertEqual(client.command("PING"), "PONG")
        self.assertEqual(peer.recv(100), b"*1\r\n$4\r\nPING\r\n")
        self.assertTrue(client.reusable())
        return client, peer

    def test_a_connection_redis_closed_is_not_reusable_although_a_send_would_succeed(self):
        client, peer = self.connect()
        peer.close()  # Redis restarts: a FIN, which the idle client only sees by looking
        wait_until(lambda: not client.reusable(), what="the closed connection to be seen")
        with self.assertRaises(resp.RedisUnavailable) as caught:
            client.command("PING")  # sent into the void: only the reply read fails, so it may have run
        self.assertFalse(caught.exception.unsent)

    def test_a_command_that_could_not_be_sent_is_unsent(self):
        client, peer = self.connect()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset
        wait_until(lambda: not client.reusable(), what="the reset to arrive")
        with self.assertRaises(resp.RedisUnavailable) as caught:
            client.command("PING")
        self.assertTrue(caught.exception.unsent)

    def test_a_reply_lost_after_the_command_was_sent_may_have_run(self):
        client, peer = self.connect()
        peer.shutdown(socket.SHUT_WR)  # takes the command, never answers
        with self.assertRaises(resp.RedisUnavailable) as caught:
            client.command("INCR", "counter")
        self.assertFalse(caught.exception.unsent)
        self.assertEqual(peer.recv(100), b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n")


class RedisUrlTest(unittest.TestCase):
    def test_redis_urls_parse_into_their_parts_and_bad_ones_are_config_errors(self):
        address = resp.parse_url("redis://:s3cret@10.0.0.5:6380/2")
        self.assertEqual((address.host, address.port, address.password, address.db), ("10.0.0.5", 6380, "s3cret", 2))
        self.assertNotIn("s3cret", repr(address))
        address = resp.parse_url("rediss://user:pw@cache.example.com")
        self.assertEqual((address.scheme, address.port, address.username, address.db), ("rediss", 6379, "user", 0))
        address = resp.parse_url("unix:///run/redis/redis.sock?db=3")
        self.assertEqual((address.path, address.db), ("/run/redis/redis.sock", 3))
        for bad in ("http://x", "redis://", "redis://h:port/0", "redis://h/zero", "unix://"):
            with self.subTest(bad=bad), self.assertRaises(ConfigError):
                resp.parse_url(bad)

    def test_bad_url_and_conflicting_keys_are_exit_2(self):
        with tempfile.TemporaryDirectory() as tmp:
            bad = write_config(tmp, "a.toml", redis_url="redis://h:port/0")
            result = run_cli("--check-config", "-c", bad)
            self.assertEqual(result.returncode, 2)
            self.assertIn("redis_url", result.stderr.decode())
            both = write_config(tmp, "b.toml", redis_url="redis://127.0.0.1/0", history_file="/tmp/h.log")
            result = run_cli("--check-config", "-c", both)
            self.assertEqual(result.returncode, 2)
            self.assertIn("cannot be used with redis_url", result.stderr.decode())

    def test_redis_down_at_start_still_serves(self):
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(tmp, "c.toml", redis_url=f"unix://{tmp}/nothing-here.sock")
            with daemon_process("--port", "0", "-c", config) as (process, port):
                self.assertEqual(health(port)["redis"], "down")
                self.assertEqual(publish(port, "x")[0], 503)
                with SSEClient(port) as client:
                    self.assertEqual(client.status, 200)
                stop_daemon(process)


if __name__ == "__main__":
    unittest.main()

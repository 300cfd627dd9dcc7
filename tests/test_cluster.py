"""Scale-out through a real redis-server (on a unix socket in the test's directory): two daemons, one stream."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import unittest

from sseserver import resp
from sseserver.config import ConfigError
from tests.support import (IO_TIMEOUT, STOP_TIMEOUT, SSEClient, daemon_process, request, require_binary,
                           run_cli, wait_until, write_config)


class RedisServer:
    """A throwaway redis-server with an append-only file, so a restart keeps the stream."""

    def __init__(self):
        self.binary = require_binary("redis-server")
        self.dir = tempfile.mkdtemp(prefix="ssr-")
        self.socket = os.path.join(self.dir, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._pings, what="redis-server to answer")
        return self

    def _pings(self):
        try:
            connection = resp.Connection(resp.parse_url(self.url), 1.0)
        except resp.RedisUnavailable:
            return False
        try:
            return connection.command("PING") == "PONG"
        finally:
            connection.close()

    def command(self, *args):
        connection = resp.Connection(resp.parse_url(self.url), IO_TIMEOUT)
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


def health(port):
    return json.loads(request(port, "GET", "/health")[2])


def publish(port, data, event=None):
    status, _, body = request(port, "POST", "/publish" + (f"?event={event}" if event else ""), data)
    return status, json.loads(body)


class ClusterTest(unittest.TestCase):
    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.config = write_config(self.redis.dir, "sseserver.toml", redis_url=self.redis.url, retry_ms=200)

    def two_daemons(self):
        return daemon_process("--port", "0", "-c", self.config), daemon_process("--port", "0", "-c", self.config)

    def test_publish_to_either_instance_reaches_subscribers_of_both_once_in_order(self):
        first, second = self.two_daemons()
        with first as (a, port_a), second as (b, port_b):
            with SSEClient(port_a) as on_a, SSEClient(port_b) as on_b:
                wait_until(lambda: health(port_a)["subscribers"] == 1 and health(port_b)["subscribers"] == 1)
                ids = []
                for index in range(20):
                    status, reply = publish(port_a if index % 2 else port_b, f"event {index}")
                    self.assertEqual(status, 200)
                    ids.append(reply["id"])
                self.assertEqual(ids, [str(i) for i in range(1, 21)])  # one sequence across instances
                for client in (on_a, on_b):
                    events = client.read_events(20)
                    self.assertEqual([(e.id, e.data) for e in events],
                                     [(str(i + 1), f"event {i}") for i in range(20)])
            self.assertEqual(health(port_a)["redis"], "up")
            for process in (a, b):
                process.send_signal(signal.SIGTERM)
                self.assertEqual(process.wait(STOP_TIMEOUT), 0)

    def test_a_browser_moving_to_the_other_instance_resumes_without_gap_or_duplicate(self):
        first, second = self.two_daemons()
        with first as (a, port_a), second as (b, port_b):
            with SSEClient(port_a) as on_a:
                wait_until(lambda: health(port_a)["subscribers"] == 1)
                for index in range(5):
                    publish(port_a, f"e{index}")
                seen = on_a.read_events(5)
            last_id = seen[-1].id
            for index in range(5, 8):
                publish(port_a, f"e{index}")
            with SSEClient(port_b, headers={"Last-Event-ID": last_id}) as on_b:
                events = on_b.read_events(3)
                self.assertEqual([e.data for e in events], ["e5", "e6", "e7"])
                self.assertEqual([int(e.id) for e in events], [int(last_id) + 1, int(last_id) + 2, int(last_id) + 3])
            # A Last-Event-ID that B's follower may not have reached yet is waited for, not reset.
            _, reply = publish(port_a, "fresh")
            with SSEClient(port_b, headers={"Last-Event-ID": reply["id"]}) as ahead:
                publish(port_b, "next")
                (event,) = ahead.read_events(1)
                self.assertEqual(event.data, "next")
            # A new instance starts with the stream's history.
            with daemon_process("--port", "0", "-c", self.config) as (c, port_c):
                with SSEClient(port_c, headers={"Last-Event-ID": "0"}) as on_c:
                    self.assertEqual([e.data for e in on_c.read_events(10)][:3], ["e0", "e1", "e2"])
                c.send_signal(signal.SIGTERM)
                c.wait(STOP_TIMEOUT)

    def test_redis_down_then_back_streams_stay_open_and_nothing_stored_is_missed(self):
        first, second = self.two_daemons()
        with first as (a, port_a), second as (b, port_b):
            with SSEClient(port_a) as client:
                wait_until(lambda: health(port_a)["subscribers"] == 1)
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
                wait_until(lambda: health(port_a)["subscribers"] == 2 and health(port_b)["subscribers"] == 2)
                ids = [json.loads(request(nginx.connect, "POST", "/publish", f"via nginx {i}")[2])["id"]
                       for i in range(6)]
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
                [sys.executable, "-m", "sseserver.bench", "--url", f"http://127.0.0.1:{port_a}",
                 "--url", f"http://127.0.0.1:{port_b}", "--subs", "20", "--msgs", "40", "--rate", "0",
                 "--procs", "2", "--pub-conns", "2", "--drain", "30", "--connect-timeout", "30"],
                cwd=ROOT, capture_output=True, timeout=120)
            self.assertEqual(result.returncode, 0, result.stderr)
            report = json.loads(result.stdout)
            self.assertEqual(report["url"], [f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"])
            self.assertEqual((report["expected"], report["delivered"], report["lost"], report["duplicates"]),
                             (20 * 40, 20 * 40, 0, 0))


class RedisUrlTest(unittest.TestCase):
    def test_urls(self):
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
                process.send_signal(signal.SIGTERM)
                self.assertEqual(process.wait(STOP_TIMEOUT), 0)


if __name__ == "__main__":
    unittest.main()

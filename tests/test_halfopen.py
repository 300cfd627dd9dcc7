"""A half-open peer, for real: a subscriber in its own network namespace behind a veth pair whose link is then
taken down (the cable pulled: no FIN, no RST ever reaches the daemon). The daemon must forget the stream within
about two heartbeat intervals, through TCP_USER_TIMEOUT on its heartbeats and TCP keepalive.

Needs root and iproute2 (`ip netns`). The addresses live only inside the namespace and link this test makes.
"""

import os
import subprocess
import sys
import tempfile
import time
import unittest

from tests.support import (
    REQUIRE_ALL,
    STOP_TIMEOUT,
    daemon_process,
    request,
    require_binary,
    stop_daemon,
    wait_for_subscribers,
    write_config,
)

HOST_ADDRESS, PEER_ADDRESS = "10.213.7.1", "10.213.7.2"
HEARTBEAT = 1.0

CLIENT = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(b"GET /subscribe HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n")
seen = b""
while b"retry:" not in seen:
    seen += sock.recv(4096)
print("subscribed", flush=True)
sock.settimeout(None)
while sock.recv(4096):  # a healthy subscriber keeps reading until its cable is pulled
    pass
"""


class HalfOpenPeerTest(unittest.TestCase):
    def setUp(self):
        self.ip = require_binary("ip")
        if os.geteuid() != 0:
            if REQUIRE_ALL:
                raise AssertionError("the half-open test needs root for network namespaces")
            raise unittest.SkipTest("needs root for network namespaces")
        tag = f"{os.getpid() % 100000}"
        self.namespace, self.host_link, self.peer_link = f"sse-{tag}", f"sseh{tag}", f"ssep{tag}"
        self.addCleanup(self._teardown)
        for command in (
            ["netns", "add", self.namespace],
            ["link", "add", self.host_link, "type", "veth", "peer", "name", self.peer_link],
            ["link", "set", self.peer_link, "netns", self.namespace],
            ["addr", "add", f"{HOST_ADDRESS}/30", "dev", self.host_link],
            ["link", "set", self.host_link, "up"],
            ["-n", self.namespace, "addr", "add", f"{PEER_ADDRESS}/30", "dev", self.peer_link],
            ["-n", self.namespace, "link", "set", self.peer_link, "up"],
            ["-n", self.namespace, "link", "set", "lo", "up"],
        ):
            subprocess.run([self.ip, *command], check=True, capture_output=True, timeout=30)

    def _teardown(self):
        subprocess.run([self.ip, "link", "del", self.host_link], capture_output=True, timeout=30)
        subprocess.run([self.ip, "netns", "del", self.namespace], capture_output=True, timeout=30)

    def test_a_pulled_cable_is_noticed_within_about_two_heartbeats(self):
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(tmp, heartbeat_interval=HEARTBEAT)
            with daemon_process("--host", "0.0.0.0", "--port", "0", "-c", config) as (process, port):
                client = subprocess.Popen(
                    [self.ip, "netns", "exec", self.namespace, sys.executable, "-c", CLIENT, HOST_ADDRESS, str(port)],
                    stdout=subprocess.PIPE,
                )
                try:
                    self.assertEqual(client.stdout.readline(), b"subscribed\n")
                    wait_for_subscribers(port, 1)
                    subprocess.run([self.ip, "link", "set", self.host_link, "down"], check=True, timeout=30)
                    pulled = time.monotonic()
                    wait_for_subscribers(port, 0, timeout=30)  # the half-open stream forgotten
                    elapsed = time.monotonic() - pulled
                    # ~2 intervals by design (a heartbeat, then TCP_USER_TIMEOUT of one interval + 1 s); TCP on
                    # its own would keep retransmitting for about 15 minutes.
                    self.assertLess(elapsed, 4 * HEARTBEAT + 2, f"took {elapsed:.1f}s")
                    self.assertIsNone(client.poll(), "the peer must still believe it is connected")
                    metrics = request(port, "GET", "/metrics")[2].decode()
                    self.assertIn('sseserver_subscribers_dropped_total{reason="disconnected"} 1', metrics)
                finally:
                    client.kill()
                    client.wait(STOP_TIMEOUT)
                    client.stdout.close()
                stop_daemon(process)


if __name__ == "__main__":
    unittest.main()

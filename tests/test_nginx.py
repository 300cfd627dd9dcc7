"""A real nginx running README.md's `server` block in front of a real daemon.

Only three things in the block are substituted, each checked to occur exactly once: the listen address (a unix
socket in the test's directory, so no TCP port is picked and released), the upstream's port (the daemon's), and
the certificate paths (a throwaway self-signed pair). The daemon listens on a socket the test owns and passes
down through LISTEN_FDS, so a restart keeps the port nginx points at, as sseserver.socket does in production.

A test that needs nginx on TCP (a client that takes a URL, such as `sseserver doctor`) gives Nginx a listening
socket it owns: nginx inherits it through its `NGINX` environment variable (the mechanism of its binary
upgrade), so again no port is picked and released. `edits` then change the block the way an operator might.
"""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest

from tests.support import (
    IO_TIMEOUT,
    ROOT,
    STOP_TIMEOUT,
    SSEClient,
    assert_exit,
    daemon_process,
    listening_socket,
    request,
    require_binary,
    wait_for_subscribers,
    wait_until,
    write_config,
)

# Issue requirement: an event must cross nginx within this long of its publish, i.e. unbuffered.
UNBUFFERED_MS = 200


def readme_nginx_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    blocks = [block for block in re.findall(r"```nginx\n(.*?)```", readme, re.S) if "listen 443" in block]
    assert len(blocks) == 1, "README.md must hold exactly one ```nginx block with the full server setup"
    return blocks[0]


def substitute(block: str, old: str, new: str) -> str:
    assert block.count(old) == 1, f"README's nginx block no longer contains {old!r} exactly once"
    return block.replace(old, new)


class Nginx:
    """nginx running README's block. `listen_socket`: a listening TCP socket (on 127.0.0.1) that nginx inherits
    instead of the unix socket; `http2=False` drops http2 from the listen line; `edits`: (old, new) pairs
    substituted in the block, each checked to occur exactly once."""

    def __init__(
        self,
        upstream_port: int | list[int],
        listen_socket: socket.socket | None = None,
        http2: bool = True,
        edits: tuple[tuple[str, str], ...] = (),
    ):
        self.nginx = require_binary("nginx")
        openssl = require_binary("openssl")
        self.dir = tempfile.mkdtemp(prefix="sseserver-nginx-")
        os.chmod(self.dir, 0o755)
        self.socket_path = os.path.join(self.dir, "nginx.sock")
        self.listen_socket = listen_socket
        self.cert = cert = os.path.join(self.dir, "cert.pem")
        key = os.path.join(self.dir, "key.pem")
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                key,
                "-out",
                cert,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        block = readme_nginx_block()
        listen = (
            f"unix:{self.socket_path}" if listen_socket is None else "{}:{}".format(*listen_socket.getsockname()[:2])
        )
        block = substitute(block, "listen 443 ssl http2;", f"listen {listen} ssl{' http2' if http2 else ''};")
        for old, new in edits:
            block = substitute(block, old, new)
        ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
        block = substitute(block, "server 127.0.0.1:5000;", " ".join(f"server 127.0.0.1:{p};" for p in ports))
        block = substitute(block, "/etc/ssl/certs/events.example.com.pem", cert)
        block = substitute(block, "/etc/ssl/private/events.example.com.key", key)
        temp = os.path.join(self.dir, "temp")
        os.mkdir(temp)
        os.chmod(temp, 0o777)
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as handle:
            handle.write(f"""
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log {self.dir}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{block}
}}
""")
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    def __enter__(self):
        env, fds = None, ()
        if self.listen_socket is not None:
            fds = (self.listen_socket.fileno(),)
            env = dict(os.environ, NGINX=f"{fds[0]};")  # nginx's own way to inherit a listening socket
        self.process = subprocess.Popen(
            [self.nginx, "-c", self.conf, "-p", self.dir, "-e", os.path.join(self.dir, "error.log")],
            env=env,
            pass_fds=fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # The pid file is written once the configuration is loaded and the sockets are open; connections made
        # to an inherited socket before the worker accepts wait in its backlog.
        ready = self.socket_path if self.listen_socket is None else os.path.join(self.dir, "nginx.pid")
        wait_until(lambda: os.path.exists(ready) or self.process.poll() is not None, what="nginx to listen")
        if self.process.poll() is not None:
            raise AssertionError(f"nginx failed: {self.process.stderr.read().decode()}")
        return self

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self.process.stderr.close()
        subprocess.run(["rm", "-rf", self.dir], check=False)

    def connect(self) -> socket.socket:
        """A TLS connection to nginx (HTTP/1.1 over TLS)."""
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(IO_TIMEOUT)
        raw.connect(self.socket_path)
        return self.context.wrap_socket(raw, server_hostname="localhost")


class NginxTest(unittest.TestCase):
    def setUp(self):
        self.listener = listening_socket()
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]

    def daemon(self, *args):
        """The daemon on the test's listening socket, so every restart keeps nginx's upstream port."""
        return daemon_process(*args, listen_socket=self.listener)

    def test_events_publish_and_replay_through_nginx(self):
        with self.daemon() as (_, __), Nginx(self.port) as nginx:
            with SSEClient(nginx.connect) as client:
                self.assertEqual(client.status, 200)
                self.assertEqual(client.headers["content-type"], "text/event-stream; charset=utf-8")
                wait_for_subscribers(self.port, 1)
                ids = []
                for index in range(10):
                    sent = time.monotonic()
                    status, _, body = request(nginx.connect, "POST", "/publish", f"event {index}")
                    self.assertEqual(status, 200)
                    ids.append(json.loads(body)["id"])
                    (event,) = client.read_events(1)
                    elapsed_ms = (time.monotonic() - sent) * 1000
                    self.assertEqual(event.data, f"event {index}")
                    self.assertLess(elapsed_ms, UNBUFFERED_MS, "nginx buffered the stream")
            with SSEClient(nginx.connect, headers={"Last-Event-ID": ids[6]}) as replay:
                self.assertEqual([e.data for e in replay.read_events(3)], ["event 7", "event 8", "event 9"])
                # A batch of ~700 KB: more than a single publish may be, within the block's client_max_body_size.
                lines = [json.dumps({"data": f"batch {n} " + "x" * 680}) for n in range(1000)]
                status, _, body = request(nginx.connect, "POST", "/publish/batch", "\n".join(lines))
                self.assertEqual((status, json.loads(body)["count"]), (200, 1000), body)
                self.assertEqual(replay.read_events(1000)[-1].data, "batch 999 " + "x" * 680)

    def test_http2_towards_the_client(self):
        curl = require_binary("curl")
        with self.daemon() as (_, __), Nginx(self.port) as nginx:
            result = subprocess.run(
                [
                    curl,
                    "-sk",
                    "--http2",
                    "--unix-socket",
                    nginx.socket_path,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_version}",
                    "https://localhost/health",
                ],
                capture_output=True,
                text=True,
                timeout=IO_TIMEOUT,
            )
            self.assertEqual(result.stdout, "2", result.stderr)
            result = subprocess.run(
                [
                    curl,
                    "-sk",
                    "--http2",
                    "--unix-socket",
                    nginx.socket_path,
                    "-X",
                    "POST",
                    "https://localhost/publish",
                    "-d",
                    "over h2",
                ],
                capture_output=True,
                text=True,
                timeout=IO_TIMEOUT,
            )
            self.assertIn('"id"', result.stdout)

    def test_client_survives_a_daemon_restart_without_losing_an_event(self):
        history_dir = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ["rm", "-rf", history_dir], check=False)
        config = write_config(history_dir, history_file=os.path.join(history_dir, "history.log"))
        with Nginx(self.port) as nginx:
            received, acknowledged = [], []
            with self.daemon("-c", config) as (first, _):
                client = SSEClient(nginx.connect)
                wait_for_subscribers(self.port, 1)
                for index in range(3):
                    acknowledged.append(f"before {index}")
                    self.assertEqual(request(nginx.connect, "POST", "/publish", acknowledged[-1])[0], 200)
                first.send_signal(signal.SIGTERM)
                received += [e.data for e in client.read_until_closed()]  # a graceful end: nothing undelivered
                assert_exit(first, 0)
                last_id = client.last_id
                client.close()
            acknowledged.append("while down")  # published between the two daemons: it waits in the backlog
            late = threading.Thread(target=request, args=(nginx.connect, "POST", "/publish", "while down"))
            late.start()
            with self.daemon("-c", config) as (_, __):
                late.join(IO_TIMEOUT)
                # What a browser does next: reconnect with its Last-Event-ID. The history file kept the ids, so
                # it resumes exactly where it was: no reset, no gap, no duplicate.
                with SSEClient(nginx.connect, headers={"Last-Event-ID": last_id}) as again:
                    wait_for_subscribers(self.port, 1)
                    for index in range(3):
                        acknowledged.append(f"after {index}")
                        self.assertEqual(request(nginx.connect, "POST", "/publish", acknowledged[-1])[0], 200)
                    events = again.read_events(4)
                    self.assertNotIn("sseserver.reset", [e.type for e in events])
                    ids = [int(e.id) for e in events]  # a new lifetime's ids jump ahead (to the clock), never back
                    self.assertEqual(ids, sorted(set(ids)))
                    self.assertGreater(ids[0], int(last_id))
                    received += [e.data for e in events]
            self.assertEqual(received, acknowledged)


if __name__ == "__main__":
    unittest.main()

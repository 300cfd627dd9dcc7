"""A TCP relay the tests control: the "network" between a daemon and redis-server, which a test can cut.

Owns: a listening socket on 127.0.0.1 port 0 (the port stays the same for the proxy's whole life, so a daemon
configured with it never needs a new config), one relay per accepted connection to a target (a unix socket path
or a (host, port) pair), and three link states:
- `up`: bytes flow both ways;
- `reset`: every relayed connection is shut down at once (both sides see the link die) and new connections
  are accepted and closed immediately, as when a firewall rejects or a peer restarts;
- `blackhole`: nothing flows and nothing is closed, as in a partition: connections hang, commands time out.
  Bytes already read from one side are held and delivered when the link comes back up, so a command the client
  gave up on may still reach the server later (exactly the "reply lost, command executed" case).
Apart from the link state, freeze_open() holds the bytes of the connections open at that moment while new ones
flow (one stalled connection: a daemon's follower falls behind while its publishes get through), until thaw().
Must not know: Redis or HTTP; it moves bytes.

Threads: one accept thread, two per relayed connection (one per direction, blocking I/O with short timeouts so
a state change is seen promptly). Everything has a deadline; stop() joins every thread.
"""

import select
import socket
import threading

POLL = 0.05  # how often a blocked relay thread looks at the link state
STOP_TIMEOUT = 5.0


class TcpProxy:
    def __init__(self, target):
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(POLL)
        self.port = self._listener.getsockname()[1]
        self.state = "up"
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._frozen: set = set()  # pairs whose bytes are held until thaw()
        self._thawed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.accepted = 0
        self._accept_thread = threading.Thread(target=self._accept_loop, name="chaos-proxy-accept", daemon=True)

    # -- methods for the caller ----------------------------------------------------------------------------------

    def start(self) -> "TcpProxy":
        self._accept_thread.start()
        return self

    def cut(self, how: str = "reset") -> None:
        """Break the link: "reset" closes every connection, "blackhole" freezes them."""
        assert how in ("reset", "blackhole"), how
        self._flowing.clear()
        with self._lock:
            self.state = how
            pairs = list(self._pairs) if how == "reset" else []
        for pair in pairs:
            self._close_pair(pair)

    def restore(self) -> None:
        with self._lock:
            self.state = "up"
        self._flowing.set()

    def freeze_open(self) -> None:
        """Hold every byte of the connections open now (nothing is closed); new connections still flow."""
        with self._lock:
            self._frozen.update(self._pairs)
            self._thawed.clear()

    def thaw(self) -> None:
        """Let the frozen connections flow again, held bytes first."""
        with self._lock:
            self._frozen.clear()
        self._thawed.set()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def stop(self) -> None:
        self._stopping = True
        self._flowing.set()
        self._thawed.set()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair)
        self._accept_thread.join(STOP_TIMEOUT)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(STOP_TIMEOUT)

    # -- internals -----------------------------------------------------------------------------------------------

    def _connect_target(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.settimeout(STOP_TIMEOUT)
            upstream.connect(self.target)
        else:
            upstream = socket.create_connection(self.target, timeout=STOP_TIMEOUT)
        upstream.settimeout(None)
        return upstream

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with self._lock:
                state = self.state
            if state == "reset":
                client.close()  # refused the way a dead peer refuses: the connection ends at once
                continue
            if state == "blackhole":
                # Hold the connection, relay nothing, until the link is restored (or the proxy stops).
                while not self._flowing.wait(POLL):
                    if self._stopping:
                        client.close()
                        return
                with self._lock:
                    state = self.state
                if state != "up":
                    client.close()
                    continue
            try:
                upstream = self._connect_target()
            except OSError:
                client.close()  # the server is down: so is the link
                continue
            client.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.append(pair)
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(
                    target=self._relay, args=(pair, source, sink), name="chaos-proxy-relay", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            self._threads = [t for t in self._threads if t.is_alive()]

    def _relay(self, pair, source: socket.socket, sink: socket.socket) -> None:
        # Blocking sockets (a timeout would also bound sendall(), and a large reply to a busy reader must not
        # look like a broken link); select() with a short timeout lets the thread notice a stop.
        try:
            while not self._stopping:
                readable, _, _ = select.select([source], [], [], POLL)
                if not readable:
                    continue
                chunk = source.recv(65536)
                if not chunk:
                    break
                # Held here while the link is blackholed; delivered if it comes back up.
                while not self._flowing.wait(POLL):
                    if self._stopping:
                        return
                while True:
                    with self._lock:
                        if pair not in self._pairs:
                            return
                        frozen = pair in self._frozen
                    if not frozen or self._stopping:
                        break
                    self._thawed.wait(POLL)
                sink.sendall(chunk)
        except (OSError, ValueError):  # ValueError: the other direction closed the socket under us
            pass
        finally:
            self._close_pair(pair)

    def _close_pair(self, pair) -> None:
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

"""SSEServer: the listening socket and everything shared between threads.

Owns: the Policy and Config reference (swapped whole by apply()), the Bouncer, the Delivery writers, the history
file and the Redis bridge, the `stopping` flag, the open request connections and their threads, the status
counter, and the orderly drain at shutdown. Callers use the methods listed in SSEServer's docstring; what is behind
them (bouncer, delivery, cluster) is this module's business.
Must not know: signals, systemd, argv (daemon.py and cli.py drive it), or how a request is parsed.

Traps in the base classes this class steps around, on purpose:
- ThreadingHTTPServer's threads are daemon threads it never joins, so draining streams and joining request
  threads with a deadline is done here.
- HTTPServer.server_bind() calls socket.getfqdn(), a reverse DNS lookup that can hang on a machine with no DNS;
  we skip it.
- shutdown() deadlocks unless serve_forever() runs on another thread: daemon.py runs it on "sseserver-accept".
"""

import dataclasses
import email.utils
import logging
import os
import platform
import resource
import socket
import socketserver
import threading
import time
import weakref
from http.server import ThreadingHTTPServer
from collections.abc import Callable
from typing import Any

from . import __version__, framing, handover
from .access import EventFilter, Policy, recheck_stream
from .bouncer import Bouncer, Draft, EventNames, Page, Published, Refusal, Replay, adopted_entry, parse_event_id
from .cluster import RedisBridge, wait_for_replay
from .config import Config
from .delivery import Delivery, EndReason, State
from .errors import HTTPError
from .handler import Handler, refusal
from .history import HistoryFile
from .idempotency import KeyConflict, KeyTable, Stamp, first_of_each_key, wall_ms
from .metrics import Family, StatusCounter
from .publisher_loop import PublisherLoop

log = logging.getLogger("sseserver")

# File descriptors kept free for everything that is not a connection: the listener, epoll, eventfds, config
# and token files, the notify socket, logging.
FD_RESERVE = 64
# How often a held GET /history long poll looks whether its client hung up.
HISTORY_GONE_CHECK = 1.0
# Reasons /metrics shows even at 0, so a dashboard finds the series before the first drop.
ALWAYS_SHOWN_REASONS = frozenset({EndReason.SLOW, EndReason.DISCONNECTED, EndReason.SHUTDOWN})


def burst_room_bytes(config: Config) -> int:
    """The ring's room for bursts, in encoded bytes: a batch's events take up to about 4 times its body (a line
    end in data is 2 bytes of JSON but a 7-byte `data: ` line), so the room holds at least one whole batch."""
    return 4 * config.max_batch_bytes


def connection_limit(configured: int) -> int:
    """max_connections, or (0) the open-file limit minus a reserve, so accept() never meets EMFILE (at which
    point socketserver's accept loop would spin on a listener it cannot drain)."""
    if configured:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - FD_RESERVE)


class SSEServer(ThreadingHTTPServer):
    """The running server: one listening socket, and everything its threads share.

    Methods for the caller (daemon.py):
        start()                 start the writers, the history thread and the Redis follower
        serve_forever()         the accept loop (socketserver's), on its own thread
        port, server_address    where it listens
        policy                  the Policy in force (a reload builds the next one from it)
        apply(policy)           a reload: swap in a new Policy and its Config
        status()                one line for systemd's STATUS=
        subscriber_count()      open streams
        healthy()               for the watchdog: every thread it runs is alive, and it is not stopping
        stop_accepting()        /health says 503, publishes and new streams are turned away
        close_listener()        stop the accept loop and close the listening socket
        drain(deadline)         end every stream and request by the deadline
        server_close()          release the rest (after drain)
      an upgrade in place (SIGUSR2; the steps are daemon.py's, the format and handshake handover.py's):
        pause(deadline)         stop the accept loop, let publishes and stream starts in progress finish
        handover_state(deadline)    freeze the writers at an event boundary -> handover.State (or None)
        resume()                the hand-over failed: writers and publishes go on (restart serve_forever)
        release(deadline)       it committed: let go of every stream unclosed, answer what is in progress
        adopt(state)            the new process's side: continue the ring and take over the streams

    Methods a handler uses (handler.py):
        policy, config, stopping    the access policy and config (read once per request), and the stop flag
        track(h), untrack(h), request_finished(), hand_over(h)    connection bookkeeping for the drain
        park(h)                 a publisher's connection between requests goes to the publisher loop (or not)
        start_request_thread(target, args), shutdown_request(sock)    a parked connection resumed or closed
        publish(data, name)     -> (id, streams it is queued for); StoreError / OutcomeUnknown
        publish_drafts(drafts)  a batch, or a keyed publish -> Published; KeyConflict / KeyBusy, StoreError ...
        subscribe(wanted, last_event_id, client, config)    -> a Replay, or a Refusal saying why not
        start_stream(replay, sock, credential)  hand a stream whose head is out to the writers
        abandon_stream(replay)  a stream that never started (its head could not be sent)
        history_page(wanted, after, limit, wait, gone)    GET /history: retained events after an id (a long
                                poll, given up when gone() says the client hung up)
        count_status(status)    every response's status, for /metrics
        health(), metric_families(), http_date()    what /health and /metrics show; the Date header
    """

    allow_reuse_address = True
    daemon_threads = True  # joined by drain() with a deadline, never by the base class without one
    # The kernel's accept queue: thousands of subscribers connect at once after a restart.
    request_queue_size = 4096

    def __init__(self, policy: Policy, listen_socket: socket.socket | None = None):
        config = policy.config
        self.policy = policy  # read by handlers without a lock: apply() replaces the reference whole
        self.max_connections = connection_limit(config.max_connections)
        # hash(filter) -> the one shared filter object, held weakly: an entry lives exactly as long as some
        # stream (or a request being answered) uses the filter, so the table never outgrows the open streams.
        self._filters: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.history: HistoryFile | None = None
        stored: list = []
        if config.history_file:  # read before binding, so a bad file never holds the port (HistoryFileError)
            self.history = HistoryFile(
                config.history_file, config.history_fsync, config.history_fsync_interval, config.history_size
            )
            stored = self.history.load()
        self.statuses = StatusCounter()
        # A single instance takes its ids from its own sequence, which starts from the clock (unique across
        # restarts); with Redis the shared stream assigns every id and the bouncer only ingests them.
        self.bouncer = Bouncer(
            config.history_size,
            config.queue_size,
            first_id=1 if config.redis_url else None,
            store=self.history,
            room_bytes=burst_room_bytes(config),
        )
        self.bouncer.restore(stored)
        # A single instance's idempotency keys (with Redis they live in Redis), and those its history file kept.
        self.keys = KeyTable(config.idempotency_ttl, config.idempotency_max_keys)
        # A key is completed as its event enters the ring, under the bouncer's lock: a compaction that drops the
        # event's record then always finds the key in the table (Bouncer.on_keys_stored).
        self.bouncer.on_keys_stored(self.keys.complete)
        if self.history is not None and self.history.key_stamps:
            log.info(
                "history: %d idempotency keys still remembered",
                self.keys.restore(self.history.key_stamps, wall_ms()),
            )
        self.cluster: RedisBridge | None = None
        if config.redis_url:  # a bad URL is a ConfigError before anything is bound
            self.cluster = RedisBridge(config.redis_url, config.redis_key_prefix, config.history_size, self.bouncer)
        if stored:
            log.info(
                "history: %d events read from %s; ids continue after %d",
                len(stored),
                config.history_file,
                stored[-1].id,
            )
        self.delivery = Delivery(self.bouncer, config.writer_threads, config.heartbeat_interval)
        self.delivery.set_access_log(config.access_log)
        self.publishers = PublisherLoop(self, self.delivery.host_writer)
        self.stopping = False
        self.started_wall = time.time()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._connections: set = set()
        self._request_threads: set[threading.Thread] = set()
        self._thread_warning_due = 0.0  # the accept thread's own: when it may warn again that threads fail
        self._date = (0, b"")
        # An upgrade in place pauses publishing and stream starts; these count the ones in progress.
        self._gate = threading.Condition()
        self._paused = False
        self._in_flight = 0
        self._refused: list[tuple[socket.socket, bytes, str, str]] = []  # adopt() -> start(): streams to end
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        if listen_socket is None:
            super().__init__((config.host, config.port), Handler)
        else:
            super().__init__((config.host, config.port), Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listen_socket
            self.address_family = listen_socket.family
            self.server_address = listen_socket.getsockname()

    # -- socketserver's hooks ----------------------------------------------------------------------------------

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skips HTTPServer's getfqdn() (see the module docstring)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request, client_address) -> None:
        if len(self._connections) + self.bouncer.subscriber_count >= self.max_connections:
            # At the limit: answer at once from the accept thread, without a thread or a read, and close.
            self._refuse(request, "too many open connections", 5)
            return
        if not self.start_request_thread(self.process_request_thread, (request, client_address)):
            self._refuse(request, "server overloaded", 1)

    def start_request_thread(self, target: Callable[..., None], args: tuple) -> bool:
        """Run target(*args) on a new request thread, which drain() joins. False when none could be started."""
        thread = threading.Thread(
            target=self._request_thread, args=(target, args), name="sseserver-request", daemon=True
        )
        with self._lock:
            self._request_threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or of the process/thread limit
            with self._lock:
                self._request_threads.discard(thread)  # never started, so drain() must not join it
            now = time.monotonic()
            if now >= self._thread_warning_due:  # once a minute at most: every new connection fails alike
                self._thread_warning_due = now + 60
                log.warning("%s: answering 503 to new connections until a request thread can start", exc)
            return False
        return True

    def _refuse(self, request, message: str, retry_after: int) -> None:
        """503 from the accept thread, without a request thread or a read, then close."""
        self.count_status(503)
        try:
            request.setblocking(False)
            request.send(refusal(self.http_date(), message, retry_after))
        except OSError:
            pass
        self.shutdown_request(request)

    def _request_thread(self, target: Callable[..., None], args: tuple) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._request_threads.discard(threading.current_thread())

    def shutdown_request(self, request) -> None:
        if request.fileno() == -1:
            return  # handed to a writer thread (detached), which now owns the connection
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.exception("unhandled error with a connection from %s", client_address[0] if client_address else "?")

    # -- methods for the caller --------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        self._end_refused()
        self.delivery.start()
        if self.history is not None:
            keys_before = self.keys.stamps_before
            self.history.start(lambda: self.bouncer.compact_store(keys_before))
        if self.cluster is not None:
            self.cluster.start()

    def server_close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        super().server_close()
        if self.history is not None:
            self.history.close()  # after the drain: every accepted event is written and fsynced
            self.history = None

    @property
    def config(self) -> Config:
        return self.policy.config

    def apply(self, policy: Policy) -> None:
        """Swap in a new Policy and its Config (a reload). A request reads `self.policy` once, so none sees a
        mixture of old and new."""
        old, config = self.config, policy.config
        self.policy = policy
        self.max_connections = connection_limit(config.max_connections)
        if (old.history_size, old.queue_size, old.max_batch_bytes) != (
            config.history_size,
            config.queue_size,
            config.max_batch_bytes,
        ):
            self.bouncer.resize(config.history_size, config.queue_size, burst_room_bytes(config))
        self.keys.set_limits(config.idempotency_ttl, config.idempotency_max_keys)
        if old.heartbeat_interval != config.heartbeat_interval:
            self.delivery.set_heartbeat(config.heartbeat_interval)
        self.delivery.set_access_log(config.access_log)

    def status(self) -> str:
        return f"{self.bouncer.subscriber_count} subscribers, last id {self.bouncer.last_id}"

    def subscriber_count(self) -> int:
        return self.bouncer.subscriber_count

    def healthy(self) -> bool:
        """For the systemd watchdog: not stopping, and the threads this server runs are alive (the writers, the
        history file's thread, and the Redis follower coming round its loop; see RedisBridge.healthy() for why a
        Redis outage does not count)."""
        return (
            not self.stopping
            and self.delivery.alive()
            and (self.history is None or self.history.alive())
            and (self.cluster is None or self.cluster.healthy())
        )

    def stop_accepting(self) -> None:
        """Mark the server stopping: /health says 503, publishes and new streams are turned away."""
        self.stopping = True

    def close_listener(self) -> None:
        """Stop the accept loop (serve_forever() returns) and close the listening socket, so a new connection is
        refused instead of left hanging. Call it from another thread than the accept loop's."""
        self.shutdown()
        self.socket.close()

    def drain(self, deadline: float) -> bool:
        """After the accept loop has stopped: let in-flight requests finish, end every stream with a jittered
        `retry:`, wait for all of it until `deadline` (time.monotonic()), then force what is left. True when
        nothing had to be forced."""
        # 1. The requests: answered, or closed when idle.
        self._finish_requests(deadline)
        # 2. With Redis, an event answered 200 here reaches this instance's streams only once the follower reads
        #    it back from the shared stream: wait for that (bounded by the deadline, and not while the link is down).
        if self.cluster is not None and not self.cluster.wait_confirmed(time.monotonic()):
            log.info("shutdown: waiting for events published here to come back from Redis before ending streams")
            if not self.cluster.wait_confirmed(deadline):
                log.warning("shutdown: events published here had not come back from Redis by the deadline")
        # 3. Streams: deliver what was accepted, then `retry:` and a clean end, until the deadline.
        clean = self.delivery.close_all(self.config.retry_ms, deadline)
        # 4. Whatever request threads remain are past the deadline: cut their connections and join them.
        leftover = self._close_connections(idle_only=False)
        if leftover:
            log.warning("shutdown: closed %d connection(s) still open at the deadline", leftover)
        for thread in self._snapshot_threads():
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        stuck = [thread for thread in self._snapshot_threads() if thread.is_alive()]
        if stuck:
            log.warning("shutdown: %d request thread(s) did not finish", len(stuck))
        return clean and not leftover and not stuck

    # -- an upgrade in place ------------------------------------------------------------------------------------

    def pause(self, deadline: float) -> bool:
        """Stop the accept loop (the listening socket stays open, so new connections wait in its queue for
        whichever process serves next) and wait for the publishes and stream starts in progress; the ones that
        come later are turned away (503 + Retry-After; a stream gets a jittered retry). False when some were
        still in progress at `deadline` (call resume())."""
        self.shutdown()
        with self._gate:
            self._paused = True
            return self._gate.wait_for(lambda: self._in_flight == 0, max(0.0, deadline - time.monotonic()))

    def handover_state(self, deadline: float) -> handover.State | None:
        """Freeze the writers at an event boundary and describe everything the next process needs; None when a
        writer did not stop by `deadline` (call resume())."""
        streams = self.delivery.freeze(deadline)
        if streams is None:
            return None
        sequence, events = self.bouncer.export_sequence()
        now = time.monotonic()
        kept = []
        for stream in streams:
            if stream.state is not State.LIVE and stream.state is not State.BLOCKED:
                continue
            names, patterns = _filter_fields(stream.names)
            kept.append(
                handover.StreamState(
                    stream.sock.fileno(),
                    names,
                    patterns,
                    stream.cursor,
                    stream.live_from,
                    bytes(stream.out or b""),
                    stream.last_id_sent,
                    stream.peer,
                    now - stream.started,
                    stream.events_sent,
                    stream.received,
                    stream.credential.hex(),
                )
            )
        return handover.State(
            self.socket.fileno(),
            self.config.retry_ms,
            handover.IdSequence(**sequence),
            tuple(
                handover.Entry(
                    e.pos,
                    e.id,
                    e.prev_id,
                    e.name,
                    e.data,
                    e.published_ns,
                    e.notice,
                    e.wire.decode() if e.notice else "",
                    e.batch,
                )
                for e in events
            ),
            tuple(kept),
            tuple(
                (stamp.key, stamp.fingerprint.hex(), stamp.event_id, stamp.subscribers, stamp.at_ms)
                for stamp in self.keys.stamps_before(None)
            ),
        )

    def resume(self) -> None:
        """The hand-over failed: the writers go on where they stopped, publishes and stream starts are taken
        again. The caller starts serve_forever() again."""
        with self._gate:
            self._paused = False
        self.delivery.thaw()

    def release(self, deadline: float) -> None:
        """The hand-over committed: the writers let go of every stream without closing it (the next process
        has them), and the requests still open here are answered (stopping: 503 to publishes, `Connection:
        close`) or closed when idle, until `deadline`."""
        self.delivery.release()
        self._finish_requests(deadline)

    def _finish_requests(self, deadline: float) -> None:
        """Stopping: held GET /history long polls answer now; idle keep-alive connections (the parked
        publishers' among them) would wait for a next request that must not come, so they are closed; busy ones
        finish their request (a publish is answered) and then close, seeing `stopping`. Waits for those until
        `deadline`."""
        self.stopping = True
        self.bouncer.wake_waiters()
        self.publishers.stop()
        self._close_connections(idle_only=True)
        with self._idle:
            self._idle.wait_for(lambda: not self._busy_connections(), max(0.0, deadline - time.monotonic()))

    def adopt(self, state: handover.State) -> int:
        """The new process's side, before start(): continue the previous ring and id sequence, and give every
        stream to the writers, its unsent bytes first. A changed retry_ms goes to each stream as a `retry:`
        block after those bytes (an event boundary). The new config's tokens decide again, as for a reconnect:
        a stream whose token is gone, or whose names left its token's scope, is not adopted; start() ends it
        (its unsent bytes, then FIN) with a logged reason. Returns how many streams were adopted."""
        self.bouncer.import_sequence(
            dataclasses.asdict(state.sequence),
            [
                adopted_entry(
                    e.pos,
                    e.id,
                    e.prev_id,
                    e.name,
                    e.data,
                    e.published_ns,
                    e.batch,
                    e.wire.encode() if e.notice else None,
                )
                for e in state.entries
            ],
        )
        retry = framing.encode_retry(self.config.retry_ms) if state.retry_ms != self.config.retry_ms else b""
        adopted = 0
        for stream in state.streams:
            os.set_inheritable(stream.fd, False)
            sock = socket.socket(fileno=stream.fd)
            requested = None if stream.names is None else frozenset(stream.names)
            try:
                wanted = recheck_stream(self.policy.subscribe_tokens, bytes.fromhex(stream.credential), requested)
            except HTTPError as refused:
                self._refused.append((sock, stream.unsent, stream.peer, refused.message))
                continue
            names = self._intern_filter(wanted)
            adopted += 1
            subscriber = self.bouncer.readmit(names, stream.cursor, stream.live_from, stream.peer)
            self.delivery.adopt(
                subscriber,
                sock,
                stream.unsent + retry,
                stream.last_id_sent,
                stream.age,
                stream.events_sent,
                stream.received,
                bytes.fromhex(stream.credential),
            )
        # Idempotency keys (publishing is paused, so none is pending): a retry after the upgrade is still a repeat.
        self.keys.restore([Stamp(key, bytes.fromhex(fp), id_, n, at) for key, fp, id_, n, at in state.keys], wall_ms())
        return adopted

    def _end_refused(self) -> None:
        """Streams the new config no longer allows (adopt()): what the previous process had not sent yet (so
        the last event is whole), then a clean end; the client's reconnect gets the 401 or 403. Never waits for a
        client (this runs before the new process serves anyone): what its socket does not take at once is cut,
        and a client discards an event the stream ends in the middle of (the spec's rule), keeping the id of the
        last whole one."""
        for sock, unsent, peer, why in self._refused:
            log.warning("upgrade: ended the stream of %s: %s", peer, why)
            try:
                sent = sock.send(unsent, socket.MSG_DONTWAIT) if unsent else 0
                if sent == len(unsent):
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.close()
        self._refused.clear()

    def _enter(self) -> None:
        """A publish or a stream start begins (HTTPError 503 while paused for a hand-over)."""
        with self._gate:
            if self._paused:
                raise HTTPError(503, "upgrading in place; retry", headers=(("Retry-After", "1"),), close=True)
            self._in_flight += 1

    def _leave(self) -> None:
        with self._gate:
            self._in_flight -= 1
            if self._paused and not self._in_flight:
                self._gate.notify_all()

    # -- methods a handler uses --------------------------------------------------------------------------------

    def track(self, handler) -> None:
        with self._lock:
            self._connections.add(handler)

    def park(self, handler) -> bool:
        """A publisher's connection between requests: the publisher loop takes it when a publish here never
        waits for I/O (see publisher_loop.py). False: the handler's thread keeps it."""
        config = self.config
        if self.stopping or self.cluster is not None or (self.history is not None and config.history_fsync == "always"):
            return False
        return self.publishers.park(handler)

    def hand_over(self, handler) -> None:
        """The handler's socket became a stream: from now on it counts as a subscriber, not a connection."""
        with self._lock:
            self._connections.discard(handler)

    def untrack(self, handler) -> None:
        with self._lock:
            self._connections.discard(handler)
        self.request_finished()

    def request_finished(self) -> None:
        """A handler went idle or away; drain() may be waiting for exactly that."""
        if self.stopping:
            with self._idle:
                self._idle.notify_all()

    def publish(self, data: str, name: str) -> tuple[int, int]:
        """(id, streams here it is queued for). With Redis the id comes from the shared stream and the event
        reaches local streams through the follower, like everyone else's. StoreError: not published.
        During an upgrade in place: 503 with Retry-After (never a 200 for an event the next process lacks)."""
        self._enter()
        try:
            if self.cluster is None:
                event, count = self.bouncer.publish(data, name)
                return event.id, count
            return self.cluster.publish(data, name), self.bouncer.queued_for(name)
        finally:
            self._leave()

    def publish_drafts(self, drafts: list[Draft]) -> Published:
        """Publish events with consecutive ids in one step, all or none (a batch, or one event with an
        idempotency key). A draft whose key was seen within idempotency_ttl, or that repeats an earlier draft's
        key, is not published: Published.duplicates gives it the original's Stamp. KeyConflict: a key reused
        with another name or data (nothing published); KeyBusy: a request holding a key did not finish in time;
        StoreError / OutcomeUnknown as for publish(). With Redis the script checks the keys and assigns the ids
        in one atomic step; a single instance claims them in its KeyTable around the bouncer's publish. During
        an upgrade in place: 503 with Retry-After, like publish()."""
        self._enter()
        try:
            return self._publish_drafts(drafts)
        finally:
            self._leave()

    def _publish_drafts(self, drafts: list[Draft]) -> Published:
        repeats = first_of_each_key([draft.key for draft in drafts], [draft.fingerprint for draft in drafts])
        if self.cluster is not None:
            config = self.config
            queued = {name: self.bouncer.queued_for(name) for name in {draft.name for draft in drafts}}
            return self.cluster.publish_drafts(
                drafts, repeats, queued, config.idempotency_ttl, config.idempotency_max_keys
            )
        claimed: list[int] = []
        keys: list[str] = []
        prints: list[bytes] = []
        for index, draft in enumerate(drafts):
            if draft.key is not None and draft.fingerprint is not None and index not in repeats:
                claimed.append(index)
                keys.append(draft.key)
                prints.append(draft.fingerprint)
        try:
            found = self.keys.claim(keys, prints) if claimed else []
        except KeyConflict as exc:
            raise KeyConflict(claimed[exc.index]) from None  # which draft, not which of the keys
        duplicates = {index: stamp for index, stamp in zip(claimed, found) if stamp is not None}
        held = [key for key, stamp in zip(keys, found) if stamp is None]
        fresh = [index for index in range(len(drafts)) if index not in duplicates and index not in repeats]
        try:
            events, subscribers = self.bouncer.publish_batch([drafts[index] for index in fresh]) if fresh else ([], 0)
        except BaseException:
            self.keys.release(held)  # not published: a retry must publish
            raise
        # The keys of `events` are completed already: by the bouncer, as they entered the ring.
        by_index = dict(zip(fresh, events))
        for index, original in repeats.items():
            duplicates[index] = by_index[original].key if original in by_index else duplicates[original]
        return Published(events[0].id if events else None, len(events), subscribers, duplicates)

    def subscribe(self, wanted: EventNames, last_event_id: str | None, client: str, config: Config) -> Replay | Refusal:
        """Register a stream for the events `wanted` accepts, starting after `last_event_id`, within `config`'s
        limits (the request's own config: a reload mid-request must not mix two). Its head is not sent yet: follow
        with start_stream(), or abandon_stream() if the head cannot be sent."""
        self._prepare_replay(last_event_id)
        try:
            self._enter()  # left by start_stream() or abandon_stream()
        except HTTPError:
            return Refusal.UPGRADING
        replay = self.bouncer.subscribe(
            self._intern_filter(wanted), last_event_id, client, config.max_subscribers, config.max_subscribers_per_ip
        )
        if isinstance(replay, Refusal):
            self._leave()
        return replay

    def start_stream(self, replay: Replay, sock: socket.socket, credential: bytes = b"") -> None:
        """The stream's head is out and `sock` is its connection, detached from the request: the writers own it
        from now on. `credential`: the digest of the token it presented (b"" for none)."""
        try:
            self.delivery.add(replay, sock, credential)
        finally:
            self._leave()

    def abandon_stream(self, replay: Replay) -> None:
        try:
            self.bouncer.unsubscribe(replay.subscriber)
        finally:
            self._leave()

    def history_page(
        self, names: EventNames, after: str | None, limit: int, wait: float, gone: Callable[[], bool]
    ) -> Page | None:
        """GET /history: the retained events after `after` (see Bouncer.page). With `wait` and nothing to
        return yet, hold until a matching event arrives, `wait` seconds pass, or shutdown begins (drain()
        wakes every waiter, so a held request is answered at once, never cut). `gone()` is asked every
        HISTORY_GONE_CHECK seconds while held: None when the client hung up (its thread and its place under
        max_connections are freed then, not at the end of the wait)."""
        self._prepare_replay(after)
        deadline = time.monotonic() + wait
        while True:
            page = self.bouncer.page(names, after, limit)
            remaining = deadline - time.monotonic()
            if page.events or page.reset or remaining <= 0 or self.stopping:
                return page
            self.bouncer.wait_for_more(names, page.end, min(remaining, HISTORY_GONE_CHECK))
            if gone():
                return None
            after = str(page.last_id)  # what arrived may not match: look again from where this look ended

    def count_status(self, status: int) -> None:
        self.statuses.add(status)

    def _prepare_replay(self, last_event_id: str | None) -> None:
        """With Redis, a Last-Event-ID from another instance may be ahead of this one's follower: wait for it."""
        if self.cluster is not None and last_event_id is not None:
            wanted = parse_event_id(last_event_id)
            if wanted is not None:
                wait_for_replay(self.cluster, self.bouncer, wanted)

    def _intern_filter(self, wanted: EventNames) -> EventNames:
        """One shared object per distinct filter among the open streams, so the delivery layer joins bytes once
        per filter. Keyed by hash, because a key is held strongly and would keep its filter alive; two filters
        with the same hash (not equal) only lose the sharing, never correctness."""
        if wanted is None:
            return None
        key = hash(wanted)
        with self._lock:
            shared = self._filters.get(key)
            if shared is not None and shared == wanted:
                return shared
            self._filters[key] = wanted
            return wanted

    def health(self) -> dict:
        bouncer = self.bouncer
        return {
            "status": "stopping" if self.stopping else "ok",
            "subscribers": bouncer.subscriber_count,
            "last_event_id": None if bouncer.newest_event_id is None else str(bouncer.newest_event_id),
            "history_size": bouncer.retained(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            # What a client should expect of a stream (`sseserver doctor` reads them to judge what it sees).
            "heartbeat_interval": self.config.heartbeat_interval,
            "retry_ms": self.config.retry_ms,
            **(self.cluster.health() if self.cluster is not None else {}),
        }

    def metric_families(self) -> list[Family]:
        """Everything /metrics shows, read from where it is kept (bouncer, writers, the status counter)."""
        bouncer, delivery = self.bouncer, self.delivery
        dropped = delivery.dropped()
        return [
            Family("sseserver_subscribers", "gauge", "Open event streams.", [({}, bouncer.subscriber_count)]),
            Family(
                "sseserver_connections",
                "gauge",
                "Open connections still reading a request.",
                [({}, len(self._connections))],
            ),
            Family(
                "sseserver_parked_publishers",
                "gauge",
                "Keep-alive publisher connections waiting in the publisher loop (part of sseserver_connections).",
                [({}, self.publishers.parked_count())],
            ),
            Family(
                "sseserver_history_waiting",
                "gauge",
                "GET /history long polls waiting for an event.",
                [({}, bouncer.history_waiting)],
            ),
            Family(
                "sseserver_events_published_total",
                "counter",
                "Events published since the process started.",
                [({}, bouncer.published)],
            ),
            Family(
                "sseserver_events_delivered_total",
                "counter",
                "Event deliveries handed to subscriber sockets (one per event per subscriber).",
                [({}, delivery.delivered())],
            ),
            Family(
                "sseserver_subscribers_dropped_total",
                "counter",
                "Streams ended by the server, by reason.",
                [
                    ({"reason": reason.value}, dropped.get(reason, 0))
                    for reason in sorted(set(dropped) | ALWAYS_SHOWN_REASONS, key=lambda reason: reason.value)
                ],
            ),
            Family(
                "sseserver_replay_resets_total",
                "counter",
                "Streams that began with sseserver.reset because their Last-Event-ID could not be honoured.",
                [({}, bouncer.resets)],
            ),
            Family(
                "sseserver_http_requests_total",
                "counter",
                "HTTP responses, by status code.",
                [({"code": str(code)}, count) for code, count in sorted(self.statuses.snapshot().items())],
            ),
            Family(
                "sseserver_publish_to_write_seconds",
                "histogram",
                "Time from a publish to the first write of the event to a subscriber socket.",
                histogram=delivery.latency(),
            ),
            Family("sseserver_history_events", "gauge", "Events retained for replay.", [({}, bouncer.retained())]),
            Family("sseserver_last_event_id", "gauge", "The id of the newest event.", [({}, bouncer.last_id)]),
            *(
                [
                    Family(
                        "sseserver_redis_up", "gauge", "1 while the Redis link is up.", [({}, int(self.cluster.up))]
                    ),
                    Family(
                        "sseserver_redis_reconnects_total",
                        "counter",
                        "Times the Redis follower's link failed or could not be made (it retries with backoff).",
                        [({}, self.cluster.reconnects)],
                    ),
                ]
                if self.cluster is not None
                else []
            ),
            Family(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch.",
                [({}, self.started_wall)],
            ),
            Family(
                "sseserver_build_info",
                "gauge",
                "Version information; the value is always 1.",
                [({"version": __version__, "python": platform.python_version()}, 1)],
            ),
        ]

    def http_date(self) -> bytes:
        """The Date header value, formatted at most once a second."""
        now = int(time.time())
        cached_at, text = self._date
        if cached_at != now:
            text = email.utils.formatdate(now, usegmt=True).encode("ascii")
            self._date = (now, text)
        return text

    # -- internals ---------------------------------------------------------------------------------------------

    def _busy_connections(self) -> int:
        with self._lock:
            return sum(1 for handler in self._connections if handler.busy)

    def _snapshot_threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._request_threads)

    def _close_connections(self, idle_only: bool) -> int:
        with self._lock:
            handlers = [h for h in self._connections if not (idle_only and h.busy) and not h.detached]
        for handler in handlers:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)  # wakes its recv(); the thread then exits
            except OSError:
                pass
        return len(handlers)


def _filter_fields(names: EventNames) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """A stream's filter as the hand-over state keeps it: (exact names, scope patterns)."""
    if names is None:
        return None, None
    if isinstance(names, frozenset):
        return tuple(sorted(names)), None
    if isinstance(names, EventFilter):
        return (None if names.names is None else tuple(sorted(names.names))), names.patterns
    raise handover.HandoverError(f"a stream's filter cannot be handed over: {names!r}")


def _filter_from(names: tuple[str, ...] | None, patterns: tuple[str, ...] | None) -> EventNames:
    wanted = None if names is None else frozenset(names)
    return wanted if patterns is None else EventFilter(wanted, patterns)

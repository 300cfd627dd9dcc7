"""The daemon's life: start, serve, reload on SIGHUP, upgrade in place on SIGUSR2, drain on SIGTERM/SIGINT (or,
with systemd's fd store, leave the streams and the state there for the next start), tell systemd at each step.

Owns: the only `import signal` in the package, the main thread's control loop, the accept thread, and the
process-wide setup (file-descriptor limit). Signal handlers only enqueue the signal's Command in the Mailbox
(reentrant-safe); everything else happens in the loop, on the main thread, where logging and locks are safe.
Must not know: HTTP or how events are delivered.

A run inside a test thread installs no signal handlers (they are process state, and Python only allows them on
the main thread); tests stop such a server with Daemon.request_stop().
"""

import collections
import dataclasses
import enum
import logging
import os
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from . import config as config_module
from . import fdstore, handover, logs, systemd
from .access import Policy
from .config import Config
from .server import SSEServer

log = logging.getLogger("sseserver")


class Command(enum.Enum):
    """What the control loop is asked to do: the items of Daemon.events."""

    STOP = "stop"  # SIGTERM, SIGINT, request_stop(): drain and exit 0 (a second one: exit 1 at once)
    RELOAD = "reload"  # SIGHUP
    DRAINED = "drained"  # from the drain thread: every stream has ended, or the deadline passed
    UPGRADE = "upgrade"  # SIGUSR2: hand everything to a new process running the code and config on disk


# What each handled signal asks for. A dict lookup is all a handler does besides the enqueue.
SIGNAL_COMMANDS = {
    signal.SIGTERM: Command.STOP,
    signal.SIGINT: Command.STOP,
    signal.SIGHUP: Command.RELOAD,
    signal.SIGUSR2: Command.UPGRADE,
}
# What a command that arrived during an upgrade is passed on as, to the process that took over.
FORWARDED_SIGNALS = {Command.STOP: signal.SIGTERM, Command.RELOAD: signal.SIGHUP, Command.UPGRADE: signal.SIGUSR2}
# How long requests still open in the old process get to be answered after an upgrade committed.
RETIRE_TIMEOUT = 1.0
# How often the accept loop looks whether it is asked to stop (socketserver's poll_interval): an upgrade in place
# waits that long, on average half of it, before the hand-over can begin. 20 wake-ups a second cost nothing.
ACCEPT_POLL = 0.05
# While names a start was passed may still be in systemd's fd store: how often the control loop asks again to
# remove them, and how long each attempt may wait for systemd (the loop does nothing else meanwhile).
STALE_RETRY = 1.0
STALE_RETRY_TIMEOUT = 0.5


class Mailbox:
    """The control loop's queue, which a signal delivered to any thread wakes at once.

    Python runs signal handlers on the main thread only, between bytecodes. The kernel may deliver SIGTERM to any
    thread that does not block it (it does under strace, for one), and a main thread asleep in a lock wait
    (queue.get) is not woken by that: the stop waited for the loop's next tick, up to 5 s. Here the main thread
    sleeps in select() on a socket that put() and, through signal.set_wakeup_fd(), every signal write to."""

    def __init__(self) -> None:
        self._items: collections.deque[Command] = collections.deque()  # append/popleft are thread-safe
        self._reader, self._writer = socket.socketpair()  # not inherited: an upgrade's next process has its own
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._waking = False  # set_wakeup_fd() points at _writer
        # poll(), not select(): after a restart through systemd's fd store every stream's socket sits at 3, 4, ...,
        # so this pair is made above them all, far past select()'s 1,024 (it crashed the control loop there).
        self._poller = select.poll()
        self._poller.register(self._reader, select.POLLIN)

    def put(self, command: "Command") -> None:
        """From any thread, or a signal handler (no locks here)."""
        self._items.append(command)
        try:
            self._writer.send(b"\0")
        except OSError:  # full: a wake-up is pending already
            pass

    def get(self, timeout: float) -> "Command | None":
        """The next command, waiting at most `timeout`; None when there is none."""
        if not self._items:
            self._poller.poll(timeout * 1000)
            try:
                while self._reader.recv(4096):
                    pass
            except BlockingIOError:
                pass
        return self._items.popleft() if self._items else None

    def drain(self) -> list["Command"]:
        """Every command still waiting (the old process's last look after an upgrade)."""
        pending = []
        while self._items:
            pending.append(self._items.popleft())
        return pending

    def wake_on_signals(self) -> None:
        """Main thread only: every signal, whichever thread the kernel gives it to, wakes get()."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._waking = True

    def close(self) -> None:
        """At the end of a run: signals no longer write here (the fd number may be reused), and the sockets are
        freed now, not whenever the garbage collector gets to a Daemon (a test process runs hundreds)."""
        if self._waking:
            signal.set_wakeup_fd(-1)
            self._waking = False
        self._reader.close()
        self._writer.close()


def start_directory(environ: Mapping[str, str]) -> str:
    """Where an upgrade's next process starts, so that it runs "the code now on disk": $PWD when, at start, it
    names the directory we run in (a path through a symlink that a deploy swaps later, as nginx and unicorn take
    it; os.getcwd() has the symlink resolved), else the cwd."""
    here = os.getcwd()
    given = environ.get("PWD")
    try:
        if given and os.path.samefile(given, here):
            return given
    except OSError:
        pass
    return here


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every subscriber is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        environ: Mapping[str, str] = os.environ,
        overrides: dict | None = None,
        argv: Sequence[str] | None = None,
    ):
        self.config = config
        self.argv = None if argv is None else list(argv)  # to start the next process with (SIGUSR2)
        self._successor_pid: int | None = None  # the process an upgrade handed everything to
        self._start_directory = start_directory(environ)  # where an upgrade's next process starts
        self.config_path = config_path
        self.overrides = dict(overrides or {})  # command-line keys, layered over the file again on each reload
        self.environ = environ
        self.events = Mailbox()
        self.server: SSEServer | None = None
        self.ready = threading.Event()  # set once listening (tests wait on it)
        self._accept_thread: threading.Thread | None = None
        self._drain_thread: threading.Thread | None = None
        # Names a start was passed from the fd store whose removal systemd has not confirmed yet: the control loop
        # asks again, and no stop stores anything while some are left (its names could be taken for theirs).
        self._stale: tuple[str, ...] = ()

    # -- methods for the caller --------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code."""
        try:
            return self._run()
        finally:
            self.events.close()

    def _run(self) -> int:
        soft, _ = raise_open_file_limit()
        # Before anything is announced or adopted: whoever saw the log line or READY=1 may stop us at once, and a
        # SIGTERM must then drain and exit 0, not kill the process with the default action; and an upgrade's
        # previous process passes on the signals that arrived during the hand-over (they only enqueue here).
        self._install_signal_handlers()
        adoption = handover.Adoption.incoming(self.environ)
        state: handover.State | None = None
        inherited: list[socket.socket] = []
        restored = 0  # bytes of state read from systemd's fd store
        restore_started = time.monotonic()  # the store is emptied first: that is part of the hand-over's time
        if adoption is not None:  # started by SIGUSR2 in the previous process: take over its sockets
            try:
                state = adoption.state()
            except handover.HandoverError as exc:
                log.error("upgrade refused: %s", exc)
                adoption.fail(str(exc))
                return 2
            if self.config.history_file or self.config.redis_url:
                # The previous process checked its own config; the new one may add durable history or Redis,
                # which the adopted in-memory events would never reach: a restart is the way there.
                why = "the new config sets history_file or redis_url: restart instead of upgrading"
                log.error("upgrade refused: %s", why)
                adoption.fail(why)
                return 2
            os.set_inheritable(state.listen_fd, False)
            inherited = [socket.socket(fileno=state.listen_fd)]
        else:  # socket activation, and what a stop left in systemd's fd store
            state, inherited, restored = self._restore(fdstore.sort(systemd.listen_fds(self.environ)))
        try:
            policy = Policy(self.config)
            self.server = SSEServer(policy, inherited[0] if inherited else None)
        except config_module.ConfigError as exc:  # history.HistoryFileError: unreadable, in use, or corrupt
            log.error("bad config: %s", exc)
            if adoption is not None:
                adoption.fail(f"bad config: {exc}")
            return 2
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc.strerror or exc)
            return 1
        server = self.server
        how = "inherited socket" if inherited else "bound"
        if adoption is not None and state is not None:
            if not self._adopt(server, adoption, state):
                return 1
            how = "adopted from the previous process"
        elif state is not None:
            if not self._adopt_stored(server, state, restored, restore_started):
                return 1
            how = "adopted from systemd's fd store"
        server.start()
        self._start_accepting(server)
        host = server.server_address[0]
        shown = f"[{host!s}]" if ":" in str(host) else str(host)
        log.info("listening on http://%s:%d (%s; open-file limit %d)", shown, server.port, how, soft)
        self.ready.set()
        if adoption is not None:
            # The old process tells systemd our pid and lets go; only then is READY=1 ours to send.
            adoption.wait_released(time.monotonic() + self.config.upgrade_timeout)
            systemd.notify(f"MAINPID={os.getpid()}\nREADY=1\nSTATUS={server.status()}", self.environ)
        else:
            systemd.notify(f"READY=1\nSTATUS={server.status()}", self.environ)
        return self._control_loop(server)

    def request_stop(self) -> None:
        """Ask for a graceful stop from any thread (what SIGTERM does)."""
        self.events.put(Command.STOP)

    def request_upgrade(self) -> None:
        """Ask for an upgrade in place from any thread (what SIGUSR2 does)."""
        self.events.put(Command.UPGRADE)

    # -- the control loop ------------------------------------------------------------------------------------

    def _control_loop(self, server: SSEServer) -> int:
        watchdog = systemd.watchdog_interval(self.environ)
        tick = min(watchdog, 5.0) if watchdog else 5.0
        next_watchdog = time.monotonic()
        while True:
            command = self.events.get(min(tick, STALE_RETRY) if self._stale else tick)
            if command is Command.STOP:
                if self._drain_thread is not None:
                    log.warning("second stop signal: exiting now without waiting for streams")
                    return 1
                if self._store(server):
                    return 0  # the next start adopts the streams from systemd's fd store
                self._begin_stop(server)
            elif command is Command.RELOAD:
                self._reload(server)
            elif command is Command.UPGRADE and self._upgrade(server):
                self._pass_on_pending()
                return 0  # the next process serves everything now
            elif command is Command.DRAINED and self._drain_thread is not None:
                self._drain_thread.join()
                server.server_close()
                log.info("stopped")
                return 0
            if watchdog and time.monotonic() >= next_watchdog and self._healthy(server):
                systemd.notify("WATCHDOG=1", self.environ)
                next_watchdog = time.monotonic() + watchdog
            if self._drain_thread is None:
                systemd.notify(f"STATUS={server.status()}", self.environ)
                if self._stale:
                    self._remove_stale(time.monotonic() + STALE_RETRY_TIMEOUT)

    def _begin_stop(self, server: SSEServer) -> None:
        """Shutdown, in order: (1) tell systemd and make /health say 503; (2) stop the accept loop and close the
        listener so a new connection is refused, not left hanging; (3) on another thread, let in-flight requests
        finish and end every stream with a jittered retry, within shutdown_timeout. The main thread keeps
        listening for a second signal, which exits at once."""
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("stopping: %d stream(s) to end within %gs", server.subscriber_count(), self.config.shutdown_timeout)
        systemd.notify("STOPPING=1", self.environ)  # again after a failed _store(): harmless, and in order
        server.stop_accepting()
        server.close_listener()

        def drain() -> None:
            try:
                if not server.drain(deadline):
                    log.warning("stopped at the shutdown_timeout deadline; some streams were cut")
            finally:
                self.events.put(Command.DRAINED)

        self._drain_thread = threading.Thread(target=drain, name="sseserver-drain", daemon=True)
        self._drain_thread.start()

    def _start_accepting(self, server: SSEServer) -> None:
        self._accept_thread = accept = threading.Thread(
            target=server.serve_forever, name="sseserver-accept", kwargs={"poll_interval": ACCEPT_POLL}, daemon=True
        )
        accept.start()

    # -- an upgrade in place (the format and the handshake: handover.py) --------------------------------------

    def _upgrade(self, server: SSEServer) -> bool:
        """SIGUSR2, in order: (1) RELOADING=1; (2) stop accepting (connections wait in the listen queue) and let
        publishes and stream starts in progress finish, turning new ones away with 503 + Retry-After; (3) stop
        the writers at an event boundary and write the state; (4) start the new process with every socket and
        wait until it has adopted them and committed, within upgrade_timeout; (5) tell systemd its pid, let go
        of the streams without closing them, answer what is still open here, and leave. If anything fails
        before the commit, the new process is killed (it has written nothing) and this one resumes where it
        stopped: one log line says why. True when the new process took over."""
        if self._drain_thread is not None:
            return False
        why = self._cannot_upgrade()
        if why:
            log.warning("upgrade not attempted, still serving: %s", why)
            return False
        started = time.monotonic()
        deadline = started + self.config.upgrade_timeout
        systemd.notify(
            f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}", self.environ
        )
        successor: handover.Successor | None = None
        state: handover.State | None = None
        blob = b""
        try:
            state = server.handover_state(deadline) if server.pause(deadline) else None
            if state is None:
                return self._upgrade_failed(server, "publishes or writers did not pause in time")
            blob = handover.encode(state)
            assert self.argv is not None  # _cannot_upgrade() checked
            successor = handover.Successor(self.argv, self._start_directory, self.environ, state, blob)
            why = successor.adopt(deadline)
        except Exception as exc:  # a bug or a resource limit here must not take the serving daemon down
            log.debug("upgrade failed", exc_info=True)
            if successor is not None:
                successor.abort()
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            return self._upgrade_failed(server, why)
        assert successor is not None and state is not None  # no reason to fail: both were made
        took = time.monotonic() - started
        systemd.notify(f"MAINPID={successor.pid}", self.environ)
        self._successor_pid = successor.pid
        server.release(time.monotonic() + RETIRE_TIMEOUT)
        successor.release()
        log.info("upgraded in place: pid %d took over %s", successor.pid, handover.summary(state, blob, took))
        return True

    def _pass_on_pending(self) -> None:
        """Signals that arrived during the hand-over were meant for the service, which the next process now is:
        pass them on (it installed its handlers before adopting, so they only enqueue there too)."""
        for command in self.events.drain():
            signum = FORWARDED_SIGNALS.get(command)
            if signum is not None and self._successor_pid is not None:
                log.warning("%s arrived during the upgrade: passed on to pid %d", signum.name, self._successor_pid)
                os.kill(self._successor_pid, signum)

    def _cannot_upgrade(self) -> str | None:
        if self.argv is None:
            return "this daemon was not started from the command line"
        if self.config.history_file:
            return "history_file is set (the file stays locked by this process; restart instead)"
        if self.config.redis_url:
            return "redis_url is set (the Redis follower's position is not handed over yet; restart instead)"
        if self._stale:  # the next process would not know them, and could store its own next to them
            return "names passed at start may still be in systemd's fd store (it has not confirmed removing them)"
        return None

    def _upgrade_failed(self, server: SSEServer, why: str) -> bool:
        server.resume()
        self._start_accepting(server)
        log.error("upgrade failed, still serving: %s", why)
        systemd.notify(f"READY=1\nSTATUS={server.status()}", self.environ)
        return False

    def _adopt(self, server: SSEServer, adoption: handover.Adoption, state: handover.State) -> bool:
        """The new process's side: take over the streams, then ask the old process to commit. False: it did not
        (it keeps serving) and this process must leave without writing anything."""
        started = time.monotonic()
        try:
            count = server.adopt(state)
        except (handover.HandoverError, OSError, ValueError) as exc:
            log.error("upgrade: cannot adopt the streams: %s", exc)
            adoption.fail(f"cannot adopt the streams: {exc}")
            return False
        if not adoption.adopted(time.monotonic() + self.config.upgrade_timeout):
            log.error("upgrade: the previous process did not commit; leaving the streams to it")
            return False
        log.info(
            "upgrade: adopted %d stream(s) and %d event(s), ids continue after %d (%.0f ms)",
            count,
            len(state.entries),
            state.sequence.last_id,
            (time.monotonic() - started) * 1000,
        )
        return True

    # -- a restart through systemd's fd store (the names and the protocol: fdstore.py) ---------------------------

    def _store(self, server: SSEServer) -> bool:
        """SIGTERM with an fd store, in order: (1) STOPPING=1; (2) pause and freeze the writers at an event
        boundary, as for an upgrade (connections wait in the listening socket's queue, which systemd keeps);
        (3) push the listener, every stream and the state into the store and wait until systemd has them;
        (4) let go of the streams without closing them (systemd holds a copy of each: no FIN), answer what is
        still open here, and exit 0. Anything failing before (3) completes resumes and drains as without a store,
        with one line saying why. False: drain."""
        room = fdstore.capacity(self.environ)
        if not room:
            return False  # no store: drain, as always
        if self.config.history_file or self.config.redis_url:
            log.info("stopping without the fd store: history_file or redis_url is set (its streams drain instead)")
            return False
        if self._stale and not self._remove_stale(time.monotonic() + self.config.upgrade_timeout):
            # Stored next to names from before, ours could be taken for theirs (and theirs for ours).
            log.error("fd store not used, ending the streams instead: names from the previous start may still be there")
            return False
        log.info("stopping: storing %d stream(s) in systemd's fd store", server.subscriber_count())
        systemd.notify("STOPPING=1", self.environ)  # may wait for systemd (NOTIFY_WAIT): not the store's time
        started = time.monotonic()
        deadline = started + self.config.upgrade_timeout
        state: handover.State | None = None
        try:
            state = server.handover_state(deadline) if server.pause(deadline) else None
            if state is None:
                return self._store_failed(server, "publishes or writers did not pause in time")
            why = fdstore.refusal(state, room)
            if why is not None:
                return self._store_failed(server, why)
            blob = handover.encode(state)
            fdstore.store(state, blob, self.environ, deadline)
        except fdstore.StoreFailed as failed:
            log.debug("fd store failed", exc_info=True)
            if not failed.taken_back:
                self._store_lost(server, state, str(failed))
                return True  # every stream has ended; nothing is left to drain
            return self._store_failed(server, str(failed))
        except Exception as exc:  # a bug before anything was sent: the streams must still end cleanly
            log.debug("fd store failed", exc_info=True)
            return self._store_failed(server, f"{type(exc).__name__}: {exc}")
        took = time.monotonic() - started
        server.release(time.monotonic() + RETIRE_TIMEOUT)
        log.info("stopped, streams kept in systemd's fd store: %s", handover.summary(state, blob, took))
        return True

    def _store_failed(self, server: SSEServer, why: str) -> bool:
        """Nothing of the stop is in the store (never sent, or systemd confirmed taking it back)."""
        server.resume()  # the writers go on, so that the drain ends every stream with a `retry:`
        log.error("fd store not used, ending the streams instead: %s", why)
        return False

    def _store_lost(self, server: SSEServer, state: handover.State | None, why: str) -> None:
        """systemd did not confirm taking back what a failed store sent: it may still hold the streams, and may
        still store the state (its messages can sit in systemd's queue after we exit), which lists each stream's
        unsent bytes for the next start to send. So no byte may be written to any stream again, and nothing
        published here either (the state's id sequence must stay the last word): every stream gets a FIN
        without a byte (its client reconnects with Last-Event-ID), the writers let go, and we exit."""
        assert state is not None  # StoreFailed comes from store(), which needs one
        fdstore.shut_down([stream.fd for stream in state.streams])
        server.release(time.monotonic() + RETIRE_TIMEOUT)  # stays paused: publishes get 503, streams no writes
        log.error(
            "fd store failed and systemd did not confirm taking it back: ended %d stream(s) without writing, which"
            " reconnect: %s",
            len(state.streams),
            why,
        )

    def _remove_stale(self, deadline: float) -> bool:
        """Ask systemd again to remove the names this start was passed. True once it confirmed."""
        if fdstore.empty(self._stale, self.environ, deadline):
            log.info("restart: systemd removed the %d name(s) passed at start from its fd store", len(self._stale))
            self._stale = ()
        return not self._stale

    def _restore(self, passed: fdstore.Passed) -> tuple[handover.State | None, list[socket.socket], int]:
        """At start: the listener (a socket unit's, else the one a stop stored) and the state to adopt, with each
        stream's fd as passed to us; and the state's size. The store is emptied before anything is adopted (see
        fdstore.py); what is not adopted is closed, a stream with a FIN so that its client reconnects."""
        every = (*passed.listeners, *passed.listen, *passed.states, *passed.claims, *passed.stream_fds())
        for fd in (*every, *passed.unknown):
            os.set_inheritable(fd, False)
        # First of all: whatever happens next, the state passed here is never current again (see fdstore.claim()).
        current = fdstore.claim(passed.claims)
        listeners = list(passed.listeners) or list(passed.listen[:1])
        # A stored listener next to a socket unit's is that same socket (or one the unit replaced): not ours to use.
        fdstore.close([*(fd for fd in passed.listen if fd not in listeners), *passed.claims, *passed.unknown])
        inherited = [socket.socket(fileno=fd) for fd in listeners]
        if inherited and not passed.listeners:
            self._warn_if_moved(inherited[0])
        if not passed.stored:
            return None, inherited, 0
        blobs = [handover.read_fd(fd) for fd in passed.states]
        fdstore.close(passed.states)
        emptied = fdstore.empty(passed.stored, self.environ, time.monotonic() + self.config.upgrade_timeout)
        if not emptied:
            self._stale = passed.stored  # the control loop asks again until systemd confirms
        state: handover.State | None = None
        why = None
        if not blobs:
            why = "no state was stored with them"
        elif len(blobs) > 1:
            why = f"{len(blobs)} states were stored, and which one is current cannot be told"
        elif not current:
            why = (
                "the state was taken by an earlier start already, which could not remove it from the fd store"
                if passed.claims
                else "no claim was stored with the state"
            )
        elif not emptied:
            why = "systemd did not confirm removing them from its fd store (after a crash they could be adopted twice)"
        elif self.config.history_file or self.config.redis_url:
            why = "history_file or redis_url is set (a restart with either does not keep streams)"
        else:
            try:
                state = handover.decode(blobs[0])
            except handover.HandoverError as exc:
                why = str(exc)
        # fd in the stopping process -> fd here. Two sockets under one name: which one the state describes cannot
        # be told, so neither is adopted.
        named = collections.Counter(old for old, _ in passed.streams)
        unclaimed = {old: fd for old, fd in passed.streams if named[old] == 1}
        ambiguous = [fd for old, fd in passed.streams if named[old] > 1]
        if state is not None:
            kept = tuple(
                dataclasses.replace(stream, fd=unclaimed.pop(stream.fd))
                for stream in state.streams
                if stream.fd in unclaimed
            )
            listen_fd = inherited[0].fileno() if inherited else -1
            state = dataclasses.replace(state, listen_fd=listen_fd, streams=kept)
        if why is not None:
            log.error("restart: ending %d stored stream(s), which reconnect: %s", len(unclaimed), why)
        elif unclaimed:
            log.warning("restart: ending %d stored stream(s) the state does not describe", len(unclaimed))
        if ambiguous:
            log.warning("restart: ending %d stored stream(s) that share a name with another", len(ambiguous))
        for fd in (*unclaimed.values(), *ambiguous):
            fdstore.hang_up(fd)
        return state, inherited, sum(len(blob) for blob in blobs)

    def _warn_if_moved(self, listener: socket.socket) -> None:
        """The stored listener is served as it is: a host or port changed in the config since it was bound takes
        a start without it to apply (systemd empties the store when the service stops). Say so once."""
        host, port = listener.getsockname()[:2]
        wanted_port = self.config.port
        try:
            wanted_hosts = {info[4][0] for info in socket.getaddrinfo(self.config.host, None, listener.family)}
        except OSError:
            wanted_hosts = set()
        if (wanted_port and wanted_port != port) or host not in wanted_hosts:
            log.warning(
                "restart: serving the listening socket from systemd's fd store on %s port %d; the configured %s"
                " port %d applies once the service is stopped and started (a restart keeps the stored socket)",
                host,
                port,
                self.config.host,
                wanted_port,
            )

    def _adopt_stored(self, server: SSEServer, state: handover.State, size: int, started: float) -> bool:
        """Take over the streams a stop left in the fd store (already emptied: nothing is written before). The time
        logged runs from `started`, before the store was emptied."""
        try:
            count = server.adopt(state)
        except (handover.HandoverError, OSError, ValueError) as exc:
            log.error("restart: cannot adopt the stored streams, exiting (they reconnect): %s", exc)
            return False
        log.info(
            "restart: adopted %d stream(s) and %d event(s) from systemd's fd store, ids continue after %d (%.0f ms,"
            " state %d bytes)",
            count,
            len(state.entries),
            state.sequence.last_id,
            (time.monotonic() - started) * 1000,
            size,
        )
        return True

    def _reload(self, server: SSEServer) -> None:
        if self._drain_thread is not None:
            return
        if self.config_path is None:
            log.warning("reload: no config file was given at start; nothing to reload")
            return
        systemd.notify(
            f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}", self.environ
        )
        try:
            new = config_module.load_layered(self.config_path, self.overrides)
            ignored = config_module.restart_keys_changed(self.config, new)
            if ignored:
                keep = {name: getattr(self.config, name) for name in ignored}
                new = config_module.from_mapping(keep, base=new)
            policy = Policy(new, previous=server.policy)  # reads token files: may fail, before any swap
        except config_module.ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            systemd.notify("READY=1", self.environ)
            return
        if ignored:
            log.warning("reload: %s cannot change without a restart; ignored", ", ".join(ignored))
        self.config = new
        server.apply(policy)
        logs.set_level(new.log_level)
        log.info("reloaded %s", self.config_path)
        systemd.notify(f"READY=1\nSTATUS={server.status()}", self.environ)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNAL_COMMANDS:
            signal.signal(signum, self._on_signal)
        self.events.wake_on_signals()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.events.put(SIGNAL_COMMANDS[signal.Signals(signum)])  # only this: no logging, no locks (see the top)

    def _healthy(self, server: SSEServer) -> bool:
        accept = self._accept_thread
        return accept is not None and accept.is_alive() and server.healthy()

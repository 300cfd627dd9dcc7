"""The daemon's life: start, serve, reload on SIGHUP, drain on SIGTERM/SIGINT, tell systemd at each step.

Owns: the only `import signal` in the package, the main thread's control loop, the accept thread, and the
process-wide setup (file-descriptor limit). Signal handlers only enqueue the signal number on a SimpleQueue
(reentrant-safe); everything else happens in the loop, on the main thread, where logging and locks are safe.
Must not know: HTTP or how events are delivered.

A run inside a test thread installs no signal handlers (they are process state, and Python only allows them on
the main thread); tests stop such a server with Daemon.request_stop().
"""

import enum
import logging
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Mapping

from . import config as config_module
from . import logs, systemd
from .access import Policy
from .config import Config
from .server import SSEServer

log = logging.getLogger("sseserver")


class Command(enum.Enum):
    """What the control loop is asked to do: the items of Daemon.events."""

    STOP = "stop"  # SIGTERM, SIGINT, request_stop(): drain and exit 0 (a second one: exit 1 at once)
    RELOAD = "reload"  # SIGHUP
    DRAINED = "drained"  # from the drain thread: every stream has ended, or the deadline passed


# What each handled signal asks for. A dict lookup is all a handler does besides the enqueue.
SIGNAL_COMMANDS = {signal.SIGTERM: Command.STOP, signal.SIGINT: Command.STOP, signal.SIGHUP: Command.RELOAD}


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
    ):
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})  # command-line keys, layered over the file again on each reload
        self.environ = environ
        self.events: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.server: SSEServer | None = None
        self.ready = threading.Event()  # set once listening (tests wait on it)
        self._accept_thread: threading.Thread | None = None
        self._drain_thread: threading.Thread | None = None

    # -- methods for the caller --------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped. Returns the process exit code."""
        soft, _ = raise_open_file_limit()
        try:
            policy = Policy(self.config)
        except config_module.ConfigError as exc:
            log.error("bad config: %s", exc)
            return 2
        inherited = systemd.listen_sockets(self.environ)
        try:
            self.server = SSEServer(policy, inherited[0] if inherited else None)
        except config_module.ConfigError as exc:  # history.HistoryFileError: unreadable, in use, or corrupt
            log.error("%s", exc)
            return 2
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc.strerror or exc)
            return 1
        server = self.server
        # Before the daemon announces itself (the log line, READY=1): whoever saw it may stop us at once, and
        # a SIGTERM must then drain and exit 0, not kill the process with the default action.
        self._install_signal_handlers()
        server.start()
        self._accept_thread = accept = threading.Thread(
            target=server.serve_forever, name="sseserver-accept", kwargs={"poll_interval": 0.5}, daemon=True
        )
        accept.start()
        host = server.server_address[0]
        shown = f"[{host!s}]" if ":" in str(host) else str(host)
        how = "inherited socket" if inherited else "bound"
        log.info("listening on http://%s:%d (%s; open-file limit %d)", shown, server.port, how, soft)
        self.ready.set()
        systemd.notify(f"READY=1\nSTATUS={server.status()}", self.environ)
        return self._control_loop(server)

    def request_stop(self) -> None:
        """Ask for a graceful stop from any thread (what SIGTERM does)."""
        self.events.put(Command.STOP)

    # -- the control loop ------------------------------------------------------------------------------------

    def _control_loop(self, server: SSEServer) -> int:
        watchdog = systemd.watchdog_interval(self.environ)
        tick = min(watchdog, 5.0) if watchdog else 5.0
        next_watchdog = time.monotonic()
        while True:
            try:
                command = self.events.get(timeout=tick)
            except queue.Empty:
                command = None
            if command is Command.STOP:
                if self._drain_thread is not None:
                    log.warning("second stop signal: exiting now without waiting for streams")
                    return 1
                self._begin_stop(server)
            elif command is Command.RELOAD:
                self._reload(server)
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

    def _begin_stop(self, server: SSEServer) -> None:
        """Shutdown, in order: (1) tell systemd and make /health say 503; (2) stop the accept loop and close the
        listener so a new connection is refused, not left hanging; (3) on another thread, let in-flight requests
        finish and end every stream with a jittered retry, within shutdown_timeout. The main thread keeps
        listening for a second signal, which exits at once."""
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("stopping: %d stream(s) to end within %gs", server.subscriber_count(), self.config.shutdown_timeout)
        systemd.notify("STOPPING=1", self.environ)
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
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.events.put(SIGNAL_COMMANDS[signal.Signals(signum)])  # only this: no logging, no locks (see the top)

    def _healthy(self, server: SSEServer) -> bool:
        accept = self._accept_thread
        return accept is not None and accept.is_alive() and server.healthy()

"""`systemctl restart` without disconnects: systemd's fd store keeps the sockets and the state while no process
runs (issue #12, item 2; the upgrade in place of item 1 is handover.py's).

Owns: the names stored descriptors get, sorting what systemd passes at start into roles (pure), pushing a stop's
sockets and state into the store (and taking them back when that fails), the claim that marks a state taken,
and emptying the store at the next start.
Must not know: HTTP, signals, config files. The state format and its sealed memfd are handover.py's (the same
State, encode()/decode() and version as an upgrade in place); sd_notify is systemd.py's; daemon.py drives the
steps and decides when the store is used at all.

A stop with a store (SIGTERM, and the unit sets FileDescriptorStoreMax=, which systemd >= 254 announces as
$FDSTORE): the server pauses and freezes its writers at an event boundary exactly as for an upgrade, then

    FDSTORE=1 FDNAME=sse-listen         the listening socket
    FDSTORE=1 FDNAME=sse-<fd>           one message per stream (its fd number, which the state records, names it)
    FDSTORE=1 FDNAME=sse-claim          one byte in an unsealed memfd: "0", until a start is passed it (claim())
    FDSTORE=1 FDNAME=sse-state          the sealed memfd, last: a store without it holds no hand-over
    BARRIER=1                           systemd has taken all of it; only then do we exit 0

and the next start finds them in LISTEN_FDS/LISTEN_FDNAMES, after any socket unit's listeners. Its first act is
to write "1" into the claim: systemd's copy is the same memfd, so whoever is passed this state later knows it is
stale, whatever happened to the removes. It removes every stored name from the store (FDSTOREREMOVE=1, then a
barrier) *before* it writes a byte to any stream, and only then adopts: a process that crashes after writing can
never leave a state behind for its successor to deliver a second time, and a stream the new process ends gets
its FIN (a socket whose copy systemd still held would not). So the store is empty while a process serves; only a
stopping process fills it. When systemd does not confirm the removal in time (too busy to read its queue), the
start adopts nothing and daemon.py asks again until it does, storing nothing itself meanwhile.

A store that fails is taken back (FDSTOREREMOVE=1 for what was sent, the state first, then a barrier). Only a
barrier answered in time proves it: systemd handles its queue in order, so it then holds none of it. Without that
answer, the queued messages may be handled after the stopping process is gone, the state with each stream's
unsent bytes included: store() says so (StoreFailed.taken_back), and daemon.py then writes nothing more to any
stream (shut_down(): a FIN without a byte) nor takes a publish, so that the state stays true if it is adopted.

Why one message per stream: a message carries one FDNAME for all its descriptors, and systemd neither keeps
their order (it also drops duplicates) nor says which came in which message, so only a name of its own tells
the next process which stream in the state a descriptor is. SCM_RIGHTS's limit of 253 descriptors per message
therefore never applies. Names are at most 255 characters without ':' (systemd's rule), and short on purpose:
systemd passes all of them in one variable, LISTEN_FDNAMES, and Linux refuses to start a program with a variable
over 128 KiB (MAX_ARG_STRLEN), so a store the next start could not even be exec'd with would fail every start
until it is emptied. refusal() keeps a stop under that (about 12,000 streams with these names) and under
$FDSTORE; beyond either the stop drains. Names starting with "sse-" are ours: a socket unit must not use them
(its default name, the unit's, "sseserver.socket", does not). systemd drops a stored socket that reports a
hang-up or an error (a client gone meanwhile); the state's stream without a descriptor is then skipped, and one
whose client goes after that is dropped by its writer like any other. Also a limit of systemd's, not
measured here: it compares each descriptor it stores with every one it holds, so storing n streams costs it
n^2/2 comparisons; the stop waits for it only until upgrade_timeout, then takes everything back (see above).

Not stored, on purpose: with history_file or redis_url set the stop drains as before (daemon.py decides), as an
upgrade in place refuses then. A push that fails part way takes back what it stored and, once systemd confirmed
that, the stop drains.
"""

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence

from . import handover, systemd

log = logging.getLogger("sseserver")

PREFIX = "sse-"  # every name we store starts so; a socket unit's default name "sseserver.socket" does not
LISTEN = PREFIX + "listen"
STATE = PREFIX + "state"
CLAIM = PREFIX + "claim"  # see claim_memfd()
UNCLAIMED, CLAIMED = b"0", b"1"
# What one environment variable may hold (MAX_ARG_STRLEN), less room for a socket unit's names.
NAMES_LIMIT = 128 * 1024 - len("LISTEN_FDNAMES=") - 1 - 4096
TAKE_BACK_TIMEOUT = 1.0  # seconds for systemd to confirm that it dropped what a failed store() had sent


def capacity(environ: Mapping[str, str]) -> int:
    """How many descriptors the service's fd store holds: systemd (>= 254) sets $FDSTORE to FileDescriptorStoreMax
    when that is above 0; 0 means no store (an older systemd, no such line in the unit, or not under systemd)."""
    try:
        return max(0, int(environ.get("FDSTORE", "0")))
    except ValueError:
        return 0


def stream_name(fd: int) -> str:
    return f"{PREFIX}{fd}"


def names(state: handover.State) -> list[str]:
    """The names a stop stores, in the order it stores them: the listener, every stream, the claim, the state."""
    return [LISTEN, *(stream_name(stream.fd) for stream in state.streams), CLAIM, STATE]


def refusal(state: handover.State, room: int) -> str | None:
    """Why this state cannot go into a store of `room` descriptors, or None. Pure."""
    stored = names(state)
    if len(stored) > room:
        return f"the fd store holds {room} descriptors, {len(stored)} needed (FileDescriptorStoreMax=)"
    size = len(":".join(stored))
    if size > NAMES_LIMIT:
        return f"LISTEN_FDNAMES would be {size} bytes, which the next start could not be run with (limit {NAMES_LIMIT})"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Passed:
    """What systemd passed at start, by role. `stored` holds every name from our store, to be removed."""

    listeners: tuple[int, ...] = ()  # a socket unit's (any name not ours), in LISTEN_FDS order
    listen: tuple[int, ...] = ()  # stored listening sockets (one, normally)
    states: tuple[int, ...] = ()  # stored state memfds (one, normally)
    claims: tuple[int, ...] = ()  # their claims (one, normally)
    streams: tuple[tuple[int, int], ...] = ()  # (fd in the stopping process, fd here)
    unknown: tuple[int, ...] = ()  # our prefix, a name this code does not know (another version's): closed
    stored: tuple[str, ...] = ()

    def stream_fds(self) -> list[int]:
        return [fd for _, fd in self.streams]


def sort(passed: Sequence[tuple[int, str]]) -> Passed:
    """(fd, name) pairs from systemd.listen_fds() -> their roles. Pure."""
    listeners, listen, states, claims, streams, unknown, stored = [], [], [], [], [], [], []
    for fd, name in passed:
        if not name.startswith(PREFIX):
            listeners.append(fd)
            continue
        if name not in stored:
            stored.append(name)
        if name == LISTEN:
            listen.append(fd)
        elif name == STATE:
            states.append(fd)
        elif name == CLAIM:
            claims.append(fd)
        elif name[len(PREFIX) :].isdigit():
            streams.append((int(name[len(PREFIX) :]), fd))
        else:
            unknown.append(fd)
    return Passed(
        tuple(listeners), tuple(listen), tuple(states), tuple(claims), tuple(streams), tuple(unknown), tuple(stored)
    )


class StoreFailed(Exception):
    """store() did not complete. `taken_back`: systemd confirmed (a barrier answered in time) that it holds none
    of what was sent, so the stopping process may write to the streams again; False: it may still hold them,
    and the state may still be stored after this process exits, so nothing may be written to any stream."""

    def __init__(self, why: str, taken_back: bool):
        super().__init__(why)
        self.taken_back = taken_back


def store(state: handover.State, blob: bytes, environ: Mapping[str, str], deadline: float) -> None:
    """Push the listener, every stream, the claim and the state (as a sealed memfd) into the fd store and wait
    until systemd has taken them. StoreFailed (a send failed, no NOTIFY_SOCKET, the deadline, or anything else):
    what was sent is taken back, and `taken_back` says whether systemd confirmed that."""
    pushed: list[str] = []
    try:
        channel = systemd.Channel(environ, deadline)
    except OSError as exc:  # nothing was sent
        raise StoreFailed(f"{type(exc).__name__}: {exc}", True) from exc
    with channel:
        try:
            channel.send(f"FDSTORE=1\nFDNAME={LISTEN}", [state.listen_fd])
            pushed.append(LISTEN)
            for stream in state.streams:
                name = stream_name(stream.fd)
                channel.send(f"FDSTORE=1\nFDNAME={name}", [stream.fd])
                pushed.append(name)
            for name, make in ((CLAIM, claim_memfd), (STATE, lambda: handover.sealed_memfd(blob))):
                memfd = make()
                try:
                    channel.send(f"FDSTORE=1\nFDNAME={name}", [memfd])
                finally:
                    os.close(memfd)  # systemd holds its own copy now
                pushed.append(name)
            channel.barrier()
        except Exception as exc:  # a datagram whose send raised was not queued: `pushed` is all systemd may hold
            taken_back = not pushed or _take_back(channel, pushed[::-1])  # the state first: nothing adopted without
            raise StoreFailed(f"{type(exc).__name__}: {exc}", taken_back) from exc


def _take_back(channel: systemd.Channel, names: Sequence[str]) -> bool:
    """FDSTOREREMOVE=1 for each name, then a barrier: True only when systemd answered it, which it does after it
    has handled every message queued before (the store's own included), so that nothing sent is left."""
    channel.deadline = time.monotonic() + TAKE_BACK_TIMEOUT  # the store's own may have passed
    try:
        for name in names:
            channel.send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        channel.barrier()
    except OSError as exc:
        log.debug("fd store: taking back %d name(s) failed: %s", len(names), exc)
        return False
    return True


def empty(names: Sequence[str], environ: Mapping[str, str], deadline: float) -> bool:
    """Remove these names from the store and wait until systemd has. True when done (or nothing to do: no
    NOTIFY_SOCKET means no store reached us); False when systemd may still hold them (call again: removing a
    name that is gone already is harmless). The state goes first, so that a partial removal adopts nothing."""
    if not names:
        return True
    ordered = sorted(names, key=lambda name: (name != STATE, name != CLAIM))
    try:
        with systemd.Channel(environ, deadline) as channel:
            for name in ordered:
                channel.send(f"FDSTOREREMOVE=1\nFDNAME={name}")
            channel.barrier()
    except OSError as exc:
        if environ.get("NOTIFY_SOCKET"):
            log.debug("fd store: removing %d name(s) failed: %s", len(names), exc)
            return False
    return True


def claim_memfd() -> int:
    """The claim: one byte, UNCLAIMED, in a memfd that is not sealed. The first start that is passed it writes
    CLAIMED into it, before anything else; systemd's copy is the same file, so a start that finds it CLAIMED knows
    the state next to it was taken (or refused) before, by a process that could not remove it from the store."""
    fd = os.memfd_create("sseserver-claim", os.MFD_CLOEXEC)
    try:
        os.pwrite(fd, UNCLAIMED, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def claim(fds: Sequence[int]) -> bool:
    """Mark every passed claim CLAIMED. True when there was exactly one and nobody had claimed it before: the
    state stored with it is current. Never raises (a claim that cannot be read or written counts as taken)."""
    fresh = []
    for fd in fds:
        try:
            fresh.append(os.pread(fd, 1, 0) == UNCLAIMED)
            os.pwrite(fd, CLAIMED, 0)
        except OSError:
            fresh.append(False)
    return fresh == [True]


def shut_down(fds: Sequence[int]) -> None:
    """End these streams without writing and without closing them (their owner closes them later): FIN now,
    which reaches the client even while systemd may still hold a copy of the socket."""
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()


def hang_up(fd: int) -> None:
    """A stored stream that is not adopted: FIN now (shutdown() reaches the client even while some other copy of
    the socket is still open), then close. Its client reconnects with Last-Event-ID. Never writes: the stopping
    process may have left the stream inside an event."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket (the store held something else under a stream's name)
        os.close(fd)
        return
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

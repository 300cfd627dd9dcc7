"""The bouncer: event ids, the shared event ring, subscribers' places in it, and who gets dropped.

Owns: the id sequence; one ring of recent events that serves both as replay history and as every subscriber's
backlog; the subscriber registry and its counts; the replay decision for a Last-Event-ID; the rule that a
subscriber more than `queue_size` events behind is dropped.
Must not know: HTTP, sockets, threads other than its own lock. publish() never blocks on a subscriber.

Why a ring and cursors instead of one queue per subscriber (the blog post's design): a publish then costs the
same with 10 or 20,000 subscribers (append once, encode once), a subscriber's backlog is simply
`head - cursor`, and replay is nothing more than a cursor placed in the past, so the hand-over from replay to
live events has no window in which an event could be missed or sent twice. The ring holds
`history_size + queue_size` events: the newest `history_size` are replayable, and a subscriber can fall at most
`queue_size` events behind before it is dropped, so nothing a live subscriber still needs is ever evicted.

Positions (`pos`) count events appended to this process's ring, from 0. Ids are what clients see; they are
strictly increasing but need not be contiguous (a shared id sequence may skip), so replay finds positions by id.
"""

import json
import threading
import time
from collections.abc import Callable

from . import framing


class Event:
    __slots__ = ("pos", "id", "name", "data", "wire", "published_ns")

    def __init__(self, pos: int, event_id: int, name: str, data: str, wire: bytes, published_ns: int):
        self.pos = pos
        self.id = event_id
        self.name = name  # "message" for unnamed events, as a browser sees them
        self.data = data
        self.wire = wire  # the complete event block, encoded once for every subscriber
        self.published_ns = published_ns


class Ring:
    """A fixed array of event slots indexed by pos % capacity. Replaced, never resized, so a reader that took a
    reference keeps a consistent view; a slot whose event has the wrong pos has been overwritten (evicted)."""

    __slots__ = ("capacity", "slots")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots: list[Event | None] = [None] * capacity

    def get(self, pos: int) -> Event | None:
        event = self.slots[pos % self.capacity]
        return event if event is not None and event.pos == pos else None


class Subscriber:
    """One open stream's place in the ring. The bouncer sets it up; the delivery layer moves its cursor."""

    __slots__ = (
        "names", "cursor", "live_from", "scan", "backlog", "sock", "out", "last_write", "last_id_sent",
        "peer", "started", "events_sent", "reason",
    )

    def __init__(self, names: frozenset | None, cursor: int, live_from: int, peer: str = ""):
        self.names = names  # None = every event
        self.cursor = cursor  # pos of the next event not yet handed to the socket
        self.live_from = live_from  # events before this pos are replay and never count as backlog
        self.scan = cursor  # while blocked: how far `backlog` has been counted
        self.backlog = 0  # while blocked: matching live events waiting behind the socket
        self.sock = None
        self.out = None  # bytes the socket has not yet taken
        self.last_write = time.monotonic()
        self.last_id_sent = None
        self.peer = peer
        self.started = time.monotonic()
        self.events_sent = 0
        self.reason = None  # why the stream ended


class Replay:
    """What a new subscriber starts with: its place in the ring, and the reset notice when its Last-Event-ID
    could not be honoured."""

    __slots__ = ("subscriber", "reset")

    def __init__(self, subscriber: Subscriber, reset: bytes | None):
        self.subscriber = subscriber
        self.reset = reset


def _bump(counts: dict, key, delta: int) -> None:
    """Add delta to counts[key], deleting keys that reach 0 so the dicts only hold live entries."""
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)


def parse_event_id(text: str) -> int | None:
    """A Last-Event-ID as an integer, or None when it is not one of our ids (ASCII digits only)."""
    if text and len(text) <= 20 and text.isascii() and text.isdigit():
        return int(text)
    return None


class StoreError(Exception):
    """The durable history could not store an event: it must not be acknowledged."""


class Bouncer:
    def __init__(self, history_size: int, queue_size: int, first_id: int = 1, store=None):
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # ingest() -> wait_for_id()
        self._history_size = history_size
        self._queue_size = queue_size
        self.ring = Ring(history_size + queue_size)
        self.head = 0  # pos the next event will take; read without the lock by the delivery layer
        self._next_id = first_id
        self._total = 0
        self._unfiltered = 0
        self._by_name: dict[str, int] = {}
        self._by_peer: dict[str, int] = {}
        self._pattern_filters: dict = {}
        self._listeners: list[Callable[[], None]] = []
        self.published = 0  # events published by this process (metrics)
        self.resets = 0  # replays that began with a reset notice (metrics)
        self._store = store  # a history.HistoryFile, or None: history lives in memory only
        if store is not None:
            store.on_compact(self._compact)

    # -- methods for the caller ---------------------------------------------------------------------------

    @property
    def queue_size(self) -> int:
        return self._queue_size

    @property
    def subscriber_count(self) -> int:
        return self._total

    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def retained(self) -> int:
        """How many events replay can reach right now."""
        return self.head - self._oldest_pos(self.head)

    def on_publish(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every publish, outside the lock. It must not block."""
        self._listeners.append(listener)

    def resize(self, history_size: int, queue_size: int) -> None:
        """Apply new history/queue sizes (a reload). Keeps every event the new ring has room for."""
        with self._lock:
            ring = Ring(history_size + queue_size)
            for pos in range(max(0, self.head - ring.capacity), self.head):
                event = self.ring.get(pos)
                if event is not None:
                    ring.slots[pos % ring.capacity] = event
            self.ring = ring
            self._history_size, self._queue_size = history_size, queue_size

    def ingest(self, event_id: int, name: str, data: str) -> bool:
        """Append an event whose id was assigned elsewhere (the shared Redis stream), in that stream's order.
        An id not above the last one is a repeat (a follower resuming) and is ignored: False."""
        body = framing.encode_event(data, None, name)
        with self._lock:
            if event_id < self._next_id:
                return False
            pos = self.head
            self.ring.slots[pos % self.ring.capacity] = Event(
                pos, event_id, name, data, b"id: %d\n" % event_id + body, time.monotonic_ns())
            self.head = pos + 1
            self._next_id = event_id + 1
            self.published += 1
            self._arrived.notify_all()
        for listener in self._listeners:
            listener()
        return True

    def wait_for_id(self, event_id: int, timeout: float) -> bool:
        """Wait until the event with this id (or a later one) is here; False on timeout."""
        with self._lock:
            return self._arrived.wait_for(lambda: self._next_id > event_id, timeout)

    def queued_for(self, name: str) -> int:
        """How many streams here would receive an event of this name."""
        with self._lock:
            return self._count_locked(name)

    def restore(self, stored) -> None:
        """Load events read back from durable history (oldest first): the newest become replayable and ids
        continue after the last one."""
        with self._lock:
            for item in stored[-self._history_size:] if self._history_size else []:
                body = framing.encode_event(item.data, None, item.name)
                pos = self.head
                self.ring.slots[pos % self.ring.capacity] = Event(
                    pos, item.id, item.name, item.data, b"id: %d\n" % item.id + body, time.monotonic_ns())
                self.head = pos + 1
            if stored:
                self._next_id = max(self._next_id, stored[-1].id + 1)

    def publish(self, data: str, name: str = "message") -> tuple[Event, int]:
        """Append an event and return it with the number of subscribers it was queued for. Never blocks on a
        subscriber: delivery happens elsewhere, after the listeners are told. With durable history the record
        is written under the lock (file order is id order) and fsynced after it, before anyone hears of the
        event; StoreError means it was not stored and must not be acknowledged."""
        body = framing.encode_event(data, None, name)  # encode outside the lock; only the id goes in under it
        now = time.monotonic_ns()
        ticket = 0
        with self._lock:
            event_id = self._next_id
            if self._store is not None:
                try:
                    ticket = self._store.append(event_id, name, data)
                except OSError as exc:
                    raise StoreError(f"could not write the history file: {exc.strerror or exc}") from None
            self._next_id += 1
            self.published += 1
            pos = self.head
            event = Event(pos, event_id, name, data, b"id: %d\n" % event_id + body, now)
            self.ring.slots[pos % self.ring.capacity] = event
            self.head = pos + 1
            count = self._count_locked(name)
        if ticket:
            try:
                self._store.sync(ticket)
            except OSError as exc:
                raise StoreError(f"could not fsync the history file: {exc.strerror or exc}") from None
        for listener in self._listeners:
            listener()
        return event, count

    def subscribe(self, names, last_event_id: str | None, peer: str = "", limit: int | None = None,
                  per_peer_limit: int = 0) -> Replay | str:
        """Register a subscriber, or say why not ("full", or "peer full" when `peer` already has
        `per_peer_limit` streams). `names` is None (every event), a frozenset of names, or any other object
        supporting `in` and hashing (a pattern filter). With a Last-Event-ID the cursor starts just after that
        id, so replay and live events come from the same ring in one pass; an id we cannot place gets a reset
        notice and everything retained."""
        with self._lock:
            if limit is not None and self._total >= limit:
                return "full"
            if per_peer_limit and self._by_peer.get(peer, 0) >= per_peer_limit:
                return "peer full"
            head = self.head
            oldest = self._oldest_pos(head)
            reset = None
            if last_event_id is None:
                cursor = head
            else:
                cursor = self._replay_start(last_event_id, oldest, head)
                if cursor is None:
                    self.resets += 1
                    reset = self._reset_notice(last_event_id, oldest, head)
                    cursor = oldest
            subscriber = Subscriber(names, cursor, head, peer)
            self._total += 1
            _bump(self._by_peer, peer, 1)
            if names is None:
                self._unfiltered += 1
            elif isinstance(names, frozenset):
                for name in names:
                    _bump(self._by_name, name, 1)
            else:
                _bump(self._pattern_filters, names, 1)
        return Replay(subscriber, reset)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._total -= 1
            _bump(self._by_peer, subscriber.peer, -1)
            names = subscriber.names
            if names is None:
                self._unfiltered -= 1
            elif isinstance(names, frozenset):
                for name in names:
                    _bump(self._by_name, name, -1)
            else:
                _bump(self._pattern_filters, names, -1)

    def history(self) -> list[Event]:
        """The replayable events, oldest first."""
        with self._lock:
            head = self.head
            return [event for pos in range(self._oldest_pos(head), head) if (event := self.ring.get(pos)) is not None]

    def _compact(self) -> None:
        """Rewrite the history file to the retained events (called on the history thread). The bulk is written
        without the lock; only events published meanwhile are appended under it, with the file swap."""
        kept = self.history()
        head = kept[-1].pos + 1 if kept else self.head  # finish() appends everything from here on

        def finish(write_rest) -> None:
            with self._lock:
                write_rest([event for pos in range(head, self.head) if (event := self.ring.get(pos)) is not None])

        self._store.compact(lambda: kept, finish)

    # -- used by the delivery layer (lock-free: it reads a ring reference and immutable events) ---------------

    def collect(self, ring: Ring, cursor: int, head: int, names, limit: int = 1 << 20):
        """The wire bytes of events from `cursor` that `names` accepts, stopping at `head` or once `limit`
        bytes are gathered (so a long replay of large events never becomes one huge buffer). Returns
        (bytes, how many events, id of the last one or 0, the pos to continue from), or None when an event in
        that range has already been evicted."""
        chunks = []
        last_id = size = 0
        for pos in range(cursor, head):
            event = ring.slots[pos % ring.capacity]
            if event is None or event.pos != pos:
                return None
            if names is None or event.name in names:
                chunks.append(event.wire)
                last_id = event.id
                size += len(event.wire)
                if size >= limit:
                    return b"".join(chunks), len(chunks), last_id, pos + 1
        return b"".join(chunks), len(chunks), last_id, head

    def is_slow(self, ring: Ring, sub: Subscriber, head: int) -> bool:
        """True when a blocked subscriber has more than queue_size live events waiting, or when events it still
        needs have left the ring. Counts incrementally, so each event is looked at once per subscriber."""
        if sub.cursor < head - ring.capacity:
            return True
        start = max(sub.scan, sub.live_from)
        if sub.names is None:
            sub.backlog += max(0, head - start)
        else:
            for pos in range(start, head):
                event = ring.get(pos)
                if event is None:
                    return True
                if event.name in sub.names:
                    sub.backlog += 1
        sub.scan = head
        return sub.backlog > self._queue_size

    # -- internals ------------------------------------------------------------------------------------------

    def _count_locked(self, name: str) -> int:
        count = self._unfiltered + self._by_name.get(name, 0)
        for pattern_filter, subscribers in self._pattern_filters.items():  # token scopes: few distinct ones
            if name in pattern_filter:
                count += subscribers
        return count

    def _oldest_pos(self, head: int) -> int:
        return max(0, head - self._history_size, head - self.ring.capacity)

    def _replay_start(self, last_event_id: str, oldest: int, head: int) -> int | None:
        """The pos just after `last_event_id`, when every event after it is still retained."""
        wanted = parse_event_id(last_event_id)
        if wanted is None or wanted > self.last_id:
            return None  # not ours, or from before a restart that reset the sequence: a reset, not silence
        if oldest == head:  # nothing retained: fine only if the client has seen the very last id
            return head if wanted == self.last_id else None
        first = self.ring.get(oldest)
        if wanted < first.id - 1:
            return None  # events between the client's id and our oldest are gone
        low, high = oldest, head  # first pos whose id is greater than `wanted`
        while low < high:
            middle = (low + high) // 2
            if self.ring.get(middle).id > wanted:
                high = middle
            else:
                low = middle + 1
        return low

    def _reset_notice(self, last_event_id: str, oldest: int, head: int) -> bytes:
        first = self.ring.get(oldest) if oldest < head else None
        oldest_id = str(first.id) if first else None
        payload = json.dumps({"last_event_id": last_event_id, "oldest_id": oldest_id})
        # The id moves the browser's cursor to just before the replay, so a reconnect during the replay does not
        # trigger a second reset and a second full replay.
        cursor_id = first.id - 1 if first else self.last_id
        return framing.encode_event(payload, cursor_id, "sseserver.reset")

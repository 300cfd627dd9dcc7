"""The bouncer: event ids, the shared event ring, subscribers' places in it, and who gets dropped.

Owns: the id sequence; one ring of recent events that serves both as replay history and as every subscriber's
backlog; the subscriber registry and its counts; the replay decision for a Last-Event-ID; the slow rule (a
subscriber more than `queue_size` publishes behind is dropped; a batch is one publish); publishing a batch as
consecutive ids in one step.
Must not know: HTTP, sockets, threads other than its own lock. publish() never blocks on a subscriber.

Why a ring and cursors instead of one queue per subscriber (the blog post's design): a publish then costs the
same with 10 or 20,000 subscribers (append once, encode once), a subscriber's backlog is simply
`head - cursor`, and replay is nothing more than a cursor placed in the past, so the hand-over from replay to
live events has no window in which an event could be missed or sent twice. The ring holds
`history_size + queue_size` events: the newest `history_size` are replayable, and a subscriber can fall at most
`queue_size` publishes behind before it is dropped.

Bursts (a batch publish): the slow rule counts publishes, not events, because a batch arrives all at once and a
healthy subscriber whose socket was momentarily full would otherwise be dropped by every batch larger than
queue_size. The events of a burst must still be in the ring while such a subscriber takes them, so the ring also
keeps, beyond the newest `history_size + queue_size`, older events up to BURST_ROOM events and `room_bytes` bytes
of their encoded form (the server passes 4 x max_batch_bytes: the most an encoded batch takes). Older ones are
released at once (_trim_room_locked), so memory stays bounded by (history_size + queue_size) events plus that
room, whatever is published. A subscriber that needs a released event is dropped as slow.

Positions (`pos`) count entries appended to this process's ring, from 0. Ids are what clients see; they are
strictly increasing but need not be contiguous (a shared id sequence may skip), so replay finds positions by id.

Ids are unique across the daemon's lifetimes, not only within one process: a lifetime's first id is
max(the last stored id + 1, the wall clock in microseconds), so an in-memory daemon that restarts never hands out
an id a client may still hold from before (at the ~20,000 publishes/s a process sustains, ids trail the clock by
far more than any restart takes). Every event also knows its predecessor (`prev_id`, the id of the event just
before it in the sequence, or the lifetime's origin `first id - 1`), and replay is exact-match: a Last-Event-ID
is honoured only when it is an id this ring holds or the predecessor of the oldest entry. Anything else (an id
from an earlier lifetime, one between two ids we hold, one from the future, garbage) gets a reset notice.

A gap in the sequence (events that never reached this ring: a shared stream that lost entries) is an entry of
its own, a notice: a ready-made `sseserver.reset` block that every stream receives whatever its filter, and that
replay across the spot includes, so no stream crosses a gap in silence.
"""

import enum
import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from . import framing
from .errors import StoreError
from .idempotency import Stamp, wall_ms

if TYPE_CHECKING:  # only the type: the server hands the store in, and nothing here imports history at run time
    from .history import HistoryFile


RESET_EVENT = "sseserver.reset"
# The most events one batch may hold, and the ring's room beyond history_size + queue_size for streams still
# taking a burst (see "Bursts" above).
BURST_ROOM = 10_000


class NameFilter(Protocol):
    """A stream's filter: a frozenset of names, or another hashable object supporting `in` (a token scope's
    patterns, access.EventFilter)."""

    def __contains__(self, name: str, /) -> bool: ...

    def __hash__(self) -> int: ...


EventNames = NameFilter | None  # None: every event


class Event:
    """One ring entry: an event, or (notice=True) a gap notice that stands between two events."""

    __slots__ = ("pos", "id", "prev_id", "name", "data", "wire", "published_ns", "notice", "batch", "key")

    def __init__(
        self,
        pos: int,
        event_id: int,
        prev_id: int,
        name: str,
        data: str,
        wire: bytes,
        published_ns: int,
        notice: bool = False,
        batch: int = 0,
        key: Stamp | None = None,
    ):
        self.pos = pos
        # A notice carries the id of the event before the gap: a stream that has passed it has still seen no
        # later id, and replay from that id starts at the notice (the binary search finds the event first).
        self.id = event_id
        self.prev_id = prev_id  # the id just before this entry in the sequence
        self.name = name  # "message" for unnamed events, as a browser sees them
        self.data = data
        self.wire = wire  # the complete block, encoded once for every subscriber
        self.published_ns = published_ns
        self.notice = notice
        self.batch = batch  # the publish it came in (a single event or a batch): the slow rule counts these
        self.key = key  # its idempotency key, written into its history record


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

    def held(self, pos: int) -> Event:
        """The entry at `pos`, which the caller knows is retained (a pos in the bouncer's range, under its lock)."""
        event = self.slots[pos % self.capacity]
        assert event is not None and event.pos == pos, f"pos {pos} is not retained"
        return event


class Subscriber:
    """One open stream as the bouncer counts it: its filter, its client address, and where in the ring it starts.
    The delivery layer reads from there on (delivery.Stream keeps the moving cursor) and hands it back to
    unsubscribe() when the stream ends."""

    __slots__ = ("names", "cursor", "live_from", "peer")

    def __init__(self, names: "EventNames", cursor: int, live_from: int, peer: str = ""):
        self.names = names  # None = every event
        self.cursor = cursor  # pos of the first entry to send
        self.live_from = live_from  # entries before this pos are replay and never count toward the slow rule
        self.peer = peer


class Refusal(enum.Enum):
    """Why subscribe() registered no stream; the value says it in words."""

    FULL = "too many subscribers"
    PEER_FULL = "too many streams from this address"
    UPGRADING = "upgrading in place; reconnect"  # a request that raced with the hand-over (handover.py)


class Replay:
    """What a new subscriber starts with: its place in the ring, and the reset notice when its Last-Event-ID
    could not be honoured."""

    __slots__ = ("subscriber", "reset")

    def __init__(self, subscriber: Subscriber, reset: bytes | None):
        self.subscriber = subscriber
        self.reset = reset


class Page:
    """What GET /history answers: the events after a cursor (oldest first, at most a limit), the cursor to ask
    from next time, and `reset`: the client missed events (its id could not be honoured, or a gap lies in
    the range), with the same rule as a stream's sseserver.reset. `end` is the pos the scan reached."""

    __slots__ = ("events", "oldest_id", "last_id", "reset", "end")

    def __init__(self, events: list[Event], oldest_id: int | None, last_id: int, reset: bool, end: int):
        self.events = events
        self.oldest_id = oldest_id
        self.last_id = last_id
        self.reset = reset
        self.end = end


class Draft:
    """An event a publisher asks for, before it has an id: its name and data, and its idempotency key (already
    scoped to the publisher) with the fingerprint of name and data, or None for both."""

    __slots__ = ("name", "data", "key", "fingerprint")

    def __init__(self, name: str, data: str, key: str | None = None, fingerprint: bytes | None = None):
        self.name = name
        self.data = data
        self.key = key
        self.fingerprint = fingerprint


class Published:
    """What publishing a list of drafts did: the events it added (`count` of them, with consecutive ids from
    `first_id`, None when none), the most streams here any one was queued for, and for each draft that was a
    duplicate (by its index) the Stamp of the original publish, whose reply it gets."""

    __slots__ = ("first_id", "count", "subscribers", "duplicates")

    def __init__(self, first_id: int | None, count: int, subscribers: int, duplicates: dict[int, Stamp]):
        self.first_id = first_id
        self.count = count
        self.subscribers = subscribers
        self.duplicates = duplicates


def _sequenced(
    event_id: int,
    prev_id: int,
    name: str,
    data: str,
    body: bytes,
    now_ns: int,
    batch: int = 0,
    key: Stamp | None = None,
) -> Event:
    """An event with its place in the sequence, as the ring holds it: the block every stream gets, encoded once,
    with its id line in front. Its pos is set when it is appended."""
    return Event(-1, event_id, prev_id, name, data, b"id: %d\n" % event_id + body, now_ns, False, batch, key)


def adopted_entry(
    pos: int,
    event_id: int,
    prev_id: int,
    name: str,
    data: str,
    published_ns: int,
    batch: int,
    notice_wire: bytes | None,
) -> Event:
    """A ring entry carried over from the previous process (an upgrade in place): an event is encoded again
    here; a gap notice keeps the bytes it had."""
    if notice_wire is not None:
        event = Event(-1, event_id, prev_id, name, data, notice_wire, published_ns, True, batch)
    else:
        body = framing.encode_event(data, None, name)
        event = _sequenced(event_id, prev_id, name, data, body, published_ns, batch)
    event.pos = pos
    return event


def _gap_entry(last_id: int, next_id: int, now_ns: int, batch: int = 0) -> Event:
    """The ring entry that stands where events are missing between `last_id` and `next_id`: a notice carrying
    the id before the gap (see Event). `batch`: the publish of the event after it, so it adds none to count."""
    return Event(-1, last_id, last_id, RESET_EVENT, "", _gap_notice(last_id, next_id), now_ns, True, batch)


class Waiter:
    """One held long poll: what it waits for, and the flag that wakes it."""

    __slots__ = ("names", "woken")

    def __init__(self, names: EventNames):
        self.names = names
        self.woken = threading.Event()


class Waiters:
    """The held long polls, indexed so an append wakes only those whose filter accepts it: by name for plain
    name sets, a list for waiters of everything, and a list for pattern filters (token scopes), which must be
    asked. Used under the bouncer's lock."""

    def __init__(self) -> None:
        self._by_name: dict[str, set[Waiter]] = {}
        self._everything: set[Waiter] = set()
        self._patterns: set[Waiter] = set()

    def __len__(self) -> int:
        return len(self._everything) + len(self._patterns) + len({w for ws in self._by_name.values() for w in ws})

    def __bool__(self) -> bool:
        return bool(self._everything or self._patterns or self._by_name)

    def add(self, waiter: Waiter) -> None:
        names = waiter.names
        if names is None:
            self._everything.add(waiter)
        elif isinstance(names, frozenset):
            for name in names:
                self._by_name.setdefault(name, set()).add(waiter)
        else:
            self._patterns.add(waiter)

    def remove(self, waiter: Waiter) -> None:
        names = waiter.names
        if names is None:
            self._everything.discard(waiter)
        elif isinstance(names, frozenset):
            for name in names:
                waiting = self._by_name.get(name)
                if waiting is not None:
                    waiting.discard(waiter)
                    if not waiting:
                        del self._by_name[name]
        else:
            self._patterns.discard(waiter)

    def wake_for(self, event: "Event") -> None:
        if event.notice:  # a gap: every poll answers with reset
            self.wake_all()
            return
        for waiter in self._everything:
            waiter.woken.set()
        for waiter in self._by_name.get(event.name, ()):
            waiter.woken.set()
        for waiter in self._patterns:
            if event.name in waiter.names:  # type: ignore[operator]
                waiter.woken.set()

    def wake_all(self) -> None:
        for waiter in (*self._everything, *self._patterns, *(w for ws in self._by_name.values() for w in ws)):
            waiter.woken.set()


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


def ring_capacity(history_size: int, queue_size: int) -> int:
    """Slots for the newest history_size + queue_size, the room for bursts, and one more burst: the slots a publish
    of up to BURST_ROOM events overwrites are then always ones the room has already released, so the room's byte
    count stays exact and nothing is counted twice (see _trim_room_locked)."""
    return history_size + queue_size + 2 * BURST_ROOM


def lifetime_first_id() -> int:
    """The first id of a process lifetime with nothing stored before it: the wall clock in microseconds."""
    return time.time_ns() // 1000


class Bouncer:
    def __init__(
        self,
        history_size: int,
        queue_size: int,
        first_id: int | None = None,
        store: "HistoryFile | None" = None,
        room_bytes: int = 0,
    ):
        """`first_id` None: ids start from the clock (lifetime_first_id); a shared sequence (Redis) passes 1 and
        ingests ids assigned elsewhere. `room_bytes`: encoded bytes the ring keeps beyond history_size +
        queue_size events for streams still taking a burst (see "Bursts" above)."""
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # ingest() -> wait_for_id()
        self._history_size = history_size
        self._queue_size = queue_size
        self.ring = Ring(ring_capacity(history_size, queue_size))
        self.head = 0  # pos the next entry will take; read without the lock by the delivery layer
        self._first_pos = 0  # no entry below this pos exists (a ring resized larger holds nothing older)
        # The room for bursts: entries in [_room_from, _room_to) are older than the newest history_size +
        # queue_size and are counted in _room_held (bytes); _trim_room_locked() releases the oldest beyond it.
        self._room_bytes = room_bytes
        self._room_from = self._room_to = self._room_held = 0
        self._batches = 0  # publishes so far (a batch is one): Event.batch
        self._ingested_batch: bytes | None = None  # the batch mark of the entry ingest() took last
        self._next_id = lifetime_first_id() if first_id is None else first_id
        # The predecessor of this lifetime's first event: an id no event has (None once history was restored).
        self._origin: int | None = self._next_id - 1
        self._last_id = self._origin  # the newest id in the sequence
        self._has_events = False
        # A client was told it has everything up to the origin while nothing was here (a Last-Event-ID equal to
        # _last_id at an empty instance): the first event ingested must then show a gap its predecessor reveals.
        self._origin_promised = False
        self._unfiltered = 0
        self._total = 0
        self._by_name: dict[str, int] = {}
        self._by_peer: dict[str, int] = {}
        self._pattern_filters: dict = {}
        self._listeners: list[Callable[[], None]] = []
        self._keys_stored: Callable[[list[Stamp]], None] | None = None  # see on_keys_stored()
        # With fsync "always", events written but not yet on disk wait here (id order) until their fsync
        # succeeds; only then do they enter the ring, so a failed fsync leaves nothing to deliver or replay.
        self._unsynced: list[tuple[int, Event]] = []
        self._waiters = Waiters()  # GET /history long polls, by the event names they wait for
        self.published = 0  # events published by this process (metrics)
        self.resets = 0  # replays that began with a reset notice (metrics)
        self._store = store  # a history.HistoryFile, or None: history lives in memory only

    # -- methods for the caller ---------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return self._total

    @property
    def last_id(self) -> int:
        """The newest id in the sequence (before any event: the lifetime's origin, which no event has)."""
        return self._last_id

    @property
    def newest_event_id(self) -> int | None:
        """The newest event's id, or None when there has been none."""
        return self._last_id if self._has_events else None

    def retained(self) -> int:
        """How many entries replay can reach right now."""
        return self.head - self._oldest_pos(self.head)

    def on_publish(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every publish, outside the lock. It must not block."""
        self._listeners.append(listener)

    def on_keys_stored(self, callback: Callable[[list[Stamp]], None]) -> None:
        """`callback(stamps)` runs under the lock as keyed events enter the ring, i.e. once they are published
        (with fsync "always": on disk), with their Stamps (the server completes the keys in its KeyTable). Under
        the lock, so a key is remembered before any compaction can see its event: one that drops the event's
        record then finds the key there and keeps it as a key record. It must not call the bouncer."""
        self._keys_stored = callback

    def resize(self, history_size: int, queue_size: int, room_bytes: int | None = None) -> None:
        """Apply new history/queue sizes and room for bursts (a reload). Keeps every entry the new ring has room
        for; a larger ring starts with only what the old one held, and replay knows it (_first_pos)."""
        with self._lock:
            if room_bytes is not None:
                self._room_bytes = room_bytes
            ring = Ring(ring_capacity(history_size, queue_size))
            first = max(self._first_pos, self.head - self.ring.capacity, self.head - ring.capacity, 0)
            for pos in range(first, self.head):
                ring.slots[pos % ring.capacity] = self.ring.get(pos)
            self.ring = ring
            self._first_pos = first
            self._history_size, self._queue_size = history_size, queue_size
            if self._store is not None:
                self._store.keep = history_size
            self._trim_room_locked()

    def ingest(
        self,
        event_id: int,
        name: str,
        data: str,
        prev_id: int | None = None,
        gap: bool = False,
        batch: bytes | None = None,
    ) -> bool:
        """Append an event whose id was assigned elsewhere (the shared Redis stream), in that stream's order.
        `prev_id` is the id the stream had before it (None: assume no gap). An id not above the last one is a
        repeat (a follower resuming) and is ignored: False. When prev_id says events are missing between the
        newest event here and this one, a gap notice goes into the ring first.

        `gap`: the caller knows events were lost before this one although `prev_id` may not show it (the
        stream's writer changed, or an id this instance acknowledged never came back). A `prev_id` below the
        last id here means the same: the sequence went back (a flushed or restored stream), so events after
        prev_id that clients may have seen are gone. In both cases prev_id is no honest replay cursor, so the
        event's predecessor becomes `event_id - 1`, an id above every lost one that no client was given for
        another event: a client holding an id from before the loss is reset, and the reset's own cursor
        (see _reset_notice) is honoured. With `gap` the notice goes out even when that is the last id here:
        the caller knows of a loss the ids cannot show (an id handed out twice).

        `batch`: a mark the entries of one batch share (the stream's `b`), so that together they count as one
        publish for the slow rule; None for a single publish."""
        body = framing.encode_event(data, None, name)
        now = time.monotonic_ns()
        with self._lock:
            if event_id <= self._last_id and self._has_events:
                return False
            if prev_id is None:
                prev_id = self._last_id
            broken = gap or (self._has_events and prev_id < self._last_id)
            if broken:
                prev_id = event_id - 1
            if batch is None or batch != self._ingested_batch:
                self._batches += 1
            self._ingested_batch = batch
            if (self._has_events or self._origin_promised) and (gap or prev_id != self._last_id):
                # An instance that joined a stream Redis had emptied (FLUSHALL, a restart without persistence) and
                # told a client "0" was all there is: the first entry's predecessor (its own id - 1) is not 0, so
                # events that client never got may have existed. Without a promise there is nobody to tell.
                self._append_locked(_gap_entry(self._last_id, event_id, now, self._batches))
            self._origin_promised = False
            self._append_locked(_sequenced(event_id, prev_id, name, data, body, now, self._batches))
            self._trim_room_locked()
            self._last_id = event_id
            self._next_id = event_id + 1
            self._has_events = True
            self.published += 1
            self._arrived.notify_all()
        for listener in self._listeners:
            listener()
        return True

    def wait_for_id(self, event_id: int, timeout: float) -> bool:
        """Wait until the event with this id (or a later one) is here; False on timeout."""
        with self._lock:
            return self._arrived.wait_for(lambda: self._has_events and self._last_id >= event_id, timeout)

    def queued_for(self, name: str) -> int:
        """How many streams here would receive an event of this name."""
        with self._lock:
            return self._queued_for_locked(name)

    def restore(self, stored) -> None:
        """Load events read back from durable history (oldest first, each with its predecessor's id): the newest
        become replayable, and ids continue after the last one (or from the clock, whichever is higher). Where
        the stored chain is broken (an event whose predecessor is not the one before it) a gap notice goes in
        between, so replay never crosses a hole in silence."""
        with self._lock:
            now = time.monotonic_ns()
            previous = None
            for item in stored[-self._history_size :] if self._history_size else []:
                if previous is not None and item.prev_id != previous.id:
                    self._append_locked(_gap_entry(previous.id, item.id, now))
                body = framing.encode_event(item.data, None, item.name)
                self._append_locked(_sequenced(item.id, item.prev_id, item.name, item.data, body, now, 0, item.key))
                previous = item
            self._trim_room_locked()
            if stored:
                self._last_id = stored[-1].id
                self._next_id = max(self._next_id, self._last_id + 1)
                self._has_events = True
                self._origin = None

    def publish(self, data: str, name: str = "message") -> tuple[Event, int]:
        """Append an event and return it with the number of subscribers it was queued for. Never blocks on a
        subscriber: delivery happens elsewhere, after the listeners are told. With durable history the record
        is written under the lock (file order is id order) and fsynced after it, before anyone hears of the
        event; StoreError means it was not stored, is not delivered, and must not be acknowledged."""
        body = framing.encode_event(data, None, name)  # encode outside the lock; only the id goes in under it
        now = time.monotonic_ns()
        store = self._store
        with self._lock:
            event_id, prev_id = self._next_id, self._last_id
            self._batches += 1
            event = _sequenced(event_id, prev_id, name, data, body, now, self._batches)
            ticket = 0
            if store is not None:
                try:
                    ticket = store.append(event_id, prev_id, name, data)
                except OSError as exc:
                    raise StoreError(f"could not write the history file: {exc.strerror or exc}") from None
            self._next_id = event_id + 1
            self._last_id = event_id
            self._has_events = True
            self.published += 1
            if store is not None and ticket and store.must_sync():
                self._unsynced.append((ticket, event))
            else:
                self._append_locked(event)
                self._trim_room_locked()
                count = self._queued_for_locked(name)
        if store is not None and ticket and store.must_sync():
            self._await_fsync(store, ticket, event)
            count = self.queued_for(name)
        for listener in self._listeners:
            listener()
        return event, count

    def publish_batch(self, drafts: list[Draft]) -> tuple[list[Event], int]:
        """Publish the drafts (at most BURST_ROOM) as one step: consecutive ids, one history write and (with
        fsync "always") one fsync, all of them or none (StoreError). They count as one publish for the slow rule.
        Returns the events, and the most streams any one of them was queued for. A keyed draft's event carries
        its Stamp (the original reply a duplicate gets), which its history record keeps."""
        assert len(drafts) <= BURST_ROOM, "a batch larger than the ring's room for bursts"
        bodies = [framing.encode_event(draft.data, None, draft.name) for draft in drafts]
        now = time.monotonic_ns()
        at_ms = wall_ms()
        store = self._store
        with self._lock:
            self._batches += 1
            queued = {name: self._queued_for_locked(name) for name in {draft.name for draft in drafts}}
            events = []
            event_id, prev_id = self._next_id, self._last_id
            for draft, body in zip(drafts, bodies, strict=True):
                key = None
                if draft.key is not None and draft.fingerprint is not None:
                    key = Stamp(draft.key, draft.fingerprint, event_id, queued[draft.name], at_ms)
                events.append(_sequenced(event_id, prev_id, draft.name, draft.data, body, now, self._batches, key))
                prev_id, event_id = event_id, event_id + 1
            ticket = 0
            if store is not None:
                try:
                    ticket = store.append_many(events)
                except OSError as exc:
                    raise StoreError(f"could not write the history file: {exc.strerror or exc}") from None
            self._next_id, self._last_id = event_id, prev_id
            self._has_events = True
            self.published += len(events)
            if store is not None and ticket and store.must_sync():
                self._unsynced.extend((ticket, event) for event in events)
            else:
                for event in events:
                    self._append_locked(event)
                self._trim_room_locked()
                self._report_keys_locked(events)
        if store is not None and ticket and store.must_sync():
            self._await_fsync(store, ticket, events[-1])
        for listener in self._listeners:
            listener()
        return events, max(queued.values(), default=0)

    def _await_fsync(self, store: "HistoryFile", ticket: int, last: Event) -> None:
        """fsync "always": return once the records up to `ticket` are on disk and their events (the newest is
        `last`) have entered the ring. StoreError when they are not: they never will be."""
        try:
            store.sync(ticket)
            failure = None
        except OSError as exc:
            failure = exc
        with self._lock:
            self._settle_locked(failed=failure is not None)
            stored = last.pos >= 0  # on disk by this fsync or another one that covered it
        if not stored:
            why = failure.strerror or failure if failure else "an fsync of the history file failed"
            raise StoreError(f"could not fsync the history file: {why}")

    def subscribe(
        self,
        names: EventNames,
        last_event_id: str | None,
        peer: str = "",
        limit: int | None = None,
        per_peer_limit: int = 0,
    ) -> Replay | Refusal:
        """Register a subscriber, or say why not (FULL, or PEER_FULL when `peer` already has `per_peer_limit`
        streams). With a Last-Event-ID the cursor starts just after that id, so replay and live events come from
        the same ring in one pass; an id we cannot place gets a reset notice and everything retained."""
        with self._lock:
            if limit is not None and self._total >= limit:
                return Refusal.FULL
            if per_peer_limit and self._by_peer.get(peer, 0) >= per_peer_limit:
                return Refusal.PEER_FULL
            head = self.head
            oldest = self._oldest_pos(head)
            reset = None
            if last_event_id is None:
                cursor = head
            else:
                start = self._replay_start(parse_event_id(last_event_id), oldest, head)
                if start is None:
                    self.resets += 1
                    reset = self._reset_notice(last_event_id, oldest, head)
                    start = oldest
                cursor = start
            subscriber = Subscriber(names, cursor, head, peer)
            self._count_locked(subscriber, 1)
        return Replay(subscriber, reset)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._count_locked(subscriber, -1)

    def page(self, names: EventNames, after: str | None, limit: int, max_bytes: int = 1 << 20) -> Page:
        """The retained events after the id `after` (None: from the oldest) that `names` accepts, at most
        `limit` of them and (after the first) at most `max_bytes` of data, so one answer never becomes a huge
        buffer (the client continues from `last_id`). An `after` that replay would reset starts from the
        oldest, with reset=True."""
        with self._lock:
            head = self.head
            oldest = self._oldest_pos(head)
            reset = False
            cursor = oldest
            if after is not None:
                start = self._replay_start(parse_event_id(after), oldest, head)
                if start is None:
                    reset = True
                else:
                    cursor = start
            # The id a client holds once it has seen everything before `cursor` (what replay accepts from it).
            if cursor > oldest:
                last_id = self.ring.held(cursor - 1).id
            elif oldest < head:
                last_id = self.ring.held(oldest).prev_id
            else:
                last_id = self._last_id
            events: list[Event] = []
            size = 0
            pos = cursor
            while pos < head and len(events) < limit:
                entry = self.ring.held(pos)
                if entry.notice:
                    reset = True  # a gap inside the range: the client missed events, as a stream would be told
                elif names is None or entry.name in names:
                    if events and size + len(entry.data) > max_bytes:
                        break
                    events.append(entry)
                    size += len(entry.data)
                last_id = entry.id
                pos += 1
            first = self._oldest_event_locked(oldest, head)
            return Page(events, first.id if first else None, last_id, reset, pos)

    def wait_for_more(self, names: EventNames, pos: int, timeout: float) -> None:
        """Wait until an entry `names` accepts (or a gap notice) arrives at `pos` or later, wake_waiters() is
        called, or `timeout` passes (a long poll: GET /history?wait=). Only a waiter whose filter an entry
        matches is woken, and it waits outside the lock: a thousand polls for a name nobody publishes cost a
        publish nothing but a dictionary lookup."""
        waiter = Waiter(names)
        with self._lock:
            if self.head > pos:  # something arrived since the caller looked: look again first
                return
            self._waiters.add(waiter)
        try:
            waiter.woken.wait(timeout)
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    @property
    def history_waiting(self) -> int:
        """GET /history requests waiting in wait_for_more() (metrics)."""
        return len(self._waiters)

    def wake_waiters(self) -> None:
        """Wake every long poll (shutdown: each is answered at once)."""
        with self._lock:
            self._waiters.wake_all()

    def history(self) -> list[Event]:
        """The replayable events (not notices), oldest first."""
        with self._lock:
            return self._retained_events_locked(self._oldest_pos(self.head))

    def compact_store(self, keys_before: Callable[[int | None], Sequence[Stamp]] | None = None) -> None:
        """Rewrite the history file to the retained events (called on the history thread). The bulk is written
        without the lock; what was published meanwhile (in the ring, or written and waiting for its fsync) is
        appended under it, and the files are swapped there, so no publish is half in and half out.
        `keys_before(id)`: the idempotency keys still remembered for events older than that id (None: all),
        whose records the rewrite drops: the file keeps them as key records (idempotency.KeyTable). Every key
        of an event in the ring is already there (on_keys_stored), so no key can fall between the two.

        The file must never skip an event between two it keeps (after a restart with a larger history_size,
        replay would cross the hole). So everything published since the snapshot is appended, retained or not;
        if a burst pushed some of it out of the ring meanwhile, the new file is started over from what is
        retained now, with the key records taken anew for the events it drops now."""
        store = self._store
        assert store is not None, "compaction without a history file"
        with self._lock:
            kept = self._retained_events_locked(self._oldest_pos(self.head))
            snapshot_head = self.head
        stamps = keys_before(kept[0].id if kept else None) if keys_before is not None else ()
        with store.compaction(kept, stamps) as compaction:  # the bulk is written and fsynced without the lock
            with self._lock:
                unsynced = [event for _, event in self._unsynced]
                if all(self.ring.get(pos) is not None for pos in range(snapshot_head, self.head)):
                    compaction.finish(self._retained_events_locked(snapshot_head) + unsynced)
                else:
                    kept = self._retained_events_locked(self._oldest_pos(self.head))
                    stamps = keys_before(kept[0].id if kept else None) if keys_before is not None else ()
                    compaction.finish(kept + unsynced, start_over=stamps)

    # -- an upgrade in place (handover.py carries these to the next process) ---------------------------------

    def export_sequence(self) -> tuple[dict[str, Any], list[Event]]:
        """The id sequence and the ring's bookkeeping, and every entry the ring holds (oldest first): what the
        next process needs to continue exactly here. Called while nothing is being published."""
        with self._lock:
            first = max(self._first_pos, self.head - self.ring.capacity, 0)
            sequence = {
                "head": self.head,
                "first_pos": first,
                "next_id": self._next_id,
                "last_id": self._last_id,
                "origin": self._origin,
                "has_events": self._has_events,
                "batches": self._batches,
            }
            return sequence, [self.ring.held(pos) for pos in range(first, self.head)]

    def import_sequence(self, sequence: dict[str, Any], entries: list[Event]) -> None:
        """Continue the previous process's sequence and ring, with positions unchanged (adopted streams' cursors
        point into it). A smaller ring keeps the newest entries it has room for."""
        with self._lock:
            head = sequence["head"]
            ring = self.ring
            first = max(sequence["first_pos"], head - ring.capacity, 0)
            for event in entries:
                if event.pos >= first:
                    ring.slots[event.pos % ring.capacity] = event
            self.head, self._first_pos = head, first
            self._next_id, self._last_id = sequence["next_id"], sequence["last_id"]
            self._origin, self._has_events = sequence["origin"], sequence["has_events"]
            self._batches = sequence["batches"]

    def readmit(self, names: EventNames, cursor: int, live_from: int, peer: str) -> Subscriber:
        """A stream adopted from the previous process, counted as subscribe() counts one, at the place in the
        ring it had reached. No limits: it was admitted already."""
        subscriber = Subscriber(names, cursor, live_from, peer)
        with self._lock:
            self._count_locked(subscriber, 1)
        return subscriber

    # -- used by the delivery layer (lock-free: it reads a ring reference and immutable events) ---------------

    def collect(
        self, ring: Ring, cursor: int, head: int, names: EventNames, limit: int = 1 << 20
    ) -> tuple[bytes, int, int, int] | None:
        """The wire bytes of entries from `cursor` that `names` accepts (gap notices go to every stream),
        stopping at `head` or once `limit` bytes are gathered (so a long replay of large events never becomes
        one huge buffer). Returns (bytes, how many entries, id of the last one or 0, the pos to continue from),
        or None when an entry in that range has already been evicted."""
        chunks = []
        last_id = size = 0
        for pos in range(cursor, head):
            event = ring.slots[pos % ring.capacity]
            if event is None or event.pos != pos:
                return None
            if names is None or event.name in names or event.notice:
                chunks.append(event.wire)
                last_id = event.id
                size += len(event.wire)
                if size >= limit:
                    return b"".join(chunks), len(chunks), last_id, pos + 1
        return b"".join(chunks), len(chunks), last_id, head

    def publishes_waiting(
        self, ring: Ring, names: EventNames, start: int, head: int, counted: int = 0
    ) -> tuple[int, int] | None:
        """How many publishes (a batch is one) newer than the publish `counted` have events in [start, head) that
        a stream with the filter `names` receives, and the newest such publish; None when one of those entries
        has left the ring (the stream can no longer get it). Gap notices belong to the publish after them, so
        they add none. Publish numbers never decrease along the ring, so an unfiltered stream costs O(1)."""
        if start >= head:
            return 0, counted
        if start < head - ring.capacity:
            return None
        if names is None:
            first, last = ring.get(start), ring.get(head - 1)
            if first is None or last is None:
                return None
            return max(0, last.batch - max(first.batch - 1, counted)), max(last.batch, counted)
        waiting = 0
        for pos in range(start, head):
            event = ring.get(pos)
            if event is None:
                return None
            if event.batch > counted and event.name in names and not event.notice:
                waiting += 1
                counted = event.batch
        return waiting, counted

    def batch_before(self, ring: Ring, pos: int) -> int:
        """The publish number of the entry just before `pos` (0 when there is none): a stream that has taken
        everything before `pos` counts only later publishes toward the slow rule."""
        event = ring.get(pos - 1)
        return event.batch if event is not None else 0

    def is_slow(self, waiting: int) -> bool:
        """The slow rule: a stream with more than queue_size publishes waiting behind its socket is dropped."""
        return waiting > self._queue_size

    # -- internals ------------------------------------------------------------------------------------------

    def _append_locked(self, event: Event) -> None:
        """The one way an entry enters the ring: at head, in sequence order."""
        pos = event.pos = self.head
        self.ring.slots[pos % self.ring.capacity] = event
        self.head = pos + 1
        if self._waiters:  # a long poll may wait for exactly this (checked first: publishes stay cheap)
            self._waiters.wake_for(event)

    def _trim_room_locked(self) -> None:
        """After appends: count the entries that have just become older than the newest history_size +
        queue_size into the room for bursts, then release the oldest of the room while it holds more than
        BURST_ROOM entries or room_bytes encoded bytes. What is released no longer exists (_first_pos)."""
        ring, head = self.ring, self.head
        room_from, room_to, held = self._room_from, self._room_to, self._room_held
        if room_from < self._first_pos or room_from < head - ring.capacity:
            # The ring was replaced or its floor moved (a reload, a ring taken over): count afresh. (An append never
            # overwrites what the room counts: ring_capacity() leaves a burst's worth of slots for it.)
            room_from = room_to = max(self._first_pos, head - ring.capacity)
            held = 0
        edge = head - self._history_size - self._queue_size
        slots, capacity = ring.slots, ring.capacity
        while room_to < edge:  # once per entry, in the publish that pushed it out of the newest
            event = slots[room_to % capacity]
            if event is not None and event.pos == room_to:
                held += len(event.wire)
            room_to += 1
        if held > self._room_bytes or room_to - room_from > BURST_ROOM:
            while room_from < room_to and (room_to - room_from > BURST_ROOM or held > self._room_bytes):
                event = slots[room_from % capacity]
                if event is not None and event.pos == room_from:
                    held -= len(event.wire)
                    slots[room_from % capacity] = None
                room_from += 1
            if room_from > self._first_pos:
                self._first_pos = room_from
        self._room_from, self._room_to, self._room_held = room_from, room_to, held

    def _settle_locked(self, failed: bool) -> None:
        """After an fsync ("always"): move every event now on disk from _unsynced into the ring, in id order. On
        failure the store cuts off every record not known to be on disk, so those events fail too: they leave
        _unsynced without entering the ring, and the sequence goes back to the newest event that did."""
        store = self._store
        assert store is not None  # only a store's fsync leaves events in _unsynced
        settled = 0
        while settled < len(self._unsynced) and self._unsynced[settled][0] <= store.synced:
            self._append_locked(self._unsynced[settled][1])
            settled += 1
        if settled:
            self._report_keys_locked([event for _, event in self._unsynced[:settled]])
            del self._unsynced[:settled]  # at once: a batch settles a thousand events
            self._trim_room_locked()
        if not failed:
            return
        store.discard_unsynced()
        if self._unsynced:
            # Ids are not reused (_next_id stays ahead), but the next event's predecessor is the newest real one.
            self._last_id = self._unsynced[0][1].prev_id
            self._has_events = self._last_id != self._origin
            self.published -= len(self._unsynced)
            self._unsynced.clear()

    def _report_keys_locked(self, events: list[Event]) -> None:
        """Published events entered the ring: hand their keys to on_keys_stored()."""
        if self._keys_stored is not None:
            stamps = [event.key for event in events if event.key is not None]
            if stamps:
                self._keys_stored(stamps)

    def _retained_events_locked(self, start: int) -> list[Event]:
        return [
            event for pos in range(start, self.head) if (event := self.ring.get(pos)) is not None and not event.notice
        ]

    def _count_locked(self, subscriber: Subscriber, delta: int) -> None:
        """Add (1) or remove (-1) a subscriber in the counts that queued_for() and the limits read."""
        self._total += delta
        _bump(self._by_peer, subscriber.peer, delta)
        names = subscriber.names
        if names is None:
            self._unfiltered += delta
        elif isinstance(names, frozenset):
            for name in names:
                _bump(self._by_name, name, delta)
        else:
            _bump(self._pattern_filters, names, delta)

    def _queued_for_locked(self, name: str) -> int:
        count = self._unfiltered + self._by_name.get(name, 0)
        for pattern_filter, subscribers in self._pattern_filters.items():  # token scopes: few distinct ones
            if name in pattern_filter:
                count += subscribers
        return count

    def _oldest_pos(self, head: int) -> int:
        return max(self._first_pos, head - self._history_size, head - self.ring.capacity)

    def _replay_start(self, wanted: int | None, oldest: int, head: int) -> int | None:
        """The pos just after the event `wanted`, when that id is one we hold (or the predecessor of the oldest
        entry) and so every entry after it is still here. None: a reset."""
        if wanted is None:
            return None  # not one of our ids
        if oldest == head:  # nothing retained: fine only if the client has seen the very last id
            if wanted != self._last_id:
                return None
            self._origin_promised = self._origin_promised or not self._has_events
            return head
        if wanted == self.ring.held(oldest).prev_id:
            return oldest
        low, high = oldest, head  # the first pos whose id is >= wanted
        while low < high:
            middle = (low + high) // 2
            if self.ring.held(middle).id >= wanted:
                high = middle
            else:
                low = middle + 1
        if low < head:
            entry = self.ring.held(low)
            if entry.id == wanted and not entry.notice:
                return low + 1
        return None

    def _oldest_event_locked(self, oldest: int, head: int) -> Event | None:
        """The oldest retained event (not a notice), or None."""
        return next((event for pos in range(oldest, head) if not (event := self.ring.held(pos)).notice), None)

    def _reset_notice(self, last_event_id: str, oldest: int, head: int) -> bytes:
        first = self._oldest_event_locked(oldest, head)
        payload = json.dumps({"last_event_id": last_event_id, "oldest_id": str(first.id) if first else None})
        # The id moves the browser's cursor to just before the replay (an id _replay_start accepts), so a
        # reconnect during the replay does not trigger a second reset and a second full replay.
        cursor_id = self.ring.held(oldest).prev_id if oldest < head else self._last_id
        return framing.encode_event(payload, cursor_id, RESET_EVENT)


def _gap_notice(last_id: int, next_id: int) -> bytes:
    """The in-band reset a live stream gets where events are missing: like a replay reset, it names the last id
    before the gap and the oldest one after it."""
    return framing.encode_event(
        json.dumps({"last_event_id": str(last_id), "oldest_id": str(next_id)}), None, RESET_EVENT
    )

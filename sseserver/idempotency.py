"""Idempotency keys: a retried publish is answered with the original reply instead of being published again.

Owns: what is remembered of a key (Stamp: the event it published, with the fingerprint of its name and data), the
table of keys a single instance has seen (KeyTable: the TTL, the bound on its size, oldest forgotten first, and
the claim that makes racing duplicates publish once), the rule for keys repeated within one batch
(first_of_each_key), and the fingerprint.
Must not know: HTTP, sockets, Redis, the history file's format. The server claims keys here around a publish; the
bouncer writes a Stamp into the event's history record and completes the key here as the event enters its ring
(under its lock, so a compaction never drops the record of an event whose key is still pending), and the history
file gives Stamps back at start.

A key is scoped to its publisher before it gets here (see publishing.scoped_key): two tokens never share one, so
one token's keys can neither answer nor block another's publishes.

Why a claim and not just a lookup: the event is not published the moment it gets its id. With fsync "always" it
is published once its record is on disk, and a failed fsync unpublishes it (503). So a key is first *claimed*
(pending), then *completed* with the event's Stamp once the store confirmed it, or *released* when it did not. A
duplicate that arrives while the key is pending waits for that outcome instead of answering with an id that may
yet fail, or publishing a second time. Claims never wait while holding others (claim() takes all of a batch's
keys at once, or none), so two batches that share keys cannot deadlock.

With Redis the table is not used: the shared stream's script checks and stores keys in the same atomic step that
assigns the id (cluster.py), which covers every instance.
"""

import collections
import hashlib
import threading
import time
from collections.abc import Sequence

FINGERPRINT_BYTES = 16
CLAIM_TIMEOUT = 10.0  # how long a duplicate waits for the request holding its key (a store confirms within 5 s)


def fingerprint(name: str, data: str) -> bytes:
    """What a key must be reused with to count as the same publish: its event name and data. A newline cannot be
    part of an event name, so no two (name, data) pairs share the hashed text."""
    return hashlib.sha256(f"{name}\n{data}".encode("utf-8", "surrogatepass")).digest()[:FINGERPRINT_BYTES]


def wall_ms() -> int:
    """The wall clock in milliseconds: when a key was first used, as kept across a restart."""
    return time.time_ns() // 1_000_000


class Stamp:
    """What is remembered of a key once its event is published: the original reply (the event's id and the
    streams it was queued for) and the fingerprint a reuse must match. `at_ms` is when it was published (the wall
    clock, so a restart can tell how old it is)."""

    __slots__ = ("key", "fingerprint", "event_id", "subscribers", "at_ms")

    def __init__(self, key: str, fingerprint: bytes, event_id: int, subscribers: int, at_ms: int):
        self.key = key
        self.fingerprint = fingerprint
        self.event_id = event_id
        self.subscribers = subscribers
        self.at_ms = at_ms

    def __repr__(self) -> str:
        return f"Stamp({self.key!r}, id={self.event_id}, subscribers={self.subscribers}, at_ms={self.at_ms})"


class KeyConflict(Exception):
    """A key was already used (or is being used) for a different event name or data: 409. `index` says which of
    the request's events."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class KeyBusy(Exception):
    """Another request holds the key and has not finished within CLAIM_TIMEOUT: 409, try again."""


def first_of_each_key(keys: Sequence[str | None], fingerprints: Sequence[bytes | None]) -> dict[int, int]:
    """Within one batch: {index of a line: index of the earlier line with the same key}. Such a line is a
    duplicate of that one (published once); the same key with another fingerprint is a KeyConflict."""
    first: dict[str, int] = {}
    repeats: dict[int, int] = {}
    for index, key in enumerate(keys):
        if key is None:
            continue
        earlier = first.setdefault(key, index)
        if earlier != index:
            if fingerprints[earlier] != fingerprints[index]:
                raise KeyConflict(index)
            repeats[index] = earlier
    return repeats


class _Entry:
    """One key in the table: pending (stamp None) while a request holds it, then its Stamp."""

    __slots__ = ("fingerprint", "stamp", "seen")

    def __init__(self, fingerprint: bytes, stamp: Stamp | None, seen: float):
        self.fingerprint = fingerprint
        self.stamp = stamp
        self.seen = seen  # time.monotonic() when it was claimed (or, restored, when it was first published)


class KeyTable:
    """The keys a single instance has seen, newest last. Bounded: an entry older than `ttl` seconds is forgotten
    (it answers like a key never seen), and beyond `max_keys` entries the oldest is forgotten early. Each call
    forgets expired entries at the front, so time and memory stay bounded however many keys come by (amortised
    O(1) per key, as in access.RateLimiter). Pending entries are never forgotten: each is held by a request in
    flight, which completes or releases it."""

    def __init__(self, ttl: float, max_keys: int, clock=time.monotonic):
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._changed = threading.Condition()  # a pending key was completed or released

    def __len__(self) -> int:
        return len(self._entries)

    def set_limits(self, ttl: float, max_keys: int) -> None:
        """A reload: both apply at once, to the keys already held too."""
        with self._changed:
            self.ttl, self.max_keys = ttl, max_keys
            self._forget_old(self._clock())

    def claim(self, keys: Sequence[str], fingerprints: Sequence[bytes], timeout: float = CLAIM_TIMEOUT) -> list:
        """Claim every key (all distinct), or none. Returns, per key, its Stamp when it was published within the
        TTL (a duplicate: nothing to publish), or None when the caller now holds it and must complete() or
        release() it. KeyConflict(index) when a key was used with another fingerprint; KeyBusy when another
        request still holds one after `timeout`. While one is held elsewhere, nothing is held here."""
        with self._changed:
            deadline = self._clock() + timeout
            while True:
                now = self._clock()
                self._forget_old(now)
                found: list[Stamp | None] = []
                busy = False
                for index, (key, print_) in enumerate(zip(keys, fingerprints)):
                    entry = self._live(key, now)
                    if entry is None:
                        found.append(None)
                        continue
                    if entry.fingerprint != print_:
                        raise KeyConflict(index)
                    if entry.stamp is None:
                        busy = True
                        break
                    found.append(entry.stamp)
                if not busy:
                    break
                if now >= deadline:
                    raise KeyBusy
                self._changed.wait(deadline - now)
            for key, print_, stamp in zip(keys, fingerprints, found):
                if stamp is None:
                    self._entries[key] = _Entry(print_, None, now)
                    self._entries.move_to_end(key)
            self._forget_old(now)
            return found

    def complete(self, stamps: Sequence[Stamp]) -> None:
        """The events of claimed keys are published: remember their Stamps, and wake duplicates waiting."""
        with self._changed:
            for stamp in stamps:
                entry = self._entries.get(stamp.key)
                if entry is not None and entry.stamp is None:
                    entry.stamp = stamp
            self._forget_old(self._clock())  # pending entries may have taken the table past max_keys
            self._changed.notify_all()

    def release(self, keys: Sequence[str]) -> None:
        """Claimed keys whose publish failed (not published): forget them, so a retry publishes."""
        with self._changed:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.stamp is None:
                    del self._entries[key]
            self._changed.notify_all()

    def restore(self, stamps: Sequence[Stamp], now_ms: int) -> int:
        """Keys read back from the history file (oldest first): those within the TTL are remembered as if seen
        when they were published. Returns how many."""
        with self._changed:
            now = self._clock()
            for stamp in sorted(stamps, key=lambda stamp: stamp.at_ms):
                age = max(0.0, (now_ms - stamp.at_ms) / 1000)
                if age < self.ttl:
                    self._entries[stamp.key] = _Entry(stamp.fingerprint, stamp, now - age)
                    self._entries.move_to_end(stamp.key)
            self._forget_old(now)
            return len(self._entries)

    def stamps_before(self, event_id: int | None) -> list[Stamp]:
        """The published keys still remembered whose events are older than `event_id` (None: all), oldest first:
        what a compaction of the history file keeps as key records, since their events' records are dropped."""
        with self._changed:
            now = self._clock()
            self._forget_old(now)
            return [
                entry.stamp
                for entry in self._entries.values()
                if entry.stamp is not None
                and now - entry.seen < self.ttl
                and (event_id is None or entry.stamp.event_id < event_id)
            ]

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.stamp is not None and now - entry.seen >= self.ttl:
            del self._entries[key]
            return None
        return entry

    def _forget_old(self, now: float) -> None:
        """Forget expired entries from the front, then the oldest beyond max_keys (skipping pending ones, which
        their requests end soon)."""
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.stamp is None or now - entry.seen < self.ttl:
                break
            del entries[key]
        skipped = 0
        while len(entries) > self.max_keys and skipped < len(entries):
            key, entry = next(iter(entries.items()))
            if entry.stamp is None:
                entries.move_to_end(key)  # pending: keep it, look at the next oldest
                skipped += 1
                continue
            del entries[key]

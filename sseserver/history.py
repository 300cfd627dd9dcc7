"""Durable history: the events behind Last-Event-ID replay, kept in a file that survives restarts and crashes.

Owns: the file format, appending a record per publish, the fsync policy, compaction to about `history_size`
events, and reading the file back at start (with the torn-tail and corruption rules).
Must not know: HTTP, subscribers, delivery. The bouncer calls append() under its lock (so file order is id
order) and sync() after it (so an fsync never holds up other publishers), and nothing above the bouncer knows
the history is on disk.

The format (all integers big-endian):
    file   = MAGIC record*
    record = length:u32 length_crc:u32 crc32:u32 payload    length_crc = crc32 of the 4 length bytes
    payload= event | key                                     the first byte, the kind, says which
    event  = kind:u8 id:u64 prev_id:u64 name_length:u8 key_length:u16 name key [at_ms:u64 subscribers:u32] data
             kind 0: the last (or only) event of its publish; kind 2: more events of the same batch follow
    key    = 1:u8 id:u64 at_ms:u64 subscribers:u32 key_length:u16 fingerprint:16 bytes key
Names, keys and data are UTF-8. `prev_id` is the id just before this one in the sequence, so replay after a restart
stays exact even for the oldest kept record. `length_crc` lets a damaged length be told from a record cut short: a
crash can cut a record, but it cannot write a wrong length.

A batch is written with one write, but a fatal signal can cut a large write between pages, leaving whole records
of a batch whose reply never went out. So every record of a batch but its last is of kind 2, and a file that ends
in one is treated like a torn tail: the unfinished batch is dropped at start, so a batch is all or nothing across
a crash too.

An event published with an idempotency key carries it (key_length > 0), with when it was published and the
streams it was queued for: the original reply, which a retry after a restart gets (idempotency.Stamp; the
fingerprint is recomputed from the name and data). A compaction drops the records of old events, so it writes the
keys still remembered for those as key records first (bounded by idempotency_max_keys); the threshold for the
next compaction counts them, so a file full of keys is not rewritten after every few publishes.

Older formats are read and rewritten in this one at start: the second (MAGIC2: `id prev_id name_length name data`,
no keys) and the first (MAGIC1: `length crc32 id name_length name data`).

Guarantees, by `history_fsync`:
- every mode: a record is written (os.write, no user-space buffer) before the publisher gets its 200, so a
  crash of the *process* (kill -9, an OOM kill) loses no acknowledged event;
- "always": fsync before the 200 (grouped: concurrent publishers share one fsync), so a crash of the *machine*
  (power loss, kernel panic) loses none either. A failed fsync fails every record written since the last good
  one: they are cut off the file again (ftruncate + fsync) and their publishers get 503, so a 503 always means
  "not published" and a restart never brings such an event back. Until that cut succeeds, publishing is refused
  and the background thread keeps trying to rewrite the file;
- "interval": fsync every `history_fsync_interval` seconds, so a machine crash loses at most that much;
- "never": the kernel writes back when it likes (typically within 30 s).

Every write loops until the whole record is written (os.write may write less, e.g. near a full disk, and never
more than ~2 GiB at once); a record that cannot be written whole is cut off again, so the file always ends on a
record boundary. Compaction rewrites the newest events into `<file>.compact`, fsyncs it, renames it over the
file and fsyncs the directory. Any failure before the rename (a full disk) leaves the old file in force and
untouched, and compaction is retried with backoff. A crash before the rename leaves the old file whole (the
leftover is deleted at the next start); a crash after it leaves the new file whole.

Recovery never depends on what publishers put in events: a crash can only leave a torn *last* record (appends
are single writes at the end of the file), so damage is accepted as a torn tail exactly when it is what a cut
write leaves: a header cut short, a whole header (its length checked) whose record runs past the end of the file,
a last record whose checksum fails, or only zero bytes. Anything else (a damaged length, damage followed by more
data) is corruption and stops the start.

The file is locked (flock) while a daemon has it open: a second daemon pointed at the same file refuses to start
instead of interleaving records. A file deleted, replaced or truncated behind the daemon's back (logrotate's
copytruncate) is noticed within a second and written anew from the retained events.
"""

import enum
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

from .config import ConfigError
from .idempotency import FINGERPRINT_BYTES, Stamp, fingerprint

log = logging.getLogger("sseserver.history")

MAGIC = b"SSEHIST3\n"
MAGIC2 = b"SSEHIST2\n"  # the second format: payload = id:u64 prev_id:u64 name_length:u8 name data
MAGIC1 = b"SSEHIST1\n"  # the first format: payload = id:u64 name_length:u8 name data
_HEADER = struct.Struct(">III")  # length, crc32 of the length bytes, crc32 of the payload
_HEADER1 = struct.Struct(">II")  # the first format: length, crc32 of the payload
_LENGTH = struct.Struct(">I")
_EVENT = struct.Struct(">BQQBH")  # kind 0, id, prev_id, name_length, key_length
_KEY_INFO = struct.Struct(">QI")  # at_ms, subscribers: follows the key of an event that has one
_KEY = struct.Struct(f">BQQIH{FINGERPRINT_BYTES}s")  # kind 1, id, at_ms, subscribers, key_length, fingerprint
EVENT_RECORD, KEY_RECORD, EVENT_CONTINUED = 0, 1, 2
_IDS2 = struct.Struct(">QQB")
_ID1 = struct.Struct(">QB")
MAX_RECORD = 64 * 1024 * 1024 + 1024  # max_message_bytes' limit, and room for the name and a key
CHECK_INTERVAL = 1.0  # how often the background thread looks for a deleted file or a needed rewrite
RETRY_START, RETRY_MAX = 1.0, 60.0  # backoff between failed compactions (a full disk stays full for a while)


class HistoryFileError(ConfigError):
    """The history file cannot be used at start: it cannot be opened or read, another daemon holds it, or it is not
    ours. A problem with the key history_file, so it is reported like any config error: one line, exit code 2."""

    def __init__(self, problem: str):
        super().__init__("history_file", problem)


class CorruptHistory(HistoryFileError):
    """Damage that a crash cannot leave (see "Recovery" above): the start stops instead of guessing."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is corrupt: {what}")


class StoredEvent:
    __slots__ = ("id", "prev_id", "name", "data", "key")

    def __init__(self, event_id: int, prev_id: int, name: str, data: str, key: Stamp | None = None):
        self.id, self.prev_id, self.name, self.data, self.key = event_id, prev_id, name, data, key


class Record(Protocol):
    """What a record is written from: a StoredEvent, or the bouncer's ring entry."""

    id: int
    prev_id: int
    name: str
    data: str
    key: Stamp | None


def _framed(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(_LENGTH.pack(len(payload))), zlib.crc32(payload)) + payload


def encode_record(
    event_id: int, prev_id: int, name: str, data: str, key: Stamp | None = None, kind: int = EVENT_RECORD
) -> bytes:
    name_bytes = name.encode("utf-8")
    if key is None:
        head = _EVENT.pack(kind, event_id, prev_id, len(name_bytes), 0) + name_bytes
    else:
        key_bytes = key.key.encode("utf-8")
        head = (
            _EVENT.pack(kind, event_id, prev_id, len(name_bytes), len(key_bytes))
            + name_bytes
            + key_bytes
            + _KEY_INFO.pack(key.at_ms, key.subscribers)
        )
    return _framed(head + data.encode("utf-8"))


def encode_key_record(stamp: Stamp) -> bytes:
    """A key whose event's record a compaction drops: kept for idempotency, not an event (no replay, no chain)."""
    key_bytes = stamp.key.encode("utf-8")
    return _framed(
        _KEY.pack(KEY_RECORD, stamp.event_id, stamp.at_ms, stamp.subscribers, len(key_bytes), stamp.fingerprint)
        + key_bytes
    )


def encode_records(events: Sequence[Record], batch: bool = False) -> bytes:
    """The records of `events`; `batch`: they are one publish, so all but the last say that more follow."""
    last = len(events) - 1 if batch else -1
    return b"".join(
        encode_record(e.id, e.prev_id, e.name, e.data, e.key, EVENT_CONTINUED if i < last else EVENT_RECORD)
        for i, e in enumerate(events)
    )


class Contents:
    """A history file as read: its events (oldest first, each with its key if it had one), the keys of its key
    records, the length of its valid prefix, and why the tail after that was dropped (None: nothing was)."""

    __slots__ = ("events", "keys", "valid", "dropped")

    def __init__(self, events: list[StoredEvent], keys: list[Stamp], valid: int, dropped: str | None):
        self.events, self.keys, self.valid, self.dropped = events, keys, valid, dropped


def decode_records(blob: bytes, path: str) -> tuple[list[StoredEvent], int, str | None]:
    """decode_file() without the key records: (events, length of the valid prefix, why the tail was dropped)."""
    contents = decode_file(blob, path)
    return contents.events, contents.valid, contents.dropped


def decode_file(blob: bytes, path: str) -> Contents:
    """Parse a whole file, of any format. Raises HistoryFileError when the file is not ours, CorruptHistory when
    it is damaged anywhere but at its very end."""
    if blob.startswith(MAGIC):
        minimum, header = _EVENT.size, _HEADER
    elif blob.startswith(MAGIC2):
        minimum, header = _IDS2.size, _HEADER
    elif blob.startswith(MAGIC1):
        minimum, header = _ID1.size, _HEADER1
    elif MAGIC.startswith(blob):
        return Contents([], [], 0, None)  # created, then crashed before the magic was complete: nothing stored
    else:
        raise HistoryFileError(f"{path} is not an sseserver history file")
    version = blob[len(MAGIC) - 2]  # the digit in "SSEHISTn\n"
    contents = Contents([], [], len(MAGIC), None)
    events = contents.events
    offset = len(MAGIC)
    batch: tuple[int, int] | None = None  # an unfinished batch: (its first record's offset, events before it)
    while offset < len(blob):
        problem, torn, end = _damage(blob, offset, header, minimum)
        if problem:
            if torn or not blob[offset:].strip(b"\0"):
                contents.dropped = f"{problem} at the end (offset {offset}), left by a crash"
                break
            raise CorruptHistory(path, f"{problem} at offset {offset} of {len(blob)}")
        payload = blob[offset + header.size : end]
        try:
            if version == ord("3"):
                event = _decode_payload(payload, contents.keys)
            else:
                event = _decode_old_payload(payload, version, events[-1].id if events else None)
        except (UnicodeDecodeError, ValueError, struct.error) as exc:
            raise CorruptHistory(path, f"{_why(exc)} in the record at offset {offset}") from None
        if event is not None:
            if events and event.id <= events[-1].id:
                raise CorruptHistory(path, f"ids go backwards at offset {offset}")
            if event.prev_id >= event.id:  # replay would take it as an id we hold and resend what the client has
                raise CorruptHistory(path, f"a predecessor id not below its event's at offset {offset}")
            continued = payload[0] == EVENT_CONTINUED and version == ord("3")
            if continued and batch is None:
                batch = (offset, len(events))
            elif not continued:
                batch = None
            events.append(event)
        offset = contents.valid = end
    if batch is not None:  # the write of a batch was cut after whole records: none of it was acknowledged
        start, before = batch
        contents.dropped = (
            f"an unfinished batch of {len(events) - before} events at the end (offset {start}), left by a crash"
            + (f", and {contents.dropped}" if contents.dropped else "")
        )
        del events[before:]
        contents.valid = start
    return contents


def _why(exc: Exception) -> str:
    return "bad UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc) or "a malformed record"


def _decode_payload(payload: bytes, keys: list[Stamp]) -> StoredEvent | None:
    """A record of the current format: an event (returned), or a key record (added to `keys`, None returned)."""
    kind = payload[0]
    if kind == KEY_RECORD:
        _, event_id, at_ms, subscribers, key_length, print_ = _KEY.unpack_from(payload)
        raw = payload[_KEY.size :]
        if len(raw) != key_length or not key_length:
            raise ValueError("a key record of the wrong length")
        keys.append(Stamp(raw.decode("utf-8"), print_, event_id, subscribers, at_ms))
        return None
    if kind != EVENT_RECORD and kind != EVENT_CONTINUED:
        raise ValueError(f"an unknown record kind {kind}")
    _, event_id, prev_id, name_length, key_length = _EVENT.unpack_from(payload)
    at = _EVENT.size + name_length
    name = payload[_EVENT.size : at].decode("utf-8")
    stamp = None
    if key_length:
        key = payload[at : at + key_length].decode("utf-8")
        at += key_length
        at_ms, subscribers = _KEY_INFO.unpack_from(payload, at)
        at += _KEY_INFO.size
    if at > len(payload):
        raise ValueError("a record shorter than its name and key")
    data = payload[at:].decode("utf-8")
    if key_length:
        stamp = Stamp(key, fingerprint(name, data), event_id, subscribers, at_ms)
    return StoredEvent(event_id, prev_id, name, data, stamp)


def _decode_old_payload(payload: bytes, version: int, previous_id: int | None) -> StoredEvent:
    """A record of the second or the first format (no keys)."""
    if version == ord("2"):
        event_id, prev_id, name_length = _IDS2.unpack_from(payload)
        at = _IDS2.size
    else:  # the first format: ids were contiguous within a file
        event_id, name_length = _ID1.unpack_from(payload)
        prev_id = previous_id if previous_id is not None else event_id - 1
        at = _ID1.size
    return StoredEvent(
        event_id, prev_id, payload[at : at + name_length].decode("utf-8"), payload[at + name_length :].decode("utf-8")
    )


def _damage(blob: bytes, offset: int, header: struct.Struct, ids_size: int) -> tuple[str | None, bool, int]:
    """What is wrong with the record at `offset` (None if nothing), whether it is what a cut write leaves at the
    end of a file (a torn tail), and where the record ends."""
    if len(blob) - offset < header.size:
        return "a partial record header", True, len(blob)
    if header is _HEADER:
        length, length_crc, crc = header.unpack_from(blob, offset)
        if zlib.crc32(blob[offset : offset + _LENGTH.size]) != length_crc:
            return "a damaged record length", False, len(blob)
    else:
        length, crc = header.unpack_from(blob, offset)
    end = offset + header.size + length
    if length < ids_size or length > MAX_RECORD:
        return "an impossible record length", False, end
    if end > len(blob):
        return "a partial record", True, end
    if zlib.crc32(blob[offset + header.size : end]) != crc:
        return "a record whose checksum does not match", end == len(blob), end
    return None, False, end


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written: a write may take less (a nearly full disk, a signal, the ~2 GiB
    cap of one write on Linux). Raises OSError when the kernel refuses the rest."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view[: 1 << 30])
        if written <= 0:
            raise OSError(errno.ENOSPC, "no space left for the history file")
        view = view[written:]


class Fsync(enum.Enum):
    """history_fsync: when records reach the disk (see the module docstring)."""

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


class FileState(enum.Enum):
    """Where the file stands after a failure. Appends are refused in every state but OK.

    OK --fsync fails--> FAILED --the failing publisher cuts the file back (discard_unsynced)--> CUT
    CUT --an fsync succeeds (background)--> OK
    FAILED/CUT --the cut itself fails, or a torn record cannot be cut--> REWRITE --a compaction succeeds--> OK
    A compaction never runs in FAILED: the records after the last good fsync must first be cut (and their
    publishers answered 503), or the rewrite would keep them."""

    OK = "ok"
    FAILED = "records after the last good fsync must be cut off"
    CUT = "waiting for an fsync to succeed"
    REWRITE = "the file must be rewritten from the retained events"


class HistoryFile:
    """The open history file. append() and the `finish` step of a compaction run under the bouncer's lock;
    sync() and the bulk of a compaction outside it."""

    def __init__(self, path: str, fsync: str, interval: float, keep: int):
        self.path = path
        self.fsync = Fsync(fsync)  # the config checked the value: a typo in code fails here, not silently
        self.interval = interval
        self.keep = keep  # events to keep after compaction (history_size; a reload may change it)
        self.records = 0  # records in the current file
        self.key_records = 0  # key records a compaction (or the file read at start) holds: they count as kept
        self.key_stamps: list[Stamp] = []  # after load(): every key the file holds (events' and key records')
        self._fd = -1
        self._size = 0  # bytes in the current file
        # Group commit: each append takes the next ticket. (_appended, _size) are replaced together as one tuple
        # so that sync() can read a consistent pair without the bouncer's lock.
        self._appended = 0
        self._tail = (0, 0, 0)  # (_appended, _size, records)
        self.synced = 0  # every ticket up to this one is on disk
        self._synced_size = 0  # the file's size at that fsync: where a failed fsync cuts the file back to
        self._synced_records = 0  # and the records it then holds (a ticket may stand for a batch's many)
        self._state = FileState.OK  # changed only under _sync_lock
        self._why = ""  # the failure that left OK, for the log and the 503
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.compact_requested = threading.Event()
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we write to

    # -- start ---------------------------------------------------------------------------------------------------

    def load(self) -> list[StoredEvent]:
        """Open (creating with mode 0600) and read the file; returns its events, oldest first (the keys it holds
        are left in `key_stamps`). Raises HistoryFileError naming the file for anything but a torn last record,
        which is cut off with a warning."""
        leftover = self.path + ".compact"
        if os.path.exists(leftover):
            log.warning("removing %s, left by a compaction that did not finish (the history file is intact)", leftover)
            os.unlink(leftover)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise HistoryFileError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise HistoryFileError(f"{self.path} is in use by another sseserver process") from None
        try:
            blob = _read_all(fd)
            contents = decode_file(blob, self.path)
            events, valid, dropped = contents.events, contents.valid, contents.dropped
            if dropped:
                log.warning("history file %s: ignoring %s; keeping %d events", self.path, dropped, len(events))
            if valid < len(blob):  # a torn tail, or a magic cut short
                os.ftruncate(fd, valid)
            if valid == 0:
                write_all(fd, MAGIC)
                os.fsync(fd)
                valid = len(MAGIC)
        except OSError as exc:
            os.close(fd)
            raise HistoryFileError(f"cannot read {self.path}: {exc.strerror}") from None
        except HistoryFileError:
            os.close(fd)
            raise
        self._adopt(fd, valid, len(events) + len(contents.keys))
        self.key_records = len(contents.keys)
        self.key_stamps = contents.keys + [event.key for event in events if event.key is not None]
        if blob.startswith((MAGIC1, MAGIC2)):
            try:
                self._rewrite(events)
            except OSError as exc:
                raise HistoryFileError(
                    f"cannot convert {self.path} to the current format: {exc.strerror or exc}"
                ) from None
            log.info("history file %s converted to the current format", self.path)
        return events

    def start(self, compact: Callable[[], None]) -> None:
        """The background thread: periodic fsync ("interval"), compaction, and noticing a lost file. `compact()`
        runs a compaction (Bouncer.compact_store: the bouncer knows which events are retained); OSError means
        it failed and is retried with backoff."""
        self._thread = threading.Thread(target=self._run, args=(compact,), name="sseserver-history", daemon=True)
        self._thread.start()

    # -- per publish -----------------------------------------------------------------------------------------

    def must_sync(self) -> bool:
        """True when a publish must wait for sync() before it is acknowledged (fsync "always")."""
        return self.fsync is Fsync.ALWAYS

    def append(self, event_id: int, prev_id: int, name: str, data: str) -> int:
        """Write one record (under the bouncer's lock). Returns a ticket for sync(). Raises OSError when the
        record could not be written whole: it is cut off again, and the caller must not acknowledge it."""
        return self._write(encode_record(event_id, prev_id, name, data), 1)

    def append_many(self, events: Sequence[Record]) -> int:
        """Write a batch's records in one write (under the bouncer's lock), with their keys: one ticket, so one
        fsync covers them all. Raises OSError when they could not all be written: then none is kept."""
        return self._write(encode_records(events, batch=True), len(events))

    def _write(self, record: bytes, count: int) -> int:
        if self._state is not FileState.OK:
            raise OSError(errno.EIO, f"{self._why} ({self._state.value})")
        try:
            write_all(self._fd, record)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)  # the file must end on a record boundary
            except OSError as exc:
                with self._sync_lock:
                    self._enter(FileState.REWRITE, f"a torn record could not be cut off: {exc.strerror or exc}")
            raise
        self._size += len(record)
        self.records += count
        self._appended += 1
        self._tail = (self._appended, self._size, self.records)
        if self.records > 2 * (self.keep + self.key_records) + 100:
            self.compact_requested.set()
        return self._appended

    def sync(self, ticket: int) -> None:
        """With fsync "always": return once the record behind `ticket` is on disk. Publishers that arrive
        while an fsync runs are covered by the next one, so N concurrent publishers cost ~2 fsyncs, not N.
        Raises OSError when it is not; then every record after the last good fsync counts as failed (the
        bouncer calls discard_unsynced()), because after a failed fsync the kernel may have dropped any of them."""
        if self.synced >= ticket:
            return
        with self._sync_lock:
            if self.synced >= ticket:
                return
            if self._state is not FileState.OK:
                raise OSError(errno.EIO, f"{self._why} ({self._state.value})")
            target, size, records = self._tail
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._enter(FileState.FAILED, f"fsync failed: {exc.strerror or exc}")
                raise
            self.synced, self._synced_size, self._synced_records = target, size, records

    def discard_unsynced(self) -> None:
        """After a failed fsync (under the bouncer's lock, so no append runs meanwhile): cut the file back to the
        last fsync that succeeded, so none of the failed records can come back at the next start. Appends stay
        refused until an fsync succeeds again (the background thread keeps trying); if even the cut fails, the
        file is rewritten from the retained events instead."""
        with self._sync_lock:
            if self._state is not FileState.FAILED:
                return  # already cut (another failing publisher came first), or waiting for a rewrite
            try:
                os.ftruncate(self._fd, self._synced_size)
            except OSError as exc:
                log.error(
                    "history file %s: could not cut off records after a failed fsync (%s); publishing is "
                    "refused until the file is rewritten",
                    self.path,
                    exc.strerror or exc,
                )
                self._enter(FileState.REWRITE, self._why)
                return
            dropped = self.records - self._synced_records  # records, not tickets: a batch is one ticket
            self._size = self._synced_size
            self.records = self._synced_records
            # Tickets never go back (a publisher may still hold one of the cut records'): the file now holds
            # exactly the records up to `synced`, and every ticket so far is settled, one way or the other.
            self.synced = self._appended
            self._tail = (self._appended, self._size, self.records)
            self._enter(FileState.CUT, self._why)
            log.error(
                "history file %s: %s; %d unacknowledged record(s) removed, publishing refused until an fsync succeeds",
                self.path,
                self._why,
                dropped,
            )

    def _recover(self) -> None:
        """Background: a file cut back after a failed fsync is whole again once an fsync of it succeeds."""
        with self._sync_lock:
            if self._state is not FileState.CUT:
                return
            try:
                os.fsync(self._fd)
            except OSError:
                return
            self._synced_size, self._synced_records = self._size, self.records
            self._enter(FileState.OK, "")
        log.warning("history file %s: fsync works again; publishing resumes", self.path)

    def _enter(self, state: FileState, why: str) -> None:
        """Change state (under _sync_lock). A rewrite is the background thread's job: wake it."""
        self._state, self._why = state, why
        if state is FileState.REWRITE:
            self.compact_requested.set()

    # -- background --------------------------------------------------------------------------------------------

    def compaction(self, kept: Sequence[Record], stamps: Sequence[Stamp] = ()) -> "Compaction":
        """A rewrite of the file to the newest events, `kept` (taken under the bouncer's lock). Use it as a
        context manager: see Compaction for the steps, and Bouncer.compact_store() for the caller."""
        return Compaction(self, kept, stamps)

    def _adopt(self, fd: int, size: int, records: int) -> None:
        """Make `fd` the file appends go to; everything in it is on disk."""
        self._fd = fd
        self._size = self._synced_size = size
        self.records = self._synced_records = records
        self.synced = self._appended  # every ticket so far is in this file and durable
        self._tail = (self._appended, size, records)
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)

    def _rewrite(self, events: Sequence[Record]) -> None:
        """Replace the file with exactly `events` (the format conversion at start, nothing else running)."""
        with self.compaction(events) as compaction:
            compaction.finish([])

    def _run(self, compact: Callable[[], None]) -> None:
        pending = False  # a compaction is wanted (threshold, a lost file, a broken file)
        retry_at, backoff = 0.0, RETRY_START
        next_sync = next_check = time.monotonic()
        while True:
            if self.compact_requested.wait(min(CHECK_INTERVAL, self.interval)):
                self.compact_requested.clear()
                pending = True
            if self._stop.is_set():
                return  # close() fsyncs; a stop never rewrites the file
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_INTERVAL
                if self._file_lost():
                    log.error(
                        "history file %s was deleted, replaced or truncated while running; writing it anew", self.path
                    )
                    pending = True
                self._recover()
                pending = pending or self._state is FileState.REWRITE
            if pending and now >= retry_at:
                try:
                    compact()
                    pending, backoff = False, RETRY_START
                except OSError as exc:
                    log.error(
                        "history compaction failed (%s); the old file stays in force; retrying in %gs",
                        exc.strerror or exc,
                        backoff,
                    )
                    retry_at, backoff = now + backoff, min(backoff * 2, RETRY_MAX)
            if self.fsync is Fsync.INTERVAL and now >= next_sync:
                next_sync = now + self.interval
                self._sync_in_background()

    def _sync_in_background(self) -> None:
        with self._sync_lock:
            target, size, records = self._tail
            if self.synced >= target:
                return
            try:
                os.fsync(self._fd)
                self.synced, self._synced_size, self._synced_records = target, size, records
            except OSError as exc:
                log.error("history fsync failed: %s", exc.strerror or exc)

    def _file_lost(self) -> bool:
        """The path no longer names our file (deleted, replaced), or our file is shorter than what we wrote
        (truncated in place, e.g. logrotate's copytruncate: O_APPEND writes would then start a headerless file)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        with self._sync_lock:  # no cut-back in progress: the size we expect is the size it should have
            # Read before the fstat: an append (not under this lock) writes before it counts, so the file can
            # only be larger than `expected`, never falsely shorter.
            expected = self._size
            try:
                shorter = os.fstat(self._fd).st_size < expected
            except OSError:
                return False
        return (stat.st_dev, stat.st_ino) != self._identity or shorter

    def alive(self) -> bool:
        """For the watchdog: the background thread (interval fsyncs, compaction, noticing a lost file) runs."""
        return self._thread is None or self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread and fsync what was written (every mode: a clean stop loses nothing)."""
        self._stop.set()
        self.compact_requested.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                log.error("history file %s: the final fsync failed: %s", self.path, exc.strerror or exc)
            finally:
                os.close(self._fd)
                self._fd = -1


class Compaction:
    """One rewrite of the history file, in three steps, so that publishers wait only for the last one:
    1. entering (without the bouncer's lock) writes the bulk, `kept`, into `<file>.compact` and fsyncs it;
    2. finish(newer), under the bouncer's lock, appends what was written since the bulk was taken, fsyncs, and
       renames the new file over the old one: no append can fall between the two files;
    3. leaving the `with` block without finish(), or on any failure before the rename, removes the new file:
       the old one stays in force, untouched (and the caller gets OSError)."""

    def __init__(self, store: HistoryFile, kept: Sequence[Record], stamps: Sequence[Stamp] = ()):
        self._store = store
        self._kept = kept
        self._stamps = stamps  # keys still remembered whose events are older than `kept`: key records, first
        self._temp = store.path + ".compact"
        self._fd = -1
        self._size = self._records = 0  # what the new file holds so far
        self._swapped = False

    def __enter__(self) -> "Compaction":
        self._fd = os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            keys = MAGIC + b"".join(encode_key_record(stamp) for stamp in self._stamps)
            bulk = keys + encode_records(self._kept)
            write_all(self._fd, bulk)
            os.fsync(self._fd)  # the bulk is durable before the lock is taken
        except BaseException:
            self._discard()
            raise
        self._size, self._records = len(bulk), len(self._stamps) + len(self._kept)
        return self

    def finish(self, newer: Sequence[Record], start_over: Sequence[Stamp] | None = None) -> None:
        """Step 2, under the bouncer's lock. `start_over`: drop the bulk and write only these key records and
        `newer` (what was written since no longer follows on from `kept`, and the events between are dropped
        too: their keys must be among these)."""
        store, fd = self._store, self._fd
        rest = b""
        if start_over is not None:
            os.ftruncate(fd, len(MAGIC))
            self._stamps = start_over
            rest = b"".join(encode_key_record(stamp) for stamp in start_over)
            self._size, self._records = len(MAGIC), len(start_over)
        rest += encode_records(newer)
        write_all(fd, rest)
        os.fsync(fd)
        with store._sync_lock:  # no fsync of the old file may count for the new one
            if store._state is FileState.FAILED:
                # Publishers whose fsync failed have not been answered yet: `newer` may hold their events,
                # which must not be kept. Try again once they are settled.
                raise OSError(errno.EAGAIN, "a failed fsync is being settled")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the new file is ours before it has the name
            os.rename(self._temp, store.path)
            self._swapped = True
            old = store._fd
            store._adopt(fd, self._size + len(rest), self._records + len(newer))
            store.key_records = len(self._stamps)
            store._enter(FileState.OK, "")
        os.close(old)
        try:
            _fsync_directory(store.path)
        except OSError as exc:  # the new file is in force; only its name may not survive a power loss
            log.error(
                "history file %s: could not fsync its directory after compaction: %s", store.path, exc.strerror or exc
            )

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._swapped:
            return
        self._discard()
        if exc_type is None:
            raise OSError(errno.EIO, "compaction was not finished")

    def _discard(self) -> None:
        os.close(self._fd)
        try:
            os.unlink(self._temp)
        except OSError:
            pass


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _fsync_directory(path: str) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

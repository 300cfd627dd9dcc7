"""Durable history: the events behind Last-Event-ID replay, kept in a file that survives restarts and crashes.

Owns: the file format, appending a record per publish, the fsync policy, compaction to about `history_size`
events, and reading the file back at start (with the torn-tail and corruption rules).
Must not know: HTTP, subscribers, delivery. The bouncer calls append() under its lock (so file order is id
order) and sync() after it (so an fsync never holds up other publishers), and nothing above the bouncer knows
the history is on disk.

The format (all integers big-endian):
    file   = MAGIC record*
    record = length:u32 crc32:u32 payload          crc32 over the payload
    payload= id:u64 name_length:u8 name data       name and data UTF-8

Guarantees, by `history_fsync`:
- every mode: a record is written (os.write, no user-space buffer) before the publisher gets its 200, so a
  crash of the *process* (kill -9, an OOM kill) loses no acknowledged event;
- "always": fsync before the 200 (grouped: concurrent publishers share one fsync), so a crash of the *machine*
  (power loss, kernel panic) loses none either;
- "interval": fsync every `history_fsync_interval` seconds, so a machine crash loses at most that much;
- "never": the kernel writes back when it likes (typically within 30 s).

Compaction rewrites the newest events into `<file>.compact`, fsyncs it, renames it over the file and fsyncs the
directory. A crash before the rename leaves the old file whole (the leftover is deleted at the next start); a
crash after it leaves the new file whole. Either way every acknowledged, still-retained event is there.
"""

import logging
import os
import struct
import threading
import zlib

from .config import ConfigError

log = logging.getLogger("sseserver.history")

MAGIC = b"SSEHIST1\n"
_HEADER = struct.Struct(">II")
_ID = struct.Struct(">QB")
MAX_RECORD = 64 * 1024 * 1024 + 300
FSYNC_MODES = ("always", "interval", "never")


class StoredEvent:
    __slots__ = ("id", "name", "data")

    def __init__(self, event_id: int, name: str, data: str):
        self.id, self.name, self.data = event_id, name, data


def encode_record(event_id: int, name: str, data: str) -> bytes:
    name_bytes = name.encode("utf-8")
    payload = _ID.pack(event_id, len(name_bytes)) + name_bytes + data.encode("utf-8")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_records(blob: bytes, path: str) -> tuple[list[StoredEvent], int, str | None]:
    """Parse a whole file. Returns (events, length of the valid prefix, why the tail was dropped or None).
    Raises ConfigError when the file is not ours or is damaged anywhere but at its very end."""
    if not blob.startswith(MAGIC):
        if MAGIC.startswith(blob):
            return [], 0, "empty file"  # created, then crashed before the magic was complete
        raise ConfigError("history_file", f"{path} is not an sseserver history file")
    events, offset = [], len(MAGIC)
    while offset < len(blob):
        problem = None
        if len(blob) - offset < _HEADER.size:
            problem = "a partial record header"
        else:
            length, crc = _HEADER.unpack_from(blob, offset)
            end = offset + _HEADER.size + length
            if length < _ID.size or length > MAX_RECORD:
                problem = "an impossible record length"
            elif end > len(blob):
                problem = "a partial record"
            else:
                payload = blob[offset + _HEADER.size:end]
                if zlib.crc32(payload) != crc:
                    problem = "a record whose checksum does not match"
        if problem:
            if _looks_like_torn_tail(blob, offset):
                return events, offset, f"{problem} at the end (offset {offset}), left by a crash"
            raise ConfigError("history_file", f"{path} is corrupt: {problem} at offset {offset} of {len(blob)}")
        event_id, name_length = _ID.unpack_from(payload)
        try:
            name = payload[_ID.size:_ID.size + name_length].decode("utf-8")
            data = payload[_ID.size + name_length:].decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("history_file", f"{path} is corrupt: bad UTF-8 in the record at offset {offset}") from None
        if events and event_id <= events[-1].id:
            raise ConfigError("history_file", f"{path} is corrupt: ids go backwards at offset {offset}")
        events.append(StoredEvent(event_id, name, data))
        offset = end
    return events, offset, None


def _looks_like_torn_tail(blob: bytes, offset: int) -> bool:
    """A crash can only damage the last record, which a single interrupted write left short. If a whole valid
    record follows the damage, the damage is in the middle: that is corruption, never silently dropped."""
    for start in range(offset + 1, len(blob) - _HEADER.size):
        length, crc = _HEADER.unpack_from(blob, start)
        end = start + _HEADER.size + length
        if _ID.size <= length <= MAX_RECORD and end <= len(blob) and zlib.crc32(blob[start + _HEADER.size:end]) == crc:
            return False
    return True


class HistoryFile:
    """The open history file. append() is called under the bouncer's lock; sync() and compact() outside it."""

    def __init__(self, path: str, fsync: str, interval: float, keep: int):
        self.path = path
        self.fsync = fsync
        self.interval = interval
        self.keep = keep  # events to keep after compaction (history_size)
        self.records = 0  # records in the current file
        self._fd = -1
        self._appended = 0  # sequence numbers for group commit
        self._synced = 0
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.compact_requested = threading.Event()
        self._on_compact = None  # set by the bouncer: it knows which events to keep

    # -- start ---------------------------------------------------------------------------------------------------

    def load(self) -> list[StoredEvent]:
        """Open (creating with mode 0600) and read the file; returns its events, oldest first. Raises
        ConfigError naming the file for anything but a torn last record, which is cut off with a warning."""
        leftover = self.path + ".compact"
        if os.path.exists(leftover):
            log.warning("removing %s, left by a compaction that did not finish (the history file is intact)",
                        leftover)
            os.unlink(leftover)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError("history_file", f"cannot open {self.path}: {exc.strerror}") from None
        try:
            blob = _read_all(fd)
            events, valid, dropped = decode_records(blob, self.path)
            if dropped:
                if dropped != "empty file":
                    log.warning("history file %s: ignoring %s; keeping %d events", self.path, dropped, len(events))
                os.ftruncate(fd, valid)
            if valid == 0:
                os.write(fd, MAGIC)
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise ConfigError("history_file", f"cannot read {self.path}: {exc.strerror}") from None
        except ConfigError:
            os.close(fd)
            raise
        self._fd = fd
        self.records = len(events)
        return events

    def start(self) -> None:
        """The background thread: periodic fsync ("interval") and compaction."""
        self._thread = threading.Thread(target=self._run, name="sseserver-history", daemon=True)
        self._thread.start()

    # -- per publish -----------------------------------------------------------------------------------------

    def append(self, event_id: int, name: str, data: str) -> int:
        """Write one record (under the bouncer's lock). Returns a ticket for sync(). Raises OSError when the
        record could not be written: the caller must then not acknowledge the event."""
        record = encode_record(event_id, name, data)
        written = os.write(self._fd, record)
        if written != len(record):  # a short write (disk full): undo it so the file stays parseable
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - written)
            raise OSError(28, "short write to the history file")
        self.records += 1
        self._appended += 1
        if self.records > 2 * self.keep + 100:
            self.compact_requested.set()
        return self._appended

    def sync(self, ticket: int) -> None:
        """With fsync "always": return once the record behind `ticket` is on disk. Publishers that arrive
        while an fsync runs are covered by the next one, so N concurrent publishers cost ~2 fsyncs, not N."""
        if self.fsync != "always" or self._synced >= ticket:
            return
        with self._sync_lock:
            if self._synced >= ticket:
                return
            target = self._appended
            os.fsync(self._fd)
            self._synced = target

    # -- background --------------------------------------------------------------------------------------------

    def compact(self, snapshot, finish) -> None:
        """Rewrite the file to the newest events. `snapshot()` returns the events to keep (taken under the
        bouncer's lock, so no publish is half in and half out); `finish(write_rest)` runs under that lock and
        calls write_rest(fd), which appends whatever was published since the snapshot and swaps the files."""
        temp = self.path + ".compact"
        events = snapshot()
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, MAGIC + b"".join(encode_record(e.id, e.name, e.data) for e in events))
            os.fsync(fd)  # the bulk is durable before the lock is taken

            def write_rest(newer) -> None:
                os.write(fd, b"".join(encode_record(e.id, e.name, e.data) for e in newer))
                os.fsync(fd)
                os.rename(temp, self.path)
                _fsync_directory(self.path)
                old, self._fd = self._fd, fd
                os.close(old)
                self.records = len(events) + len(newer)
                self._synced = self._appended  # the new file holds everything appended so far, on disk

            finish(write_rest)
        except BaseException:
            if self._fd != fd:
                os.close(fd)
                try:
                    os.unlink(temp)
                except OSError:
                    pass
            raise

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval if self.fsync == "interval" else 1.0
            if self.compact_requested.wait(wait):
                self.compact_requested.clear()
                if self._on_compact is not None:
                    try:
                        self._on_compact()
                    except OSError as exc:
                        log.error("history compaction failed, will retry: %s", exc)
            if self.fsync == "interval" and self._synced < self._appended:
                with self._sync_lock:
                    target = self._appended
                    try:
                        os.fsync(self._fd)
                        self._synced = target
                    except OSError as exc:
                        log.error("history fsync failed: %s", exc)

    def on_compact(self, callback) -> None:
        self._on_compact = callback

    def close(self) -> None:
        """Stop the thread and fsync what was written (every mode: a clean stop loses nothing)."""
        self._stop.set()
        self.compact_requested.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1


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

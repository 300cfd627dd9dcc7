"""Durable history: real daemons restarted, killed with SIGKILL, and started on damaged files."""

import contextlib
import json
import os
import signal
import stat
import struct
import tempfile
import threading
import unittest
import zlib

from sseserver import history
from sseserver.bouncer import Bouncer, Draft
from sseserver.idempotency import fingerprint
from tests.faults import PrivateTmpfs, strace_prefix
from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    SSEClient,
    assert_exit,
    connect,
    daemon_process,
    health,
    read_response,
    request,
    require_binary,
    run_cli,
    stop_daemon,
    wait_until,
    write_config,
)


def publish_ids(port, count, prefix="e"):
    return [json.loads(request(port, "POST", "/publish", f"{prefix}{i}")[2])["id"] for i in range(count)]


class RecordFormatTest(unittest.TestCase):
    def test_records_round_trip_a_torn_last_record_is_dropped_and_damage_before_the_end_is_an_error(self):
        records = [
            history.encode_record(i, i - 1, name, data)
            for i, name, data in [(1, "message", "a"), (2, "x.y", "caf\u00e9\nline"), (3, "message", "")]
        ]
        blob = history.MAGIC + b"".join(records)
        events, valid, dropped = history.decode_records(blob, "f")
        self.assertEqual(
            [(e.id, e.name, e.data) for e in events],
            [(1, "message", "a"), (2, "x.y", "caf\u00e9\nline"), (3, "message", "")],
        )
        self.assertEqual((valid, dropped), (len(blob), None))
        for cut in range(1, len(records[-1])):  # every possible torn last write
            events, valid, dropped = history.decode_records(blob[:-cut], "f")
            self.assertEqual(len(events), 2)
            self.assertIn("left by a crash", dropped)
        damaged = bytearray(blob)
        damaged[len(history.MAGIC) + 12] ^= 0xFF  # inside the first record, with good records after it
        with self.assertRaisesRegex(history.CorruptHistory, "corrupt"):
            history.decode_records(bytes(damaged), "f")
        with self.assertRaisesRegex(history.HistoryFileError, "not an sseserver history file"):
            history.decode_records(b"something else entirely", "f")
        # Well-formed records (good checksums) that make no sense: replay would treat a predecessor that is not
        # below its event as an id it holds and send a client again what it has.
        for prev in (10, 11):
            with self.assertRaisesRegex(history.CorruptHistory, "predecessor"):
                history.decode_records(history.MAGIC + history.encode_record(10, prev, "message", "x"), "f")


class RestartTest(unittest.TestCase):
    def test_without_a_history_file_a_new_lifetime_never_reuses_ids_and_old_ids_reset(self):
        """5 publishes, restart, 10 publishes, then the first lifetime's third id: a reset, never the new
        lifetime's events passed off as the ones after it."""
        with RunningServer() as server:
            old = publish_ids(server.port, 5)
        with RunningServer() as server:
            new = publish_ids(server.port, 10)
            self.assertGreater(int(new[0]), int(old[-1]))
            with server.subscribe(headers={"Last-Event-ID": old[2]}) as client:
                notice, *rest = client.read_events(11)
                self.assertEqual(notice.type, "sseserver.reset")
                self.assertEqual([e.id for e in rest], new)

    def test_ids_and_replay_survive_a_restart(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path, history_size=100)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                ids = publish_ids(port, 5)
                request(port, "POST", "/publish?event=other", "named")
                stop_daemon(process)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                self.assertTrue(any("6 events read" in line for line in process.log_lines), process.log_lines)
                (new,) = publish_ids(port, 1, "new")
                self.assertGreater(int(new), int(ids[-1]) + 1)  # after the named event, never reused
                with SSEClient(port, headers={"Last-Event-ID": ids[2]}) as client:
                    events = client.read_events(4)
                    self.assertEqual(
                        [(e.id, e.type, e.data) for e in events],
                        [
                            (ids[3], "message", "e3"),
                            (ids[4], "message", "e4"),
                            (str(int(ids[4]) + 1), "other", "named"),
                            (new, "message", "new0"),
                        ],
                    )
                stop_daemon(process)

    def test_kill_9_loses_no_acknowledged_event(self):
        for mode in ("always", "interval"):
            with self.subTest(history_fsync=mode), tempfile.TemporaryDirectory() as tmp:
                config = write_config(
                    tmp, history_file=os.path.join(tmp, "h.log"), history_size=100000, history_fsync=mode
                )
                acknowledged: dict[str, str] = {}
                with daemon_process("--port", "0", "-c", config) as (process, port):
                    stop = threading.Event()

                    def publisher(tag):
                        try:
                            with connect(port) as sock:
                                buffer = bytearray()
                                for i in range(100000):
                                    if stop.is_set():
                                        return
                                    body = f"{tag}-{i}".encode()
                                    sock.sendall(
                                        b"POST /publish HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                                    )
                                    status, _, reply = read_response(sock, buffer)
                                    if status == 200:
                                        acknowledged[json.loads(reply)["id"]] = body.decode()
                        except (OSError, ValueError):
                            return  # the daemon died under us: whatever was acknowledged is recorded

                    threads = [threading.Thread(target=publisher, args=(t,)) for t in "ab"]
                    for thread in threads:
                        thread.start()
                    wait_until(lambda: len(acknowledged) >= 500, what="500 acknowledged publishes")
                    process.send_signal(signal.SIGKILL)  # mid-stream: publishes are in flight right now
                    assert_exit(process, -signal.SIGKILL)
                    stop.set()
                    for thread in threads:
                        thread.join(IO_TIMEOUT)
                with daemon_process("--port", "0", "-c", config) as (process, port):
                    with SSEClient(port, headers={"Last-Event-ID": "0"}) as client:
                        replayed = {}
                        last = max(int(i) for i in acknowledged)
                        while not replayed or int(max(replayed, key=int)) < last:
                            for event in client.read_events(1):
                                replayed[event.id] = event.data
                    for event_id, data in acknowledged.items():
                        self.assertEqual(replayed.get(event_id), data, f"acknowledged event {event_id} lost")
                    stop_daemon(process)


class DamagedFileTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.path = os.path.join(self.tmp, "history.log")
        self.config = write_config(self.tmp, history_file=self.path)
        with daemon_process("--port", "0", "-c", self.config) as (process, port):
            self.ids = publish_ids(port, 3)
            stop_daemon(process)

    def tearDown(self):
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_torn_last_record_is_ignored_with_a_warning(self):
        with open(self.path, "ab") as handle:
            handle.write(history.encode_record(int(self.ids[-1]) + 1, int(self.ids[-1]), "message", "torn")[:-3])
        with daemon_process("--port", "0", "-c", self.config) as (process, port):
            self.assertTrue(
                any("ignoring a partial record at the end" in line for line in process.log_lines), process.log_lines
            )
            new = publish_ids(port, 1)
            stop_daemon(process)
        events, _, dropped = history.decode_records(open(self.path, "rb").read(), self.path)
        self.assertEqual(([e.id for e in events], dropped), ([int(i) for i in self.ids + new], None))

    def test_corruption_in_the_middle_is_exit_2_naming_the_file(self):
        with open(self.path, "r+b") as handle:
            handle.seek(len(history.MAGIC) + 10)
            handle.write(b"\xff\xff")
        result = run_cli("--port", "0", "-c", self.config)
        self.assertEqual(result.returncode, 2)
        err = result.stderr.decode()
        self.assertIn(self.path, err)
        self.assertIn("corrupt", err)
        self.assertNotIn("Traceback", err)

    def test_a_file_that_is_not_history_or_cannot_be_opened_is_exit_2(self):
        with open(self.path, "wb") as handle:
            handle.write(b"hello, I am a text file\n")
        result = run_cli("--port", "0", "-c", self.config)
        self.assertEqual(result.returncode, 2)
        self.assertIn("not an sseserver history file", result.stderr.decode())
        config = write_config(self.tmp, history_file="/nonexistent/dir/history.log")
        result = run_cli("--port", "0", "-c", config)
        self.assertEqual(result.returncode, 2)
        self.assertIn("cannot open /nonexistent/dir/history.log", result.stderr.decode())

    def test_leftover_from_an_interrupted_compaction_is_discarded(self):
        with open(self.path + ".compact", "wb") as handle:
            handle.write(history.MAGIC + history.encode_record(1, 0, "message", "half-written")[:5])
        with daemon_process("--port", "0", "-c", self.config) as (process, port):
            with SSEClient(port, headers={"Last-Event-ID": "0"}) as client:
                self.assertEqual([e.data for e in client.read_events(4)][1:], ["e0", "e1", "e2"])
            stop_daemon(process)
        self.assertFalse(os.path.exists(self.path + ".compact"))


class CompactionTest(unittest.TestCase):
    def test_compaction_under_concurrent_publishing(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            with RunningServer(history_file=path, history_size=50, history_fsync="always") as server:
                acknowledged = []
                lock = threading.Lock()

                def publisher(tag):
                    with connect(server.port) as sock:
                        buffer = bytearray()
                        for _ in range(600):
                            sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\n%s" % tag)
                            status, _, reply = read_response(sock, buffer)
                            self.assertEqual(status, 200)
                            with lock:
                                acknowledged.append(int(json.loads(reply)["id"]))

                threads = [threading.Thread(target=publisher, args=(t,)) for t in (b"a", b"b")]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
                store = server.server.history
                wait_until(lambda: store.records <= 2 * 50 + 100, what="compaction")
            # After the stop: the file holds about history_size events, the newest ones, in id order.
            events, _, dropped = history.decode_records(open(path, "rb").read(), path)
            self.assertIsNone(dropped)
            ids = [e.id for e in events]
            self.assertLessEqual(len(ids), 2 * 50 + 100)
            self.assertEqual(ids, sorted(ids))
            self.assertEqual(ids[-50:], sorted(acknowledged)[-50:])
            self.assertEqual(ids, list(range(ids[0], ids[-1] + 1)))  # no gap inside what was kept


class BurstDuringCompaction(history.HistoryFile):
    """A real history file that runs `burst()` (real publishes into the real bouncer) at the one moment a
    compaction is exposed to them: after the bulk is written, before finish() takes the bouncer's lock."""

    burst = None

    @contextlib.contextmanager
    def compaction(self, kept, stamps=()):
        with super().compaction(kept, stamps) as finish:
            burst, self.burst = self.burst, None
            if burst is not None:
                burst()
            yield finish


class CompactionBurstTest(unittest.TestCase):
    def test_a_burst_during_compaction_never_leaves_a_hole_in_the_file(self):
        """An earlier version appended only what was still retained at the end of a compaction, so a burst of
        more than history_size publishes during it left a hole between the bulk and the rest, which replay
        crossed in silence once history_size was raised. Whatever the burst, the file is one unbroken chain
        ending with the newest events."""
        for burst_size in (1, 2, 3, 5, 20):
            with self.subTest(burst=burst_size), tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "history.log")
                store = BurstDuringCompaction(path, "never", 1.0, keep=2)
                store.load()
                bouncer = Bouncer(history_size=2, queue_size=1, store=store)
                ids = [bouncer.publish(f"e{i}")[0].id for i in range(6)]
                store.burst = lambda: ids.extend(bouncer.publish(f"b{i}")[0].id for i in range(burst_size))
                bouncer.compact_store()
                store.close()
                events, _, dropped = history.decode_records(open(path, "rb").read(), path)
                self.assertIsNone(dropped)
                chain = [(e.prev_id, e.id) for e in events]
                self.assertEqual([e.id for e in events], ids[-len(events) :])  # the newest, none skipped
                self.assertTrue(all(a[1] == b[0] for a, b in zip(chain, chain[1:])), chain)
                self.assertGreaterEqual(len(events), 2)


def keyed_drafts(tag, count):
    """A batch of `count` events, each with its own idempotency key (scoped as with open publishing)."""
    return [Draft("message", f"{tag}{i}", f"\n{tag}{i}", fingerprint("message", f"{tag}{i}")) for i in range(count)]


def keys_in_file(path):
    """The idempotency keys a history file gives back at start (key records and keyed events)."""
    store = history.HistoryFile(path, "never", 1.0, keep=2)
    store.load()
    store.close()
    return {stamp.key for stamp in store.key_stamps}


class KeysDuringCompactionTest(unittest.TestCase):
    """A compaction drops the records of events older than the retained ones and must write their keys as key
    records instead. An earlier version lost acknowledged keys two ways (a retry after a restart then published
    the events again): it took the keys from the key table, where a batch's keys were still pending between
    the bouncer's publish and the server completing them, and a compaction that started over (a burst pushed
    the snapshot out of the ring) dropped the events published meanwhile without writing their keys."""

    def test_the_keys_of_a_batch_published_just_before_a_compaction_are_kept(self):
        for fsync in ("always", "never"):
            with self.subTest(fsync=fsync), tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "history.log")
                acknowledged = set()
                with RunningServer(history_file=path, history_size=2, history_fsync=fsync) as running:
                    server = running.server
                    publish_batch = server.bouncer.publish_batch

                    def publish_then_compact(drafts):
                        published = publish_batch(drafts)
                        server.bouncer.compact_store(server.keys.stamps_before)  # what the history thread runs
                        return published

                    server.bouncer.publish_batch = publish_then_compact
                    for round_ in range(3):
                        drafts = keyed_drafts(f"r{round_}-", 10)
                        self.assertEqual(server.publish_drafts(drafts).count, 10)
                        acknowledged.update(draft.key for draft in drafts)
                self.assertEqual(acknowledged - keys_in_file(path), set())

    def test_the_keys_of_a_burst_that_makes_a_compaction_start_over_are_kept(self):
        for fsync in ("always", "never"):
            with self.subTest(fsync=fsync), tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "history.log")
                acknowledged = set()
                # max_batch_bytes=1: no room for bursts, so a burst pushes the compaction's snapshot out of the ring
                config = {"history_size": 2, "queue_size": 1, "max_batch_bytes": 1, "history_fsync": fsync}
                with RunningServer(history_file=path, **config) as running:
                    server = running.server

                    def publish(tag):
                        drafts = keyed_drafts(tag, 10)
                        self.assertEqual(server.publish_drafts(drafts).count, 10)
                        acknowledged.update(draft.key for draft in drafts)

                    compaction = server.history.compaction
                    bursts = [lambda: [publish(f"b{i}-") for i in range(4)]]

                    @contextlib.contextmanager
                    def burst_during(kept, stamps=()):
                        with compaction(kept, stamps) as finish:
                            if bursts:
                                bursts.pop()()
                            yield finish

                    server.history.compaction = burst_during
                    publish("a-")
                    publish("c-")
                    server.bouncer.compact_store(server.keys.stamps_before)
                    self.assertEqual(bursts, [])
                self.assertEqual(acknowledged - keys_in_file(path), set())

    def test_a_failed_fsync_of_a_batch_takes_its_events_off_the_record_count(self):
        """The records count events, but a batch is one ticket: the cut-back subtracted tickets."""
        with tempfile.TemporaryDirectory() as tmp:
            store = history.HistoryFile(os.path.join(tmp, "history.log"), "always", 1.0, keep=2)
            store.load()
            try:
                bouncer = Bouncer(history_size=2, queue_size=1, store=store)
                bouncer.publish("before")
                self.assertEqual(store.records, 1)
                events = [history.StoredEvent(i, i - 1, "message", "x") for i in range(10**15, 10**15 + 5)]
                store.append_many(events)
                store.append_many(events[:2])
                self.assertEqual(store.records, 8)
                with store._sync_lock:
                    store._enter(history.FileState.FAILED, "a simulated fsync failure")
                store.discard_unsynced()
                self.assertEqual(store.records, 1)
            finally:
                store.close()


class WatchdogTest(unittest.TestCase):
    def test_the_watchdog_needs_the_history_thread(self):
        """A dead history thread means no interval fsyncs, compactions or lost-file checks: systemd's watchdog
        must restart the daemon (an earlier version looked at the writers and the Redis follower only)."""
        with tempfile.TemporaryDirectory() as tmp, RunningServer(history_file=os.path.join(tmp, "h.log")) as server:
            self.assertTrue(server.server.healthy())
            store = server.server.history
            store._stop.set()  # what close() does: the thread ends, as if it had died
            store.compact_requested.set()
            store._thread.join(IO_TIMEOUT)
            self.assertFalse(server.server.healthy())


def ascii_record_inside(event_id: int) -> str:
    """Text whose UTF-8 bytes are a whole valid record (a publisher can put anything in an event)."""
    for attempt in range(100_000):
        data = f"payload-{attempt}"
        record = history.encode_record(event_id, event_id - 1, "message", data)
        if record.isascii() and b"\n" not in record and b"\r" not in record:
            return record.decode("ascii")
    raise AssertionError("no ASCII record found")


def child_pid(pid: int) -> int:
    """The process a wrapper (strace, nsenter) started: the daemon to send a signal to."""

    def find():
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children = handle.read().split()
            if children:
                return int(children[0])
        return None

    return wait_until(find, what=f"a child of {pid}")


class FormatTest(unittest.TestCase):
    def test_a_torn_last_record_whose_payload_embeds_a_valid_record_is_still_a_torn_tail(self):
        embedded = ascii_record_inside(7)
        records = [
            history.encode_record(1, 0, "message", "a"),
            history.encode_record(2, 1, "message", "x" * 40 + embedded + "y" * 40),
        ]
        blob = history.MAGIC + b"".join(records)
        for cut in (1, 20, 39):  # the write was cut after the embedded record: it is whole in what is left
            events, valid, dropped = history.decode_records(blob[:-cut], "f")
            self.assertEqual([e.id for e in events], [1])
            self.assertIn("left by a crash", dropped)
        events, valid, dropped = history.decode_records(blob + b"\0" * 100, "f")  # zero-filled after a power cut
        self.assertEqual(([e.id for e in events], valid), ([1, 2], len(blob)))

    def test_a_file_of_the_first_format_is_read_and_converted(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            v1 = history.MAGIC1
            for event_id, data in ((5, "a"), (6, "b")):
                payload = struct.pack(">QB", event_id, 7) + b"message" + data.encode()
                v1 += struct.pack(">II", len(payload), zlib.crc32(payload)) + payload
            with open(path, "wb") as handle:
                handle.write(v1)
            config = write_config(tmp, history_file=path)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                with SSEClient(port, headers={"Last-Event-ID": "4"}) as client:  # 5's predecessor: no reset
                    self.assertEqual([(e.id, e.data) for e in client.read_events(2)], [("5", "a"), ("6", "b")])
                stop_daemon(process)
            with open(path, "rb") as handle:
                self.assertTrue(handle.read().startswith(history.MAGIC))


class FileFaultTest(unittest.TestCase):
    """Faults the kernel really raises: a full tmpfs, fsync failing under strace, a file deleted under us."""

    def test_disk_full_during_compaction_keeps_the_old_file_and_every_acknowledged_event(self):
        with tempfile.TemporaryDirectory() as tmp, PrivateTmpfs("512k") as disk:
            config = write_config(
                tmp, history_file=disk.inside("history.log"), history_size=100, max_message_bytes=4096
            )
            acknowledged, refused = {}, 0
            with daemon_process("--port", "0", "-c", config, prefix=disk.prefix()) as (process, port):

                def publish(i):
                    nonlocal refused
                    status, _, body = request(port, "POST", "/publish", f"{i:05d}" + "z" * 1200)
                    if status == 200:
                        acknowledged[json.loads(body)["id"]] = f"{i:05d}" + "z" * 1200
                    else:
                        self.assertEqual(status, 503)
                        refused += 1

                for i in range(280):  # below the compaction threshold (2 x 100 + 100 records)
                    publish(i)
                # Leave room for a few more records, but not for the compacted copy (100 records, ~125 KB).
                free = os.statvfs(disk.path("")).f_bavail * os.statvfs(disk.path("")).f_frsize
                with open(disk.path("filler"), "wb") as filler:
                    filler.write(b"\0" * (free - 40 * 1024))
                for i in range(280, 420):
                    publish(i)
                process.send_signal(signal.SIGKILL)  # a crash, right after the failures (nsenter exec'd the daemon)
                assert_exit(process, -signal.SIGKILL)
                log = process.log_lines
            os.unlink(disk.path("filler"))
            with daemon_process("--port", "0", "-c", config, prefix=disk.prefix()) as (process, port):
                newest = sorted(acknowledged, key=int)[-100:]
                with SSEClient(port, headers={"Last-Event-ID": "0"}) as client:
                    replayed = {e.id: e.data for e in client.read_events(101) if e.type == "message"}
                for event_id in newest:
                    self.assertEqual(replayed.get(event_id), acknowledged[event_id], f"event {event_id} lost")
                stop_daemon(process)
            self.assertGreater(refused, 0, "the disk never filled up")
            self.assertTrue(any("compaction failed" in line for line in log), log)

    def test_a_failed_fsync_is_503_and_the_event_is_never_delivered_nor_replayed(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path, history_fsync="always")
            with daemon_process("--port", "0", "-c", config) as (process, port):  # creates the file
                stop_daemon(process)
            # strace counts calls per thread: on one keep-alive connection (one request thread) the first
            # publish's fsync succeeds and every later one fails. Starting on an existing file needs no fsync.
            with daemon_process("--port", "0", "-c", config, prefix=strace_prefix("fsync", "EIO", 2)) as (
                process,
                port,
            ):
                with SSEClient(port) as client, connect(port) as publisher:
                    buffer = bytearray()
                    for data, expected in (("stored", 200), ("lost-1", 503), ("lost-2", 503)):
                        publisher.sendall(
                            b"POST /publish HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data.encode())
                        )
                        status, _, body = read_response(publisher, buffer)
                        self.assertEqual(status, expected, body)
                        if status == 503:
                            self.assertIn(b"not published", body)
                            buffer.clear()
                            publisher.close()
                            publisher = connect(port)
                    stop_daemon(process, pid=child_pid(process.pid))  # the daemon, not strace
                    self.assertEqual([e.data for e in client.read_until_closed()], ["stored"])
                self.assertFalse(any("Traceback" in line for line in process.log_lines), process.log_lines)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                with SSEClient(port, headers={"Last-Event-ID": "0"}) as client:
                    self.assertEqual([e.data for e in client.read_events(2)][1:], ["stored"])
                    self.assertEqual(request(port, "POST", "/publish", "retried")[0], 200)
                    self.assertEqual([e.data for e in client.read_events(1)], ["retried"])
                stop_daemon(process)
            events, _, _ = history.decode_records(open(path, "rb").read(), path)
            self.assertEqual([e.data for e in events], ["stored", "retried"])

    def test_a_failed_directory_fsync_after_compaction_still_appends_to_the_new_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path, history_size=10, history_fsync="never")
            # With "never", the history thread's only fsyncs are a compaction's: the bulk, the rest, then the
            # directory. Fail the third and all after it: the rename happened, its directory entry is not durable,
            # and no later compaction on that thread could repair anything.
            with daemon_process("--port", "0", "-c", config, prefix=strace_prefix("fsync", "EIO", 3)) as (
                process,
                port,
            ):
                with connect(port) as publisher:  # one request thread: its fsyncs are not counted with the others
                    buffer = bytearray()
                    acknowledged = []
                    for _ in range(125):  # past 2 x 10 + 100 records: one compaction
                        publisher.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\nx")
                        status, _, body = read_response(publisher, buffer)
                        self.assertEqual(status, 200)
                        acknowledged.append(json.loads(body)["id"])
                    wait_until(
                        lambda: any(" error " in line for line in process.log_lines),
                        what="the failed directory fsync in the log",
                    )
                    for _ in range(5):  # these must reach the file now in force, not the unlinked old one
                        publisher.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\ny")
                        status, _, body = read_response(publisher, buffer)
                        acknowledged.append(json.loads(body)["id"])
                os.kill(child_pid(process.pid), signal.SIGKILL)
                assert_exit(process, -signal.SIGKILL)  # strace ends as its child did
            events, _, _ = history.decode_records(open(path, "rb").read(), path)
            self.assertEqual([str(e.id) for e in events][-10:], acknowledged[-10:])

    def test_a_clean_stop_does_not_rewrite_the_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path, history_size=0)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                ids = publish_ids(port, 3)
                inode = os.stat(path).st_ino
                stop_daemon(process)
            self.assertEqual(os.stat(path).st_ino, inode)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                self.assertGreater(int(publish_ids(port, 1)[0]), int(ids[-1]))  # never back to 1
                stop_daemon(process)

    def test_a_history_file_deleted_while_running_is_written_anew(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                ids = publish_ids(port, 3)
                os.unlink(path)
                ids += publish_ids(port, 1, "after")

                def rewritten():
                    try:
                        events, _, _ = history.decode_records(open(path, "rb").read(), path)
                    except OSError:
                        return False
                    return [str(e.id) for e in events] == ids

                wait_until(rewritten, what="the history file written anew")
                stop_daemon(process)

    def test_raising_history_size_on_reload_moves_the_compaction_threshold(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path, history_size=10)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                write_config(tmp, history_file=path, history_size=1000)
                process.send_signal(signal.SIGHUP)
                wait_until(lambda: any("reloaded" in line for line in process.log_lines), what="the reload")
                inode = os.stat(path).st_ino
                publish_ids(port, 200)  # past 2 x 10 + 100, far below 2 x 1000 + 100
                self.assertEqual(request(port, "GET", "/health")[0], 200)
                self.assertEqual(os.stat(path).st_ino, inode, "the file was compacted for the old size")
                stop_daemon(process)


class ReloadTest(unittest.TestCase):
    def test_a_reload_in_either_direction_keeps_replay_exact_and_health_true(self):
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(tmp, history_size=5, queue_size=2)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                ids = publish_ids(port, 10)  # the ring holds 7 (5 + 2), replay reaches ids[3:]
                reloads = 0
                for history_size in (50, 3, 20):
                    write_config(tmp, history_size=history_size, queue_size=2)
                    process.send_signal(signal.SIGHUP)
                    reloads += 1
                    wait_until(
                        lambda: sum("reloaded" in line for line in process.log_lines) == reloads, what="the reload"
                    )
                    retained = health(port)["history_size"]
                    self.assertLessEqual(retained, len(ids))
                    held = ids[len(ids) - retained :]
                    # Every id replays exactly what is held after it, or resets: never a 500, never a gap.
                    for last in ids:
                        with SSEClient(port, headers={"Last-Event-ID": last}) as client:
                            self.assertEqual(client.status, 200)
                            if last in held or int(last) == int(held[0]) - 1:
                                expected = [i for i in held if int(i) > int(last)]
                                if expected:
                                    self.assertEqual([e.id for e in client.read_events(len(expected))], expected)
                            else:
                                notice, *rest = client.read_events(1 + len(held))
                                self.assertEqual(notice.type, "sseserver.reset")
                                self.assertEqual([e.id for e in rest], held)
                    ids += publish_ids(port, 2)
                stop_daemon(process)


class FileFaultReviewTest(unittest.TestCase):
    """Faults a hostile review found after the first round of fixes; each failed then."""

    def test_a_damaged_length_anywhere_is_corruption_never_a_torn_tail(self):
        records = [history.encode_record(i, i - 1, "message", f"event-{i}") for i in range(1, 6)]
        blob = history.MAGIC + b"".join(records)
        offset = len(history.MAGIC)
        for index, record in enumerate(records):
            for bit in range(32):  # every bit of the length field: one bit flip must never look like a crash
                damaged = bytearray(blob)
                damaged[offset + bit // 8] ^= 1 << (bit % 8)
                with self.subTest(record=index, bit=bit), self.assertRaisesRegex(history.CorruptHistory, "corrupt"):
                    history.decode_records(bytes(damaged), "f")
            offset += len(record)

    def test_a_second_daemon_on_the_same_file_refuses_to_start(self):
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(tmp, history_file=os.path.join(tmp, "history.log"))
            with daemon_process("--port", "0", "-c", config) as (process, port):
                publish_ids(port, 2)
                result = run_cli("--port", "0", "-c", config)
                self.assertEqual(result.returncode, 2)
                self.assertIn("in use by another sseserver process", result.stderr.decode())
                publish_ids(port, 1)  # the first one is unharmed
                stop_daemon(process)

    def test_a_file_truncated_in_place_is_written_anew(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                ids = publish_ids(port, 5)
                os.truncate(path, 0)  # logrotate's copytruncate
                ids += publish_ids(port, 5, "after")
                wait_until(
                    lambda: any("truncated" in line for line in process.log_lines), what="the truncation noticed"
                )
                stop_daemon(process)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                with SSEClient(port, headers={"Last-Event-ID": "0"}) as client:
                    self.assertEqual([e.id for e in client.read_events(11)][1:], ids)
                stop_daemon(process)

    def test_a_failed_fsync_racing_with_the_background_retry_never_brings_the_event_back(self):
        """X's third fsync is slow and fails; Y takes the bouncer lock and holds it (a slow write) while X waits
        to settle, and the background thread meanwhile finds fsync working again. X and Y get 503, and neither
        event may reach a stream or come back after a restart."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "history.log")
            config = write_config(tmp, history_file=path, history_fsync="always")
            with daemon_process("--port", "0", "-c", config) as (process, port):  # creates the file
                stop_daemon(process)
            injection = [
                "strace",
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=fsync,write",
                "-e",
                "inject=fsync:error=EIO:delay_enter=400000:when=3",
                "-e",
                "inject=write:delay_exit=1500000:when=1",
            ]
            require_binary("strace")
            statuses = {}
            with daemon_process("--port", "0", "-c", config, prefix=injection) as (process, port):
                with SSEClient(port) as client, connect(port) as x:
                    buffer_x = bytearray()
                    for data in (b"p1", b"p2", b"p3"):
                        x.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n" + data)
                        if data != b"p3":
                            statuses[data] = read_response(x, buffer_x)[0]
                    with connect(port) as y:
                        y.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\np4")
                        statuses[b"p3"] = read_response(x, buffer_x)[0]
                        statuses[b"p4"] = read_response(y, bytearray())[0]
                    with connect(port) as z:
                        z.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\np5")
                        statuses[b"p5"] = read_response(z, bytearray())[0]
                    stop_daemon(process, pid=child_pid(process.pid))
                    delivered = [e.data for e in client.read_until_closed()]
            self.assertEqual((statuses[b"p1"], statuses[b"p2"]), (200, 200))
            published = [data.decode() for data, status in sorted(statuses.items()) if status == 200]
            self.assertEqual(delivered, published)
            events, _, _ = history.decode_records(open(path, "rb").read(), path)
            self.assertEqual([e.data for e in events], published)


if __name__ == "__main__":
    unittest.main()

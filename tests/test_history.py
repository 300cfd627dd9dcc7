"""Durable history: real daemons restarted, killed with SIGKILL, and started on damaged files."""

import json
import os
import signal
import stat
import tempfile
import threading
import unittest

from sseserver import history
from sseserver.config import ConfigError
from tests.support import (IO_TIMEOUT, STOP_TIMEOUT, RunningServer, SSEClient, connect, daemon_process,
                           read_response, request, run_cli, wait_until, write_config)


def publish_ids(port, count, prefix="e"):
    return [json.loads(request(port, "POST", "/publish", f"{prefix}{i}")[2])["id"] for i in range(count)]


class RecordFormatTest(unittest.TestCase):
    def test_round_trip_and_tail_rules(self):
        records = [history.encode_record(i, i - 1, name, data) for i, name, data in
                   [(1, "message", "a"), (2, "x.y", "caf\u00e9\nline"), (3, "message", "")]]
        blob = history.MAGIC + b"".join(records)
        events, valid, dropped = history.decode_records(blob, "f")
        self.assertEqual([(e.id, e.name, e.data) for e in events],
                         [(1, "message", "a"), (2, "x.y", "caf\u00e9\nline"), (3, "message", "")])
        self.assertEqual((valid, dropped), (len(blob), None))
        for cut in range(1, len(records[-1])):  # every possible torn last write
            events, valid, dropped = history.decode_records(blob[:-cut], "f")
            self.assertEqual(len(events), 2)
            self.assertIn("left by a crash", dropped)
        damaged = bytearray(blob)
        damaged[len(history.MAGIC) + 12] ^= 0xFF  # inside the first record, with good records after it
        with self.assertRaisesRegex(ConfigError, "corrupt"):
            history.decode_records(bytes(damaged), "f")
        with self.assertRaisesRegex(ConfigError, "not an sseserver history file"):
            history.decode_records(b"something else entirely", "f")


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
                process.send_signal(signal.SIGTERM)
                self.assertEqual(process.wait(STOP_TIMEOUT), 0)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            with daemon_process("--port", "0", "-c", config) as (process, port):
                self.assertTrue(any("6 events read" in line for line in process.log_lines), process.log_lines)
                (new,) = publish_ids(port, 1, "new")
                self.assertGreater(int(new), int(ids[-1]) + 1)  # after the named event, never reused
                with SSEClient(port, headers={"Last-Event-ID": ids[2]}) as client:
                    events = client.read_events(4)
                    self.assertEqual([(e.id, e.type, e.data) for e in events],
                                     [(ids[3], "message", "e3"), (ids[4], "message", "e4"),
                                      (str(int(ids[4]) + 1), "other", "named"), (new, "message", "new0")])
                process.send_signal(signal.SIGTERM)
                process.wait(STOP_TIMEOUT)

    def test_kill_9_loses_no_acknowledged_event(self):
        for mode in ("always", "interval"):
            with self.subTest(history_fsync=mode), tempfile.TemporaryDirectory() as tmp:
                config = write_config(tmp, history_file=os.path.join(tmp, "h.log"), history_size=100000,
                                      history_fsync=mode)
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
                                    sock.sendall(b"POST /publish HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                                                 % (len(body), body))
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
                    process.wait(STOP_TIMEOUT)
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
                    process.send_signal(signal.SIGTERM)
                    process.wait(STOP_TIMEOUT)


class DamagedFileTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.path = os.path.join(self.tmp, "history.log")
        self.config = write_config(self.tmp, history_file=self.path)
        with daemon_process("--port", "0", "-c", self.config) as (process, port):
            self.ids = publish_ids(port, 3)
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_TIMEOUT)

    def tearDown(self):
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_torn_last_record_is_ignored_with_a_warning(self):
        with open(self.path, "ab") as handle:
            handle.write(history.encode_record(int(self.ids[-1]) + 1, int(self.ids[-1]), "message", "torn")[:-3])
        with daemon_process("--port", "0", "-c", self.config) as (process, port):
            self.assertTrue(any("ignoring a partial record at the end" in line for line in process.log_lines),
                            process.log_lines)
            new = publish_ids(port, 1)
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_TIMEOUT)
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

    def test_not_a_history_file_and_unreadable_directory(self):
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
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_TIMEOUT)
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
                        for i in range(600):
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


if __name__ == "__main__":
    unittest.main()

"""`systemctl restart` without disconnects, at the protocol level: the test plays systemd. Its notify socket keeps
the descriptors a stopping daemon sends with FDSTORE=1 (by FDNAME), drops them on FDSTOREREMOVE=1 and answers
BARRIER=1, and the test starts the next daemon with them at fds 3, 4, ... and LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID,
as systemd does. Real processes, real sockets, a stream held by real `curl -N`; the same checks as the upgrade
tests: no stream closed, every acknowledged event received exactly once, in order. Then the ways it can fail:
a state from a future version, no state at all, a client gone while its socket sat in the store, no store.
"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

from sseserver import fdstore, handover, systemd
from sseserver.daemon import Command, Mailbox
from tests import ssereader
from tests.support import (
    IO_TIMEOUT,
    assert_exit,
    daemon_process,
    health,
    listening_socket,
    request,
    require_binary,
    wait_for_subscribers,
    write_config,
)
from tests.fakesystemd import STORE_SIZE, FakeSystemd
from tests.test_handover import Publisher, StreamSet, curl_data, curl_stream, publish, stalled_stream


def small_state(listen_fd: int, stream_fds) -> handover.State:
    """A state with these descriptors and nothing else."""
    sequence = handover.IdSequence(1, 1, 1, 0, None, False, 0)
    streams = tuple(handover.StreamState(fd, None, None, 1, 1, b"", None, "", 0.0, 0, 0, "") for fd in stream_fds)
    return handover.State(listen_fd, 3000, sequence, (), streams)


def log_of(*processes) -> str:
    return "\n".join(line for process in processes for line in list(process.log_lines))


class RestartTest(unittest.TestCase):
    def setUp(self):
        self.systemd = FakeSystemd()
        self.addCleanup(self.systemd.close)
        self.env = {"NOTIFY_SOCKET": self.systemd.address, "FDSTORE": str(STORE_SIZE)}

    def stop_into_store(self, process: subprocess.Popen, streams: int) -> list[str]:
        """SIGTERM: the daemon stores its listener, `streams` streams and the state, then exits 0."""
        os.kill(process.pid, signal.SIGTERM)
        assert_exit(process, 0)
        names = self.systemd.names()
        self.assertEqual(names[0], fdstore.LISTEN)
        self.assertEqual(names[-2:], [fdstore.CLAIM, fdstore.STATE])  # the state last: without it no hand-over
        self.assertEqual(len(names), streams + 3)
        self.assertTrue(all(re.fullmatch(r"sse-\d+", name) for name in names[1:-2]))
        self.assertEqual(self.systemd.messages[-1], "BARRIER=1")  # it waited for systemd before exiting
        return names

    def started(self, process: subprocess.Popen) -> None:
        """The next process said READY=1, by which time it has emptied the store."""
        self.systemd.wait_for(
            lambda: any(m.startswith("READY=1") for m in self.systemd.messages[self.mark :]), "READY=1"
        )
        self.assertEqual(self.systemd.names(), [], "the next start left descriptors in the store")

    def next_start(self, fds=None, args=(), **kwargs):
        self.mark = len(self.systemd.messages)
        passed = self.systemd.passed() if fds is None else fds
        return daemon_process("--port", "0", *args, env=self.env, fds=passed, **kwargs)

    def test_streams_survive_two_restarts_in_a_row_while_a_publisher_runs(self):
        curl = require_binary("curl")
        with daemon_process("--port", "0", env=self.env) as (first, port):
            streams = StreamSet(self, port, 40)
            browser_like = curl_stream(self, curl, port)
            wait_for_subscribers(port, 41)
            with Publisher(port) as publisher:
                publisher.wait_for(10)
                self.stop_into_store(first, 41)
                with self.next_start() as (second, second_port):
                    self.assertEqual(second_port, port)  # the stored listener: nobody bound anything
                    self.started(second)
                    publisher.wait_for(10)  # publishes queued in the listener during the gap, and new ones
                    self.stop_into_store(second, 41)
                    with self.next_start() as (third, _):
                        self.started(third)
                        publisher.wait_for(10)
                        acknowledged = publisher.stop()
                        streams.assert_received_exactly(self, acknowledged)
                        self.assertEqual(health(port)["subscribers"], 41)
                        log = log_of(first, second, third)
            # curl saw the same, on one connection that never ended
            self.assertEqual(curl_data(self, browser_like, len(acknowledged)), [data for _, data in acknowledged])
        # the time and the memory of each hand-over are in the log
        self.assertEqual(
            len(re.findall(r"streams kept in systemd's fd store: 41 stream\(s\).* in \d+ ms \(state \d+ bytes", log)), 2
        )
        self.assertEqual(len(re.findall(r"restart: adopted 41 stream\(s\) .*\(\d+ ms, state \d+ bytes\)", log)), 2)
        self.assertEqual(log.count("adopted from systemd's fd store"), 2)
        self.assertNotIn("Traceback", log)

    def test_unsent_bytes_go_first_and_whole_and_ids_replay_and_keys_continue(self):
        """A stream whose socket was full when the daemon stopped: the bytes the kernel had not taken travel in the
        state and the next process sends them before anything else, so every event arrives whole, once, in order.
        The id sequence, the history and the idempotency keys travel too."""
        tmp = tempfile.mkdtemp(prefix="sseserver-fdstore-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = write_config(tmp, queue_size=1000)  # a stalled reader stays (it is not slow yet)
        with daemon_process("--port", "0", "-c", path, env=self.env) as (first, port):
            reader, stalled = stalled_stream(self, port)
            keyed = lambda: request(port, "POST", "/publish", "once", headers={"Idempotency-Key": "k-1"})  # noqa: E731
            status, _, first_reply = keyed()
            self.assertEqual(status, 200)
            once = (int(json.loads(first_reply)["id"]), "once")
            big = [f"{n:04d}" + "x" * 60000 for n in range(100)]  # 6 MB: more than a 4 KB window and the buffers
            expected = [once, *((publish(port, data), data) for data in big)]
            self.stop_into_store(first, 1)
            with self.next_start(args=("-c", path)) as (second, _):
                self.started(second)
                carried = re.findall(r"of which (\d+) unsent to 1 blocked stream", log_of(first))
                self.assertTrue(carried and int(carried[0]) > 0, "no unsent bytes were carried")
                status, _, body = keyed()  # a retry from before the restart is still a repeat
                self.assertEqual((status, json.loads(body)), (200, {**json.loads(first_reply), "duplicate": True}))
                expected.append((publish(port, "after"), "after"))
                self.assertGreater(expected[-1][0], expected[-2][0])
                reader.resume(stalled)
                events = lambda: StreamSet.events(stalled)  # noqa: E731
                reader.wait(lambda: len(events()) >= len(expected), IO_TIMEOUT)
                with reader.lock:
                    self.assertEqual(events(), expected)
                    self.assertFalse(stalled.ended)
                # a reconnect with an id from the old process replays from the new one's history
                _, _, again = ssereader.open_stream(
                    port,
                    "/subscribe",
                    {"Accept": "text/event-stream", "Last-Event-ID": str(expected[-3][0])},
                    IO_TIMEOUT,
                )
                self.addCleanup(again.sock.close)
                reader.add(again)
                reader.wait(lambda: len(StreamSet.events(again)) >= 2, IO_TIMEOUT)
                with reader.lock:
                    self.assertEqual(StreamSet.events(again), expected[-2:])

    def test_a_state_from_a_future_version_ends_the_streams_so_they_reconnect_and_the_daemon_starts(self):
        def future(blob: bytes) -> int:
            self.assertIn(b'"version":1,', blob)
            return [handover.sealed_memfd(blob.replace(b'"version":1,', b'"version":99,', 1))]

        self.serve_without_adopting(future, "the hand-over state has format version 99; this code reads only 1")

    def test_stored_streams_without_a_state_end_so_they_reconnect_and_the_daemon_starts(self):
        self.serve_without_adopting(lambda blob: [], "no state was stored with them")

    def test_a_state_that_cannot_be_read_at_all_is_refused(self):
        def a_socket(blob: bytes) -> list[int]:
            with socket.socket() as sock:  # not a memfd: reading it fails (ESPIPE)
                return [os.dup(sock.fileno())]

        self.serve_without_adopting(a_socket, "the hand-over state is not readable")

    def test_two_stored_states_are_both_refused(self):
        """Only a lost FDSTOREREMOVE could leave an older state next to the current one; adopting the older one
        would send its events a second time, so neither is used."""
        two = lambda blob: [handover.sealed_memfd(blob), handover.sealed_memfd(blob)]  # noqa: E731
        self.serve_without_adopting(two, "2 states were stored, and which one is current cannot be told")

    def serve_without_adopting(self, new_state, why: str) -> None:
        """The next start cannot use the stored state (`new_state(blob)` gives the memfds it finds instead): one
        log line says why, every stored stream ends (a FIN, no bytes that could split an event), and
        the daemon serves on the stored listener."""
        with daemon_process("--port", "0", env=self.env) as (first, port):
            streams = StreamSet(self, port, 5)
            wait_for_subscribers(port, 5)
            before = publish(port, "before")
            self.stop_into_store(first, 5)
            (state_fd,) = [fd for fd, name in self.systemd.passed() if name == fdstore.STATE]
            self.systemd.replace(fdstore.STATE, new_state(handover.read_fd(state_fd)))
            with self.next_start() as (second, _):
                self.started(second)
                self.assertTrue(streams.reader.wait(lambda: all(s.ended for s in streams.streams), IO_TIMEOUT))
                with streams.reader.lock:
                    for stream in streams.streams:
                        self.assertEqual(StreamSet.events(stream), [(before, "before")])
                (line,) = [line for line in second.log_lines if "restart: ending" in line]
                self.assertIn(f"restart: ending 5 stored stream(s), which reconnect: {why}", line)
                wait_for_subscribers(port, 0)
                reconnected = StreamSet(self, port, 1)  # the daemon serves as after any restart
                after = publish(port, "after")
                reconnected.assert_received_exactly(self, [(after, "after")])

    def test_a_client_gone_while_its_socket_sat_in_the_store_is_dropped_and_the_others_stay(self):
        with daemon_process("--port", "0", env=self.env) as (first, port):
            streams = StreamSet(self, port, 6)
            wait_for_subscribers(port, 6)
            self.stop_into_store(first, 6)
            gone = streams.streams.pop()
            gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close = RST
            gone.sock.close()
            with self.next_start() as (second, _):
                self.started(second)
                first_id = publish(port, "one")  # the write to the gone client fails: it is dropped
                wait_for_subscribers(port, 5)
                second_id = publish(port, "two")
                streams.assert_received_exactly(self, [(first_id, "one"), (second_id, "two")])
                self.assertNotIn("Traceback", log_of(second))

    def test_a_socket_units_listener_is_served_and_the_stored_copy_of_it_closed(self):
        listener = listening_socket()
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        inode = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
        with daemon_process("--port", "1", env=self.env, listen_socket=listener) as (first, _):
            streams = StreamSet(self, port, 3)
            wait_for_subscribers(port, 3)
            self.stop_into_store(first, 3)
            unit = [(listener.fileno(), "sseserver.socket")]  # systemd passes a socket unit's sockets first
            with self.next_start(fds=unit + self.systemd.passed()) as (second, _):
                self.started(second)
                fds = os.listdir(f"/proc/{second.pid}/fd")
                holding = [fd for fd in fds if os.readlink(f"/proc/{second.pid}/fd/{fd}") == inode]
                self.assertEqual(holding, ["3"])  # the socket unit's, once; the stored copy is closed
                event_id = publish(port, "via the socket unit")
                streams.assert_received_exactly(self, [(event_id, "via the socket unit")])

    def test_without_a_usable_store_sigterm_drains_as_before(self):
        tmp = tempfile.mkdtemp(prefix="sseserver-fdstore-")
        self.addCleanup(shutil.rmtree, tmp, True)
        cases = [
            ("no FDSTORE", {"NOTIFY_SOCKET": self.systemd.address}, (), None),
            ("too small", {**self.env, "FDSTORE": "2"}, (), "the fd store holds 2 descriptors, 4 needed"),
            ("history_file", self.env, ("-c", write_config(tmp, history_file=f"{tmp}/h.log")), "history_file"),
        ]
        for case, env, args, why in cases:
            with self.subTest(case), daemon_process("--port", "0", *args, env=env) as (process, port):
                streams = StreamSet(self, port, 1)
                wait_for_subscribers(port, 1)
                os.kill(process.pid, signal.SIGTERM)
                assert_exit(process, 0)
                self.assertTrue(streams.reader.wait(lambda: streams.streams[0].ended, IO_TIMEOUT))
                retries = [item for item in streams.streams[0].items if isinstance(item, ssereader.Retry)]
                self.assertTrue(retries, "the stream ended without a jittered retry:")
                self.assertEqual(self.systemd.names(), [])
                if why:
                    self.assertIn(why, log_of(process))

    def quick_config(self) -> str:
        """A config whose fd-store waits (upgrade_timeout) are short, for tests where systemd does not answer."""
        tmp = tempfile.mkdtemp(prefix="sseserver-fdstore-")
        self.addCleanup(shutil.rmtree, tmp, True)
        return write_config(tmp, upgrade_timeout=1)

    def test_a_store_systemd_may_still_hold_ends_every_stream_without_a_byte(self):
        """systemd stops reading while a stop stores: the store times out and so does taking it back. Its
        messages may still be handled after this process is gone, the state with each stream's unsent bytes
        among them, so the stop writes nothing more to any stream (it resumed and drained: the next process then
        sent the same bytes again, duplicates and half an event): a FIN each, no `retry:`, and it exits 0."""
        path = self.quick_config()
        with daemon_process("--port", "0", "-c", path, env=self.env) as (first, port):
            streams = StreamSet(self, port, 3)
            wait_for_subscribers(port, 3)
            before = publish(port, "before")
            streams.assert_received_exactly(self, [(before, "before")])
            self.systemd.stop_reading()  # the store's messages queue up (as many as fit), unanswered
            os.kill(first.pid, signal.SIGTERM)
            assert_exit(first, 0)
            self.assertTrue(streams.reader.wait(lambda: all(s.ended for s in streams.streams), IO_TIMEOUT))
            with streams.reader.lock:
                for stream in streams.streams:
                    self.assertEqual(StreamSet.events(stream), [(before, "before")])
                    self.assertIsInstance(stream.items[-1], ssereader.Event)  # nothing after it: no `retry:`
            self.assertIn("systemd did not confirm taking it back: ended 3 stream(s) without writing", log_of(first))

    def stored_then_busy(self, path: str) -> int:
        """A stop stores 2 streams, then systemd stops reading with its queue full: the next start's removes
        cannot even be sent. Returns the port."""
        with daemon_process("--port", "0", "-c", path, env=self.env) as (first, port):
            StreamSet(self, port, 2)
            wait_for_subscribers(port, 2)
            self.stop_into_store(first, 2)
        self.systemd.stop_reading()
        self.systemd.fill_queue()
        return port

    def test_names_systemd_did_not_confirm_removing_at_start_are_removed_while_serving(self):
        """systemd busy while the next start empties the store. It serves anyway (ending the stored streams),
        and asks again from its control loop until systemd confirms, so that the old state does not sit in the
        store, to be adopted by a later start, while this process serves."""
        path = self.quick_config()
        port = self.stored_then_busy(path)
        with self.next_start(args=("-c", path)) as (second, _):
            self.assertIn("systemd did not confirm removing them", log_of(second))
            self.assertEqual(len(self.systemd.names()), 5)  # still there
            self.systemd.start_reading()
            self.systemd.wait_for(lambda: not self.systemd.store, "the names to be removed")
            StreamSet(self, port, 1)
            wait_for_subscribers(port, 1)
            self.stop_into_store(second, 1)  # and the next stop stores as usual
        self.assertIn("systemd removed the 5 name(s) passed at start", log_of(second))

    def test_a_stop_while_names_from_the_start_may_still_be_stored_drains_instead(self):
        """Stored next to the previous start's names, a stop's own could be taken for theirs: it drains."""
        path = self.quick_config()
        port = self.stored_then_busy(path)
        with self.next_start(args=("-c", path)) as (second, _):
            streams = StreamSet(self, port, 1)
            wait_for_subscribers(port, 1)
            os.kill(second.pid, signal.SIGTERM)
            assert_exit(second, 0)
            self.assertTrue(streams.reader.wait(lambda: streams.streams[0].ended, IO_TIMEOUT))
            with streams.reader.lock:
                self.assertTrue(any(isinstance(i, ssereader.Retry) for i in streams.streams[0].items))
        self.assertIn("names from the previous start may still be there", log_of(second))
        self.systemd.start_reading()

    def test_a_state_a_start_took_is_never_adopted_again_when_its_removal_was_lost(self):
        """The next start's removes lost (systemd busy, then that process crashed): a later start is passed the
        old state again. Adopting it would take the ids back and skip what the crashed process acknowledged; the
        claim stored with the state, which the first start marked, says it is stale."""
        with daemon_process("--port", "0", env=self.env) as (first, port):
            streams = StreamSet(self, port, 3)
            wait_for_subscribers(port, 3)
            before = publish(port, "before")
            self.stop_into_store(first, 3)
            lost = [(os.dup(fd), name) for fd, name in self.systemd.passed()]  # as if the removes never arrived
            self.addCleanup(fdstore.close, [fd for fd, _ in lost])
            with self.next_start() as (second, _):
                self.started(second)
                acknowledged = publish(port, "acknowledged")
                streams.assert_received_exactly(self, [(before, "before"), (acknowledged, "acknowledged")])
                second.kill()
                second.wait(IO_TIMEOUT)
            with self.next_start(fds=lost) as (third, _):
                self.assertNotIn("adopted from systemd's fd store", log_of(third))
                self.assertIn(
                    "restart: ending 3 stored stream(s), which reconnect: the state was taken by an earlier start",
                    log_of(third),
                )
                self.assertTrue(streams.reader.wait(lambda: all(s.ended for s in streams.streams), IO_TIMEOUT))
                self.assertGreater(publish(port, "later"), acknowledged)

    def test_two_stored_streams_under_one_name_are_both_ended(self):
        """Which of the two the state describes cannot be told: neither is adopted, both get a FIN (one of them
        leaked: neither adopted nor ended), and the other streams are adopted."""
        with daemon_process("--port", "0", env=self.env) as (first, port):
            streams = StreamSet(self, port, 3)
            wait_for_subscribers(port, 3)
            names = self.stop_into_store(first, 3)
            passed = [(fd, names[1] if name == names[2] else name) for fd, name in self.systemd.passed()]
            with self.next_start(fds=passed) as (second, _):
                ended = lambda: sum(s.ended for s in streams.streams) == 2  # noqa: E731
                self.assertTrue(streams.reader.wait(ended, IO_TIMEOUT))
                self.assertIn("restart: ending 2 stored stream(s) that share a name with another", log_of(second))
                kept = [s for s in streams.streams if not s.ended]
                after = publish(port, "after")
                streams.reader.wait(lambda: StreamSet.events(kept[0]), IO_TIMEOUT)
                with streams.reader.lock:
                    self.assertEqual(StreamSet.events(kept[0]), [(after, "after")])

    def test_a_port_changed_for_a_restart_that_serves_the_stored_listener_is_logged(self):
        with daemon_process("--port", "0", env=self.env) as (first, port):
            StreamSet(self, port, 1)
            wait_for_subscribers(port, 1)
            self.stop_into_store(first, 1)
            with self.next_start(args=("--port", "1")) as (second, second_port):
                self.started(second)
                self.assertEqual(second_port, port)
                (line,) = [line for line in second.log_lines if "serving the listening socket from" in line]
                self.assertIn(f"port {port}; the configured 127.0.0.1 port 1 applies once", line)


class ProtocolTest(unittest.TestCase):
    def test_passed_descriptors_sort_into_roles_by_name(self):
        cases = [
            ([], fdstore.Passed()),
            ([(3, "unknown")], fdstore.Passed(listeners=(3,))),
            (
                [(3, "sseserver.socket"), (4, "sse-listen"), (5, "sse-17"), (6, "sse-claim"), (7, "sse-state")],
                fdstore.Passed(
                    listeners=(3,),
                    listen=(4,),
                    states=(7,),
                    claims=(6,),
                    streams=((17, 5),),
                    stored=("sse-listen", "sse-17", "sse-claim", "sse-state"),
                ),
            ),
            (
                [(3, "sse-state"), (4, "sse-state"), (5, "sse-x"), (6, "sse-v2-thing")],
                fdstore.Passed(
                    states=(3, 4),
                    unknown=(5, 6),
                    stored=("sse-state", "sse-x", "sse-v2-thing"),
                ),
            ),
        ]
        for passed, expected in cases:
            with self.subTest(passed=passed):
                self.assertEqual(fdstore.sort(passed), expected)

    def test_listen_fdnames_name_each_passed_descriptor(self):
        pid = str(os.getpid())
        cases = [
            ({"LISTEN_FDS": "2", "LISTEN_PID": pid}, [(3, "unknown"), (4, "unknown")]),
            ({"LISTEN_FDS": "2", "LISTEN_PID": pid, "LISTEN_FDNAMES": "a:b"}, [(3, "a"), (4, "b")]),
            (
                {"LISTEN_FDS": "3", "LISTEN_PID": pid, "LISTEN_FDNAMES": "a::"},
                [(3, "a"), (4, "unknown"), (5, "unknown")],
            ),
            ({"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a"}, []),
            ({"LISTEN_FDS": "x", "LISTEN_PID": pid}, []),
        ]
        for environ, expected in cases:
            with self.subTest(environ=environ):
                self.assertEqual(systemd.listen_fds(environ), expected)
        self.assertEqual([fdstore.capacity({"FDSTORE": v}) for v in ("", "x", "-1", "0", "65536")], [0, 0, 0, 0, 65536])

    def test_the_control_loop_wakes_when_its_own_descriptors_are_above_1024(self):
        """After a restart the streams sit at 3, 4, ..., so the control loop's sockets come after them. It slept in
        select(), which cannot watch a descriptor above 1,023: the first 10,000-stream restart crashed there."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        fillers = [os.dup(0)]
        while fillers[-1] < 1030:
            fillers.append(os.dup(0))
        try:
            mailbox = Mailbox()  # both its sockets now get numbers above 1,030
            self.addCleanup(mailbox.close)
            mailbox.put(Command.RELOAD)
            self.assertIs(mailbox.get(IO_TIMEOUT), Command.RELOAD)
            self.assertIsNone(mailbox.get(0.01))
        finally:
            for fd in fillers:
                os.close(fd)

    def test_a_store_too_small_or_with_names_the_next_start_could_not_be_run_with_is_refused(self):
        self.assertIsNone(fdstore.refusal(small_state(3, range(10, 20)), 13))
        self.assertIn("holds 12 descriptors, 13 needed", fdstore.refusal(small_state(3, range(10, 20)), 12))
        self.assertIsNone(fdstore.refusal(small_state(3, range(10_000, 22_000)), 65538))  # 12,000 streams fit
        self.assertIn("LISTEN_FDNAMES would be", fdstore.refusal(small_state(3, range(10_000, 23_000)), 65538))
        # The limit is the kernel's: at it (with the room left for a socket unit's names) a program still runs.
        fits = {"LISTEN_FDNAMES": "x" * (fdstore.NAMES_LIMIT + 4096)}
        self.assertEqual(subprocess.run(["true"], env=fits).returncode, 0)
        with self.assertRaises(OSError):
            subprocess.run(["true"], env={"LISTEN_FDNAMES": fits["LISTEN_FDNAMES"] + "x"})

    def test_a_store_systemd_does_not_confirm_is_taken_back_state_first_and_reported_unconfirmed(self):
        """No answer to BARRIER=1 (here: nobody reads the socket): store() gives up by its deadline, after asking
        systemd to drop what it sent, the state first, and says that systemd did not confirm that either: the
        messages may still be handled after the stopping process is gone."""
        tmp = tempfile.mkdtemp(prefix="sseserver-fdstore-")
        self.addCleanup(shutil.rmtree, tmp, True)
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(mute.close)
        mute.bind(f"{tmp}/notify")
        listener, (stream, peer) = listening_socket(), socket.socketpair()
        for sock in (listener, stream, peer):
            self.addCleanup(sock.close)
        state = small_state(listener.fileno(), [stream.fileno()])
        started = time.monotonic()
        with self.assertRaises(fdstore.StoreFailed) as failed:
            fdstore.store(state, handover.encode(state), {"NOTIFY_SOCKET": f"{tmp}/notify"}, started + 0.5)
        self.assertFalse(failed.exception.taken_back)
        self.assertIn("TimeoutError", str(failed.exception))
        mute.settimeout(IO_TIMEOUT)
        received = []
        while len(received) < 10:
            data, ancillary, _, _ = mute.recvmsg(4096, socket.CMSG_SPACE(4))
            for _, _, payload in ancillary:
                os.close(int.from_bytes(payload[:4], "little"))
            received.append(data.decode())
        name = f"sse-{stream.fileno()}"
        self.assertEqual(
            received,
            [
                "FDSTORE=1\nFDNAME=sse-listen",
                f"FDSTORE=1\nFDNAME={name}",
                "FDSTORE=1\nFDNAME=sse-claim",
                "FDSTORE=1\nFDNAME=sse-state",
                "BARRIER=1",
                "FDSTOREREMOVE=1\nFDNAME=sse-state",
                "FDSTOREREMOVE=1\nFDNAME=sse-claim",
                f"FDSTOREREMOVE=1\nFDNAME={name}",
                "FDSTOREREMOVE=1\nFDNAME=sse-listen",
                "BARRIER=1",
            ],
        )

    def test_a_take_back_systemd_confirms_is_reported_taken_back_and_leaves_nothing_stored(self):
        """systemd handles the store but answers its barrier too late: the take-back's own barrier, answered,
        proves that every message before it was handled, the removes included."""
        fake = FakeSystemd()
        self.addCleanup(fake.close)
        fake.hold_barriers = 1
        listener, (stream, peer) = listening_socket(), socket.socketpair()
        for sock in (listener, stream, peer):
            self.addCleanup(sock.close)
        state = small_state(listener.fileno(), [stream.fileno()])
        with self.assertRaises(fdstore.StoreFailed) as failed:
            fdstore.store(state, handover.encode(state), {"NOTIFY_SOCKET": fake.address}, time.monotonic() + 0.5)
        self.assertTrue(failed.exception.taken_back)
        self.assertEqual(fake.names(), [])
        self.assertEqual(fake.messages[-1], "BARRIER=1")


if __name__ == "__main__":
    unittest.main()

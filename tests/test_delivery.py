"""The writer threads at their edges: after they have stopped, and against a client that talks on its stream."""

import os
import time
import unittest

from sseserver.bouncer import Bouncer
from sseserver.delivery import STREAM_INPUT_LIMIT, Delivery, EndReason
from tests.support import IO_TIMEOUT, RunningServer, wait_for_subscribers


class StoppedWriterTest(unittest.TestCase):
    def test_a_publish_after_the_writers_stopped_writes_to_no_file(self):
        """A writer closes its eventfd when it ends, and a publish racing the stop still wakes it. By then the
        kernel may have handed that fd number to another file (it always gives out the lowest free number),
        which must not get a stray 8-byte write."""
        bouncer = Bouncer(10, 10)
        delivery = Delivery(bouncer, 1, 1.0)
        delivery.start()
        (writer,) = delivery.writers
        number = writer._wake_fd
        self.assertTrue(delivery.close_all(0, time.monotonic() + IO_TIMEOUT))
        opened = []
        try:
            while not opened or opened[-1] != number:  # take fd numbers until the writer's comes round again
                self.assertLess(len(opened), 100_000, f"fd {number} never came back")
                opened.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            bouncer.publish("late")
            with self.assertRaises(BlockingIOError):  # nothing was written to it
                os.eventfd_read(number)
        finally:
            for fd in opened:
                os.close(fd)


class StreamInputTest(unittest.TestCase):
    def test_a_client_flooding_its_own_stream_is_dropped_and_a_stray_line_end_is_not(self):
        with RunningServer(heartbeat_interval=60) as server, server.subscribe() as client:
            wait_for_subscribers(server.port, 1)
            client.sock.sendall(b"\r\n")  # what a sloppy client may send after its request: ignored
            server.publish("still here")
            self.assertEqual([e.data for e in client.read_events(1)], ["still here"])
            junk = b"x" * 65536
            try:
                for _ in range(4 * 1024 * 1024 // len(junk)):  # far more than a stream may send
                    client.sock.sendall(junk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped on the way, as it should be
            wait_for_subscribers(server.port, 0)  # the flooding stream dropped
            self.assertEqual(server.server.delivery.dropped().get(EndReason.FLOODING), 1)
            self.assertEqual(client.read_until_closed(), [])
        self.assertLess(STREAM_INPUT_LIMIT, 4 * 1024 * 1024)


if __name__ == "__main__":
    unittest.main()

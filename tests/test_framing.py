"""framing.py: byte-exact encodings, driven by one table that also feeds the spec-following reader back."""

import unittest

from sseserver import framing
from tests.support import SSEClient

# (payload, id, name, exact wire bytes, what a browser dispatches as data)
CASES = [
    ("Hey!", 1, None, b"id: 1\ndata: Hey!\n\n", "Hey!"),
    ("", 2, None, b"id: 2\ndata: \n\n", ""),
    ("a\nb", 3, None, b"id: 3\ndata: a\ndata: b\n\n", "a\nb"),
    ("a\rb", 4, None, b"id: 4\ndata: a\ndata: b\n\n", "a\nb"),
    ("a\r\nb", 5, None, b"id: 5\ndata: a\ndata: b\n\n", "a\nb"),
    ("a\r\rb", 6, None, b"id: 6\ndata: a\ndata: \ndata: b\n\n", "a\n\nb"),
    ("a\n\r\nb", 7, None, b"id: 7\ndata: a\ndata: \ndata: b\n\n", "a\n\nb"),
    ("\n", 8, None, b"id: 8\ndata: \ndata: \n\n", "\n"),
    ("end\r", 9, None, b"id: 9\ndata: end\ndata: \n\n", "end\n"),
    (" lead", 10, None, b"id: 10\ndata:  lead\n\n", " lead"),
    ("x", 11, "message", b"id: 11\ndata: x\n\n", "x"),
    ("x", 12, "order.created", b"id: 12\nevent: order.created\ndata: x\n\n", "x"),
    (
        "caf\u00e9 \u2603 \U0001f600",
        13,
        None,
        "id: 13\ndata: caf\u00e9 \u2603 \U0001f600\n\n".encode(),
        "caf\u00e9 \u2603 \U0001f600",
    ),
    # Characters str.splitlines() would split on, but a browser does not.
    (
        "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g",
        14,
        None,
        "id: 14\ndata: a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g\n\n".encode(),
        "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g",
    ),
    (
        "data: nested\n\nid: 99",
        15,
        None,
        b"id: 15\ndata: data: nested\ndata: \ndata: id: 99\n\n",
        "data: nested\n\nid: 99",
    ),
    ("x" * 100_000, 16, None, b"id: 16\ndata: " + b"x" * 100_000 + b"\n\n", "x" * 100_000),
    ("no id", None, None, b"data: no id\n\n", "no id"),
]


class FeedReader(SSEClient):
    """The test suite's spec reader, fed bytes directly instead of from a socket."""

    def __init__(self):  # no socket: only the parser state
        self.init_parser()

    def feed(self, data: bytes):
        self._feed(data)
        return self._interpret()


class FramingTest(unittest.TestCase):
    def test_encode_event_table(self):
        for data, event_id, name, wire, _ in CASES:
            with self.subTest(data=data[:40], name=name):
                self.assertEqual(framing.encode_event(data, event_id, name), wire)

    def test_a_spec_reader_gets_the_payload_back_whole_and_byte_by_byte(self):
        for data, _event_id, name, wire, seen in CASES:
            with self.subTest(data=data[:40]):
                whole = FeedReader().feed(wire)
                self.assertEqual([(e.type, e.data) for e in whole], [(name or "message", seen)])
                reader, events = FeedReader(), []
                for index in range(len(wire) if len(wire) < 2000 else 0):
                    events += reader.feed(wire[index : index + 1])
                if len(wire) < 2000:
                    self.assertEqual([e.data for e in events], [seen])

    def test_trailing_garbage_does_not_dispatch_a_partial_event(self):
        events = FeedReader().feed(framing.encode_event("ok", 1) + b"data: never finished")
        self.assertEqual([e.data for e in events], ["ok"])

    def test_split_lines_only_on_cr_lf_crlf(self):
        self.assertEqual(framing.split_lines("a\r\nb\rc\nd\u2028e"), ["a", "b", "c", "d\u2028e"])

    def test_a_heartbeat_fires_nothing_and_may_move_the_last_event_id(self):
        self.assertEqual(framing.encode_heartbeat(), b":\n\n")
        reader = FeedReader()
        self.assertEqual(reader.feed(framing.encode_heartbeat() + framing.encode_heartbeat(42)), [])
        self.assertEqual(reader.last_id, "42")

    def test_retry_is_written_only_for_a_non_negative_integer(self):
        self.assertEqual(framing.encode_retry(2500), b"retry: 2500\n\n")
        for bad in (-1, 1.5, True, "10"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                framing.encode_retry(bad)

    def test_jittered_retry_spread(self):
        self.assertEqual(framing.encode_jittered_retry(3000, 0.0), b"retry: 3000\n\n")
        self.assertEqual(framing.encode_jittered_retry(3000, 0.5), b"retry: 6000\n\n")
        self.assertEqual(framing.encode_jittered_retry(200, 0.999999), b"retry: 2199\n\n")  # spread >= 2 s

    def test_id_only_block_moves_the_id_without_an_event(self):
        reader = FeedReader()
        self.assertEqual(reader.feed(b":\n" + framing.encode_id_only(42)), [])
        self.assertEqual(reader.last_id, "42")

    def test_event_names_are_1_to_64_of_a_z_0_9_dot_colon_dash_underscore_and_not_reserved(self):
        for good in ("a", "order.created", "A-Z_0:9", "x" * 64):
            self.assertIsNone(framing.event_name_error(good), good)
        for bad in ("", "x" * 65, "a b", "a\nb", "a\rb", "caf\u00e9", "sseserver.reset", "sseserver.x"):
            self.assertIsNotNone(framing.event_name_error(bad), bad)

    def test_never_emits_a_bom(self):
        self.assertFalse(framing.encode_event("\ufeffx", 1).startswith(b"\xef\xbb\xbf"))


if __name__ == "__main__":
    unittest.main()

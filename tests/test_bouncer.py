"""bouncer.py: ids, counts, the replay decision and the slow rule, without any socket."""

import json
import unittest

from sseserver.bouncer import Bouncer
from tests.test_framing import FeedReader


def ids_of(bouncer, sub):
    data, count, _, end = bouncer.collect(bouncer.ring, sub.cursor, bouncer.head, sub.names)
    assert end == bouncer.head
    return [int(event.id) for event in FeedReader().feed(data)]


class BouncerTest(unittest.TestCase):
    def test_ids_increase_and_counts_follow_filters(self):
        bouncer = Bouncer(history_size=10, queue_size=4)
        everyone = bouncer.subscribe(None, None).subscriber
        bouncer.subscribe(frozenset({"a"}), None)
        bouncer.subscribe(frozenset({"a", "b"}), None)
        self.assertEqual(bouncer.publish("x")[1], 1)
        self.assertEqual(bouncer.publish("x", "a")[1], 3)
        self.assertEqual(bouncer.publish("x", "b")[1], 2)
        self.assertEqual([bouncer.publish("x")[0].id for _ in range(3)], [4, 5, 6])
        self.assertEqual(bouncer.subscriber_count, 3)
        bouncer.unsubscribe(everyone)
        self.assertEqual((bouncer.subscriber_count, bouncer.publish("x")[1]), (2, 0))

    def test_limit(self):
        bouncer = Bouncer(10, 4)
        self.assertNotIsInstance(bouncer.subscribe(None, None, limit=1), str)
        self.assertEqual(bouncer.subscribe(None, None, limit=1), "full")
        self.assertNotIsInstance(bouncer.subscribe(None, None, peer="b", per_peer_limit=1), str)
        self.assertEqual(bouncer.subscribe(None, None, peer="b", per_peer_limit=1), "peer full")

    def test_replay_from_a_known_id(self):
        bouncer = Bouncer(history_size=5, queue_size=2)
        for _ in range(8):
            bouncer.publish("x")
        # retained: ids 4..8; a client that saw 3 has missed nothing
        for last, expected in [("3", [4, 5, 6, 7, 8]), ("6", [7, 8]), ("8", [])]:
            with self.subTest(last=last):
                replay = bouncer.subscribe(None, last)
                self.assertIsNone(replay.reset)
                self.assertEqual(ids_of(bouncer, replay.subscriber), expected)

    def test_reset_when_the_id_cannot_be_placed(self):
        bouncer = Bouncer(history_size=5, queue_size=2)
        for _ in range(8):
            bouncer.publish("x")
        for last in ("2", "0", "abc", "-1", "9", "99999999999999999999999", ""):
            with self.subTest(last=last):
                replay = bouncer.subscribe(None, last)
                reader = FeedReader()
                (notice,) = reader.feed(replay.reset)
                self.assertEqual(notice.type, "sseserver.reset")
                self.assertEqual(json.loads(notice.data), {"last_event_id": last, "oldest_id": "4"})
                self.assertEqual(reader.last_id, "3")
                self.assertEqual(ids_of(bouncer, replay.subscriber), [4, 5, 6, 7, 8])

    def test_empty_history(self):
        bouncer = Bouncer(history_size=0, queue_size=2)
        self.assertIsNone(bouncer.subscribe(None, "0").reset)
        bouncer.publish("x")
        self.assertIsNone(bouncer.subscribe(None, "1").reset)
        notice = FeedReader().feed(bouncer.subscribe(None, "0").reset)[0]
        self.assertEqual(json.loads(notice.data)["oldest_id"], None)

    def test_filtered_replay(self):
        bouncer = Bouncer(history_size=10, queue_size=2)
        for name in ("a", "b", "a", "c"):
            bouncer.publish(name, name)
        sub = bouncer.subscribe(frozenset({"a", "c"}), "1").subscriber
        self.assertEqual(ids_of(bouncer, sub), [3, 4])

    def test_slow_rule_counts_only_live_matching_events(self):
        bouncer = Bouncer(history_size=10, queue_size=2)
        sub = bouncer.subscribe(frozenset({"a"}), None).subscriber
        bouncer.publish("x", "b")
        bouncer.publish("x", "b")
        bouncer.publish("x", "a")
        bouncer.publish("x", "a")
        self.assertFalse(bouncer.is_slow(bouncer.ring, sub, bouncer.head))
        bouncer.publish("x", "a")
        self.assertTrue(bouncer.is_slow(bouncer.ring, sub, bouncer.head))

    def test_eviction_is_reported(self):
        bouncer = Bouncer(history_size=2, queue_size=1)
        sub = bouncer.subscribe(None, None).subscriber
        for _ in range(5):
            bouncer.publish("x")
        self.assertIsNone(bouncer.collect(bouncer.ring, sub.cursor, bouncer.head, None))
        self.assertTrue(bouncer.is_slow(bouncer.ring, sub, bouncer.head))

    def test_collect_stops_at_the_byte_limit(self):
        bouncer = Bouncer(history_size=10, queue_size=1)
        for _ in range(5):
            bouncer.publish("x" * 100)
        data, count, last_id, end = bouncer.collect(bouncer.ring, 0, bouncer.head, None, limit=250)
        self.assertEqual((count, last_id, end), (3, 3, 3))  # stops with the event that crossed the limit
        data, count, last_id, end = bouncer.collect(bouncer.ring, end, bouncer.head, None, limit=250)
        self.assertEqual((count, last_id, end), (2, 5, 5))

    def test_resize_keeps_what_fits(self):
        bouncer = Bouncer(history_size=5, queue_size=1)
        for _ in range(6):
            bouncer.publish("x")
        bouncer.resize(history_size=3, queue_size=1)
        self.assertEqual([e.id for e in bouncer.history()], [4, 5, 6])
        bouncer.resize(history_size=10, queue_size=1)
        self.assertEqual([e.id for e in bouncer.history()], [3, 4, 5, 6])
        self.assertEqual(bouncer.publish("x")[0].id, 7)


if __name__ == "__main__":
    unittest.main()

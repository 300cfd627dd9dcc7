"""bouncer.py: ids, counts, the replay decision and the slow rule, without any socket."""

import json
import random
import time
import unittest

from sseserver.access import EventFilter
from sseserver.bouncer import Bouncer, Draft, Event, Refusal, Replay, Waiter, Waiters
from sseserver.history import StoredEvent
from tests.test_framing import FeedReader


def ids_of(bouncer, sub):
    data, count, _, end = bouncer.collect(bouncer.ring, sub.cursor, bouncer.head, sub.names)
    assert end == bouncer.head
    return [int(event.id) for event in FeedReader().feed(data)]


class BouncerTest(unittest.TestCase):
    def test_ids_increase_and_counts_follow_filters(self):
        bouncer = Bouncer(history_size=10, queue_size=4, first_id=1)
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

    def test_subscribe_refuses_past_the_total_limit_and_past_the_per_peer_limit(self):
        bouncer = Bouncer(10, 4, first_id=1)
        self.assertIsInstance(bouncer.subscribe(None, None, limit=1), Replay)
        self.assertIs(bouncer.subscribe(None, None, limit=1), Refusal.FULL)
        self.assertIsInstance(bouncer.subscribe(None, None, peer="b", per_peer_limit=1), Replay)
        self.assertIs(bouncer.subscribe(None, None, peer="b", per_peer_limit=1), Refusal.PEER_FULL)

    def test_replay_from_a_known_id(self):
        bouncer = Bouncer(history_size=5, queue_size=2, first_id=1)
        for _ in range(8):
            bouncer.publish("x")
        # retained: ids 4..8; a client that saw 3 has missed nothing
        for last, expected in [("3", [4, 5, 6, 7, 8]), ("6", [7, 8]), ("8", [])]:
            with self.subTest(last=last):
                replay = bouncer.subscribe(None, last)
                self.assertIsNone(replay.reset)
                self.assertEqual(ids_of(bouncer, replay.subscriber), expected)

    def test_reset_when_the_id_cannot_be_placed(self):
        bouncer = Bouncer(history_size=5, queue_size=2, first_id=1)
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

    def test_with_no_history_only_the_newest_id_resumes_without_a_reset(self):
        bouncer = Bouncer(history_size=0, queue_size=2, first_id=1)
        self.assertIsNone(bouncer.subscribe(None, "0").reset)
        bouncer.publish("x")
        self.assertIsNone(bouncer.subscribe(None, "1").reset)
        notice = FeedReader().feed(bouncer.subscribe(None, "0").reset)[0]
        self.assertEqual(json.loads(notice.data)["oldest_id"], None)

    def test_replay_skips_events_outside_the_stream_filter(self):
        bouncer = Bouncer(history_size=10, queue_size=2, first_id=1)
        for name in ("a", "b", "a", "c"):
            bouncer.publish(name, name)
        sub = bouncer.subscribe(frozenset({"a", "c"}), "1").subscriber
        self.assertEqual(ids_of(bouncer, sub), [3, 4])

    def test_slow_rule_counts_only_live_matching_publishes(self):
        bouncer = Bouncer(history_size=10, queue_size=2, first_id=1)
        sub = bouncer.subscribe(frozenset({"a"}), None).subscriber
        bouncer.publish("x", "b")
        bouncer.publish("x", "b")
        bouncer.publish("x", "a")
        bouncer.publish("x", "a")
        waiting, counted = bouncer.publishes_waiting(bouncer.ring, sub.names, sub.live_from, bouncer.head)
        self.assertEqual(waiting, 2)
        self.assertFalse(bouncer.is_slow(waiting))
        bouncer.publish("x", "a")
        waiting, _ = bouncer.publishes_waiting(bouncer.ring, sub.names, sub.live_from, bouncer.head)
        self.assertTrue(bouncer.is_slow(waiting))
        # Counted incrementally: what was counted before is not counted again.
        self.assertEqual(
            bouncer.publishes_waiting(bouncer.ring, sub.names, sub.live_from, bouncer.head, counted), (1, 5)
        )

    def test_a_batch_counts_as_one_publish_for_every_kind_of_filter(self):
        bouncer = Bouncer(history_size=10, queue_size=2, first_id=1, room_bytes=1 << 20)
        everything = bouncer.subscribe(None, None).subscriber
        some = bouncer.subscribe(frozenset({"a"}), None).subscriber
        bouncer.publish_batch([Draft("a", str(i)) for i in range(100)])  # far more events than the whole ring
        bouncer.publish_batch([Draft("b", "x"), Draft("a", "y")])
        for sub in (everything, some):
            waiting, _ = bouncer.publishes_waiting(bouncer.ring, sub.names, sub.live_from, bouncer.head)
            self.assertEqual(waiting, 2)
            self.assertFalse(bouncer.is_slow(waiting))
            data, count, last_id, end = bouncer.collect(bouncer.ring, sub.cursor, bouncer.head, sub.names)
            self.assertEqual((last_id, end), (102, bouncer.head))  # every event of the burst is still there
        bouncer.publish("x", "a")
        self.assertTrue(bouncer.is_slow(bouncer.publishes_waiting(bouncer.ring, None, 0, bouncer.head)[0]))

    def test_the_room_stays_full_and_bounded_as_the_ring_wraps_many_times(self):
        """Singles and batches, far past the ring's capacity: the room keeps holding as much as its bytes allow
        (its count of bytes never drifts, which would release too early or too late), and never more."""
        bouncer = Bouncer(history_size=10, queue_size=2, first_id=1, room_bytes=50_000)
        rng = random.Random(5)
        while bouncer.head < 5 * bouncer.ring.capacity:
            if rng.random() < 0.2:
                bouncer.publish_batch([Draft("message", "y" * rng.randint(0, 80)) for _ in range(rng.randint(1, 3000))])
            else:
                bouncer.publish("x" * rng.randint(0, 80))
            held = [bouncer.ring.get(pos) for pos in range(bouncer.head - bouncer.ring.capacity, bouncer.head - 12)]
            size = sum(len(event.wire) for event in held if event is not None)
            self.assertLessEqual(size, 50_000)
            if bouncer.head > 2000:
                self.assertGreater(size, 50_000 - 100)  # full, but for less than one event

    def test_the_room_for_bursts_is_bounded_in_events_and_bytes(self):
        bouncer = Bouncer(history_size=10, queue_size=2, first_id=1, room_bytes=1000)
        for _ in range(300):
            bouncer.publish("x" * 20)  # a block of about 40 bytes
        kept = [pos for pos in range(bouncer.head) if bouncer.ring.get(pos) is not None]
        held = sum(len(bouncer.ring.get(pos).wire) for pos in kept[:-12])
        self.assertLessEqual(held, 1000)  # beyond history_size + queue_size, at most room_bytes
        self.assertGreater(held, 900)
        self.assertEqual(kept, list(range(kept[0], bouncer.head)))  # the newest, without a hole
        self.assertEqual(bouncer.retained(), 10)  # replay reaches history_size, as before

    def test_a_subscriber_whose_next_event_was_evicted_collects_nothing_and_is_slow(self):
        bouncer = Bouncer(history_size=2, queue_size=1, first_id=1)
        sub = bouncer.subscribe(None, None).subscriber
        for _ in range(5):
            bouncer.publish("x")
        self.assertIsNone(bouncer.collect(bouncer.ring, sub.cursor, bouncer.head, None))
        self.assertIsNone(bouncer.publishes_waiting(bouncer.ring, None, sub.cursor, bouncer.head))

    def test_collect_stops_at_the_byte_limit(self):
        bouncer = Bouncer(history_size=10, queue_size=1, first_id=1)
        for _ in range(5):
            bouncer.publish("x" * 100)
        data, count, last_id, end = bouncer.collect(bouncer.ring, 0, bouncer.head, None, limit=250)
        self.assertEqual((count, last_id, end), (3, 3, 3))  # stops with the event that crossed the limit
        data, count, last_id, end = bouncer.collect(bouncer.ring, end, bouncer.head, None, limit=250)
        self.assertEqual((count, last_id, end), (2, 5, 5))

    def test_resize_keeps_what_fits(self):
        bouncer = Bouncer(history_size=5, queue_size=1, first_id=1)
        for _ in range(6):
            bouncer.publish("x")
        bouncer.resize(history_size=3, queue_size=1)
        self.assertEqual([e.id for e in bouncer.history()], [4, 5, 6])
        bouncer.resize(history_size=10, queue_size=1)
        self.assertEqual([e.id for e in bouncer.history()], [3, 4, 5, 6])
        self.assertEqual(bouncer.publish("x")[0].id, 7)

    def test_a_lifetime_takes_its_first_id_from_the_clock_so_an_old_id_is_never_reused(self):
        before = time.time_ns() // 1000
        first = Bouncer(history_size=10, queue_size=2)
        old_ids = [first.publish("old")[0].id for _ in range(5)]
        self.assertGreaterEqual(old_ids[0], before)
        # A restart of an in-memory daemon: the new lifetime publishes past the old ids, and a client that still
        # holds one of them gets a reset, never the new lifetime's events as if they followed its own.
        second = Bouncer(history_size=10, queue_size=2)
        new_ids = [second.publish("new")[0].id for _ in range(10)]
        self.assertGreater(new_ids[0], old_ids[-1])
        replay = second.subscribe(None, str(old_ids[2]))
        self.assertIsNotNone(replay.reset)
        self.assertEqual(ids_of(second, replay.subscriber), new_ids)
        # The reset's id is the predecessor of the oldest event: reconnecting with it replays without a reset.
        self.assertIsNone(second.subscribe(None, str(new_ids[0] - 1)).reset)

    def test_growing_the_history_on_reload_keeps_replay_exact(self):
        bouncer = Bouncer(history_size=3, queue_size=1, first_id=1)
        for _ in range(6):
            bouncer.publish("x")
        bouncer.resize(history_size=10, queue_size=1)
        # Only what the old ring still held (3 history + 1 queue slot: ids 3..6), not the new size's worth.
        self.assertEqual(bouncer.retained(), 4)
        for last in range(0, 9):
            with self.subTest(last=last):
                replay = bouncer.subscribe(None, str(last))
                if last in (2, 3, 4, 5, 6):
                    self.assertIsNone(replay.reset)
                    self.assertEqual(ids_of(bouncer, replay.subscriber), list(range(last + 1, 7)))
                else:
                    self.assertIsNotNone(replay.reset)
                    self.assertEqual(ids_of(bouncer, replay.subscriber), [3, 4, 5, 6])
        for _ in range(9):
            bouncer.publish("x")
        self.assertEqual(bouncer.retained(), 10)
        self.assertIsNone(bouncer.subscribe(None, "5").reset)

    def test_a_gap_in_an_ingested_sequence_reaches_every_stream_as_a_reset(self):
        bouncer = Bouncer(history_size=10, queue_size=4, first_id=1)
        self.assertTrue(bouncer.ingest(1, "message", "a", prev_id=0))  # the first entry: nothing to have missed
        filtered = bouncer.subscribe(frozenset({"other"}), None).subscriber
        bouncer.ingest(2, "message", "b", prev_id=1)
        bouncer.ingest(10, "message", "c", prev_id=7)  # 8 and 9 never reached this instance
        self.assertFalse(bouncer.ingest(10, "message", "c", prev_id=7))  # a repeat
        data, _, _, _ = bouncer.collect(bouncer.ring, filtered.cursor, bouncer.head, filtered.names)
        (notice,) = FeedReader().feed(data)
        self.assertEqual(
            (notice.type, json.loads(notice.data)), ("sseserver.reset", {"last_event_id": "2", "oldest_id": "10"})
        )
        replay = bouncer.subscribe(None, "2")
        self.assertIsNone(replay.reset)
        events = FeedReader().feed(bouncer.collect(bouncer.ring, replay.subscriber.cursor, bouncer.head, None)[0])
        self.assertEqual([(e.type, e.data) for e in events], [("sseserver.reset", notice.data), ("message", "c")])
        self.assertEqual(ids_of(bouncer, bouncer.subscribe(None, "10").subscriber), [])
        self.assertIsNotNone(bouncer.subscribe(None, "7").reset)  # an id inside the gap is not one we hold
        self.assertEqual([e.id for e in bouncer.history()], [1, 2, 10])

    def test_a_client_told_0_was_everything_at_an_empty_instance_is_reset_when_the_first_entry_shows_a_past(self):
        """An instance joins a stream Redis emptied (FLUSHALL) and a client says Last-Event-ID 0: there is nothing
        to replay, so it is honoured. The next entry, the first of the emptied stream, names its own id - 1 as its
        predecessor: acknowledged events before it may be gone, and that client must be reset, not go on as if it
        had seen everything (found by the fault-injection model test, redis-aof seed 1)."""
        bouncer = Bouncer(history_size=10, queue_size=4, first_id=1)
        replay = bouncer.subscribe(None, "0")
        self.assertIsNone(replay.reset)
        bouncer.ingest(500, "message", "after the flush", prev_id=499)
        events = FeedReader().feed(bouncer.collect(bouncer.ring, replay.subscriber.cursor, bouncer.head, None)[0])
        self.assertEqual([e.type for e in events], ["sseserver.reset", "message"])
        self.assertEqual(json.loads(events[0].data), {"last_event_id": "0", "oldest_id": "500"})
        # Without such a promise the first entry is just the first: a stream that gave no id gets no notice.
        quiet = Bouncer(history_size=10, queue_size=4, first_id=1)
        live = quiet.subscribe(None, None).subscriber
        quiet.ingest(500, "message", "first", prev_id=499)
        events = FeedReader().feed(quiet.collect(quiet.ring, live.cursor, quiet.head, None)[0])
        self.assertEqual([e.type for e in events], ["message"])

    def test_a_loss_the_predecessors_cannot_show_resets_every_earlier_cursor_and_the_resets_cursor_is_valid(self):
        """A forced gap (the stream's writer changed, an own id never came back) and a stream that went back (a
        flush: the next entry's predecessor is below the last id here). Once the events before the spot are
        evicted, a client holding an id from before is reset, and the reset's `id:` is an id that is honoured
        (never the -1 an earlier version sent)."""
        for kind in ("forced", "backwards"):
            with self.subTest(kind=kind):
                bouncer = Bouncer(history_size=2, queue_size=1, first_id=1)
                bouncer.ingest(100, "message", "a", prev_id=0)
                bouncer.ingest(101, "message", "b", prev_id=100)
                if kind == "forced":
                    bouncer.ingest(500, "message", "c", prev_id=101, gap=True)
                else:
                    bouncer.ingest(500, "message", "c", prev_id=0)  # FLUSHALL: 0 was this stream's start once
                for cursor in ("101", "0", "100"):  # before the loss; "0" would have been honoured
                    replay = bouncer.subscribe(None, cursor)
                    feed = FeedReader().feed(
                        bouncer.collect(bouncer.ring, replay.subscriber.cursor, bouncer.head, None)[0]
                    )
                    self.assertTrue(replay.reset is not None or feed[0].type == "sseserver.reset", cursor)
                bouncer.ingest(501, "message", "d", prev_id=500)
                bouncer.ingest(502, "message", "e", prev_id=501)  # 101, the notice and 500 leave the history
                for cursor in ("101", "0", "100", "500"):
                    replay = bouncer.subscribe(None, cursor)
                    if cursor == "500":
                        self.assertIsNone(replay.reset)
                        continue
                    (reset,) = FeedReader().feed(replay.reset)
                    self.assertEqual(int(reset.id), 500)  # the predecessor of the oldest retained event, 501
                    self.assertIsNone(bouncer.subscribe(None, reset.id).reset)
                self.assertEqual(ids_of(bouncer, bouncer.subscribe(None, "500").subscriber), [501, 502])

    def test_a_known_loss_is_told_even_where_the_ids_line_up(self):
        """An id handed out twice after a Redis loss (an instance's clock ahead raised every floor): the next id
        is the last one here + 1, so no id can show the loss, but the follower knows (the chain broke)."""
        bouncer = Bouncer(history_size=10, queue_size=4, first_id=1)
        bouncer.ingest(100, "message", "a", prev_id=99)
        stream = bouncer.subscribe(None, None).subscriber
        bouncer.ingest(101, "message", "b", prev_id=100, gap=True)
        events = FeedReader().feed(bouncer.collect(bouncer.ring, stream.cursor, bouncer.head, None)[0])
        self.assertEqual(
            [(e.type, e.data) for e in events],
            [("sseserver.reset", '{"last_event_id": "100", "oldest_id": "101"}'), ("message", "b")],
        )

    def test_an_append_wakes_only_the_long_polls_whose_filter_accepts_it(self):
        """An earlier version woke every held GET /history on every publish, and each looked again under the
        bouncer's lock: 1,000 polls for a name nobody publishes cut publishing from thousands a second to tens."""
        waiters = Waiters()
        everything, wants_a, wants_b_or_c = Waiter(None), Waiter(frozenset({"a"})), Waiter(frozenset({"b", "c"}))
        scoped = Waiter(EventFilter(None, ("orders.*",)))
        for waiter in (everything, wants_a, wants_b_or_c, scoped):
            waiters.add(waiter)
        self.assertEqual(len(waiters), 4)

        def woken_by(name: str, notice: bool = False) -> set:
            for waiter in (everything, wants_a, wants_b_or_c, scoped):
                waiter.woken.clear()
            waiters.wake_for(Event(0, 1, 0, name, "", b"", 0, notice))
            return {w for w in (everything, wants_a, wants_b_or_c, scoped) if w.woken.is_set()}

        self.assertEqual(woken_by("c"), {everything, wants_b_or_c})
        self.assertEqual(woken_by("orders.created"), {everything, scoped})
        self.assertEqual(woken_by("x", notice=True), {everything, wants_a, wants_b_or_c, scoped})  # a gap: all
        waiters.remove(wants_b_or_c)
        self.assertEqual(woken_by("b"), {everything})
        for waiter in (everything, wants_a, scoped):
            waiters.remove(waiter)
        self.assertFalse(waiters)

    def test_a_hole_in_restored_history_is_replayed_with_a_reset(self):
        """A file whose predecessor chain is broken (written by an earlier version's compaction under a burst):
        replay across the hole tells the client instead of skipping it in silence."""
        stored = [
            StoredEvent(10, 9, "message", "a"),
            StoredEvent(11, 10, "message", "b"),
            StoredEvent(20, 19, "message", "c"),
            StoredEvent(21, 20, "message", "d"),
        ]
        bouncer = Bouncer(history_size=10, queue_size=4)
        bouncer.restore(stored)
        events = FeedReader().feed(
            bouncer.collect(bouncer.ring, bouncer.subscribe(None, "10").subscriber.cursor, bouncer.head, None)[0]
        )
        self.assertEqual(
            [(e.type, e.data) for e in events],
            [
                ("message", "b"),
                ("sseserver.reset", '{"last_event_id": "11", "oldest_id": "20"}'),
                ("message", "c"),
                ("message", "d"),
            ],
        )
        self.assertEqual(ids_of(bouncer, bouncer.subscribe(None, "20").subscriber), [21])
        self.assertEqual([e.id for e in bouncer.history()], [10, 11, 20, 21])

    def test_history_pages_read_back_exactly_what_a_stream_would_replay(self):
        """GET /history's pages, followed cursor to cursor with random limits and filters, give exactly the
        events a stream replaying from the same id gets, and `reset` exactly when the stream would be told.
        Seeded random steps; the seed and steps are in the message on failure."""
        for seed in range(30):
            rng = random.Random(seed)
            bouncer = Bouncer(history_size=6, queue_size=2, first_id=1)
            steps, next_id, held = [], 1, []
            for _ in range(150):
                if rng.random() < 0.6:
                    skip = rng.random() < 0.1
                    event_id = next_id + (2 if skip else 0)
                    prev = held[-1] if held else 0
                    name = rng.choice(["a", "b"])
                    bouncer.ingest(event_id, name, "x", prev_id=prev + (1 if skip else 0))
                    steps.append(f"ingest {event_id} {name}{' skip' if skip else ''}")
                    held.append(event_id)
                    next_id = event_id + 1
                    continue
                names = rng.choice([None, frozenset({"a"})])
                after = str(rng.choice(held + [0, next_id + 3])) if held and rng.random() < 0.8 else None
                limit = rng.randint(1, 4)
                steps.append(f"page after {after} names {names} limit {limit}")
                context = f"seed {seed}, steps {steps}"
                replay = bouncer.subscribe(names, after) if after is not None else None
                if replay is not None:
                    feed = FeedReader().feed(
                        bouncer.collect(bouncer.ring, replay.subscriber.cursor, bouncer.head, names)[0]
                    )
                    expected = [int(e.id) for e in feed if e.type == "message" or e.type in ("a", "b")]
                    told = replay.reset is not None or any(e.type == "sseserver.reset" for e in feed)
                else:
                    expected = [e.id for e in bouncer.history() if names is None or e.name in names]
                    told = any(
                        event.notice
                        for pos in range(bouncer.head - bouncer.retained(), bouncer.head)
                        if (event := bouncer.ring.get(pos)) is not None
                    )
                got, reset, cursor = [], False, after
                for _ in range(100):
                    page = bouncer.page(names, cursor, limit)
                    got += [event.id for event in page.events]
                    reset = reset or page.reset
                    cursor = str(page.last_id)
                    if not page.events:
                        break
                self.assertEqual(got, expected, context)
                self.assertEqual(reset, told, context)
                self.assertEqual(cursor, str(bouncer.last_id), context)  # the end of the pages is the present

    def test_replay_matches_a_model_over_random_publishes_gaps_and_reloads(self):
        """Seeded random steps; on failure the seed and the steps so far are in the message."""
        for seed in range(20):
            rng = random.Random(seed)
            bouncer = Bouncer(history_size=5, queue_size=3, first_id=1)
            model: list[tuple[int, int]] = []  # (id, prev_id) of every event, oldest first
            history_size, steps, next_id = 5, [], 1
            for _ in range(200):
                op = rng.random()
                if op < 0.6:
                    skip = rng.random() < 0.15
                    prev = model[-1][0] if model else 0
                    event_id = next_id + (rng.randint(1, 3) if skip else 0)
                    loss = rng.random()
                    # After a loss the predecessors cannot show, no earlier id is an honest cursor, except the one
                    # just below the new id: then no lost event can have had an id between the two.
                    honest = prev if event_id - 1 == prev else None
                    if model and loss < 0.05:  # the stream's writer changed (its clock moved on: a skip)
                        event_id = next_id + rng.randint(1, 3)
                        honest = None
                        bouncer.ingest(event_id, "message", "x", prev_id=prev, gap=True)
                        steps.append(f"ingest {event_id} prev {prev} gap")
                        model.append((event_id, honest))
                    elif model and loss < 0.1:  # the stream went back (a flush): its predecessor is an old id
                        back = rng.choice([0] + [e for e, _ in model])
                        bouncer.ingest(event_id, "message", "x", prev_id=back)
                        steps.append(f"ingest {event_id} prev {back} (back)")
                        model.append((event_id, honest if back < prev else back))
                    else:
                        bouncer.ingest(event_id, "message", "x", prev_id=prev + (1 if skip else 0))
                        steps.append(f"ingest {event_id} prev {prev + (1 if skip else 0)}")
                        model.append((event_id, prev + (1 if skip else 0)))
                    next_id = event_id + 1
                elif op < 0.7:
                    history_size = rng.randint(0, 8)
                    bouncer.resize(history_size, 3)
                    steps.append(f"resize {history_size}")
                else:
                    wanted = rng.choice([e for e, _ in model] + [0, next_id, next_id + 5]) if model else 0
                    steps.append(f"subscribe {wanted}")
                    replay = bouncer.subscribe(None, str(wanted))
                    feed = FeedReader().feed(
                        bouncer.collect(bouncer.ring, replay.subscriber.cursor, bouncer.head, None)[0]
                    )
                    got = [int(e.id) for e in feed if e.type == "message"]
                    told = replay.reset is not None or any(e.type == "sseserver.reset" for e in feed)
                    retained = [e.id for e in bouncer.history()]
                    held = [e for e, _ in model if e in set(retained)]
                    prev_of = dict(model)
                    context = f"seed {seed}, steps {steps}"
                    # What is sent: everything held after the client's id, or all of it after a reset.
                    self.assertEqual(
                        got, held if replay.reset is not None else [e for e in held if e > wanted], context
                    )
                    # Never a silent loss: unless the client is told, what it gets follows its id without a gap.
                    chain = [wanted] + got
                    contiguous = all(prev_of.get(b) == a for a, b in zip(chain, chain[1:])) and (
                        got or wanted == (model[-1][0] if model else 0)
                    )
                    if not contiguous:
                        self.assertTrue(told, context)
                    # Never a needless reset: an id we hold, followed by no gap, replays in silence.
                    if contiguous and (wanted in held or (held and wanted == prev_of[held[0]])):
                        self.assertFalse(told, context)
                    self.assertEqual(retained, held, context)
                    if replay.reset is not None:  # the reset's cursor is a plain id, and it is honoured
                        (reset,) = FeedReader().feed(replay.reset)
                        self.assertTrue(reset.id.isdigit(), context)
                        self.assertIsNone(bouncer.subscribe(None, reset.id).reset, context)


if __name__ == "__main__":
    unittest.main()

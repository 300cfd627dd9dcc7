"""GET /history: catching up without a stream, over real sockets (paging, filters and scopes, the reset rule,
long polls woken by a publish, ended by SIGTERM, and timing out), and real curl."""

import json
import re
import signal
import subprocess
import threading
import unittest

from tests.support import (
    IO_TIMEOUT,
    RunningServer,
    assert_exit,
    connect,
    daemon_process,
    request,
    require_binary,
    wait_until,
)

SUB = "sub-token-1"
SUB_ORDERS = "sub-orders-2"


def history(port, query: str = "", headers: dict | None = None) -> tuple[int, dict]:
    status, _, body = request(port, "GET", "/history" + (f"?{query}" if query else ""), headers=headers)
    return status, json.loads(body)


def waiting(port) -> int:
    """How many long polls the daemon holds right now (its /metrics gauge)."""
    text = request(port, "GET", "/metrics")[2].decode()
    return int(float(re.search(r"^sseserver_history_waiting (\S+)$", text, re.MULTILINE).group(1)))


class HistoryEndpointTest(unittest.TestCase):
    def test_pages_follow_the_cursor_filter_by_name_and_reset_like_a_stream(self):
        with RunningServer(history_size=5) as server:
            ids = [json.loads(server.publish(f"e{i}", event="a" if i % 2 else None)[2])["id"] for i in range(4)]
            status, page = history(server.port)
            self.assertEqual(status, 200)
            self.assertEqual(
                page["events"],
                [{"id": ids[i], "event": "a" if i % 2 else "message", "data": f"e{i}"} for i in range(4)],
            )
            self.assertEqual((page["oldest_id"], page["last_id"], page["reset"]), (ids[0], ids[3], False))
            # Paging: the cursor is the last id the answer covered, filtered-out events included.
            _, first = history(server.port, "limit=1&event=a")
            self.assertEqual(([e["data"] for e in first["events"]], first["last_id"]), (["e1"], ids[1]))
            _, second = history(server.port, f"after={first['last_id']}&event=a")
            self.assertEqual(([e["data"] for e in second["events"]], second["last_id"]), (["e3"], ids[3]))
            _, nothing_new = history(server.port, f"after={ids[3]}")
            self.assertEqual((nothing_new["events"], nothing_new["last_id"], nothing_new["reset"]), ([], ids[3], False))
            # An id that replay would not honour: reset, then everything retained, as a stream would get.
            more = [json.loads(server.publish(f"f{i}")[2])["id"] for i in range(3)]  # e0 and e1 leave history
            for after in (ids[0], "bogus", str(int(more[-1]) + 1)):
                with self.subTest(after=after):
                    _, page = history(server.port, f"after={after}")
                    self.assertTrue(page["reset"])
                    self.assertEqual([e["data"] for e in page["events"]], ["e2", "e3", "f0", "f1", "f2"])
                    self.assertEqual(page["oldest_id"], ids[2])
            _, exact = history(server.port, f"after={ids[1]}")  # the predecessor of the oldest retained event
            self.assertEqual((exact["reset"], len(exact["events"])), (False, 5))

    def test_a_token_scope_limits_what_history_shows(self):
        with RunningServer(subscribe_tokens=[SUB, f"{SUB_ORDERS} orders.*"], history_size=10) as server:
            server.publish("secret", event="payroll.run")
            server.publish("order", event="orders.created")
            self.assertEqual(history(server.port)[0], 401)
            _, page = history(server.port, headers={"Authorization": f"Bearer {SUB_ORDERS}"})
            self.assertEqual([e["data"] for e in page["events"]], ["order"])
            _, page = history(server.port, f"token={SUB}")
            self.assertEqual([e["data"] for e in page["events"]], ["secret", "order"])
            status, body = history(server.port, "event=payroll.run", headers={"Authorization": f"Bearer {SUB_ORDERS}"})
            self.assertEqual((status, body), (403, {"error": "token does not allow event 'payroll.run'"}))

    def test_bad_parameters_are_400_and_the_server_keeps_serving(self):
        with RunningServer() as server:
            for query in (
                "limit=0",
                "limit=1001",
                "limit=ten",
                "wait=-1",
                "wait=61",
                "wait=nan",
                "wait=inf",
                "event=bad%20name",
                # Only plain ASCII numbers, each parameter once (int() and float() would take these).
                "limit=1_0",
                "limit=%201",
                "wait=%D9%A3",
                "wait=1e1",
                "after=1&after=2",
                "limit=1&limit=2",
            ):
                with self.subTest(query=query):
                    status, body = history(server.port, query)
                    self.assertEqual(status, 400)
                    self.assertIsInstance(body["error"], str)
            self.assertEqual(history(server.port, "limit=1000&wait=0")[0], 200)

    def test_a_long_poll_is_held_until_a_matching_event_and_times_out_empty(self):
        with RunningServer(history_size=10) as server:
            last = json.loads(server.publish("old")[2])["id"]
            answers = []
            poll = threading.Thread(
                target=lambda: answers.append(history(server.port, f"after={last}&event=wanted&wait=30"))
            )
            poll.start()
            wait_until(lambda: waiting(server.port) == 1, what="the long poll to be held")
            server.publish("not for it", event="other")  # wakes it, matches nothing: it goes on waiting
            wait_until(lambda: waiting(server.port) == 1, what="the long poll to wait again")
            self.assertEqual(answers, [])
            server.publish("for it", event="wanted")
            poll.join(IO_TIMEOUT)
            ((status, page),) = answers
            self.assertEqual((status, [e["data"] for e in page["events"]], page["reset"]), (200, ["for it"], False))
            # Nothing arrives: an empty answer once the wait is up, with the cursor where it was.
            status, page = history(server.port, f"after={page['last_id']}&wait=0.3")
            self.assertEqual((status, page["events"], page["reset"]), (200, [], False))
            self.assertEqual(waiting(server.port), 0)

    def test_a_long_answer_is_cut_by_size_and_paging_reads_the_rest(self):
        """One GET /history must not become a huge buffer (an earlier version built 1,000 events of 64 KiB each
        into one answer): after the first event, an answer stops at about 1 MiB of data."""
        with RunningServer(history_size=10, max_message_bytes=700_000) as server:
            payloads = [f"{i}" * 600_000 for i in range(3)]
            ids = [json.loads(server.publish(p)[2])["id"] for p in payloads]
            got, after = [], None
            for _ in range(5):
                _, page = history(server.port, f"after={after}" if after else "")
                if not page["events"]:
                    break
                self.assertEqual(len(page["events"]), 1)  # 600 KB + 600 KB > 1 MiB
                got += [e["id"] for e in page["events"]]
                after = page["last_id"]
            self.assertEqual(got, ids)

    def test_a_client_that_hangs_up_during_a_long_poll_frees_its_connection(self):
        """An earlier version held the thread (and a max_connections place) for the whole wait."""
        with RunningServer(max_connections=20) as server:
            with connect(server.port) as sock:
                sock.sendall(b"GET /history?event=never&wait=60 HTTP/1.1\r\nHost: t\r\n\r\n")
                wait_until(lambda: waiting(server.port) == 1, what="the long poll to be held")
            wait_until(lambda: waiting(server.port) == 0, IO_TIMEOUT, "the hung-up poll to be let go")

    def test_sigterm_answers_a_held_long_poll_at_once_and_the_daemon_exits_cleanly(self):
        with daemon_process("--port", "0") as (process, port):
            answers = []
            poll = threading.Thread(target=lambda: answers.append(history(port, "wait=60")))
            poll.start()
            wait_until(lambda: waiting(port) == 1, what="the long poll to be held")
            process.send_signal(signal.SIGTERM)
            poll.join(IO_TIMEOUT)  # well before the 60 s wait and the 5 s shutdown_timeout would cut it
            ((status, page),) = answers
            self.assertEqual((status, page["events"]), (200, []))
            assert_exit(process, 0)

    def test_curl_catches_up_as_the_readme_shows(self):
        curl = require_binary("curl")
        with RunningServer(history_size=10) as server:
            ids = [json.loads(server.publish(f"e{i}")[2])["id"] for i in range(3)]
            result = subprocess.run(
                [curl, "-sS", f"http://127.0.0.1:{server.port}/history?after={ids[0]}"],
                capture_output=True,
                timeout=IO_TIMEOUT,
                check=True,
            )
            page = json.loads(result.stdout)
            self.assertEqual([e["data"] for e in page["events"]], ["e1", "e2"])


if __name__ == "__main__":
    unittest.main()

"""curl as a real client: the blog post's commands, verbatim apart from the port."""

import json
import subprocess
import unittest

from tests.support import IO_TIMEOUT, RunningServer, require_binary, wait_for_subscribers


class CurlTest(unittest.TestCase):
    def setUp(self):
        self.curl = require_binary("curl")

    def test_the_blog_posts_curl_commands_subscribe_and_publish(self):
        with RunningServer() as server:
            base = f"http://127.0.0.1:{server.port}"
            subscriber = subprocess.Popen([self.curl, "-N", "-s", f"{base}/subscribe"], stdout=subprocess.PIPE)
            try:
                wait_for_subscribers(server.port, 1)  # curl subscribed
                for _ in range(3):
                    out = subprocess.run(
                        [self.curl, "-s", "-X", "POST", f"{base}/publish", "-d", "Hey!"],
                        capture_output=True,
                        timeout=IO_TIMEOUT,
                        check=True,
                    ).stdout
                    self.assertEqual(json.loads(out)["subscribers"], 1)
                lines = []
                while lines.count(b"data: Hey!\n") < 3:
                    line = subscriber.stdout.readline()
                    self.assertTrue(line, "curl's stream ended early")
                    lines.append(line)
                self.assertEqual(lines[0], b"retry: 3000\n")
            finally:
                subscriber.kill()
                subscriber.wait(IO_TIMEOUT)
                subscriber.stdout.close()

    def test_chunked_upload_with_curl_T(self):
        with RunningServer() as server:
            url = f"http://127.0.0.1:{server.port}/publish?event=upload"
            result = subprocess.run(
                [self.curl, "-s", "-T", "-", url],
                input=b"line one\nline two\n",
                capture_output=True,
                timeout=IO_TIMEOUT,
                check=True,
            )
            event_id = int(json.loads(result.stdout)["id"])
            (event,) = [e for e in server.server.bouncer.history() if e.id == event_id]
            self.assertEqual((event.name, event.data), ("upload", "line one\nline two\n"))

    def test_error_body_is_json(self):
        with RunningServer() as server:
            result = subprocess.run(
                [
                    self.curl,
                    "-s",
                    "-w",
                    "\n%{http_code}",
                    "-X",
                    "POST",
                    f"http://127.0.0.1:{server.port}/publish?event=no%20spaces",
                    "-d",
                    "x",
                ],
                capture_output=True,
                timeout=IO_TIMEOUT,
                check=True,
            )
            body, code = result.stdout.rsplit(b"\n", 1)
            self.assertEqual(code, b"400")
            self.assertIn("event name", json.loads(body)["error"])


if __name__ == "__main__":
    unittest.main()

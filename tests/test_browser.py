"""The demo page in a real headless Chromium: it shows published events, and across a daemon restart (with a
history file) the browser's own EventSource reconnects with Last-Event-ID and gets every event exactly once, in
order. A screenshot is saved in the test's temp dir and checked."""

import json
import os
import shutil
import tempfile
import threading
import unittest

from tests.browser import Browser
from tests.support import (
    IO_TIMEOUT,
    daemon_process,
    listening_socket,
    request,
    stop_daemon,
    wait_for_subscribers,
    write_config,
)

ITEM_IDS = "Array.from(document.querySelectorAll('#events li')).map(li => li.dataset.id).reverse()"


class BrowserTest(unittest.TestCase):
    def setUp(self):
        self.browser = Browser()
        self.addCleanup(self.browser.close)
        self.tmp = tempfile.mkdtemp(prefix="sseserver-browser-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.config = write_config(self.tmp, history_file=os.path.join(self.tmp, "history.log"), retry_ms=200)
        self.listener = listening_socket()  # kept across the restart, as systemd's socket would be
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]

    def daemon(self):
        return daemon_process("-c", self.config, listen_socket=self.listener)

    def test_page_receives_events_and_reconnects_across_a_restart(self):
        browser = self.browser
        published = []

        def publish(data, event=None):
            path = "/publish" + (f"?event={event}" if event else "")
            status, _, body = request(self.port, "POST", path, data)
            self.assertEqual(status, 200)
            published.append(json.loads(body)["id"])

        with self.daemon() as (first, _):
            browser.open(f"http://127.0.0.1:{self.port}/")
            browser.wait_for("document.getElementById('state').textContent === 'connected'", what="connected")
            wait_for_subscribers(self.port, 1)
            publish("first message")
            publish("line one\nline two")
            publish("<b>not html</b>")
            browser.wait_for(f"{ITEM_IDS}.length === 3", what="3 events on the page")
            stop_daemon(first)
        # Between the daemons: the page notices and waits to reconnect; a publish now waits in the backlog.
        browser.wait_for("document.getElementById('state').textContent === 'reconnecting'", what="reconnecting")
        late = threading.Thread(target=publish, args=("published while down",))
        late.start()
        with self.daemon() as (second, _):
            late.join(IO_TIMEOUT)
            browser.wait_for(
                "document.getElementById('state').textContent === 'connected'",
                timeout=30,
                what="EventSource to reconnect by itself",
            )
            wait_for_subscribers(self.port, 1)
            publish("after the restart")
            publish("second after")
            browser.wait_for(f"{ITEM_IDS}.length >= 6", what="6 events on the page")
            ids = browser.evaluate(ITEM_IDS)
            self.assertEqual(ids, published)  # every event exactly once, in order, with its original id
            self.assertEqual([int(i) for i in ids], sorted({int(i) for i in ids}))  # strictly increasing
            texts = browser.evaluate(
                "Array.from(document.querySelectorAll('#events .data')).map(e => e.textContent).reverse()"
            )
            self.assertEqual(texts[:3], ["first message", "line one\nline two", "<b>not html</b>"])
            self.assertEqual(browser.evaluate("document.querySelectorAll('#events b').length"), 0)
            shot = os.path.join(self.tmp, "page.png")
            browser.screenshot(shot)
            with open(shot, "rb") as handle:
                png = handle.read()
            self.assertTrue(png.startswith(b"\x89PNG\r\n\x1a\n"))
            self.assertGreater(len(png), 10000)  # a rendered page, not a blank one
            stop_daemon(second)

    def test_the_form_publishes_and_the_filter_shows_only_the_named_events_on_a_phone_sized_page(self):
        with self.daemon() as (process, _):
            browser = self.browser
            browser.open(f"http://127.0.0.1:{self.port}/", width=390, height=844)  # a phone
            browser.wait_for("document.getElementById('state').textContent === 'connected'", what="connected")
            browser.evaluate(
                "document.getElementById('name').value = 'greeting';"
                "document.getElementById('data').value = 'hello from the form';"
                "document.getElementById('publish').requestSubmit()"
            )
            browser.wait_for(
                "document.getElementById('result').textContent.startsWith('published #1')", what="the form's publish"
            )
            browser.wait_for(
                "document.querySelector('#events li .data')?.textContent === 'hello from the form'",
                what="the form's event on the page",
            )
            browser.evaluate(
                "document.getElementById('filter').value = 'only.this';"
                "document.getElementById('filterform').requestSubmit()"
            )
            wait_for_subscribers(self.port, 1)
            browser.wait_for("document.getElementById('state').textContent === 'connected'")
            request(self.port, "POST", "/publish?event=other", "not shown")
            request(self.port, "POST", "/publish?event=only.this", "shown")
            browser.wait_for(
                "document.querySelector('#events li .data').textContent === 'shown'", what="the filtered event"
            )
            self.assertNotIn("not shown", browser.evaluate("document.getElementById('events').textContent"))
            overflow = browser.evaluate("document.documentElement.scrollWidth > window.innerWidth")
            self.assertFalse(overflow, "the page scrolls sideways on a phone")
            browser.screenshot(os.path.join(self.tmp, "phone.png"))
            stop_daemon(process)


if __name__ == "__main__":
    unittest.main()

"""A real headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe).

Chromium reads NUL-terminated JSON commands on its fd 3 and writes replies and events on its fd 4, so this needs
no WebDriver, no port and no browser download: only Debian's `chromium` and the standard library.
"""

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

from tests.support import IO_TIMEOUT, require_binary

# Flags for a closed network and a root user (see the machine notes): no sandbox, no background fetches.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
]


class Browser:
    def __init__(self):
        self.binary = require_binary("chromium")
        self.profile = tempfile.mkdtemp(prefix="sseserver-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # fds 3 and 4 in the child, whatever numbers they have here.
        script = f'exec 3<&{to_browser_r} 4>&{from_browser_w}; exec "$@"'
        self.process = subprocess.Popen(
            ["bash", "-c", script, "bash", self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session = None

    def command(self, method: str, params: dict | None = None, session: bool = True, timeout: float = IO_TIMEOUT):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError("chromium did not answer")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed its pipe")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str, width: int = 1100, height: int = 800) -> None:
        target = self.command("Target.createTarget", {"url": "about:blank"}, session=False, timeout=60)
        attached = self.command(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False
        )
        self.session = attached["sessionId"]
        self.command(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        self.command("Page.enable")
        self.command("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, what: str | None = None):
        """Poll a page expression until it is truthy (the page changes on its own: there is nothing to await)."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.evaluate(expression)
            except AssertionError as exc:  # the page may still be loading (elements not there yet)
                value, last_error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression} (last error: {last_error})")
            time.sleep(0.05)

    def screenshot(self, path: str) -> None:
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.command("Browser.close", session=False, timeout=5)
        except AssertionError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)

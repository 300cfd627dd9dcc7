"""Events -> bytes on the wire, exactly as the WHATWG HTML spec (server-sent events) reads them.

Owns: the text/event-stream byte format (fields, line splitting, comments, retry) and the rules for what an
event name or id may contain. Pure: no sockets, no threads, no config.
Must not know: HTTP, subscribers, history.

Deliberate choices, so nobody "fixes" them:
- Payloads are split on CRLF, lone CR and lone LF only. `str.splitlines()` also splits on \\v, \\f, \\x1c-\\x1e,
  \\x85, U+2028 and U+2029, which a browser does not treat as line ends, so it would corrupt such payloads.
- The browser re-joins `data:` lines with LF, so a CR or CRLF in a payload arrives as LF. That is the spec's
  lossy conversion, not ours; README documents it.
- Every line ends in LF (never CR) and the server never emits a BOM.
- `data: ` always carries its one space, so a payload line that itself starts with a space survives.
"""

import re

# The three line ends a browser recognises, longest first so CRLF is one break, not two.
_LINE_END = re.compile(r"\r\n|\r|\n")

# Event names a publisher may use: short, printable, and unable to break out of an `event:` line.
EVENT_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
RESERVED_PREFIX = "sseserver."


def split_lines(text: str) -> list[str]:
    """Split a payload into the lines a browser will see, on CRLF, CR and LF only."""
    return _LINE_END.split(text)


def encode_event(data: str, event_id: int | str | None = None, name: str | None = None) -> bytes:
    """One complete event block: `id:`, `event:` (omitted for the default `message`), one `data:` line per
    payload line (an empty payload is still one `data:` line, or the browser would never dispatch it), then the
    blank line that dispatches it."""
    parts = []
    if event_id is not None:
        parts.append(f"id: {event_id}\n")
    if name and name != "message":
        parts.append(f"event: {name}\n")
    for line in split_lines(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_heartbeat(moved_id: int | None = None) -> bytes:
    """A heartbeat: an empty comment a browser ignores, which keeps proxies from timing the stream out. With
    `moved_id` it also moves the browser's last event id (see encode_id_only): a filtered stream's reconnect then
    resumes from the present instead of replaying events it never wanted."""
    return b":\n\n" if moved_id is None else b":\n" + encode_id_only(moved_id)


def encode_retry(ms: int) -> bytes:
    """A `retry:` block. Browsers accept only ASCII digits, so the value must be a non-negative integer."""
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise ValueError(f"retry must be a non-negative integer of milliseconds, not {ms!r}")
    return f"retry: {ms}\n\n".encode("ascii")


def encode_jittered_retry(retry_ms: int, fraction: float) -> bytes:
    """A `retry:` spread over [retry_ms, retry_ms + 2 * max(retry_ms, 1 s)] by `fraction` in [0, 1), so
    thousands of browsers sent away at once (a shutdown, a full server) do not all come back in the same second.
    The caller supplies the randomness; this stays pure."""
    return encode_retry(retry_ms + int(fraction * 2 * max(retry_ms, 1000)))


def encode_id_only(event_id: int | str) -> bytes:
    """A block that moves the browser's last event id without firing an event (the spec applies `id` even when
    no data follows). Used so a filtered subscriber's cursor keeps up with events it did not want."""
    return f"id: {event_id}\n\n".encode()


def event_name_error(name: str) -> str | None:
    """Why `name` cannot be published, or None when it can."""
    if not EVENT_NAME.fullmatch(name):
        return "event name must be 1-64 characters of A-Z a-z 0-9 _ . : -"
    if name.startswith(RESERVED_PREFIX):
        return f"event names starting with {RESERVED_PREFIX!r} are reserved"
    return None

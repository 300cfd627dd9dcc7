"""Publishing: what a publish means, apart from how its request was read.

Owns: who may publish what (the publish token, the event name and the token's scope), the publish rate limit,
the body as text, the batch format (NDJSON lines, their fields, and the line-numbered errors), idempotency keys
(their syntax, and their scope: one per publish token), storing through the server and what its failures mean to
the publisher (503 not published, 504 unknown, 409 a key reused or busy), and the JSON replies.
Must not know: sockets, request parsing, responses. The handler reads a body its way and calls these in order;
a second reader (a fast path for keep-alive publishers) can call the same ones, so both mean the same.

The order of a single publish, as both callers must keep it: authorize() -> event_name() -> (read the body) ->
check_rate() -> body_text() -> publish(), or with an Idempotency-Key: idempotency_key() -> publish_keyed(). A batch:
authorize() -> (read the body) -> check_rate() -> parse_batch() -> publish_batch().

Batch lines, decided here so nobody "fixes" them:
- One JSON object per line: `{"data": "...", "event": "...", "idempotency_key": "..."}`, `data` required and a
  string, the other two optional strings. Any other field is refused (a typo such as "evnet" would otherwise
  publish an unnamed event). Lines end in LF or CRLF; the last may have no line end.
- Lines that are empty or only whitespace are skipped (an editor's or a shell's trailing newline), but counted,
  so a line number is the one an editor shows. A body with no event at all is refused.
- An object must fit on its line: JSON allows a newline between tokens, NDJSON does not.
- The whole body must be UTF-8, and data must be text a stream can carry: a JSON escape of a lone surrogate
  ("\\ud800") is refused like invalid UTF-8 in a single publish.
- Errors name the first bad line and nothing is published: 400 for the syntax, 403 for a name outside the
  token's scope, 413 for data over max_message_bytes or more than BURST_ROOM events.
- publish_rate counts requests: a batch takes one token from the bucket, like a single publish.
"""

import json
import json.scanner
import logging
import re
from collections.abc import Callable
from typing import Any

from . import access, framing
from .access import Grant, Policy
from .bouncer import BURST_ROOM, Draft, Published
from .errors import HTTPError, OutcomeUnknown, StoreError
from .idempotency import KeyBusy, KeyConflict, fingerprint

log = logging.getLogger("sseserver.http")

MAX_KEY_LENGTH = 255
# Idempotency keys: printable ASCII without spaces (a UUID, base64, a request id), so a header and a JSON string
# carry the same key and nothing in it can be mistaken for a separator.
_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}")
_SPACE = re.compile(r"[ \t\r]*")
_BLANKS = re.compile(r"[ \t\r\n]*")
_FIELDS = frozenset({"data", "event", "idempotency_key"})
# The C scanner: one JSON value at an offset of the body, without copying the line (typeshed types it oddly).
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]

# -- who may publish what ---------------------------------------------------------------------------------------


def authorize(policy: Policy, headers: dict[str, str], client: str) -> Grant:
    """The publisher's grant: 401 without a token where one is needed, 403 with a wrong one."""
    return access.authorize(policy.publish_tokens, access.bearer_token(headers), client, "publish")


def event_name(names: list[str], grant: Grant) -> str:
    """The event name of a single publish from its `?event=` values: 400 for more than one, a bad or reserved
    name; 403 when the token's scope does not allow it."""
    if len(names) > 1:
        raise HTTPError(400, "give at most one event name")
    name = names[0] if names else "message"
    problem = framing.event_name_error(name)
    if problem:
        raise HTTPError(400, problem)
    if not access.scope_allows(grant.scope, name):
        raise HTTPError(403, f"token does not allow event {name!r}")
    return name


def check_rate(policy: Policy, grant: Grant) -> None:
    """429 when the publisher is over publish_rate. Called after the body is read, so a throttled keep-alive
    publisher keeps its connection."""
    wait = policy.limiter.allow(grant.key)
    if wait:
        raise HTTPError(429, "publish rate limit exceeded", headers=(("Retry-After", access.retry_after(wait)),))


def body_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "body is not valid UTF-8") from None


# -- idempotency keys --------------------------------------------------------------------------------------------


def idempotency_key(value: str | None, policy: Policy, grant: Grant) -> str | None:
    """The scoped key of an `Idempotency-Key` header (None without one); 400 when it is malformed."""
    if value is None:
        return None
    if not _KEY.fullmatch(value):
        raise HTTPError(400, f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters without spaces")
    return scoped_key(value, policy, grant)


def scoped_key(key: str, policy: Policy, grant: Grant) -> str:
    """A key as it is stored: within its publish token (the token's digest prefix), so one token's keys neither
    answer nor block another's; one shared scope when publishing is open. A newline separates the two: it can be
    part of neither."""
    return f"{grant.key if policy.publish_tokens else ''}\n{key}"


# -- the batch format ----------------------------------------------------------------------------------------------


def parse_batch(body: bytes, policy: Policy, grant: Grant, max_message_bytes: int) -> tuple[list[Draft], list[int]]:
    """The events of a POST /publish/batch body, and the line number of each (see the module docstring for the
    rules). Raises HTTPError naming the first bad line; then nothing may be published."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = body.count(b"\n", 0, exc.start) + 1
        raise HTTPError(400, f"line {number}: not valid UTF-8") from None
    drafts: list[Draft] = []
    lines: list[int] = []
    names: dict[str, bool] = {}  # event name -> checked (allowed); a batch names few, so each is checked once
    pos, end_of_body, number = 0, len(text), 1  # `number`: the line `pos` is on
    while True:
        if text.startswith("\n{", pos):  # the common case: the next line starts at once
            start = pos + 1
            number += 1
        else:
            # Blank lines are skipped in one step (in C), so a body of a million line ends costs milliseconds.
            start = pos if text.startswith("{", pos) else _after_blanks(text, pos)
            number += text.count("\n", pos, start)
        if start == end_of_body:
            break
        end = text.find("\n", start)
        if end < 0:
            end = end_of_body
        if len(drafts) == BURST_ROOM:
            raise HTTPError(413, f"line {number}: a batch holds at most {BURST_ROOM} events")
        drafts.append(_draft(text, start, end, number, policy, grant, max_message_bytes, names))
        lines.append(number)
        pos = end  # its line end is counted with the blanks that follow
    if not drafts:
        raise HTTPError(400, "the batch holds no events: one JSON object per line")
    return drafts, lines


def _draft(
    text: str, start: int, end: int, number: int, policy: Policy, grant: Grant, max_bytes: int, names: dict[str, bool]
) -> Draft:
    """The event on the line text[start:end] (start at its first non-blank character). `names`: the event names
    already found good in this batch."""
    if text[start] != "{":
        raise _bad_line(number, 'is not a JSON object like {"data": "..."}')
    try:
        fields, stop = _scan(text, start)
    except (StopIteration, ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        raise _bad_line(number, "is not valid JSON") from None
    if stop > end:
        raise _bad_line(number, "is not valid JSON on one line")
    if stop != end and _after_space(text, stop) != end:
        raise _bad_line(number, "holds more than one JSON value")
    if not _FIELDS.issuperset(fields):
        unknown = sorted(fields.keys() - _FIELDS)[0]
        raise _bad_line(number, f"unknown field {unknown!r} (known: data, event, idempotency_key)")
    data = fields.get("data")
    if not isinstance(data, str):
        raise _bad_line(number, '"data" must be given, as a string')
    name = fields.get("event", "message")
    if name not in names:
        if not isinstance(name, str):
            raise _bad_line(number, '"event" must be a string')
        problem = framing.event_name_error(name)
        if problem:
            raise _bad_line(number, problem)
        if not access.scope_allows(grant.scope, name):
            raise HTTPError(403, f"line {number}: token does not allow event {name!r}")
        names[name] = True
    if not data.isascii():  # a lone surrogate cannot be encoded, and the size limit is in bytes
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise _bad_line(number, '"data" is not valid Unicode (a lone surrogate)') from None
    else:
        size = len(data)
    if size > max_bytes:
        raise HTTPError(413, f"line {number}: data is larger than max_message_bytes ({max_bytes})")
    key = fields.get("idempotency_key")
    if key is None:
        return Draft(name, data)
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise _bad_line(
            number, f'"idempotency_key" must be 1-{MAX_KEY_LENGTH} printable ASCII characters without spaces'
        )
    return Draft(name, data, scoped_key(key, policy, grant), fingerprint(name, data))


def _after_space(text: str, pos: int, blanks: re.Pattern = _SPACE) -> int:
    """Where the blanks (space, tab, CR) that start at `pos` end."""
    match = blanks.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _after_blanks(text: str, pos: int) -> int:
    """Where the blanks and line ends that start at `pos` end."""
    return _after_space(text, pos, _BLANKS)


def _bad_line(number: int, problem: str) -> HTTPError:
    return HTTPError(400, f"line {number}: {problem}")


# -- storing, and the replies ------------------------------------------------------------------------------------


def publish(server, data: str, name: str) -> bytes:
    """A single publish without a key: the reply's body. The common case, so nothing more than it needs."""
    try:
        event_id, count = server.publish(data, name)
    except StoreError as exc:
        raise _not_stored(exc) from None
    return b'{"id": "%d", "subscribers": %d}' % (event_id, count)


def publish_keyed(server, data: str, name: str, key: str) -> bytes:
    """A single publish with an Idempotency-Key: the original reply, with "duplicate": true when the key was
    seen within idempotency_ttl (then nothing is published)."""
    published = _store(server, [Draft(name, data, key, fingerprint(name, data))], None)
    if published.duplicates:
        stamp = published.duplicates[0]
        return b'{"id": "%d", "subscribers": %d, "duplicate": true}' % (stamp.event_id, stamp.subscribers)
    assert published.first_id is not None  # not a duplicate: published
    return b'{"id": "%d", "subscribers": %d}' % (published.first_id, published.subscribers)


def publish_batch(server, drafts: list[Draft], lines: list[int]) -> bytes:
    """A batch, all or nothing: the reply's body. Lines whose key was seen are not published again; the reply
    lists them with the original ids."""
    published = _store(server, drafts, lines)
    reply: dict = {
        "first_id": None if published.first_id is None else str(published.first_id),
        "last_id": None if published.first_id is None else str(published.first_id + published.count - 1),
        "count": published.count,
        "subscribers": published.subscribers,
    }
    if published.duplicates:
        reply["duplicates"] = [
            {"line": lines[index], "id": str(stamp.event_id)} for index, stamp in sorted(published.duplicates.items())
        ]
    return json.dumps(reply).encode("ascii")


def _store(server, drafts: list[Draft], lines: list[int] | None) -> Published:
    try:
        return server.publish_drafts(drafts)
    except KeyConflict as exc:
        where = "Idempotency-Key" if lines is None else f"line {lines[exc.index]}: idempotency_key"
        raise HTTPError(409, f"{where} was already used for a different event (name or data)") from None
    except KeyBusy:
        raise HTTPError(
            409, "a publish with the same idempotency key is in progress; retry", headers=(("Retry-After", "1"),)
        ) from None
    except StoreError as exc:
        raise _not_stored(exc) from None


def _not_stored(exc: StoreError) -> HTTPError:
    """503 means not published; 504 (the store never answered) means it may have been."""
    if isinstance(exc, OutcomeUnknown):
        log.error("publish unconfirmed: %s", exc)
        return HTTPError(
            504,
            "the store did not confirm the event in time; it may have been published",
            headers=(("Retry-After", "1"),),
        )
    log.error("publish refused: %s", exc)
    return HTTPError(503, "could not store the event; it was not published", headers=(("Retry-After", "1"),))

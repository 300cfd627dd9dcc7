"""Scale-out: several sseserver instances share one event stream through a Redis Stream.

Owns: publishing into the shared stream (one id sequence for every instance), the follower thread that feeds
this instance's bouncer from the stream in stream order, reconnecting with backoff, and the link state.
Must not know: HTTP, subscribers, delivery. Nothing above the bouncer changes: events reach it through
Bouncer.ingest(), and the handler publishes through SSEServer.publish().

Why a publish is not appended locally at once: every instance must see events in the same order, and only the
stream defines it. So an instance hears its own publishes back from the stream like every other instance does;
the cost is one extra Redis round trip before delivery (see README "Scale-out").

The id: a Lua script (atomic on the Redis server) increments a counter, makes sure it is above the stream's
last entry (so a lost counter key can never make ids go backwards), and adds the entry with the explicit stream
id "<id>-0", trimmed with MAXLEN ~ history_size. Stream ids and event ids are therefore the same numbers.
"""

import hashlib
import logging
import queue
import threading

from .bouncer import StoreError
from .resp import Connection, RedisError, RedisUnavailable, parse_url

log = logging.getLogger("sseserver.cluster")

PUBLISH_SCRIPT = """
local id = redis.call('INCR', KEYS[2])
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local last_id = tonumber(string.match(last[1][1], '^(%d+)'))
  if last_id >= id then
    id = last_id + 1
    redis.call('SET', KEYS[2], id)
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id .. '-0', 'n', ARGV[2], 'd', ARGV[3])
return id
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

COMMAND_TIMEOUT = 5.0  # a Redis command that takes longer than this counts as Redis being down
BLOCK_MS = 1000  # the follower's XREAD BLOCK: also how soon it notices a stop request
BACKOFF_START, BACKOFF_MAX = 0.1, 5.0
MAX_IDLE_CONNECTIONS = 8


class RedisBridge:
    def __init__(self, redis_url: str, key_prefix: str, history_size: int, bouncer):
        self.address = parse_url(redis_url)  # ConfigError for a bad URL: the daemon exits 2
        self.stream_key = f"{key_prefix}:events"
        self.id_key = f"{key_prefix}:last-id"
        self.maxlen = max(1, history_size)
        self.bouncer = bouncer
        self.up = False
        self.reconnects = 0
        self.last_seen = "0-0"  # the follower starts at the beginning, so a new instance gets the history
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._follower: Connection | None = None

    # -- methods for the caller ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="sseserver-redis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BLOCK_MS / 1000 + COMMAND_TIMEOUT)
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    def publish(self, data: str, name: str) -> int:
        """Store the event in the shared stream and return its id. StoreError when Redis cannot store it:
        nothing is acknowledged that Redis does not hold."""
        try:
            connection = self._idle.get_nowait()
        except queue.Empty:
            connection = None
        try:
            if connection is None:
                connection = Connection(self.address, COMMAND_TIMEOUT)
            args = (2, self.stream_key, self.id_key, self.maxlen, name, data)
            try:
                event_id = connection.command("EVALSHA", PUBLISH_SHA, *args)
            except RedisError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                event_id = connection.command("EVAL", PUBLISH_SCRIPT, *args)  # loads the script for next time
        except RedisUnavailable as exc:
            self.up = False
            raise StoreError(f"Redis is unavailable ({exc})") from None
        except RedisError as exc:
            raise StoreError(f"Redis refused the event: {exc}") from None
        if self._idle.qsize() < MAX_IDLE_CONNECTIONS:
            self._idle.put(connection)
        else:
            connection.close()
        return int(event_id)

    def newest_id(self) -> int | None:
        """The newest id Redis has handed out, or None when Redis cannot say."""
        try:
            connection = Connection(self.address, COMMAND_TIMEOUT)
        except RedisUnavailable:
            return None
        try:
            value = connection.command("GET", self.id_key)
            return int(value) if value else 0
        except (RedisUnavailable, RedisError, ValueError):
            return None
        finally:
            connection.close()

    # -- the follower ------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                connection = Connection(self.address, BLOCK_MS / 1000 + COMMAND_TIMEOUT)
            except RedisUnavailable as exc:
                self._link_down(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if not self.up:
                log.info("redis link up (%r); following %s from %s", self.address, self.stream_key, self.last_seen)
            self.up = True
            backoff = BACKOFF_START
            try:
                while not self._stop.is_set():
                    reply = connection.command("XREAD", "COUNT", 1000, "BLOCK", BLOCK_MS, "STREAMS",
                                               self.stream_key, self.last_seen)
                    self.up = True
                    if reply:
                        self._ingest(reply[0][1])
            except (RedisUnavailable, RedisError) as exc:
                self._link_down(exc)
                self.reconnects += 1
            finally:
                connection.close()

    def _ingest(self, entries) -> None:
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2]))
            event_id = int(entry_id.split(b"-")[0])
            try:
                name, data = values[b"n"].decode("utf-8"), values[b"d"].decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                log.warning("skipping malformed stream entry %s", entry_id.decode("ascii", "replace"))
            else:
                self.bouncer.ingest(event_id, name, data)
            self.last_seen = entry_id.decode("ascii")

    def _link_down(self, exc) -> None:
        if self.up:
            log.error("redis link down: %s; reconnecting with backoff, resuming after %s", exc, self.last_seen)
        self.up = False


def wait_for_replay(bridge: RedisBridge, bouncer, wanted: int, timeout: float = 2.0) -> None:
    """Before replaying for a Last-Event-ID this instance has not seen yet: if Redis has handed that id out,
    give the follower a moment to bring it here, so a client that moves between instances is not sent a reset
    for an event that exists."""
    if wanted <= bouncer.last_id:
        return
    newest = bridge.newest_id()
    if newest is not None and wanted <= newest:
        bouncer.wait_for_id(wanted, timeout)

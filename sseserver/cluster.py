"""Scale-out: several sseserver instances share one event stream through a Redis Stream.

Owns: publishing into the shared stream (one id sequence for every instance), batches and idempotency keys there
(BATCH_SCRIPT), the follower thread that feeds this instance's bouncer from the stream in stream order,
reconnecting with backoff, and the link state.
Must not know: HTTP, subscribers, delivery. Nothing above the bouncer changes: events reach it through
Bouncer.ingest(), and the handler publishes through SSEServer.publish().

Why a publish is not appended locally at once: every instance must see events in the same order, and only the
stream defines it. So an instance hears its own publishes back from the stream like every other instance does;
the cost is one extra Redis round trip before delivery (see README "Scale-out").

The id: a Lua script (atomic on the Redis server) adds the entry with the explicit stream id "<id>-0", where
id = max(the stream's last entry + 1, floor), and the publishing instance passes floor = max(wall-clock Unix
microseconds, the highest id it has seen or assigned + 1). Stream ids and event ids are the same numbers. Why
not a counter in Redis: a Redis that loses its data (restart without persistence, FLUSHALL, failover to a
lagging replica) would restart it at 1, reusing ids that browsers still hold as Last-Event-ID, and followers
waiting after their old position would never see the new entries. With the clock in the floor, ids stay above
everything handed out before the loss, as long as the instances' clocks are roughly right.

The gap rule: each entry also carries `p`, the id of the stream's last entry when it was added (for an empty
stream, its own id - 1: a stream that starts over after a loss must not make an id clients hold from before, such
as 0, a valid cursor again). The follower passes it to Bouncer.ingest(), which puts an in-band sseserver.reset
before the event when `p` is not the last id this instance holds: entries were lost (flushed, trimmed by MAXLEN
while this instance was cut off, or never replicated) and open streams must be told instead of silently skipping
them. Entries written by an older version have no `p` and count as contiguous.

The origin rule: each entry also carries `r`, the run_id of the Redis that wrote it ("aof" when that Redis keeps
an append-only file, whose restarts lose nothing fsynced). When `r` changes between two entries, a Redis without
an AOF restarted from an older snapshot, or a replica took over: entries may have been lost that this instance
(paused, cut off, or started later) never read, so no `p` could show it. That is a gap too. With an AOF a
restart keeps the stream and produces no reset.

The chain rule: ids alone can repeat after a loss. An instance whose clock runs ahead raises every instance's
floor (highest id seen + 1) above the clock, so after a FLUSHALL or a restart without persistence two instances
can both be handed the same id, one of them lost: each would then take the other's event for the one it read,
and `p` would match. So each entry also carries `k`, a random key the publishing instance makes, and `q`, the
`k` of the stream's last entry when it was added ("" for an empty stream). The follower compares `q` with the
`k` of the last entry it read; when they differ, the entries between are not the ones it read, and streams get a
reset (Bouncer.ingest(gap=True)) even where the ids line up.

Batches and keys: a batch (or a single event with an idempotency key) is one BATCH_SCRIPT call, one round trip.
The script looks every key up in `<prefix>:keys` first and refuses the whole call on a key reused with another
fingerprint, so nothing is written unless everything is; then it adds the events with consecutive ids, each entry
with the same p/k/q/r chain as a single publish and `b`, a random mark the whole batch shares (the follower passes
it to the bouncer, so that the batch counts as one publish for the slow rule), and stores the new keys with their
original reply. A key and its event are thus written in one atomic step: racing duplicates on any instances
publish once. Keys expire by `idempotency_ttl` (checked on lookup, removed a bounded number per call) and are
bounded by `idempotency_max_keys` (a sorted set by age, oldest popped first).

What `p` cannot show: entries lost before this instance read them, when nothing after them shows the loss (a
failover to a replica that never got the newest entries: the next entry's `p` is the replica's last one, which
this instance has read). For its own publishes an instance knows better: it remembers the ids it acknowledged
and has not read back yet (at most MAX_UNCONFIRMED), and an entry with a higher id proves those were lost, so it
counts as a gap too. Events published through *other* instances and lost that way cannot be told apart from
events never published; README "Scale-out" says so.

The follower never dies: a session (connect, then XREAD until something fails) ends on any error, including an
error reply while connecting (WRONGPASS, NOPERM, max clients), a persistent XREAD error (WRONGTYPE, LOADING) or a
bug; the loop backs off (0.1 s doubling to 5 s) and tries again. The backoff starts again at 0.1 s only after a
session that followed for STABLE_SESSION: a link that connects, reads once and fails (a proxy that cuts it, a
command it refuses) must not become a loop of ten attempts a second. A failure identical to the last one logged
is logged again only after REPEAT_LOG_INTERVAL (with the count of repeats), unless a stable session came between.
"""

import collections
import hashlib
import logging
import os
import queue
import threading
import time

from .bouncer import BURST_ROOM, Draft, Published
from .errors import OutcomeUnknown, StoreError
from .idempotency import KeyConflict, Stamp
from .resp import Connection, RedisError, RedisUnavailable, parse_url

log = logging.getLogger("sseserver.cluster")

# What both scripts do first: read the stream's last entry (its id `prev` and key `chain`) and which Redis writes
# (`origin`), and define add(at, key, field, value, ...), which adds an entry with the fields every follower reads
# (p, k, q, r) and the given ones, and first(id, key, ...), which adds the first entry of a publish at `id` or
# past the stream's top id. KEYS[1] is the stream, ARGV[1] its MAXLEN. Lua numbers are doubles: exact for integers
# below 2**53 (microseconds until the year 2255), and formatted with %.0f because tostring() would write 1.7e+15.
_SCRIPT_PRELUDE = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = nil
local chain = ''
if #last > 0 then
  prev = tonumber(string.match(last[1][1], '^(%d+)'))
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'k' then
      chain = fields[i + 1]
    end
  end
end
-- Which Redis wrote the entry: its run_id, unless it keeps an append-only file (a restart then loses nothing
-- that was fsynced). A change between two entries means a restart from a snapshot or a failover in between.
local origin = 'aof'
if string.match(redis.call('INFO', 'persistence'), 'aof_enabled:(%d)') ~= '1' then
  origin = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
local function add(at, key, ...)
  return redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], string.format('%.0f', at) .. '-0',
                     'p', string.format('%.0f', prev or at - 1), 'k', key, 'q', chain, 'r', origin, ...)
end
local function first(id, key, ...)
  local added = add(id, key, ...)
  if type(added) == 'table' and added.err then
    -- The stream's top id is above its last entry (entries deleted, or the stream trimmed to nothing) and the
    -- floor did not clear it (a clock behind): go past the top, which XADD requires.
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        id = math.max(id, tonumber(string.match(info[i + 1], '^(%d+)')) + 1)
      end
    end
    added = add(id, key, ...)
    if type(added) == 'table' and added.err then
      return nil, added
    end
  end
  return id
end
"""

# A single publish without a key. ARGV: maxlen, floor, name, data, chain key. Returns the id.
PUBLISH_SCRIPT = (
    _SCRIPT_PRELUDE
    + """
local id, failure = first(math.max((prev or 0) + 1, tonumber(ARGV[2])), ARGV[5], 'n', ARGV[3], 'd', ARGV[4])
if not id then
  return failure
end
return id
"""
)
PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

# A batch, or an event with an idempotency key: the keys are checked, the events added with consecutive ids and
# the new keys stored, in one atomic step. KEYS: the stream, the keys' hash (key -> "fingerprint id subscribers
# at_ms"), the keys' sorted set (by at_ms: oldest forgotten first). ARGV: maxlen, floor, the batch's random mark
# (its entries' `b`, and the prefix of their `k`), ttl in ms, max keys, then per event: name, data, key ("" for
# none), fingerprint (hex), subscribers. Returns {first id, count, then per duplicate: its index (from 1), the
# original's "fingerprint id subscribers at_ms"}, or the error "CONFLICT <index>" having written nothing.
BATCH_SCRIPT = (
    _SCRIPT_PRELUDE
    + """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[4])
local n = (#ARGV - 5) / 5
local seen = {}
for i = 1, n do
  local key = ARGV[5 + (i - 1) * 5 + 3]
  if key ~= '' then
    local stored = redis.call('HGET', KEYS[2], key)
    if stored then
      local fingerprint, at = string.match(stored, '^(%x+) %d+ %d+ (%d+)$')
      if at and tonumber(at) + ttl > now_ms then
        if fingerprint ~= ARGV[5 + (i - 1) * 5 + 4] then
          return redis.error_reply('CONFLICT ' .. i)
        end
        seen[i] = stored
      end
    end
  end
end
local reply = {'0', 0}
local id = math.max((prev or 0) + 1, tonumber(ARGV[2]))
local count = 0
for i = 1, n do
  local at = 5 + (i - 1) * 5
  if seen[i] then
    reply[#reply + 1] = i
    reply[#reply + 1] = seen[i]
  else
    local entry = ARGV[3] .. string.format('%x', i)
    local fields = {'b', ARGV[3], 'n', ARGV[at + 1], 'd', ARGV[at + 2]}
    if count == 0 then
      local used, failure = first(id, entry, unpack(fields))
      if not used then
        return failure
      end
      id = used
      reply[1] = string.format('%.0f', id)
    else
      local added = add(id, entry, unpack(fields))
      if type(added) == 'table' and added.err then
        return added
      end
    end
    if ARGV[at + 3] ~= '' then
      redis.call('HSET', KEYS[2], ARGV[at + 3],
                 ARGV[at + 4] .. ' ' .. string.format('%.0f', id) .. ' ' .. ARGV[at + 5] .. ' ' .. now_ms)
      redis.call('ZADD', KEYS[3], now_ms, ARGV[at + 3])
    end
    prev, chain, id, count = id, entry, id + 1, count + 1
  end
end
reply[2] = count
-- Forget expired keys, a bounded number per call (a lookup ignores an expired one anyway), then the oldest
-- beyond max keys.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms - ttl, 'LIMIT', 0, 256)
if #expired > 0 then
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[3], unpack(expired))
end
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[5])
if over > 0 then
  local oldest = redis.call('ZPOPMIN', KEYS[3], over)
  for i = 1, #oldest, 2 do
    redis.call('HDEL', KEYS[2], oldest[i])
  end
end
return reply
"""
)
BATCH_SHA = hashlib.sha1(BATCH_SCRIPT.encode()).hexdigest()

COMMAND_TIMEOUT = 5.0  # a Redis command that takes longer than this counts as Redis being down
# Entries the follower takes per XREAD: a whole batch at once, so a batch costs one round trip to read too.
READ_COUNT = BURST_ROOM
# Entries the stream keeps beyond history_size for followers that fall behind (see RedisBridge.maxlen).
FOLLOWER_ROOM = 10 * BURST_ROOM
BLOCK_MS = 1000  # the follower's XREAD BLOCK: also how soon it notices a stop request
BACKOFF_START, BACKOFF_MAX = 0.1, 5.0
REPEAT_LOG_INTERVAL = 30.0  # an unchanged failure is logged again after this long, with how often it recurred
STABLE_SESSION = 10.0  # a session that followed this long ended a fault: the next failure is a new incident
# The follower's loop comes round at least every ~30 s even when each step runs into its timeout (connect, AUTH
# and SELECT, one XREAD: 6 s each; backoff: 5 s). Not round for this long means it is wedged: the watchdog stops.
FOLLOWER_STUCK_AFTER = 60.0
MAX_IDLE_CONNECTIONS = 8
MAX_UNCONFIRMED = 100_000  # own acknowledged ids remembered until the follower reads them back


class RedisBridge:
    """The link to the shared stream.

    Methods for the caller: start(), stop(), publish(data, name), newest_id(), health() (what /health shows),
    healthy() (for the watchdog). `up` and `reconnects` are read by /metrics.
    """

    def __init__(self, redis_url: str, key_prefix: str, history_size: int, bouncer):
        self.address = parse_url(redis_url)  # ConfigError for a bad URL: the daemon exits 2
        self.stream_key = f"{key_prefix}:events"
        self.keys_key = f"{key_prefix}:keys"  # idempotency keys (a hash), and their order by age (a sorted set)
        self.keys_order_key = f"{key_prefix}:keys-by-age"
        # MAXLEN ~ of the stream: the history, and room for followers to fall FOLLOWER_ROOM entries behind, so
        # that the next publishes do not trim entries before every follower has read them. Room for one batch
        # was not enough: a follower reads and ingests in Python, slower than batches arrive, and a review saw
        # most of a run of 10,000-event batches trimmed unread (streams reset, nothing replayable). A follower
        # further behind than this still loses entries, and its streams are told (a gap), never silently.
        self.maxlen = max(1, history_size) + FOLLOWER_ROOM
        self.bouncer = bouncer
        self.up = False  # the follower's last read succeeded (a failed publish also clears it)
        self.last_error: str | None = None  # why the link is down, for /health
        self.reconnects = 0  # follower sessions that ended in a failure (a failed connect included)
        self.last_seen = "0-0"  # the follower starts at the beginning, so a new instance gets the history
        self._highest = 0  # the highest id this instance has seen or assigned: part of the publish floor
        self._read = 0  # the highest id the follower has read back
        self._origin: bytes | None = None  # the `r` of the last entry read: which Redis wrote it
        self._chain: bytes | None = None  # the `k` of the last entry read (None: it had none)
        self._unconfirmed: collections.deque[int] = collections.deque()  # own acknowledged ids above _read, ascending
        self._highest_lock = threading.Lock()
        self._confirmed = threading.Condition(self._highest_lock)  # _unconfirmed shrank, or the link went down
        self._last_ack = 0.0  # when this instance last acknowledged an event (time.monotonic())
        self._caught_up_at = 0.0  # when the follower sent its last read that found nothing new
        self._beat = time.monotonic()  # when the follower's loop last came round (healthy())
        self._logged: tuple[str, float] | None = None  # the last failure logged, and when
        self._suppressed = 0  # identical failures not logged since then
        self._reported_down = True  # the log's last word on the link is not "up" (so the first link up is logged)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._following: Connection | None = None  # the follower's connection, for stop() to interrupt

    # -- methods for the caller ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._follow, name="sseserver-redis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        following = self._following
        if following is not None:
            following.interrupt()  # else shutdown waits out a black-holed XREAD (up to 6 s past its deadline)
        if self._thread is not None:
            self._thread.join(timeout=BLOCK_MS / 1000 + COMMAND_TIMEOUT)
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    def publish(self, data: str, name: str) -> int:
        """Store the event in the shared stream and return its id. StoreError when Redis did not store it:
        nothing is acknowledged that Redis does not hold. OutcomeUnknown when the command was sent but no reply
        came (the link failed, or Redis stalled past COMMAND_TIMEOUT): Redis may have stored it."""
        args = (1, self.stream_key, self.maxlen, self._floor(), name, data, os.urandom(8).hex())
        event_id = int(self._run_script(PUBLISH_SHA, PUBLISH_SCRIPT, args))
        self._acknowledged(event_id)
        return event_id

    def publish_drafts(
        self, drafts: list[Draft], repeats: dict[int, int], queued: dict[str, int], ttl: float, max_keys: int
    ) -> Published:
        """Store a batch (or a keyed event) in one round trip: BATCH_SCRIPT checks the keys, adds the events with
        consecutive ids and stores the new keys atomically, so racing duplicates on any instances publish once.
        `repeats`: drafts repeating an earlier draft's key (not sent; they get its Stamp). `queued`: streams here
        per event name, the subscribers a key remembers. KeyConflict, or as publish()."""
        sent = [index for index in range(len(drafts)) if index not in repeats]
        args: list = [3, self.stream_key, self.keys_key, self.keys_order_key]
        args += [self.maxlen, self._floor(), os.urandom(8).hex(), max(1, int(ttl * 1000)), max_keys]
        for index in sent:
            draft = drafts[index]
            print_ = draft.fingerprint.hex() if draft.fingerprint is not None else ""
            args += [draft.name, draft.data, draft.key or "", print_, queued[draft.name]]
        try:
            reply = self._run_script(BATCH_SHA, BATCH_SCRIPT, args)
        except StoreError as exc:
            conflict = str(exc).rpartition("CONFLICT ")[2]
            if conflict.isdigit():
                raise KeyConflict(sent[int(conflict) - 1]) from None
            raise
        first, count = int(reply[0]), int(reply[1])
        duplicates: dict[int, Stamp] = {}
        for position, stored in zip(reply[2::2], reply[3::2], strict=True):
            index = sent[int(position) - 1]
            print_, event_id, subscribers, at_ms = stored.decode("ascii").split(" ")
            duplicates[index] = Stamp(
                drafts[index].key or "", bytes.fromhex(print_), int(event_id), int(subscribers), int(at_ms)
            )
        fresh = [index for index in sent if index not in duplicates]
        for event_id in range(first, first + count):
            self._acknowledged(event_id)
        stamps = {
            index: Stamp(
                drafts[index].key or "", drafts[index].fingerprint or b"", first + n, queued[drafts[index].name], 0
            )
            for n, index in enumerate(fresh)
        }
        for index, original in repeats.items():
            duplicates[index] = duplicates.get(original) or stamps[original]
        subscribers = max((queued[drafts[index].name] for index in fresh), default=0)
        return Published(first if count else None, count, subscribers, duplicates)

    def _run_script(self, sha: str, script: str, args):
        """EVALSHA (EVAL the first time on a connection's Redis), mapping failures to what they mean for the
        publisher: StoreError (not stored) or OutcomeUnknown (maybe stored)."""

        def run_script(connection: Connection):
            try:
                return connection.command("EVALSHA", sha, *args)
            except RedisError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                return connection.command("EVAL", script, *args)  # loads the script for next time

        try:
            return self._call(run_script)
        except RedisUnavailable as exc:
            self.up = False
            self.last_error = str(exc)
            if not exc.unsent:
                raise OutcomeUnknown(f"Redis did not answer ({exc})") from None
            raise StoreError(f"Redis is unavailable ({exc})") from None
        except RedisError as exc:
            raise StoreError(f"Redis refused the event: {exc}") from None

    def wait_confirmed(self, deadline: float) -> bool:
        """Wait until every event this instance acknowledged has come back from the stream into the bouncer, the
        link is down (they may never come back), or `deadline` (time.monotonic()). For the drain at shutdown:
        an event answered 200 here must reach this instance's open streams before they are ended."""
        with self._confirmed:
            # Once the follower has found nothing new after the last acknowledgement, what is still
            # unconfirmed was lost in Redis: it will never come back, so there is nothing to wait for.
            return self._confirmed.wait_for(
                lambda: not self._unconfirmed or not self.up or self._caught_up_at > self._last_ack,
                max(0.0, deadline - time.monotonic()),
            )

    def newest_id(self) -> int | None:
        """The id of the stream's newest entry (0 for an empty stream), or None when Redis cannot say."""
        try:
            newest = self._call(
                lambda connection: connection.command("XREVRANGE", self.stream_key, "+", "-", "COUNT", 1)
            )
            return int(newest[0][0].split(b"-")[0]) if newest else 0
        except (RedisUnavailable, RedisError, ValueError, IndexError, TypeError):
            return None

    def health(self) -> dict:
        """The /health fields: the link state, and while it is down the last failure (e.g. a WRONGPASS)."""
        if self.up:
            return {"redis": "up"}
        return {"redis": "down", **({"redis_error": self.last_error} if self.last_error else {})}

    def healthy(self) -> bool:
        """For the systemd watchdog: the follower thread is alive and its loop keeps coming round.

        Deliberately not "the link is up": while Redis is down or refuses us, the follower is alive and retrying,
        and a restart by the watchdog could not bring Redis back; it would only cut every open stream, which
        resumes by itself once Redis is back. /health reports the link for the load balancer instead."""
        thread = self._thread
        return thread is not None and thread.is_alive() and time.monotonic() - self._beat < FOLLOWER_STUCK_AFTER

    # -- the connection pool -------------------------------------------------------------------------------------

    def _call(self, command):
        """`command(connection)` on an idle pooled connection or a new one; the connection goes back to the pool
        unless it failed. A pooled connection that Redis closed since its last use (a restart) is thrown away
        before use; one that turns out dead while the command is being sent is replaced once by a new
        connection: the command never reached Redis, so the retry cannot store an event twice. Once the command
        may have been sent, there is no retry."""
        while True:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                break
            if not connection.reusable():
                connection.close()
                continue
            try:
                return self._run(connection, command)
            except RedisUnavailable as exc:
                if not exc.unsent:
                    raise
            break
        return self._run(Connection(self.address, COMMAND_TIMEOUT), command)

    def _run(self, connection: Connection, command):
        try:
            reply = command(connection)
        except RedisError:  # an error reply leaves the connection usable
            self._give_back(connection)
            raise
        self._give_back(connection)
        return reply

    def _give_back(self, connection: Connection) -> None:
        if self._idle.qsize() < MAX_IDLE_CONNECTIONS:
            self._idle.put(connection)
        else:
            connection.close()

    # -- ids -----------------------------------------------------------------------------------------------------

    def _floor(self) -> int:
        """The lowest id this instance lets the script assign: the clock, or above anything seen here."""
        with self._highest_lock:
            return max(time.time_ns() // 1000, self._highest + 1)

    def _acknowledged(self, event_id: int) -> None:
        """A publish of ours was stored: remember its id until the follower reads it back."""
        with self._highest_lock:
            self._highest = max(self._highest, event_id)
            self._last_ack = time.monotonic()
            if event_id > self._read:
                # Publishes finish in any order: keep the deque ascending (a late one usually goes near the end).
                index = len(self._unconfirmed)
                while index and self._unconfirmed[index - 1] > event_id:
                    index -= 1
                self._unconfirmed.insert(index, event_id)
                if len(self._unconfirmed) > MAX_UNCONFIRMED:
                    self._unconfirmed.popleft()

    def _lost_before(self, event_id: int) -> int | None:
        """An own acknowledged id below `event_id` (just read) that never came back (lost in Redis), or None."""
        lost = None
        with self._highest_lock:
            for own in self._unconfirmed:
                if own >= event_id:
                    break
                lost = own
        return lost

    def _read_back(self, event_id: int) -> None:
        """The follower has handed `event_id` to the bouncer: forget own ids up to it (wait_confirmed() waits for
        exactly this, so it comes after the bouncer has the event)."""
        with self._highest_lock:
            self._read = max(self._read, event_id)
            self._highest = max(self._highest, event_id)
            while self._unconfirmed and self._unconfirmed[0] <= event_id:
                self._unconfirmed.popleft()
            self._confirmed.notify_all()

    # -- the follower ------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        """The supervisor loop (see the module docstring): sessions until stop(), with backoff in between."""
        backoff = BACKOFF_START
        while not self._stop.is_set():
            self._beat = time.monotonic()
            error = None
            try:
                followed_for, failure = self._session()
            except Exception as exc:  # a bug, or the bouncer refusing an entry: log it, and keep following
                followed_for, failure, error = 0.0, f"{type(exc).__name__}: {exc}", exc
            if failure is None:
                break  # stopped
            if followed_for >= STABLE_SESSION:  # the link worked for a while: a new incident, retried soon
                backoff = BACKOFF_START
                self._logged = None
            self._link_down(failure, error)
            self._beat = time.monotonic()
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _session(self) -> tuple[float, str | None]:
        """Connect and follow until the link fails or stop() is called -> (for how many seconds reads succeeded,
        the failure, or None when stopped)."""
        try:
            connection = Connection(self.address, BLOCK_MS / 1000 + COMMAND_TIMEOUT)
        except (RedisUnavailable, RedisError) as exc:  # RedisError: WRONGPASS, NOPERM, max clients, LOADING
            return 0.0, str(exc)
        since = None  # when the first read succeeded
        self._following = connection
        try:
            while not self._stop.is_set():
                # The first read of a session does not block, so /health says "up" as soon as the link works.
                block = () if since is None else ("BLOCK", BLOCK_MS)
                sent = time.monotonic()
                reply = connection.command(
                    "XREAD", "COUNT", READ_COUNT, *block, "STREAMS", self.stream_key, self.last_seen
                )
                self._beat = time.monotonic()
                if since is None:
                    since = self._beat
                    self._link_up()
                self.up = True  # also after a failed publish cleared it
                if reply:
                    self._ingest(reply[0][1])
                else:
                    with self._confirmed:  # everything added before `sent` has been read
                        self._caught_up_at = sent
                        self._confirmed.notify_all()
            return 0.0, None
        except (RedisUnavailable, RedisError) as exc:
            return (0.0 if since is None else time.monotonic() - since), str(exc)
        finally:
            self._following = None
            connection.close()

    def _ingest(self, entries) -> None:
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2]))
            event_id = int(entry_id.split(b"-")[0])
            prev = values.get(b"p")
            prev_id = int(prev) if prev is not None and prev.isdigit() else None  # None: an older writer
            origin = values.get(b"r")
            gap = False
            if origin is not None and self._origin is not None and origin != self._origin:
                # A Redis without an append-only file restarted from an older snapshot, or a replica took over:
                # its newest entries may be gone, and this instance may never have read them. Be told.
                log.warning("the stream's writer changed (a Redis restart or failover): streams get a reset")
                gap = True
            if origin is not None:
                self._origin = origin
            follows = values.get(b"q")
            if follows is not None and self._chain is not None and follows != self._chain and not gap:
                # Not the entry this instance read last before it: entries were lost, although the ids may line
                # up (an id handed out twice after a loss). Be told.
                log.warning(
                    "the stream's chain broke before entry %s (entries lost): streams get a reset",
                    entry_id.decode("ascii", "replace"),
                )
                gap = True
            self._chain = values.get(b"k")
            lost = self._lost_before(event_id)
            if lost is not None:
                log.error("event %d, acknowledged by this instance, is not in the stream: Redis lost it", lost)
                gap = True
            try:
                name, data = values[b"n"].decode("utf-8"), values[b"d"].decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                # Skipped: the next entry's `p` then differs from the last id here, and streams get a reset.
                log.warning("skipping malformed stream entry %s", entry_id.decode("ascii", "replace"))
            else:
                self.bouncer.ingest(event_id, name, data, prev_id, gap, values.get(b"b"))
            self._read_back(event_id)
            self.last_seen = entry_id.decode("ascii")

    def _link_up(self) -> None:
        if self._reported_down:
            log.info(
                "redis link up (%r); following %s after %s%s",
                self.address,
                self.stream_key,
                self.last_seen,
                self._repeats_note(),
            )
            self._reported_down = False
        self.up = True
        self.last_error = None

    def _link_down(self, failure: str, exc: BaseException | None = None) -> None:
        """Record a failed session, and log it unless it is the failure last logged, less than
        REPEAT_LOG_INTERVAL ago: a persistent error (WRONGTYPE, WRONGPASS) is one line per interval, not one
        per attempt."""
        self.reconnects += 1
        self.up = False
        self.last_error = failure
        with self._confirmed:  # a drain waiting for own events to come back need not wait any more
            self._confirmed.notify_all()
        now = time.monotonic()
        if self._logged is not None and self._logged[0] == failure and now - self._logged[1] < REPEAT_LOG_INTERVAL:
            self._suppressed += 1
            return
        log.error(
            "redis link down: %s%s; retrying with backoff, resuming after %s",
            failure,
            self._repeats_note(),
            self.last_seen,
            exc_info=exc,
        )
        self._logged = (failure, now)
        self._reported_down = True

    def _repeats_note(self) -> str:
        note = f" ({self._suppressed} identical failure(s) not logged)" if self._suppressed else ""
        self._suppressed = 0
        return note


def wait_for_replay(bridge: RedisBridge, bouncer, wanted: int, timeout: float = 2.0) -> None:
    """Before replaying for a Last-Event-ID this instance has not seen yet: if Redis has handed that id out,
    give the follower a moment to bring it here, so a client that moves between instances is not sent a reset
    for an event that exists."""
    if wanted <= bouncer.last_id and bouncer.newest_event_id is not None:
        return
    # Nothing read yet (a new instance): even a low id, such as 0, must wait for the first read, or it would be
    # taken for this instance's empty start and replay nothing while the stream holds events.
    newest = bridge.newest_id()
    if newest is not None and newest and wanted <= newest:
        bouncer.wait_for_id(wanted, timeout)

"""Access decisions: tokens and their scopes, CORS, the client's address, and publish rate limits.

Owns: parsing token entries (inline or from token files), checking a presented token in constant time, event-name
scopes, CORS response headers, which address a request counts as (X-Forwarded-For only from trusted proxies),
and token buckets. Everything except the token files and the bucket state is a pure function of a Policy and the
request's headers.
Must not know: sockets, routes' internals, how events are delivered.

A Policy is built once per Config (at start and on each reload) and swapped whole with it, so a request never
checks a new token against an old scope.
"""

import collections
import hashlib
import hmac
import ipaddress
import math
import threading
import time
from fnmatch import fnmatchcase

from .config import Config, ConfigError, IPNetwork, ip_networks
from .errors import HTTPError

WILDCARD = "*"
ALLOWED_REQUEST_HEADERS = "Authorization, Content-Type, Last-Event-ID, Cache-Control, Idempotency-Key"


class EventFilter:
    """Which event names a stream receives: exact names and/or glob patterns (a token's scope). Supports `in`;
    answers are cached per name because the delivery loop asks once per event per stream. Hashable, so streams
    with the same filter share the delivery layer's joined bytes; weakly referenceable (like a frozenset), so the
    server's table of shared filters forgets one when its last stream ends."""

    __slots__ = ("names", "patterns", "_cache", "_key", "__weakref__")

    def __init__(self, names: frozenset | None, patterns: tuple[str, ...] | None):
        self.names = names
        self.patterns = patterns
        self._cache: dict[str, bool] = {}
        self._key = (names, patterns)

    def __contains__(self, name: str) -> bool:
        answer = self._cache.get(name)
        if answer is None:
            answer = (self.names is None or name in self.names) and scope_allows(self.patterns, name)
            if len(self._cache) < 4096:  # publishers choose names; never let them grow this without bound
                self._cache[name] = answer
        return answer

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, EventFilter) and self._key == other._key

    def __repr__(self) -> str:
        return f"EventFilter(names={self.names}, patterns={self.patterns})"


def stream_filter(requested: list[str], scope: tuple[str, ...] | None) -> frozenset | EventFilter | None:
    """The filter for a stream that asked for `requested` names (empty = all) under a token `scope` (None =
    unlimited). Raises 403 when an asked-for name lies outside the scope."""
    names = frozenset(requested) if requested else None
    if scope is None:
        return names
    if names is not None:
        outside = sorted(name for name in names if not scope_allows(scope, name))
        if outside:
            raise HTTPError(403, f"token does not allow event {outside[0]!r}")
        return names  # every name is in scope: the plain set is enough
    return EventFilter(None, scope)


class TokenSet:
    """Tokens of one role. Stored as SHA-256 digests; a presented token is hashed and compared with
    hmac.compare_digest against every entry, so neither the answer's timing nor an early exit reveals which
    entry (or how much of one) matched."""

    def __init__(self, entries: list[tuple[str, tuple[str, ...] | None]]):
        self._entries = [(hashlib.sha256(token.encode()).digest(), scope) for token, scope in entries]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, presented: str) -> tuple[bool, tuple[str, ...] | None, bytes]:
        """(matched, scope, digest)."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found, scope = self.match_digest(digest)
        return found, scope, digest

    def match_digest(self, digest: bytes) -> tuple[bool, tuple[str, ...] | None]:
        """(matched, scope) for a token known only by its digest (a stream's, after an upgrade in place)."""
        found, scope = False, None
        for stored, entry_scope in self._entries:
            if hmac.compare_digest(stored, digest) and not found:
                found, scope = True, entry_scope
        return found, scope


def parse_token_entries(lines: list[str], key: str) -> list[tuple[str, tuple[str, ...] | None]]:
    """Entries "TOKEN" or "TOKEN PATTERN [PATTERN...]" (patterns are globs over event names, e.g. orders.*).
    Blank lines and lines starting with # are skipped."""
    entries = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, *patterns = line.split()
        if len(token) < 8:
            raise ConfigError(key, f"entry {number}: a token must be at least 8 characters")
        if not token.isascii() or not token.isprintable():
            raise ConfigError(key, f"entry {number}: a token must be printable ASCII")
        entries.append((token, tuple(patterns) or None))
    return entries


def load_tokens(inline: tuple[str, ...], path: str, inline_key: str, path_key: str) -> TokenSet:
    entries = parse_token_entries(list(inline), inline_key)
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path_key, f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        entries += parse_token_entries(lines, path_key)
    return TokenSet(entries)


def bearer_token(headers: dict[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None. Any other scheme (Basic credentials
    that a proxy in front adds, say) is not ours: it counts as no token, so an open role ignores it and a role
    with tokens answers 401 as for a missing header."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Grant:
    """Who a request is: its scope (None = every event), a key for rate limiting (never the token itself), and
    the SHA-256 digest of the token it presented (b"" without one), by which an upgrade in place checks an open
    stream again without keeping the token."""

    __slots__ = ("scope", "key", "credential")

    def __init__(self, scope: tuple[str, ...] | None, key: str, credential: bytes = b""):
        self.scope = scope
        self.key = key
        self.credential = credential


def authorize(tokens: TokenSet, presented: str | None, client: str, role: str) -> Grant:
    """Open when no tokens are configured for the role; otherwise 401 without a token, 403 with a wrong one."""
    if not tokens:
        return Grant(None, "ip:" + client)
    if presented is None:
        raise HTTPError(401, f"{role} needs a token", headers=(("WWW-Authenticate", "Bearer"),))
    found, scope, digest = tokens.match(presented)
    if not found:
        raise HTTPError(403, "invalid token", headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),))
    return Grant(scope, "token:" + digest[:8].hex(), digest)


def recheck_stream(tokens: TokenSet, credential: bytes, requested: frozenset | None) -> frozenset | EventFilter | None:
    """The filter of a stream taken over from the previous process (an upgrade in place), decided as its
    reconnect would be under these tokens: the token it presented (`credential`, a digest; b"" for none) must
    still be valid and the names it asked for (None: all) within that token's scope. HTTPError says why not."""
    scope = None
    if tokens:
        if not credential:
            raise HTTPError(401, "subscribe needs a token now")
        found, scope = tokens.match_digest(credential)
        if not found:
            raise HTTPError(403, "its token is no longer valid")
    return stream_filter(sorted(requested) if requested else [], scope)


def scope_allows(scope: tuple[str, ...] | None, name: str) -> bool:
    """Whether a token's scope (None = unlimited) covers the event name: the one place scopes are matched."""
    return scope is None or any(fnmatchcase(name, pattern) for pattern in scope)


# -- client address -------------------------------------------------------------------------------------------


def client_address(peer: str, headers: dict[str, str], trusted: tuple[IPNetwork, ...]) -> str:
    """The address a request counts as. A trusted proxy's X-Forwarded-For is read right to left, skipping
    further trusted proxies; anything else uses the TCP peer, so a client cannot choose its own address."""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = headers.get("x-forwarded-for")
    if not forwarded:
        return peer
    hops = [hop.strip() for hop in forwarded.split(",")]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: fall back to what the socket says
    return hops[0] or peer


def _is_trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


# -- CORS -----------------------------------------------------------------------------------------------------


def cors_headers(origins: tuple[str, ...], credentials: bool, origin: str | None) -> tuple[tuple[str, str], ...]:
    """Headers for a response to a request from `origin`. Nothing for an origin not on the list. With
    credentials the exact origin is echoed, never "*" (browsers refuse "*" with credentials). "*" never goes
    with credentials: config refuses that pair, and "*" alone is answered without them here too."""
    if origin is None or not origins:
        return ()
    if WILDCARD in origins:
        return (("Access-Control-Allow-Origin", "*"),)
    if origin not in origins:
        return ()
    headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    if credentials:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    return tuple(headers)


def preflight_headers(base: tuple[tuple[str, str], ...], methods: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    if not base:
        return ()
    return base + (
        ("Access-Control-Allow-Methods", ", ".join(methods)),
        ("Access-Control-Allow-Headers", ALLOWED_REQUEST_HEADERS),
        ("Access-Control-Max-Age", "600"),
    )


# -- publish rate limit ---------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key (a token's digest prefix, or a client address): `rate` publishes a second with
    bursts of `burst`. allow() returns 0 when a publish may go ahead, otherwise the seconds to wait.

    Memory and time stay bounded however many distinct clients come by. The buckets are kept in the order they
    were last touched (an OrderedDict moved to the end on each use), so the oldest is always first: each call
    forgets the buckets at the front that have refilled, which behave exactly like a key never seen. That is
    amortised O(1), as each bucket is forgotten at most once per use. Beyond `max_keys` live buckets the oldest
    is forgotten even before it has refilled: that client gets a fresh burst early, which is the price of a
    bounded table (and no worse than what a client with many addresses gets anyway)."""

    MAX_KEYS = 100_000

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_KEYS, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            buckets = self._buckets
            level, stamp = buckets.pop(key, (float(self.burst), now))
            level = min(float(self.burst), level + (now - stamp) * self.rate)
            wait = 0.0 if level >= 1 else (1 - level) / self.rate
            buckets[key] = (level - 1 if level >= 1 else level, now)  # re-inserted: now the newest
            self._forget_old(now)
            return wait

    def _forget_old(self, now: float) -> None:
        """Drop refilled buckets from the front (oldest first), then any beyond the cap."""
        refill = self.burst / self.rate
        buckets = self._buckets
        while buckets:
            oldest_key, (_, stamp) = next(iter(buckets.items()))
            if now - stamp < refill and len(buckets) <= self.max_keys:
                return
            del buckets[oldest_key]


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Policy:
    """Everything a request needs to decide access, built from one Config. Building it reads the token files,
    so a reload that cannot read them fails before anything is swapped. The rate limiter's buckets carry over
    from the previous policy while the limits are unchanged, so a reload does not hand out fresh bursts."""

    def __init__(self, config: Config, previous: "Policy | None" = None):
        self.config = config
        self.publish_tokens = load_tokens(
            config.publish_tokens, config.publish_tokens_file, "publish_tokens", "publish_tokens_file"
        )
        self.subscribe_tokens = load_tokens(
            config.subscribe_tokens, config.subscribe_tokens_file, "subscribe_tokens", "subscribe_tokens_file"
        )
        # The metrics token is checked like every other token (hashed, constant time): one TokenSet of one entry.
        self.metrics_tokens = TokenSet([(config.metrics_token, None)] if config.metrics_token else [])
        self.trusted = ip_networks(config.trusted_proxies)  # valid: the config checked them
        limits = (config.publish_rate, config.publish_burst)
        self.limiter: RateLimiter
        if previous is not None and (previous.config.publish_rate, previous.config.publish_burst) == limits:
            self.limiter = previous.limiter
        else:
            self.limiter = RateLimiter(config.publish_rate, config.publish_burst)

    def cors(self, origin: str | None) -> tuple[tuple[str, str], ...]:
        return cors_headers(self.config.cors_origins, self.config.cors_credentials, origin)

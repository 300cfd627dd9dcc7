"""The configuration: one table of keys, validated into a frozen Config.

Owns: every config key's name, type, default, range check and one-line doc; TOML loading; the text of the
shipped `sseserver.toml` (rendered from the same table, so the file and the defaults cannot drift apart).
Pure: no sockets, threads, logging handlers or sys.exit. Errors are ConfigError values naming the key.
Must not know: how a key is used.

A reload builds a whole new Config and the server swaps one reference, so no request ever sees half of an
old config and half of a new one.
"""

import dataclasses
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(Exception):
    """A config value (or file) that cannot be used. `str()` is one line naming the key and why."""

    def __init__(self, key: str | None, problem: str, source: str | None = None):
        self.key, self.problem, self.source = key, problem, source
        where = f"{source}: " if source else ""
        what = f"key {key!r}: " if key else ""
        super().__init__(f"{where}{what}{problem}")


Check = Callable[[Any], str | None]


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    kind: type  # str, int, float, bool or tuple (a list of strings)
    default: Any
    doc: str
    check: Check | None = None
    restart: bool = False  # a reload cannot change it (the listening socket is already bound)
    secret: bool = False  # never shown in a repr or a log line


def between(low: float, high: float) -> Check:
    def check(value):
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g}, not {value!r}"
        return None

    return check


def one_of(*choices: str) -> Check:
    def check(value):
        if value not in choices:
            return f"must be one of {', '.join(choices)}, not {value!r}"
        return None

    return check


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """Addresses and networks (trusted_proxies) parsed, the one place they are: ValueError names the first value
    that is neither."""
    parsed = []
    for value in values:
        try:
            parsed.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network") from None
    return tuple(parsed)


def networks(values: tuple[str, ...]) -> str | None:
    try:
        ip_networks(values)
    except ValueError as exc:
        return str(exc)
    return None


def origins(values) -> str | None:
    for value in values:
        if value != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/\s]+", value):
            return f'{value!r} is not an origin like "https://app.example.com" (scheme://host[:port]) or "*"'
    return None


LOG_LEVELS = ("debug", "info", "warning", "error")

KEYS: tuple[Key, ...] = (
    Key("host", str, "127.0.0.1", 'Address to listen on; "0.0.0.0" or "::" for every interface.', restart=True),
    Key(
        "port",
        int,
        5000,
        "TCP port to listen on; 0 picks any free port (the log says which).",
        between(0, 65535),
        restart=True,
    ),
    Key(
        "queue_size",
        int,
        16,
        "Publishes a subscriber may have waiting for its socket (a batch is one); one more and it is dropped (it "
        "reconnects and catches up from history).",
        between(1, 1_000_000),
    ),
    Key("history_size", int, 1000, "Events kept for Last-Event-ID replay.", between(0, 10_000_000)),
    Key(
        "heartbeat_interval",
        float,
        15.0,
        "Seconds of silence before a stream gets a `:` comment; keep it below every proxy's idle timeout.",
        between(0.05, 3600),
    ),
    Key(
        "retry_ms",
        int,
        3000,
        "Reconnect delay sent to clients in the `retry:` line, in milliseconds.",
        between(0, 86_400_000),
    ),
    Key(
        "max_message_bytes",
        int,
        65536,
        "Largest publish body accepted, in bytes; larger gets 413. In a batch, the largest data of one event.",
        between(1, 64 * 1024 * 1024),
    ),
    Key(
        "max_batch_bytes",
        int,
        1048576,
        "Largest POST /publish/batch body accepted, in bytes; larger gets 413. The ring keeps up to 4 times "
        "this for subscribers still taking a burst.",
        between(1, 64 * 1024 * 1024),
    ),
    Key(
        "max_subscribers",
        int,
        10000,
        "Open streams allowed at once; more get 503 with Retry-After.",
        between(1, 10_000_000),
    ),
    Key(
        "request_timeout",
        float,
        10.0,
        "Seconds a client has to send a request's headers and body.",
        between(0.05, 3600),
    ),
    Key(
        "keepalive_timeout",
        float,
        30.0,
        "Seconds an idle keep-alive connection may wait for its next request.",
        between(0.05, 3600),
    ),
    Key(
        "max_header_bytes",
        int,
        16384,
        "Largest request head (request line plus headers) in bytes; a longer request line gets 414, longer "
        "headers 431.",
        between(256, 1024 * 1024),
    ),
    Key(
        "shutdown_timeout",
        float,
        5.0,
        "Seconds streams and in-flight requests get to finish on SIGTERM.",
        between(0, 3600),
    ),
    Key(
        "upgrade_timeout",
        float,
        10.0,
        "Seconds an upgrade in place (SIGUSR2) or a stop into systemd's fd store may take; past it the daemon keeps"
        " serving, or drains.",
        between(0.1, 600),
    ),
    Key(
        "writer_threads",
        int,
        1,
        "Threads that write events to subscriber sockets (each multiplexes many sockets).",
        between(1, 64),
        restart=True,
    ),
    Key("log_level", str, "info", "One of debug, info, warning, error.", one_of(*LOG_LEVELS)),
    Key(
        "access_log",
        bool,
        False,
        "Log one line per request, and one per stream when it ends. Off by default: a proxy in front usually logs "
        "requests already, and a line per publish costs publish throughput.",
    ),
    Key("demo_page", bool, True, "Serve the live demo page at GET /."),
    Key("metrics_token", str, "", 'Bearer token GET /metrics requires; "" = open.', secret=True),
    Key(
        "history_file",
        str,
        "",
        'File that keeps history across restarts, e.g. "/var/lib/sseserver/history.log"; "" = memory only.',
        restart=True,
    ),
    Key(
        "history_fsync",
        str,
        "interval",
        'When history reaches the disk: "always" (before each 200; survives power loss), "interval" '
        "(every history_fsync_interval; survives a process crash, loses at most that much on power loss), "
        '"never" (the kernel decides). "interval" is the default because it keeps every acknowledged event '
        "through kill -9 at no cost per publish.",
        one_of("always", "interval", "never"),
        restart=True,
    ),
    Key(
        "history_fsync_interval",
        float,
        1.0,
        'Seconds between fsyncs with history_fsync = "interval".',
        between(0.01, 3600),
        restart=True,
    ),
    Key(
        "redis_url",
        str,
        "",
        "Share one event stream between instances through Redis: redis://[[user]:password@]host:port/db, "
        'rediss://... (TLS) or unix:///path/redis.sock; "" = a single instance, no Redis.',
        restart=True,
        secret=True,
    ),
    Key(
        "redis_key_prefix",
        str,
        "sseserver",
        "Prefix of the Redis key <prefix>:events (a Redis Stream); instances sharing a stream share it.",
        lambda value: None if value and " " not in value else "must be non-empty and without spaces",
        restart=True,
    ),
    Key(
        "publish_tokens",
        tuple,
        (),
        'Publish tokens: "TOKEN", or "TOKEN PATTERN ..." to allow only event names matching the globs '
        '(e.g. "k3y-0f-32-chars orders.*"). Empty (and no file) = anyone may publish.',
        secret=True,
    ),
    Key(
        "publish_tokens_file",
        str,
        "",
        'A file with one publish token entry per line, as above (for systemd LoadCredential=); "" = none.',
    ),
    Key(
        "subscribe_tokens",
        tuple,
        (),
        "Subscribe tokens, same form; sent as `Authorization: Bearer` or `?token=`. Empty = open.",
        secret=True,
    ),
    Key("subscribe_tokens_file", str, "", 'A file with one subscribe token entry per line; "" = none.'),
    Key(
        "cors_origins",
        tuple,
        (),
        'Browser origins allowed to call the API cross-origin, e.g. ["https://app.example.com"], or ["*"] '
        "(any origin, never with cors_credentials).",
        origins,
    ),
    Key(
        "cors_credentials",
        bool,
        False,
        "Answer CORS with Access-Control-Allow-Credentials (cookies, EventSource withCredentials); the exact "
        'origin is echoed, never "*". Needs a list of origins: refused with cors_origins = ["*"].',
    ),
    Key(
        "trusted_proxies",
        tuple,
        (),
        'Proxies whose X-Forwarded-For names the client, e.g. ["127.0.0.1"] behind a local nginx.',
        networks,
    ),
    Key(
        "max_subscribers_per_ip",
        int,
        0,
        "Open streams allowed per client address; 0 = no limit.",
        between(0, 10_000_000),
    ),
    Key(
        "publish_rate",
        float,
        0.0,
        "Publishes per second allowed per token (per client address when publishing is open); 0 = no limit.",
        between(0, 1_000_000),
    ),
    Key("publish_burst", int, 20, "Publishes allowed at once before publish_rate applies.", between(1, 1_000_000)),
    Key(
        "idempotency_ttl",
        float,
        300.0,
        "Seconds an Idempotency-Key is remembered: a publish repeating it within this time gets the original "
        "reply and publishes nothing.",
        between(0.01, 30 * 86400),
    ),
    Key(
        "idempotency_max_keys",
        int,
        100000,
        "Idempotency keys remembered at most (per instance, or in Redis); beyond it the oldest is forgotten.",
        between(1, 10_000_000),
    ),
    Key(
        "max_connections",
        int,
        0,
        "Open connections (streams and requests) allowed; more are answered 503 and closed. 0 = the open-file "
        "limit minus 64.",
        between(0, 10_000_000),
    ),
)

KEYS_BY_NAME = {key.name: key for key in KEYS}


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated configuration. Build it with from_mapping() or load(); never mutate it.

    One attribute per key of KEYS, in the same order and of the key's kind (a test keeps the two equal). They
    are written out, not generated from the table, so that a type checker sees them; the defaults, checks and
    docs stay in the table alone."""

    host: str
    port: int
    queue_size: int
    history_size: int
    heartbeat_interval: float
    retry_ms: int
    max_message_bytes: int
    max_batch_bytes: int
    max_subscribers: int
    request_timeout: float
    keepalive_timeout: float
    max_header_bytes: int
    shutdown_timeout: float
    upgrade_timeout: float
    writer_threads: int
    log_level: str
    access_log: bool
    demo_page: bool
    metrics_token: str
    history_file: str
    history_fsync: str
    history_fsync_interval: float
    redis_url: str
    redis_key_prefix: str
    publish_tokens: tuple[str, ...]
    publish_tokens_file: str
    subscribe_tokens: tuple[str, ...]
    subscribe_tokens_file: str
    cors_origins: tuple[str, ...]
    cors_credentials: bool
    trusted_proxies: tuple[str, ...]
    max_subscribers_per_ip: int
    publish_rate: float
    publish_burst: int
    idempotency_ttl: float
    idempotency_max_keys: int
    max_connections: int

    def __repr__(self) -> str:  # never a secret
        shown = ", ".join(f"{key.name}={getattr(self, key.name)!r}" for key in KEYS if not key.secret)
        return f"Config({shown})"


def _convert(key: Key, value: Any) -> Any:
    """The value as the key's type, or raise ConfigError. TOML's `true` is not a number here."""
    if key.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key.name, f"must be a number of seconds, not {value!r}")
        return float(value)
    if key.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key.name, f"must be a whole number, not {value!r}")
        return value
    if key.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key.name, f"must be true or false, not {value!r}")
        return value
    if key.kind is str:
        if not isinstance(value, str):
            raise ConfigError(key.name, f"must be a string, not {value!r}")
        return value
    if key.kind is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ConfigError(key.name, f"must be a list of strings, not {value!r}")
        return tuple(value)
    raise AssertionError(f"key {key.name} has an unknown kind {key.kind!r}")


def from_mapping(values: Mapping[str, Any], base: Config | None = None, source: str | None = None) -> Config:
    """A Config from `values` layered over `base` (the defaults when None). Unknown keys are refused."""
    merged = dataclasses.asdict(base) if base is not None else {key.name: key.default for key in KEYS}
    for name, value in values.items():
        key = KEYS_BY_NAME.get(name)
        if key is None:
            raise ConfigError(name, "unknown key", source)
        try:
            value = _convert(key, value)
            problem = key.check(value) if key.check else None
        except ConfigError as exc:
            raise ConfigError(name, exc.problem, source) from None
        if problem:
            raise ConfigError(name, problem, source)
        merged[name] = value
    _check_together(merged, source)
    return Config(**merged)


def _check_together(values: dict, source: str | None) -> None:
    """Rules that involve more than one key live here, in one place."""
    if values["history_file"] and values["redis_url"]:
        raise ConfigError(
            "history_file",
            "cannot be used with redis_url: with Redis the history lives in the "
            "shared stream (make Redis itself durable with appendonly)",
            source,
        )
    if "*" in values["cors_origins"] and values["cors_credentials"]:
        # Credentials with every origin would let any web page (and a sandboxed "null" origin) read the API as
        # the visitor's browser: list the origins that may send credentials instead.
        raise ConfigError(
            "cors_credentials",
            'cannot be true with cors_origins = ["*"]: list the origins allowed to send credentials',
            source,
        )


def load(path: str, base: Config | None = None) -> Config:
    """Read and validate a TOML file. Any problem, including a missing or unreadable file, is a ConfigError."""
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(None, f"cannot read: {exc.strerror or exc}", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"not valid TOML: {exc}", path) from None
    return from_mapping(values, base, source=path)


def load_layered(path: str | None, overrides: Mapping[str, Any]) -> Config:
    """The running configuration: defaults, then the file (if any), then command-line overrides, each layer
    validated. Used at start and on every reload, so a reload never reverts a command-line flag."""
    config = load(path) if path else from_mapping({})
    if overrides:
        config = from_mapping(overrides, base=config, source="command line")
    return config


def restart_keys_changed(old: Config, new: Config) -> list[str]:
    """Keys whose new value a reload cannot apply."""
    return [key.name for key in KEYS if key.restart and getattr(old, key.name) != getattr(new, key.name)]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)


def render_default_toml() -> str:
    """The text of the shipped sseserver.toml: every key at its default, each under a one-line comment."""
    lines = [
        "# sseserver configuration. Every key is shown at its built-in default.",
        "# Start with: python3 -m sseserver --config sseserver.toml   (SIGHUP reloads it; keys marked",
        "# 'restart' need a restart to change).",
        "",
    ]
    for key in KEYS:
        note = " (restart)" if key.restart else ""
        lines.append(f"# {key.doc}{note}")
        lines.append(f"{key.name} = {_toml_value(key.default)}")
        lines.append("")
    return "\n".join(lines)

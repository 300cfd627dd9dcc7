"""A minimal Redis client: RESP2 over one stdlib socket (TCP, TLS for rediss://, or a unix socket).

Owns: parsing redis URLs, connecting (AUTH, SELECT), encoding commands and decoding replies.
Must not know: events, streams' meaning, retry policy (callers decide what a failure means).
"""

import select
import socket
import ssl
from urllib.parse import parse_qs, unquote, urlsplit

from .config import ConfigError


class RedisError(Exception):
    """An error reply from Redis (the connection is still usable)."""


class RedisUnavailable(Exception):
    """Redis could not be reached, or the connection broke mid-command (the connection is closed).

    `unsent` is True when the command certainly did not run: the failure came before the whole command was
    handed to the kernel, and Redis runs only complete commands (a prefix followed by a closed connection is
    discarded). Only then may a caller retry a command that must not run twice."""

    def __init__(self, message: str, unsent: bool = True):
        super().__init__(message)
        self.unsent = unsent


class RedisAddress:
    __slots__ = ("scheme", "host", "port", "path", "username", "password", "db")

    def __init__(self, scheme, host=None, port=6379, path=None, username=None, password=None, db=0):
        self.scheme, self.host, self.port, self.path = scheme, host, port, path
        self.username, self.password, self.db = username, password, db

    def __repr__(self) -> str:  # never the password
        where = self.path if self.path else f"{self.host}:{self.port}"
        return f"{self.scheme}://{where}/{self.db}"


def parse_url(url: str) -> RedisAddress:
    """redis://[[user]:password@]host[:port][/db], rediss://... (TLS), unix:///path/to/socket[?db=N]."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis_url", f"must start with redis://, rediss:// or unix://, not {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("redis_url", "has a bad port") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError("redis_url", "unix:// needs a socket path, e.g. unix:///run/redis/redis.sock")
        db_text = parse_qs(parts.query).get("db", ["0"])[0]
        path, host = parts.path, None
    else:
        if not parts.hostname:
            raise ConfigError("redis_url", "needs a host, e.g. redis://127.0.0.1:6379/0")
        db_text = parts.path.lstrip("/") or "0"
        path, host = None, parts.hostname
    if not db_text.isdigit():
        raise ConfigError("redis_url", f"database must be a number, not {db_text!r}")
    return RedisAddress(parts.scheme, host, port or 6379, path, username, password, int(db_text))


class Connection:
    def __init__(self, address: RedisAddress, timeout: float):
        self.address = address
        sock = None
        try:
            if address.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(address.path)
            else:
                sock = socket.create_connection((address.host, address.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if address.scheme == "rediss":
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=address.host)
        except OSError as exc:
            if sock is not None:
                sock.close()  # a failed connect must not leak its socket (a follower retries for hours)
            raise RedisUnavailable(f"cannot connect to {address!r}: {exc.strerror or exc}") from None
        self.sock = sock
        self._buffer = bytearray()
        try:
            if address.password is not None:
                credentials = [address.username, address.password] if address.username else [address.password]
                self.command("AUTH", *credentials)
            if address.db:
                self.command("SELECT", address.db)
        except BaseException:
            self.close()
            raise

    def command(self, *args):
        """Send one command and return its reply. RedisError for an error reply; RedisUnavailable (and the
        connection closed) when the socket fails or times out, with `unsent` telling whether it failed while
        sending (the command did not run) or while waiting for the reply (it may have run)."""
        payload = encode(args)
        try:
            self.sock.sendall(payload)
        except OSError as exc:
            self.close()
            raise RedisUnavailable(f"lost {self.address!r}: {exc}", unsent=True) from None
        try:
            return self._reply()
        except (OSError, ValueError) as exc:
            self.close()
            raise RedisUnavailable(f"lost {self.address!r}: {exc}", unsent=False) from None

    def interrupt(self) -> None:
        """From another thread: make the command this connection is blocked in (an XREAD BLOCK) fail at once, so
        a stop need not wait for its timeout."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def reusable(self) -> bool:
        """For an idle pooled connection, before it is used again: False when Redis has closed it since its last
        reply (a restart, `timeout`, CLIENT KILL), which a send would often not notice (TCP accepts the bytes
        and only the reply read fails, after the command may count as sent). An idle connection has nothing to
        read, so anything readable (EOF, a reset, stray bytes) means it must not be reused. One poll(), no
        round trip."""
        if self._buffer:
            return False
        poller = select.poll()  # poll, not select: a busy server's descriptors are past FD_SETSIZE
        poller.register(self.sock, select.POLLIN)
        try:
            return not poller.poll(0)
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- RESP2 decoding ---------------------------------------------------------------------------------------

    def _line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self._buffer += chunk

    def _exact(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            chunk = self.sock.recv(max(65536, size + 2 - len(self._buffer)))
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exact(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise ValueError(f"not a RESP reply: {line[:40]!r}")


def encode(args) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8")
        elif isinstance(arg, int):
            arg = str(arg).encode("ascii")
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)

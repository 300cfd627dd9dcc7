"""Errors as values with an HTTP status. Raised anywhere below the handler, rendered to JSON in one place
(handler.py). Must not know: sockets or how the error is written."""


class HTTPError(Exception):
    """A request that gets `status` and `{"error": message}`.

    `close` says the connection cannot be reused afterwards (for example when an unread body is still on it).
    """

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = (), close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.close = close


class ClientGone(Exception):
    """The peer closed or reset the connection, or sent nothing in time: nothing can be answered."""

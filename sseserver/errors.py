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


class StoreError(Exception):
    """The event could not be stored (history file, Redis): it is not published, and the publisher gets 503."""


class OutcomeUnknown(StoreError):
    """The event was sent to the store but no answer came (a reply lost with its connection, a store that
    stalled past the timeout): it may have been stored, and then it is delivered. The publisher gets 504, never
    503, which always means "not published"."""


class ClientGone(Exception):
    """The peer closed or reset the connection, or sent nothing in time: nothing can be answered."""

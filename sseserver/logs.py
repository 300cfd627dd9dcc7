"""Logging to stderr, in the form the process's supervisor wants.

Owns: the "sseserver" logger's handler and format. Under systemd (JOURNAL_STREAM set) each line starts with a
`<N>` syslog priority and carries no timestamp, because journald adds its own; elsewhere lines carry a UTC
timestamp. Control characters in messages are escaped, so a client-supplied value can never forge a log line.
Must not know: anything about HTTP or events.
"""

import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# Every C0 control character except TAB, plus DEL, as a visible escape.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F] if code != 0x09}


def escape(text: str) -> str:
    return text.translate(_ESCAPES)


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = escape(record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message += "\n" + record.exc_text  # a traceback is ours, not a client's: keep its lines
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{message}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower()} {message}"


def configure(level: str, stream=None, environ=os.environ) -> logging.Logger:
    """Point the "sseserver" logger at stderr (or `stream`) at `level`; safe to call again on reload."""
    logger = logging.getLogger("sseserver")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(journal=bool(environ.get("JOURNAL_STREAM"))))
    logger.addHandler(handler)
    logger.propagate = False
    set_level(level)
    return logger


def set_level(level: str) -> None:
    logging.getLogger("sseserver").setLevel(level.upper())

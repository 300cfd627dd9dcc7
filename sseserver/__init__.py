"""sseserver: a standalone Server-Sent Events daemon in pure Python (standard library only)."""

__version__ = "0.1.0"

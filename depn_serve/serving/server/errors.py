"""The one exception the server's layers answer clients with."""

from __future__ import annotations


class Refused(Exception):
    """A request or admin call refused with an HTTP status and a message for the client (and, where waiting helps,
    how many seconds to wait: `Retry-After`)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

"""What a consumer's handler sees and says: the delivery's metadata, its result, and its failures."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

DUPLICATE = "duplicate"
# What a handler returns: None when it applied the event, DUPLICATE when the event id was already applied.
HandlerResult = str | None
EventHandler = Callable[[Any, "EventMeta"], Awaitable[HandlerResult]]


class PermanentFailure(Exception):
    """Raised by a handler for a message that can never succeed: it goes to the dead-letter queue at once."""


@dataclasses.dataclass(frozen=True)
class EventMeta:
    """What a handler knows about the delivery besides the event itself."""

    event_id: str
    event_type: str
    consumer: str  # the queue; processed event ids are recorded per consumer
    attempt: int  # 1 for the first delivery, +1 for each retry
    max_attempts: int
    retry_delay: float | None  # seconds until the next attempt if this one fails; None on the final attempt
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    correlation_id: str | None = None
    request_id: str | None = None
    producer: str | None = None
    published_at: dt.datetime | None = None
    redelivered: bool = False

    @property
    def final_attempt(self) -> bool:
        return self.retry_delay is None


class RetryLater(Exception):
    """Raised by a handler for an expected, transient condition (a mail server away, data not there yet): the
    message is retried like after any error, but logged without a traceback."""

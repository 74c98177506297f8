"""Stripe's basic API rate limit: operations per second, reads and writes together.

Test mode allows about 25 operations per second (docs: "Rate limits",
https://docs.stripe.com/rate-limits). :class:`RateLimiter` counts every ``/v1``
request over a sliding one-second window; above the limit the request is answered
429 ``rate_limit`` without being executed (and is not stored for its idempotency
key). Requests it refuses do not count. Off (``None``/0) unless configured: CLI
``--rate-limit N``, ``start_emulator(rate_limit=N)``, or ``POST /_emulator/config
{"rate_limit_per_second": N}``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

MESSAGE = "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits."


class RateLimiter:
    """A sliding one-second window over accepted requests."""

    def __init__(self, per_second: float | None = None) -> None:
        self._lock = threading.Lock()
        self._window: deque = deque()
        self.per_second = per_second

    @property
    def per_second(self) -> float | None:
        """The limit (None: off)."""
        return self._limit

    @per_second.setter
    def per_second(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("rate_limit_per_second must be >= 0")
        with self._lock:
            self._limit = float(value) if value else None
            self._window.clear()

    def allow(self) -> bool:
        """Count one request; False when it is over the limit (it is then not counted)."""
        if self._limit is None:
            return True
        now = time.monotonic()
        with self._lock:
            window = self._window
            while window and now - window[0] >= 1.0:
                window.popleft()
            if len(window) >= self._limit:
                return False
            window.append(now)
            return True

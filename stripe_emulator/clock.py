"""The emulated clock.

Emulated time is wall-clock time plus an offset that only grows (``advance``), so
objects created without touching the clock carry realistic timestamps while tests
can jump hours or days ahead. Every Stripe timestamp the emulator writes
(``created``, ``automatically_finalizes_at``, idempotency-key ages, ...) comes from
:meth:`Clock.now`.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """Wall clock + offset, in whole seconds for Stripe fields."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> int:
        """Emulated unix time in whole seconds."""
        return int(time.time() + self._offset)

    def now_float(self) -> float:
        """Emulated unix time with sub-second precision."""
        return time.time() + self._offset

    @property
    def offset(self) -> float:
        """Seconds the emulated clock is ahead of the wall clock."""
        return self._offset

    def advance(self, seconds: float) -> int:
        """Move emulated time forward by ``seconds`` (must be ≥ 0); return the new now."""
        if seconds < 0:
            raise ValueError("the emulated clock only moves forward")
        with self._lock:
            self._offset += seconds
        return self.now()

    def restore_offset(self, offset: float) -> None:
        """Take back an offset saved with the emulator's state."""
        with self._lock:
            self._offset = float(offset)

    def reset(self) -> None:
        """Back to wall-clock time."""
        with self._lock:
            self._offset = 0.0

"""Idempotency keys as Stripe keeps them.

The first response to a POST carrying an ``Idempotency-Key`` is stored (including
500s and card errors, i.e. anything produced once the endpoint started executing)
and replayed for later requests with the same key and the same method, path and
parameters, with the header ``Idempotent-Replayed: true``. The same key with other
parameters is a 400 ``idempotency_error``; a key whose first request is still running
is a 409. Parameter-validation failures, 401s and 429s are not stored: retrying them
runs the request anew. Keys are scoped per API key and forgotten once they are 24
emulated hours old.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from .clock import Clock

TTL_SECONDS = 24 * 3600
MAX_KEYS = 100_000  # beyond this the oldest keys are forgotten early ("a key may be forgotten")


@dataclass
class Entry:
    """One key's record: the request fingerprint and, once done, the response."""

    fingerprint: str
    created: float
    done: bool = False
    status: int = 0
    body: bytes = b""
    headers: dict = field(default_factory=dict)


class IdempotencyStore:
    """Thread-safe map ``(api key, idempotency key) -> Entry``."""

    def __init__(self, clock: Clock, ttl: float = TTL_SECONDS) -> None:
        self._clock = clock
        self._ttl = ttl
        self._entries: dict[tuple[str, str], Entry] = {}
        self._lock = threading.Lock()

    def begin(self, scope: str, key: str, fingerprint: str) -> tuple[str, Entry | None]:
        """Claim ``key`` for a request.

        Returns ``("new", None)`` (caller must later :meth:`finish` or :meth:`abandon`),
        ``("replay", entry)``, ``("mismatch", entry)`` or ``("in_progress", entry)``.
        """
        now = self._clock.now_float()
        with self._lock:
            e = self._entries.get((scope, key))
            if e is not None and now - e.created >= self._ttl:
                del self._entries[(scope, key)]
                e = None
            if e is None:
                self._entries[(scope, key)] = Entry(fingerprint, now)
                return "new", None
            if e.fingerprint != fingerprint:
                return "mismatch", e
            if not e.done:
                return "in_progress", e
            return "replay", e

    def finish(self, scope: str, key: str, status: int, body: bytes, headers: dict) -> None:
        """Store the response of the request that claimed ``key``."""
        with self._lock:
            e = self._entries.get((scope, key))
            if e is not None and not e.done:
                e.done, e.status, e.body, e.headers = True, status, body, dict(headers)
            if len(self._entries) > MAX_KEYS:
                excess = len(self._entries) - MAX_KEYS * 9 // 10
                for k in [k for k, old in itertools.islice(self._entries.items(), excess * 2) if old.done][:excess]:
                    del self._entries[k]

    def abandon(self, scope: str, key: str) -> None:
        """Release a claimed key without storing anything (validation error, 429...)."""
        with self._lock:
            e = self._entries.get((scope, key))
            if e is not None and not e.done:
                del self._entries[(scope, key)]

    def expire(self) -> int:
        """Forget keys older than the TTL (in emulated time); return how many."""
        now = self._clock.now_float()
        with self._lock:
            old = [k for k, e in self._entries.items() if e.done and now - e.created >= self._ttl]
            for k in old:
                del self._entries[k]
        return len(old)

    def clear(self) -> None:
        """Forget every key."""
        with self._lock:
            self._entries.clear()

    def snapshot(self) -> dict:
        """The finished keys (for the state file); keys still in flight are left out."""
        with self._lock:
            return {k: e for k, e in self._entries.items() if e.done}

    def restore(self, entries: dict) -> None:
        """Take the keys of a :meth:`snapshot` back."""
        with self._lock:
            self._entries = dict(entries)

    def __len__(self) -> int:
        return len(self._entries)

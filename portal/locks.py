"""Locks that hold across processes and machines: Redis, with an owner and a lease.

redis-py's Lock stores a random owner token and releases (or extends) only if the
token still matches, in one Lua script, so a worker whose lease ran out can never
release a lock that another worker took after it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import LockError, LockNotOwnedError

from portal.queue import redis_connection

# Longer than any sync job may run (the job timeout is shorter), so a live holder
# never loses its lock; a dead one frees it when the lease runs out.
INVOICE_LOCK_LEASE_SECONDS = 600


@contextmanager
def invoice_lock(invoice_id: int, wait_seconds: float = 30.0) -> Iterator[bool]:
    """Hold the invoice's lock for the block; yields False if it stayed taken for
    `wait_seconds` (the block must then do nothing to the invoice at Stripe)."""
    lock = redis_connection().lock(
        f"portal:lock:invoice:{invoice_id}", timeout=INVOICE_LOCK_LEASE_SECONDS,
        blocking_timeout=wait_seconds, sleep=0.05,
    )
    acquired = lock.acquire()
    try:
        yield acquired
    finally:
        if acquired:
            try:
                lock.release()
            except (LockNotOwnedError, LockError):
                pass  # the lease ran out; whoever holds it now keeps it

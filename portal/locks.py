"""Locks that hold across processes and machines: Redis, with an owner, a short lease
renewed while the holder lives, and fencing.

- The lease is short (`INVOICE_LOCK_LEASE_SECONDS`): a holder that dies (SIGKILL,
  a lost machine) frees the invoice within one lease.
- A live holder renews it from a heartbeat thread every third of the lease, however
  long a Stripe call takes, so a slow call never lets a second worker in.
- Fencing: before every Stripe write the holder calls `check()`, which confirms in
  Redis that the lock is still its own (the token matches). A holder that lost it
  (its process was frozen longer than the lease, Redis was restarted and someone
  else took the lock) raises `LockLost` and stops without writing.
- Renew, check and release compare the owner token and act in one Lua script, so a
  holder whose lease ran out can never extend or release another holder's lock.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import uuid4

from redis.exceptions import RedisError

from portal.queue import redis_connection

log = logging.getLogger(__name__)

# Seconds; PORTAL_LOCK_LEASE_SECONDS overrides it (tests of a killed holder use a short one).
INVOICE_LOCK_LEASE_SECONDS = float(os.environ.get("PORTAL_LOCK_LEASE_SECONDS") or 30)
# How long a caller that finds the invoice locked waits before giving up.
DEFAULT_WAIT_SECONDS = 5.0

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockLost(Exception):
    """The lock is no longer this holder's: it must stop without writing."""


class InvoiceLock:
    """One holder's claim on one invoice (see the module docstring)."""

    def __init__(self, invoice_id: int, lease_seconds: float | None = None, redis=None):
        self.redis = redis or redis_connection()
        self.key = f"portal:lock:invoice:{invoice_id}"
        self.token = uuid4().hex
        self.lease_ms = int((lease_seconds or INVOICE_LOCK_LEASE_SECONDS) * 1000)
        self.lost = False
        self.abandoned = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    def acquire(self, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> bool:
        deadline = time.monotonic() + wait_seconds
        while True:
            if self.redis.set(self.key, self.token, nx=True, px=self.lease_ms):
                self._start_heartbeat()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def check(self) -> None:
        """Fencing: raise LockLost unless the lock is still ours (renewing it)."""
        if self.lost:
            raise LockLost(f"{self.key}: lost earlier (lease ran out or Redis lost it)")
        try:
            still_ours = self._renew(keys=[self.key], args=[self.token, self.lease_ms])
        except RedisError as error:
            raise LockLost(f"{self.key}: cannot confirm ownership: {error}") from error
        if not still_ours:
            self.lost = True
            raise LockLost(f"{self.key}: held by someone else now")

    def abandon(self) -> None:
        """Stop renewing and keep the lock until its lease runs out: a write whose answer
        never came may still land at Stripe (the lease outlasts any request), and nobody
        may read the invoice and write again before it has."""
        self.abandoned = True
        self._stop.set()

    def release(self) -> bool:
        """Release if still ours; False (and logged) if the lease had been lost."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2)
        if self.abandoned:
            log.warning("%s: left to expire with its lease (a write may still be in flight)", self.key)
            return False
        try:
            released = bool(self._release(keys=[self.key], args=[self.token]))
        except RedisError as error:
            log.warning("%s: release failed: %s", self.key, error)
            return False
        if not released:
            self.lost = True
            log.warning("%s: was no longer ours at release", self.key)
        return released

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat {self.key}", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        interval = self.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self._renew(keys=[self.key], args=[self.token, self.lease_ms]):
                    self.lost = True
                    return
            except RedisError:
                continue  # Redis is back within the lease, or check() will say so


@contextmanager
def invoice_lock(invoice_id: int, wait_seconds: float = DEFAULT_WAIT_SECONDS,
                 lease_seconds: float | None = None) -> Iterator[InvoiceLock | None]:
    """Hold the invoice's lock for the block: yields the lock (call `check()` before
    each Stripe write), or None if it stayed taken for `wait_seconds` (the block must
    then do nothing to the invoice at Stripe)."""
    lock = InvoiceLock(invoice_id, lease_seconds)
    if not lock.acquire(wait_seconds):
        yield None
        return
    try:
        yield lock
    finally:
        lock.release()

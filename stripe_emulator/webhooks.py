"""Asynchronous, signed webhook delivery with retries.

Every event the emulator emits is queued here and POSTed, off the request path, by a
few background threads to the configured endpoint, signed as Stripe signs:
``Stripe-Signature: t=<unix>,v1=<hex hmac_sha256(secret, "<t>.<raw body>")>`` (so
``stripe.Webhook.construct_event`` accepts it). A delivery that gets a non-2xx answer
or a connection error is retried with exponential backoff
(``retry_base_seconds * 2**(attempt-1)``, capped at ``retry_max_seconds``) up to
``max_attempts`` attempts.

Options (``POST /_emulator/webhooks``, JSON; any subset):
``url``, ``secret``, ``paused`` (bool: queue but do not send), ``shuffle`` (bool:
send ready events in a seeded random order instead of FIFO),
``duplicate_probability`` (0..1: send an event a second time), ``seed``,
``max_attempts``, ``retry_base_seconds``, ``retry_max_seconds``, ``concurrency``
(sending threads, default 4; use 1 for a strictly reproducible order),
``timeout_seconds``. ``GET /_emulator/webhooks`` returns the options, the number of
deliveries still queued and every attempt made.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import http.client
import itertools
import random
import threading
import time
from urllib.parse import urlsplit

DEFAULTS = {
    "paused": False,
    "shuffle": False,
    "duplicate_probability": 0.0,
    "seed": 0,
    "max_attempts": 6,
    "retry_base_seconds": 1.0,
    "retry_max_seconds": 60.0,
    "concurrency": 4,
    "timeout_seconds": 10.0,
}


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header value for ``payload``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class _Delivery:
    __slots__ = ("event_id", "event_type", "body", "attempt", "duplicate")

    def __init__(self, event_id, event_type, body, duplicate=False):
        self.event_id = event_id
        self.event_type = event_type
        self.body = body
        self.attempt = 0
        self.duplicate = duplicate


class WebhookDispatcher:
    """Queue of event deliveries drained by background threads."""

    def __init__(self, url: str | None = None, secret: str | None = None) -> None:
        self.url = url
        self.secret = secret
        self._cond = threading.Condition()
        self._stopping = False
        self._workers = 0
        self._seq = itertools.count()
        self._reset_locked()
        self._ensure_threads()

    # ------------------------------------------------------------------ config
    def _reset_locked(self) -> None:
        self.options = dict(DEFAULTS)
        self._rng = random.Random(self.options["seed"])
        self._ready: list[_Delivery] = []
        self._delayed: list = []
        self._in_flight = 0
        self._attempts: list[dict] = []
        self._generation = getattr(self, "_generation", 0) + 1

    def reset(self) -> None:
        """Drop queued deliveries, the attempt log and options (keeps url/secret)."""
        with self._cond:
            self._reset_locked()
            self._cond.notify_all()
        self._ensure_threads()

    def configure(self, opts: dict) -> dict:
        """Change options (see module docstring); return the status."""
        unknown = set(opts) - set(DEFAULTS) - {"url", "secret"}
        if unknown:
            raise ValueError(f"unknown webhook option(s): {sorted(unknown)}")
        with self._cond:
            if "url" in opts:
                self.url = opts["url"] or None
            if "secret" in opts:
                self.secret = opts["secret"] or None
            for k in DEFAULTS:
                if k in opts:
                    self.options[k] = type(DEFAULTS[k])(opts[k])
            if "seed" in opts:
                self._rng = random.Random(self.options["seed"])
            self._cond.notify_all()
        self._ensure_threads()
        return self.status()

    def status(self) -> dict:
        """Options, queue length and the attempt log."""
        with self._cond:
            return {
                "url": self.url,
                "secret_configured": bool(self.secret),
                **self.options,
                "pending": len(self._ready) + len(self._delayed) + self._in_flight,
                "attempts": list(self._attempts),
            }

    def pending(self) -> int:
        """Deliveries queued, waiting for a retry, or being sent."""
        with self._cond:
            return len(self._ready) + len(self._delayed) + self._in_flight

    # ------------------------------------------------------------------ queue
    def enqueue(self, event_id: str, event_type: str, body: bytes) -> None:
        """Queue one event (its JSON ``body``) for delivery; no-op without a URL."""
        if not self.url:
            return
        with self._cond:
            self._ready.append(_Delivery(event_id, event_type, body))
            p = self.options["duplicate_probability"]
            if p > 0 and self._rng.random() < p:
                self._ready.append(_Delivery(event_id, event_type, body, duplicate=True))
            self._cond.notify()

    def _ensure_threads(self) -> None:
        with self._cond:
            want = max(1, int(self.options["concurrency"]))
            while self._workers < want:
                self._workers += 1
                threading.Thread(target=self._worker, name="webhook-sender", daemon=True).start()

    def _take(self):
        """Wait for a delivery that is due; return it (or None when stopping)."""
        with self._cond:
            while True:
                if self._stopping or self._workers > max(1, int(self.options["concurrency"])):
                    self._workers -= 1  # stopping, or concurrency was lowered
                    return None, 0
                if not self.options["paused"]:
                    now = time.monotonic()
                    while self._delayed and self._delayed[0][0] <= now:
                        _, _, d = heapq.heappop(self._delayed)
                        self._ready.append(d)
                    if self._ready:
                        idx = self._rng.randrange(len(self._ready)) if self.options["shuffle"] else 0
                        d = self._ready.pop(idx)
                        self._in_flight += 1
                        return d, self._generation
                    timeout = (self._delayed[0][0] - now) if self._delayed else None
                else:
                    timeout = None
                self._cond.wait(timeout)

    def _worker(self) -> None:
        conn = None  # one keep-alive connection per sending thread
        conn_key = None
        while True:
            d, gen = self._take()
            if d is None:
                if conn is not None:
                    conn.close()
                return
            d.attempt += 1
            status, error, started = None, None, time.time()
            url, secret, timeout = self.url, self.secret or "", self.options["timeout_seconds"]
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                "Stripe-Signature": sign(d.body, secret),
            }
            for try_fresh in (False, True):
                reused = conn is not None
                try:
                    parts = urlsplit(url or "")
                    key = (parts.scheme, parts.hostname, parts.port, timeout)
                    if conn is None or conn_key != key:
                        if conn is not None:
                            conn.close()
                        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                        conn, conn_key, reused = cls(parts.hostname, parts.port, timeout=timeout), key, False
                    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                    conn.request("POST", path, body=d.body, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    status, error = resp.status, None
                    if resp.will_close:
                        conn.close()
                        conn = None
                    if not 200 <= status < 300:
                        error = f"HTTP {status}"
                    break
                except Exception as e:  # connection refused, timeout, reset...
                    error = f"{type(e).__name__}: {e}"
                    if conn is not None:
                        conn.close()
                    conn = None
                    if not reused or try_fresh or isinstance(e, TimeoutError):
                        break  # a stale keep-alive connection gets one fresh try
            ok = status is not None and 200 <= status < 300
            with self._cond:
                self._in_flight -= 1
                if gen != self._generation:
                    continue  # reset happened meanwhile
                self._attempts.append(
                    {
                        "event": d.event_id,
                        "type": d.event_type,
                        "attempt": d.attempt,
                        "status": status,
                        "ok": ok,
                        "error": error,
                        "duplicate": d.duplicate,
                        "at": started,
                        "duration_ms": round((time.time() - started) * 1000, 2),
                    }
                )
                if not ok and d.attempt < self.options["max_attempts"]:
                    delay = min(
                        self.options["retry_base_seconds"] * 2 ** (d.attempt - 1),
                        self.options["retry_max_seconds"],
                    )
                    heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), d))
                self._cond.notify_all()

    def stop(self) -> None:
        """Stop the sending threads (queued deliveries are dropped)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

"""Fault injection, deterministic under a seed.

Configured with ``POST /_emulator/faults`` (JSON); ``{}`` clears everything::

    {
      "seed": 7,
      "rules": [
        {"kind": "rate_limit",   "probability": 0.3},
        {"kind": "lock_timeout", "method": "POST", "path": "/v1/invoices/*", "count": 2},
        {"kind": "500_before",   "path": "/v1/invoiceitems", "count": 1},
        {"kind": "500_after",    "path": "/v1/invoiceitems", "count": 1},
        {"kind": "drop_after",   "path": "/v1/invoiceitems", "count": 1},
        {"kind": "latency",      "latency_ms": 150, "probability": 0.5}
      ],
      "max_writes_per_second": 25,
      "max_reads_per_second": 100
    }

A rule matches API requests (``/v1/...``) by ``method`` (string or list) and ``path``
(shell glob, or a regular expression when it starts with ``^``). It fires with
``probability`` (default 1) and, when ``count`` is given, only on that many of the
next matching requests. Kinds:

* ``rate_limit``   – 429 ``rate_limit`` (no ``Stripe-Should-Retry``: stripe-python
  does not retry it), nothing done.
* ``lock_timeout`` – 429 ``lock_timeout`` with ``Stripe-Should-Retry: true``.
* ``500_before``   – 500 ``api_error`` before anything is done; not stored for the
  idempotency key, so a retry runs anew.
* ``500_after``    – the request is executed, then a 500 ``api_error`` is returned and
  stored for the idempotency key (the outcome is unknown to the client).
* ``drop_after``   – the request is executed (its real response stored for the
  idempotency key), then the connection is closed without any response.
* ``latency``      – ``latency_ms`` added before the request is handled.

``max_writes_per_second`` / ``max_reads_per_second`` answer 429 ``rate_limit`` to
POST/DELETE (GET) requests above that rate over a sliding one-second window.

``"lock_contention": true`` answers 429 ``lock_timeout`` (``Stripe-Should-Retry:
true``) to a write on an invoice (or customer) while another write to the same
object is still in flight, as Stripe does for concurrent writes to one object
(combine with ``latency`` rules to widen the window).
"""

from __future__ import annotations

import fnmatch
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

PRE_KINDS = ("rate_limit", "lock_timeout", "500_before")
POST_KINDS = ("500_after", "drop_after")
KINDS = (*PRE_KINDS, *POST_KINDS, "latency")


@dataclass
class Rule:
    """One fault rule (see module docstring)."""

    kind: str
    probability: float = 1.0
    count: int | None = None
    methods: tuple[str, ...] | None = None
    path: str | None = None
    latency_ms: float = 0.0
    fired: int = 0
    _regex: re.Pattern | None = field(default=None, repr=False)

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self._regex is not None:
            return self._regex.search(path) is not None
        return True

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "probability": self.probability,
            "count_remaining": self.count,
            "method": list(self.methods) if self.methods else None,
            "path": self.path,
            "latency_ms": self.latency_ms,
            "fired": self.fired,
        }


@dataclass
class Decision:
    """What to do to one request."""

    latency: float = 0.0
    pre: str | None = None
    post: str | None = None


class FaultInjector:
    """Holds the fault configuration and decides, per request, which faults fire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        """No faults."""
        with getattr(self, "_lock", threading.Lock()):
            self._rules: list[Rule] = []
            self._rng = random.Random(0)
            self._seed = None
            self._max_writes: float | None = None
            self._max_reads: float | None = None
            self._writes: deque = deque()
            self._reads: deque = deque()
            self._fired_log: list[dict] = []
            self.active = False
            self.lock_contention = False

    def configure(self, spec: dict) -> dict:
        """Replace the configuration with ``spec``; raise ``ValueError`` if malformed."""
        rules = []
        for raw in spec.get("rules", []) or []:
            if not isinstance(raw, dict):
                raise ValueError("each rule must be an object")
            unknown = set(raw) - {"kind", "probability", "count", "method", "path", "latency_ms"}
            if unknown:
                raise ValueError(f"unknown rule field(s): {sorted(unknown)}")
            kind = raw.get("kind")
            if kind not in KINDS:
                raise ValueError(f"unknown fault kind {kind!r}; expected one of {KINDS}")
            method = raw.get("method")
            methods = None
            if method:
                methods = tuple(m.upper() for m in ([method] if isinstance(method, str) else method))
            path = raw.get("path")
            regex = None
            if path:
                regex = re.compile(path if path.startswith("^") else fnmatch.translate(path))
            count = raw.get("count")
            rules.append(
                Rule(
                    kind=kind,
                    probability=float(raw.get("probability", 1.0)),
                    count=int(count) if count is not None else None,
                    methods=methods,
                    path=path,
                    latency_ms=float(raw.get("latency_ms", 0)),
                    _regex=regex,
                )
            )
        unknown = set(spec) - {"seed", "rules", "max_writes_per_second", "max_reads_per_second", "lock_contention"}
        if unknown:
            raise ValueError(f"unknown fault setting(s): {sorted(unknown)}")
        self.clear()
        with self._lock:
            self._seed = spec.get("seed")
            self._rng = random.Random(self._seed if self._seed is not None else 0)
            self._rules = rules
            mw, mr = spec.get("max_writes_per_second"), spec.get("max_reads_per_second")
            self._max_writes = float(mw) if mw else None
            self._max_reads = float(mr) if mr else None
            self.active = bool(rules or self._max_writes or self._max_reads)
            self.lock_contention = bool(spec.get("lock_contention"))
        return self.describe()

    def describe(self) -> dict:
        """Current configuration, per-rule firing counts and the log of fired faults."""
        with self._lock:
            return {
                "seed": self._seed,
                "rules": [r.describe() for r in self._rules],
                "max_writes_per_second": self._max_writes,
                "max_reads_per_second": self._max_reads,
                "lock_contention": self.lock_contention,
                "fired": list(self._fired_log),
            }

    def decide(self, method: str, path: str) -> Decision:
        """Roll the dice for one API request (call once per request)."""
        d = Decision()
        if not self.active:
            return d
        with self._lock:
            for r in self._rules:
                if r.count is not None and r.count <= 0:
                    continue
                if not r.matches(method, path):
                    continue
                if r.kind in PRE_KINDS and d.pre is not None:
                    continue
                if r.kind in POST_KINDS and (d.post is not None or d.pre is not None):
                    continue
                if r.probability < 1.0 and self._rng.random() >= r.probability:
                    continue
                if r.count is not None:
                    r.count -= 1
                r.fired += 1
                if r.kind == "latency":
                    d.latency += r.latency_ms / 1000.0
                elif r.kind in PRE_KINDS:
                    d.pre = r.kind
                else:
                    d.post = r.kind
                self._fired_log.append({"kind": r.kind, "method": method, "path": path, "at": time.time()})
            if d.pre is None:
                is_write = method in ("POST", "DELETE")
                limit = self._max_writes if is_write else self._max_reads
                if limit:
                    window = self._writes if is_write else self._reads
                    now = time.monotonic()
                    while window and now - window[0] >= 1.0:
                        window.popleft()
                    if len(window) >= limit:
                        d.pre = "rate_limit"
                        d.post = None
                        self._fired_log.append(
                            {"kind": "rate_limit", "method": method, "path": path, "at": time.time(), "by": "rate"}
                        )
                    else:
                        window.append(now)
            if d.pre is not None:
                d.post = None
        return d

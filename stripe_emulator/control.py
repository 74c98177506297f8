"""Client for the emulator's control API (``/_emulator/...``), stdlib only.

Endpoints (JSON in and out; POST bodies may also be form-encoded):

=====================================  ==================================================
``POST /_emulator/reset``              forget every object, event, idempotency key,
                                       fault, logged request and webhook attempt; clock
                                       back to wall time (webhook URL/secret kept);
                                       config back to the start-time settings
``GET  /_emulator/clock``              ``{"now", "offset"}``
``POST /_emulator/clock``              ``{"advance_seconds": N}``: advance, run the
                                       finalizations and payment attempts that came
                                       due (each at its own time), expire idempotency
                                       keys
``GET|POST /_emulator/faults``         fault configuration (see ``faults`` module); ``{}``
                                       clears
``GET  /_emulator/requests``           request log (``?since=N&path=/v1/..&method=POST``)
                                       → ``{"data": [...], "next": N}``
``GET  /_emulator/stats``              request count, process CPU time, object counts
``GET|POST /_emulator/webhooks``       delivery options, queue length and attempts
``GET|POST /_emulator/payment_failures`` ``{"customer": id, "fail": true|false}``
``GET|POST /_emulator/config``         ``{"max_bulk_lines": N, "payment_delay_seconds": N,
                                       "payment_retry_days": [3, 5, 7],
                                       "portal_default_configuration": bool,
                                       "rate_limit_per_second": N | 0 | null}`` (any
                                       subset; unknown keys are refused)
=====================================  ==================================================
"""

from __future__ import annotations

import json
import time
import urllib.request


class EmulatorControl:
    """Typed wrapper over the control API of the emulator at ``url``."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + "/_emulator/" + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read() or b"{}")

    def reset(self) -> dict:
        """Clear all state (objects, events, idempotency, faults, request log, clock offset)."""
        return self._call("POST", "reset", {})

    def now(self) -> int:
        """Emulated unix time."""
        return self._call("GET", "clock")["now"]

    def advance_clock(self, seconds: float) -> dict:
        """Advance emulated time and run what came due; returns ``{"now", "offset",
        "finalized", "payment_attempts", "expired_idempotency_keys"}``."""
        return self._call("POST", "clock", {"advance_seconds": seconds})

    def set_faults(self, **spec) -> dict:
        """Replace the fault configuration, e.g.
        ``set_faults(seed=1, rules=[{"kind": "500_after", "path": "/v1/invoiceitems", "count": 1}])``;
        ``set_faults()`` clears. See :mod:`stripe_emulator.faults`."""
        return self._call("POST", "faults", spec)

    def clear_faults(self) -> dict:
        """No faults."""
        return self._call("POST", "faults", {})

    def faults(self) -> dict:
        """Current fault configuration and the log of fired faults."""
        return self._call("GET", "faults")

    def requests_log(self, since: int = 0, path: str | None = None, method: str | None = None) -> list[dict]:
        """API requests received (oldest first): method, path, params, idempotency_key,
        status, time, duration_ms, api_key (fingerprint), replayed, fault."""
        q = f"requests?since={since}"
        if path:
            q += f"&path={path}"
        if method:
            q += f"&method={method}"
        return self._call("GET", q)["data"]

    def stats(self) -> dict:
        """Request count and the emulator process's CPU time (``cpu_total`` seconds)."""
        return self._call("GET", "stats")

    def fail_payments_for(self, customer_id: str, fail: bool = True) -> dict:
        """Make (or stop making) every charge of ``customer_id``'s invoices fail with a card
        error, whatever its payment method (without this, a customer without a
        payment method, or with a declining card, fails anyway)."""
        return self._call("POST", "payment_failures", {"customer": customer_id, "fail": fail})

    def configure_webhooks(self, **opts) -> dict:
        """Set webhook options: url, secret, paused, shuffle, duplicate_probability, seed,
        max_attempts, retry_base_seconds, retry_max_seconds, concurrency, timeout_seconds."""
        return self._call("POST", "webhooks", opts)

    def pause_webhooks(self) -> dict:
        """Queue events without sending them."""
        return self.configure_webhooks(paused=True)

    def resume_webhooks(self) -> dict:
        """Send queued events again."""
        return self.configure_webhooks(paused=False)

    def webhooks(self) -> dict:
        """Options, ``pending`` deliveries and every delivery ``attempts`` entry."""
        return self._call("GET", "webhooks")

    def wait_for_webhooks(self, timeout: float = 10.0, poll: float = 0.05) -> dict:
        """Wait until no delivery is queued, retrying or in flight; return the status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.webhooks()
            if st["pending"] == 0 or time.monotonic() > deadline:
                return st
            time.sleep(poll)

    def set_max_bulk_lines(self, n: int) -> dict:
        """Change the per-call line limit of add_lines/update_lines/remove_lines."""
        return self._call("POST", "config", {"max_bulk_lines": n})

    def config(self) -> dict:
        """The current settings (``max_bulk_lines``, ``payment_delay_seconds``,
        ``payment_retry_days``, ``portal_default_configuration`` and its id,
        ``rate_limit_per_second``, ``api_version``)."""
        return self._call("GET", "config")

    def configure(self, **settings) -> dict:
        """Change any subset of the settings (see :meth:`config`)."""
        return self._call("POST", "config", settings)

    def set_payment_delay(self, seconds: float) -> dict:
        """Seconds between finalization and the first automatic payment attempt
        (``next_payment_attempt``); 0 attempts at once. Default 3600."""
        return self.configure(payment_delay_seconds=seconds)

    def set_payment_retry_days(self, days: list[float]) -> dict:
        """Days after each failed automatic attempt to retry; one retry per entry.
        Default ``[3, 5, 7]`` (4 attempts in all)."""
        return self.configure(payment_retry_days=list(days))

    def set_portal_default_configuration(self, enabled: bool = True) -> dict:
        """Emulate saving the customer-portal settings in the Dashboard: the account
        gets (or loses) a default configuration, ``is_default: true``."""
        return self.configure(portal_default_configuration=enabled)

    def set_rate_limit(self, per_second: float | None) -> dict:
        """Stripe's combined rate limit: requests per second, reads and writes
        together, over a sliding one-second window; ``None``/0 turns it off."""
        return self.configure(rate_limit_per_second=per_second)

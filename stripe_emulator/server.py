"""HTTP server, routing and the per-request pipeline.

A threaded stdlib HTTP/1.1 server (keep-alive, ``TCP_NODELAY``) serves three areas:

* ``/v1/...`` — the Stripe API. Each request goes: API key check (401) → route
  (404 ``Unrecognized request URL``) → the combined rate limit (429
  ``rate_limit``, see :mod:`stripe_emulator.ratelimit`) → due scheduled work
  (finalizations, payment attempts) → faults decided
  (latency slept with no lock held; 429/500-before answered) → idempotency lookup
  (replay / mismatch / in-progress) → parameter validation against
  ``stripe.params`` → the :class:`~stripe_emulator.store.Store` operation under the
  state lock (plus ``expand``) → faults after the change (500 or dropped
  connection) → response stored for the idempotency key when Stripe would store
  it → request log.
* ``/_emulator/...`` — the control API (see :mod:`stripe_emulator.control` for a
  client and the list of endpoints).
* ``/i/<invoice>``, ``/i/<invoice>/pdf``, ``/p/session/<id>`` — hosted invoice page,
  invoice PDF and billing-portal page (``POST /p/session/<id>/payment_method``: the
  page's "add a card" form).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode

from . import pages
from .clock import Clock
from .errors import StripeError
from .faults import FaultInjector
from .idempotency import IdempotencyStore
from .objects import API_VERSION
from .params import decode_query, endpoint_schema, validate
from .payments import DEFAULT_PAYMENT_DELAY, DEFAULT_RETRY_DAYS
from .ratelimit import MESSAGE as RATE_LIMIT_MESSAGE
from .ratelimit import RateLimiter
from .store import Store
from .webhooks import WebhookDispatcher

DEFAULT_API_KEY = "sk_test_emulator"
MAX_LOG = 200_000  # request-log entries kept (the oldest half is dropped beyond)
_DROP = object()

# (method, path regex, stripe.params class, Store method)
ROUTES = [
    ("POST", r"/v1/customers", "CustomerCreateParams", "create_customer"),
    ("GET", r"/v1/customers", "CustomerListParams", "list_customers"),
    ("GET", r"/v1/customers/([^/]+)", "CustomerRetrieveParams", "retrieve_customer"),
    ("POST", r"/v1/customers/([^/]+)", "CustomerUpdateParams", "update_customer"),
    ("DELETE", r"/v1/customers/([^/]+)", "CustomerDeleteParams", "delete_customer"),
    ("POST", r"/v1/invoices", "InvoiceCreateParams", "create_invoice"),
    ("GET", r"/v1/invoices", "InvoiceListParams", "list_invoices"),
    ("GET", r"/v1/invoices/([^/]+)", "InvoiceRetrieveParams", "retrieve_invoice"),
    ("POST", r"/v1/invoices/([^/]+)", "InvoiceUpdateParams", "update_invoice"),
    ("DELETE", r"/v1/invoices/([^/]+)", "InvoiceDeleteParams", "delete_invoice"),
    ("POST", r"/v1/invoices/([^/]+)/finalize", "InvoiceFinalizeInvoiceParams", "finalize_invoice"),
    ("POST", r"/v1/invoices/([^/]+)/pay", "InvoicePayParams", "pay_invoice"),
    ("POST", r"/v1/invoices/([^/]+)/void", "InvoiceVoidInvoiceParams", "void_invoice"),
    ("POST", r"/v1/invoices/([^/]+)/mark_uncollectible", "InvoiceMarkUncollectibleParams", "mark_uncollectible"),
    ("GET", r"/v1/invoices/([^/]+)/lines", "InvoiceListLinesParams", "list_lines"),
    ("POST", r"/v1/invoices/([^/]+)/lines/([^/]+)", "InvoiceLineItemUpdateParams", "update_line"),
    ("POST", r"/v1/invoices/([^/]+)/add_lines", "InvoiceAddLinesParams", "add_lines"),
    ("POST", r"/v1/invoices/([^/]+)/update_lines", "InvoiceUpdateLinesParams", "update_lines"),
    ("POST", r"/v1/invoices/([^/]+)/remove_lines", "InvoiceRemoveLinesParams", "remove_lines"),
    ("POST", r"/v1/invoiceitems", "InvoiceItemCreateParams", "create_item"),
    ("GET", r"/v1/invoiceitems", "InvoiceItemListParams", "list_items"),
    ("GET", r"/v1/invoiceitems/([^/]+)", "InvoiceItemRetrieveParams", "retrieve_item"),
    ("POST", r"/v1/invoiceitems/([^/]+)", "InvoiceItemUpdateParams", "update_item"),
    ("DELETE", r"/v1/invoiceitems/([^/]+)", "InvoiceItemDeleteParams", "delete_item"),
    ("GET", r"/v1/events", "EventListParams", "list_events"),
    ("GET", r"/v1/events/([^/]+)", "EventRetrieveParams", "retrieve_event"),
    ("POST", r"/v1/billing_portal/sessions", "billing_portal.SessionCreateParams", "create_portal_session"),
    (
        "POST",
        r"/v1/billing_portal/configurations",
        "billing_portal.ConfigurationCreateParams",
        "create_portal_configuration",
    ),
    (
        "GET",
        r"/v1/billing_portal/configurations",
        "billing_portal.ConfigurationListParams",
        "list_portal_configurations",
    ),
    (
        "GET",
        r"/v1/billing_portal/configurations/([^/]+)",
        "billing_portal.ConfigurationRetrieveParams",
        "retrieve_portal_configuration",
    ),
    (
        "POST",
        r"/v1/billing_portal/configurations/([^/]+)",
        "billing_portal.ConfigurationUpdateParams",
        "update_portal_configuration",
    ),
    ("GET", r"/v1/account", "AccountRetrieveCurrentParams", "retrieve_account"),
    ("POST", r"/v1/webhook_endpoints", "WebhookEndpointCreateParams", "create_webhook_endpoint"),
    ("GET", r"/v1/webhook_endpoints", "WebhookEndpointListParams", "list_webhook_endpoints"),
    ("GET", r"/v1/webhook_endpoints/([^/]+)", "WebhookEndpointRetrieveParams", "retrieve_webhook_endpoint"),
    ("DELETE", r"/v1/webhook_endpoints/([^/]+)", "WebhookEndpointDeleteParams", "delete_webhook_endpoint"),
    ("GET", r"/v1/tax/settings", "tax.SettingsRetrieveParams", "retrieve_tax_settings"),
    ("GET", r"/v1/coupons", "CouponListParams", "list_coupons"),
    ("GET", r"/v1/payment_methods", "PaymentMethodListParams", "list_payment_methods"),
    ("GET", r"/v1/payment_methods/([^/]+)", "PaymentMethodRetrieveParams", "retrieve_payment_method"),
    ("POST", r"/v1/payment_methods/([^/]+)/attach", "PaymentMethodAttachParams", "attach_payment_method"),
    ("POST", r"/v1/payment_methods/([^/]+)/detach", "PaymentMethodDetachParams", "detach_payment_method"),
    (
        "GET",
        r"/v1/customers/([^/]+)/payment_methods",
        "CustomerListPaymentMethodsParams",
        "list_customer_payment_methods",
    ),
    (
        "GET",
        r"/v1/customers/([^/]+)/payment_methods/([^/]+)",
        "CustomerRetrievePaymentMethodParams",
        "retrieve_customer_payment_method",
    ),
]
_COMPILED = {}
for _m, _rx, _schema, _fn in ROUTES:
    _COMPILED.setdefault(_m, []).append((re.compile(_rx + r"/?$"), endpoint_schema(_schema), _fn))


def key_fingerprint(api_key: str) -> str:
    """What the request log shows instead of the key."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


def _mask(key: str) -> str:
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


class Emulator:
    """The whole emulator: state, clock, idempotency, faults, webhooks, request log."""

    def __init__(
        self,
        *,
        api_keys=(DEFAULT_API_KEY,),
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        max_bulk_lines: int = 50,
        base_url: str = "",
        payment_delay: float = DEFAULT_PAYMENT_DELAY,
        payment_retry_days=DEFAULT_RETRY_DAYS,
        portal_default_configuration: bool = False,
        rate_limit: float | None = None,
    ) -> None:
        self.api_keys = frozenset(api_keys)
        self.clock = Clock()
        self.store = Store(self.clock, max_bulk_lines=max_bulk_lines, base_url=base_url)
        self.rate_limiter = RateLimiter()
        # What the process was started with; reset() comes back to it.
        self.start_config = {
            "max_bulk_lines": max_bulk_lines,
            "payment_delay_seconds": payment_delay,
            "payment_retry_days": list(payment_retry_days),
            "portal_default_configuration": portal_default_configuration,
            "rate_limit_per_second": rate_limit,
        }
        self.configure(self.start_config)
        self.idempotency = IdempotencyStore(self.clock)
        self.faults = FaultInjector()
        self.webhooks = WebhookDispatcher(webhook_url, webhook_secret)
        self.store.on_event = self.webhooks.enqueue
        self.store.webhooks_configured = lambda: bool(self.webhooks.url)
        self.store.webhook_url = lambda: self.webhooks.url
        self.log: list[dict] = []
        self._log_base = 0  # absolute index of self.log[0]
        self._writing: set[str] = set()  # objects with a write in flight (lock_contention)
        self._log_lock = threading.Lock()
        self.started = time.time()
        self.request_count = 0
        self._req_counter = 0
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="emulator-clock", daemon=True)
        self._ticker.start()

    # ------------------------------------------------------------------ lifecycle
    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self.run_due()

    def run_due(self) -> dict | None:
        """Run scheduled finalizations and payment attempts that are due."""
        if not self.store.has_due(self.clock.now()):
            return None
        with self.store.lock:
            return self.store.run_due()

    CONFIG_KEYS = (
        "max_bulk_lines",
        "payment_delay_seconds",
        "payment_retry_days",
        "portal_default_configuration",
        "rate_limit_per_second",
        "account_api_version",
        "tax_status",
    )

    def configure(self, data: dict) -> dict:
        """Apply ``/_emulator/config`` settings (any subset of :attr:`CONFIG_KEYS`);
        raise ``ValueError`` on an unknown key or a bad value. Returns the settings."""
        unknown = set(data) - set(self.CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown config key(s): {sorted(unknown)}; expected {list(self.CONFIG_KEYS)}")
        new: dict = {}  # validate everything before changing anything
        if "max_bulk_lines" in data:
            new["max_bulk_lines"] = int(data["max_bulk_lines"])
            if new["max_bulk_lines"] < 1:
                raise ValueError("max_bulk_lines must be >= 1")
        if "payment_delay_seconds" in data:
            new["payment_delay"] = int(float(data["payment_delay_seconds"]))
            if new["payment_delay"] < 0:
                raise ValueError("payment_delay_seconds must be >= 0")
        if "payment_retry_days" in data:
            days = data["payment_retry_days"]
            if isinstance(days, str):
                days = [d for d in days.split(",") if d.strip()]
            if not isinstance(days, (list, tuple)) or any(float(d) <= 0 for d in days):
                raise ValueError("payment_retry_days must be a list of positive numbers of days")
            new["payment_retry_days"] = tuple(float(d) for d in days)
        if "account_api_version" in data:
            new["account_api_version"] = str(data["account_api_version"] or API_VERSION)
        if "tax_status" in data:
            if data["tax_status"] not in ("active", "pending"):
                raise ValueError("tax_status must be 'active' or 'pending'")
            new["tax_status"] = data["tax_status"]
        limit = data.get("rate_limit_per_second")
        limit = float(limit) if limit not in (None, "", False) else None
        if limit is not None and limit < 0:
            raise ValueError("rate_limit_per_second must be >= 0")
        store = self.store
        with store.lock:
            for attr, value in new.items():
                setattr(store, attr, value)
            if "portal_default_configuration" in data:
                store.set_portal_default_configuration(_truthy(data["portal_default_configuration"]))
            if "rate_limit_per_second" in data:
                self.rate_limiter.per_second = limit
        return self.config()

    def config(self) -> dict:
        """The current settings."""
        store = self.store
        with store.lock:
            default = store.default_portal_configuration()
            return {
                "max_bulk_lines": store.max_bulk_lines,
                "payment_delay_seconds": store.payment_delay,
                "payment_retry_days": [int(d) if d == int(d) else d for d in store.payment_retry_days],
                "portal_default_configuration": default is not None,
                "portal_default_configuration_id": default["id"] if default else None,
                "rate_limit_per_second": self.rate_limiter.per_second,
                "api_version": API_VERSION,
                "account_api_version": store.account_api_version,
                "tax_status": store.tax_status,
            }

    def shutdown(self) -> None:
        """Stop background threads."""
        self._stop.set()
        self.webhooks.stop()

    def reset(self) -> None:
        """Clear objects, events, idempotency keys, faults, request log, clock offset
        and webhook delivery state (the webhook URL and secret are kept); settings go
        back to what the process was started with."""
        with self.store.lock:
            self.store.reset()
            self.configure(self.start_config)
            self.clock.reset()
            self.idempotency.clear()
            self.faults.clear()
            self.webhooks.reset()
            with self._log_lock:
                self.log = []
                self._log_base = 0

    def _next_request_id(self) -> str:
        with self._log_lock:
            self._req_counter += 1
            n = self._req_counter
        return f"req_emu{n:010d}"

    # ------------------------------------------------------------------ API
    def api(self, method: str, path: str, query: str, body: bytes, headers) -> tuple:
        """Handle one ``/v1`` request; return (status, headers, payload bytes | _DROP)."""
        t0 = time.perf_counter()
        req_id = self._next_request_id()
        # The version the request asked for; without one, the account's default (as Stripe).
        rh = {"request-id": req_id, "Stripe-Version": headers.get("Stripe-Version") or self.store.account_api_version}
        api_key = self._api_key(headers)
        idem_key = headers.get("Idempotency-Key") if method == "POST" else None
        if idem_key:
            rh["Idempotency-Key"] = idem_key
        raw: dict = {}
        entry = {
            "id": req_id,
            "method": method,
            "path": path,
            "params": raw,
            "idempotency_key": idem_key,
            "status": None,
            "time": self.clock.now_float(),
            "api_key": key_fingerprint(api_key) if api_key else None,
            "replayed": False,
            "fault": None,
        }

        def finish(status, payload, extra_headers=None):
            entry["status"] = status
            entry["duration_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            with self._log_lock:
                self.log.append(entry)
                self.request_count += 1
                if len(self.log) > MAX_LOG:
                    cut = len(self.log) - MAX_LOG // 2
                    del self.log[:cut]
                    self._log_base += cut
            h = dict(rh)
            if extra_headers:
                h.update(extra_headers)
            return status, h, payload

        def error(e: StripeError):
            return json.dumps(e.body()).encode()

        if api_key not in self.api_keys:
            msg = (
                f"Invalid API Key provided: {_mask(api_key)}"
                if api_key
                else "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
                "https://stripe.com/docs/api#authentication for details, or we can help at "
                "https://support.stripe.com/."
            )
            return finish(401, error(StripeError(msg, status=401)))
        try:
            raw.update(decode_query(query))
            if body:
                raw.update(decode_query(body.decode("utf-8")))
        except StripeError as e:
            return finish(e.status, error(e))
        except UnicodeDecodeError:
            return finish(400, error(StripeError("Invalid request body: not UTF-8.")))

        route = None
        for rx, schema, fn in _COMPILED.get(method, ()):
            m = rx.match(path)
            if m:
                route = (schema, fn, m.groups())
                break
        if route is None:
            e = StripeError(
                f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help "
                "at https://support.stripe.com/.",
                status=404,
            )
            return finish(404, error(e))
        schema, fn, args = route

        if not self.rate_limiter.allow():
            entry["fault"] = "rate_limit"
            e = StripeError(RATE_LIMIT_MESSAGE, status=429, code="rate_limit")
            return finish(429, error(e))
        self.run_due()
        decision = self.faults.decide(method, path)
        if decision.pre is not None:
            entry["fault"] = decision.pre
            return finish(*self._pre_fault(decision.pre))

        target = None
        if self.faults.lock_contention and method != "GET":
            target = self._lock_target(path, raw)
            if target is not None and not self._claim(target):
                entry["fault"] = "lock_timeout"
                return finish(*self._pre_fault("lock_timeout"))
        try:
            scope = key_fingerprint(api_key)
            if idem_key:
                if len(idem_key) > 255:
                    e = StripeError("Idempotency-Key must be at most 255 characters long.", param="Idempotency-Key")
                    return finish(400, error(e))
                fp = method + " " + path + " " + json.dumps(raw, sort_keys=True)
                state, stored = self.idempotency.begin(scope, idem_key, fp)
                if state == "replay":
                    entry["replayed"] = True
                    return finish(stored.status, stored.body, {**stored.headers, "Idempotent-Replayed": "true"})
                if state == "mismatch":
                    e = StripeError(
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        f"used with. Try using a key other than '{idem_key}' if you meant to execute a different "
                        "request.",
                        type="idempotency_error",
                    )
                    return finish(400, error(e))
                if state == "in_progress":
                    e = StripeError(
                        "There is currently another in-progress request using this idempotency key (that probably "
                        "means you submitted twice, and the other request is still going through): "
                        f"{idem_key}. Please try again later.",
                        status=409,
                        code="idempotency_key_in_use",
                    )
                    return finish(409, error(e))

            if decision.latency:  # slept holding the idempotency claim, never the state lock
                time.sleep(decision.latency)
            storable = True
            extra = None
            try:
                p = validate(schema, raw)
                store = self.store
                with store.lock:
                    store.request_ctx = (req_id, idem_key)
                    try:
                        result = getattr(store, fn)(*args, p)
                        if p.get("expand"):
                            # results may be shared with stored events: expand a copy
                            result = store.expand(copy.deepcopy(result), p["expand"])
                    finally:
                        store.request_ctx = (None, None)
                status = 200
                payload = json.dumps(result).encode()
            except StripeError as e:
                status, payload, storable, extra = e.status, error(e), e.store, e.headers
            except Exception:  # a bug in the emulator: answer like Stripe's 500
                traceback.print_exc(file=sys.stderr)
                e = StripeError("An unknown error occurred", status=500, type="api_error")
                status, payload = 500, error(e)

            if decision.post == "500_after":
                entry["fault"] = "500_after"
                status = 500
                payload = error(StripeError("An unknown error occurred", status=500, type="api_error"))
                storable = True
            if idem_key:
                if storable:
                    stored_headers = {"Original-Request": req_id, **(extra or {})}
                    self.idempotency.finish(scope, idem_key, status, payload, stored_headers)
                else:
                    self.idempotency.abandon(scope, idem_key)
            if decision.post == "drop_after":
                entry["fault"] = "drop_after"
                finish(status, payload)
                return status, {}, _DROP
            return finish(status, payload, extra)
        finally:
            if target is not None:
                self._release(target)

    def _lock_target(self, path: str, raw: dict) -> str | None:
        """The object a write locks: the invoice (or customer) it changes."""
        parts = path.strip("/").split("/")
        if len(parts) >= 3 and parts[1] in ("invoices", "customers"):
            return parts[2]
        if len(parts) >= 2 and parts[1] == "invoiceitems":
            if len(parts) == 2:
                inv = raw.get("invoice")
                return inv if isinstance(inv, str) else None
            item = self.store.items.get(parts[2])
            return item.get("invoice") if item else None
        return None

    def _claim(self, target: str) -> bool:
        with self._log_lock:
            if target in self._writing:
                return False
            self._writing.add(target)
            return True

    def _release(self, target: str) -> None:
        with self._log_lock:
            self._writing.discard(target)

    @staticmethod
    def _api_key(headers) -> str:
        auth = headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            return auth[7:].strip()
        if auth.startswith("Basic "):
            import base64

            try:
                return base64.b64decode(auth[6:]).decode().split(":", 1)[0]
            except Exception:
                return ""
        return ""

    @staticmethod
    def _pre_fault(kind: str) -> tuple:
        if kind == "rate_limit":
            e = StripeError(
                "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                status=429,
                code="rate_limit",
            )
            return 429, json.dumps(e.body()).encode()
        if kind == "lock_timeout":
            e = StripeError(
                "This object cannot be accessed right now because another API request or Stripe process is "
                "currently accessing it. If you see this error intermittently, retry the request. If you see "
                "this error frequently and are making multiple concurrent requests to a single object, make "
                "your requests serially or at a lower rate.",
                status=429,
                code="lock_timeout",
            )
            return 429, json.dumps(e.body()).encode(), {"Stripe-Should-Retry": "true"}
        e = StripeError("An unknown error occurred", status=500, type="api_error")
        return 500, json.dumps(e.body()).encode()

    # ------------------------------------------------------------------ control
    def control(self, method: str, path: str, query: str, body: bytes) -> tuple:
        """Handle ``/_emulator/...``; return (status, headers, payload)."""
        try:
            data = _control_body(body)
        except ValueError as e:
            return _json(400, {"error": str(e)})
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        name = path[len("/_emulator/") :].strip("/")
        try:
            if name == "reset" and method == "POST":
                self.reset()
                return _json(200, {"reset": True})
            if name == "clock":
                if method == "POST":
                    secs = float(data.get("advance_seconds", 0))
                    if secs < 0:
                        return _json(400, {"error": "advance_seconds must be >= 0"})
                    with self.store.lock:
                        self.clock.advance(secs)
                        done = self.store.run_due()
                    expired = self.idempotency.expire()
                    return _json(
                        200,
                        {
                            "now": self.clock.now(),
                            "offset": self.clock.offset,
                            **done,
                            "expired_idempotency_keys": expired,
                        },
                    )
                return _json(200, {"now": self.clock.now(), "offset": self.clock.offset})
            if name == "faults":
                if method == "POST":
                    return _json(200, self.faults.configure(data))
                return _json(200, self.faults.describe())
            if name == "requests":
                since = int(q.get("since", 0))
                with self._log_lock:
                    rows = self.log[max(0, since - self._log_base) :]
                    nxt = self._log_base + len(self.log)
                if "path" in q:
                    rows = [r for r in rows if r["path"].startswith(q["path"])]
                if "method" in q:
                    rows = [r for r in rows if r["method"] == q["method"].upper()]
                return _json(200, {"object": "list", "data": rows, "next": nxt})
            if name == "stats":
                t = os.times()
                with self.store.lock:
                    counts = {
                        "customers": len(self.store.customers),
                        "invoices": len(self.store.invoices),
                        "invoiceitems": len(self.store.items),
                        "payment_methods": len(self.store.payment_methods),
                        "portal_configurations": len(self.store.portal_configurations),
                        "events": len(self.store.events),
                    }
                return _json(
                    200,
                    {
                        "requests": self.request_count,
                        "cpu_user": t.user,
                        "cpu_system": t.system,
                        "cpu_total": t.user + t.system,
                        "uptime": time.time() - self.started,
                        "threads": threading.active_count(),
                        "pid": os.getpid(),
                        "objects": counts,
                        "idempotency_keys": len(self.idempotency),
                        "webhooks_pending": self.webhooks.pending(),
                    },
                )
            if name == "webhooks":
                if method == "POST":
                    return _json(200, self.webhooks.configure(data))
                return _json(200, self.webhooks.status())
            if name == "payment_failures":
                if method == "POST":
                    cid = data.get("customer")
                    fail = _truthy(data.get("fail", True))
                    with self.store.lock:
                        if fail:
                            self.store.fail_customers.add(cid)
                        else:
                            self.store.fail_customers.discard(cid)
                with self.store.lock:
                    return _json(200, {"failing": sorted(self.store.fail_customers)})
            if name == "config":
                if method == "POST":
                    return _json(200, self.configure(data))
                return _json(200, self.config())
        except (ValueError, TypeError) as e:
            return _json(400, {"error": str(e)})
        return _json(404, {"error": f"unknown control endpoint {method} {path}"})

    # ------------------------------------------------------------------ pages
    def page(self, path: str, query: dict | None = None) -> tuple:
        """Hosted invoice page, invoice PDF and billing-portal page."""
        query = query or {}
        parts = path.strip("/").split("/")
        with self.store.lock:
            if parts[0] == "i" and len(parts) in (2, 3):
                inv = self.store.invoices.get(parts[1])
                if inv is not None and not inv.get("deleted") and inv["status"] != "draft":
                    rendered = self.store.r_invoice(inv)
                    from .objects import render_line

                    lines = [render_line(it) for it in self.store._inv_items(inv)]
                    if len(parts) == 2:
                        return (
                            200,
                            {"Content-Type": "text/html; charset=utf-8"},
                            pages.invoice_html(rendered, lines).encode(),
                        )
                    if parts[2] == "pdf":
                        return 200, {"Content-Type": "application/pdf"}, pages.invoice_pdf(rendered, lines)
            if parts[0] == "p" and len(parts) == 3 and parts[1] == "session":
                s = self.store.sessions.get(parts[2])
                if s is not None:
                    c = self.store.customers[s["customer"]]
                    pm = None if c.get("deleted") else self.store._default_payment_method(c)
                    card = self.store.r_payment_method(pm) if pm else None
                    html = pages.portal_html(s, c, card, query.get("error"))
                    return 200, {"Content-Type": "text/html; charset=utf-8"}, html.encode()
        return 404, {"Content-Type": "text/plain"}, b"Not found"

    def page_post(self, path: str, body: bytes) -> tuple:
        """The portal page's "add a card" form: ``POST /p/session/<id>/payment_method``
        (form field ``payment_method``), then 303 back to the page."""
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["p", "session"] or parts[3] != "payment_method":
            return 404, {"Content-Type": "text/plain"}, b"Not found"
        sid = parts[2]
        token = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}.get("payment_method", "")
        location = f"/p/session/{sid}"
        with self.store.lock:
            if sid not in self.store.sessions:
                return 404, {"Content-Type": "text/plain"}, b"Not found"
            try:
                self.store.portal_add_card(sid, token)
            except StripeError as e:
                location += "?" + urlencode({"error": e.message})
        return 303, {"Location": location, "Content-Type": "text/plain"}, b""


def _truthy(v) -> bool:
    return v in (True, 1, "1", "true", "True", "yes")


def _control_body(body: bytes) -> dict:
    if not body:
        return {}
    text = body.decode("utf-8").strip()
    if not text:
        return {}
    if text.startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data
    flat = {k: v[-1] for k, v in parse_qs(text).items()}
    return {k: _num(v) for k, v in flat.items()}


def _num(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _json(status: int, obj) -> tuple:
    return status, {}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stripe-emulator"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence access log
        pass

    def _handle(self) -> None:
        emu: Emulator = self.server.emulator  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if path.startswith("/v1/"):
            status, headers, payload = emu.api(self.command, path, query, body, self.headers)
            ctype = "application/json"
        elif path.startswith("/_emulator/"):
            status, headers, payload = emu.control(self.command, path, query, body)
            ctype = "application/json"
        elif self.command == "GET":
            status, headers, payload = emu.page(path, {k: v[-1] for k, v in parse_qs(query).items()})
            ctype = headers.pop("Content-Type", "text/plain")
        elif self.command == "POST" and path.startswith("/p/"):
            status, headers, payload = emu.page_post(path, body)
            ctype = headers.pop("Content-Type", "text/plain")
        else:
            status, headers, payload = 404, {}, b'{"error": "not found"}'
            ctype = "application/json"
        if payload is _DROP:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        reason = self.responses.get(status, ("",))[0]
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(payload)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if self.close_connection:
            head.append("Connection: close")
        out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        try:
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_DELETE = _handle


class EmulatorHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server carrying an :class:`Emulator`."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, emulator: Emulator):
        self.emulator = emulator
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def make_server(host: str = "127.0.0.1", port: int = 0, **kwargs) -> EmulatorHTTPServer:
    """Build an emulator bound to ``host:port`` (0 = any free port); call ``serve_forever``.

    ``kwargs`` go to :class:`Emulator` (``api_keys``, ``webhook_url``,
    ``webhook_secret``, ``max_bulk_lines``, ``base_url``, ``payment_delay``,
    ``payment_retry_days``, ``portal_default_configuration``, ``rate_limit``);
    ``base_url`` defaults to ``http://<host>:<port>``.
    """
    public = kwargs.pop("base_url", None)
    emulator = Emulator(**kwargs)
    server = EmulatorHTTPServer((host, port), emulator)
    if not public:
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        public = f"http://{shown}:{server.server_address[1]}"
    emulator.store.base_url = public.rstrip("/")
    return server

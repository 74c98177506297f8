"""The one door to Stripe: every call the portal makes to Stripe goes through here.

`StripeGateway` wraps the official `stripe` client (pointed at `STRIPE_API_BASE` when
set, e.g. the project's emulator), counts reads and writes, spends every request
(reads and writes alike: Stripe's rate limit counts both, about 25 per second in test
mode and 100 in live mode) from a budget shared by every process through Redis,
retries what is safe to retry, and maps Stripe's errors to the portal's own:

- every write is one attempt with an idempotency key of its own (never derived from
  what it writes: a write needed again must be applied again, and Stripe answers a
  known key with its stored response), recorded before the call (`StripeWrite`);
- network errors, 429 `rate_limit` and `lock_timeout`, 409, and anything with
  `Stripe-Should-Retry: true` are retried with exponential backoff and jitter, with
  the attempt's key; when retries run out: `StripeUnavailable`;
- a 500 on a write is `OutcomeUnknown` at once: Stripe stores the 500 for its
  idempotency key and would replay it, so the caller must reconcile by reading;
- a response Stripe replayed (`Idempotent-Replayed: true`: a retry of this attempt
  found it applied) is flagged (`last_write_replayed`): it says what Stripe answered
  then, not what the invoice is now, so callers re-read before trusting a total;
- before every write try the lock holder's `fence` runs: a holder that lost the
  invoice's lock stops there (`LockLost`) and writes nothing;
- editing a finalized invoice: `InvoiceNotEditable`; a missing object: `StripeObjectMissing`;
  any other refusal: `StripeRejected`.

stripe-python's own retries are off (`max_network_retries=0`): it would retry a 500
that Stripe replays, and it never retries a plain 429.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import stripe
from flask import current_app

from portal.metrics import record_stripe_rate_limited, record_stripe_request
from portal.queue import redis_connection
from portal.text import has_control_characters

MAX_ATTEMPTS = 6
BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 8.0
LIST_PAGE_SIZE = 100
# Per request (stripe-python's default is 80 s). With MAX_ATTEMPTS and the backoff, a
# call gives up within about 2.5 minutes: well inside every job's timeout.
REQUEST_TIMEOUT_SECONDS = 20


class StripeFailure(Exception):
    """Base of the portal's Stripe errors."""


class StripeUnavailable(StripeFailure):
    """Transient failures (network, 429, 5xx) outlasted every retry."""


class OutcomeUnknown(StripeFailure):
    """A write answered 500: it may or may not have been applied."""


class InvoiceNotEditable(StripeFailure):
    """The invoice is no longer a draft at Stripe."""


class StripeObjectMissing(StripeFailure):
    """The object does not exist (or no longer exists) at Stripe."""


class StripeRejected(StripeFailure):
    """Stripe refused the request (a 4xx other than the above)."""


class StripeNotConfigured(StripeFailure):
    """STRIPE_API_KEY is not set."""


# Reserve the next free write slot, spaced 1/rate apart across every worker (GCRA
# with no burst): the shared write rate never exceeds the budget in any window.
# Returns how many microseconds the caller must wait for its slot.
_RESERVE_SLOT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_free < now then next_free = now end
redis.call('SET', KEYS[1], next_free + interval, 'PX', math.ceil((next_free + interval - now) / 1000) + 1000)
return next_free - now
"""


# Slots are spaced for this share of the budget: requests reach Stripe with some
# jitter, and bunched arrivals must still stay under the limit in every second.
BUDGET_SAFETY = 0.96


class RequestBudget:
    """Stripe requests per second, reads and writes together, shared by every process
    (`STRIPE_MAX_REQUESTS_PER_SECOND`)."""

    def __init__(self, redis, requests_per_second: int, key: str = "portal:stripe:request-budget"):
        self.redis = redis
        self.interval_us = int(1_000_000 / (max(requests_per_second, 1) * BUDGET_SAFETY))
        self.key = key
        self._script = redis.register_script(_RESERVE_SLOT)

    def acquire(self) -> float:
        """Block until this caller's write slot; returns the seconds waited."""
        wait_us = int(self._script(keys=[self.key], args=[self.interval_us]))
        if wait_us > 0:
            time.sleep(wait_us / 1_000_000)
        return wait_us / 1_000_000


@dataclass
class CallCounts:
    reads: int = 0
    writes: int = 0
    replays: int = 0


def new_idempotency_key(operation: str) -> str:
    """A key for one attempt of one write, never derived from its content: a write
    needed again (the same correction a second time) must be applied again, and Stripe
    would answer a known key with the stored response instead (for 24 hours)."""
    return f"portal-{operation}-{uuid4().hex}"


def _replayed(result) -> bool:
    response = getattr(result, "last_response", None)
    headers = getattr(response, "headers", None) or {}
    value = headers.get("Idempotent-Replayed") or headers.get("idempotent-replayed") or ""
    return str(value).lower() == "true"


class StripeGateway:
    def __init__(self, api_key: str, api_base: str | None, budget: RequestBudget | None,
                 max_attempts: int = MAX_ATTEMPTS, sleep=time.sleep, recorder: WriteRecorder | None = None,
                 timeout_seconds: float = REQUEST_TIMEOUT_SECONDS):
        if not api_key:
            raise StripeNotConfigured("STRIPE_API_KEY is not set")
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout_seconds),
        )
        self.budget = budget
        self.max_attempts = max_attempts
        self.sleep = sleep
        self.counts = CallCounts()
        self.recorder = recorder
        # Set by the holder of an invoice lock: called before every write try.
        self.fence = None
        # A write was sent and no answer came back (a job timeout inside the call, a
        # request timeout on its last try): it may still land at Stripe.
        self.write_in_flight = False
        self.last_write_replayed = False
        self._tries = 0
        self._record = None

    # --- the calls -------------------------------------------------------------------
    # Every write names what it is for (`invoice` / `organization`: the portal's ids)
    # and gets an idempotency key of its own, recorded before the call (`StripeWrite`).

    def create_customer(self, params: dict, organization: int | None = None):
        return self._write("create_customer", lambda options: self.client.v1.customers.create(
            params=params, options=options), organization=organization)

    def customers_by_email(self, email: str) -> Iterator[Any]:
        yield from self._paginate(lambda params: self.client.v1.customers.list(params={**params, "email": email}))

    def retrieve_customer(self, customer_id: str, expand: bool = True):
        """The customer, with its default payment method expanded (a deleted customer
        reads as a stub with `deleted: true`, which Stripe will not expand)."""
        params = {"expand": ["invoice_settings.default_payment_method"]} if expand else None
        return self._read(lambda: self.client.v1.customers.retrieve(customer_id, params=params))

    def create_invoice(self, params: dict, invoice: int | None = None):
        return self._write("create_invoice", lambda options: self.client.v1.invoices.create(
            params=params, options=options), invoice=invoice)

    def retrieve_invoice(self, invoice_id: str, expand: list[str] | None = None):
        params = {"expand": expand} if expand else None
        return self._read(lambda: self.client.v1.invoices.retrieve(invoice_id, params=params))

    def draft_invoices_of(self, customer_id: str) -> Iterator[Any]:
        yield from self._paginate(
            lambda params: self.client.v1.invoices.list(params={**params, "customer": customer_id,
                                                                "status": "draft"}))

    def invoice_lines(self, invoice_id: str) -> list[Any]:
        return list(self._paginate(
            lambda params: self.client.v1.invoices.line_items.list(invoice_id, params=params)))

    def add_lines(self, invoice_id: str, lines: list[dict], invoice: int | None = None):
        return self._write("add_lines", lambda options: self.client.v1.invoices.add_lines(
            invoice_id, params={"lines": lines}, options=options), invoice=invoice, stripe_object=invoice_id)

    def update_lines(self, invoice_id: str, lines: list[dict], invoice: int | None = None):
        return self._write("update_lines", lambda options: self.client.v1.invoices.update_lines(
            invoice_id, params={"lines": lines}, options=options), invoice=invoice, stripe_object=invoice_id)

    def remove_lines(self, invoice_id: str, line_ids: list[str], invoice: int | None = None):
        lines = [{"id": line_id, "behavior": "delete"} for line_id in line_ids]
        return self._write("remove_lines", lambda options: self.client.v1.invoices.remove_lines(
            invoice_id, params={"lines": lines}, options=options), invoice=invoice, stripe_object=invoice_id)

    def finalize_invoice(self, invoice_id: str, invoice: int | None = None):
        return self._write("finalize_invoice", lambda options: self.client.v1.invoices.finalize_invoice(
            invoice_id, params={"auto_advance": True}, options=options), invoice=invoice, stripe_object=invoice_id)

    def delete_draft(self, invoice_id: str, invoice: int | None = None):
        """Delete a draft (Stripe deletes only drafts; a finalized one it refuses)."""
        return self._write("delete_draft", lambda options: self.client.v1.invoices.delete(
            invoice_id, options=options), invoice=invoice, stripe_object=invoice_id)

    def update_invoice(self, invoice_id: str, params: dict, invoice: int | None = None):
        return self._write("update_invoice", lambda options: self.client.v1.invoices.update(
            invoice_id, params=params, options=options), invoice=invoice, stripe_object=invoice_id)

    def create_portal_session(self, customer_id: str, return_url: str, configuration: str | None = None,
                              organization: int | None = None):
        params = {"customer": customer_id, "return_url": return_url}
        if configuration:
            params["configuration"] = configuration
        return self._write("create_portal_session", lambda options: self.client.v1.billing_portal.sessions.create(
            params=params, options=options), organization=organization, stripe_object=customer_id)

    def create_portal_configuration(self, params: dict):
        return self._write("create_portal_configuration",
                           lambda options: self.client.v1.billing_portal.configurations.create(
                               params=params, options=options))

    # --- the account's setup (read by `flask stripe-check`) --------------------------

    def retrieve_account(self):
        return self._read(lambda: self.client.v1.accounts.retrieve_current())

    def webhook_endpoints(self) -> Iterator[Any]:
        return self._paginate(lambda params: self.client.v1.webhook_endpoints.list(params=params))

    def tax_settings(self):
        return self._read(lambda: self.client.v1.tax.settings.retrieve())

    def any_coupon(self):
        """One of the account's coupons, or None."""
        page = self._read(lambda: self.client.v1.coupons.list(params={"limit": 1}))
        return page.data[0] if page.data else None

    def _paginate(self, fetch) -> Iterator[Any]:
        params: dict = {"limit": LIST_PAGE_SIZE}
        while True:
            page = self._read(lambda params=params: fetch(params))
            yield from page.data
            if not page.has_more or not page.data:
                return
            params = {"limit": LIST_PAGE_SIZE, "starting_after": page.data[-1].id}

    def _read(self, call):
        return self._call(call, write=False)

    def _write(self, operation: str, call, invoice: int | None = None, organization: int | None = None,
               stripe_object: str | None = None):
        """One attempt of one write: a new idempotency key, recorded before the call,
        reused only by this call's own retries (network errors, 429s)."""
        record = self.recorder.started(operation, invoice, organization, stripe_object) if self.recorder else None
        self._record = record
        key = record.idempotency_key if record else new_idempotency_key(operation)
        options = {"idempotency_key": key}
        self.last_write_replayed = False
        self.write_in_flight = True  # until an answer says otherwise
        try:
            result = self._call(lambda: call(options), write=True, fence=True)
            self.write_in_flight = False
        except StripeUnavailable as failure:
            # Retries ran out: on a timed-out last try the write may still land.
            self.write_in_flight = isinstance(failure.__cause__, stripe.APIConnectionError)
            if record:
                self.recorder.finished(record, "no_answer" if self.write_in_flight else "refused", self._tries,
                                       str(failure))
            raise
        except OutcomeUnknown as failure:
            self.write_in_flight = False  # Stripe answered (a 500): nothing more will land
            if record:
                self.recorder.finished(record, "unknown", self._tries, str(failure))
            raise
        except StripeFailure as failure:
            self.write_in_flight = False
            if record:
                self.recorder.finished(record, "refused", self._tries, str(failure))
            raise
        except Exception as error:  # LockLost before a try, a job timeout inside one...
            self.write_in_flight = type(error).__name__ != "LockLost"
            if record:
                outcome = "no_answer" if self.write_in_flight else ("not_sent" if self._tries <= 1 else "unknown")
                self.recorder.finished(record, outcome, self._tries, f"{type(error).__name__}: {error}")
            raise
        # Stripe answered from its idempotency store: an earlier try of this attempt
        # was applied and its answer lost. That answer is not evidence of the state now.
        self.last_write_replayed = _replayed(result)
        if self.last_write_replayed:
            self.counts.replays += 1
        if record:
            self.recorder.finished(record, "replayed" if self.last_write_replayed else "applied", self._tries,
                                   None, getattr(result, "id", None))
        return result

    def _call(self, call, write: bool, fence: bool = False):
        for attempt in range(1, self.max_attempts + 1):
            self._tries = attempt
            if self.budget is not None:
                self.budget.acquire()
            if fence and self.fence is not None:
                self.fence()  # LockLost: the invoice is no longer ours; write nothing
            if fence and attempt > 1 and self._record is not None:
                self.recorder.retrying(self._record)
            if write:
                self.counts.writes += 1
            else:
                self.counts.reads += 1
            record_stripe_request(write)
            try:
                return call()
            except stripe.StripeError as error:
                _reraise_job_timeout(error)
                if _status(error) == 429:
                    record_stripe_rate_limited(write)
                if write and _status(error) == 500:
                    raise OutcomeUnknown(_describe(error)) from error
                if not _transient(error):
                    raise _portal_error(error) from error
                if attempt == self.max_attempts:
                    raise StripeUnavailable(_describe(error)) from error
                self.sleep(_backoff(attempt))
        raise AssertionError("unreachable")


def _reraise_job_timeout(error: stripe.StripeError) -> None:
    """stripe-python's HTTP client turns any exception raised during a request into an
    APIConnectionError, including the job timeout RQ raises inside a job that ran too
    long. That must end the job, never be retried as a network error."""
    from rq.timeouts import BaseTimeoutException

    cause = error.__cause__ or error.__context__
    if isinstance(cause, BaseTimeoutException):
        raise cause


def _status(error: stripe.StripeError) -> int | None:
    return getattr(error, "http_status", None)


def _code(error: stripe.StripeError) -> str | None:
    return getattr(error, "code", None) or (getattr(error, "error", None) and error.error.code)


def _transient(error: stripe.StripeError) -> bool:
    if isinstance(error, stripe.APIConnectionError | stripe.RateLimitError):
        return True
    headers = getattr(error, "headers", None) or {}
    if str(headers.get("Stripe-Should-Retry", headers.get("stripe-should-retry", ""))).lower() == "true":
        return True
    status = _status(error)
    return status == 429 or (status is not None and status >= 500) or status == 409


def _portal_error(error: stripe.StripeError) -> StripeFailure:
    status, code, message = _status(error), _code(error), _describe(error)
    if code == "resource_missing" or status == 404:
        return StripeObjectMissing(message)
    if code in ("invoice_not_editable", "invoice_unexpected_state") or "finalized" in message.lower():
        return InvoiceNotEditable(message)
    return StripeRejected(message)


def _describe(error: stripe.StripeError) -> str:
    return f"{type(error).__name__} ({_status(error)}, {_code(error)}): {getattr(error, 'user_message', None) or error}"


def _backoff(attempt: int) -> float:
    return min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


class WriteRecorder:
    """Records each write attempt (`StripeWrite`) in the portal's database: committed
    before the call, so the key exists even if the process dies during it. Callers
    hold no pending changes while they call Stripe (they never do)."""

    def started(self, operation: str, invoice: int | None, organization: int | None,
                stripe_object: str | None):
        from portal.extensions import db
        from portal.models import StripeWrite

        record = StripeWrite(idempotency_key=new_idempotency_key(operation), operation=operation,
                             invoice_id=invoice, organization_id=organization, stripe_object_id=stripe_object,
                             started_at=_now())
        db.session.add(record)
        db.session.commit()
        return record

    def retrying(self, record) -> None:
        """A retry of the attempt is about to be sent: `started_at` is when its latest
        try left, which is what a later sync must wait out (see `write_in_flight`)."""
        from sqlalchemy import update

        from portal.extensions import db
        from portal.models import StripeWrite

        db.session.execute(update(StripeWrite).where(StripeWrite.id == record.id).values(started_at=_now())
                           .execution_options(synchronize_session=False))
        db.session.commit()

    def finished(self, record, outcome: str, tries: int, error: str | None, object_id: str | None = None) -> None:
        from sqlalchemy import func, update

        from portal.extensions import db
        from portal.models import StripeWrite

        values = {"outcome": outcome, "tries": tries, "error": error[:2000] if error else None,
                  "finished_at": _now()}
        if object_id:  # what it created, unless it was made for a known object
            values["stripe_object_id"] = func.coalesce(StripeWrite.stripe_object_id, object_id)
        db.session.execute(update(StripeWrite).where(StripeWrite.id == record.id).values(**values)
                           .execution_options(synchronize_session=False))
        db.session.commit()
        db.session.expire(record)  # read again when next used (the session may not expire on commit)


def _now():
    from portal.models.types import utcnow

    return utcnow()


def gateway() -> StripeGateway:
    """A gateway for the current app, with the shared request budget, write records
    and fresh counts."""
    config = current_app.config
    budget = RequestBudget(redis_connection(), config["STRIPE_MAX_REQUESTS_PER_SECOND"])
    return StripeGateway(config.get("STRIPE_API_KEY"), config.get("STRIPE_API_BASE"), budget,
                         recorder=WriteRecorder())


def warm_up() -> None:
    """Import what the stripe package loads lazily on first use (object classes and
    services), so processes forked from a warmed parent (RQ's work horses) do not
    pay for it on every job."""
    client = stripe.StripeClient("sk_warm_up")
    for service in (client.v1.customers, client.v1.invoices, client.v1.invoices.line_items,
                    client.v1.billing_portal.sessions, client.v1.events):
        assert service is not None
    try:
        from stripe._util import convert_to_stripe_object
    except ImportError:  # a future layout: warming up is an optimisation only
        return
    sample_line = {"object": "line_item", "id": "il_x", "metadata": {}, "parent": {}, "period": {}}
    for payload in (
        {"object": "customer", "id": "cus_x", "metadata": {}},
        {"object": "invoice", "id": "in_x", "metadata": {}, "lines": {"object": "list", "data": [sample_line]}},
        {"object": "list", "data": [sample_line], "has_more": False},
        {"object": "billing_portal.session", "id": "bps_x"},
        {"object": "event", "id": "evt_x", "data": {"object": {"object": "invoice", "id": "in_x"}}},
    ):
        convert_to_stripe_object(payload)


class WebhookRejected(Exception):
    """A delivery that is not a genuine, fresh Stripe event."""


WEBHOOK_TOLERANCE_SECONDS = 300


# An event's `created` (a Unix time) is refused before 2010 or beyond a day from now.
EARLIEST_EVENT_CREATED = 1262304000
MAX_EVENT_CREATED_AHEAD_SECONDS = 86400


def _signature_timestamps(signature_header: str) -> list[int]:
    """The `t=` values of a Stripe-Signature header; WebhookRejected if one is not a
    plain number."""
    stamps = []
    for part in signature_header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                raise WebhookRejected("the signature's timestamp is not a Unix time")
            stamps.append(int(value))
    return stamps


def verify_webhook(payload: bytes, signature_header: str | None, secrets: list[str],
                   tolerance: int = WEBHOOK_TOLERANCE_SECONDS, now: float | None = None) -> dict:
    """The event, if `Stripe-Signature` signs this exact body with one of `secrets`
    (several during a secret roll) within `tolerance` seconds either side of now;
    else WebhookRejected. The body must be strict JSON (no NaN or Infinity, nesting
    bounded) and an event whose `created` is a plausible Unix time."""
    from portal import bodies

    if not secrets:
        raise WebhookRejected("STRIPE_WEBHOOK_SECRET is not configured")
    if not signature_header:
        raise WebhookRejected("missing Stripe-Signature header")
    now = time.time() if now is None else now
    # Stripe's library refuses only signatures older than the tolerance; one from
    # the future is refused here (a signed delivery postdated to outlive its window).
    if any(stamp > now + tolerance for stamp in _signature_timestamps(signature_header)):
        raise WebhookRejected("the signature's timestamp lies in the future")
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(payload.decode("utf-8"), signature_header, secret, tolerance)
        except stripe.SignatureVerificationError:
            continue
        except UnicodeDecodeError:
            raise WebhookRejected("the body is not UTF-8") from None
        break
    else:
        raise WebhookRejected("no valid signature for this body and time")
    try:
        event = bodies.loads(payload)
    except ValueError as error:
        raise WebhookRejected(f"the body is not JSON: {error}") from None
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str) \
            or not isinstance(event.get("created"), int) or isinstance(event.get("created"), bool):
        raise WebhookRejected("not a Stripe event (id, type and created are required)")
    if not EARLIEST_EVENT_CREATED <= event["created"] <= now + MAX_EVENT_CREATED_AHEAD_SECONDS:
        raise WebhookRejected("the event's created time is out of range")
    if len(event["id"]) > 255 or len(event["type"]) > 100 or has_control_characters(event["id"] + event["type"]):
        raise WebhookRejected("not a Stripe event (id or type is not a Stripe identifier)")
    return event

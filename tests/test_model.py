"""A model-based test: a hypothesis state machine drives the real portal (the app and
database of the fixtures, PostgreSQL when TEST_DATABASE_URL is set; the Stripe
emulator over HTTP) and, after every step, checks that no cent is lost, nothing is
billed twice, and nothing is said to be synced that Stripe does not show.

Nothing of the portal is mocked. The model is what was sent: usage accepted per
organization and product (and each event's id, so a resend is a duplicate), and the
services attached. Two organizations: `acme`, whose open invoice is two cycles behind
(due closes, next-period usage), and `initech`, in its current cycle.

Rules (each a real portal call): usage through `POST /api/v1/usage` (now, at the
open period's edges, for an earlier period, for after the open period, resent
duplicates, the same id twice in a batch; a batch with an event older than the
lookback or than its organization must be refused whole); services attached, detached, changed
(API); `sync_invoice`; `close_cycle` (due or end_now, or a close left half-way);
edits in Stripe's dashboard through the `stripe` library (a portal line's amount
changed through `update_lines` or the line endpoint, a line deleted, a foreign line
added, the draft deleted, finalized early or scheduled to finalize in 30 s, the
customer deleted); emulator faults for the next N requests (500 before/after,
dropped connection, 429 rate_limit/lock_timeout) or a slow Stripe (latency); Stripe's
events delivered through `store_event` + `process_event`, some held back, shuffled,
some twice; the emulated clock advanced; two calls at once in threads, each in its
own app context (usage during a close, a service attached/detached/changed during a
close, webhooks during a close, two syncs of one invoice); a sync whose lock is lost
(lease lapsed, Redis restarted) while its write is in flight at a slow Stripe, then a
second sync; a `flask sync` or `flask close-cycle` process killed with SIGKILL
mid-flight; and `quiesce`.

Invariants after every step (database only): one open invoice per organization;
each invoice's total is the sum of its lines and a usage line is quantity x price
rounded once; the usage lines of each invoice hold exactly the usage events claimed
for it (so none priced twice), usage stored equals usage accepted by the model and
what is priced never exceeds it; carry-over lines net to zero; an invoice's lines do
not change once it left open (carry-over aside), nor at all once final; each service
is charged on each open/closing invoice for exactly the seconds it was attached
there, at least that on a final one, and no part of a final invoice's period goes
unbilled for a service attached after it. After each sync, close or concurrent
step: an open/closing invoice that says synced (change_seq == synced_seq), whose
draft nobody edited at Stripe since, holds exactly its total in portal lines at
Stripe, without duplicates. Once quiet (the `quiesce` rule and teardown: faults
cleared, every event delivered, every open/closing invoice synced until it says
synced or unchanged): every accepted event is priced (except usage for after the
open invoice's period); every invoice equals its Stripe invoice to the cent in
portal-made lines (a draft's total is the portal's plus foreign lines; a final
invoice bills exactly what the portal says), no duplicate `portal_line`; each draft
bills the organization's own Stripe customer; no second live Stripe invoice bills a
portal invoice; and one more sync writes nothing.

Short by default, for CI (MODEL_EXAMPLES=10, MODEL_STEPS=20); longer with e.g.
`MODEL_EXAMPLES=200 MODEL_STEPS=40`. MODEL_SHRINK=0 skips shrinking a failure;
MODEL_TRACE=1 prints each step as it runs.
"""
from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal

import stripe
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import or_, select, update

import portal.billing.sync
from portal import money
from portal.billing.closing import CARRY_OVER_CODE, CloseError, close_cycle
from portal.billing.cycles import cycle_containing
from portal.billing.events import process_event, store_event
from portal.billing.invoices import ensure_open_invoice
from portal.billing.sync import sync_invoice
from portal.extensions import db
from portal.models import (
    Invoice,
    InvoiceItem,
    Organization,
    Product,
    ServiceAttachment,
    StripeEvent,
    UsageEvent,
)
from portal.models.types import utcnow
from portal.queue import redis_connection
from portal.stripe_gateway import StripeFailure
from tests.api_helpers import HEADERS, stamp
from tests.conftest import _empty_tables
from tests.model_helpers import (
    WEBHOOK_PREFIXES,
    StripeReader,
    Worker,
    kill,
    line_key,
    portal_lines,
    release_invoice_locks,
    run_together,
    start_cli,
)

TRACE = os.environ.get("MODEL_TRACE") == "1"  # print each step as it runs
EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "10"))
STEPS = int(os.environ.get("MODEL_STEPS", "20"))
PHASES = tuple(Phase) if os.environ.get("MODEL_SHRINK", "1") != "0" else tuple(p for p in Phase
                                                                                if p is not Phase.shrink)
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    phases=PHASES,
    suppress_health_check=list(HealthCheck),
)

# --- the catalog and the organizations every example starts from -----------------------

EGRESS, CPU, ARCHIVE, SUPPORT = "egress.gb", "cpu.seconds", "archive.long", "support.standard"
METERED = (EGRESS, CPU, ARCHIVE)
# Names and units as long as the catalog allows: with a 200-character resource (and,
# for usage, a late line's period and a long quantity), the Stripe line's text
# ("description: quantity unit") passes Stripe's 500 characters.
ARCHIVE_NAME = ("Archive storage, " + "cold tier " * 19)[:200]
SUPPORT_NAME = ("Standard support, " + "business hours " * 13)[:200]
LONG_UNIT = "gigabyte-month of cold archive storage, per region"[:50]
PRODUCTS = [
    dict(code=EGRESS, name="Egress", unit="GB", unit_price=Decimal("200"), kind="metered"),
    dict(code=CPU, name="CPU", unit="second", unit_price=Decimal("0.0011"), kind="metered"),
    dict(code=ARCHIVE, name=ARCHIVE_NAME, unit=LONG_UNIT, unit_price=Decimal("3.5"), kind="metered"),
    dict(code=SUPPORT, name=SUPPORT_NAME, unit="seat-month of standard support, business hours, EU",
         unit_price=Decimal("2900"), kind="recurring"),
]
# slug: (anchor day, how far behind its open invoice starts, how long ago it was created).
# acme's open invoice is two cycles behind (due cycles to close); initech is current.
ORGS = {"acme": (1, timedelta(days=70), timedelta(days=130)), "initech": (15, timedelta(0), timedelta(days=20))}

ORG = st.sampled_from(sorted(ORGS))
QUANTITY = st.sampled_from(["1", "0.5", "2.25", "0.005", "0.333333333", "7", "1250"])
RESOURCE = st.sampled_from(["", "eu", "r" * 200])
# When a usage event happened, relative to the organization's open invoice.
WHEN = st.sampled_from(["now", "open_start", "open_middle", "open_end", "after_open_end", "earlier_period",
                        "long_ago"])
EVENT = st.tuples(ORG, st.sampled_from(METERED), QUANTITY, WHEN, RESOURCE)
PICK = st.integers(0, 7)

LINE_EDITS = ("update_line_amount", "update_line_via_line_endpoint", "delete_line", "add_foreign_line")
INVOICE_EDITS = ("delete_draft", "finalize_early", "finalize_soon", "delete_customer")
STRIPE_EDITS = LINE_EDITS + INVOICE_EDITS
FAULT_KINDS = ("500_before", "500_after", "drop_after", "rate_limit", "lock_timeout")
FAULT_PATHS = (None, "/v1/invoices/*/add_lines", "/v1/invoices/*/update_lines", "/v1/invoices/*/remove_lines",
               "/v1/invoices", "/v1/invoices/*/finalize", "/v1/customers", "/v1/invoices/*")
# The emulated clock may run ahead of the portal's (wall) clock only so far: past
# about two hours, the finalization time the portal asks for (its now + 2 h) would
# lie in Stripe's past, which real clocks never do.
CLOCK_BUDGET_SECONDS = 100 * 60

ACTIVE = ("open", "closing")
FINAL = ("finalized", "paid", "uncollectible", "void")


def _step(function):
    """Mark the machine busy while a rule or invariant runs, so teardown knows
    whether the run ended in a failure (then it only cleans up)."""
    import functools

    @functools.wraps(function)
    def wrapper(self, *args, **kwargs):
        self.busy = function.__name__
        started = time.monotonic()
        self.last = None
        result = function(self, *args, **kwargs)
        if TRACE and function.__name__ != "books_balance":
            print(f"  {function.__name__}({kwargs}) -> {self.last!r} [{time.monotonic() - started:.2f}s]")
        self.busy = None
        return result

    return wrapper


class BillingModel(RuleBasedStateMachine):
    def __init__(self, env):
        super().__init__()
        self.app, self.client, self.emulator = env["app"], env["client"], env["emulator"]
        self.database_uri, self.redis_url = env["database_uri"], env["redis_url"]
        self.busy = "__init__"
        Worker.join_stragglers()  # nothing of an earlier example may still write
        db.session.rollback()
        _empty_tables()
        redis_connection().flushdb()
        self.emulator.control.reset()
        self.app.config.update(STRIPE_API_KEY=self.emulator.api_key, STRIPE_API_BASE=self.emulator.url,
                               STRIPE_TEST_PAYMENT_METHOD=None)
        self.stripe = StripeReader(self.emulator)
        # The model: what was sent and accepted.
        self.sent: dict[str, dict] = {}  # event id -> the event as sent
        self.sent_order: list[str] = []
        self.accepted = defaultdict(Decimal)  # (slug, product code) -> quantity
        self.services: list[tuple[str, int]] = []  # (slug, attachment id)
        # Bookkeeping for the checks.
        self.next_id = 0
        self.clock_used = 0
        self.crashes = 0
        self.events_newest: str | None = None
        self.events: dict[str, dict] = {}  # Stripe event id -> payload
        self.delivered: set[str] = set()
        self.frozen: dict[int, dict] = {}  # invoice id -> items once it left open
        self.finalized: dict[int, dict] = {}  # invoice id -> items once finalized
        self.final_seen: dict[int, object] = {}  # invoice id -> when the checks first saw it final
        # Portal invoices whose Stripe draft was edited in the dashboard since their
        # last successful sync: Stripe may differ from them while they say "synced".
        self.stripe_touched: set[int] = set()
        now = utcnow()
        for fields in PRODUCTS:
            db.session.add(Product(active=True, **fields))
        self.created = {slug: now - age for slug, (_, _, age) in ORGS.items()}
        for slug, (anchor, behind, _) in ORGS.items():
            organization = Organization(slug=slug, name=slug.title(), billing_email=f"billing@{slug}.example",
                                        currency="usd", cycle_anchor_day=anchor, created_at=self.created[slug])
            db.session.add(organization)
            db.session.flush()
            ensure_open_invoice(organization, now - behind)
        db.session.commit()
        self.busy = None
        self.last = None

    # --- reading the portal ---------------------------------------------------------

    def _fresh(self) -> None:
        """End any transaction (on SQLite it holds the write lock) and forget cached rows."""
        db.session.rollback()
        db.session.expire_all()

    def _invoices(self, *statuses: str) -> list:
        query = select(Invoice.id, Invoice.organization_id, Invoice.status, Invoice.period_start,
                       Invoice.period_end, Invoice.total_cents, Invoice.change_seq, Invoice.synced_seq,
                       Invoice.stripe_invoice_id, Invoice.sync_blocked).order_by(Invoice.id)
        if statuses:
            query = query.where(Invoice.status.in_(statuses))
        rows = db.session.execute(query).all()
        db.session.rollback()
        return rows

    def _org_id(self, slug: str) -> int:
        organization_id = db.session.scalar(select(Organization.id).where(Organization.slug == slug))
        db.session.rollback()
        return organization_id

    def _open_invoice(self, slug: str):
        row = db.session.execute(
            select(Invoice.id, Invoice.period_start, Invoice.period_end, Invoice.stripe_invoice_id)
            .join(Organization, Organization.id == Invoice.organization_id)
            .where(Organization.slug == slug, Invoice.status == "open")
        ).one()
        db.session.rollback()
        return row

    def _pick(self, rows: list, pick: int):
        return rows[pick % len(rows)] if rows else None

    # --- usage in through the API ---------------------------------------------------

    def _occurred_at(self, slug: str, when: str) -> str:
        now = utcnow()
        _, start, end, _ = self._open_invoice(slug)
        at = {
            "now": now,
            "open_start": start,
            "open_middle": start + (min(end, now) - start) / 2,
            "open_end": end,  # the first instant of the next period
            "after_open_end": end + timedelta(hours=1),
            "earlier_period": start - timedelta(days=1),
            "long_ago": start - timedelta(days=100),
        }[when]
        return stamp(min(at, now))

    def _batch(self, events: list, resend: list[int]) -> list[dict]:
        batch = []
        for slug, product, quantity, when, resource in events:
            self.next_id += 1
            batch.append({"id": f"ev-{self.next_id}", "organization": slug, "product": product,
                          "quantity": quantity, "occurred_at": self._occurred_at(slug, when), "resource": resource})
        for index in resend:  # resent as they were: duplicates
            if self.sent_order:
                batch.append(self.sent[self.sent_order[index % len(self.sent_order)]])
        if len(batch) > 1 and resend and resend[0] % 2:
            batch.append(batch[0])  # the same event twice in one batch
        return batch

    def _accepted(self, batch: list[dict], response) -> None:
        """Check the answer against the model, and record what was accepted."""
        now, lookback = utcnow(), self.app.config.get("USAGE_LOOKBACK_DAYS")
        for event in batch:
            at = datetime.fromisoformat(event["occurred_at"])
            if (lookback is not None and at < now - timedelta(days=lookback)) \
                    or at < self.created[event["organization"]] - timedelta(minutes=5):
                # Older than the lookback, or than the organization: the whole batch is
                # refused, nothing stored.
                assert response.status_code == 422, (response.status_code, response.get_data(as_text=True))
                return
        assert response.status_code == 200, (response.status_code, response.get_data(as_text=True))
        new = {event["id"]: event for event in batch if event["id"] not in self.sent}
        body = response.get_json()
        assert body == {"accepted": len(new), "duplicates": len(batch) - len(new)}, (body, batch)
        for event_id, event in new.items():
            self.sent[event_id] = event
            self.sent_order.append(event_id)
            self.accepted[(event["organization"], event["product"])] += Decimal(event["quantity"])

    @rule(events=st.lists(EVENT, min_size=1, max_size=3), resend=st.lists(st.integers(0, 99), max_size=2))
    @_step
    def ingest(self, events, resend):
        self._fresh()
        batch = self._batch(events, resend)
        self._accepted(batch, self.client.post("/api/v1/usage", json={"events": batch}, headers=HEADERS))

    @precondition(lambda self: self.sent_order)
    @rule(resend=st.lists(st.integers(0, 99), min_size=1, max_size=3))
    @_step
    def resend_duplicates(self, resend):
        self._fresh()
        batch = [self.sent[self.sent_order[index % len(self.sent_order)]] for index in resend]
        self._accepted(batch, self.client.post("/api/v1/usage", json={"events": batch}, headers=HEADERS))

    # --- services -------------------------------------------------------------------

    @rule(slug=ORG, quantity=st.sampled_from(["1.5", "0.5", "2.25"]), resource=RESOURCE)
    @_step
    def attach(self, slug, quantity, resource):
        self._fresh()
        response = self.client.post(f"/api/v1/organizations/{slug}/services", headers=HEADERS,
                                    json={"product": SUPPORT, "quantity": quantity, "resource": resource})
        assert response.status_code == 201, response.get_data(as_text=True)
        self.services.append((slug, response.get_json()["id"]))

    @precondition(lambda self: self.services)
    @rule(pick=PICK)
    @_step
    def detach(self, pick):
        self._fresh()
        slug, service_id = self._pick(self.services, pick)
        response = self.client.delete(f"/api/v1/organizations/{slug}/services/{service_id}", headers=HEADERS)
        assert response.status_code == 200, response.get_data(as_text=True)

    @precondition(lambda self: self.services)
    @rule(pick=PICK, quantity=st.sampled_from(["1.5", "3.5"]))
    @_step
    def change_quantity(self, pick, quantity):
        self._fresh()
        slug, service_id = self._pick(self.services, pick)
        response = self.client.patch(f"/api/v1/organizations/{slug}/services/{service_id}", headers=HEADERS,
                                     json={"quantity": quantity})
        assert response.status_code in (200, 409), response.get_data(as_text=True)  # 409: detached already
        if response.status_code == 200:
            self.services.append((slug, response.get_json()["id"]))

    # --- sync and close -------------------------------------------------------------

    def _synced(self, invoice_id: int, outcome: str) -> None:
        if outcome in ("synced", "unchanged"):
            self.stripe_touched.discard(invoice_id)

    @rule(pick=PICK)
    @_step
    def sync(self, pick):
        self._fresh()
        rows = self._invoices(*ACTIVE) or self._invoices()
        invoice = self._pick(rows, pick)
        run = sync_invoice(invoice.id)
        self._fresh()
        self.last = (invoice.id, invoice.status, run.outcome, run.error)
        self._synced(invoice.id, run.outcome)
        if invoice.status not in ACTIVE:
            assert run.outcome == "not_open", (run.outcome, run.error)
        self.check_synced_claims()

    def _close(self, invoice_id: int, end_now: bool) -> str | None:
        try:
            return close_cycle(invoice_id, end_now=end_now)
        except (CloseError, StripeFailure):
            return None  # to be run again later, as the close sweep does

    @rule(slug=ORG, end_now=st.booleans(), closing_first=st.booleans())
    @_step
    def close(self, slug, end_now, closing_first):
        self._fresh()
        organization_id = self._org_id(slug)
        closing = [row for row in self._invoices("closing") if row.organization_id == organization_id]
        invoice_id = closing[0].id if closing and closing_first else self._open_invoice(slug).id
        outcome = self._close(invoice_id, end_now)
        self.last = (invoice_id, outcome)
        self._fresh()
        if outcome in FINAL:
            self.stripe_touched.discard(invoice_id)
        self.check_synced_claims()

    # --- the Stripe dashboard -------------------------------------------------------

    @rule(edit=st.sampled_from(LINE_EDITS), pick=PICK, delta=st.sampled_from([1, -1, 250]))
    @_step
    def stripe_edit_lines(self, edit, pick, delta):
        self._stripe_edit(edit, pick, delta)

    @rule(edit=st.sampled_from(INVOICE_EDITS), pick=PICK)
    @_step
    def stripe_edit_invoice(self, edit, pick):
        self._stripe_edit(edit, pick, 0)

    def _stripe_edit(self, edit: str, pick: int, delta: int) -> None:
        """What someone does in Stripe's dashboard to an open or closing invoice's draft."""
        self._fresh()
        invoice = self._pick([row for row in self._invoices(*ACTIVE) if row.stripe_invoice_id], pick)
        if invoice is None:
            return
        client, stripe_id = self.stripe.client, invoice.stripe_invoice_id
        self.stripe_touched.add(invoice.id)
        try:
            if edit in ("update_line_amount", "update_line_via_line_endpoint", "delete_line"):
                ours = portal_lines(self.stripe.lines(stripe_id), invoice.id)
                if not ours:
                    return
                line = ours[pick % len(ours)]
                if edit == "update_line_amount":
                    client.v1.invoices.update_lines(
                        stripe_id, params={"lines": [{"id": line.id, "amount": line.amount + delta}]})
                elif edit == "update_line_via_line_endpoint":
                    client.v1.invoices.line_items.update(stripe_id, line.id, params={"amount": line.amount + delta})
                else:
                    client.v1.invoices.remove_lines(stripe_id, params={"lines": [{"id": line.id,
                                                                                  "behavior": "delete"}]})
            elif edit == "add_foreign_line":
                client.v1.invoices.add_lines(stripe_id, params={"lines": [
                    {"amount": 700 + delta, "description": "Onboarding, agreed by phone"}]})
            elif edit == "delete_draft":
                client.v1.invoices.delete(stripe_id)
            elif edit == "finalize_early":
                client.v1.invoices.finalize_invoice(stripe_id, params={"auto_advance": True})
            elif edit == "finalize_soon":  # Stripe finalizes it on its own when the clock gets there
                at = self.emulator.control.now() + 30
                client.v1.invoices.update(stripe_id, params={"auto_advance": True, "automatically_finalizes_at": at})
            elif edit == "delete_customer":
                customer = db.session.scalar(select(Organization.stripe_customer_id).where(
                    Organization.id == invoice.organization_id))
                db.session.rollback()
                if customer:
                    self.stripe_touched.update(row.id for row in self._invoices(*ACTIVE)
                                               if row.organization_id == invoice.organization_id)
                    client.v1.customers.delete(customer)
        except stripe.StripeError as error:  # refused (no longer a draft...) or hit by a fault: so be it
            self.last = f"Stripe said: {error}"

    # --- faults, latency, the clock -------------------------------------------------

    @rule(kind=st.sampled_from(FAULT_KINDS), count=st.integers(1, 3), writes_only=st.booleans(),
          path=st.sampled_from(FAULT_PATHS))
    @_step
    def faults(self, kind, count, writes_only, path):
        spec = {"kind": kind, "count": count}
        if writes_only:
            spec["method"] = ["POST", "DELETE"]
        if path:
            spec["path"] = path
        self.emulator.control.set_faults(rules=[spec])

    @rule(latency_ms=st.sampled_from([50, 200, 600]), count=st.integers(1, 6))
    @_step
    def slow_stripe(self, latency_ms, count):
        self.emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": latency_ms, "count": count}])

    @precondition(lambda self: self.clock_used < CLOCK_BUDGET_SECONDS - 60)
    @rule(seconds=st.sampled_from([1, 31, 61, 600, 3601]))
    @_step
    def advance_clock(self, seconds):
        seconds = min(seconds, CLOCK_BUDGET_SECONDS - self.clock_used)
        self.clock_used += seconds
        self.emulator.control.advance_clock(seconds)

    # --- webhooks: late, duplicated, out of order -----------------------------------

    def _fetch_events(self) -> None:
        for event in self.stripe.new_events(self.events_newest):
            self.events_newest = event["id"]
            if event["type"].startswith(WEBHOOK_PREFIXES):
                self.events[event["id"]] = event

    def _deliver(self, event: dict) -> bool:
        """Store and process one delivery, as the webhook endpoint and its job do;
        False if processing failed (the event stays stored, retried later)."""
        row_id, _ = store_event(event)
        db.session.commit()
        try:
            process_event(row_id)
        except Exception:  # recorded on the stored event; the sweep retries it
            db.session.rollback()
            return False
        finally:
            self._fresh()
        self.delivered.add(event["id"])
        return True

    @rule(seed=st.integers(0, 2**16), share=st.sampled_from([0.4, 1.0]), duplicates=st.booleans())
    @_step
    def deliver_webhooks(self, seed, share, duplicates):
        self._fresh()
        self._fetch_events()
        rng = random.Random(seed)
        waiting = [event_id for event_id in self.events if event_id not in self.delivered]
        chosen = [event_id for event_id in waiting if rng.random() < share]  # the rest arrive later
        if duplicates:
            chosen += rng.sample(sorted(self.delivered), min(3, len(self.delivered)))
            chosen += rng.sample(chosen, min(2, len(chosen)))
        rng.shuffle(chosen)
        self.last = [self.events[event_id]["type"] for event_id in chosen]
        for event_id in chosen:
            self._deliver(self.events[event_id])

    # --- two things at once ---------------------------------------------------------

    def _thread_usage(self, batch: list[dict]):
        def post():
            return self.app.test_client().post("/api/v1/usage", json={"events": batch}, headers=HEADERS)
        return post

    @rule(slug=ORG, end_now=st.booleans(), events=st.lists(st.tuples(st.sampled_from(METERED), QUANTITY,
                                                                      st.sampled_from(["now", "open_middle",
                                                                                       "open_end"])),
                                                            min_size=1, max_size=2),
          stagger=st.sampled_from([0.0, 0.003, 0.02]))
    @_step
    def ingest_during_close(self, slug, end_now, events, stagger):
        self._fresh()
        invoice_id = self._open_invoice(slug).id
        batch = self._batch([(slug, product, quantity, when, "") for product, quantity, when in events], [])
        self._fresh()
        workers = run_together(self.app, {"close": lambda: self._close(invoice_id, end_now),
                                          "ingest": self._thread_usage(batch)}, stagger)
        self._fresh()
        for worker in workers.values():
            if worker.error:
                raise worker.error
        self._accepted(batch, workers["ingest"].result)
        self.last = (invoice_id, workers["close"].result, workers["ingest"].result.get_json())
        self.check_synced_claims()

    @rule(slug=ORG, end_now=st.booleans(), action=st.sampled_from(["attach", "detach", "change"]), pick=PICK,
          stagger=st.sampled_from([0.0, 0.003, 0.02]))
    @_step
    def services_during_close(self, slug, end_now, action, pick, stagger):
        self._fresh()
        invoice_id = self._open_invoice(slug).id
        mine = [service for service in self.services if service[0] == slug]
        if action != "attach" and not mine:
            action = "attach"

        def service_call():
            client = self.app.test_client()
            if action == "attach":
                return client.post(f"/api/v1/organizations/{slug}/services", headers=HEADERS,
                                   json={"product": SUPPORT, "quantity": "1"})
            _, service_id = self._pick(mine, pick)
            if action == "detach":
                return client.delete(f"/api/v1/organizations/{slug}/services/{service_id}", headers=HEADERS)
            return client.patch(f"/api/v1/organizations/{slug}/services/{service_id}", headers=HEADERS,
                                json={"quantity": "2"})

        workers = run_together(self.app, {"close": lambda: self._close(invoice_id, end_now),
                                          "service": service_call}, stagger)
        self._fresh()
        for worker in workers.values():
            if worker.error:
                raise worker.error
        response = workers["service"].result
        assert response.status_code in (200, 201, 409), response.get_data(as_text=True)
        if action in ("attach", "change") and response.status_code in (200, 201):
            self.services.append((slug, response.get_json()["id"]))
        self.check_synced_claims()

    @rule(slug=ORG, end_now=st.booleans(), seed=st.integers(0, 2**16), stagger=st.sampled_from([0.0, 0.01]))
    @_step
    def webhooks_during_close(self, slug, end_now, seed, stagger):
        """Stripe's events (a finalization Stripe did on its own, say) handled by a
        webhook job while the close job runs."""
        self._fresh()
        self._fetch_events()
        invoice_id = self._open_invoice(slug).id
        waiting = [event_id for event_id in self.events if event_id not in self.delivered]
        random.Random(seed).shuffle(waiting)

        def deliver():
            for event_id in waiting:
                self._deliver(self.events[event_id])

        workers = run_together(self.app, {"close": lambda: self._close(invoice_id, end_now), "webhooks": deliver},
                               stagger)
        self._fresh()
        for worker in workers.values():
            if worker.error:
                raise worker.error
        self.last = (invoice_id, workers["close"].result, len(waiting))
        self.check_synced_claims()

    @rule(pick=PICK)
    @_step
    def two_syncs(self, pick):
        """Two syncs of one invoice at once (two workers took the same job)."""
        self._fresh()
        invoice = self._pick(self._invoices(*ACTIVE), pick)
        workers = run_together(self.app, {"first": lambda: sync_invoice(invoice.id),
                                          "second": lambda: sync_invoice(invoice.id)})
        self._after_syncs(invoice.id, workers)

    @rule(slug=ORG, product=st.sampled_from(METERED), quantity=QUANTITY,
          more=st.lists(st.tuples(st.sampled_from(METERED), QUANTITY), max_size=2))
    @_step
    def lock_lost_mid_write(self, slug, product, quantity, more):
        """Usage arrives; a sync of the open invoice sends its write to a slow Stripe;
        while the write is in flight the sync's lock is lost (its lease ran out, or
        Redis restarted: the test deletes the key as either would); more usage may
        arrive; a second sync takes the lock and runs."""
        self._fresh()
        invoice_id = self._open_invoice(slug).id
        batch = self._batch([(slug, product, quantity, "open_middle", "")], [])
        self._accepted(batch, self.client.post("/api/v1/usage", json={"events": batch}, headers=HEADERS))
        self._fresh()
        self.emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 1500, "count": 1,
                                                 "method": "POST"}])
        first = Worker(self.app, lambda: sync_invoice(invoice_id), "first").start()
        try:
            time.sleep(0.4)  # its reads done, its first write on the way
            release_invoice_locks(redis_connection(), invoice_id)
            if more:
                batch = self._batch([(slug, code, qty, "open_middle", "") for code, qty in more], [])
                self._accepted(batch, self.client.post("/api/v1/usage", json={"events": batch}, headers=HEADERS))
                self._fresh()
            second = Worker(self.app, lambda: sync_invoice(invoice_id), "second").start().join()
        finally:
            first.join()
        self.emulator.control.clear_faults()
        self._after_syncs(invoice_id, {"first": first, "second": second})

    def _after_syncs(self, invoice_id: int, workers: dict) -> None:
        self._fresh()
        for worker in workers.values():
            if worker.error:
                raise worker.error
            self._synced(invoice_id, worker.result.outcome)
        self.last = (invoice_id, workers["first"].result.outcome, workers["second"].result.outcome)
        self.check_synced_claims()

    # --- a worker killed mid-flight -------------------------------------------------

    @precondition(lambda self: self.crashes < 1)
    @rule(victim=st.sampled_from(["sync", "close"]), slug=ORG, kill_after=st.sampled_from([0.0, 0.15, 0.4]))
    @_step
    def crash(self, victim, slug, kill_after):
        """`flask sync --now` or `flask close-cycle --org` killed with SIGKILL while
        its Stripe calls are in flight (each slowed to 100 ms)."""
        self._fresh()
        self.crashes += 1
        invoice_id = self._open_invoice(slug).id
        args = ["sync", "--invoice", str(invoice_id), "--now"] if victim == "sync" else \
            ["close-cycle", "--org", slug]
        self.emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 100, "count": 40}])
        before = self.emulator.control.stats()["requests"]
        process = start_cli(args, self.database_uri, self.redis_url, self.emulator)
        try:
            deadline = time.monotonic() + 30
            while (self.emulator.control.stats()["requests"] == before and process.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            time.sleep(kill_after)
        finally:
            kill(process)
        self.emulator.control.clear_faults()
        time.sleep(1.0)  # whatever it had sent has landed at Stripe by now (requests were slowed to 100 ms)
        for row in self._invoices(*ACTIVE):
            release_invoice_locks(redis_connection(), row.id)  # the dead holder's lease runs out
        self._let_unanswered_writes_settle()

    def _let_unanswered_writes_settle(self) -> int:
        """Let time pass for Stripe writes that never got an answer (their process was
        killed) and have landed by now: the portal holds off syncing their invoice until
        such a write is WRITE_SETTLE_SECONDS old; the test dates them back instead of
        waiting, as it deletes a dead holder's lock instead of waiting out its lease."""
        from portal import models

        record = getattr(models, "StripeWrite", None)
        if record is None:
            return 0
        self._fresh()
        aged = db.session.execute(
            update(record).where(or_(record.outcome.is_(None), record.outcome == "no_answer"))
            .values(started_at=utcnow() - timedelta(hours=1))
        ).rowcount
        db.session.commit()
        return aged

    # --- quiet: everything delivered, synced, compared ------------------------------

    @rule()
    @_step
    def quiesce(self):
        self._quiesce_and_check()

    def _quiesce_and_check(self) -> None:
        self.emulator.control.clear_faults()
        self._fresh()
        outcomes: dict[int, str] = {}
        for _ in range(6):
            self._fetch_events()
            for event_id, event in self.events.items():
                if event_id not in self.delivered:
                    self._deliver(event)
            for row_id in db.session.scalars(select(StripeEvent.id).where(StripeEvent.processed_at.is_(None))
                                              .order_by(StripeEvent.id)).all():
                self._fresh()
                try:
                    process_event(row_id)
                except Exception:
                    pass
                self._fresh()
            self._fresh()
            outcomes = {}
            for invoice in self._invoices(*ACTIVE):
                run = sync_invoice(invoice.id, trigger="schedule")
                self._fresh()
                outcomes[invoice.id] = f"{run.outcome}: {run.error or ''}"
                self._synced(invoice.id, run.outcome)
            if any(o.startswith("write_in_flight") for o in outcomes.values()):
                # Every call of the test has returned and faults are off: nothing is
                # still on its way to Stripe, so the hold-off has nothing left to wait for.
                self._let_unanswered_writes_settle()
            pending = db.session.execute(select(StripeEvent.stripe_event_id, StripeEvent.type,
                                                StripeEvent.last_error)
                                         .where(StripeEvent.processed_at.is_(None))).all()
            self._fresh()
            if not pending and all(o.startswith(("synced", "unchanged")) for o in outcomes.values()):
                break
            if any(o.startswith("write_in_flight") for o in outcomes.values()):
                # A write that got no answer may still land: the portal waits it out.
                time.sleep(portal.billing.sync.WRITE_SETTLE_SECONDS)
        else:
            raise AssertionError(f"never quiet: syncs {outcomes}, unprocessed events {pending}")
        self.check_synced_claims()
        self.check_everything_priced()
        self.check_stripe_matches_every_invoice()
        # Quiet means quiet: a sync now finds nothing to write.
        for invoice in self._invoices(*ACTIVE):
            run = sync_invoice(invoice.id, trigger="schedule")
            self._fresh()
            assert run.outcome == "unchanged" and run.stripe_writes == 0, (
                f"invoice {invoice.id} in step with Stripe, yet the next sync says {run.outcome} with "
                f"{run.stripe_writes} write(s) ({run.created} created, {run.updated} updated, "
                f"{run.deleted} deleted): {run.error or ''}")

    def teardown(self):
        try:
            if self.busy is None:  # the run ended without a failure: the final check
                self.busy = "teardown"
                self._quiesce_and_check()
                self.busy = None
        finally:
            self._fresh()
            self.emulator.control.clear_faults()

    # --- the checks -----------------------------------------------------------------

    def check_synced_claims(self) -> None:
        """An open or closing invoice that says it is synced (change_seq == synced_seq),
        whose draft nobody edited at Stripe since, matches its Stripe draft to the cent."""
        for invoice in self._invoices(*ACTIVE):
            if invoice.change_seq != invoice.synced_seq or not invoice.stripe_invoice_id \
                    or invoice.id in self.stripe_touched:
                continue
            draft = self.stripe.invoice(invoice.stripe_invoice_id)
            if draft.status != "draft":
                continue  # Stripe finalized it: its events tell the portal
            ours = portal_lines(self.stripe.lines(invoice.stripe_invoice_id), invoice.id)
            keys = [line_key(line) for line in ours]
            assert len(keys) == len(set(keys)), f"invoice {invoice.id}: duplicate lines at Stripe: {sorted(keys)}"
            stripe_total = sum(line.amount for line in ours)
            assert stripe_total == invoice.total_cents, (
                f"invoice {invoice.id} ({invoice.status}) says synced (seq {invoice.synced_seq}) but its Stripe "
                f"draft {invoice.stripe_invoice_id} holds {stripe_total} cents of portal lines, the portal "
                f"{invoice.total_cents}")

    def check_everything_priced(self) -> None:
        """Once quiet, every accepted event is priced, except usage for after the open
        invoice's period (priced when the next invoice opens)."""
        opens = {row.organization_id: row for row in self._invoices("open")}
        unpriced = db.session.execute(select(UsageEvent.event_id, UsageEvent.organization_id,
                                             UsageEvent.occurred_at).where(UsageEvent.invoice_id.is_(None))).all()
        self._fresh()
        for event_id, organization_id, occurred_at in unpriced:
            assert occurred_at >= opens[organization_id].period_end, (
                f"usage event {event_id} ({occurred_at}) was accepted but never priced; the open invoice "
                f"runs {opens[organization_id].period_start} to {opens[organization_id].period_end}")

    def check_stripe_matches_every_invoice(self) -> None:
        invoices = self._invoices()
        customers = dict(db.session.execute(select(Organization.id, Organization.stripe_customer_id)).all())
        self._fresh()
        by_stripe_id = {row.stripe_invoice_id: row for row in invoices if row.stripe_invoice_id}
        deleted_customers: dict[str, bool] = {}

        def customer_deleted(customer_id: str) -> bool:
            if customer_id not in deleted_customers:
                deleted_customers[customer_id] = bool(getattr(self.stripe.customer(customer_id), "deleted", False))
            return deleted_customers[customer_id]

        for invoice in invoices:
            if invoice.status in ACTIVE:
                assert invoice.sync_blocked is None and invoice.change_seq == invoice.synced_seq, invoice
            if not invoice.stripe_invoice_id:
                assert invoice.total_cents == 0 and invoice.status in ACTIVE, invoice
                continue
            at_stripe = self.stripe.invoice(invoice.stripe_invoice_id)
            lines = self.stripe.lines(invoice.stripe_invoice_id)
            ours = portal_lines(lines, invoice.id)
            keys = [line_key(line) for line in ours]
            assert len(keys) == len(set(keys)), f"invoice {invoice.id}: duplicate lines at Stripe: {sorted(keys)}"
            ours_total = sum(line.amount for line in ours)
            foreign_total = sum(line.amount for line in lines) - ours_total
            if invoice.status in ACTIVE:
                assert at_stripe.status == "draft", (invoice, at_stripe.status)
                # The customer Stripe charges for it is the organization's (whose card
                # the customer manages in Stripe's portal).
                assert at_stripe.customer == customers[invoice.organization_id], (
                    f"invoice {invoice.id}'s Stripe draft {at_stripe.id} bills customer {at_stripe.customer}, "
                    f"the organization's Stripe customer is {customers[invoice.organization_id]}")
                assert at_stripe.total == invoice.total_cents + foreign_total, (invoice, at_stripe.total)
            else:
                assert at_stripe.status != "draft", (invoice, at_stripe.status)
            assert ours_total == invoice.total_cents, (
                f"invoice {invoice.id} ({invoice.status}): the portal says {invoice.total_cents} cents, its "
                f"Stripe invoice {invoice.stripe_invoice_id} ({at_stripe.status}) bills {ours_total} cents of "
                f"portal lines (+{foreign_total} of lines added at Stripe)")
        # Nothing at Stripe bills a portal invoice besides the one it points to: no
        # second finalized invoice, no live draft that would finalize on its own.
        for at_stripe in self.stripe.invoices():
            portal_id = (at_stripe.metadata.to_dict() if at_stripe.metadata else {}).get("portal_invoice_id")
            if portal_id is None or at_stripe.id in by_stripe_id:
                continue
            if at_stripe.status == "draft" and (customer_deleted(at_stripe.customer) or not at_stripe.lines.data):
                continue  # can never be finalized, or bills nothing
            raise AssertionError(f"Stripe invoice {at_stripe.id} ({at_stripe.status}, total {at_stripe.total}) "
                                 f"bills portal invoice {portal_id}, which points to another")

    @invariant()
    @_step
    def books_balance(self):
        """Cheap, from the database alone, after every step."""
        self._fresh()
        organizations = dict(db.session.execute(select(Organization.id, Organization.slug)).all())
        products = {row.id: row for row in db.session.execute(select(Product.id, Product.code, Product.kind,
                                                                     Product.unit_price)).all()}
        invoices = {row.id: row for row in db.session.execute(
            select(Invoice.id, Invoice.organization_id, Invoice.status, Invoice.total_cents,
                   Invoice.period_start, Invoice.period_end)).all()}
        items = db.session.execute(select(InvoiceItem.invoice_id, InvoiceItem.product_id, InvoiceItem.line_key,
                                          InvoiceItem.quantity, InvoiceItem.unit_price,
                                          InvoiceItem.amount_cents)).all()
        events = db.session.execute(select(UsageEvent.event_id, UsageEvent.organization_id,
                                           UsageEvent.product_id, UsageEvent.quantity,
                                           UsageEvent.invoice_id)).all()
        attachments = db.session.execute(select(
            ServiceAttachment.id, ServiceAttachment.organization_id, ServiceAttachment.product_id,
            ServiceAttachment.quantity, ServiceAttachment.resource, ServiceAttachment.attached_at,
            ServiceAttachment.detached_at)).all()
        anchors = dict(db.session.execute(select(Organization.id, Organization.cycle_anchor_day)).all())
        self._fresh()
        checked_at = utcnow()

        # Exactly one open invoice per organization.
        for organization_id, slug in organizations.items():
            opened = [i for i in invoices.values() if i.organization_id == organization_id and i.status == "open"]
            assert len(opened) == 1, f"{slug} has {len(opened)} open invoices: {opened}"

        # Each invoice's total is the sum of its lines; a usage line is quantity x price, rounded once.
        totals, by_invoice = defaultdict(int), defaultdict(dict)
        priced = defaultdict(Decimal)  # (invoice, product) -> quantity on its usage lines
        carried = defaultdict(int)
        for item in items:
            totals[item.invoice_id] += item.amount_cents
            by_invoice[item.invoice_id][item.line_key] = (item.quantity, item.amount_cents)
            product = products[item.product_id]
            if product.kind == "metered":
                priced[(item.invoice_id, item.product_id)] += item.quantity
                assert item.amount_cents == money.line_amount(item.quantity, item.unit_price), item
            if item.line_key.startswith(CARRY_OVER_CODE):
                carried[invoices[item.invoice_id].organization_id] += item.amount_cents
        for invoice in invoices.values():
            assert invoice.total_cents == totals[invoice.id], (
                f"invoice {invoice.id}: total {invoice.total_cents} != sum of its lines {totals[invoice.id]}")
        # Carried over from an invoice Stripe finalized first: taken off one, put on the next.
        for organization_id, amount in carried.items():
            assert amount == 0, f"{organizations[organization_id]}: carry-over lines sum to {amount}, not 0"

        # No usage event priced twice or lost: what each invoice's usage lines hold is
        # exactly the usage events claimed for it; what was stored is what the model sent.
        claimed = defaultdict(Decimal)
        stored = defaultdict(Decimal)
        for event in events:
            stored[(organizations[event.organization_id], products[event.product_id].code)] += event.quantity
            if event.invoice_id is not None:
                claimed[(event.invoice_id, event.product_id)] += event.quantity
        assert claimed == {key: qty for key, qty in priced.items() if qty}, (
            f"usage lines {dict(priced)} != usage events claimed {dict(claimed)}")
        assert stored == {key: qty for key, qty in self.accepted.items()}, (
            f"usage stored {dict(stored)} != usage accepted {dict(self.accepted)}")
        assert {event.event_id for event in events} == set(self.sent), "stored event ids differ from those sent"
        for (organization, code), quantity in self.accepted.items():
            on_invoices = sum(qty for (invoice_id, product_id), qty in priced.items()
                              if organizations[invoices[invoice_id].organization_id] == organization
                              and products[product_id].code == code)
            assert on_invoices <= quantity, f"{organization} {code}: {on_invoices} priced, {quantity} sent"

        # An invoice's usage and services are frozen once it leaves open; everything once final.
        for invoice in invoices.values():
            lines = by_invoice[invoice.id]
            if invoice.status != "open":
                own = {key: value for key, value in lines.items() if not key.startswith(CARRY_OVER_CODE)}
                before = self.frozen.setdefault(invoice.id, own)
                assert own == before, f"invoice {invoice.id} ({invoice.status}) changed after it left open: " \
                                      f"{before} -> {own}"
            if invoice.status in FINAL:
                self.final_seen.setdefault(invoice.id, checked_at)
                before = self.finalized.setdefault(invoice.id, dict(lines))
                assert lines == before, f"invoice {invoice.id} ({invoice.status}) changed after it was final: " \
                                        f"{before} -> {lines}"

        # Each service on each open or closing invoice is charged for exactly the
        # seconds it was attached within that invoice's period (the proration rule); a
        # final invoice, which can no longer be repriced, charges at least that much
        # (a service detached after it was finalized stays charged to its end).
        for attachment in attachments:
            product = products[attachment.product_id]
            for invoice in invoices.values():
                if invoice.organization_id != attachment.organization_id:
                    continue
                start = max(attachment.attached_at, invoice.period_start)
                end = min(attachment.detached_at or invoice.period_end, invoice.period_end)
                if invoice.status in FINAL and attachment.attached_at >= self.final_seen[invoice.id]:
                    # Attached after the portal saw this invoice final: no part of the
                    # invoice's period may go unbilled, beyond the clocks' difference.
                    unbilled = money.seconds_between(start, end)
                    assert unbilled <= self.clock_used + 5, (
                        f"service {attachment.id}, attached {attachment.attached_at} after invoice {invoice.id} "
                        f"({invoice.period_start} to {invoice.period_end}) was final, is billed nowhere for "
                        f"{unbilled} s of that period")
                    continue
                cycle_start, cycle_end = cycle_containing(invoice.period_start, anchors[invoice.organization_id])
                expected = money.prorated_amount(attachment.quantity, product.unit_price,
                                                 money.seconds_between(start, end),
                                                 money.seconds_between(cycle_start, cycle_end))
                key = f"{product.code}|{attachment.resource}|svc:{attachment.id}"
                charged = by_invoice[invoice.id].get(key, (None, 0))[1]
                assert charged == expected if invoice.status in ACTIVE else charged >= expected, (
                    f"service {attachment.id} ({attachment.attached_at} to {attachment.detached_at}) on invoice "
                    f"{invoice.id} ({invoice.status}, {invoice.period_start} to {invoice.period_end}): charged "
                    f"{charged} cents, attached time is worth {expected}")


# Usage accepted this far back (the portal's USAGE_LOOKBACK_DAYS, for this test): the
# due cycles two months back take usage, events "long ago" sometimes fall outside.
LOOKBACK_DAYS = 150


@contextmanager
def usage_lookback(app, days: int = LOOKBACK_DAYS):
    missing = object()
    saved = app.config.get("USAGE_LOOKBACK_DAYS", missing)
    app.config["USAGE_LOOKBACK_DAYS"] = days
    try:
        yield
    finally:
        if saved is missing:
            app.config.pop("USAGE_LOOKBACK_DAYS", None)
        else:
            app.config["USAGE_LOOKBACK_DAYS"] = saved


def test_no_cent_lost_nothing_billed_twice_no_false_sync(app, client, stripe_emulator, database_uri, redis_url,
                                                         monkeypatch):
    # The emulator answers within its faults' 1.5 s latency: a write sent without an
    # answer has landed (or never will) 2 s later, where real Stripe is given 25 s.
    monkeypatch.setattr(portal.billing.sync, "WRITE_SETTLE_SECONDS", 2)
    env = {"app": app, "client": client, "emulator": stripe_emulator, "database_uri": database_uri,
           "redis_url": redis_url}
    with usage_lookback(app):
        run_state_machine_as_test(lambda: BillingModel(env), settings=SETTINGS)

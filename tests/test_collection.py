"""After the close: Stripe collects on its own schedule, and may fail to. The portal
learns it from Stripe's events (delivered here in the order Stripe created them,
through the real handlers) and shows customers and support how it stands.

Against the emulator, which charges only a customer with a default payment method,
attempts payment an hour after finalization, retries 3, 5 and 7 days after each
failure, and carries amounts below the minimum charge to the customer's balance."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from portal.billing.closing import close_cycle
from portal.billing.events import process_event, store_event
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.models import Invoice, Organization
from tests.sync_helpers import stripe_client

HOUR, DAY = 3600, 86400


class Stripe:
    """The emulator as the portal sees it, plus delivery of its events in order."""

    def __init__(self, db, emulator):
        self.db = db
        self.emulator = emulator
        self.client = stripe_client(emulator)
        self.delivered: set[str] = set()

    def deliver(self) -> list[str]:
        """Handle every event not delivered yet, oldest first, as webhooks would."""
        events, params = [], {"limit": 100}
        while True:
            page = self.client.v1.events.list(params=params)
            events.extend(page.data)
            if not page.has_more:
                break
            params = {"limit": 100, "starting_after": page.data[-1].id}
        types = []
        for stripe_event in reversed(events):
            if stripe_event.id in self.delivered:
                continue
            self.delivered.add(stripe_event.id)
            payload = json.loads(json.dumps(stripe_event.to_dict(), default=str))
            row_id, _ = store_event(payload)
            self.db.session.commit()
            process_event(row_id)
            types.append(stripe_event.type)
        return types

    def advance(self, seconds: int) -> list[str]:
        self.emulator.control.advance_clock(seconds)
        return self.deliver()

    def attach_card(self, customer_id: str, method: str = "pm_card_visa") -> None:
        """As the customer does on Stripe's portal page: a new default card."""
        self.client.v1.customers.update(customer_id, params={"invoice_settings": {"default_payment_method": method}})


@pytest.fixture
def stripe(db, stripe_emulator):
    return Stripe(db, stripe_emulator)


def _ended_invoice(db, make, app, payment_method: str | None, quantity: str = "12.5") -> int:
    """An organization whose cycle has ended, synced (its Stripe customer created with
    `payment_method`, or none); returns the invoice id."""
    app.config["STRIPE_TEST_PAYMENT_METHOD"] = payment_method
    organization = make.organization(slug="acme")
    product = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization, at=datetime.now(timezone.utc) - timedelta(days=40))
    add_quantity(invoice, product, "", Decimal(quantity))
    db.session.commit()
    try:
        assert sync_invoice(invoice.id).outcome == "synced"
    finally:
        app.config["STRIPE_TEST_PAYMENT_METHOD"] = None
    return invoice.id


def _invoice(db, invoice_id: int) -> Invoice:
    db.session.rollback()
    return db.session.get(Invoice, invoice_id, populate_existing=True)


def _organization(db, invoice_id: int) -> Organization:
    return db.session.get(Organization, _invoice(db, invoice_id).organization_id, populate_existing=True)


def _billing_page(client, make, organization) -> str:
    make.user("owner@example.com", organization=organization, role="owner")
    client.post("/login", data={"email": "owner@example.com", "password": "password123"})
    return client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)


def test_a_close_ends_at_finalized_and_payment_arrives_by_webhook(db, make, app, stripe):
    due = _ended_invoice(db, make, app, "pm_card_visa")
    stripe.deliver()
    assert _organization(db, due).payment_method == "visa •••• 4242"
    assert close_cycle(due) == "finalized"  # Stripe charges later, not inside the close
    invoice = _invoice(db, due)
    assert invoice.status == "finalized" and invoice.amount_due_cents == 2500 and not invoice.past_due
    assert invoice.next_payment_attempt_at is not None  # about an hour after finalization
    assert "invoice.paid" not in stripe.deliver()
    assert "invoice.paid" in stripe.advance(HOUR + 1)
    invoice = _invoice(db, due)
    assert invoice.status == "paid" and invoice.amount_paid_cents == 2500 and invoice.paid_at is not None
    assert invoice.next_payment_attempt_at is None and invoice.payment_problem is None


def test_failed_then_retried_then_paid(db, make, app, client, stripe):
    due = _ended_invoice(db, make, app, "pm_card_chargeCustomerFail")  # Stripe's card that attaches, then declines
    assert close_cycle(due) == "finalized"
    assert "invoice.payment_failed" in stripe.advance(HOUR + 1)
    invoice = _invoice(db, due)
    assert invoice.status == "finalized" and invoice.past_due and invoice.payment_attempts == 1
    assert invoice.payment_problem == "payment_failed"
    retry_at = invoice.next_payment_attempt_at
    assert retry_at is not None
    organization = _organization(db, due)
    page = _billing_page(client, make, organization)
    assert "is past due" in page and "Stripe will try again on" in page and "status-past_due" in page

    stripe.attach_card(organization.stripe_customer_id)  # the customer adds a card at Stripe
    stripe.deliver()
    assert _organization(db, due).payment_method == "visa •••• 4242"
    assert "invoice.paid" in stripe.advance(3 * DAY + 1)  # Stripe's retry finds the card
    invoice = _invoice(db, due)
    assert invoice.status == "paid" and not invoice.past_due and invoice.payment_problem is None
    assert invoice.payment_attempts == 2 and invoice.amount_paid_cents == 2500
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert "is past due" not in page and "visa •••• 4242" in page


def test_never_paid_stays_past_due_after_stripes_last_retry(db, make, app, client, stripe):
    due = _ended_invoice(db, make, app, "pm_card_chargeCustomerFail")
    assert close_cycle(due) == "finalized"
    for wait in (HOUR, 3 * DAY, 5 * DAY, 7 * DAY):
        assert "invoice.payment_failed" in stripe.advance(wait + 1)
    assert stripe.advance(30 * DAY) == []  # no further attempt
    invoice = _invoice(db, due)
    assert invoice.status == "finalized" and invoice.past_due
    assert invoice.payment_attempts == 4 and invoice.next_payment_attempt_at is None
    page = _billing_page(client, make, _organization(db, due))
    assert "Stripe will not try again on its own" in page and invoice.hosted_invoice_url in page
    make.user("staff@example.com", support=True)
    client.post("/logout")
    client.post("/login", data={"email": "staff@example.com", "password": "password123"})
    problems = client.get("/admin/discrepancies").get_data(as_text=True)
    assert f"#{due} " in problems and "no retry scheduled" in problems and "4 attempt(s)" in problems


def test_a_payment_the_bank_wants_confirmed_asks_the_customer(db, make, app, client, stripe):
    due = _ended_invoice(db, make, app, "pm_card_authenticationRequired")
    assert close_cycle(due) == "finalized"
    assert "invoice.payment_action_required" in stripe.advance(HOUR + 1)
    invoice = _invoice(db, due)
    assert invoice.status == "finalized" and invoice.payment_problem == "action_required" and invoice.past_due
    page = _billing_page(client, make, _organization(db, due))
    assert "Your bank asks you to confirm the payment" in page and invoice.hosted_invoice_url in page


def test_an_amount_below_the_minimum_charge_is_carried_to_the_next_invoice(db, make, app, client, stripe):
    due = _ended_invoice(db, make, app, "pm_card_visa", quantity="0.15")  # 30 cents
    assert close_cycle(due) == "paid"  # Stripe marks it paid without a charge
    stripe.deliver()
    closed = _invoice(db, due)
    assert closed.status == "paid" and closed.amount_paid_cents == 0 and closed.carried_to_balance_cents == 30
    organization = _organization(db, due)
    assert organization.stripe_balance_cents == 30
    customer = stripe.client.v1.customers.retrieve(organization.stripe_customer_id)
    assert customer.balance == 30
    # The next invoice: Stripe's draft carries the balance; the portal says so.
    nxt = db.session.scalar(db.select(Invoice).where(Invoice.organization_id == organization.id,
                                                     Invoice.status == "open"))
    add_quantity(nxt, closed.items[0].product, "", Decimal("5"))  # $10.00
    db.session.commit()
    assert sync_invoice(nxt.id).outcome == "synced"
    draft = stripe.client.v1.invoices.retrieve(_invoice(db, nxt.id).stripe_invoice_id)
    assert draft.total == 1000 and draft.starting_balance == 30 and draft.amount_due == 1030
    page = _billing_page(client, make, organization)
    assert "$0.30" in page and "carried to balance" in page
    assert "from earlier invoices" in page and "will be added to this invoice" in page


def test_the_billing_page_warns_before_the_cycle_ends_when_there_is_no_payment_method(db, make, client, stripe):
    organization = make.organization(slug="initech")
    product = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, product, "", Decimal("1"))
    db.session.commit()
    page = _billing_page(client, make, organization)
    assert 'id="no-payment-method"' in page  # not even a Stripe customer yet
    assert sync_invoice(invoice.id).outcome == "synced"
    stripe.deliver()
    assert 'id="no-payment-method"' in client.get("/orgs/initech/billing").get_data(as_text=True)
    stripe.attach_card(_organization(db, invoice.id).stripe_customer_id, "pm_card_mastercard")
    stripe.deliver()
    page = client.get("/orgs/initech/billing").get_data(as_text=True)
    assert 'id="no-payment-method"' not in page and "mastercard •••• " in page


def test_stripe_failing_to_finalize_on_its_own_is_shown_to_support(db, make, app, client, stripe):
    due = _ended_invoice(db, make, app, "pm_card_visa")
    invoice = _invoice(db, due)
    # Stripe's backstop is due in a minute (kept short: the emulated clock must not run
    # hours ahead of the portal's), and the customer is deleted before it fires.
    soon = stripe.emulator.control.now() + 60
    stripe.client.v1.invoices.update(invoice.stripe_invoice_id, params={"automatically_finalizes_at": soon})
    stripe.client.v1.customers.delete(_organization(db, due).stripe_customer_id)
    types = stripe.advance(61)
    assert "invoice.finalization_failed" in types
    invoice = _invoice(db, due)
    assert invoice.status == "open" and invoice.finalization_error
    make.user("staff@example.com", support=True)
    client.post("/login", data={"email": "staff@example.com", "password": "password123"})
    assert "Stripe could not finalize" in client.get("/admin/discrepancies").get_data(as_text=True)
    # The close recovers: a new customer and draft, then finalized.
    assert close_cycle(due) == "finalized"
    assert _invoice(db, due).finalization_error is None

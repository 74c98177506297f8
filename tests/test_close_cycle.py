"""The end of the billing cycle and Stripe's invoice events, in every order."""
from __future__ import annotations

import itertools
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from rq import Queue, SimpleWorker
from sqlalchemy import select

from jobs.app import use_app
from portal.billing.closing import claim_for_closing, close_cycle
from portal.billing.events import process_event, store_event
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.models import Invoice
from portal.queue import redis_connection
from tests.api_helpers import HEADERS, event, post_usage, stamp
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client
from tests.webhook_helpers import SECRET

# Stripe attempts payment about an hour after finalizing an auto-advancing invoice.
PAYMENT_DELAY = 3600


@pytest.fixture
def due(db, app, make, monkeypatch, stripe_emulator):
    """An organization whose open invoice's period has ended, synced to a Stripe draft;
    its Stripe customer has Stripe's test Visa card as its default payment method."""
    # A customer since before that period (usage from before an organization existed is refused).
    organization = make.organization(slug="acme", created_at=datetime.now(timezone.utc) - timedelta(days=90))
    product = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization, at=datetime.now(timezone.utc) - timedelta(days=40))
    add_quantity(invoice, product, "", Decimal("12.5"))
    db.session.commit()
    with monkeypatch.context() as patch:  # only the customer this sync creates gets the card
        patch.setitem(app.config, "STRIPE_TEST_PAYMENT_METHOD", "pm_card_visa")
        assert sync_invoice(invoice.id).outcome == "synced"
    return invoice.id


def collect(emulator) -> None:
    """Let Stripe's payment attempt after finalization happen."""
    emulator.control.advance_clock(PAYMENT_DELAY + 1)


def invoices_of(db, organization_id: int) -> list[Invoice]:
    db.session.rollback()
    return list(db.session.scalars(select(Invoice).where(Invoice.organization_id == organization_id)
                                   .order_by(Invoice.period_start)))


def stripe_events(emulator, event_type: str) -> list[dict]:
    # As a webhook delivers them: plain JSON.
    return [json.loads(json.dumps(e.to_dict(), default=str))
            for e in stripe_client(emulator).v1.events.list(params={"type": event_type}).data]


def handle(db, stripe_event: dict) -> str:
    row_id, _ = store_event(stripe_event)
    db.session.commit()
    return process_event(row_id)


def assert_closed_and_rolled_over(db, emulator, invoice_id: int, status: str = "paid") -> None:
    db.session.rollback()
    closed = db.session.get(Invoice, invoice_id)
    assert closed.status == status
    assert closed.number and closed.hosted_invoice_url and closed.invoice_pdf and closed.finalized_at
    everything = invoices_of(db, closed.organization_id)
    open_ones = [i for i in everything if i.status == "open"]
    assert len(open_ones) == 1 and len(everything) == 2
    assert open_ones[0].period_start == closed.period_end
    assert_stripe_matches_portal(db, emulator, invoice_id)


def test_close_cycle_finalizes_at_stripe_and_opens_the_next_invoice(db, stripe_emulator, due):
    assert close_cycle(due) == "finalized"  # Stripe collects later, on its own
    stripe_invoice = stripe_client(stripe_emulator).v1.invoices.retrieve(db.session.get(Invoice, due).stripe_invoice_id)
    assert stripe_invoice.status == "open" and stripe_invoice.auto_advance is True
    assert stripe_invoice.next_payment_attempt is not None
    assert_closed_and_rolled_over(db, stripe_emulator, due, status="finalized")
    assert close_cycle(due) == "already_finalized"


def test_an_invoice_whose_period_has_not_ended_is_not_due(db, make, stripe_emulator):
    invoice = make.open_invoice(make.organization())
    assert close_cycle(invoice.id) == "not_due"


ORDERS = [list(order) for order in itertools.permutations(["close", "finalized", "paid"])] + [
    ["finalized", "finalized", "close", "paid", "paid"],
    ["paid", "close", "finalized", "close", "paid"],
    ["close", "close", "paid", "finalized", "finalized"],
]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_stripe_finalizing_on_its_own_in_any_order_with_the_close_job(db, stripe_emulator, due, order):
    # Stripe finalized and charged the invoice itself (dashboard, automatically_finalizes_at).
    stripe_id = db.session.get(Invoice, due).stripe_invoice_id
    stripe_client(stripe_emulator).v1.invoices.finalize_invoice(stripe_id, params={"auto_advance": True})
    collect(stripe_emulator)
    events = {kind: stripe_events(stripe_emulator, f"invoice.{kind}")[0] for kind in ("finalized", "paid")}
    for step in order:
        if step == "close":
            close_cycle(due)
        else:
            handle(db, events[step])
    assert_closed_and_rolled_over(db, stripe_emulator, due)


CLOSE_FIRST = [["finalized", "paid"], ["paid", "finalized"], ["paid", "paid", "close", "finalized", "finalized"]]


@pytest.mark.parametrize("after", CLOSE_FIRST, ids=["-".join(o) for o in CLOSE_FIRST])
def test_close_job_first_then_its_events_in_any_order(db, stripe_emulator, due, after):
    assert close_cycle(due) == "finalized"
    collect(stripe_emulator)
    events = {kind: stripe_events(stripe_emulator, f"invoice.{kind}")[0] for kind in ("finalized", "paid")}
    for step in after:
        if step == "close":
            close_cycle(due)
        else:
            handle(db, events[step])
    assert_closed_and_rolled_over(db, stripe_emulator, due)


def test_a_stale_finalized_event_does_not_undo_paid(db, stripe_emulator, due):
    close_cycle(due)
    collect(stripe_emulator)
    finalized = stripe_events(stripe_emulator, "invoice.finalized")[0]
    handle(db, stripe_events(stripe_emulator, "invoice.paid")[0])
    handle(db, {**finalized, "id": "evt_replayed_copy"})
    assert db.session.get(Invoice, due).status == "paid"


def test_payment_failure_voids_and_uncollectible_are_shown(db, stripe_emulator, due):
    invoice = db.session.get(Invoice, due)
    client = stripe_client(stripe_emulator)
    customer = invoice.organization.stripe_customer_id
    stripe_emulator.control.fail_payments_for(customer)
    assert close_cycle(due) == "finalized"
    collect(stripe_emulator)  # the charge fails: open (past due) at Stripe
    handle(db, stripe_events(stripe_emulator, "invoice.payment_failed")[0])
    assert db.session.get(Invoice, due).status == "finalized" and db.session.get(Invoice, due).past_due
    client.v1.invoices.mark_uncollectible(invoice.stripe_invoice_id)
    handle(db, stripe_events(stripe_emulator, "invoice.marked_uncollectible")[0])
    assert db.session.get(Invoice, due).status == "uncollectible"
    assert_closed_and_rolled_over(db, stripe_emulator, due, status="uncollectible")


def test_close_cycle_twice_at_once_finalizes_once(db, app, stripe_emulator, due):
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 60}])
    db.session.commit()
    results, errors = [], []

    def close():
        try:
            with app.app_context():
                results.append(close_cycle(due))
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=close) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    finalizes = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/finalize")]
    assert len(finalizes) == 1
    stripe_emulator.control.clear_faults()
    assert_closed_and_rolled_over(db, stripe_emulator, due, status="finalized")


def test_usage_arriving_during_the_close_lands_on_exactly_one_invoice(db, client, stripe_emulator, due):
    closing = db.session.get(Invoice, due)
    closing_total = closing.total_cents
    in_old_period = stamp(closing.period_end - timedelta(hours=1))
    assert claim_for_closing(due)  # the close has begun: final sync and finalize still to come
    response = post_usage(client, [event("late-1", "acme", "egress.gb", "2", occurred_at=in_old_period),
                                   event("new-1", "acme", "egress.gb", "1")])
    assert response.get_json() == {"accepted": 2, "duplicates": 0}
    assert close_cycle(due) == "finalized"
    closed, current = invoices_of(db, closing.organization_id)
    assert closed.total_cents == closing_total  # frozen once closing
    assert current.status == "open" and current.total_cents == 600
    late = next(item for item in current.items if item.origin_period_start is not None)
    assert late.origin_period_start == closed.period_start and late.amount_cents == 400
    assert_stripe_matches_portal(db, stripe_emulator, due)


def test_stripe_finalizes_on_its_own_when_the_close_job_never_runs(db, app, live_server, stripe_emulator, due):
    stripe_emulator.control.configure_webhooks(url=live_server.url + "/webhooks/stripe", secret=SECRET,
                                               retry_base_seconds=0.05)
    invoice = db.session.get(Invoice, due)
    stripe_invoice = stripe_client(stripe_emulator).v1.invoices.retrieve(invoice.stripe_invoice_id)
    db.session.commit()  # hold no transaction (on SQLite, the write lock) while the live portal works
    due_in = stripe_invoice.automatically_finalizes_at - stripe_emulator.control.now()
    stripe_emulator.control.advance_clock(due_in + 60)
    stripe_emulator.control.wait_for_webhooks(timeout=15)
    use_app(app)
    deadline = time.monotonic() + 15
    while db.session.get(Invoice, due, populate_existing=True).status == "open" and time.monotonic() < deadline:
        db.session.commit()
        SimpleWorker([Queue("webhooks", connection=redis_connection())], connection=redis_connection()).work(burst=True)
        time.sleep(0.1)
    assert_closed_and_rolled_over(db, stripe_emulator, due, status="finalized")
    stripe_emulator.control.configure_webhooks(url="", secret="")


def test_close_cycle_now_ends_the_period_now_and_the_next_runs_to_the_usual_end(db, runner, make, stripe_emulator):
    organization = make.organization(slug="initech")
    service = make.product("support.standard", unit_price="2900", kind="recurring")
    from portal.billing.services import attach_service

    invoice = make.open_invoice(organization)
    usual_end = invoice.period_end
    attach_service(organization, service, Decimal(1), "", now=invoice.period_start)
    db.session.commit()
    result = runner.invoke(args=["close-cycle", "--org", "initech"])
    assert result.exit_code == 0, result.output
    closed, current = invoices_of(db, organization.id)
    assert closed.status == "finalized" and closed.period_end < usual_end
    assert current.period_start == closed.period_end and current.period_end == usual_end
    # The service is charged for each part of the cycle: together about its full price.
    assert abs(closed.total_cents + current.total_cents - 2900) <= 1
    assert_stripe_matches_portal(db, stripe_emulator, closed.id)


def test_close_cycle_due_command(db, runner, stripe_emulator, due):
    result = runner.invoke(args=["close-cycle", "--due"])
    assert (result.exit_code, result.output) == (0, f"invoice {due}: finalized\n")
    again = runner.invoke(args=["close-cycle", "--due"])
    assert (again.exit_code, again.output) == (0, "Nothing to close.\n")
    neither = runner.invoke(args=["close-cycle"])
    assert neither.exit_code == 2 and neither.output.endswith("Error: give exactly one of --org SLUG or --due\n")


def test_api_shows_closed_invoices_newest_first(db, client, stripe_emulator, due):
    close_cycle(due)
    listed = client.get("/api/v1/organizations/acme/invoices", headers=HEADERS).get_json()["invoices"]
    assert [i["status"] for i in listed] == ["open", "finalized"]
    assert listed[1]["number"] and listed[1]["hosted_invoice_url"]


def test_changes_that_missed_a_stripe_finalization_move_to_the_next_invoice(db, stripe_emulator, due):
    invoice = db.session.get(Invoice, due)
    add_quantity(invoice, invoice.items[0].product, "", Decimal("3"))  # 600 cents, never synced
    db.session.commit()
    portal_total = db.session.get(Invoice, due, populate_existing=True).total_cents
    stripe_client(stripe_emulator).v1.invoices.finalize_invoice(invoice.stripe_invoice_id)  # Stripe, on its own
    handle(db, stripe_events(stripe_emulator, "invoice.finalized")[0])
    closed, current = invoices_of(db, invoice.organization_id)
    stripe_total = stripe_client(stripe_emulator).v1.invoices.retrieve(closed.stripe_invoice_id).total
    assert closed.status == "finalized" and closed.total_cents == stripe_total == portal_total - 600
    assert closed.total_cents == sum(item.amount_cents for item in closed.items)
    assert current.total_cents == 600
    assert f"Carried from invoice {closed.number} (#{closed.id}" in current.items[0].description
    carried = next(item for item in closed.items if item.amount_cents < 0)
    assert carried.amount_cents == -600 and f"(#{current.id})" in carried.description
    handle(db, {**stripe_events(stripe_emulator, "invoice.finalized")[0], "id": "evt_again"})
    _, current = invoices_of(db, invoice.organization_id)
    assert current.total_cents == 600  # carried once

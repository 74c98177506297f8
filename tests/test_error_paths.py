"""Error paths of sync, close and webhook processing, each reached for real: the Stripe
emulator over HTTP (faults only through its control API, or a real condition such as
a concurrent edit at Stripe), real Redis, the real database, real RQ workers."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job
from sqlalchemy import func, select

import portal.billing.sync
import portal.locks
from jobs.app import use_app
from portal.billing.closing import CloseError, claim_for_closing, close_cycle, due_invoice_ids
from portal.billing.events import unprocessed_event_ids
from portal.billing.lines import STRIPE_MAX_ITEMS_PER_INVOICE
from portal.billing.pricing import ItemDelta, add_quantities, add_quantity
from portal.billing.sync import MAX_RECONCILE_ROUNDS, sync_invoice, unsynced_invoice_ids
from portal.locks import invoice_lock
from portal.models import Invoice, Product, StripeEvent, StripeWrite
from portal.queue import QUEUE_NAMES, redis_connection
from portal.schedule import periodic_job_definitions
from portal.stripe_gateway import (
    MAX_ATTEMPTS,
    InvoiceNotEditable,
    StripeGateway,
    StripeObjectMissing,
    StripeRejected,
    WriteRecorder,
)
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client, stripe_lines_of
from tests.webhook_helpers import SECRET, post_event, sign


def gateway_for(app, max_attempts: int = MAX_ATTEMPTS, recorder: WriteRecorder | None = None) -> StripeGateway:
    """A gateway to the emulator the app bills against, without the shared budget."""
    return StripeGateway(app.config["STRIPE_API_KEY"], app.config["STRIPE_API_BASE"], None,
                         max_attempts=max_attempts, recorder=recorder)


def api_requests(emulator) -> list[dict]:
    return emulator.control.requests_log(path="/v1/")


def fresh(db, invoice_id: int) -> Invoice:
    """The invoice as the database has it now (a sync leaves loaded objects unexpired)."""
    db.session.rollback()
    db.session.expire_all()
    return db.session.get(Invoice, invoice_id)


@pytest.fixture
def billed(db, make):
    """An open invoice with two priced items (400 + 250 cents), not yet at Stripe."""
    organization = make.organization(slug="acme")
    egress = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, egress, "", Decimal(2))
    add_quantity(invoice, egress, "eu", Decimal("1.25"))
    db.session.commit()
    return invoice.id


@pytest.fixture
def synced(db, stripe_emulator, billed):
    """`billed`, synced to its Stripe draft, then changed again (one line to update):
    the next sync reads the draft and its lines, then writes one update_lines."""
    assert sync_invoice(billed).outcome == "synced"
    invoice = db.session.get(Invoice, billed)
    add_quantity(invoice, invoice.items[0].product, "", Decimal(1))
    db.session.commit()
    return billed


def run_while_a_write_is_held(app, db, emulator, write_path: str, run, at_stripe) -> object:
    """Run `run()` (in its own app context, on another thread) while the emulator holds
    its first request matching `write_path` before handling it; `at_stripe()` happens
    at Stripe in that window, i.e. after everything the run read and before its write.
    Returns what `run()` returned."""
    emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 1500, "method": "POST",
                                        "path": write_path, "count": 1}])
    db.session.commit()  # hold no transaction (on SQLite, the write lock) while the run works
    result, errors = [], []

    def target():
        try:
            with app.app_context():
                result.append(run())
        except Exception as error:  # surfaced below
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 20
    while not emulator.control.faults()["rules"][0]["fired"]:
        assert thread.is_alive() and time.monotonic() < deadline, f"the write never came: {errors}"
        time.sleep(0.01)
    at_stripe()  # the held write is now waiting in the emulator
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    emulator.control.clear_faults()
    return result[0]


# --- Stripe's refusals: one try each, mapped to the portal's errors -------------------------


def test_a_missing_object_is_stripe_object_missing_and_not_retried(app, stripe_emulator):
    stripe = gateway_for(app)
    with pytest.raises(StripeObjectMissing, match=r"InvalidRequestError \(404, resource_missing\)"):
        stripe.retrieve_invoice("in_does_not_exist")
    assert [(r["method"], r["status"]) for r in api_requests(stripe_emulator)] == [("GET", 404)]


def test_writing_to_a_finalized_invoice_is_invoice_not_editable_and_recorded_as_refused(db, app, stripe_emulator):
    stripe = gateway_for(app, recorder=WriteRecorder())
    customer = stripe.create_customer({"email": "ap@example.com"})
    draft = stripe.create_invoice({"customer": customer.id, "currency": "usd"})
    stripe.finalize_invoice(draft.id)
    line = {"amount": 100, "description": "late", "metadata": {"portal_invoice": "1", "portal_line": "x"}}
    with pytest.raises(InvoiceNotEditable, match=r"\(400, invoice_not_editable\)"):
        stripe.add_lines(draft.id, [line])
    with pytest.raises(InvoiceNotEditable, match="already finalized"):  # Stripe gives this one no code
        stripe.finalize_invoice(draft.id)
    writes = db.session.execute(select(StripeWrite.operation, StripeWrite.outcome, StripeWrite.tries,
                                       StripeWrite.error).order_by(StripeWrite.id)).all()
    assert [tuple(write[:3]) for write in writes] == [
        ("create_customer", "applied", 1), ("create_invoice", "applied", 1), ("finalize_invoice", "applied", 1),
        ("add_lines", "refused", 1), ("finalize_invoice", "refused", 1)]
    assert writes[3].error.startswith("InvalidRequestError (400, invoice_not_editable)")
    assert [r["status"] for r in api_requests(stripe_emulator)] == [200, 200, 200, 400, 400]


def test_a_declined_card_is_stripe_rejected(app, stripe_emulator):
    stripe = gateway_for(app)
    with pytest.raises(StripeRejected, match=r"CardError \(402, card_declined\)"):
        stripe.create_customer({"email": "ap@example.com", "payment_method": "pm_card_chargeDeclined"})
    assert [(r["path"], r["status"]) for r in api_requests(stripe_emulator)] == [("/v1/customers", 402)]


def test_a_refusal_ends_the_sync_rejected_and_the_next_run_after_the_fix_syncs(
        db, app, monkeypatch, stripe_emulator, billed):
    # The operator gave new customers a test card that Stripe will not attach.
    monkeypatch.setitem(app.config, "STRIPE_TEST_PAYMENT_METHOD", "pm_card_chargeDeclined")
    run = sync_invoice(billed)
    assert run.outcome == "rejected"
    assert run.error.startswith("CardError (402, card_declined)")
    assert (run.stripe_reads, run.stripe_writes) == (1, 1)  # the adoption lookup, the refused create
    assert [(r["method"], r["path"], r["status"]) for r in api_requests(stripe_emulator)] == [
        ("GET", "/v1/customers", 200), ("POST", "/v1/customers", 402)]
    invoice = fresh(db, billed)
    assert invoice.organization.stripe_customer_id is None and invoice.stripe_invoice_id is None
    assert invoice.has_unsynced_changes and billed in unsynced_invoice_ids()
    assert db.session.scalar(select(StripeWrite.outcome).where(StripeWrite.operation == "create_customer")) \
        == "refused"
    monkeypatch.setitem(app.config, "STRIPE_TEST_PAYMENT_METHOD", "pm_card_visa")
    assert sync_invoice(billed).outcome == "synced"
    assert_stripe_matches_portal(db, stripe_emulator, billed)


def test_a_draft_deleted_between_the_read_and_the_write_is_rejected_then_created_again(
        db, app, stripe_emulator, synced):
    old_draft = db.session.get(Invoice, synced).stripe_invoice_id
    run = run_while_a_write_is_held(
        app, db, stripe_emulator, "*/update_lines", lambda: sync_invoice(synced),
        lambda: stripe_client(stripe_emulator).v1.invoices.delete(old_draft))  # deleted in the dashboard
    assert run.outcome == "rejected"
    assert run.error.startswith("InvalidRequestError (404, resource_missing)")
    assert fresh(db, synced).has_unsynced_changes
    again = sync_invoice(synced)
    assert again.outcome == "synced", again.error
    assert again.note == f"Stripe draft {old_draft} was deleted at Stripe; created it again"
    assert fresh(db, synced).stripe_invoice_id != old_draft
    assert_stripe_matches_portal(db, stripe_emulator, synced)


def test_a_draft_finalized_between_the_read_and_the_write_blocks_the_sync(db, app, stripe_emulator, synced):
    stripe_id = db.session.get(Invoice, synced).stripe_invoice_id
    run = run_while_a_write_is_held(
        app, db, stripe_emulator, "*/update_lines", lambda: sync_invoice(synced),
        lambda: stripe_client(stripe_emulator).v1.invoices.finalize_invoice(stripe_id))
    # The refused write (invoice_not_editable) makes the run read the invoice again,
    # which says why: it is no longer a draft. The close and the webhook take over.
    assert run.outcome == "stripe_invoice_finalized"
    assert run.error == "Stripe invoice is open"
    held = [r for r in api_requests(stripe_emulator) if r["path"].endswith("/update_lines")]
    assert [r["status"] for r in held] == [400]
    invoice = fresh(db, synced)
    assert invoice.sync_blocked == "stripe_invoice_finalized" and synced not in unsynced_invoice_ids()


# --- the total guard ------------------------------------------------------------------------


def test_a_line_added_at_stripe_between_the_read_and_the_write_stops_the_run_on_the_total(
        db, app, stripe_emulator, synced):
    invoice = db.session.get(Invoice, synced)
    stripe_id, customer = invoice.stripe_invoice_id, invoice.organization.stripe_customer_id
    portal_total = invoice.total_cents

    def fee_typed_into_the_dashboard():
        stripe_client(stripe_emulator).v1.invoice_items.create(params={
            "customer": customer, "invoice": stripe_id, "amount": 999, "currency": "usd",
            "description": "Setup fee"})

    run = run_while_a_write_is_held(app, db, stripe_emulator, "*/update_lines", lambda: sync_invoice(synced),
                                    fee_typed_into_the_dashboard)
    # The update was applied, but Stripe's total after it holds a line the run never
    # read: it cannot vouch for the invoice, so it claims nothing.
    assert run.outcome == "total_mismatch"
    assert run.error == f"Stripe total {portal_total + 999} != portal total {portal_total}"
    assert run.updated == 1
    assert fresh(db, synced).has_unsynced_changes
    # The next run reads the fee as a line the portal did not make, and counts it.
    again = sync_invoice(synced)
    assert again.outcome == "unchanged" and again.stripe_writes == 0
    assert not fresh(db, synced).has_unsynced_changes
    assert stripe_client(stripe_emulator).v1.invoices.retrieve(stripe_id).total == portal_total + 999


# --- giving up --------------------------------------------------------------------------------


def test_writes_answered_500_in_every_round_end_the_run_as_unknown_outcome(db, stripe_emulator, billed):
    # Stripe answers 500 before applying: each round re-reads, plans the same lines
    # again and writes them under a new key; after MAX_RECONCILE_ROUNDS the run stops.
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "path": "*/add_lines",
                                               "count": MAX_RECONCILE_ROUNDS}])
    run = sync_invoice(billed)
    assert run.outcome == "unknown_outcome"
    assert run.error == f"writes answered 500 in {MAX_RECONCILE_ROUNDS} rounds"
    adds = [r for r in api_requests(stripe_emulator) if r["path"].endswith("/add_lines")]
    assert [r["status"] for r in adds] == [500] * MAX_RECONCILE_ROUNDS
    assert len({r["idempotency_key"] for r in adds}) == MAX_RECONCILE_ROUNDS
    records = db.session.execute(select(StripeWrite.outcome, StripeWrite.tries)
                                 .where(StripeWrite.operation == "add_lines").order_by(StripeWrite.id)).all()
    assert [tuple(record) for record in records] == [("unknown", 1)] * MAX_RECONCILE_ROUNDS
    invoice = fresh(db, billed)
    assert invoice.has_unsynced_changes
    assert stripe_lines_of(stripe_emulator, invoice.stripe_invoice_id) == []
    # The faults are spent: the next run writes the lines once.
    again = sync_invoice(billed)
    assert again.outcome == "synced" and again.created == 2
    assert_stripe_matches_portal(db, stripe_emulator, billed)


def test_reads_answered_500_are_retried_until_the_gateways_attempts_run_out(db, app, stripe_emulator, synced):
    stripe_id = db.session.get(Invoice, synced).stripe_invoice_id
    mark = len(api_requests(stripe_emulator))
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "method": "GET",
                                               "path": f"/v1/invoices/{stripe_id}", "count": 3}])
    run = sync_invoice(synced, stripe=gateway_for(app, max_attempts=3))
    assert run.outcome == "stripe_unavailable"
    assert run.error.startswith("APIError (500, None)")
    assert (run.stripe_reads, run.stripe_writes) == (3, 0)
    assert [(r["method"], r["status"]) for r in api_requests(stripe_emulator)[mark:]] == [("GET", 500)] * 3
    assert fresh(db, synced).has_unsynced_changes
    # Two 500s are within three attempts: the same gateway settings get through.
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "method": "GET",
                                               "path": f"/v1/invoices/{stripe_id}", "count": 2}])
    run = sync_invoice(synced, stripe=gateway_for(app, max_attempts=3))
    assert run.outcome == "synced" and run.updated == 1
    assert_stripe_matches_portal(db, stripe_emulator, synced)


def test_a_write_left_in_flight_by_a_timed_out_job_does_not_end_up_twice_at_stripe(db, app, stripe_emulator, make,
                                                                                   monkeypatch):
    monkeypatch.setattr(portal.locks, "INVOICE_LOCK_LEASE_SECONDS", 4)  # longer than the held write
    monkeypatch.setattr(portal.billing.sync, "WRITE_SETTLE_SECONDS", 4)
    use_app(app)
    invoice = make.open_invoice(make.organization(slug="slow"))
    product = make.product("egress.gb", unit_price="200")
    add_quantities([ItemDelta(invoice.id, product, f"r{n}", Decimal(n + 1)) for n in range(60)])
    db.session.commit()
    # Stripe takes 3 s to answer the first add_lines; the job may run for 1 s.
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 3000, "path": "*/add_lines",
                                               "count": 1}])
    queue = Queue("sync", connection=redis_connection())
    job = queue.enqueue("jobs.sync.sync_invoice", invoice.id, "manual", job_timeout=1)
    db.session.commit()
    SimpleWorker([queue], connection=redis_connection()).work(burst=True)
    assert Job.fetch(job.id, connection=redis_connection()).get_status() == "failed"
    # The sweep (or a "sync now") comes while that add_lines is still held at Stripe:
    # the timed-out job left the lock to its lease, so nobody reads and writes again yet.
    assert sync_invoice(invoice.id, wait_seconds=0).outcome == "locked"
    lock_key = f"portal:lock:invoice:{invoice.id}"
    deadline = time.monotonic() + 10
    while redis_connection().exists(lock_key):
        assert time.monotonic() < deadline, "the abandoned lock never lapsed"
        time.sleep(0.05)
    assert [r["status"] for r in api_requests(stripe_emulator) if r["path"].endswith("/add_lines")] == [200]
    run = sync_invoice(invoice.id)  # sees what landed, writes the rest
    assert run.outcome == "synced", run.error
    stripe_id = fresh(db, invoice.id).stripe_invoice_id
    keys = [line.metadata["portal_line"] for line in stripe_lines_of(stripe_emulator, stripe_id)]
    assert len(keys) == len(set(keys)) == 60, f"{len(keys)} lines at Stripe for 60 items"
    assert_stripe_matches_portal(db, stripe_emulator, invoice.id)


# --- the lock and Stripe's limit ----------------------------------------------------------


def test_a_sync_that_finds_the_invoice_locked_records_locked_and_calls_stripe_never(db, stripe_emulator, billed):
    with invoice_lock(billed) as held:
        assert held is not None
        run = sync_invoice(billed)
        held.check()  # still ours: the waiting run neither took nor freed it
    assert run.outcome == "locked" and run.error is None
    assert (run.stripe_reads, run.stripe_writes) == (0, 0)
    assert api_requests(stripe_emulator) == []
    assert fresh(db, billed).has_unsynced_changes
    assert sync_invoice(billed).outcome == "synced"


def test_more_product_lines_than_stripe_allows_is_too_many_lines_and_writes_nothing(db, stripe_emulator, make):
    invoice = make.open_invoice(make.organization(slug="sprawl"))
    products = [Product(code=f"sku.{n:03}", name=f"SKU {n}", unit="unit", unit_price=Decimal(3), kind="metered")
                for n in range(STRIPE_MAX_ITEMS_PER_INVOICE + 1)]
    db.session.add_all(products)
    db.session.commit()
    # Exactly Stripe's limit of product lines (past the roll-up threshold): synced.
    add_quantities([ItemDelta(invoice.id, product, "", Decimal(1)) for product in products[:-1]])
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"
    stripe_id = fresh(db, invoice.id).stripe_invoice_id
    assert len(stripe_lines_of(stripe_emulator, stripe_id)) == STRIPE_MAX_ITEMS_PER_INVOICE
    # One product more cannot be rolled up into fewer lines.
    add_quantity(fresh(db, invoice.id), products[-1], "", Decimal(1))
    db.session.commit()
    mark = len(api_requests(stripe_emulator))
    run = sync_invoice(invoice.id)
    assert run.outcome == "too_many_lines"
    assert run.error == f"{STRIPE_MAX_ITEMS_PER_INVOICE + 1} product lines exceed Stripe's " \
                        f"{STRIPE_MAX_ITEMS_PER_INVOICE}"
    assert api_requests(stripe_emulator)[mark:] == []  # refused before any call to Stripe
    assert fresh(db, invoice.id).has_unsynced_changes
    lines = stripe_lines_of(stripe_emulator, stripe_id)
    assert len(lines) == STRIPE_MAX_ITEMS_PER_INVOICE and sum(line.amount for line in lines) == 750


# --- closing while Stripe fails -----------------------------------------------------------


@pytest.fixture
def due(db, stripe_emulator, make):
    """An invoice whose period has ended, synced to its Stripe draft."""
    organization = make.organization(slug="initech")
    product = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization, at=datetime.now(timezone.utc) - timedelta(days=40))
    add_quantity(invoice, product, "", Decimal("12.5"))
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"
    return invoice.id


def invoices_of(db, invoice_id: int) -> list[Invoice]:
    organization_id = fresh(db, invoice_id).organization_id
    return list(db.session.scalars(select(Invoice).where(Invoice.organization_id == organization_id)
                                   .order_by(Invoice.period_start)))


def finalizes(emulator) -> list[dict]:
    return [r for r in api_requests(emulator) if r["path"].endswith("/finalize")]


def assert_closed_once(db, emulator, invoice_id: int) -> None:
    closed, current = invoices_of(db, invoice_id)  # exactly one next invoice, however many tries
    assert (closed.id, closed.status, closed.sync_blocked) == (invoice_id, "finalized", None)
    assert closed.number and closed.hosted_invoice_url and closed.invoice_pdf
    assert current.status == "open" and current.period_start == closed.period_end
    assert stripe_client(emulator).v1.invoices.retrieve(closed.stripe_invoice_id).status == "open"
    assert_stripe_matches_portal(db, emulator, invoice_id)


def test_a_close_while_stripe_is_down_stays_closing_and_a_later_close_finishes_it(db, app, stripe_emulator, due):
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before"}])  # every API request
    with pytest.raises(CloseError, match=rf"^final sync of invoice {due}: stripe_unavailable: APIError \(500"):
        close_cycle(due, stripe=gateway_for(app, max_attempts=2))
    closing, following = invoices_of(db, due)
    assert (closing.id, closing.status) == (due, "closing")
    assert following.status == "open" and following.period_start == closing.period_end
    assert finalizes(stripe_emulator) == []
    assert due_invoice_ids() == [due]  # the close sweep picks it up again
    stripe_emulator.control.clear_faults()
    assert close_cycle(due) == "finalized"
    assert len(finalizes(stripe_emulator)) == 1
    assert_closed_once(db, stripe_emulator, due)


@pytest.mark.parametrize("kind", ["500_before", "500_after"])
def test_a_finalize_answered_500_fails_the_close_and_the_next_close_finishes_it(db, stripe_emulator, due, kind):
    # 500_before: Stripe did not finalize; 500_after: it did, and the answer was lost.
    stripe_emulator.control.set_faults(rules=[{"kind": kind, "method": "POST", "path": "*/finalize", "count": 1}])
    with pytest.raises(CloseError, match=rf"^finalize invoice {due}: APIError \(500, None\)"):
        close_cycle(due)
    assert fresh(db, due).status == "closing"
    assert db.session.execute(select(StripeWrite.outcome, StripeWrite.tries)
                              .where(StripeWrite.operation == "finalize_invoice")).all() == [("unknown", 1)]
    assert close_cycle(due) == "finalized"
    assert [r["status"] for r in finalizes(stripe_emulator)] == ([500, 200] if kind == "500_before" else [500])
    assert_closed_once(db, stripe_emulator, due)


def test_stripe_finalizing_while_the_closes_finalize_is_in_flight_is_taken_as_done(db, app, stripe_emulator, due):
    stripe_id = db.session.get(Invoice, due).stripe_invoice_id
    outcome = run_while_a_write_is_held(
        app, db, stripe_emulator, "*/finalize", lambda: close_cycle(due),
        lambda: stripe_client(stripe_emulator).v1.invoices.finalize_invoice(  # automatically_finalizes_at
            stripe_id, params={"auto_advance": True}))
    assert outcome == "finalized"
    assert [r["status"] for r in finalizes(stripe_emulator)] == [200, 400]  # Stripe's own, then the close's
    assert_closed_once(db, stripe_emulator, due)


# --- a webhook whose processing fails, and the stored-event sweep ------------------------------


def test_an_event_whose_re_read_fails_is_recorded_and_the_sweep_processes_it_later(
        db, app, client, monkeypatch, stripe_emulator, due):
    from jobs.webhooks import sweep_stored_events

    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])
    use_app(app)
    stripe_id = db.session.get(Invoice, due).stripe_invoice_id
    stripe = stripe_client(stripe_emulator)
    stripe.v1.invoices.finalize_invoice(stripe_id)  # Stripe finalizes on its own
    event = stripe.v1.events.list(params={"type": "invoice.finalized"}).data[0]
    body = json.dumps(event.to_dict(), default=str).encode()
    # Stripe answers 500 to every try of the handler's re-read of the invoice.
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "method": "GET",
                                               "path": f"/v1/invoices/{stripe_id}", "count": MAX_ATTEMPTS}])
    assert post_event(client, body, sign(body)).status_code == 200
    webhooks = Queue("webhooks", connection=redis_connection())
    db.session.commit()
    SimpleWorker([webhooks], connection=redis_connection()).work(burst=True)
    db.session.rollback()
    stored = db.session.scalar(select(StripeEvent))
    assert Job.fetch(f"stripe-event-{stored.id}", connection=redis_connection()).get_status() == "failed"
    assert (stored.attempts, stored.processed_at) == (1, None)
    assert stored.last_error.startswith("StripeUnavailable: APIError (500, None)")
    assert fresh(db, due).status == "open"
    assert [r["status"] for r in api_requests(stripe_emulator) if r["path"] == f"/v1/invoices/{stripe_id}"
            and r["method"] == "GET"] == [500] * MAX_ATTEMPTS
    # A failed event is swept at once (it need not wait to look lost); Stripe answers again.
    assert unprocessed_event_ids() == [stored.id]
    db.session.commit()  # hold no transaction (on SQLite, the write lock) while the jobs run
    assert sweep_stored_events() == {"enqueued": 1}
    SimpleWorker([webhooks], connection=redis_connection()).work(burst=True)
    db.session.rollback()
    stored = db.session.scalar(select(StripeEvent))
    assert Job.fetch(f"stripe-event-{stored.id}", connection=redis_connection()).get_status() == "finished"
    assert (stored.attempts, stored.last_error) == (2, None) and stored.processed_at is not None
    assert unprocessed_event_ids() == []
    assert_closed_once(db, stripe_emulator, due)


# --- the periodic close sweep, through a worker ----------------------------------------------------


def test_the_close_sweep_job_closes_due_and_half_closed_invoices_through_a_worker(db, app, stripe_emulator, make,
                                                                                  due):
    use_app(app)
    product = db.session.scalar(select(Product).where(Product.code == "egress.gb"))
    # A close that stopped after its claim (the worker died): closing, never synced.
    stopped = make.open_invoice(make.organization(slug="globex"), at=datetime.now(timezone.utc) - timedelta(days=40))
    add_quantity(stopped, product, "", Decimal(3))
    db.session.commit()
    assert claim_for_closing(stopped.id)
    # A cycle still running: not due.
    running = make.open_invoice(make.organization(slug="hooli"))
    add_quantity(running, product, "", Decimal(1))
    db.session.commit()
    # Enqueued as the scheduler does, and run by a worker serving the portal's queues.
    periodic = next(job for job in periodic_job_definitions(app.config) if job.func == "jobs.cycles.close_due_cycles")
    sweep = Queue(periodic.queue, connection=redis_connection()).enqueue(periodic.func,
                                                                         job_timeout=periodic.timeout_seconds)
    db.session.commit()
    SimpleWorker([Queue(name, connection=redis_connection()) for name in QUEUE_NAMES],
                 connection=redis_connection()).work(burst=True)
    assert sweep.latest_result().return_value == {"enqueued": 2}
    default = Queue("default", connection=redis_connection())
    closes = [Job.fetch(job_id, connection=redis_connection())
              for job_id in default.finished_job_registry.get_job_ids() if job_id != sweep.id]
    assert sorted(job.args[0] for job in closes) == sorted([due, stopped.id])
    assert [job.latest_result().return_value for job in closes] == ["finalized", "finalized"]
    for invoice_id in (due, stopped.id):
        assert_closed_once(db, stripe_emulator, invoice_id)
    assert fresh(db, running.id).status == "open"
    assert db.session.scalar(select(func.count()).select_from(Invoice).where(Invoice.status == "open")) == 3
    assert due_invoice_ids() == []

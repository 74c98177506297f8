"""Recovery: every stuck state the code can reach, made with the emulator, walked to a
billed invoice through the support console alone (its routes, as a support user, and
the jobs they queue run by a worker)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job
from sqlalchemy import select

from jobs.app import use_app
from portal.billing.closing import claim_for_closing
from portal.billing.pricing import add_quantity
from portal.billing.sync import MAX_RECONCILE_ROUNDS, sync_invoice
from portal.models import AuditEntry, Invoice, Organization, StripeEvent
from portal.queue import QUEUE_NAMES, redis_connection
from portal.stripe_gateway import MAX_ATTEMPTS
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client
from tests.webhook_helpers import SECRET, post_event, sign

BILLED = ("finalized", "paid")


@pytest.fixture
def due(db, make, stripe_emulator):
    """Acme's invoice, its period ended yesterday, synced to a Stripe draft; a support user signed in."""
    organization = make.organization(slug="acme", name="Acme",
                                     created_at=datetime.now(timezone.utc) - timedelta(days=90))
    egress = make.product("egress.gb", unit_price="200", name="Egress", unit="GB")
    invoice = make.open_invoice(organization, at=datetime.now(timezone.utc) - timedelta(days=32))
    add_quantity(invoice, egress, "", Decimal("12.5"))
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"
    make.user("staff@example.com", support=True)
    return db.session.get(Invoice, invoice.id)


@pytest.fixture
def support(client, auth, due):
    auth.login("staff@example.com")
    return client


def run_jobs(app, db) -> None:
    """Run every queued job (and the jobs they queue) in a worker, as production would."""
    db.session.commit()  # hold no transaction while the worker runs
    use_app(app)
    connection = redis_connection()
    SimpleWorker([Queue(name, connection=connection) for name in QUEUE_NAMES], connection=connection).work(burst=True)
    db.session.rollback()


def fresh(db, invoice_id: int) -> Invoice:
    db.session.expire_all()
    return db.session.get(Invoice, invoice_id)


def recover(client, path: str, title: str, reason: str = "Ticket 4711: the invoice is stuck") -> str:
    """Open the action's confirmation page, then confirm it with a reason; returns the page after."""
    page = client.get(path)
    assert page.status_code == 200, path
    text = page.get_data(as_text=True)
    assert f"{title}?" in text and 'name="reason"' in text  # named, explained, asks for a reason
    done = client.post(path, data={"reason": reason}, follow_redirects=True)
    assert done.status_code == 200
    return done.get_data(as_text=True)


def stuck_listed(client, invoice_id: int) -> str:
    page = client.get("/admin/recovery").get_data(as_text=True)
    assert f'id="stuck-{invoice_id}"' in page, page
    return page.split(f'id="stuck-{invoice_id}"')[1].split("</tr>")[0]


def audit(db) -> list[AuditEntry]:
    """The audit entries of the actions (support's sign-ins left out)."""
    db.session.expire_all()
    return list(db.session.scalars(select(AuditEntry).where(AuditEntry.action != "support.sign_in")
                                   .order_by(AuditEntry.id)))


def assert_billed(db, emulator, invoice_id: int) -> Invoice:
    invoice = fresh(db, invoice_id)
    assert invoice.status in BILLED and invoice.number and invoice.sync_blocked is None, invoice.status
    assert stripe_client(emulator).v1.invoices.retrieve(invoice.stripe_invoice_id).status in ("open", "paid")
    assert_stripe_matches_portal(db, emulator, invoice_id)
    open_next = db.session.scalars(select(Invoice).where(Invoice.organization_id == invoice.organization_id,
                                                         Invoice.status == "open")).all()
    assert len(open_next) == 1 and open_next[0].period_start == invoice.period_end
    return invoice


# --- each stuck state, walked to a billed invoice ---------------------------------------


def test_a_draft_deleted_at_stripe_with_the_invoice_closing_is_billed_through_the_console(
        db, app, support, stripe_emulator, due):
    old_draft = due.stripe_invoice_id
    assert claim_for_closing(due.id)  # the close started; its job was then lost (a Redis restart)
    stripe_client(stripe_emulator).v1.invoices.delete(old_draft)
    assert "closing, not finalized yet" in stuck_listed(support, due.id)
    # Compare with Stripe tells what is wrong, and leads to the recovery.
    support.post(f"/admin/invoices/{due.id}/drift")
    drift_page = support.get(f"/admin/invoices/{due.id}/drift").get_data(as_text=True)
    assert f"Stripe has no invoice {old_draft} (deleted)" in drift_page
    assert f"/admin/recovery/invoices/{due.id}/recreate-draft" in drift_page
    assert "draft missing" in stuck_listed(support, due.id)

    page = recover(support, f"/admin/recovery/invoices/{due.id}/recreate-draft", "Recreate the Stripe draft")
    assert "Recreate the Stripe draft: A close of invoice" in page
    run_jobs(app, db)
    invoice = assert_billed(db, stripe_emulator, due.id)
    assert invoice.stripe_invoice_id != old_draft
    [entry] = audit(db)
    assert (entry.actor, entry.action, entry.object_id) == ("staff@example.com", "recovery.recreate_draft", str(due.id))
    assert entry.reason == "Ticket 4711: the invoice is stuck"
    assert entry.details["stripe_invoice_id"] == old_draft
    assert f'id="stuck-{due.id}"' not in support.get("/admin/recovery").get_data(as_text=True)


def test_a_customer_deleted_at_stripe_is_recreated_and_the_invoice_billed(db, app, support, stripe_emulator, due):
    organization = db.session.get(Organization, due.organization_id)
    old_customer = organization.stripe_customer_id
    assert claim_for_closing(due.id)
    stripe_client(stripe_emulator).v1.customers.delete(old_customer)
    support.post(f"/admin/invoices/{due.id}/drift")
    assert "customer missing" in stuck_listed(support, due.id)
    assert "/admin/recovery/orgs/acme/recreate-customer" in support.get(
        f"/admin/invoices/{due.id}/drift").get_data(as_text=True)

    recover(support, "/admin/recovery/orgs/acme/recreate-customer", "Recreate the Stripe customer")
    run_jobs(app, db)
    assert_billed(db, stripe_emulator, due.id)
    organization = db.session.get(Organization, due.organization_id)
    assert organization.stripe_customer_id not in (None, old_customer)
    [entry] = audit(db)
    assert entry.action == "recovery.recreate_customer" and entry.details["stripe_customer_id"] == old_customer


def test_a_blocked_sync_is_cleared_and_the_invoice_takes_stripes_finalization(db, app, support, stripe_emulator, due):
    # Finalized in Stripe's dashboard; the sync found it and blocked, and the job that
    # would have applied Stripe's state was lost.
    stripe_client(stripe_emulator).v1.invoices.finalize_invoice(due.stripe_invoice_id, params={"auto_advance": False})
    assert sync_invoice(due.id).outcome == "stripe_invoice_finalized"
    assert fresh(db, due.id).sync_blocked == "stripe_invoice_finalized"
    assert "sync blocked: stripe_invoice_finalized" in stuck_listed(support, due.id)
    # The other actions say what must come first.
    refused = support.post(f"/admin/recovery/invoices/{due.id}/retry-close", data={"reason": "x"})
    assert refused.status_code == 400 and "clear the block first" in refused.get_data(as_text=True)

    recover(support, f"/admin/recovery/invoices/{due.id}/clear-block", "Clear the block")
    run_jobs(app, db)
    assert_billed(db, stripe_emulator, due.id)
    [entry] = audit(db)
    assert entry.action == "recovery.clear_block" and entry.details["blocked"] == "stripe_invoice_finalized"


@pytest.mark.parametrize("how", ["retry-close", "requeue-job"])
def test_a_close_that_failed_on_unknown_outcomes_is_retried_or_its_job_requeued(
        db, app, support, stripe_emulator, due, how):
    add_quantity(due, due.items[0].product, "eu", Decimal(2))  # the final sync has a line to add
    db.session.commit()
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "path": "/v1/invoices/*/add_lines",
                                               "count": MAX_RECONCILE_ROUNDS}])
    Queue("default", connection=redis_connection()).enqueue("jobs.cycles.close_due_cycles")
    run_jobs(app, db)  # the close sweep, then the close: every add_lines answered 500
    close_job = Job.fetch(f"portal-close-{due.id}", connection=redis_connection())
    assert close_job.get_status() == "failed"
    assert fresh(db, due.id).status == "closing"
    stuck = stuck_listed(support, due.id)
    assert "last sync: unknown outcome" in stuck and f"failed job portal-close-{due.id}" in stuck
    jobs = support.get("/admin/recovery").get_data(as_text=True).split('id="failed-jobs"')[1]
    assert f"portal-close-{due.id}" in jobs and "CloseError" in jobs

    if how == "retry-close":
        recover(support, f"/admin/recovery/invoices/{due.id}/retry-close", "Retry the close")
    else:
        path = f"/admin/recovery/jobs/default/portal-close-{due.id}/requeue"
        recover(support, path, "Requeue the failed job")
        # A second click (another tab, a colleague) finds the job no longer failed.
        assert support.post(path, data={"reason": "again"}).status_code == 404
    run_jobs(app, db)
    assert_billed(db, stripe_emulator, due.id)
    assert len(fresh(db, due.id).items) == 2
    [entry] = audit(db)
    assert entry.action == {"retry-close": "recovery.retry_close", "requeue-job": "recovery.requeue_job"}[how]
    assert entry.object_id == str(due.id)
    jobs = support.get("/admin/recovery").get_data(as_text=True).split('id="failed-jobs"')[1]
    assert f"portal-close-{due.id}" not in jobs


def test_a_stripe_event_whose_processing_failed_is_reprocessed(db, app, support, monkeypatch, stripe_emulator, due):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])
    stripe = stripe_client(stripe_emulator)
    stripe.v1.invoices.finalize_invoice(due.stripe_invoice_id)  # Stripe finalized it on its own
    event = stripe.v1.events.list(params={"type": "invoice.finalized"}).data[0]
    body = json.dumps(event.to_dict(), default=str).encode()
    # Every try of the handler's re-read of the invoice is answered 500.
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "method": "GET",
                                               "path": f"/v1/invoices/{due.stripe_invoice_id}",
                                               "count": MAX_ATTEMPTS}])
    assert post_event(support, body, sign(body)).status_code == 200
    run_jobs(app, db)
    stored = db.session.scalar(select(StripeEvent))
    assert stored.attempts == 1 and stored.processed_at is None
    assert fresh(db, due.id).status == "open"
    events = support.get("/admin/recovery").get_data(as_text=True).split('id="failed-events"')[1]
    assert event.id in events and "StripeUnavailable" in events

    recover(support, f"/admin/recovery/events/{stored.id}/reprocess", "Reprocess the Stripe event")
    run_jobs(app, db)
    assert_billed(db, stripe_emulator, due.id)
    db.session.expire_all()
    assert db.session.get(StripeEvent, stored.id).processed_at is not None
    [entry] = audit(db)
    assert entry.action == "recovery.reprocess_event" and entry.object_id == str(due.id)
    assert entry.details["stripe_event_id"] == event.id and "StripeUnavailable" in entry.details["last_error"]
    assert Job.fetch(f"stripe-event-{stored.id}", connection=redis_connection()).get_status() == "finished"
    events = support.get("/admin/recovery").get_data(as_text=True).split('id="failed-events"')[1]
    assert event.id not in events


def test_a_failed_sync_of_an_open_invoice_is_retried(db, app, support, stripe_emulator, due):
    add_quantity(due, due.items[0].product, "eu", Decimal(2))
    db.session.commit()
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "path": "/v1/invoices/*/add_lines",
                                               "count": MAX_RECONCILE_ROUNDS}])
    assert sync_invoice(due.id).outcome == "unknown_outcome"
    assert "last sync: unknown outcome" in stuck_listed(support, due.id)
    recover(support, f"/admin/recovery/invoices/{due.id}/retry-sync", "Retry the sync")
    run_jobs(app, db)
    assert not fresh(db, due.id).has_unsynced_changes
    assert_stripe_matches_portal(db, stripe_emulator, due.id)
    # Its period ended long ago: the close is what bills it.
    assert "period ended" in stuck_listed(support, due.id)
    recover(support, f"/admin/recovery/invoices/{due.id}/retry-close", "Retry the close")
    run_jobs(app, db)
    assert_billed(db, stripe_emulator, due.id)
    assert [e.action for e in audit(db)] == ["recovery.retry_sync", "recovery.retry_close"]


# --- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["", "   ", "x" * 501, "bad\x00reason"])
def test_a_recovery_without_a_proper_reason_changes_nothing(db, support, due, reason):
    response = support.post(f"/admin/recovery/invoices/{due.id}/retry-close", data={"reason": reason})
    assert response.status_code == 400
    assert "Not done:" in response.get_data(as_text=True)
    assert audit(db) == [] and all(Queue(n, connection=redis_connection()).count == 0 for n in QUEUE_NAMES)


def test_recoveries_that_do_not_apply_are_refused_with_the_reason(db, support, make, due):
    checks = [
        (f"/admin/recovery/invoices/{due.id}/clear-block", "is not blocked"),
        ("/admin/recovery/orgs/{slug}/recreate-customer", "has no open or closing invoice"),
    ]
    empty = make.organization(slug="empty", name="Empty")
    not_due = make.open_invoice(make.organization(slug="later"))
    checks.append((f"/admin/recovery/invoices/{not_due.id}/retry-close", "there is no close to retry"))
    for path, why in checks:
        response = support.post(path.format(slug=empty.slug), data={"reason": "trying"})
        assert response.status_code == 400 and why in response.get_data(as_text=True), path
    due.status = "paid"
    db.session.commit()
    response = support.post(f"/admin/recovery/invoices/{due.id}/recreate-draft", data={"reason": "trying"})
    assert response.status_code == 400 and "it is billed" in response.get_data(as_text=True)
    assert audit(db) == []


def test_unknown_recoveries_and_targets_are_not_found(support, due):
    for path in (f"/admin/recovery/invoices/{due.id}/delete-everything",
                 "/admin/recovery/invoices/999999/retry-close", "/admin/recovery/events/999999/reprocess",
                 "/admin/recovery/jobs/default/no-such-job/requeue",
                 "/admin/recovery/jobs/nosuchqueue/portal-close-1/requeue",
                 "/admin/recovery/orgs/nobody/recreate-customer", "/admin/recovery?org=nobody"):
        assert support.get(path).status_code == 404, path


def test_customers_cannot_reach_recovery_or_drift(db, client, auth, make, due):
    make.user("ann@example.com", organization=db.session.get(Organization, due.organization_id))
    auth.login("ann@example.com")
    for path in ("/admin/recovery", f"/admin/recovery/invoices/{due.id}/retry-close",
                 "/admin/recovery/orgs/acme/recreate-customer", f"/admin/invoices/{due.id}/drift"):
        assert client.get(path).status_code == 403, path
    for path in (f"/admin/recovery/invoices/{due.id}/retry-close", f"/admin/invoices/{due.id}/drift",
                 f"/admin/invoices/{due.id}/drift/repair"):
        assert client.post(path, data={"reason": "x"}).status_code == 403, path
    assert audit(db) == [] and all(Queue(n, connection=redis_connection()).count == 0 for n in QUEUE_NAMES)


def test_an_event_left_unprocessed_long_after_it_arrived_is_listed(db, support, due):
    from portal.models.types import utcnow

    for event_id, minutes in (("evt_lost", 20), ("evt_recent", 1)):
        db.session.add(StripeEvent(stripe_event_id=event_id, type="invoice.paid", stripe_created=1, payload={},
                                   attempts=0, received_at=utcnow() - timedelta(minutes=minutes)))
    db.session.commit()
    events = support.get("/admin/recovery").get_data(as_text=True).split('id="failed-events"')[1]
    assert "evt_lost" in events and "evt_recent" not in events

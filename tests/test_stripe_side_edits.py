"""Objects changed behind the portal's back at Stripe (the dashboard, another Stripe
account): the sync recreates what disappeared, repairs the finalization schedule,
and says so for support. Against the emulator over real HTTP."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from portal.billing.closing import claim_for_closing
from portal.billing.pricing import add_quantity
from portal.billing.sync import AUTO_FINALIZE_GRACE, sync_invoice
from portal.models import Invoice, Organization
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client

GRACE = int(AUTO_FINALIZE_GRACE.total_seconds())


@pytest.fixture
def synced(db, make, stripe_emulator):
    """An open invoice with two lines, synced to its Stripe draft."""
    organization = make.organization(slug="acme")
    egress = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, egress, "", Decimal("12.5"))
    add_quantity(invoice, egress, "eu", Decimal("3"))
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"
    return db.session.get(Invoice, invoice.id)


def _changed(db, invoice: Invoice) -> None:
    """A new usage line, so the next sweep would sync the invoice."""
    add_quantity(invoice, invoice.items[0].product, "us", Decimal("1"))
    db.session.commit()


def test_a_draft_deleted_at_stripe_is_created_again_with_every_line(db, stripe_emulator, synced):
    client = stripe_client(stripe_emulator)
    old_id = synced.stripe_invoice_id
    client.v1.invoices.delete(old_id)
    _changed(db, synced)
    run = sync_invoice(synced.id)
    assert run.outcome == "synced", run.error
    invoice = db.session.get(Invoice, synced.id, populate_existing=True)
    assert invoice.stripe_invoice_id != old_id and invoice.sync_blocked is None
    assert f"Stripe draft {old_id} was deleted" in run.note
    assert (run.created, run.updated, run.deleted) == (3, 0, 0)
    assert_stripe_matches_portal(db, stripe_emulator, synced.id)
    draft = client.v1.invoices.retrieve(invoice.stripe_invoice_id)
    assert draft.auto_advance is True
    assert draft.automatically_finalizes_at == int(invoice.period_end.timestamp()) + GRACE


def test_a_deleted_customer_is_created_again_then_a_new_draft(db, stripe_emulator, synced):
    client = stripe_client(stripe_emulator)
    organization = db.session.get(Organization, synced.organization_id)
    old_customer, old_draft = organization.stripe_customer_id, synced.stripe_invoice_id
    client.v1.customers.delete(old_customer)
    db.session.commit()
    # Nothing changed in the portal: the sync that a close or "sync now" runs still recovers.
    run = sync_invoice(synced.id)
    assert run.outcome == "synced", run.error
    assert f"Stripe customer {old_customer} was deleted" in run.note
    organization = db.session.get(Organization, synced.organization_id, populate_existing=True)
    invoice = db.session.get(Invoice, synced.id, populate_existing=True)
    assert organization.stripe_customer_id not in (None, old_customer)
    assert invoice.stripe_invoice_id not in (None, old_draft)
    new_customer = client.v1.customers.retrieve(organization.stripe_customer_id)
    assert new_customer.metadata["portal_organization_id"] == str(organization.id)
    assert client.v1.invoices.retrieve(invoice.stripe_invoice_id).customer == new_customer.id
    assert_stripe_matches_portal(db, stripe_emulator, synced.id)
    # The next sync finds everything in step: no write.
    again = sync_invoice(synced.id)
    assert again.outcome == "unchanged" and again.stripe_writes == 0 and again.note is None


def test_a_draft_set_to_not_auto_advance_in_the_dashboard_gets_its_schedule_back(db, stripe_emulator, synced):
    client = stripe_client(stripe_emulator)
    client.v1.invoices.update(synced.stripe_invoice_id, params={"auto_advance": False})
    edited = client.v1.invoices.retrieve(synced.stripe_invoice_id)
    assert edited.automatically_finalizes_at is None  # Stripe: nothing scheduled without auto_advance
    run = sync_invoice(synced.id)
    assert run.outcome == "synced" and run.stripe_writes == 1, run.error  # the repair alone
    assert (run.created, run.updated, run.deleted) == (0, 0, 0)
    assert "finalization schedule" in run.note
    repaired = client.v1.invoices.retrieve(synced.stripe_invoice_id)
    assert repaired.auto_advance is True
    assert repaired.automatically_finalizes_at == int(synced.period_end.timestamp()) + GRACE
    # Every update the portal sends carries both fields together.
    updates = [r for r in stripe_emulator.control.requests_log(method="POST")
               if r["path"] == f"/v1/invoices/{synced.stripe_invoice_id}"]
    portal_updates = [r for r in updates if r.get("idempotency_key", "").startswith("portal-")]
    assert portal_updates and all({"auto_advance", "automatically_finalizes_at"} <= set(r["params"])
                                  for r in portal_updates)


def test_a_cycle_ended_early_moves_stripes_finalization_time_with_it(db, stripe_emulator, synced):
    before = stripe_client(stripe_emulator).v1.invoices.retrieve(synced.stripe_invoice_id)
    usual_end = synced.period_end
    assert claim_for_closing(synced.id, end_now=True)  # support's "close cycle now"; finalize not run yet
    closing = db.session.get(Invoice, synced.id, populate_existing=True)
    assert closing.period_end < usual_end - timedelta(days=1)
    db.session.commit()
    run = sync_invoice(synced.id, trigger="cycle_close")
    assert run.outcome in ("synced", "unchanged"), run.error
    after = stripe_client(stripe_emulator).v1.invoices.retrieve(synced.stripe_invoice_id)
    assert after.automatically_finalizes_at < before.automatically_finalizes_at
    assert abs(after.automatically_finalizes_at - (int(closing.period_end.timestamp()) + GRACE)) <= 5
    # And it stays put: the next sync writes nothing.
    assert sync_invoice(synced.id, trigger="cycle_close").stripe_writes == 0


def test_no_stripe_draft_is_ever_auto_advancing_without_a_time(db, stripe_emulator, synced):
    """Whatever the portal created or updated, Stripe reads back a schedule."""
    client = stripe_client(stripe_emulator)
    for draft in client.v1.invoices.list(params={"status": "draft", "limit": 100}).data:
        assert draft.auto_advance is True and draft.automatically_finalizes_at is not None

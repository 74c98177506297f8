"""When Stripe no longer has the organization's customer, "Manage payment methods"
creates it again (through the sync's own recovery) instead of asking the customer to
try again forever."""
from __future__ import annotations

from decimal import Decimal

from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.models import Organization, SyncRun
from tests.sync_helpers import assert_stripe_matches_portal


def _owner_with_synced_invoice(db, make):
    organization = make.organization(name="Initech", slug="initech")
    cpu = make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, cpu, "web-1", Decimal("1728000"))
    db.session.commit()
    make.user("ann@example.com", organization=organization, role="owner")
    assert sync_invoice(invoice.id).outcome == "synced"
    return organization, invoice


def test_payment_methods_page_creates_a_customer_stripe_lost(client, auth, db, make, stripe_emulator):
    organization, invoice = _owner_with_synced_invoice(db, make)
    lost = organization.stripe_customer_id
    stripe_emulator.control.reset()  # Stripe forgot everything (an emulator restarted without its state)
    stripe_emulator.control.set_portal_default_configuration(True)
    auth.login("ann@example.com")
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods")
    assert response.status_code == 303, response.get_data(as_text=True)
    assert response.headers["Location"].startswith(f"{stripe_emulator.url}/p/session/bps_")
    db.session.expire_all()
    recreated = db.session.get(Organization, organization.id).stripe_customer_id
    assert recreated and recreated != lost
    run = db.session.query(SyncRun).filter_by(invoice_id=invoice.id).order_by(SyncRun.id.desc()).first()
    assert run.outcome == "synced" and lost in run.note
    assert_stripe_matches_portal(db, stripe_emulator, invoice.id)


def test_a_customer_deleted_in_the_dashboard_is_created_again_for_the_portal(client, auth, db, make,
                                                                             stripe_emulator):
    from tests.sync_helpers import stripe_client

    organization, _ = _owner_with_synced_invoice(db, make)
    lost = organization.stripe_customer_id
    stripe_client(stripe_emulator).v1.customers.delete(lost)
    stripe_emulator.control.set_portal_default_configuration(True)
    auth.login("ann@example.com")
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods")
    assert response.status_code == 303, response.get_data(as_text=True)
    db.session.expire_all()
    assert db.session.get(Organization, organization.id).stripe_customer_id not in (None, lost)

"""The customer's billing page: the current invoice and its sync state, services,
past invoices, and the way into Stripe's customer portal."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from portal.billing.pricing import add_quantity
from portal.billing.services import attach_service, detach_service
from portal.models import Invoice, SyncRun
from portal.models.types import utcnow
from tests.sync_helpers import stripe_client


@pytest.fixture
def billed(db, make):
    """An organization with an open invoice of two resources, and its owner."""
    organization = make.organization(name="Initech", slug="initech")
    cpu = make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, cpu, "web-1", Decimal("1728000"))  # $19.01
    add_quantity(invoice, cpu, "worker-1", Decimal("100000"))  # $1.10
    db.session.commit()
    user = make.user("ann@example.com", organization=organization, role="owner")
    return organization, invoice, user


def _past_invoice(db, organization, months_ago: int, **fields) -> Invoice:
    now = utcnow()
    invoice = Invoice(organization_id=organization.id, period_start=now - timedelta(days=30 * months_ago + 30),
                      period_end=now - timedelta(days=30 * months_ago), status="paid",
                      currency=organization.currency, **fields)
    db.session.add(invoice)
    db.session.commit()
    return invoice


def test_billing_page_shows_each_resource_and_the_total(client, auth, billed):
    organization, _, _ = billed
    auth.login("ann@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert "web-1" in page and "$19.01" in page
    assert "worker-1" in page and "$1.10" in page
    assert "$20.11" in page
    assert "status-open" in page


def test_billing_page_says_when_the_invoice_was_last_synced_and_what_is_pending(client, auth, db, billed):
    organization, invoice, _ = billed
    auth.login("ann@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert "Updating Stripe…" in page and "Stripe is up to date" not in page

    finished = utcnow().replace(microsecond=0)
    db.session.add(SyncRun(invoice_id=invoice.id, trigger="schedule", started_at=finished - timedelta(seconds=2),
                           finished_at=finished, outcome="synced"))
    db.session.execute(Invoice.__table__.update().where(Invoice.id == invoice.id)
                       .values(synced_seq=Invoice.change_seq))
    db.session.commit()
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert f"Stripe is up to date <small>(last sent {finished:%Y-%m-%d %H:%M} UTC)</small>" in page
    assert "Updating Stripe" not in page and "(synced)" not in page


def test_billing_page_lists_attached_services_but_not_detached_ones(client, auth, db, make, billed):
    organization, _, _ = billed
    ip = make.product("ipv4.dedicated", unit_price="200", kind="recurring", name="Dedicated IPv4",
                      unit="address per month")
    support = make.product("support.standard", unit_price="2900", kind="recurring", name="Standard support",
                           unit="plan per month")
    attach_service(organization, ip, Decimal(2), "edge")
    detach_service(attach_service(organization, support, Decimal(1), ""))
    db.session.commit()
    auth.login("ann@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    services = page.split('id="services"')[1].split("</table>")[0]  # the table, not the catalog
    assert "Dedicated IPv4" in services and "edge" in services
    assert "Standard support" not in services


def test_billing_page_lists_past_invoices_with_links_to_stripe(client, auth, db, billed):
    organization, _, _ = billed
    _past_invoice(db, organization, 1, number="INV-0042", total_cents=123456,
                  hosted_invoice_url="https://invoice.stripe.test/i/42", invoice_pdf="https://pay.stripe.test/42.pdf")
    auth.login("ann@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    past = page.split('id="past-invoices"')[1].split("</section>")[0]
    assert "INV-0042" in past and "$1,234.56" in past and "status-paid" in past
    assert 'href="https://invoice.stripe.test/i/42"' in past
    assert 'href="https://pay.stripe.test/42.pdf"' in past


def test_member_cannot_see_or_use_another_organizations_billing(client, auth, make, billed):
    other = make.organization(slug="other")
    auth.login("ann@example.com")
    assert client.get(f"/orgs/{other.slug}/billing").status_code == 404
    assert client.post(f"/orgs/{other.slug}/billing/payment-methods").status_code == 404


@pytest.fixture
def stripe_customer(db, billed, stripe_emulator):
    from portal.stripe_gateway import gateway

    organization, _, _ = billed
    customer = gateway().create_customer({"email": organization.billing_email, "name": organization.name},
                                         organization=organization.id)
    organization.stripe_customer_id = customer.id
    db.session.commit()
    return customer.id


def _portal_sessions(emulator) -> list[dict]:
    return [r for r in emulator.control.requests_log() if r["path"] == "/v1/billing_portal/sessions"]


def test_manage_payment_methods_opens_a_stripe_customer_portal_session(client, auth, billed, stripe_emulator,
                                                                        stripe_customer):
    organization, _, _ = billed
    stripe_emulator.control.set_portal_default_configuration(True)  # saved once in the Dashboard
    auth.login("ann@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert "Manage payment methods" in page
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods")
    assert response.status_code == 303
    assert response.headers["Location"].startswith(f"{stripe_emulator.url}/p/session/bps_")
    sessions = _portal_sessions(stripe_emulator)
    assert len(sessions) == 1 and sessions[0]["status"] == 200
    assert sessions[0]["params"]["customer"] == stripe_customer
    assert sessions[0]["params"]["return_url"].endswith(f"/orgs/{organization.slug}/billing")
    assert "configuration" not in sessions[0]["params"]  # the account's default


def test_a_configured_portal_configuration_is_used(client, auth, app, billed, stripe_emulator, stripe_customer,
                                                   monkeypatch):
    organization, _, _ = billed
    configuration = stripe_client(stripe_emulator).v1.billing_portal.configurations.create(params={
        "features": {"payment_method_update": {"enabled": True}}})
    assert configuration.is_default is False
    monkeypatch.setitem(app.config, "STRIPE_PORTAL_CONFIGURATION", configuration.id)
    auth.login("ann@example.com")
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods")
    assert response.status_code == 303, response.get_data(as_text=True)
    assert _portal_sessions(stripe_emulator)[-1]["params"]["configuration"] == configuration.id


def test_without_a_portal_configuration_the_customer_is_told_and_support_sees_why(
        client, auth, make, billed, stripe_emulator, stripe_customer):
    organization, _, _ = billed
    auth.login("ann@example.com")
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods", follow_redirects=True)
    page = response.get_data(as_text=True)
    assert response.request.path == f"/orgs/{organization.slug}/billing"
    assert "Our support team has been told" in page and "try again in a minute" not in page
    assert _portal_sessions(stripe_emulator)[-1]["status"] == 400  # Stripe refused: no default configuration
    auth.logout()
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")
    problems = client.get("/admin/discrepancies").get_data(as_text=True)
    assert "Stripe refused to open its customer portal" in problems and "STRIPE_PORTAL_CONFIGURATION" in problems
    assert f"organization #{organization.id}" in problems


def test_manage_payment_methods_explains_when_there_is_no_stripe_customer_yet(client, auth, billed, stripe_emulator):
    organization, _, _ = billed
    auth.login("ann@example.com")
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods", follow_redirects=True)
    assert response.request.path == f"/orgs/{organization.slug}/billing"
    assert "once your billing account exists at Stripe" in response.get_data(as_text=True)
    assert not [r for r in stripe_emulator.control.requests_log() if "billing_portal" in r["path"]]


def test_manage_payment_methods_explains_when_stripe_is_not_configured(client, auth, db, app, billed, monkeypatch):
    organization, _, _ = billed
    organization.stripe_customer_id = "cus_unreachable"
    db.session.commit()
    monkeypatch.setitem(app.config, "STRIPE_API_KEY", None)
    auth.login("ann@example.com")
    response = client.post(f"/orgs/{organization.slug}/billing/payment-methods", follow_redirects=True)
    assert response.status_code == 200
    assert "not connected to Stripe" in response.get_data(as_text=True)


def test_support_sees_a_customers_page_but_does_not_open_their_stripe_portal(client, auth, make, billed):
    organization, _, _ = billed
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert "$20.11" in page and "Manage payment methods" not in page
    assert client.post(f"/orgs/{organization.slug}/billing/payment-methods").status_code == 403


def test_billing_page_queries_do_not_grow_with_items_services_or_invoices(client, auth, db, make, count_queries):
    organization = make.organization(slug="busy")
    cpu = make.product(unit_price="0.0011")
    ip = make.product(unit_price="200", kind="recurring")
    invoice = make.open_invoice(organization)
    make.user("ann@example.com", organization=organization)
    auth.login("ann@example.com")

    past_invoices = 0

    def add(n: int) -> int:
        nonlocal past_invoices
        for i in range(n):
            add_quantity(invoice, cpu, f"machine-{i}-{utcnow().timestamp()}", Decimal(1000))
            attach_service(organization, ip, Decimal(1), f"ip-{i}-{utcnow().timestamp()}")
            db.session.add(SyncRun(invoice_id=invoice.id, trigger="usage", finished_at=utcnow(), outcome="synced"))
        db.session.commit()
        for _ in range(n):
            past_invoices += 1
            _past_invoice(db, organization, past_invoices)
        with count_queries as counted:
            response = client.get(f"/orgs/{organization.slug}/billing")
        assert response.status_code == 200
        return counted.count

    few, many = add(1), add(30)
    assert many == few, count_queries.statements
    # The chart is one grouped query, the projection three, the spend alerts with their crossings
    # one, whatever the number of lines or events.
    assert many <= 14, "\n".join(s[:150] for s in count_queries.statements)


def test_live_refresh_queries_do_not_grow_with_lines_or_events(client, auth, db, make, count_queries):
    from portal.billing.usage import ingest_usage

    organization = make.organization(slug="busy")
    make.product("machines.shared-cpu-1x", unit_price="0.0011")
    make.open_invoice(organization)
    make.user("ann@example.com", organization=organization)
    auth.login("ann@example.com")
    sent = 0

    def add(n: int) -> tuple[int, int]:
        nonlocal sent
        events = []
        for i in range(n):
            sent += 1
            events.append({"id": f"e{sent}", "organization": "busy", "product": "machines.shared-cpu-1x",
                           "quantity": "60", "resource": f"machine-{i}", "occurred_at": utcnow().isoformat()})
        ingest_usage("test", events)
        db.session.commit()
        with count_queries as counted:
            response = client.get("/orgs/busy/billing/current", headers={"HX-Request": "true"})
        assert response.status_code == 200
        seen = response.get_data(as_text=True).split("seen=")[1].split('"')[0]
        with count_queries as unchanged:
            assert client.get(f"/orgs/busy/billing/current?seen={seen}",
                              headers={"HX-Request": "true"}).status_code == 204
        return counted.count, unchanged.count

    few, many = add(1), add(40)
    assert many == few, count_queries.statements
    assert many[0] <= 11 and many[1] <= 6, many

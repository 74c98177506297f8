"""Recurring services through the API: proration to the second, detach, quantity changes."""
from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from portal import money
from portal.billing.service_charges import charge_services
from portal.billing.services import attach_service, detach_service
from portal.models import Invoice, ServiceAttachment
from tests.api_helpers import HEADERS


@pytest.fixture
def acme(make):
    organization = make.organization(slug="acme")
    make.product("ipv4", unit_price="200", kind="recurring", name="IPv4")
    make.product("egress.gb", unit_price="200")
    make.open_invoice(organization)
    return organization


def current(client):
    return client.get("/api/v1/organizations/acme/invoices/current", headers=HEADERS).get_json()


def expected_charge(invoice_json, start: datetime, end: datetime | None = None, quantity="1", price="200"):
    period_start = datetime.fromisoformat(invoice_json["period"]["start"])
    period_end = datetime.fromisoformat(invoice_json["period"]["end"])
    seconds = money.seconds_between(max(start, period_start), min(end or period_end, period_end))
    return money.prorated_amount(Decimal(quantity), Decimal(price), seconds,
                                 money.seconds_between(period_start, period_end))


def test_attach_charges_the_rest_of_the_period_and_detach_reprices_to_the_second(client, acme):
    response = client.post("/api/v1/organizations/acme/services",
                           json={"product": "ipv4", "quantity": 2, "resource": "ip-1"}, headers=HEADERS)
    assert response.status_code == 201
    service = response.get_json()
    attached_at = datetime.fromisoformat(service["attached_at"])
    invoice = current(client)
    assert invoice["total"] == expected_charge(invoice, attached_at, quantity="2") > 0
    assert invoice["items"][0]["resource"] == "ip-1"

    response = client.delete(f"/api/v1/organizations/acme/services/{service['id']}", headers=HEADERS)
    assert response.status_code == 200
    detached_at = datetime.fromisoformat(response.get_json()["detached_at"])
    invoice = current(client)
    assert invoice["total"] == expected_charge(invoice, attached_at, detached_at, quantity="2")
    assert invoice["has_unsynced_changes"]

    again = client.delete(f"/api/v1/organizations/acme/services/{service['id']}", headers=HEADERS)
    assert again.status_code == 200 and current(client)["total"] == invoice["total"]


def test_a_service_attached_all_period_costs_its_full_price(db, acme):
    invoice = db.session.scalar(select(Invoice))
    from portal.models import Product

    product = db.session.scalar(select(Product).where(Product.code == "ipv4"))
    attachment = attach_service(acme, product, Decimal(3), "", now=invoice.period_start)
    db.session.commit()
    db.session.refresh(invoice)
    assert invoice.total_cents == 600
    detach_service(attachment, now=invoice.period_start + (invoice.period_end - invoice.period_start) / 2)
    db.session.commit()
    db.session.refresh(invoice)
    assert invoice.total_cents == 300
    assert charge_services(invoice) == 0  # already right: charging again changes nothing


def test_quantity_change_splits_the_charge_at_that_instant(client, db, acme):
    service = client.post("/api/v1/organizations/acme/services", json={"product": "ipv4"},
                          headers=HEADERS).get_json()
    response = client.patch(f"/api/v1/organizations/acme/services/{service['id']}", json={"quantity": "3"},
                            headers=HEADERS)
    assert response.status_code == 200
    replacement = response.get_json()
    assert replacement["replaces"] == service["id"] and replacement["quantity"] == "3"
    invoice = current(client)
    assert len(invoice["items"]) == 2
    split = datetime.fromisoformat(replacement["attached_at"])
    first = expected_charge(invoice, datetime.fromisoformat(service["attached_at"]), split)
    second = expected_charge(invoice, split, quantity="3")
    assert invoice["total"] == first + second
    listed = client.get("/api/v1/organizations/acme/services", headers=HEADERS).get_json()["services"]
    assert [s["id"] for s in listed] == [replacement["id"]]


@pytest.mark.parametrize(
    "body",
    [{"product": "egress.gb"}, {"product": "nope"}, {"product": "ipv4", "quantity": 0},
     {"product": "ipv4", "quantity": "-1"}, {"product": "ipv4", "quantity": "NaN"}, {"product": "ipv4", "resource": 7}],
)
def test_bad_service_requests_are_422_and_store_nothing(client, db, acme, body):
    response = client.post("/api/v1/organizations/acme/services", json=body, headers=HEADERS)
    assert response.status_code == 422
    assert db.session.scalar(select(ServiceAttachment)) is None
    assert current(client)["total"] == 0


def test_unknown_organization_or_service_is_404(client, acme):
    assert client.post("/api/v1/organizations/nope/services", json={"product": "ipv4"},
                       headers=HEADERS).status_code == 404
    assert client.delete("/api/v1/organizations/acme/services/999", headers=HEADERS).status_code == 404


def test_services_are_charged_on_a_new_cycles_invoice(db, acme):
    from portal.billing.invoices import ensure_open_invoice
    from portal.models import Product

    invoice = db.session.scalar(select(Invoice))
    product = db.session.scalar(select(Product).where(Product.code == "ipv4"))
    attach_service(acme, product, Decimal(1), "", now=invoice.period_start + timedelta(days=3))
    invoice.status = "finalized"
    db.session.commit()
    new = ensure_open_invoice(acme, invoice.period_end + timedelta(seconds=1))
    db.session.commit()
    db.session.refresh(new)
    assert new.period_start == invoice.period_end
    assert new.total_cents == 200  # attached for the whole of the new cycle


def test_create_organization(client, db):
    body = {"slug": "initech", "name": "Initech", "email": "ap@initech.example", "cycle_anchor_day": 31}
    response = client.post("/api/v1/organizations", json=body, headers=HEADERS)
    assert response.status_code == 201
    assert response.get_json()["cycle_anchor_day"] == 31
    assert client.post("/api/v1/organizations", json=body, headers=HEADERS).status_code == 409
    invoice = client.get("/api/v1/organizations/initech/invoices/current", headers=HEADERS).get_json()
    assert invoice["status"] == "open" and invoice["currency"] == "usd"
    listed = client.get("/api/v1/organizations/initech/invoices", headers=HEADERS).get_json()["invoices"]
    assert [i["id"] for i in listed] == [invoice["id"]]


@pytest.mark.parametrize(
    "body",
    [{"slug": "Bad Slug", "name": "x", "email": "a@b.c"}, {"slug": "ok", "name": "", "email": "a@b.c"},
     {"slug": "ok", "name": "x", "email": "nope"}, {"slug": "ok", "name": "x", "email": "a@b.c", "currency": "USD"},
     {"slug": "ok", "name": "x", "email": "a@b.c", "cycle_anchor_day": 32}],
)
def test_create_organization_refuses_bad_input(client, db, body):
    response = client.post("/api/v1/organizations", json=body, headers=HEADERS)
    assert response.status_code == 422
    assert client.get("/api/v1/organizations/ok/invoices", headers=HEADERS).status_code == 404


def test_products_lists_the_catalog(client, acme):
    products = client.get("/api/v1/products", headers=HEADERS).get_json()["products"]
    assert {"code": "ipv4", "name": "IPv4", "unit": "unit", "unit_price": "200", "kind": "recurring"} in products

"""Rules held by the database itself, not only by code."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from portal.models import Invoice, InvoiceItem, Membership, ServiceAttachment, UsageEvent

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
END = datetime(2026, 12, 1, tzinfo=timezone.utc)


def _invoice(organization, status="open", start=START, end=END) -> Invoice:
    return Invoice(organization_id=organization.id, period_start=start, period_end=end, status=status)


def _fails(db, *objects) -> None:
    db.session.add_all(objects)
    with pytest.raises(IntegrityError):
        db.session.commit()
    db.session.rollback()


def test_one_open_invoice_per_organization(db, make):
    organization = make.organization()
    db.session.add(_invoice(organization))
    db.session.commit()
    _fails(db, _invoice(organization, start=END, end=END + timedelta(days=31)))


def test_closed_invoices_do_not_count_against_the_open_one(db, make):
    organization = make.organization()
    db.session.add_all([_invoice(organization, status="finalized"), _invoice(organization, status="paid"),
                        _invoice(organization)])
    db.session.commit()
    assert db.session.query(Invoice).count() == 3


def test_resent_usage_event_is_refused_by_the_database(db, make):
    organization, product = make.organization(), make.product()

    def event(sender="machines"):
        return UsageEvent(sender=sender, event_id="evt-1", organization_id=organization.id,
                          product_id=product.id, quantity=Decimal(1), occurred_at=START)

    db.session.add(event())
    db.session.commit()
    _fails(db, event())
    db.session.add(event(sender="volumes"))  # another sender's id space
    db.session.commit()


@pytest.mark.parametrize("quantity", [Decimal("-0.000000001"), Decimal(-5)])
def test_negative_usage_quantity_is_refused(db, make, quantity):
    organization, product = make.organization(), make.product()
    _fails(db, UsageEvent(sender="s", event_id="e", organization_id=organization.id, product_id=product.id,
                          quantity=quantity, occurred_at=START))


def test_negative_item_quantity_and_unknown_status_are_refused(db, make):
    organization, product = make.organization(), make.product()
    invoice = _invoice(organization)
    db.session.add(invoice)
    db.session.commit()
    _fails(db, InvoiceItem(invoice_id=invoice.id, product_id=product.id, line_key="k", description="d",
                           quantity=Decimal(-1), unit_price=Decimal(1), amount_cents=-1))
    _fails(db, _invoice(organization, status="draft", start=END, end=END + timedelta(days=1)))


def test_item_line_key_is_unique_per_invoice(db, make):
    organization, product = make.organization(), make.product()
    invoice = _invoice(organization)
    db.session.add(invoice)
    db.session.commit()

    def item():
        return InvoiceItem(invoice_id=invoice.id, product_id=product.id, line_key="p|r|", description="d",
                           quantity=Decimal(1), unit_price=Decimal(1), amount_cents=1)

    db.session.add(item())
    db.session.commit()
    _fails(db, item())


def test_foreign_keys_are_enforced(db, make):
    product = make.product()
    _fails(db, UsageEvent(sender="s", event_id="e", organization_id=999_999, product_id=product.id,
                          quantity=Decimal(1), occurred_at=START))


def test_empty_period_and_detach_before_attach_are_refused(db, make):
    organization, product = make.organization(), make.product(kind="recurring")
    _fails(db, _invoice(organization, start=END, end=START))
    _fails(db, ServiceAttachment(organization_id=organization.id, product_id=product.id, quantity=Decimal(1),
                                 attached_at=END, detached_at=START))


def test_membership_role_is_known(db, make):
    organization, user = make.organization(), make.user()
    _fails(db, Membership(user_id=user.id, organization_id=organization.id, role="admin"))


def test_amounts_are_integer_cents_and_quantities_exact_decimals(db, make):
    organization, product = make.organization(), make.product(unit_price="0.0011")
    invoice = _invoice(organization)
    db.session.add(invoice)
    db.session.commit()
    db.session.add(InvoiceItem(invoice_id=invoice.id, product_id=product.id, line_key="k", description="d",
                               quantity=Decimal("123456789.123456789"), unit_price=product.unit_price,
                               amount_cents=135802))
    db.session.commit()
    db.session.expire_all()
    item = db.session.query(InvoiceItem).one()
    assert item.quantity == Decimal("123456789.123456789")
    assert item.unit_price == Decimal("0.0011")
    assert isinstance(item.amount_cents, int)
    db.session.rollback()  # end the read transaction before inspecting on another connection
    columns = {c["name"]: c for c in inspect(db.engine).get_columns("invoice_items")}
    assert "INT" in str(columns["amount_cents"]["type"]).upper()


def test_indexes_for_the_open_invoice_and_unsynced_invoices_exist(db):
    names = {index["name"] for index in inspect(db.engine).get_indexes("invoices")}
    assert {"uq_invoices_one_open_per_org", "ix_invoices_unsynced", "ix_invoices_org_period"} <= names
    item_indexes = {index["name"] for index in inspect(db.engine).get_indexes("invoice_items")}
    assert "ix_invoice_items_invoice_id" in item_indexes


def test_times_come_back_as_utc_aware(db, make):
    organization = make.organization()
    invoice = _invoice(organization)
    db.session.add(invoice)
    db.session.commit()
    db.session.expire_all()
    assert db.session.get(Invoice, invoice.id).period_start == START
    assert db.session.get(Invoice, invoice.id).period_start.tzinfo is not None

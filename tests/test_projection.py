"""The projected end-of-period total: run rate of the last days plus the services' known cost."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from portal import money
from portal.billing.credits import add_credit
from portal.billing.projection import project
from portal.billing.services import attach_service, detach_service
from portal.billing.usage import ingest_usage

START = datetime(2026, 3, 1, tzinfo=timezone.utc)  # a 31-day cycle
END = datetime(2026, 4, 1, tzinfo=timezone.utc)


@pytest.fixture
def acme(make):
    organization = make.organization(slug="acme", cycle_anchor_day=1, created_at=START - timedelta(days=40))
    make.product("egress.gb", unit_price="10")  # 10 cents a GB
    make.product("ipv4", unit_price="200", kind="recurring", name="IPv4")  # $2 a cycle
    invoice = make.open_invoice(organization, at=START)
    return organization, invoice


def usage(db, events, now):
    ingest_usage("test", [{"id": f"e-{i}-{at.isoformat()}", "organization": "acme", "product": "egress.gb",
                           "quantity": quantity, "occurred_at": at.isoformat()} for i, (at, quantity) in
                          enumerate(events)], now=now)
    db.session.commit()


def test_run_rate_of_the_last_seven_days_is_carried_to_the_period_end(db, acme):
    _, invoice = acme
    now = START + timedelta(days=10)
    # Days 0-2 are outside the last seven days: they are in the total, not in the rate.
    usage(db, [(START + timedelta(days=1), "1000"), (now - timedelta(days=6), "70"), (now - timedelta(hours=1), "70")],
          now)
    db.session.refresh(invoice)
    assert invoice.total_cents == 11_400
    projection = project(invoice, now)
    # 140 GB x 10 cents over 7 days = 200 cents a day, for 21 days left.
    assert projection.usage_remaining_cents == 4_200
    assert projection.services_remaining_cents == 0
    assert projection.so_far_cents == 11_400
    assert projection.total_cents == 15_600
    assert projection.basis_days == Decimal("7.00")
    assert projection.explanation.startswith("Usage of the last 7 days continued to the end of the period")


def test_attached_services_count_once_for_the_rest_of_the_period(db, acme):
    organization, invoice = acme
    from portal.models import Product

    ipv4 = db.session.query(Product).filter_by(code="ipv4").one()
    attach_service(organization, ipv4, Decimal(3), "ip-1", now=START + timedelta(days=1))
    db.session.commit()
    now = START + timedelta(days=11)
    db.session.refresh(invoice)
    projection = project(invoice, now)
    cycle = money.seconds_between(START, END)
    attached = money.seconds_between(START + timedelta(days=1), END)
    whole = money.prorated_amount(Decimal(3), Decimal(200), attached, cycle)
    accrued = money.prorated_amount(Decimal(3), Decimal(200), 10 * 86_400, cycle)
    assert invoice.total_cents == whole  # the invoice already charges it to the period's end
    assert projection.services_remaining_cents == whole - accrued == 387
    assert projection.so_far_cents == accrued
    assert projection.total_cents == whole  # no usage: the services' charge, counted once
    assert projection.usage_remaining_cents == 0


def test_a_detached_service_has_nothing_left_to_cost(db, acme):
    organization, invoice = acme
    from portal.models import Product

    ipv4 = db.session.query(Product).filter_by(code="ipv4").one()
    attachment = attach_service(organization, ipv4, Decimal(1), "", now=START + timedelta(days=1))
    db.session.commit()
    detach_service(attachment, now=START + timedelta(days=2))
    db.session.commit()
    db.session.refresh(invoice)
    projection = project(invoice, START + timedelta(days=5))
    assert projection.services_remaining_cents == 0
    assert projection.total_cents == invoice.total_cents > 0


def test_first_instant_of_the_period_projects_only_what_is_known(db, acme):
    _, invoice = acme
    projection = project(invoice, START)
    assert projection.basis_seconds == 0
    assert projection.usage_remaining_cents == 0
    assert projection.total_cents == 0
    assert "just begun" in projection.explanation


def test_first_hour_extrapolates_from_the_hour_and_says_so(db, acme):
    _, invoice = acme
    now = START + timedelta(hours=1)
    usage(db, [(START + timedelta(minutes=30), "1")], now)
    db.session.refresh(invoice)
    projection = project(invoice, now)
    # 10 cents in one hour, for the 743 hours left.
    assert projection.usage_remaining_cents == 7_430
    assert projection.total_cents == 7_440
    assert projection.basis_days == Decimal("0.04")
    assert "last hour" in projection.explanation


def test_after_the_period_end_the_projection_is_the_total(db, acme):
    _, invoice = acme
    usage(db, [(START + timedelta(days=30), "5")], START + timedelta(days=30, hours=1))
    db.session.refresh(invoice)
    projection = project(invoice, END + timedelta(days=2))
    assert projection.period_over
    assert projection.usage_remaining_cents == projection.services_remaining_cents == 0
    assert projection.total_cents == invoice.total_cents == 50
    assert projection.explanation == "The period is over: this is the invoice's total."


def test_credits_lower_the_projection_and_are_named(db, acme):
    organization, invoice = acme
    now = START + timedelta(days=2)
    usage(db, [(START + timedelta(days=1), "100")], now)  # $10 over two days
    add_credit(organization, "50.00", "goodwill")
    db.session.commit()
    db.session.refresh(invoice)
    projection = project(invoice, now)
    assert projection.credits_cents == -5_000
    assert projection.usage_remaining_cents == 500 * 29
    assert projection.total_cents == 1_000 - 5_000 + 14_500
    assert "Credits of $50.00 are taken off." in projection.explanation


def test_projection_reads_only_usage_of_its_organization(db, acme, make):
    _, invoice = acme
    other = make.organization(slug="other", cycle_anchor_day=1, created_at=START - timedelta(days=40))
    make.open_invoice(other, at=START)
    now = START + timedelta(days=3)
    ingest_usage("test", [{"id": "o-1", "organization": "other", "product": "egress.gb", "quantity": "999",
                           "occurred_at": (START + timedelta(days=1)).isoformat()}], now=now)
    db.session.commit()
    assert project(invoice, now).total_cents == 0

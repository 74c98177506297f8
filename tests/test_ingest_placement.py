"""Ingestion details the fast path must keep: placement against a long invoice history,
items that exist already beside new ones, and one change_seq bump per batch."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from portal.billing.cycles import cycle_containing, next_cycle_start
from portal.models import Invoice, InvoiceItem
from tests.api_helpers import HEADERS, event, post_usage, stamp


def _items(client, slug="acme"):
    response = client.get(f"/api/v1/organizations/{slug}/invoices/current", headers=HEADERS)
    assert response.status_code == 200
    return response.get_json()


def test_late_usage_spanning_a_long_history_is_labelled_with_each_closed_period(app, client, db, make, monkeypatch):
    now = datetime.now(timezone.utc)
    # Usage two years late is refused by default (USAGE_LOOKBACK_DAYS, 35): this test
    # is about placement against a long history, so it looks back far enough, for an
    # organization that existed then.
    monkeypatch.setitem(app.config, "USAGE_LOOKBACK_DAYS", 3 * 366)
    organization = make.organization(slug="acme", created_at=now - timedelta(days=3 * 366))
    make.product("egress.gb", unit_price="200")
    start, _ = cycle_containing(now, 1)
    # Two years of closed invoices before the open one.
    periods = []
    for _ in range(24):
        previous, _ = cycle_containing(start - timedelta(seconds=1), 1)
        periods.append((previous, start))
        start = previous
    for period_start, period_end in periods:
        db.session.add(Invoice(organization_id=organization.id, period_start=period_start,
                               period_end=period_end, status="paid"))
    db.session.commit()
    make.open_invoice(organization)
    # Older than any invoice: labelled with the cycle it fell in.
    ancient = periods[-1][0] - timedelta(days=40)
    ancient_cycle = cycle_containing(ancient, 1)
    response = post_usage(client, [
        event("recent-late", "acme", "egress.gb", "1", occurred_at=stamp(periods[0][0] + timedelta(days=3))),
        event("old-late", "acme", "egress.gb", "2", occurred_at=stamp(periods[10][0] + timedelta(hours=5))),
        event("ancient", "acme", "egress.gb", "4", occurred_at=stamp(ancient)),
        event("now", "acme", "egress.gb", "8", occurred_at=stamp(now)),
    ])
    assert response.get_json() == {"accepted": 4, "duplicates": 0}
    invoice = _items(client)
    by_period = {(i["period"]["start"], i["period"]["end"]) if i["period"] else None: i for i in invoice["items"]}
    assert by_period[None]["amount"] == 1600
    assert by_period[(stamp(periods[0][0]), stamp(periods[0][1]))]["amount"] == 200
    assert by_period[(stamp(periods[10][0]), stamp(periods[10][1]))]["amount"] == 400
    assert by_period[(stamp(ancient_cycle[0]), stamp(ancient_cycle[1]))]["amount"] == 800
    assert next_cycle_start(ancient_cycle[0], 1) == ancient_cycle[1]
    assert invoice["total"] == 3000 == sum(i["amount"] for i in invoice["items"])
    closed = db.session.scalars(select(Invoice).where(Invoice.status == "paid")).all()
    assert len(closed) == len(periods) == 24  # late usage went to the open invoice, never to a closed one
    assert all(i.total_cents == 0 and not i.items for i in closed)


def test_batches_add_to_existing_items_and_create_new_ones_together(client, db, make):
    organization = make.organization(slug="acme")
    make.product("egress.gb", unit_price="200")
    make.product("machines.cpu", unit_price="0.0011")
    make.open_invoice(organization)
    first = event("a1", "acme", "egress.gb", "1.5", resource="r1")
    assert post_usage(client, [first]).status_code == 200
    seq = db.session.scalar(select(Invoice.change_seq))
    response = post_usage(client, [
        event("b1", "acme", "egress.gb", "0.25", resource="r1"),   # existing item
        event("b2", "acme", "machines.cpu", "1000", resource="vm"),  # new item: 1.1 cents
        event("b3", "acme", "egress.gb", "0.25", resource="r1"),   # same existing item again
        first,                                                       # duplicate of the first batch
    ])
    assert response.get_json() == {"accepted": 3, "duplicates": 1}
    db.session.expire_all()
    items = {(i.resource, i.product.code): i for i in db.session.scalars(select(InvoiceItem))}
    assert items[("r1", "egress.gb")].quantity == 2 and items[("r1", "egress.gb")].amount_cents == 400
    assert items[("r1", "egress.gb")].version == 3
    assert items[("vm", "machines.cpu")].amount_cents == 1 and items[("vm", "machines.cpu")].version == 2
    invoice = db.session.scalar(select(Invoice))
    assert invoice.total_cents == 401  # 400 + 1.1 cents rounded once
    assert invoice.change_seq == seq + 1

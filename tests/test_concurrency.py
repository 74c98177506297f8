"""Several API processes ingesting overlapping batches at once lose no update."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import requests
from sqlalchemy import select

from portal.models import Invoice, InvoiceItem, UsageEvent
from tests.api_helpers import HEADERS, event


def test_parallel_overlapping_batches_lose_no_update(live_server, db, make):
    organization = make.organization(slug="acme")
    make.product("machines.cpu", unit_price="0.0011")
    make.product("egress.gb", unit_price="200")
    make.open_invoice(organization)
    rng = random.Random(7)
    events = [
        event(f"e{i}", "acme", rng.choice(["machines.cpu", "egress.gb"]), str(rng.randint(1, 5000) / 100),
              resource=rng.choice(["vm-1", "vm-2", "vm-3"]))
        for i in range(2400)
    ]
    # Every event is sent twice, by different clients, in shuffled batches of 100.
    copies = events + events
    rng.shuffle(copies)
    batches = [copies[i:i + 100] for i in range(0, len(copies), 100)]

    def send(batch):
        response = requests.post(live_server.url + "/api/v1/usage", json={"events": batch}, headers=HEADERS,
                                 timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, batches))
    assert sum(r["accepted"] for r in results) == len(events)
    assert sum(r["duplicates"] for r in results) == len(events)

    db.session.expire_all()
    expected: dict[tuple[str, str], Decimal] = {}
    for e in events:
        key = (e["product"], e["resource"])
        expected[key] = expected.get(key, Decimal(0)) + Decimal(e["quantity"])
    items = db.session.scalars(select(InvoiceItem)).all()
    assert {(i.product.code, i.resource): i.quantity for i in items} == expected
    invoice = db.session.scalar(select(Invoice))
    assert invoice.total_cents == sum(i.amount_cents for i in items)
    from portal import money

    for item in items:
        assert item.amount_cents == money.line_amount(item.quantity, item.unit_price)
    assert len(db.session.scalars(select(UsageEvent.id)).all()) == len(events)


def test_two_processes_adding_one_a_hundred_times_make_two_hundred(live_server, db, make):
    organization = make.organization(slug="acme")
    make.product("egress.gb", unit_price="200")
    make.open_invoice(organization)

    def send(worker: int):
        for n in range(100):
            response = requests.post(live_server.url + "/api/v1/usage", headers=HEADERS, timeout=30,
                                     json={"events": [event(f"w{worker}-{n}", "acme", "egress.gb", "1")]})
            assert response.status_code == 200, response.text

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(send, [1, 2]))
    db.session.expire_all()
    item = db.session.scalar(select(InvoiceItem))
    assert item.quantity == 200 and item.amount_cents == 40000
    assert db.session.scalar(select(Invoice.total_cents)) == 40000

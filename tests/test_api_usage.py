"""Usage in through the API: pricing, placement, dedupe, and bad input."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from portal.models import Invoice, InvoiceItem, UsageEvent
from tests.api_helpers import HEADERS, event, post_usage, stamp


@pytest.fixture
def acme(make):
    organization = make.organization(slug="acme")
    make.product("machines.cpu", unit_price="0.0011", name="CPU")
    make.product("egress.gb", unit_price="200", name="Egress")
    make.product("ipv4", unit_price="200", kind="recurring")
    make.open_invoice(organization)
    return organization


def current(client, slug="acme"):
    response = client.get(f"/api/v1/organizations/{slug}/invoices/current", headers=HEADERS)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def count(db, model) -> int:
    return db.session.scalar(select(func.count()).select_from(model))


def test_usage_is_priced_into_one_item_per_product_and_resource(client, acme):
    response = post_usage(client, [
        event("e1", "acme", "machines.cpu", "1000000", resource="vm-1"),
        event("e2", "acme", "machines.cpu", "728000", resource="vm-1"),
        event("e3", "acme", "machines.cpu", "10", resource="vm-2"),
        event("e4", "acme", "egress.gb", "1.25"),
    ])
    assert response.status_code == 200
    assert response.get_json() == {"accepted": 4, "duplicates": 0}
    invoice = current(client)
    items = {(i["product"], i["resource"]): i for i in invoice["items"]}
    assert items[("machines.cpu", "vm-1")]["quantity"] == "1728000"
    assert items[("machines.cpu", "vm-1")]["amount"] == 1901  # 1900.8 cents, rounded once
    assert items[("machines.cpu", "vm-2")]["amount"] == 0  # 0.011 cents
    assert items[("egress.gb", "")]["amount"] == 250
    assert invoice["total"] == 1901 + 0 + 250 == sum(i["amount"] for i in invoice["items"])
    assert invoice["has_unsynced_changes"] is True


def test_resent_usage_event_changes_nothing(client, db, acme):
    batch = [event("e1", "acme", "egress.gb", "10")]
    assert post_usage(client, batch).get_json() == {"accepted": 1, "duplicates": 0}
    before = current(client)
    seq = db.session.scalar(select(Invoice.change_seq))
    assert post_usage(client, batch).get_json() == {"accepted": 0, "duplicates": 1}
    assert current(client)["total"] == before["total"] == 2000
    db.session.expire_all()
    assert db.session.scalar(select(Invoice.change_seq)) == seq
    assert count(db, UsageEvent) == 1


def test_a_repeated_id_inside_one_batch_counts_once(client, acme):
    same = event("e1", "acme", "egress.gb", "1")  # one timestamp: a resend repeats the event unchanged
    result = post_usage(client, [same, dict(same)])
    assert result.get_json() == {"accepted": 1, "duplicates": 1}
    assert current(client)["total"] == 200


def test_event_ids_are_scoped_per_sender(app, client, monkeypatch, acme):
    monkeypatch.setitem(app.config, "PORTAL_API_TOKENS", ["machines:tok-a", "volumes:tok-b"])
    for token in ("tok-a", "tok-b"):
        response = post_usage(client, [event("same-id", "acme", "egress.gb", "1")],
                              headers={"Authorization": f"Bearer {token}"})
        assert response.get_json() == {"accepted": 1, "duplicates": 0}


def test_a_rejected_batch_can_be_resent_and_counts_once(client, db, acme):
    good = event("e1", "acme", "egress.gb", "1")
    bad = event("e2", "acme", "egress.gb", "-1")
    assert post_usage(client, [good, bad]).status_code == 422
    assert count(db, UsageEvent) == 0
    fixed = event("e2", "acme", "egress.gb", "1")
    assert post_usage(client, [good, fixed]).get_json() == {"accepted": 2, "duplicates": 0}
    assert current(client)["total"] == 400


@pytest.mark.parametrize(
    ("bad_event", "message"),
    [
        ({"organization": "nope"}, "unknown organization"),
        ({"product": "nope"}, "unknown product"),
        ({"product": "ipv4"}, "recurring service"),
        ({"quantity": "-1"}, "negative"),
        ({"quantity": "NaN"}, "finite"),
        ({"quantity": "Infinity"}, "finite"),
        ({"quantity": "1" + "0" * 30}, "larger than"),  # "1e30" is refused by the decimal grammar
        ({"quantity": "1000000001"}, "larger than"),  # USAGE_MAX_QUANTITY, 1e9 by default
        ({"quantity": True}, "decimal"),
        ({"occurred_at": "2026-11-25 10:00"}, "RFC 3339"),
        ({"occurred_at": "2026-11-25T10:00:00"}, "RFC 3339"),  # no offset
        ({"occurred_at": "yesterday"}, "RFC 3339"),
        ({"occurred_at": "2026-13-45T10:00:00Z"}, "RFC 3339"),
        ({"occurred_at": stamp(datetime.now(timezone.utc) + timedelta(hours=1))}, "future"),
        ({"id": ""}, "id must be"),
        ({"id": 5}, "id must be"),
        ({"id": "x" * 256}, "id must be"),
        ({"resource": 5}, "resource"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_bad_event_rejects_the_whole_batch_naming_it_by_index(client, db, acme, bad_event, message):
    events = [event("ok-1", "acme", "egress.gb", "1"), {**event("bad", "acme", "egress.gb", "1"), **bad_event}]
    response = post_usage(client, events)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "invalid_events"
    assert [p["index"] for p in error["details"]] == [1]
    assert message in " ".join(error["details"][0]["errors"])
    assert count(db, UsageEvent) == 0 and count(db, InvoiceItem) == 0


def test_each_bad_event_is_named(client, acme):
    events = [event("a", "acme", "egress.gb", "-1"), event("b", "acme", "egress.gb", "1"),
              event("c", "nope", "egress.gb", "1"), "not an object"]
    details = post_usage(client, events).get_json()["error"]["details"]
    assert [p["index"] for p in details] == [0, 2, 3]


def test_malformed_json_is_400(client, db, acme):
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"events": [{"quantity": NaN}]}'):
        response = client.post("/api/v1/usage", data=body, headers={**HEADERS, "Content-Type": "application/json"})
        assert response.status_code == 400, body
        assert response.get_json()["error"]["code"] == "invalid_json"
    assert count(db, UsageEvent) == 0


def test_events_must_be_a_list(client, acme):
    response = client.post("/api/v1/usage", json={"events": {"id": 1}}, headers=HEADERS)
    assert response.status_code == 422


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="},
                                     {"Authorization": "Bearer "}])
def test_missing_or_wrong_token_is_401(client, db, acme, headers):
    response = post_usage(client, [event("e1", "acme", "egress.gb", "1")], headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert count(db, UsageEvent) == 0


def test_batch_over_5000_events_is_413(client, db, acme):
    events = [event(f"e{i}", "acme", "egress.gb", "1") for i in range(5001)]
    response = post_usage(client, events)
    assert response.status_code == 413
    assert count(db, UsageEvent) == 0
    assert post_usage(client, events[:5000]).get_json() == {"accepted": 5000, "duplicates": 0}


def test_late_usage_for_a_closed_period_lands_on_the_open_invoice_labelled(client, db, make, acme):
    now = datetime.now(timezone.utc)
    acme.created_at = now - timedelta(days=90)  # a customer since before the closed period: its usage counts
    open_invoice = db.session.scalar(select(Invoice).where(Invoice.status == "open"))
    previous_start = open_invoice.period_start - timedelta(days=30)
    db.session.add(Invoice(organization_id=acme.id, period_start=previous_start,
                           period_end=open_invoice.period_start, status="finalized"))
    db.session.commit()
    late = stamp(open_invoice.period_start - timedelta(days=2))
    response = post_usage(client, [event("late", "acme", "egress.gb", "3", occurred_at=late),
                                   event("now", "acme", "egress.gb", "1", occurred_at=stamp(now))])
    assert response.get_json() == {"accepted": 2, "duplicates": 0}
    items = current(client)["items"]
    late_item = next(i for i in items if i["period"])
    assert late_item["amount"] == 600 and "usage of" in late_item["description"]
    assert late_item["period"]["end"] == stamp(open_invoice.period_start)
    assert next(i for i in items if not i["period"])["amount"] == 200
    finalized = db.session.scalar(select(Invoice).where(Invoice.status == "finalized"))
    assert finalized.total_cents == 0 and not finalized.items


def test_usage_after_the_open_period_waits_for_the_next_invoice(client, db, acme):
    invoice = db.session.scalar(select(Invoice).where(Invoice.status == "open"))
    # Move the open cycle into the past: its period has ended but it has not been closed.
    invoice.period_start -= timedelta(days=62)
    invoice.period_end = datetime.now(timezone.utc) - timedelta(hours=1)
    db.session.commit()
    response = post_usage(client, [event("after", "acme", "egress.gb", "5")])
    assert response.get_json() == {"accepted": 1, "duplicates": 0}
    assert current(client)["total"] == 0
    db.session.expire_all()
    pending = db.session.scalar(select(UsageEvent))
    assert pending.invoice_id is None
    # The next invoice prices it when it opens.
    from portal.billing.invoices import ensure_open_invoice

    invoice = db.session.get(Invoice, invoice.id)
    invoice.status = "finalized"
    db.session.commit()
    new = ensure_open_invoice(acme)
    db.session.commit()
    db.session.refresh(new)
    assert new.total_cents == 1000
    assert db.session.get(UsageEvent, pending.id).invoice_id == new.id


def test_decimal_quantities_are_exact(client, acme):
    events = [event(f"e{i}", "acme", "machines.cpu", "0.1") for i in range(10)]
    post_usage(client, events)
    item = current(client)["items"][0]
    assert Decimal(item["quantity"]) == Decimal("1")


def test_usage_for_an_organization_without_an_invoice_opens_one(client, db, make):
    make.organization(slug="fresh")
    make.product("egress.gb", unit_price="200")
    assert post_usage(client, [event("e1", "fresh", "egress.gb", "1")]).status_code == 200
    assert current(client, "fresh")["total"] == 200


def test_quantities_are_never_added_to_an_invoice_that_left_open(db, acme):
    # Ingestion places events on the open invoice before it locks it; if a close
    # claimed the invoice in between, the write is refused and the batch placed again.
    from portal.billing.pricing import InvoiceNoLongerOpen, ItemDelta, add_quantities
    from portal.models import Product

    invoice = db.session.scalar(select(Invoice).where(Invoice.status == "open"))
    egress = db.session.scalar(select(Product).where(Product.code == "egress.gb"))
    invoice.status = "closing"
    db.session.commit()
    with pytest.raises(InvoiceNoLongerOpen):
        add_quantities([ItemDelta(invoice.id, egress, "", Decimal(1))])
    db.session.rollback()
    assert db.session.get(Invoice, invoice.id).total_cents == 0
    assert count(db, InvoiceItem) == 0

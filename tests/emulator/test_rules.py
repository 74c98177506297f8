"""Stripe's invoicing rules."""

import urllib.request
from decimal import Decimal

import pytest
import stripe


def _item(client, customer, invoice=None, **kw):
    params = {"customer": customer.id, **kw}
    if invoice is not None:
        params["invoice"] = invoice.id
    return client.v1.invoice_items.create(params)


def test_totals_recomputed_on_every_item_change(client, customer, draft):
    a = _item(client, customer, draft, amount=1000)
    b = _item(client, customer, draft, amount=-250, description="credit")
    inv = client.v1.invoices.retrieve(draft.id)
    assert (inv.subtotal, inv.total, inv.amount_due, inv.amount_remaining) == (750, 750, 750, 750)
    assert b.discountable is False and a.discountable is True
    client.v1.invoice_items.update(a.id, {"amount": 2000})
    assert client.v1.invoices.retrieve(draft.id).total == 1750
    client.v1.invoice_items.delete(b.id)
    inv = client.v1.invoices.retrieve(draft.id)
    assert inv.total == 2000 and [line.amount for line in inv.lines.data] == [2000]


def test_decimal_quantities_and_amounts(client, customer, draft):
    it = _item(client, customer, draft, unit_amount_decimal="0.125", quantity=1000)
    assert it.amount == 125 and it.quantity == 1000 and it.pricing.unit_amount_decimal == Decimal("0.125")
    it2 = _item(client, customer, draft, unit_amount_decimal="33.3333", quantity_decimal="1.5")
    assert it2.amount == 50 and Decimal(it2.quantity_decimal) == Decimal("1.5")
    it3 = _item(client, customer, draft, unit_amount_decimal="10", quantity=3)
    it3 = client.v1.invoice_items.update(it3.id, {"quantity": 5})
    assert it3.amount == 50 and it3.quantity == 5
    assert client.v1.invoices.retrieve(draft.id).total == 125 + 50 + 50
    with pytest.raises(stripe.InvalidRequestError) as ei:
        _item(client, customer, draft, amount=5, unit_amount_decimal="5")
    assert "only specify one" in ei.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as ei:
        _item(client, customer, draft, amount=5, quantity=2)  # amount is a total: no quantity with it
    assert ei.value.param == "quantity" and "amount, quantity" in ei.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as ei:
        _item(client, customer, draft, unit_amount_decimal="5", quantity=-1)
    assert ei.value.param == "quantity"
    flat = _item(client, customer, draft, amount=700)
    assert flat.quantity == 1 and flat.pricing.unit_amount_decimal == Decimal("700")
    assert client.v1.invoice_items.update(flat.id, {"quantity": 3}).amount == 2100


def test_at_most_250_items_per_invoice(client, customer, draft):
    for _ in range(5):
        client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1} for _ in range(50)]})
    assert client.v1.invoices.retrieve(draft.id).total == 250
    with pytest.raises(stripe.InvalidRequestError) as ei:
        _item(client, customer, draft, amount=1)
    assert "250" in ei.value.user_message
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1}]})
    assert client.v1.invoices.retrieve(draft.id).total == 250


def test_finalized_invoice_refuses_item_edits(client, customer, draft):
    it = _item(client, customer, draft, amount=1000)
    inv = client.v1.invoices.finalize_invoice(draft.id)
    assert inv.status == "open" and inv.number and inv.status_transitions.finalized_at
    line_id = inv.lines.data[0].id
    attempts = [
        lambda: _item(client, customer, draft, amount=5),
        lambda: client.v1.invoice_items.update(it.id, {"amount": 5}),
        lambda: client.v1.invoice_items.delete(it.id),
        lambda: client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 5}]}),
        lambda: client.v1.invoices.update_lines(draft.id, {"lines": [{"id": line_id, "amount": 5}]}),
        lambda: client.v1.invoices.remove_lines(draft.id, {"lines": [{"id": line_id, "behavior": "delete"}]}),
        lambda: client.v1.invoices.line_items.update(draft.id, line_id, {"amount": 5}),
        lambda: client.v1.invoices.update(draft.id, {"automatically_finalizes_at": 2_000_000_000}),
    ]
    for attempt in attempts:
        with pytest.raises(stripe.InvalidRequestError) as ei:
            attempt()
        assert ei.value.http_status == 400 and ei.value.error.type == "invalid_request_error"
        assert ei.value.code == "invoice_not_editable"
    after = client.v1.invoices.retrieve(draft.id)
    assert after.total == 1000 and len(after.lines.data) == 1
    # metadata may still change after finalization
    assert client.v1.invoices.update(draft.id, {"metadata": {"k": "v"}}).metadata["k"] == "v"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.finalize_invoice(draft.id)


def test_finalization_assigns_number_and_serves_urls(client, customer, draft, emulator):
    _item(client, customer, draft, amount=4200, description="Compute hours")
    inv = client.v1.invoices.finalize_invoice(draft.id)
    inv2 = client.v1.invoices.create({"customer": customer.id})
    _item(client, customer, inv2, amount=1)
    inv2 = client.v1.invoices.finalize_invoice(inv2.id)
    prefix = client.v1.customers.retrieve(customer.id).invoice_prefix
    assert inv.number == f"{prefix}-0001" and inv2.number == f"{prefix}-0002"
    page = urllib.request.urlopen(inv.hosted_invoice_url).read().decode()
    assert inv.number in page and "Compute hours" in page and "42.00" in page
    pdf = urllib.request.urlopen(inv.invoice_pdf)
    body = pdf.read()
    assert pdf.headers["Content-Type"] == "application/pdf"
    assert body.startswith(b"%PDF-1.4") and body.rstrip().endswith(b"%%EOF") and b"startxref" in body


def test_pending_invoice_items_behavior(client, customer):
    p1 = _item(client, customer, amount=100)
    p2 = _item(client, customer, amount=200)
    excl = client.v1.invoices.create({"customer": customer.id, "pending_invoice_items_behavior": "exclude"})
    assert excl.total == 0 and client.v1.invoice_items.retrieve(p1.id).invoice is None
    default = client.v1.invoices.create({"customer": customer.id})
    assert default.total == 0  # exclude is the default
    incl = client.v1.invoices.create({"customer": customer.id, "pending_invoice_items_behavior": "include"})
    assert incl.total == 300
    assert [line.parent.invoice_item_details.invoice_item for line in incl.lines.data] == [p1.id, p2.id]
    assert client.v1.invoice_items.retrieve(p2.id).invoice == incl.id
    assert client.v1.invoice_items.list({"pending": True}).data == []


# Stripe docs: "Schedule invoice finalization" (https://docs.stripe.com/invoicing/scheduled-finalization):
# a finalization time needs auto_advance; "Automatic invoice advancement"
# (https://docs.stripe.com/invoicing/integration/automatic-advancement-collection): auto-advancing drafts are
# finalized about an hour after creation and payment is attempted about an hour later.
def test_auto_finalize_by_clock(client, customer, ctl):
    now = ctl.now()
    ignored = client.v1.invoices.create({"customer": customer.id, "automatically_finalizes_at": now + 7200})
    _item(client, customer, ignored, amount=900)
    timed = client.v1.invoices.create(
        {"customer": customer.id, "auto_advance": True, "automatically_finalizes_at": now + 7200}
    )
    _item(client, customer, timed, amount=600)
    auto = client.v1.invoices.create({"customer": customer.id, "auto_advance": True})
    _item(client, customer, auto, amount=500)
    manual = client.v1.invoices.create({"customer": customer.id, "auto_advance": False})
    _item(client, customer, manual, amount=700)
    assert ignored.automatically_finalizes_at is None and timed.automatically_finalizes_at == now + 7200
    assert auto.automatically_finalizes_at == auto.created + 3600 and manual.automatically_finalizes_at is None
    ctl.advance_clock(3700)
    a = client.v1.invoices.retrieve(auto.id)
    assert a.status == "open" and a.next_payment_attempt == auto.created + 7200  # charged an hour later
    assert client.v1.invoices.retrieve(timed.id).status == "draft"
    ctl.advance_clock(3600)
    assert client.v1.invoices.retrieve(timed.id).status == "open"
    a = client.v1.invoices.retrieve(auto.id)
    assert a.status == "open" and a.attempt_count == 1  # no payment method: the attempt failed
    for inv in (ignored, manual):
        assert client.v1.invoices.retrieve(inv.id).status == "draft"
    types = [e.type for e in client.v1.events.list({"limit": 100}).data]
    assert types.count("invoice.finalized") == 2 and "invoice.payment_failed" in types
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.create({"customer": customer.id, "automatically_finalizes_at": ctl.now() - 10})


# Stripe docs: "Pay an invoice" (https://docs.stripe.com/api/invoices/pay) and "Testing"
# (https://docs.stripe.com/testing): pm_card_visa pays; a customer made to fail gets a 402 card_error.
def test_pay_success_and_failure(client, paying_customer, ctl):
    customer = paying_customer
    inv = client.v1.invoices.create({"customer": customer.id})
    _item(client, customer, inv, amount=1500)
    client.v1.invoices.finalize_invoice(inv.id)
    paid = client.v1.invoices.pay(inv.id)
    assert paid.status == "paid" and paid.amount_paid == 1500 and paid.amount_remaining == 0
    assert paid.status_transitions.paid_at is not None
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.pay(inv.id)

    bad = client.v1.customers.create(
        {"name": "Declines", "invoice_settings": {"default_payment_method": "pm_card_visa"}}
    )
    ctl.fail_payments_for(bad.id)
    inv2 = client.v1.invoices.create({"customer": bad.id})
    _item(client, bad, inv2, amount=900)
    with pytest.raises(stripe.CardError) as ei:
        client.v1.invoices.pay(inv2.id)  # a draft is finalized, then charged
    assert ei.value.http_status == 402 and ei.value.code == "card_declined"
    assert ei.value.error.type == "card_error"
    after = client.v1.invoices.retrieve(inv2.id)
    assert after.status == "open" and after.attempt_count == 1 and after.attempted is True
    types = [e.type for e in client.v1.events.list({"type": "invoice.*", "limit": 100}).data]
    assert "invoice.payment_failed" in types and "invoice.payment_succeeded" in types
    ctl.fail_payments_for(bad.id, fail=False)
    assert client.v1.invoices.pay(inv2.id).status == "paid"


def test_void_and_uncollectible(client, customer):
    a = client.v1.invoices.create({"customer": customer.id})
    _item(client, customer, a, amount=100)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.void_invoice(a.id)  # drafts are deleted, not voided
    client.v1.invoices.finalize_invoice(a.id)
    v = client.v1.invoices.void_invoice(a.id)
    assert v.status == "void" and v.status_transitions.voided_at
    b = client.v1.invoices.create({"customer": customer.id})
    _item(client, customer, b, amount=100)
    client.v1.invoices.finalize_invoice(b.id)
    u = client.v1.invoices.mark_uncollectible(b.id)
    assert u.status == "uncollectible" and u.status_transitions.marked_uncollectible_at
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.mark_uncollectible(b.id)
    types = {e.type for e in client.v1.events.list({"limit": 100}).data}
    assert {"invoice.voided", "invoice.marked_uncollectible"} <= types


def test_credit_invoice_moves_to_customer_balance(client, customer):
    inv = client.v1.invoices.create({"customer": customer.id})
    _item(client, customer, inv, amount=-500)
    fin = client.v1.invoices.finalize_invoice(inv.id)
    assert fin.total == -500 and fin.amount_due == 0 and fin.status == "paid"
    assert fin.ending_balance == -500
    assert client.v1.customers.retrieve(customer.id).balance == -500
    nxt = client.v1.invoices.create({"customer": customer.id})
    _item(client, customer, nxt, amount=800)
    fin2 = client.v1.invoices.finalize_invoice(nxt.id)
    assert fin2.starting_balance == -500 and fin2.amount_due == 300


def test_clock_control_accepts_json_and_form(ctl, emulator):
    import json as _json

    before = ctl.now()
    req = urllib.request.Request(emulator.url + "/_emulator/clock", data=b"advance_seconds=600", method="POST")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    out = _json.loads(urllib.request.urlopen(req).read())
    assert out["now"] >= before + 600
    assert ctl.advance_clock(60)["now"] >= before + 660
    assert _json.loads(urllib.request.urlopen(emulator.url + "/_emulator/clock").read())["now"] >= before + 660


def test_timestamps_follow_the_emulated_clock(client, customer, ctl):
    ctl.advance_clock(86400 * 10)
    inv = client.v1.invoices.create({"customer": customer.id})
    assert inv.created >= customer.created + 86400 * 10

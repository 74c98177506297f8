"""A deleted customer: every write to its invoices and items refused, reads still work."""

import pytest
import stripe
from emulator_helpers import DAY, draft_with


def _refused(call, customer_id):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        call()
    e = ei.value
    assert e.http_status == 404 and e.code == "resource_missing", e.user_message
    assert e.user_message == f"No such customer: '{customer_id}'" and e.param == "customer"


# Stripe docs: "Delete a customer" (https://docs.stripe.com/api/customers/delete): deleting "prevents any
# further operations to be performed"; "deleted customers can still be retrieved through the API in order to
# be able to track their history". What happens to the deleted customer's draft invoices is not documented
# (see README "Fidelity"): the emulator keeps them and refuses every write to them.
def test_writes_concerning_a_deleted_customer_are_refused(client, customer):
    draft = draft_with(client, customer, 500)
    line_id = draft.lines.data[0].id
    item_id = draft.lines.data[0].parent.invoice_item_details.invoice_item
    pending = client.v1.invoice_items.create({"customer": customer.id, "amount": 100})
    open_inv = client.v1.invoices.finalize_invoice(draft_with(client, customer, 700).id)
    client.v1.customers.delete(customer.id)
    cid = customer.id
    calls = [
        lambda: client.v1.invoices.create({"customer": cid}),
        lambda: client.v1.invoice_items.create({"customer": cid, "amount": 1}),
        lambda: client.v1.invoice_items.create({"invoice": draft.id, "amount": 1}),
        lambda: client.v1.invoice_items.update(item_id, {"amount": 2}),
        lambda: client.v1.invoice_items.update(pending.id, {"amount": 2}),
        lambda: client.v1.invoice_items.delete(pending.id),
        lambda: client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1}]}),
        lambda: client.v1.invoices.update_lines(draft.id, {"lines": [{"id": line_id, "amount": 1}]}),
        lambda: client.v1.invoices.remove_lines(draft.id, {"lines": [{"id": line_id, "behavior": "delete"}]}),
        lambda: client.v1.invoices.line_items.update(draft.id, line_id, {"amount": 1}),
        lambda: client.v1.invoices.update(draft.id, {"metadata": {"k": "v"}}),
        lambda: client.v1.invoices.finalize_invoice(draft.id),
        lambda: client.v1.invoices.delete(draft.id),
        lambda: client.v1.invoices.pay(open_inv.id),
        lambda: client.v1.invoices.void_invoice(open_inv.id),
        lambda: client.v1.invoices.mark_uncollectible(open_inv.id),
        lambda: client.v1.payment_methods.attach("pm_card_visa", {"customer": cid}),
    ]
    for call in calls:
        _refused(call, cid)
    # reads still work
    inv = client.v1.invoices.retrieve(draft.id, {"expand": ["customer"]})
    assert inv.status == "draft" and inv.total == 500
    assert inv.customer.to_dict() == {"id": cid, "object": "customer", "deleted": True}
    assert client.v1.customers.retrieve(cid).deleted is True
    assert {i.id for i in client.v1.invoices.list({"customer": cid}).data} == {draft.id, open_inv.id}
    assert client.v1.invoice_items.retrieve(pending.id).amount == 100
    assert [line.id for line in client.v1.invoices.line_items.list(draft.id).data] == [line_id]


# Stripe docs: "Delete a customer" (https://docs.stripe.com/api/customers/delete): no further operations;
# the emulator makes no payment attempt for it (scheduled finalization: see test_scheduled_finalization).
def test_no_payment_attempt_for_a_deleted_customer(client, paying_customer, ctl):
    inv = draft_with(client, paying_customer, 900)
    fin = client.v1.invoices.finalize_invoice(inv.id, {"auto_advance": True})
    assert fin.next_payment_attempt is not None
    client.v1.customers.delete(paying_customer.id)
    ctl.advance_clock(20 * DAY)
    after = client.v1.invoices.retrieve(inv.id)
    assert after.status == "open" and after.attempt_count == 0 and after.next_payment_attempt is None
    assert client.v1.events.list({"type": "invoice.payment_failed"}).data == []

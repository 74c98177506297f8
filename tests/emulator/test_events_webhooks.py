"""Events (stored, listable) and webhooks (signed, async, retried, shuffled, duplicated)."""

import time

import pytest
import stripe
from emulator_helpers import DAY, WEBHOOK_SECRET, draft_with


def _flow(client):
    cus = client.v1.customers.create(
        {"name": "Hooks", "invoice_settings": {"default_payment_method": "pm_card_visa"}},
        {"idempotency_key": "cus-hooks"},
    )
    client.v1.customers.update(cus.id, {"name": "Hooks Inc"})
    inv = client.v1.invoices.create({"customer": cus.id})
    item = client.v1.invoice_items.create({"customer": cus.id, "invoice": inv.id, "amount": 300})
    client.v1.invoice_items.update(item.id, {"amount": 400})
    client.v1.invoices.finalize_invoice(inv.id)
    client.v1.invoices.pay(inv.id)
    return cus, inv, item


def test_events_emitted_and_listable(client):
    cus, inv, item = _flow(client)
    events = list(client.v1.events.list({"limit": 5}).auto_paging_iter())
    types = [e.type for e in reversed(events)]
    for expected in [
        "customer.created",
        "payment_method.attached",
        "customer.updated",
        "invoice.created",
        "invoiceitem.created",
        "invoice.updated",
        "invoiceitem.updated",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]:
        assert expected in types
    assert types.index("customer.created") < types.index("invoice.created") < types.index("invoice.finalized")
    upd = next(e for e in events if e.type == "customer.updated")
    assert upd.data.object.name == "Hooks Inc" and upd.data.previous_attributes.name == "Hooks"
    created = next(e for e in events if e.type == "customer.created")
    assert created.request.idempotency_key == "cus-hooks" and created.request.id.startswith("req_")
    assert created.id.startswith("evt_") and client.v1.events.retrieve(created.id).type == "customer.created"
    only = client.v1.events.list({"type": "invoiceitem.created"}).data
    assert [e.data.object.id for e in only] == [item.id]
    wild = client.v1.events.list({"type": "invoice.*", "limit": 100}).data
    assert wild and all(e.type.startswith("invoice.") for e in wild)
    assert client.v1.events.list({"created": {"gt": created.created + 10**6}}).data == []
    deleted = client.v1.customers.delete(cus.id)
    assert deleted.deleted and client.v1.events.list({"limit": 1}).data[0].type == "customer.deleted"


def test_webhooks_delivered_signed_and_verifiable(client, ctl, receiver):
    _flow(client)
    st = ctl.wait_for_webhooks()
    assert st["pending"] == 0
    listed = {e.id for e in client.v1.events.list({"limit": 100}).data}
    got = set()
    for r in receiver.received:
        assert r["signature"].startswith("t=") and ",v1=" in r["signature"]
        ev = stripe.Webhook.construct_event(r["body"].decode(), r["signature"], WEBHOOK_SECRET)
        got.add(ev.id)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(r["body"].decode(), r["signature"], "whsec_wrong")
    assert got == listed
    assert all(a["ok"] and a["attempt"] == 1 for a in st["attempts"])


def test_webhook_delivery_is_async(client, ctl, receiver):
    receiver.delay = 0.5
    t = time.perf_counter()
    for i in range(3):
        client.v1.customers.create({"name": f"c{i}"})
    assert time.perf_counter() - t < 0.4  # the API never waits for the receiver
    st = ctl.wait_for_webhooks(timeout=10)
    assert st["pending"] == 0 and len(receiver.ok_events()) == 3


def test_failed_deliveries_are_retried_with_backoff(client, ctl, receiver):
    ctl.configure_webhooks(retry_base_seconds=0.1)
    receiver.fail_next = 2
    cus = client.v1.customers.create({"name": "retry"})
    st = ctl.wait_for_webhooks()
    attempts = [a for a in st["attempts"] if a["type"] == "customer.created"]
    outcomes = [(a["attempt"], a["ok"], a["status"]) for a in attempts]
    assert outcomes == [(1, False, 500), (2, False, 500), (3, True, 200)]
    assert attempts[1]["at"] - attempts[0]["at"] >= 0.1  # backoff: 0.1 s, then 0.2 s
    assert attempts[2]["at"] - attempts[1]["at"] >= 0.2
    assert [e["data"]["object"]["id"] for e in receiver.ok_events()] == [cus.id]


def test_connection_failures_retried_then_given_up(client, ctl):
    ctl.configure_webhooks(
        url="http://127.0.0.1:9/unreachable", secret=WEBHOOK_SECRET, retry_base_seconds=0.02, max_attempts=3
    )
    client.v1.customers.create({"name": "nobody home"})
    st = ctl.wait_for_webhooks()
    assert [a["attempt"] for a in st["attempts"]] == [1, 2, 3]
    assert all(not a["ok"] and a["status"] is None and a["error"] for a in st["attempts"])


def _shuffled_order(client, ctl, receiver, seed):
    ctl.reset()
    receiver.received.clear()
    ctl.configure_webhooks(url=receiver.url, secret=WEBHOOK_SECRET, paused=True, shuffle=True, seed=seed, concurrency=1)
    names = [f"c{i}" for i in range(12)]
    for n in names:
        client.v1.customers.create({"name": n})
    time.sleep(0.1)
    assert receiver.received == [] and ctl.webhooks()["pending"] == 12  # paused
    ctl.resume_webhooks()
    ctl.wait_for_webhooks()
    return [e["data"]["object"]["name"] for e in receiver.ok_events()], names


def test_shuffled_order_deterministic_under_seed(client, ctl, receiver):
    order1, names = _shuffled_order(client, ctl, receiver, seed=7)
    order2, _ = _shuffled_order(client, ctl, receiver, seed=7)
    assert sorted(order1) == sorted(names) and order1 != names
    assert order1 == order2


def test_duplicate_delivery(client, ctl, receiver):
    ctl.configure_webhooks(duplicate_probability=1.0)
    client.v1.customers.create({"name": "twice"})
    ctl.wait_for_webhooks()
    ids = [e["id"] for e in receiver.ok_events()]
    assert len(ids) == 2 and ids[0] == ids[1]
    assert [a["duplicate"] for a in ctl.webhooks()["attempts"]] == [False, True]


def test_cli_webhook_flags(receiver):
    from emulator_helpers import make_client

    from stripe_emulator.process import start_emulator

    with start_emulator(webhook_url=receiver.url, webhook_secret=WEBHOOK_SECRET) as emu:
        make_client(emu).v1.customers.create({"name": "cli"})
        emu.control.wait_for_webhooks()
    (ev,) = receiver.ok_events()
    assert ev["type"] == "customer.created"


# Stripe docs: "Types of events" (https://docs.stripe.com/api/events/types): payment_method.attached,
# invoice.payment_failed, invoice.payment_action_required, invoice.finalization_failed,
# billing_portal.configuration.created, billing_portal.session.created are delivered like any other event;
# invoice.upcoming "Occurs X number of days before a subscription is scheduled to create an invoice" — there
# are no subscriptions here, so it never comes.
def test_new_event_types_are_delivered_and_invoice_upcoming_never_is(client, ctl, receiver):
    ctl.set_portal_default_configuration(True)
    plain = client.v1.customers.create({"name": "no card"})
    client.v1.invoices.finalize_invoice(draft_with(client, plain, 900).id, {"auto_advance": True})
    auth = client.v1.customers.create(
        {"invoice_settings": {"default_payment_method": "pm_card_authenticationRequired"}}
    )
    client.v1.invoices.finalize_invoice(draft_with(client, auth, 900).id, {"auto_advance": True})
    gone = client.v1.customers.create({"name": "gone"})
    draft_with(client, gone, 900, auto_advance=True)
    client.v1.customers.delete(gone.id)
    client.v1.billing_portal.configurations.create({"features": {"invoice_history": {"enabled": True}}})
    client.v1.billing_portal.sessions.create({"customer": plain.id})
    ctl.advance_clock(40 * DAY)
    st = ctl.wait_for_webhooks()
    assert st["pending"] == 0
    delivered = {e["type"] for e in receiver.ok_events()}
    assert {
        "payment_method.attached",
        "invoice.payment_failed",
        "invoice.payment_action_required",
        "invoice.finalization_failed",
        "billing_portal.configuration.created",
        "billing_portal.session.created",
    } <= delivered
    listed = {e.id for e in client.v1.events.list({"limit": 100}).auto_paging_iter()}
    assert listed == {e["id"] for e in receiver.ok_events()}
    assert "invoice.upcoming" not in delivered
    assert client.v1.events.list({"type": "invoice.upcoming"}).data == []

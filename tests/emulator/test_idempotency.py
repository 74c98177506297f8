"""Idempotency keys as Stripe keeps them."""

import threading
import time

import pytest
import stripe
from emulator_helpers import make_client, raw_request


def _create(client, customer, key, amount=100, **kw):
    return client.v1.invoice_items.create({"customer": customer.id, "amount": amount, **kw}, {"idempotency_key": key})


# Stripe docs: "Idempotent requests" (https://docs.stripe.com/api/idempotent_requests): the saved response is
# returned for a retry with the same key; replays carry `Idempotent-Replayed: true`.
def test_replayed_responses_carry_the_idempotent_replayed_header(emulator, customer, ctl):
    body = f"customer={customer.id}&amount=250"
    status, first_headers, first = raw_request(emulator, "POST", "/v1/invoiceitems", body, {"Idempotency-Key": "hdr-1"})
    assert status == 200 and first_headers.get("Idempotent-Replayed") in (None, "false")
    status, headers, again = raw_request(emulator, "POST", "/v1/invoiceitems", body, {"Idempotency-Key": "hdr-1"})
    assert status == 200 and headers["Idempotent-Replayed"] == "true" and again == first
    assert headers["Original-Request"] == first_headers["request-id"] != headers["request-id"]
    # a stored error is replayed with the header too
    bad = "customer=cus_missing&amount=1"
    status, h1, e1 = raw_request(emulator, "POST", "/v1/invoiceitems", bad, {"Idempotency-Key": "hdr-2"})
    status2, h2, e2 = raw_request(emulator, "POST", "/v1/invoiceitems", bad, {"Idempotency-Key": "hdr-2"})
    assert status == status2 == 404 and e1 == e2 and h2["Idempotent-Replayed"] == "true"
    assert h1.get("Idempotent-Replayed") is None
    # without a key, never
    status, headers, _ = raw_request(emulator, "POST", "/v1/invoiceitems", body)
    assert status == 200 and "Idempotent-Replayed" not in headers


# Stripe docs: "Idempotent requests" (https://docs.stripe.com/api/idempotent_requests), through the library:
# the raw response headers are on `last_response`.
def test_replay_same_params(client, customer, ctl):
    a = _create(client, customer, "item-1-v1")
    b = _create(client, customer, "item-1-v1")
    assert a.id == b.id
    assert b.last_response.headers.get("Idempotent-Replayed") == "true"
    assert a.last_response.headers.get("Idempotent-Replayed") is None
    assert len(client.v1.invoice_items.list().data) == 1
    log = ctl.requests_log(path="/v1/invoiceitems", method="POST")
    assert [r["replayed"] for r in log] == [False, True]
    assert log[0]["idempotency_key"] == "item-1-v1" and log[0]["params"]["amount"] == "100"


def test_reuse_with_other_params_is_idempotency_error(client, customer):
    _create(client, customer, "item-2-v1", amount=100)
    with pytest.raises(stripe.IdempotencyError) as ei:
        _create(client, customer, "item-2-v1", amount=200)
    assert ei.value.http_status == 400 and ei.value.error.type == "idempotency_error"
    assert len(client.v1.invoice_items.list().data) == 1


def test_keys_are_scoped_per_path(client, customer):
    _create(client, customer, "shared-key")
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create({"name": "x"}, {"idempotency_key": "shared-key"})


def test_keys_expire_after_24_emulated_hours(client, customer, ctl):
    a = _create(client, customer, "item-3-v1")
    ctl.advance_clock(23 * 3600)
    assert _create(client, customer, "item-3-v1").id == a.id
    out = ctl.advance_clock(3600 + 1)
    assert out["expired_idempotency_keys"] >= 1
    b = _create(client, customer, "item-3-v1", amount=999)  # other params: accepted as a new request
    assert b.id != a.id and b.amount == 999


def test_validation_errors_and_429_are_not_stored(client, customer, ctl):
    with pytest.raises(stripe.InvalidRequestError):
        _create(client, customer, "item-4-v1", bogus="x")
    ok = _create(client, customer, "item-4-v1")
    assert ok.amount == 100
    ctl.set_faults(rules=[{"kind": "rate_limit", "count": 1}])
    with pytest.raises(stripe.RateLimitError):
        _create(client, customer, "item-5-v1")
    again = _create(client, customer, "item-5-v1")
    assert again.last_response.headers.get("Idempotent-Replayed") is None
    assert len(client.v1.invoice_items.list().data) == 2


# Stripe docs: "Idempotent requests": Stripe saves the result "regardless of whether it succeeds or fails".
def test_card_error_is_stored_and_replayed(client, paying_customer, ctl):
    customer = paying_customer
    ctl.fail_payments_for(customer.id)
    inv = client.v1.invoices.create({"customer": customer.id})
    client.v1.invoice_items.create({"customer": customer.id, "invoice": inv.id, "amount": 500})
    client.v1.invoices.finalize_invoice(inv.id)
    for _ in range(2):
        with pytest.raises(stripe.CardError):
            client.v1.invoices.pay(inv.id, {}, {"idempotency_key": "pay-1"})
    ctl.fail_payments_for(customer.id, fail=False)
    with pytest.raises(stripe.CardError):  # still the stored answer
        client.v1.invoices.pay(inv.id, {}, {"idempotency_key": "pay-1"})
    assert client.v1.invoices.retrieve(inv.id).attempt_count == 1
    assert client.v1.invoices.pay(inv.id, {}, {"idempotency_key": "pay-2"}).status == "paid"


def test_keys_are_scoped_per_api_key(emulator, ctl):
    from stripe_emulator.process import start_emulator

    with start_emulator(extra_args=["--api-key", "sk_test_second"]) as emu:
        one, two = make_client(emu), make_client(emu, api_key="sk_test_second")
        a = one.v1.customers.create({"name": "a"}, {"idempotency_key": "same"})
        b = two.v1.customers.create({"name": "b"}, {"idempotency_key": "same"})
        assert a.id != b.id and b.name == "b"


def test_concurrent_use_of_a_key_is_409(client, customer, ctl, emulator):
    ctl.set_faults(rules=[{"kind": "latency", "latency_ms": 600, "count": 1}])
    first = {}

    def slow():
        first["item"] = _create(make_client(emulator), customer, "item-6-v1")

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 5
    while ctl.faults()["rules"][0]["fired"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the slow request has reached the emulator and holds the key
    time.sleep(0.1)
    with pytest.raises(stripe.StripeError) as ei:
        _create(client, customer, "item-6-v1")
    assert ei.value.http_status == 409
    t.join()
    assert first["item"].amount == 100
    assert len(client.v1.invoice_items.list().data) == 1

"""Fault injection: each kind, targeting, counts, probability under a seed."""

import time

import pytest
import stripe
from emulator_helpers import make_client


def _items(client):
    return client.v1.invoice_items.list({"limit": 100}).data


def test_rate_limit_probability_is_deterministic_under_seed(client, customer, ctl):
    def run():
        ctl.set_faults(seed=42, rules=[{"kind": "rate_limit", "probability": 0.5, "method": "POST"}])
        outcomes = []
        for _ in range(30):
            try:
                client.v1.invoice_items.create({"customer": customer.id, "amount": 1})
                outcomes.append("ok")
            except stripe.RateLimitError as e:
                assert e.http_status == 429 and e.error.code == "rate_limit"
                outcomes.append("429")
        return outcomes

    first, second = run(), run()
    assert first == second and 5 < first.count("429") < 25
    assert len(client.v1.invoice_items.list({"limit": 100}).data) == 2 * first.count("ok")
    ctl.set_faults()
    assert ctl.faults()["rules"] == []


def test_rate_limit_above_writes_per_second(client, customer, ctl):
    ctl.set_faults(max_writes_per_second=5)
    limited = 0
    for _ in range(12):
        try:
            client.v1.invoice_items.create({"customer": customer.id, "amount": 1})
        except stripe.RateLimitError:
            limited += 1
    assert limited >= 5
    for _ in range(10):
        client.v1.invoice_items.list()  # reads are not limited by the write limit
    time.sleep(1.05)
    client.v1.invoice_items.create({"customer": customer.id, "amount": 1})


def test_lock_timeout_sets_should_retry(client, customer, ctl, emulator):
    ctl.set_faults(rules=[{"kind": "lock_timeout", "path": "/v1/invoiceitems", "count": 1}])
    with pytest.raises(stripe.RateLimitError) as ei:
        client.v1.invoice_items.create({"customer": customer.id, "amount": 1})
    assert ei.value.error.code == "lock_timeout" and ei.value.headers.get("Stripe-Should-Retry") == "true"
    assert _items(client) == []
    # stripe-python honours Stripe-Should-Retry: with retries it goes through
    ctl.set_faults(rules=[{"kind": "lock_timeout", "path": "/v1/invoiceitems", "count": 1}])
    item = make_client(emulator, retries=2).v1.invoice_items.create({"customer": customer.id, "amount": 1})
    assert [i.id for i in _items(client)] == [item.id]


def test_500_before_change_changes_nothing(client, customer, ctl, emulator):
    ctl.set_faults(rules=[{"kind": "500_before", "method": "POST", "path": "/v1/invoiceitems", "count": 1}])
    with pytest.raises(stripe.APIError) as ei:
        client.v1.invoice_items.create({"customer": customer.id, "amount": 1}, {"idempotency_key": "k1"})
    assert ei.value.http_status == 500
    assert _items(client) == []
    # not stored: the same key runs anew
    ok = client.v1.invoice_items.create({"customer": customer.id, "amount": 1}, {"idempotency_key": "k1"})
    assert [i.id for i in _items(client)] == [ok.id]


def test_500_after_change_keeps_change_and_stores_500(client, customer, ctl):
    ctl.set_faults(rules=[{"kind": "500_after", "path": "/v1/invoiceitems", "count": 1}])
    with pytest.raises(stripe.APIError):
        client.v1.invoice_items.create(
            {"customer": customer.id, "amount": 7, "metadata": {"portal_item": "1"}}, {"idempotency_key": "k2"}
        )
    items = _items(client)
    assert len(items) == 1 and items[0].metadata["portal_item"] == "1"  # the change was made
    with pytest.raises(stripe.APIError) as ei:  # the 500 was stored for the key
        client.v1.invoice_items.create(
            {"customer": customer.id, "amount": 7, "metadata": {"portal_item": "1"}}, {"idempotency_key": "k2"}
        )
    assert ei.value.headers.get("Idempotent-Replayed") == "true"
    assert len(_items(client)) == 1


def test_connection_dropped_after_change(client, customer, ctl, emulator):
    ctl.set_faults(rules=[{"kind": "drop_after", "path": "/v1/invoiceitems", "count": 1}])
    with pytest.raises(stripe.APIConnectionError):
        client.v1.invoice_items.create({"customer": customer.id, "amount": 3}, {"idempotency_key": "k3"})
    items = _items(client)
    assert len(items) == 1
    again = client.v1.invoice_items.create({"customer": customer.id, "amount": 3}, {"idempotency_key": "k3"})
    assert again.id == items[0].id and again.last_response.headers.get("Idempotent-Replayed") == "true"
    # with library retries (its own key reused across retries) the call succeeds once
    ctl.set_faults(rules=[{"kind": "drop_after", "path": "/v1/invoiceitems", "count": 1}])
    item = make_client(emulator, retries=2).v1.invoice_items.create({"customer": customer.id, "amount": 4})
    assert sum(1 for i in _items(client) if i.amount == 4) == 1 and item.amount == 4


def test_latency_and_targeting(client, customer, ctl):
    ctl.set_faults(rules=[{"kind": "latency", "latency_ms": 300, "method": "GET", "path": "/v1/customers*"}])
    t = time.perf_counter()
    client.v1.customers.retrieve(customer.id)
    assert time.perf_counter() - t >= 0.3
    t = time.perf_counter()
    client.v1.invoice_items.create({"customer": customer.id, "amount": 1})  # not targeted
    assert time.perf_counter() - t < 0.25
    ctl.set_faults(rules=[{"kind": "500_before", "method": "POST", "path": "^/v1/invoices$", "count": 2}])
    client.v1.invoice_items.create({"customer": customer.id, "amount": 1})  # other path: unaffected
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            client.v1.invoices.create({"customer": customer.id})
    assert client.v1.invoices.create({"customer": customer.id}).status == "draft"  # count used up
    fired = ctl.faults()
    assert fired["rules"][0]["fired"] == 2 and fired["rules"][0]["count_remaining"] == 0
    assert [r["fault"] for r in ctl.requests_log(path="/v1/invoices", method="POST")][-3:] == [
        "500_before",
        "500_before",
        None,
    ]


def test_bad_fault_spec_refused(ctl):
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as ei:
        ctl.set_faults(rules=[{"kind": "explode"}])
    assert ei.value.code == 400


def test_lock_contention_on_concurrent_writes_to_one_invoice(client, customer, ctl, emulator):
    import threading

    other = client.v1.invoices.create({"customer": customer.id})
    target = client.v1.invoices.create({"customer": customer.id})
    ctl.set_faults(
        lock_contention=True,
        rules=[{"kind": "latency", "latency_ms": 700, "method": "POST", "path": "/v1/invoiceitems", "count": 1}],
    )
    done = {}

    def slow_write():
        done["item"] = make_client(emulator).v1.invoice_items.create(
            {"customer": customer.id, "invoice": target.id, "amount": 1}
        )

    t = threading.Thread(target=slow_write)
    t.start()
    deadline = time.monotonic() + 5
    while ctl.faults()["rules"][0]["fired"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(stripe.RateLimitError) as ei:
        client.v1.invoices.update(target.id, {"description": "concurrent"})
    assert ei.value.error.code == "lock_timeout"
    # another invoice is not locked
    client.v1.invoice_items.create({"customer": customer.id, "invoice": other.id, "amount": 2})
    t.join()
    assert done["item"].invoice == target.id
    # once the first write is over, the invoice can be written again
    assert client.v1.invoices.update(target.id, {"description": "later"}).description == "later"

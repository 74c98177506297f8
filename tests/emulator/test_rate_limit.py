"""Stripe's combined rate limit (reads and writes together), opt-in."""

import time

import pytest
import stripe
from emulator_helpers import make_client, raw_request


def _burst(client, customer, n):
    outcomes = []
    for i in range(n):
        try:
            if i % 2:
                client.v1.customers.retrieve(customer.id)
            else:
                client.v1.invoice_items.create({"customer": customer.id, "amount": 1})
            outcomes.append("ok")
        except stripe.RateLimitError as e:
            outcomes.append(e)
    return outcomes


# Stripe docs: "Rate limits" (https://docs.stripe.com/rate-limits): test mode allows 25 requests per
# second, reads and writes together; over the limit the answer is 429 (rate_limit).
def test_reads_and_writes_count_against_one_limit(client, customer, ctl):
    ctl.set_rate_limit(5)
    outcomes = _burst(client, customer, 12)
    assert outcomes[:5] == ["ok"] * 5
    limited = [o for o in outcomes if o != "ok"]
    assert len(limited) >= 5
    e = limited[0]
    assert e.http_status == 429 and e.error.type == "invalid_request_error" and e.error.code == "rate_limit"
    assert e.user_message.startswith("Request rate limit exceeded.")
    assert e.headers.get("Stripe-Should-Retry") is None
    assert [r["fault"] for r in ctl.requests_log() if r["status"] == 429][:1] == ["rate_limit"]
    time.sleep(1.05)
    assert client.v1.customers.retrieve(customer.id).id == customer.id
    ctl.set_rate_limit(None)
    assert _burst(client, customer, 30)[-1] == "ok"
    assert ctl.config()["rate_limit_per_second"] is None


# Stripe docs: "Idempotent requests" (https://docs.stripe.com/api/idempotent_requests): a request that
# conflicts or is refused before execution is not saved; a retry with the same key runs anew.
def test_a_rate_limited_request_is_not_stored_for_its_key(client, customer, ctl, emulator):
    ctl.set_rate_limit(2)
    client.v1.customers.retrieve(customer.id)
    client.v1.customers.retrieve(customer.id)
    body = f"customer={customer.id}&amount=7"
    status, headers, err = raw_request(emulator, "POST", "/v1/invoiceitems", body, {"Idempotency-Key": "rl-1"})
    assert status == 429 and err["error"]["code"] == "rate_limit"
    time.sleep(1.05)
    status, headers, item = raw_request(emulator, "POST", "/v1/invoiceitems", body, {"Idempotency-Key": "rl-1"})
    assert status == 200 and item["amount"] == 7 and "Idempotent-Replayed" not in headers


def test_reset_restores_the_start_time_rate_limit(ctl, client, customer):
    ctl.set_rate_limit(1)
    ctl.reset()
    assert ctl.config()["rate_limit_per_second"] is None


def test_rate_limit_start_keyword_and_cli_flag():
    from stripe_emulator.process import start_emulator

    with start_emulator(rate_limit=3) as emu:
        c = make_client(emu)
        with pytest.raises(stripe.RateLimitError):
            for _ in range(10):
                c.v1.customers.list()
        assert emu.control.config()["rate_limit_per_second"] == 3
        emu.control.reset()
        assert emu.control.config()["rate_limit_per_second"] == 3

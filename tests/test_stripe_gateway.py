"""The one door to Stripe against Stripe's rate limit, which counts reads and writes
together (about 25 requests a second in test mode): the shared request budget keeps
every process under it, and a 429 that does arrive is retried, not failed."""
from __future__ import annotations

import threading

from portal.queue import redis_connection
from portal.stripe_gateway import RequestBudget, StripeGateway


def _gateway(emulator, budget: RequestBudget | None) -> StripeGateway:
    return StripeGateway(emulator.api_key, emulator.url, budget)


def _run(threads: int, calls: int, gateway_for) -> list[str]:
    errors: list[str] = []

    def work():
        stripe = gateway_for()
        try:
            customer = stripe.create_customer({"email": "rate@example.com"})
            for _ in range(calls - 1):
                stripe.retrieve_customer(customer.id)
        except Exception as error:  # collected: the assertion names it
            errors.append(repr(error))

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


def _statuses(emulator) -> list[int]:
    return [r["status"] for r in emulator.control.requests_log() if r["path"].startswith("/v1/customers")]


def test_the_shared_budget_keeps_reads_and_writes_under_stripes_limit(app, stripe_emulator):
    stripe_emulator.control.set_rate_limit(25)
    redis = redis_connection()
    try:
        errors = _run(3, 20, lambda: _gateway(stripe_emulator, RequestBudget(redis, 20, key="test:request-budget")))
        statuses = _statuses(stripe_emulator)
    finally:
        stripe_emulator.control.set_rate_limit(0)
    assert not errors, errors
    assert len(statuses) == 60 and set(statuses) == {200}  # reads were budgeted too: no 429


def test_without_a_budget_stripe_answers_429_and_the_gateway_retries(app, stripe_emulator):
    stripe_emulator.control.set_rate_limit(25)
    try:
        errors = _run(3, 20, lambda: _gateway(stripe_emulator, None))
        statuses = _statuses(stripe_emulator)
    finally:
        stripe_emulator.control.set_rate_limit(0)
    assert not errors, errors
    assert statuses.count(429) > 0  # the limit is real
    assert statuses.count(200) == 60  # and every call got through in the end

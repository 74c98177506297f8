"""Fixtures for the Stripe emulator's tests (no portal fixtures beyond the emulator).

The emulator subprocess is the session's one (`stripe_emulator_process` in
tests/conftest.py), shared with the portal's tests; every test starts from a reset
emulator. Tests talk to it only through the real ``stripe`` library over HTTP and the
control API.
"""

from __future__ import annotations

import os
import sys

import pytest
import stripe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emulator_helpers import WEBHOOK_SECRET, Receiver  # noqa: E402


@pytest.fixture(scope="session")
def emulator(stripe_emulator_process):
    return stripe_emulator_process


@pytest.fixture
def ctl(emulator):
    """The control client, on a freshly reset emulator."""
    emulator.control.reset()
    emulator.control.configure_webhooks(url="", secret="")
    return emulator.control


@pytest.fixture
def client(emulator, ctl):
    """A StripeClient on the emulator, with no automatic retries."""
    return stripe.StripeClient(emulator.api_key, base_addresses={"api": emulator.url}, max_network_retries=0)


@pytest.fixture
def customer(client):
    return client.v1.customers.create({"name": "Acme Ltd", "email": "billing@acme.test"})


@pytest.fixture
def paying_customer(client):
    """A customer whose default payment method is Stripe's test Visa (pm_card_visa)."""
    return client.v1.customers.create(
        {
            "name": "Paying Ltd",
            "email": "billing@paying.test",
            "payment_method": "pm_card_visa",
            "invoice_settings": {"default_payment_method": "pm_card_visa"},
        }
    )


@pytest.fixture
def draft(client, customer):
    return client.v1.invoices.create(
        {"customer": customer.id, "auto_advance": False, "pending_invoice_items_behavior": "exclude"}
    )


@pytest.fixture
def receiver(ctl):
    r = Receiver()
    ctl.configure_webhooks(url=r.url, secret=WEBHOOK_SECRET, retry_base_seconds=0.05, concurrency=1)
    yield r
    ctl.configure_webhooks(url="", secret="")
    r.close()

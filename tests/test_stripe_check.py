"""`flask stripe-check` against the emulator: a good key, a bad key, a missing webhook
endpoint, and the account features the portal does not model."""
from __future__ import annotations

import pytest
import stripe

from portal.billing.events import handled_event_types
from tests.sync_helpers import stripe_client

SECRET = "whsec_check_test"


@pytest.fixture
def configured(app, stripe_emulator, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])
    stripe_emulator.control.configure_webhooks(url="http://127.0.0.1:9/webhooks/stripe", secret=SECRET,
                                               paused=True)
    yield stripe_emulator
    stripe_emulator.control.configure_webhooks(url="", secret="")


def _check(runner, *args):
    result = runner.invoke(args=["stripe-check", *args])
    return result.exit_code, result.output


def test_a_ready_account_passes_every_check(runner, configured):
    code, output = _check(runner)
    assert code == 0, output
    assert "ok    key: accepted by " + configured.url in output and "test mode" in output
    assert f"the account's default is {stripe.api_version}, the stripe library's too" in output
    assert f"sends the {len(handled_event_types())} event types the portal handles" in output
    assert "ok    Stripe Tax: not active" in output and output.rstrip().endswith("Ready.")


def test_a_bad_key_fails_and_nothing_else_is_asked(runner, app, configured, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_API_KEY", "sk_test_not_this_one")
    since = len(configured.control.requests_log())
    code, output = _check(runner)
    assert code == 1
    assert "FAIL  key: " in output and "refused the key (test mode)" in output and "Invalid API Key" in output
    assert [r["path"] for r in configured.control.requests_log()[since:]] == ["/v1/account"]


def test_no_key_or_not_a_secret_key_fails(runner, app, configured, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_API_KEY", None)
    assert _check(runner) == (1, "FAIL  key: STRIPE_API_KEY is not set\n1 problem(s), 0 warning(s)\n")
    monkeypatch.setitem(app.config, "STRIPE_API_KEY", "pk_test_publishable")
    code, output = _check(runner)
    assert code == 1 and "is not a Stripe secret or restricted key" in output


def test_a_missing_webhook_endpoint_fails_unless_events_are_forwarded(runner, configured):
    configured.control.configure_webhooks(url="", secret="")
    code, output = _check(runner)
    assert code == 1
    assert "FAIL  webhook endpoint: no enabled endpoint ending in /webhooks/stripe" in output
    assert "invoice.paid" in output and "customer.deleted" in output
    code, output = _check(runner, "--forwarded")
    assert code == 0 and "events come through `stripe listen`" in output


def test_an_endpoint_without_the_portals_events_fails_naming_them(runner, configured):
    configured.control.configure_webhooks(url="", secret="")
    stripe_client(configured).v1.webhook_endpoints.create(
        {"url": "https://billing.example/webhooks/stripe", "enabled_events": ["invoice.paid", "invoice.finalized"],
         "api_version": "2025-01-27.acacia"})
    code, output = _check(runner, "--url", "https://billing.example")
    assert code == 1
    assert "does not send " in output and "customer.deleted" in output
    assert "sends events as API version 2025-01-27.acacia" in output
    code, output = _check(runner, "--url", "https://elsewhere.example")
    assert code == 1 and "no enabled endpoint at https://elsewhere.example/webhooks/stripe" in output


def test_unmodelled_features_and_a_version_mismatch_warn(runner, configured):
    configured.control.configure(tax_status="active", account_api_version="2025-01-27.acacia")
    code, output = _check(runner)
    assert code == 0, output
    assert "warn  Stripe Tax: active on this account" in output
    assert "warn  API version: the account's default is 2025-01-27.acacia" in output
    assert output.rstrip().endswith("0 problem(s), 2 warning(s)")


def test_a_missing_or_malformed_webhook_secret_fails(runner, app, configured, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [])
    code, output = _check(runner)
    assert code == 1 and "FAIL  webhook secret: STRIPE_WEBHOOK_SECRET is not set" in output
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", ["sk_test_oops"])
    code, output = _check(runner)
    assert code == 1 and "is not a whsec_" in output

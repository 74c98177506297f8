"""The account endpoints a setup check reads, and the state file that keeps the
emulator's objects across a restart."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

import pytest
import stripe
from emulator_helpers import FIXTURES, ROOT, make_client

from stripe_emulator.process import start_emulator


def test_account_answers_with_the_accounts_default_version_when_none_is_asked(emulator, client, ctl):
    account = client.v1.accounts.retrieve_current()
    assert account.object == "account" and account.id.startswith("acct_")
    ctl.configure(account_api_version="2025-01-27.acacia")
    request = urllib.request.Request(emulator.url + "/v1/account",
                                     headers={"Authorization": f"Bearer {emulator.api_key}"})
    with urllib.request.urlopen(request) as response:
        assert response.headers["Stripe-Version"] == "2025-01-27.acacia"
    request.add_header("Stripe-Version", stripe.api_version)
    with urllib.request.urlopen(request) as response:
        assert response.headers["Stripe-Version"] == stripe.api_version


def test_account_endpoint_and_tax_settings_carry_every_fixture_field(client, ctl):
    import json

    with open(FIXTURES) as f:
        fixtures = json.load(f)["resources"]
    endpoint = client.v1.webhook_endpoints.create({"url": "https://x.example/webhooks/stripe",
                                                   "enabled_events": ["*"]}).to_dict()
    for ours, name in ((client.v1.accounts.retrieve_current().to_dict(), "account"),
                       (client.v1.tax.settings.retrieve().to_dict(), "tax.settings"),
                       (endpoint, "webhook_endpoint")):
        assert set(fixtures[name]) - set(ours) == set(), name


def test_webhook_endpoints_list_the_delivery_endpoint_and_created_ones(client, ctl):
    assert client.v1.webhook_endpoints.list().data == []
    ctl.configure_webhooks(url="http://127.0.0.1:9/webhooks/stripe", secret="whsec_x", paused=True)
    [delivery] = client.v1.webhook_endpoints.list().data
    assert (delivery.url, delivery.enabled_events, delivery.api_version) == \
        ("http://127.0.0.1:9/webhooks/stripe", ["*"], None)
    created = client.v1.webhook_endpoints.create(
        {"url": "https://billing.example/webhooks/stripe", "enabled_events": ["invoice.paid"],
         "api_version": stripe.api_version})
    assert created.secret.startswith("whsec_") and created.status == "enabled"
    listed = client.v1.webhook_endpoints.list().data
    assert [endpoint.id for endpoint in listed] == [created.id, delivery.id]
    assert "secret" not in listed[0]
    assert client.v1.webhook_endpoints.retrieve(created.id).enabled_events == ["invoice.paid"]
    assert client.v1.webhook_endpoints.delete(created.id).deleted is True
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.webhook_endpoints.retrieve(created.id)
    assert missing.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.webhook_endpoints.create({"url": "ftp://x", "enabled_events": ["*"]})
    assert refused.value.param == "url"


def test_tax_settings_and_coupons_read_as_a_plain_account(client, ctl):
    assert client.v1.tax.settings.retrieve().status == "pending"
    assert client.v1.coupons.list().data == []
    ctl.configure(tax_status="active")
    assert client.v1.tax.settings.retrieve().status == "active"


def test_state_file_keeps_objects_ids_and_idempotency_across_a_restart(tmp_path):
    state_file = tmp_path / "emulator-state"
    with start_emulator(extra_args=["--state-file", str(state_file)]) as first:
        client = make_client(first)
        customer = client.v1.customers.create({"name": "Kept Ltd"})
        draft = client.v1.invoices.create({"customer": customer.id, "auto_advance": False},
                                          {"idempotency_key": "create-draft-1"})
        client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1234, "description": "kept"}]})
        port = int(first.url.rsplit(":", 1)[1])
    assert state_file.stat().st_mode & 0o777 == 0o600
    with start_emulator(port=port, extra_args=["--state-file", str(state_file)]) as second:
        client = make_client(second)
        assert client.v1.customers.retrieve(customer.id).name == "Kept Ltd"
        kept = client.v1.invoices.retrieve(draft.id)
        assert (kept.status, kept.total) == ("draft", 1234)
        again = client.v1.invoices.create({"customer": customer.id, "auto_advance": False},
                                          {"idempotency_key": "create-draft-1"})
        assert again.id == draft.id  # the key's stored answer, replayed
        assert client.v1.customers.create({"name": "New Ltd"}).id not in (customer.id, draft.id)


def test_a_state_file_of_something_else_stops_the_start(tmp_path):
    bad = tmp_path / "state"
    bad.write_text("not a state")
    result = subprocess.run([sys.executable, "-m", "stripe_emulator", "--port", "0", "--state-file", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "not a readable emulator state file" in result.stderr


def test_a_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "stripe_emulator", "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "another process uses it" in result.stderr

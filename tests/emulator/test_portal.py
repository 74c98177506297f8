"""Customer portal: configurations, sessions, and the session page's test-card forms."""

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
import stripe
from emulator_helpers import FIXTURES, event_types

NO_DEFAULT = (
    "You can’t create a portal session in test mode until you save your customer portal settings in test mode at "
    "https://dashboard.stripe.com/test/settings/billing/portal."
)


def _fixture(name):
    with open(FIXTURES) as f:
        return json.load(f)["resources"][name]


def _post_form(url: str, data: dict) -> tuple[int, str, str]:
    """POST a form without following the redirect: (status, Location, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **kw):
            return None

    body = urllib.parse.urlencode(data).encode()
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, data=body, method="POST")) as r:
            return r.status, r.headers.get("Location"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location"), e.read().decode()


# Stripe docs: "Create a portal session" (https://docs.stripe.com/api/customer_portal/sessions/create):
# without `configuration` the session "uses the default configuration"; a test-mode account has one only once
# its portal settings are saved in the Dashboard (Stripe's error message, reported verbatim in mozilla/fxa#13245).
def test_a_session_needs_a_default_configuration(client, customer, ctl):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.billing_portal.sessions.create({"customer": customer.id, "return_url": "https://portal.test/b"})
    assert ei.value.http_status == 400 and ei.value.error.type == "invalid_request_error"
    assert ei.value.user_message == NO_DEFAULT
    cfg = ctl.set_portal_default_configuration(True)
    default_id = cfg["portal_default_configuration_id"]
    s = client.v1.billing_portal.sessions.create({"customer": customer.id, "return_url": "https://portal.test/b"})
    assert s.configuration == default_id and s.url.startswith("http")
    default = client.v1.billing_portal.configurations.retrieve(default_id)
    assert default.is_default is True and default.active is True
    assert [c.id for c in client.v1.billing_portal.configurations.list({"is_default": True}).data] == [default_id]
    assert "billing_portal.session.created" in event_types(client)
    ctl.set_portal_default_configuration(False)
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing_portal.sessions.create({"customer": customer.id})
    ctl.set_portal_default_configuration(True)
    ctl.reset()  # back to the start-time setting: no default
    cus = client.v1.customers.create({})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing_portal.sessions.create({"customer": cus.id})


# Stripe docs: "Customer Portal Configuration" (https://docs.stripe.com/api/customer_portal/configurations):
# create, retrieve, update, list; "is_default ... Whether the configuration is the default".
def test_configurations_created_through_the_api(client, customer, ctl):
    cfg = client.v1.billing_portal.configurations.create(
        {
            "features": {"payment_method_update": {"enabled": True}, "invoice_history": {"enabled": True}},
            "business_profile": {"headline": "Acme billing"},
            "default_return_url": "https://portal.test/billing",
            "metadata": {"portal": "1"},
        }
    )
    assert cfg.id.startswith("bpc_") and cfg.is_default is False and cfg.active is True
    assert cfg.features.payment_method_update.enabled is True and cfg.business_profile.headline == "Acme billing"
    assert set(_fixture("billing_portal.configuration")) <= set(cfg.to_dict())
    s = client.v1.billing_portal.sessions.create({"customer": customer.id, "configuration": cfg.id})
    assert s.configuration == cfg.id and s.return_url == "https://portal.test/billing"
    expanded = client.v1.billing_portal.sessions.create(
        {"customer": customer.id, "configuration": cfg.id, "expand": ["configuration"]}
    )
    assert expanded.configuration.id == cfg.id and expanded.configuration.object == "billing_portal.configuration"
    upd = client.v1.billing_portal.configurations.update(cfg.id, {"metadata": {"v": "2"}, "name": "main"})
    assert upd.metadata.to_dict() == {"portal": "1", "v": "2"} and upd.name == "main"
    assert client.v1.billing_portal.configurations.retrieve(cfg.id).name == "main"
    assert [c.id for c in client.v1.billing_portal.configurations.list().data] == [cfg.id]
    types = event_types(client)
    assert "billing_portal.configuration.created" in types and "billing_portal.configuration.updated" in types
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.billing_portal.sessions.create({"customer": customer.id, "configuration": "bpc_missing"})
    assert ei.value.http_status == 404 and ei.value.code == "resource_missing" and ei.value.param == "configuration"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.billing_portal.configurations.create({})
    assert ei.value.param == "features"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing_portal.configurations.retrieve("bpc_missing")


def test_start_emulator_portal_default_configuration_keyword():
    from emulator_helpers import make_client

    from stripe_emulator.process import start_emulator

    with start_emulator(portal_default_configuration=True) as emu:
        c = make_client(emu)
        cus = c.v1.customers.create({})
        s = c.v1.billing_portal.sessions.create({"customer": cus.id})
        assert c.v1.billing_portal.configurations.retrieve(s.configuration).is_default is True
        emu.control.reset()  # the start-time setting survives a reset
        cus = c.v1.customers.create({})
        assert c.v1.billing_portal.sessions.create({"customer": cus.id}).configuration.startswith("bpc_")


# Stripe docs: "Integrate the customer portal" (https://docs.stripe.com/customer-management/integrate-customer-portal):
# customers manage their payment methods in the portal; the emulator's page attaches test cards with plain
# forms, emitting the same events as the API, and links back to return_url.
def test_the_session_page_adds_a_test_card_as_the_default(client, customer, ctl):
    ctl.set_portal_default_configuration(True)
    s = client.v1.billing_portal.sessions.create({"customer": customer.id, "return_url": "https://portal.test/b"})
    page = urllib.request.urlopen(s.url).read().decode()
    assert "No default payment method." in page and "<script" not in page.lower()
    assert "Add Visa •••• 4242" in page and "Add a card that declines" in page
    assert "<form method='post'" in page and "href='https://portal.test/b'" in page
    status, location, _ = _post_form(s.url + "/payment_method", {"payment_method": "pm_card_visa"})
    assert status == 303 and location == f"/p/session/{s.id}"
    after = urllib.request.urlopen(s.url).read().decode()
    assert "Visa •••• 4242" in after and "No default payment method." not in after
    cus = client.v1.customers.retrieve(customer.id, {"expand": ["invoice_settings.default_payment_method"]})
    assert cus.invoice_settings.default_payment_method.card.last4 == "4242"
    types = event_types(client)
    assert types[-2:] == ["payment_method.attached", "customer.updated"]
    # the declining card: attached, then every charge fails
    _post_form(s.url + "/payment_method", {"payment_method": "pm_card_chargeCustomerFail"})
    inv = client.v1.invoices.create({"customer": customer.id})
    client.v1.invoice_items.create({"customer": customer.id, "invoice": inv.id, "amount": 1000})
    with pytest.raises(stripe.CardError):
        client.v1.invoices.pay(inv.id)
    assert "•••• 0341" in urllib.request.urlopen(s.url).read().decode()
    status, location, _ = _post_form(s.url + "/payment_method", {"payment_method": "pm_card_amex"})
    assert status == 303 and "error=" in location  # only the page's own cards; nothing attached
    assert "only adds its own test cards" in urllib.request.urlopen(s.url.split("/p/")[0] + location).read().decode()
    assert len(client.v1.customers.payment_methods.list(customer.id).data) == 2

"""Payment methods: Stripe's test cards, attaching them, a customer's default one."""

import json

import pytest
import stripe
from emulator_helpers import FIXTURES, event_types


def _fixture(name):
    with open(FIXTURES) as f:
        return json.load(f)["resources"][name]


# Stripe docs: "The Customer object" (https://docs.stripe.com/api/customers/object):
# invoice_settings.default_payment_method is null until one is set.
def test_a_new_customer_has_no_payment_method(client, customer):
    assert customer.invoice_settings.default_payment_method is None and customer.default_source is None
    assert client.v1.customers.payment_methods.list(customer.id).data == []


# Stripe docs: "Testing" (https://docs.stripe.com/testing): use a PaymentMethod such as pm_card_visa in
# test code; "Create a customer" (https://docs.stripe.com/api/customers/create): payment_method attaches,
# invoice_settings[default_payment_method] makes it the invoices' default.
def test_create_customer_with_a_test_card_attaches_a_new_payment_method(client):
    cus = client.v1.customers.create(
        {"payment_method": "pm_card_visa", "invoice_settings": {"default_payment_method": "pm_card_visa"}}
    )
    pm_id = cus.invoice_settings.default_payment_method
    assert pm_id.startswith("pm_") and pm_id != "pm_card_visa"
    pm = client.v1.payment_methods.retrieve(pm_id)
    assert pm.type == "card" and pm.card.brand == "visa" and pm.card.last4 == "4242" and pm.customer == cus.id
    assert set(_fixture("payment_method")) <= set(pm.to_dict())
    assert set(_fixture("payment_method")["card"]) <= set(pm.card.to_dict())
    assert [p.id for p in client.v1.customers.payment_methods.list(cus.id).data] == [pm_id]
    attached = client.v1.events.list({"type": "payment_method.attached"}).data
    assert [e.data.object.id for e in attached] == [pm_id] and attached[0].data.object.customer == cus.id
    types = event_types(client)
    assert types.index("customer.created") < types.index("payment_method.attached")
    # the default alone attaches too
    only_default = client.v1.customers.create({"invoice_settings": {"default_payment_method": "pm_card_mastercard"}})
    pm2 = client.v1.payment_methods.retrieve(only_default.invoice_settings.default_payment_method)
    assert pm2.card.brand == "mastercard" and pm2.customer == only_default.id


# Stripe docs: "Expanding responses" (https://docs.stripe.com/expand).
def test_expanding_the_default_payment_method(client, paying_customer):
    cus = client.v1.customers.retrieve(paying_customer.id, {"expand": ["invoice_settings.default_payment_method"]})
    pm = cus.invoice_settings.default_payment_method
    assert pm.object == "payment_method" and pm.card.last4 == "4242" and pm.customer == paying_customer.id
    listed = client.v1.customers.list({"expand": ["data.invoice_settings.default_payment_method"]})
    assert listed.data[0].invoice_settings.default_payment_method.card.brand == "visa"
    bare = client.v1.customers.create({}, {})
    assert (
        client.v1.customers.retrieve(
            bare.id, {"expand": ["invoice_settings.default_payment_method"]}
        ).invoice_settings.default_payment_method
        is None
    )


# Stripe docs: "Update a customer" (https://docs.stripe.com/api/customers/update): changing the default
# emits customer.updated with previous_attributes ("Types of events", https://docs.stripe.com/api/events/types).
def test_changing_the_default_emits_attached_and_customer_updated(client, paying_customer):
    old = paying_customer.invoice_settings.default_payment_method
    cus = client.v1.customers.update(
        paying_customer.id, {"invoice_settings": {"default_payment_method": "pm_card_amex"}}
    )
    new = cus.invoice_settings.default_payment_method
    assert new != old and client.v1.payment_methods.retrieve(new).card.brand == "amex"
    upd = client.v1.events.list({"type": "customer.updated", "limit": 1}).data[0]
    assert upd.data.previous_attributes.invoice_settings.default_payment_method == old
    assert upd.data.object.invoice_settings.default_payment_method == new
    assert client.v1.events.list({"type": "payment_method.attached", "limit": 1}).data[0].data.object.id == new
    # an existing payment method of the customer can be made the default again
    back = client.v1.customers.update(paying_customer.id, {"invoice_settings": {"default_payment_method": old}})
    assert back.invoice_settings.default_payment_method == old
    assert len(client.v1.customers.payment_methods.list(paying_customer.id).data) == 2


# Stripe's API (stripe.params.CustomerUpdateParams, from its OpenAPI spec) has no payment_method on update:
# "Update a customer" (https://docs.stripe.com/api/customers/update).
def test_update_customer_has_no_payment_method_parameter(client, customer):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.customers.update(customer.id, {"payment_method": "pm_card_visa"})
    assert ei.value.user_message == "Received unknown parameter: payment_method"


# Stripe docs: "Attach a PaymentMethod to a Customer" (https://docs.stripe.com/api/payment_methods/attach),
# "Retrieve a PaymentMethod", "List a Customer's PaymentMethods", "Detach a PaymentMethod".
def test_attach_retrieve_list_detach(client, customer):
    pm = client.v1.payment_methods.attach("pm_card_visa", {"customer": customer.id})
    assert pm.id.startswith("pm_") and pm.customer == customer.id
    assert client.v1.payment_methods.retrieve(pm.id).customer == customer.id
    assert client.v1.customers.payment_methods.retrieve(customer.id, pm.id).id == pm.id
    assert client.v1.customers.retrieve(customer.id).invoice_settings.default_payment_method is None  # only attached
    listed = client.v1.payment_methods.list({"customer": customer.id, "type": "card"})
    assert [p.id for p in listed.data] == [pm.id]
    client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": pm.id}})
    detached = client.v1.payment_methods.detach(pm.id)
    assert detached.customer is None
    assert client.v1.customers.retrieve(customer.id).invoice_settings.default_payment_method is None
    assert {"payment_method.attached", "payment_method.detached"} <= set(event_types(client))
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.payment_methods.retrieve("pm_nope")
    assert ei.value.http_status == 404 and ei.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.payment_methods.attach("pm_card_visa", {})
    assert ei.value.param == "customer"


# Stripe docs: "Testing" (https://docs.stripe.com/testing#declined-payments): "The cards in the previous
# table can't be attached to a Customer object. To simulate a declined payment with a successfully attached
# card, use pm_card_chargeCustomerFail."
def test_declining_test_cards_cannot_be_attached(client, customer):
    for token, decline_code in (
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_visa_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ):
        with pytest.raises(stripe.CardError) as ei:
            client.v1.payment_methods.attach(token, {"customer": customer.id})
        assert ei.value.http_status == 402 and ei.value.code == "card_declined"
        assert ei.value.error.decline_code == decline_code
        with pytest.raises(stripe.CardError):
            client.v1.customers.create({"payment_method": token})
    assert client.v1.customers.payment_methods.list(customer.id).data == []
    assert len(client.v1.customers.list().data) == 1  # no customer was created
    fail = client.v1.payment_methods.attach("pm_card_chargeCustomerFail", {"customer": customer.id})
    assert fail.customer == customer.id and fail.card.last4 == "0341"
    auth = client.v1.payment_methods.attach("pm_card_authenticationRequired", {"customer": customer.id})
    assert auth.card.last4 == "3184"


# Stripe docs: "Update a customer" (https://docs.stripe.com/api/customers/update): the default must be a
# payment method attached to the customer.
def test_default_must_belong_to_the_customer(client, customer, paying_customer):
    other_pm = paying_customer.invoice_settings.default_payment_method
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": other_pm}})
    assert ei.value.param == "invoice_settings[default_payment_method]" and "must be attached" in ei.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.payment_methods.attach(other_pm, {"customer": customer.id})
    assert "already been attached" in ei.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": "pm_card_unknown"}})
    assert ei.value.http_status == 404


# Stripe docs: "Testing" (https://docs.stripe.com/testing): test tokens such as tok_visa; a PaymentMethod is
# not a source ("You cannot use a PaymentMethod as a source for Customers").
def test_a_token_source_becomes_the_default_source(client, customer):
    cus = client.v1.customers.update(customer.id, {"source": "tok_visa"})
    assert cus.default_source.startswith("card_")
    card = client.v1.customers.retrieve(customer.id, {"expand": ["default_source"]}).default_source
    assert card.object == "card" and card.last4 == "4242" and card.customer == customer.id
    assert set(_fixture("card")) <= set(card.to_dict())
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.customers.update(customer.id, {"source": "pm_card_visa"})
    assert "cannot use a PaymentMethod as a source" in ei.value.user_message

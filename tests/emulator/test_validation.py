"""Request checking as strict as Stripe's, and API keys."""

import json
import urllib.error
import urllib.request

import pytest
import stripe
from emulator_helpers import make_client


def _raw(emulator, method, path, body=None, key="sk_test_emulator"):
    req = urllib.request.Request(emulator.url + path, data=body.encode() if body else None, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_unknown_parameter(client, customer):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoice_items.create({"customer": customer.id, "amount": 5, "colour": "red"})
    e = ei.value
    assert e.http_status == 400 and e.user_message == "Received unknown parameter: colour" and e.param == "colour"
    assert e.error.type == "invalid_request_error" and e.request_id.startswith("req_")
    # a parameter valid on another endpoint is still unknown here
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoice_items.update("ii_x", {"customer": customer.id})
    assert ei.value.param == "customer"
    assert client.v1.invoice_items.list({"customer": customer.id}).data == []  # nothing created


def test_unknown_nested_parameter(client, draft):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": 1}, {"amount": 2, "foo": "x"}]})
    assert ei.value.user_message == "Received unknown parameter: lines[1][foo]"
    assert ei.value.param == "lines[1][foo]"


def test_wrong_types(client, customer, draft):
    cases = [
        (lambda: client.v1.invoice_items.create({"customer": customer.id, "amount": "12.5"}), "amount"),
        (lambda: client.v1.invoice_items.create({"customer": customer.id, "amount": 1, "quantity": "two"}), "quantity"),
        (lambda: client.v1.invoices.create({"customer": customer.id, "auto_advance": "maybe"}), "auto_advance"),
        (
            lambda: client.v1.invoices.create({"customer": customer.id, "pending_invoice_items_behavior": "all"}),
            "pending_invoice_items_behavior",
        ),
        (
            lambda: client.v1.invoice_items.create({"customer": customer.id, "unit_amount_decimal": "abc"}),
            "unit_amount_decimal",
        ),
        (lambda: client.v1.invoices.add_lines(draft.id, {"lines": [{"amount": "x"}]}), "lines[0][amount]"),
        (lambda: client.v1.customers.list({"limit": "ten"}), "limit"),
    ]
    for call, param in cases:
        with pytest.raises(stripe.InvalidRequestError) as ei:
            call()
        assert ei.value.http_status == 400 and ei.value.param == param, param


def test_missing_required(client, customer, draft):
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.add_lines(draft.id, {})
    assert ei.value.param == "lines" and "Missing required param" in ei.value.user_message
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.remove_lines(draft.id, {"lines": [{"id": "il_x"}]})
    assert ei.value.param == "lines[0][behavior]"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoice_items.create({"amount": 5})
    assert ei.value.param == "customer"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.create({})
    assert ei.value.param == "customer"
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoice_items.create({"customer": customer.id, "period": {"start": 1}})
    assert ei.value.param == "period[end]"


def test_metadata_limits(client, customer):
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.update(customer.id, {"metadata": {f"k{i}": "v" for i in range(51)}})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.update(customer.id, {"metadata": {"k" * 41: "v"}})
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.customers.update(customer.id, {"metadata": {"k": "v" * 501}})


def test_bad_and_missing_api_key(emulator, ctl):
    bad = make_client(emulator, api_key="sk_test_wrong_key_123456")
    with pytest.raises(stripe.AuthenticationError) as ei:
        bad.v1.customers.list()
    assert ei.value.http_status == 401 and "Invalid API Key" in ei.value.user_message
    assert "wrong_key" not in ei.value.user_message  # masked
    status, headers, body = _raw(emulator, "GET", "/v1/customers", key=None)
    assert status == 401 and body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) >= {"type", "code", "message", "param", "doc_url"} and "request-id" in headers


def test_error_body_shape_and_unknown_url(emulator, ctl):
    status, headers, body = _raw(emulator, "POST", "/v1/invoiceitems", "amount=5&zzz=1")
    assert status == 400 and set(body["error"]) >= {"type", "code", "message", "param", "doc_url"}
    assert headers["request-id"].startswith("req_")
    status, _, body = _raw(emulator, "GET", "/v1/nothing_here")
    assert status == 404 and "Unrecognized request URL" in body["error"]["message"]


def test_form_encoding_variants(emulator, ctl):
    # expand[] (bracket form) and expand[0] (indexed) both work, booleans as true/false
    s, _, cus = _raw(emulator, "POST", "/v1/customers", "name=x&metadata[a]=1")
    assert s == 200 and cus["metadata"] == {"a": "1"}
    s, _, inv = _raw(emulator, "POST", "/v1/invoices", f"customer={cus['id']}&auto_advance=true&expand[]=customer")
    assert s == 200 and inv["auto_advance"] is True and inv["customer"]["id"] == cus["id"]
    s, _, inv2 = _raw(emulator, "GET", f"/v1/invoices/{inv['id']}?expand[0]=customer")
    assert s == 200 and inv2["customer"]["object"] == "customer"

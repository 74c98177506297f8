"""Rendering stored records as Stripe API objects (current API version shapes).

Each ``render_*`` function returns a fresh JSON-ready dict carrying every top-level
field that Stripe's own example of that object (stripe/openapi's ``fixtures3.json``,
kept in ``tests/emulator/fixtures/``)
carries; fields the emulator has no behaviour for hold the value Stripe gives them
for a plain test-mode account (``null``, ``[]``, ``false`` ...).
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

import stripe

API_VERSION = stripe.api_version
INVOICE_EMBEDDED_LINES = 10


@lru_cache(maxsize=4096)
def dec_str(d: Decimal | None) -> str | None:
    """Decimal as Stripe prints it ("1.5", "1000", "0.333333333333")."""
    if d is None:
        return None
    s = format(d.normalize(), "f")
    return "0" if s in ("-0", "") else s


def render_customer(c: dict) -> dict:
    """A ``customer`` object (or the deleted stub)."""
    if c.get("deleted"):
        return {"id": c["id"], "object": "customer", "deleted": True}
    return {
        "id": c["id"],
        "object": "customer",
        "address": _copy(c["address"]),
        "balance": c["balance"],
        "created": c["created"],
        "currency": c["currency"],
        "customer_account": None,
        "default_source": c.get("default_source"),
        "delinquent": c["delinquent"],
        "description": c["description"],
        "discount": None,
        "email": c["email"],
        "invoice_prefix": c["invoice_prefix"],
        "invoice_settings": {
            "custom_fields": _copy(c["invoice_settings"].get("custom_fields")),
            "default_payment_method": c["invoice_settings"].get("default_payment_method"),
            "footer": c["invoice_settings"].get("footer"),
            "rendering_options": _copy(c["invoice_settings"].get("rendering_options")),
        },
        "livemode": False,
        "metadata": dict(c["metadata"]),
        "name": c["name"],
        "next_invoice_sequence": c["next_invoice_sequence"],
        "phone": c["phone"],
        "preferred_locales": list(c["preferred_locales"]),
        "shipping": _copy(c["shipping"]),
        "tax_exempt": c["tax_exempt"],
        "test_clock": None,
    }


def render_item(it: dict) -> dict:
    """An ``invoiceitem`` object."""
    return {
        "id": it["id"],
        "object": "invoiceitem",
        "amount": it["amount"],
        "currency": it["currency"],
        "customer": it["customer"],
        "customer_account": None,
        "date": it["date"],
        "description": it["description"],
        "discountable": it["discountable"],
        "discounts": [],
        "invoice": it["invoice"],
        "livemode": False,
        "metadata": dict(it["metadata"]),
        "net_amount": it["amount"],
        "parent": None,
        "period": dict(it["period"]),
        "pricing": _pricing(it),
        "proration": False,
        "quantity": it["quantity"],
        "quantity_decimal": dec_str(it["quantity_decimal"]),
        "tax_rates": [],
        "test_clock": None,
    }


def _pricing(it: dict) -> dict:
    return {
        "type": "price_details",
        "price_details": {"price": it["price"], "product": it["product"]},
        "unit_amount_decimal": dec_str(it["unit_amount_decimal"]),
    }


def render_line(it: dict) -> dict:
    """The ``line_item`` an invoice item makes on its invoice."""
    return {
        "id": it["line_id"],
        "object": "line_item",
        "amount": it["amount"],
        "currency": it["currency"],
        "description": it["description"],
        "discount_amounts": [],
        "discountable": it["discountable"],
        "discounts": [],
        "invoice": it["invoice"],
        "livemode": False,
        "metadata": dict(it["metadata"]),
        "parent": {
            "type": "invoice_item_details",
            "invoice_item_details": {
                "invoice_item": it["id"],
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": None,
            },
            "subscription_item_details": None,
        },
        "period": dict(it["period"]),
        "pretax_credit_amounts": [],
        "pricing": _pricing(it),
        "quantity": it["quantity"],
        "quantity_decimal": dec_str(it["quantity_decimal"]),
        "subscription": None,
        "subtotal": it["amount"],
        "taxes": [],
    }


def render_list(data: list, url: str, has_more: bool) -> dict:
    """A list object."""
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def invoice_totals(inv: dict, items: list[dict], starting_balance: int | None = None) -> dict:
    """subtotal/total/amount_due/... of an invoice from its items and balance.

    ``starting_balance`` overrides the invoice's own (a draft shows the customer's
    current balance). An amount below the minimum charge that finalization moved to
    the customer's balance (``deferred_to_balance``) is no longer due on the invoice."""
    subtotal = 0
    for it in items:
        subtotal += it["amount"]
    sb = inv["starting_balance"] if starting_balance is None else starting_balance
    amount_due = max(0, subtotal + sb) - inv.get("deferred_to_balance", 0)
    amount_remaining = 0 if inv["status"] in ("paid", "void") else max(0, amount_due - inv["amount_paid"])
    return {
        "subtotal": subtotal,
        "subtotal_excluding_tax": subtotal,
        "total": subtotal,
        "total_excluding_tax": subtotal,
        "amount_due": amount_due,
        "amount_paid": inv["amount_paid"],
        "amount_remaining": amount_remaining,
    }


def render_invoice(inv: dict, customer: dict | None, items: list[dict], with_lines: bool = True) -> dict:
    """An ``invoice`` object; ``lines`` embeds the first 10 lines like Stripe.

    ``with_lines=False`` leaves ``lines.data`` empty (for ``previous_attributes``
    snapshots, which never include lines)."""
    if inv.get("deleted"):
        return {"id": inv["id"], "object": "invoice", "deleted": True}
    snap = inv["customer_snapshot"] or customer_snapshot(customer)
    draft = inv["status"] == "draft"
    # A draft shows the customer's balance as it is now; finalization freezes it.
    live_balance = customer is not None and not customer.get("deleted")
    starting_balance = customer["balance"] if draft and live_balance else inv["starting_balance"]
    totals = invoice_totals(inv, items, starting_balance)
    lines = [render_line(it) for it in items[:INVOICE_EMBEDDED_LINES]] if with_lines else []
    return {
        "id": inv["id"],
        "object": "invoice",
        "account_country": "US",
        "account_name": "Stripe Emulator",
        "account_tax_ids": None,
        **totals,
        "amount_overpaid": 0,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": inv["attempt_count"],
        "attempted": inv["attempted"],
        "auto_advance": inv["auto_advance"],
        "automatic_tax": {
            "enabled": False,
            "disabled_reason": None,
            "liability": None,
            "provider": None,
            "status": None,
        },
        "automatically_finalizes_at": inv["automatically_finalizes_at"] if draft else None,
        "billing_reason": "manual",
        "collection_method": inv["collection_method"],
        "created": inv["created"],
        "currency": inv["currency"],
        "custom_fields": _copy(inv["custom_fields"]),
        "customer": inv["customer"],
        "customer_account": None,
        "customer_address": _copy(snap["address"]),
        "customer_email": snap["email"],
        "customer_name": snap["name"],
        "customer_phone": snap["phone"],
        "customer_shipping": _copy(snap["shipping"]),
        "customer_tax_exempt": snap["tax_exempt"],
        "customer_tax_ids": [],
        "default_payment_method": inv.get("default_payment_method"),
        "default_source": None,
        "default_tax_rates": [],
        "description": inv["description"],
        "discounts": [],
        "due_date": inv["due_date"],
        "effective_at": inv["effective_at"],
        "ending_balance": None
        if draft
        else min(0, totals["total"] + starting_balance) + inv.get("deferred_to_balance", 0),
        "footer": inv["footer"],
        "from_invoice": None,
        "hosted_invoice_url": inv["hosted_invoice_url"],
        "invoice_pdf": inv["invoice_pdf"],
        "issuer": {"type": "self"},
        "last_finalization_error": _copy(inv.get("last_finalization_error")),
        "latest_revision": None,
        "lines": render_list(lines, f"/v1/invoices/{inv['id']}/lines", len(items) > INVOICE_EMBEDDED_LINES),
        "livemode": False,
        "metadata": dict(inv["metadata"]),
        "next_payment_attempt": inv["next_payment_attempt"],
        "number": inv["number"],
        "on_behalf_of": None,
        "parent": None,
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": inv["created"],
        "period_start": inv["created"],
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": {
            "amount_tax_display": None,
            "pdf": {"page_size": "auto"},
            "template": None,
            "template_version": None,
        },
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": starting_balance,
        "statement_descriptor": inv["statement_descriptor"],
        "status": inv["status"],
        "status_transitions": dict(inv["status_transitions"]),
        "subscription": None,
        "test_clock": None,
        "total_discount_amounts": [],
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": inv["created"],
    }


def customer_snapshot(c: dict | None) -> dict:
    """The customer_* fields an invoice copies (frozen at finalization)."""
    if not c or c.get("deleted"):
        return {"address": None, "email": None, "name": None, "phone": None, "shipping": None, "tax_exempt": "none"}
    return {
        "address": _copy(c["address"]),
        "email": c["email"],
        "name": c["name"],
        "phone": c["phone"],
        "shipping": _copy(c["shipping"]),
        "tax_exempt": c["tax_exempt"],
    }


_NO_ADDRESS = {"city": None, "country": None, "line1": None, "line2": None, "postal_code": None, "state": None}


def render_payment_method(pm: dict) -> dict:
    """A ``payment_method`` object (type ``card``)."""
    card = pm["card"]
    return {
        "id": pm["id"],
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {"address": dict(_NO_ADDRESS), "email": None, "name": None, "phone": None, "tax_id": None},
        "card": {
            "brand": card["brand"],
            "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": None},
            "country": "US",
            "display_brand": card["brand"],
            "exp_month": card["exp_month"],
            "exp_year": card["exp_year"],
            "fingerprint": card["fingerprint"],
            "funding": card["funding"],
            "generated_from": None,
            "last4": card["last4"],
            "networks": {"available": [card["brand"]], "preferred": None},
            "regulated_status": None,
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": pm["created"],
        "customer": pm["customer"],
        "customer_account": None,
        "livemode": False,
        "metadata": dict(pm["metadata"]),
        "type": "card",
    }


_CARD_BRANDS = {"visa": "Visa", "mastercard": "MasterCard", "amex": "American Express"}


def render_card(pm: dict) -> dict:
    """A legacy ``card`` source (``card_...``, added with ``source=tok_...``)."""
    card = pm["card"]
    return {
        "id": pm["id"],
        "object": "card",
        "address_city": None,
        "address_country": None,
        "address_line1": None,
        "address_line1_check": None,
        "address_line2": None,
        "address_state": None,
        "address_zip": None,
        "address_zip_check": None,
        "brand": _CARD_BRANDS.get(card["brand"], card["brand"]),
        "country": "US",
        "customer": pm["customer"],
        "cvc_check": None,
        "dynamic_last4": None,
        "exp_month": card["exp_month"],
        "exp_year": card["exp_year"],
        "fingerprint": card["fingerprint"],
        "funding": card["funding"],
        "last4": card["last4"],
        "metadata": dict(pm["metadata"]),
        "name": None,
        "regulated_status": None,
        "tokenization_method": None,
    }


def render_portal_configuration(cfg: dict) -> dict:
    """A ``billing_portal.configuration`` object."""
    return {
        "id": cfg["id"],
        "object": "billing_portal.configuration",
        "active": cfg["active"],
        "application": None,
        "business_profile": _copy(cfg["business_profile"]),
        "created": cfg["created"],
        "default_return_url": cfg["default_return_url"],
        "features": _copy(cfg["features"]),
        "is_default": cfg["is_default"],
        "livemode": False,
        "login_page": _copy(cfg["login_page"]),
        "metadata": dict(cfg["metadata"]) if cfg["metadata"] is not None else None,
        "name": cfg["name"],
        "updated": cfg["updated"],
    }


def render_session(s: dict) -> dict:
    """A ``billing_portal.session`` object."""
    return {
        "id": s["id"],
        "object": "billing_portal.session",
        "configuration": s["configuration"],
        "created": s["created"],
        "customer": s["customer"],
        "customer_account": None,
        "flow": None,
        "livemode": False,
        "locale": s["locale"],
        "on_behalf_of": None,
        "return_url": s["return_url"],
        "url": s["url"],
    }


def render_event(
    event_id: str,
    type_: str,
    created: int,
    obj: dict,
    previous: dict | None,
    request_id: str | None,
    idempotency_key: str | None,
    pending_webhooks: int,
) -> dict:
    """An ``event`` object."""
    data = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {
        "id": event_id,
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": data,
        "livemode": False,
        "pending_webhooks": pending_webhooks,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": type_,
    }


def deleted(obj_id: str, obj: str) -> dict:
    """The ``{"id", "object", "deleted": true}`` answer to a DELETE."""
    return {"id": obj_id, "object": obj, "deleted": True}


def diff(before: dict, after: dict, skip=("lines",)) -> dict:
    """``previous_attributes``: the top-level fields of ``before`` that changed."""
    return {k: v for k, v in before.items() if k not in skip and after.get(k) != v}


def _copy(v):
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v

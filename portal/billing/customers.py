"""What the portal knows of each organization's Stripe customer: whether it has a
default payment method (without one, Stripe's attempt to collect a finalized invoice
fails) and its balance (amounts below Stripe's minimum charge carried to the next
invoice, or credit).

Kept from Stripe's customer events; like the invoice handlers, the handler re-reads
the customer from Stripe rather than trusting the event's copy, and an event older
than the one already applied changes nothing.
"""
from __future__ import annotations

from sqlalchemy import or_, select, update

from portal.extensions import db
from portal.models import Organization


def payment_method_summary(method) -> str | None:
    """ "visa •••• 4242" for a card, the method's type otherwise; None for no method."""
    if not method:
        return None
    if isinstance(method, str):
        return "payment method on file"
    card = getattr(method, "card", None)
    if card is not None and getattr(card, "last4", None):
        return f"{card.brand} •••• {card.last4}"
    return str(getattr(method, "type", None) or "payment method on file")


def apply_stripe_customer(organization_id: int, customer, seen_at: int | None) -> None:
    """Record the customer's default payment method and balance, unless an event newer
    than `seen_at` (Stripe's `created`) was applied already."""
    settings = getattr(customer, "invoice_settings", None)
    method = getattr(settings, "default_payment_method", None) if settings is not None else None
    method = method or getattr(customer, "default_source", None)
    values = {"payment_method": payment_method_summary(method),
              "stripe_balance_cents": int(getattr(customer, "balance", 0) or 0)}
    query = update(Organization).where(Organization.id == organization_id)
    if seen_at is not None:
        values["stripe_customer_seen_at"] = seen_at
        query = query.where(or_(Organization.stripe_customer_seen_at.is_(None),
                                Organization.stripe_customer_seen_at <= seen_at))
    db.session.execute(query.values(**values).execution_options(synchronize_session=False))
    db.session.commit()


def organization_of_customer(customer_id: str | None) -> int | None:
    if not customer_id:
        return None
    return db.session.scalar(select(Organization.id).where(Organization.stripe_customer_id == customer_id))


def refresh_customer(organization_id: int, seen_at: int | None = None) -> str:
    """Re-read the organization's Stripe customer and record what it says."""
    from portal.stripe_gateway import StripeObjectMissing, StripeRejected, gateway

    customer_id = db.session.get(Organization, organization_id).stripe_customer_id
    db.session.commit()
    stripe = gateway()
    try:
        try:
            customer = stripe.retrieve_customer(customer_id)
        except StripeRejected:
            # A deleted customer has no payment method to expand: read it plainly.
            customer = stripe.retrieve_customer(customer_id, expand=False)
    except StripeObjectMissing:
        return "customer missing at Stripe"
    if getattr(customer, "deleted", False):
        return "customer deleted at Stripe (the next sync creates it again)"
    apply_stripe_customer(organization_id, customer, seen_at)
    organization = db.session.get(Organization, organization_id)
    return f"payment method: {organization.payment_method or 'none'}; balance {organization.stripe_balance_cents}"

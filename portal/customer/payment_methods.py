"""The way into Stripe's own customer portal, where customers manage payment methods.

The one Stripe call the web process makes while serving a request, and only on the
customer's click: it creates a short-lived portal session and hands back its URL.
"""
from __future__ import annotations

from portal.models import Organization
from portal.stripe_gateway import StripeFailure, StripeNotConfigured, gateway


class PaymentPortalUnavailable(Exception):
    """The portal session cannot be opened now; the message is for the customer."""


def payment_portal_url(organization: Organization, return_url: str) -> str:
    """A Stripe customer-portal session URL for the organization's Stripe customer."""
    if not organization.stripe_customer_id:
        raise PaymentPortalUnavailable(
            "Payment methods can be managed once your billing account exists at Stripe; "
            "it is set up with your first invoice. Please try again later."
        )
    try:
        session = gateway().create_portal_session(organization.stripe_customer_id, return_url)
    except StripeNotConfigured:
        raise PaymentPortalUnavailable(
            "Payment methods cannot be managed here yet: this portal is not connected to Stripe."
        ) from None
    except StripeFailure:
        raise PaymentPortalUnavailable(
            "Stripe could not open the payment methods page just now. Please try again in a minute."
        ) from None
    return session.url

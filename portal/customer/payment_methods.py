"""The way into Stripe's own customer portal, where customers manage payment methods.

The one Stripe call the web process makes while serving a request, and only on the
customer's click: it creates a short-lived portal session and hands back its URL.
"""
from __future__ import annotations

from flask import current_app

from portal.extensions import db
from portal.models import AuditEntry, Organization
from portal.stripe_gateway import (
    StripeFailure,
    StripeNotConfigured,
    StripeObjectMissing,
    StripeRejected,
    StripeUnavailable,
    gateway,
)

# Recorded (and listed for support on the discrepancies page) when Stripe refuses to
# open its customer portal: a setting only an operator can fix.
PORTAL_REFUSED = "stripe.customer_portal_refused"


class PaymentPortalUnavailable(Exception):
    """The portal session cannot be opened now; the message is for the customer."""


def payment_portal_url(organization: Organization, return_url: str, _recovered: bool = False) -> str:
    """A Stripe customer-portal session URL for the organization's Stripe customer.
    When Stripe no longer has that customer (deleted in the Dashboard, or a Stripe
    that lost its objects), a sync of the open invoice creates it again, as the
    periodic sync would, and the session is asked for once more."""
    if not organization.stripe_customer_id:
        raise PaymentPortalUnavailable(
            "Payment methods can be managed once your billing account exists at Stripe; "
            "it is set up with your first invoice. Please try again later."
        )
    configuration = current_app.config.get("STRIPE_PORTAL_CONFIGURATION")
    try:
        session = gateway().create_portal_session(organization.stripe_customer_id, return_url, configuration,
                                                  organization=organization.id)
    except StripeNotConfigured:
        raise PaymentPortalUnavailable(
            "Payment methods cannot be managed here yet: this portal is not connected to Stripe."
        ) from None
    except (StripeRejected, StripeObjectMissing) as refused:
        if isinstance(refused, StripeObjectMissing) and "configuration" not in str(refused):
            if not _recovered and _create_customer_again(organization):
                return payment_portal_url(organization, return_url, _recovered=True)
            raise PaymentPortalUnavailable(  # the customer itself is being set up again
                "Stripe could not open the payment methods page just now. Please try again in a minute."
            ) from None
        # Not transient: Stripe has no customer-portal configuration to use (none saved
        # as the default in the Dashboard, or STRIPE_PORTAL_CONFIGURATION names a wrong
        # one). Support is told; the customer is not asked to retry.
        db.session.add(AuditEntry(actor="portal", action=PORTAL_REFUSED, object_type="organization",
                                  object_id=str(organization.id), organization_id=organization.id,
                                  details={"configuration": configuration, "stripe": str(refused)[:1000]}))
        db.session.commit()
        raise PaymentPortalUnavailable(
            "Payment methods can't be managed online right now because of a setting on our side. "
            "Our support team has been told and will fix it; your current payment method keeps working."
        ) from None
    except (StripeUnavailable, StripeFailure):
        raise PaymentPortalUnavailable(
            "Stripe could not open the payment methods page just now. Please try again in a minute."
        ) from None
    return session.url


def _create_customer_again(organization: Organization) -> bool:
    """Sync the organization's open invoice now: the sync finds the Stripe customer
    gone and creates it (and the draft) again. True if the organization then has
    another Stripe customer to open the portal for."""
    from portal.billing.invoices import open_invoice
    from portal.billing.sync import sync_invoice

    lost = organization.stripe_customer_id
    invoice = open_invoice(organization)
    db.session.commit()
    if invoice is None:
        return False
    sync_invoice(invoice.id, trigger="manual")
    db.session.refresh(organization)
    return bool(organization.stripe_customer_id) and organization.stripe_customer_id != lost

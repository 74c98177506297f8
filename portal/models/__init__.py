"""The portal's data model, split by aggregate."""
from portal.models.accounts import Membership, Organization, User
from portal.models.alerts import ALERT_KINDS, AlertCrossing, OutboxMail, SpendAlert
from portal.models.audit import AuditEntry
from portal.models.billing import (
    INVOICE_STATUSES,
    Invoice,
    InvoiceItem,
    SyncRun,
)
from portal.models.catalog import Product
from portal.models.drift import DriftCheck, DriftSweepCursor
from portal.models.stripe_events import StripeEvent, StripeWrite
from portal.models.usage import ServiceAttachment, UsageEvent, UsageEventResend

__all__ = [
    "ALERT_KINDS",
    "AlertCrossing",
    "OutboxMail",
    "SpendAlert",
    "INVOICE_STATUSES",
    "AuditEntry",
    "DriftCheck",
    "DriftSweepCursor",
    "Invoice",
    "InvoiceItem",
    "Membership",
    "Organization",
    "Product",
    "ServiceAttachment",
    "StripeEvent",
    "StripeWrite",
    "SyncRun",
    "UsageEvent",
    "UsageEventResend",
    "User",
]

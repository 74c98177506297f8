"""Stripe events as received by the webhook endpoint: stored first, processed later.

Each event names, in indexed columns, the portal organization and invoice it is about
(`organization_id`, `invoice_id`), found from its payload when it is stored (and again
when it is processed, for an event that arrived before the portal knew the Stripe
ids): support pages look events up by these, never by searching the JSON.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Connection, Index, Integer, String, Text, event, select, text
from sqlalchemy.orm import Mapped, mapped_column

from portal.extensions import db
from portal.models.types import BigIntPK, UTCDateTime, utcnow


class StripeEvent(db.Model):
    __tablename__ = "stripe_events"
    __table_args__ = (
        Index(
            "ix_stripe_events_unprocessed",
            "received_at",
            postgresql_where=text("processed_at IS NULL"),
            sqlite_where=text("processed_at IS NULL"),
        ),
        Index("ix_stripe_events_organization_received", "organization_id", "received_at"),
        Index("ix_stripe_events_invoice_received", "invoice_id", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    stripe_event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(100))
    stripe_created: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # What the event is about, as far as the portal can tell (None: not a portal
    # customer or invoice, or not known yet). No foreign keys: events are history.
    organization_id: Mapped[int | None] = mapped_column(BigInteger)
    invoice_id: Mapped[int | None] = mapped_column(BigInteger)


def _digits(value) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() and len(value) < 19 else None


def _stripe_id(value) -> str | None:
    """An id as Stripe sends it: a string, or an expanded object's `id`."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def event_references(payload: dict) -> dict:
    """What a Stripe event's object points at: `customer`, `invoice` (Stripe ids) and the
    portal ids Stripe keeps in metadata (`organization`, `invoice_id`), each or None."""
    data = payload.get("data") if isinstance(payload, dict) else None
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        return {"customer": None, "invoice": None, "organization": None, "invoice_id": None}
    kind = obj.get("object")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return {
        "customer": _stripe_id(obj.get("id") if kind == "customer" else obj.get("customer")),
        "invoice": _stripe_id(obj.get("id") if kind == "invoice" else obj.get("invoice")),
        "organization": _digits(metadata.get("portal_organization_id")),
        # An invoice carries `portal_invoice_id`; the portal's lines carry `portal_invoice`.
        "invoice_id": _digits(metadata.get("portal_invoice_id") or metadata.get("portal_invoice")),
    }


def event_subjects(connection: Connection, payload: dict) -> tuple[int | None, int | None]:
    """(organization id, invoice id) of the portal objects the event is about: the
    invoice by its Stripe id (or the portal id in its metadata), the organization as
    the invoice's, else by its Stripe customer (or the id in the metadata). A few
    indexed lookups; ids from metadata count only when they exist."""
    from portal.models.accounts import Organization
    from portal.models.billing import Invoice

    refs = event_references(payload)
    invoice_row = None
    if refs["invoice"]:
        invoice_row = connection.execute(select(Invoice.id, Invoice.organization_id)
                                         .where(Invoice.stripe_invoice_id == refs["invoice"])).first()
    if invoice_row is None and refs["invoice_id"] is not None:
        invoice_row = connection.execute(select(Invoice.id, Invoice.organization_id)
                                         .where(Invoice.id == refs["invoice_id"])).first()
    if invoice_row is not None:
        return invoice_row.organization_id, invoice_row.id
    organization_id = None
    if refs["customer"]:
        organization_id = connection.scalar(select(Organization.id)
                                            .where(Organization.stripe_customer_id == refs["customer"]))
    if organization_id is None and refs["organization"] is not None:
        organization_id = connection.scalar(select(Organization.id).where(Organization.id == refs["organization"]))
    return organization_id, None


@event.listens_for(StripeEvent, "before_insert")
def _fill_subjects(_mapper, connection: Connection, stripe_event: StripeEvent) -> None:
    """However an event row is added, it names its organization and invoice."""
    if stripe_event.organization_id is None and stripe_event.invoice_id is None and stripe_event.payload:
        stripe_event.organization_id, stripe_event.invoice_id = event_subjects(connection, stripe_event.payload)


class StripeWrite(db.Model):
    """One attempt of one write to Stripe, recorded before the call with its own
    idempotency key (reused only by the retries of this attempt), and its outcome:
    `applied`, `replayed` (Stripe answered from its idempotency store: the write had
    been applied by an earlier try of this attempt), `unknown` (a 500 or no answer),
    `refused` (a 4xx) or None while in flight (or when the process died)."""

    __tablename__ = "stripe_writes"
    __table_args__ = (
        Index("ix_stripe_writes_invoice_started", "invoice_id", "started_at"),
        Index("ix_stripe_writes_started", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    operation: Mapped[str] = mapped_column(String(40))
    invoice_id: Mapped[int | None] = mapped_column(BigInteger)
    organization_id: Mapped[int | None] = mapped_column(BigInteger)
    stripe_object_id: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    outcome: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)

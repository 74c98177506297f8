"""What organizations use (usage events) and which services they have attached."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.extensions import db
from portal.models.accounts import Organization
from portal.models.catalog import Product
from portal.models.types import QUANTITY, BigIntPK, UTCDateTime, utcnow


class UsageEvent(db.Model):
    """Append-only. A resent event (same sender and event id) is refused by the
    unique constraint, so dedupe holds across processes and survives restarts."""

    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("sender", "event_id", name="uq_usage_events_sender_event_id"),
        CheckConstraint("quantity >= 0", name="quantity_non_negative"),
        # Covers the billing page's sums over a span of time (migration 0011).
        Index("ix_usage_events_org_occurred", "organization_id", "occurred_at",
              postgresql_include=["product_id", "invoice_id", "quantity"]),
        # The events priced into one invoice line (support's drill-down).
        Index("ix_usage_events_invoice_line", "invoice_id", "product_id", "resource", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    sender: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(255))
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[Decimal] = mapped_column(QUANTITY)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resource: Mapped[str] = mapped_column(String(200), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The invoice the event was priced onto (set when priced).
    invoice_id: Mapped[int | None] = mapped_column(ForeignKey("invoices.id"))

    organization: Mapped[Organization] = relationship()
    product: Mapped[Product] = relationship()


USAGE_RESEND_DECISIONS = ("duplicate", "conflict")


class UsageEventResend(db.Model):
    """A usage event id received again after it was accepted: a `duplicate` (the same
    event, changing nothing) or a `conflict` (the id reused with different content,
    refused with its batch; `fields` names what differed). The accepted event itself
    is its UsageEvent row; these rows tell support what happened to every resend."""

    __tablename__ = "usage_event_resends"
    __table_args__ = (
        CheckConstraint("decision IN ('duplicate', 'conflict')", name="decision_known"),
        Index("ix_usage_event_resends_sender_event", "sender", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    sender: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(String(255))
    decision: Mapped[str] = mapped_column(String(16))
    fields: Mapped[str] = mapped_column(String(200), default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ServiceAttachment(db.Model):
    """A recurring service attached to an organization for a span of time."""

    __tablename__ = "service_attachments"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint("detached_at IS NULL OR detached_at >= attached_at", name="detached_after_attached"),
        Index(
            "ix_service_attachments_active",
            "organization_id",
            postgresql_where=text("detached_at IS NULL"),
            sqlite_where=text("detached_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[Decimal] = mapped_column(QUANTITY, default=Decimal(1))
    resource: Mapped[str] = mapped_column(String(200), default="")
    attached_at: Mapped[datetime] = mapped_column(UTCDateTime)
    detached_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    organization: Mapped[Organization] = relationship()
    product: Mapped[Product] = relationship()

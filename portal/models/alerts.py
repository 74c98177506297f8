"""Spend alerts, their crossings (one per alert and invoice) and the mail outbox."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.extensions import db
from portal.models.accounts import Organization
from portal.models.types import BigIntPK, UTCDateTime, utcnow

# What an alert watches: the open invoice's total, or its projected end-of-period total.
ALERT_KINDS = ("total", "projection")


class SpendAlert(db.Model):
    """A threshold an owner set on the open invoice's total or on its projection."""

    __tablename__ = "spend_alerts"
    __table_args__ = (
        CheckConstraint("kind IN ('total', 'projection')", name="kind_known"),
        CheckConstraint("threshold_cents > 0", name="threshold_positive"),
        UniqueConstraint("organization_id", "kind", "threshold_cents", name="uq_spend_alerts_org_kind_threshold"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    threshold_cents: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255))

    organization: Mapped[Organization] = relationship()


class AlertCrossing(db.Model):
    """An alert's threshold crossed on one invoice. Unique per (alert, invoice): however
    many workers evaluate at once, a crossing is recorded, bannered and mailed once
    per threshold and billing cycle."""

    __tablename__ = "alert_crossings"
    __table_args__ = (UniqueConstraint("alert_id", "invoice_id", name="uq_alert_crossings_alert_invoice"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("spend_alerts.id", ondelete="CASCADE"))
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), index=True)
    # The watched figure when the crossing was found.
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    crossed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    alert: Mapped[SpendAlert] = relationship()


class OutboxMail(db.Model):
    """A mail to send, written in the transaction that decided to send it, and sent
    by a job (`portal.mail.deliver_outbox`). Unsent mails stay here, visible, until
    SMTP is configured and answers."""

    __tablename__ = "mail_outbox"
    __table_args__ = (
        Index("ix_mail_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL"),
              sqlite_where=text("sent_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    # The crossing this mail announces: one mail per crossing, held by the database.
    crossing_id: Mapped[int | None] = mapped_column(ForeignKey("alert_crossings.id", ondelete="SET NULL"),
                                                    unique=True)
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)

"""What the last comparison of each open invoice with its Stripe draft found (drift),
and where the periodic drift sweep goes on from."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.extensions import db
from portal.models.billing import Invoice, _in
from portal.models.types import BigIntPK, UTCDateTime, utcnow

# clean: Stripe holds exactly the portal's lines (lines added by hand may be there too);
# drift: lines missing, extra or different; draft_missing / customer_missing: deleted
# at Stripe; not_draft: Stripe finalized it while the portal has it open; error:
# Stripe could not be read.
DRIFT_OUTCOMES = ("clean", "drift", "draft_missing", "customer_missing", "not_draft", "error")
DRIFT_SOURCES = ("sweep", "compare")


class DriftCheck(db.Model):
    """The latest comparison of one invoice with its Stripe draft (one row per invoice,
    replaced by each new check)."""

    __tablename__ = "drift_checks"
    __table_args__ = (
        CheckConstraint(_in("outcome", DRIFT_OUTCOMES), name="outcome_known"),
        CheckConstraint(_in("source", DRIFT_SOURCES), name="source_known"),
        Index("ix_drift_checks_outcome_checked", "outcome", "checked_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), unique=True)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(24))
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255))
    missing: Mapped[int] = mapped_column(Integer, default=0)
    extra: Mapped[int] = mapped_column(Integer, default=0)
    different: Mapped[int] = mapped_column(Integer, default=0)
    by_hand: Mapped[int] = mapped_column(Integer, default=0)
    portal_total_cents: Mapped[int | None] = mapped_column(BigInteger)
    stripe_total_cents: Mapped[int | None] = mapped_column(BigInteger)
    # The differing lines, as the comparison page shows them.
    details: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)

    invoice: Mapped[Invoice] = relationship()

    @property
    def differences(self) -> int:
        return self.missing + self.extra + self.different


class DriftSweepCursor(db.Model):
    """One row: the last invoice id the drift sweep visited; the next run goes on
    after it and wraps around, so every open invoice is visited in turn."""

    __tablename__ = "drift_sweep_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_invoice_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

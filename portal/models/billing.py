"""Invoices, their items, and the record of every sync with Stripe."""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal.extensions import db
from portal.models.accounts import Organization
from portal.models.catalog import Product
from portal.models.types import PRICE, QUANTITY, BigIntPK, UTCDateTime, utcnow

# open -> closing -> finalized -> paid | uncollectible | void
INVOICE_STATUSES = ("open", "closing", "finalized", "paid", "uncollectible", "void")
SYNC_TRIGGERS = ("schedule", "manual", "usage", "cycle_close", "webhook")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# Predicates of partial indexes; queries repeat them as SQL text so that the planner
# can match them (bound parameters would not).
ACTIVE_INVOICE = "status IN ('open', 'closing')"
PAYMENT_FAILED = "status = 'finalized' AND (payment_attempts > 0 OR payment_problem IS NOT NULL)"
OPEN_NEGATIVE = "status = 'open' AND total_cents < 0"
SYNC_FAILING = "status IN ('open', 'closing') AND last_sync_outcome NOT IN ('synced', 'unchanged')"


def _partial_index(name: str, columns: str | list[str], where: str) -> Index:
    columns = [columns] if isinstance(columns, str) else columns
    return Index(name, *columns, postgresql_where=text(where), sqlite_where=text(where))


class Invoice(db.Model):
    __tablename__ = "invoices"
    __table_args__ = (
        CheckConstraint(_in("status", INVOICE_STATUSES), name="status_known"),
        CheckConstraint("period_end > period_start", name="period_not_empty"),
        CheckConstraint("synced_seq <= change_seq", name="synced_not_ahead"),
        # Exactly one open invoice per organization, held by the database.
        Index(
            "uq_invoices_one_open_per_org",
            "organization_id",
            unique=True,
            postgresql_where=text("status = 'open'"),
            sqlite_where=text("status = 'open'"),
        ),
        Index("ix_invoices_org_period", "organization_id", "period_start"),
        # What the periodic sync sweeps: invoices with changes not yet at Stripe.
        Index(
            "ix_invoices_unsynced",
            "id",
            postgresql_where=text("change_seq > synced_seq"),
            sqlite_where=text("change_seq > synced_seq"),
        ),
        # Support's filters (portal/admin/filters.py), each a small partial index.
        _partial_index("ix_invoices_sync_blocked", "id", "sync_blocked IS NOT NULL"),
        _partial_index("ix_invoices_active_period_end", "period_end", ACTIVE_INVOICE),
        _partial_index("ix_invoices_payment_failed", "period_end", PAYMENT_FAILED),
        _partial_index("ix_invoices_open_negative", "organization_id", OPEN_NEGATIVE),
        _partial_index("ix_invoices_sync_failing", "organization_id", SYNC_FAILING),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="open")
    currency: Mapped[str] = mapped_column(String(3), default="usd")
    total_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped in the same transaction as any change to the items; a sync records the
    # value it made Stripe match. Unsynced changes exist while change_seq > synced_seq.
    change_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    synced_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    stripe_invoice_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    # Why the sync stopped for this invoice (e.g. Stripe finalized it behind our back);
    # the sweep skips it until the end-of-cycle logic or support deals with it.
    sync_blocked: Mapped[str | None] = mapped_column(String(64))
    number: Mapped[str | None] = mapped_column(String(64))
    hosted_invoice_url: Mapped[str | None] = mapped_column(Text)
    invoice_pdf: Mapped[str | None] = mapped_column(Text)
    # `created` of the newest Stripe event applied, so an older event changes nothing.
    stripe_state_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Collection, as Stripe last reported it (re-read on every invoice event).
    amount_due_cents: Mapped[int | None] = mapped_column(BigInteger)
    amount_paid_cents: Mapped[int | None] = mapped_column(BigInteger)
    # Not charged (below Stripe's minimum charge) and added to the customer's balance
    # instead, which Stripe collects with a later invoice.
    carried_to_balance_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    payment_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_payment_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # None, "payment_failed" or "action_required" (the customer must confirm the payment).
    payment_problem: Mapped[str | None] = mapped_column(String(32))
    # Stripe could not finalize the draft on its own (`invoice.finalization_failed`).
    finalization_error: Mapped[str | None] = mapped_column(Text)
    # The outcome of the latest finished sync run that did not find the invoice locked
    # (written with the run), so support's "sync failing" filter is one small index.
    last_sync_outcome: Mapped[str | None] = mapped_column(String(32))

    organization: Mapped[Organization] = relationship()
    items: Mapped[list[InvoiceItem]] = relationship(
        back_populates="invoice", order_by="InvoiceItem.id", cascade="all, delete-orphan"
    )

    @property
    def has_unsynced_changes(self) -> bool:
        return self.change_seq > self.synced_seq

    @property
    def past_due(self) -> bool:
        """Finalized, not paid, and Stripe's attempt to collect it failed."""
        return self.status == "finalized" and (self.payment_attempts > 0 or self.payment_problem is not None)

    def __repr__(self) -> str:
        return f"<Invoice {self.id} org={self.organization_id} {self.status}>"


class InvoiceItem(db.Model):
    """One priced line of the portal's invoice: a (product, resource) aggregate, or a
    line for an earlier period's late usage (distinguished by `line_key`)."""

    __tablename__ = "invoice_items"
    __table_args__ = (
        UniqueConstraint("invoice_id", "line_key", name="uq_invoice_items_invoice_line_key"),
        CheckConstraint("quantity >= 0", name="quantity_non_negative"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    line_key: Mapped[str] = mapped_column(String(400))
    resource: Mapped[str] = mapped_column(String(200), default="")
    description: Mapped[str] = mapped_column(String(500))
    quantity: Mapped[Decimal] = mapped_column(QUANTITY, default=Decimal(0))
    unit_price: Mapped[Decimal] = mapped_column(PRICE)
    amount_cents: Mapped[int] = mapped_column(BigInteger, default=0)
    # For late usage: the earlier period this line bills.
    origin_period_start: Mapped[datetime | None] = mapped_column(UTCDateTime)
    origin_period_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Content version, bumped on every change. (What Stripe holds is not mirrored
    # here: every sync reads the Stripe invoice's lines and compares with them.)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    invoice: Mapped[Invoice] = relationship(back_populates="items")
    product: Mapped[Product] = relationship()


class SyncRun(db.Model):
    __tablename__ = "sync_runs"
    __table_args__ = (
        CheckConstraint(_in("trigger", SYNC_TRIGGERS), name="trigger_known"),
        Index("ix_sync_runs_invoice_started", "invoice_id", "started_at"),
        _partial_index("ix_sync_runs_noted", ["invoice_id", "started_at"], "note IS NOT NULL"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    invoice_id: Mapped[int] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"))
    trigger: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(32))
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    deleted: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    stripe_reads: Mapped[int] = mapped_column(Integer, default=0)
    stripe_writes: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # What support should know though the run succeeded (an object recreated at Stripe).
    note: Mapped[str | None] = mapped_column(Text)

    invoice: Mapped[Invoice] = relationship()

    @property
    def stripe_calls(self) -> int:
        return self.stripe_reads + self.stripe_writes

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

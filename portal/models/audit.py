"""Who did what to which object, and when (support actions above all).

Append-only: the portal has no code path that changes or removes an entry, and the
database refuses UPDATE and DELETE on the table (triggers, migration 0008). The one
change it lets through is the foreign key's own ON DELETE SET NULL of
`actor_user_id` when a user is deleted: `actor` keeps who it was.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String, Text, event
from sqlalchemy.orm import Mapped, mapped_column

from portal.extensions import db
from portal.models.types import BigIntPK, UTCDateTime, utcnow


class AuditEntry(db.Model):
    __tablename__ = "audit_entries"
    __table_args__ = (
        Index("ix_audit_entries_object", "object_type", "object_id"),
        # The audit page's filters, each newest first.
        Index("ix_audit_entries_created", "created_at", "id"),
        Index("ix_audit_entries_org_created", "organization_id", "created_at"),
        Index("ix_audit_entries_actor_created", "actor", "created_at"),
        Index("ix_audit_entries_action_created", "action", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    actor_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(254))
    action: Mapped[str] = mapped_column(String(100))
    object_type: Mapped[str] = mapped_column(String(50))
    object_id: Mapped[str] = mapped_column(String(100))
    # The organization and invoice the action was about, when it was about one (no
    # foreign keys: the record outlives what it names).
    organization_id: Mapped[int | None] = mapped_column(BigInteger)
    invoice_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AuditEntryImmutable(Exception):
    """An audit entry was about to be changed or deleted through the ORM."""


@event.listens_for(AuditEntry, "before_update")
@event.listens_for(AuditEntry, "before_delete")
def _refuse_change(mapper, connection, entry: AuditEntry) -> None:
    # The database refuses it too (migration 0008); this says so before the round trip.
    raise AuditEntryImmutable(f"audit entry #{entry.id} is append-only")

"""Support's drill-down from one invoice line to what was priced into it.

A metered line is the sum of the usage events priced onto its invoice for its
product and resource (and, for a late-usage line, whose time falls in the earlier
period it bills); a recurring line is one service attachment (its key names it); a
credit is support's own line, explained by its audit entry. Each usage event comes
with what ingest decided about it: accepted when stored, and every later resend of
its id (a duplicate, or a conflict refused with its batch). Events come a page at a
time through the index by invoice line.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select, tuple_
from sqlalchemy.orm import joinedload

from portal.extensions import db
from portal.models import AuditEntry, InvoiceItem, ServiceAttachment, UsageEvent, UsageEventResend

EVENTS_PER_PAGE = 100


@dataclass
class PricedEvent:
    event: UsageEvent
    resends: list[UsageEventResend] = field(default_factory=list)

    @property
    def decision(self) -> str:
        """What ingest decided about this id, in one word: accepted, or the latest resend's fate."""
        return self.resends[-1].decision if self.resends else "accepted"


@dataclass
class LineDrilldown:
    item: InvoiceItem
    events: list[PricedEvent]
    page: int
    has_next: bool
    attachment: ServiceAttachment | None = None
    credit_entry: AuditEntry | None = None

    @property
    def late(self) -> bool:
        return self.item.origin_period_start is not None


def _attachment_id(item: InvoiceItem) -> int | None:
    """The service attachment a recurring line charges (its key ends in `svc:<id>`)."""
    _, _, tail = item.line_key.rpartition("|svc:")
    return int(tail) if tail.isdigit() else None


def line_drilldown(item: InvoiceItem, page: int = 1, per_page: int = EVENTS_PER_PAGE) -> LineDrilldown:
    """What makes up `item`: a page of its usage events (oldest first) with their
    resends, or its service attachment, or its credit's audit entry."""
    page = max(page, 1)
    kind = item.product.kind
    if kind == "recurring":
        attachment_id = _attachment_id(item)
        attachment = db.session.get(ServiceAttachment, attachment_id) if attachment_id else None
        return LineDrilldown(item, [], 1, False, attachment=attachment)
    if kind == "credit":
        entry = db.session.scalar(
            select(AuditEntry)
            .where(AuditEntry.invoice_id == item.invoice_id, AuditEntry.action == "invoice.credit",
                   AuditEntry.details["invoice_item_id"].as_integer() == item.id)
            .limit(1))
        return LineDrilldown(item, [], 1, False, credit_entry=entry)
    query = select(UsageEvent).where(UsageEvent.invoice_id == item.invoice_id,
                                     UsageEvent.product_id == item.product_id,
                                     UsageEvent.resource == item.resource)
    if item.origin_period_start is not None:
        query = query.where(UsageEvent.occurred_at >= item.origin_period_start,
                            UsageEvent.occurred_at < item.origin_period_end)
    else:
        query = query.where(UsageEvent.occurred_at >= item.invoice.period_start)
    rows = list(db.session.scalars(
        query.order_by(UsageEvent.occurred_at, UsageEvent.id)
        .offset((page - 1) * per_page).limit(per_page + 1)
    ))
    events = [PricedEvent(event) for event in rows[:per_page]]
    if events:
        by_id = {(e.event.sender, e.event.event_id): e for e in events}
        resends = defaultdict(list)
        for resend in db.session.scalars(
            select(UsageEventResend)
            .where(tuple_(UsageEventResend.sender, UsageEventResend.event_id).in_(list(by_id)))
            .order_by(UsageEventResend.received_at, UsageEventResend.id)
        ):
            resends[(resend.sender, resend.event_id)].append(resend)
        for key, priced in by_id.items():
            priced.resends = resends[key]
    return LineDrilldown(item, events, page, len(rows) > per_page)


def invoice_item(item_id: int) -> InvoiceItem | None:
    return db.session.scalar(
        select(InvoiceItem).where(InvoiceItem.id == item_id)
        .options(joinedload(InvoiceItem.product), joinedload(InvoiceItem.invoice))
    )

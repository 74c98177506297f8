"""Usage in: validate a batch of usage events, store it, price it onto invoices.

`ingest_usage` is all or nothing: every event is checked first and a batch with any
bad event stores nothing. Event ids are claimed by the unique (sender, event_id)
constraint in the same transaction that stores and prices the events, so a batch
that failed or was rejected can be resent and counts exactly once, and a resent
event is a duplicate that changes nothing.

Where an event is priced: onto the invoice whose period holds `occurred_at` while
that invoice is open; usage for a period whose invoice is already closing or
finalized (or older than any invoice) lands on the open invoice as a line labelled
with its original period; usage for after the open invoice's period (the cycle has
ended but not yet rolled over) is stored unpriced and priced onto the next invoice
when it opens (`price_pending_usage`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import select, update

from portal import money
from portal.billing import bulk
from portal.billing.cycles import cycle_containing
from portal.billing.invoices import ensure_open_invoice
from portal.billing.pricing import ItemDelta, add_quantities
from portal.extensions import db
from portal.models import Invoice, Organization, Product, UsageEvent
from portal.models.types import utcnow

MAX_BATCH_EVENTS = 5000
MAX_FUTURE_SKEW = timedelta(minutes=5)
MAX_EVENT_ID_LENGTH = 255
MAX_RESOURCE_LENGTH = 200

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


class BatchRejected(Exception):
    """The batch holds invalid events; `problems` lists them by index."""

    def __init__(self, problems: list[dict]):
        super().__init__(f"{len(problems)} invalid event(s)")
        self.problems = problems


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    invoices_changed: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Event:
    event_id: str
    organization: Organization
    product: Product
    quantity: Decimal
    occurred_at: datetime
    resource: str


def parse_timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp with an explicit offset, as an aware datetime; else None."""
    if not isinstance(value, str) or not _RFC3339.match(value):
        return None
    text = value.replace("z", "Z")
    if "." in text:  # fromisoformat keeps microseconds; cut nanoseconds, never round up
        head, _, tail = text.partition(".")
        digits = re.match(r"\d+", tail).group(0)
        text = f"{head}.{digits[:6].ljust(6, '0')}{tail[len(digits):]}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _validate(events: object, now: datetime) -> list[_Event]:
    if not isinstance(events, list):
        raise BatchRejected([{"index": None, "errors": ['"events" must be a list']}])
    wanted_slugs = {e.get("organization") for e in events if isinstance(e, dict)}
    wanted_codes = {e.get("product") for e in events if isinstance(e, dict)}
    organizations = {
        o.slug: o
        for o in db.session.scalars(
            select(Organization).where(Organization.slug.in_([s for s in wanted_slugs if isinstance(s, str)]))
        )
    }
    products = {
        p.code: p
        for p in db.session.scalars(
            select(Product).where(Product.code.in_([c for c in wanted_codes if isinstance(c, str)]))
        )
    }
    valid, problems = [], []
    for index, event in enumerate(events):
        errors = []
        if not isinstance(event, dict):
            problems.append({"index": index, "errors": ["an event must be an object"]})
            continue
        unknown = set(event) - {"id", "organization", "product", "quantity", "occurred_at", "resource"}
        if unknown:
            errors.append(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_EVENT_ID_LENGTH:
            errors.append(f"id must be a non-empty string of at most {MAX_EVENT_ID_LENGTH} characters")
        organization = organizations.get(event.get("organization")) if isinstance(
            event.get("organization"), str) else None
        if organization is None:
            errors.append(f"unknown organization {event.get('organization')!r}")
        product = products.get(event.get("product")) if isinstance(event.get("product"), str) else None
        if product is None:
            errors.append(f"unknown product {event.get('product')!r}")
        elif product.kind != "metered":
            errors.append(f"product {product.code!r} is a recurring service: attach it instead")
        elif not product.active:
            errors.append(f"product {product.code!r} is no longer sold")
        try:
            quantity = money.quantity(event.get("quantity"))
        except money.MoneyError as error:
            errors.append(str(error))
            quantity = None
        occurred_at = parse_timestamp(event.get("occurred_at"))
        if occurred_at is None:
            errors.append("occurred_at must be an RFC 3339 timestamp with a time zone offset")
        elif occurred_at > now + MAX_FUTURE_SKEW:
            errors.append("occurred_at lies in the future")
        resource = event.get("resource", "")
        if resource is None:
            resource = ""
        if not isinstance(resource, str) or len(resource) > MAX_RESOURCE_LENGTH:
            errors.append(f"resource must be a string of at most {MAX_RESOURCE_LENGTH} characters")
        if errors:
            problems.append({"index": index, "id": event_id if isinstance(event_id, str) else None,
                             "errors": errors})
        else:
            valid.append(_Event(event_id, organization, product, quantity, occurred_at, resource))
    if problems:
        raise BatchRejected(problems)
    return valid


def ingest_usage(sender: str, events: object, now: datetime | None = None) -> IngestResult:
    """Validate, store and price a batch of usage events from `sender`.

    Raises BatchRejected (nothing stored) if any event is invalid. Leaves the commit
    to the caller; a rollback undoes the whole batch, ids included.
    """
    now = now or utcnow()
    if isinstance(events, list) and len(events) > MAX_BATCH_EVENTS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_EVENTS} events")
    batch = _validate(events, now)
    result = IngestResult()
    if not batch:
        return result

    # One row per (sender, id): a repeat inside the batch is a duplicate too.
    unique: dict[str, _Event] = {}
    for event in batch:
        unique.setdefault(event.event_id, event)
    placements = _placements({e.organization for e in unique.values()}, now)
    rows = []
    for event in unique.values():
        invoice, origin = _place(placements[event.organization.id], event.occurred_at)
        rows.append(
            {
                "sender": sender,
                "event_id": event.event_id,
                "organization_id": event.organization.id,
                "product_id": event.product.id,
                "quantity": event.quantity,
                "occurred_at": event.occurred_at,
                "resource": event.resource,
                "received_at": now,
                "invoice_id": invoice.id if invoice else None,
            }
        )
    inserted = bulk.insert_new_usage_events(rows)
    result.accepted = len(inserted)
    result.duplicates = len(batch) - result.accepted

    deltas: dict[tuple, Decimal] = defaultdict(Decimal)
    for event_id in inserted:
        event = unique[event_id]
        invoice, origin = _place(placements[event.organization.id], event.occurred_at)
        if invoice is not None:
            deltas[(invoice.id, event.product.id, event.resource, origin)] += event.quantity
    products = {e.product.id: e.product for e in unique.values()}
    changed = add_quantities(
        [ItemDelta(invoice_id, products[product_id], resource, quantity, origin)
         for (invoice_id, product_id, resource, origin), quantity in deltas.items()]
    )
    result.invoices_changed = changed
    return result


@dataclass
class _Placement:
    open_invoice: Invoice
    closed: list[Invoice]


def _placements(organizations: set[Organization], now: datetime) -> dict[int, _Placement]:
    """Each organization's open invoice (opened if missing) and its other invoices."""
    ids = [o.id for o in organizations]
    invoices = defaultdict(list)
    for invoice in db.session.scalars(select(Invoice).where(Invoice.organization_id.in_(ids))):
        invoices[invoice.organization_id].append(invoice)
    placements = {}
    for organization in organizations:
        current = next((i for i in invoices[organization.id] if i.status == "open"), None)
        if current is None:
            current = ensure_open_invoice(organization, now)
        closed = [i for i in invoices[organization.id] if i.status != "open"]
        placements[organization.id] = _Placement(current, closed)
    return placements


def _place(placement: _Placement, at: datetime) -> tuple[Invoice | None, tuple | None]:
    """(invoice to price onto, origin period for a late line), or (None, None) for
    usage after the open invoice's period, priced when the next invoice opens."""
    current = placement.open_invoice
    if current.period_start <= at < current.period_end:
        return current, None
    if at >= current.period_end:
        return None, None
    for invoice in placement.closed:
        if invoice.period_start <= at < invoice.period_end:
            return current, (invoice.period_start, invoice.period_end)
    start, end = cycle_containing(at, current.organization.cycle_anchor_day)
    return current, (start, min(end, current.period_start))


def price_pending_usage(invoice: Invoice) -> int:
    """Price the organization's stored-but-unpriced usage onto `invoice` (its newly
    open invoice). Returns the number of events priced. Idempotent: each event is
    claimed for the invoice by a conditional update before it is priced."""
    pending = db.session.execute(
        update(UsageEvent)
        .where(
            UsageEvent.organization_id == invoice.organization_id,
            UsageEvent.invoice_id.is_(None),
            UsageEvent.occurred_at < invoice.period_end,
        )
        .values(invoice_id=invoice.id)
        .returning(UsageEvent.product_id, UsageEvent.resource, UsageEvent.quantity, UsageEvent.occurred_at)
        .execution_options(synchronize_session=False)
    ).all()
    if not pending:
        return 0
    placement = _Placement(invoice, [])
    products = {p.id: p for p in db.session.scalars(select(Product).where(
        Product.id.in_({row.product_id for row in pending})))}
    deltas: dict[tuple, Decimal] = defaultdict(Decimal)
    for row in pending:
        _, origin = _place(placement, row.occurred_at)
        deltas[(row.product_id, row.resource, origin)] += row.quantity
    add_quantities([ItemDelta(invoice.id, products[product_id], resource, quantity, origin)
                    for (product_id, resource, origin), quantity in deltas.items()])
    return len(pending)

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

from sqlalchemy import BigInteger, String, and_, any_, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql

from portal import money
from portal.billing import bulk
from portal.billing.cycles import cycle_containing
from portal.billing.invoices import ensure_open_invoice
from portal.billing.pricing import InvoiceNoLongerOpen, ItemDelta, add_quantities, line_key
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


@dataclass
class _Org:
    id: int
    cycle_anchor_day: int


class _Event:
    __slots__ = ("event_id", "organization", "product", "quantity", "occurred_at", "resource")

    def __init__(self, event_id: str, organization: _Org, product: Product, quantity: Decimal,
                 occurred_at: datetime, resource: str):
        self.event_id = event_id
        self.organization = organization
        self.product = product
        self.quantity = quantity
        self.occurred_at = occurred_at
        self.resource = resource


_FIELDS = frozenset({"id", "organization", "product", "quantity", "occurred_at", "resource"})


def _why_not_metered(product: Product) -> str | None:
    """None when usage of this product can be reported, else why not."""
    if product.kind == "recurring":
        return f"product {product.code!r} is a recurring service: attach it instead"
    if product.kind != "metered":
        return f"product {product.code!r} is not a metered product"
    return None if product.active else f"product {product.code!r} is no longer sold"


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


def _any(column, values: list, item_type):
    """`column IN values`: one array parameter on PostgreSQL (a statement the driver
    can prepare once), an expanding IN on SQLite."""
    if db.engine.dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=postgresql.ARRAY(item_type)))
    return column.in_(values)


def _validate(events: object, now: datetime) -> list[_Event]:
    if not isinstance(events, list):
        raise BatchRejected([{"index": None, "errors": ['"events" must be a list']}])
    wanted_slugs, wanted_codes = set(), set()
    for e in events:
        if isinstance(e, dict):
            slug, code = e.get("organization"), e.get("product")
            if isinstance(slug, str):
                wanted_slugs.add(slug)
            if isinstance(code, str):
                wanted_codes.add(code)
    organizations = {
        row.slug: _Org(row.id, row.cycle_anchor_day)
        for row in db.session.execute(
            select(Organization.id, Organization.slug, Organization.cycle_anchor_day)
            .where(_any(Organization.slug, sorted(wanted_slugs), String))
        )
    } if wanted_slugs else {}
    products = {
        p.code: p
        for p in db.session.scalars(select(Product).where(_any(Product.code, sorted(wanted_codes), String)))
    } if wanted_codes else {}
    # Per product: None when it can be metered, else why not (checked once per batch).
    product_problems = {code: _why_not_metered(p) for code, p in products.items()}
    latest = now + MAX_FUTURE_SKEW
    valid, problems = [], []
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            problems.append({"index": index, "errors": ["an event must be an object"]})
            continue
        errors = []
        if not _FIELDS.issuperset(event):
            unknown = set(event) - _FIELDS
            errors.append(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        event_id = event.get("id")
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_EVENT_ID_LENGTH:
            errors.append(f"id must be a non-empty string of at most {MAX_EVENT_ID_LENGTH} characters")
        slug = event.get("organization")
        organization = organizations.get(slug) if isinstance(slug, str) else None
        if organization is None:
            errors.append(f"unknown organization {slug!r}")
        code = event.get("product")
        product = products.get(code) if isinstance(code, str) else None
        if product is None:
            errors.append(f"unknown product {code!r}")
        else:
            problem = product_problems[code]
            if problem is not None:
                errors.append(problem)
        try:
            quantity = money.quantity(event.get("quantity"))
        except money.MoneyError as error:
            errors.append(str(error))
            quantity = None
        occurred_at = parse_timestamp(event.get("occurred_at"))
        if occurred_at is None:
            errors.append("occurred_at must be an RFC 3339 timestamp with a time zone offset")
        elif occurred_at > latest:
            errors.append("occurred_at lies in the future")
        resource = event.get("resource", "")
        if resource is None:
            resource = ""
        if not isinstance(resource, str) or len(resource) > MAX_RESOURCE_LENGTH:
            errors.append(f"resource must be a string of at most {MAX_RESOURCE_LENGTH} characters")
        if errors:
            problems.append({"index": index, "id": event_id if isinstance(event_id, str) else None,
                             "errors": errors})
        elif not problems:  # once the batch is rejected, only the problems matter
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
        if event.event_id not in unique:
            unique[event.event_id] = event
    organizations = {event.organization.id: event.organization for event in unique.values()}
    times = [event.occurred_at for event in unique.values()]
    placements = _placements(organizations, min(times), max(times), now)

    # Where each event is priced, decided once: the item it adds to, as (invoice id,
    # product, resource, origin period), or None for usage priced when the next invoice opens.
    item_of: dict[str, tuple | None] = {}
    rows = []
    for event in unique.values():
        invoice_id, origin = _place(placements[event.organization.id], event.occurred_at)
        item_of[event.event_id] = (
            None if invoice_id is None else (invoice_id, event.product, event.resource, origin))
        rows.append(
            {
                "event_id": event.event_id,
                "organization_id": event.organization.id,
                "product_id": event.product.id,
                "quantity": event.quantity,
                "occurred_at": event.occurred_at,
                "resource": event.resource,
                "invoice_id": invoice_id,
            }
        )
    line_keys = {
        item: (item[0], line_key(item[1], item[2], item[3][0] if item[3] else None))
        for item in set(item_of.values()) if item is not None
    }
    inserted, existing = bulk.insert_new_usage_events(sender, now, rows, list(line_keys.values()))
    unplaced = {unique[event_id].organization.id for event_id in inserted if item_of[event_id] is None}
    if unplaced:
        _hold_open(placements, unplaced)
    result.accepted = len(inserted)
    result.duplicates = len(batch) - result.accepted

    added: dict[tuple, Decimal] = {}
    for event_id in inserted:
        item = item_of[event_id]
        if item is not None:
            added[item] = added.get(item, Decimal(0)) + unique[event_id].quantity
    result.invoices_changed = add_quantities(
        [ItemDelta(invoice_id, product, resource, quantity, origin)
         for (invoice_id, product, resource, origin), quantity in added.items()],
        existing,
    )
    return result


@dataclass
class _Placement:
    """An organization's open invoice (id and period), its billing anchor, and the
    periods of its other invoices that could hold the batch's timestamps."""

    open_id: int
    open_start: datetime
    open_end: datetime
    anchor_day: int
    closed: list[tuple[datetime, datetime]] = field(default_factory=list)

    @classmethod
    def of(cls, invoice: Invoice, anchor_day: int) -> _Placement:
        return cls(invoice.id, invoice.period_start, invoice.period_end, anchor_day)


def _placements(organizations: dict[int, _Org], earliest: datetime, latest: datetime,
                now: datetime) -> dict[int, _Placement]:
    """Each organization's open invoice (opened if missing) and those of its other
    invoices whose period overlaps [earliest, latest]: only these can hold one of the
    batch's timestamps, so the read stays small however long the history grows."""
    rows = db.session.execute(
        select(Invoice.id, Invoice.organization_id, Invoice.status, Invoice.period_start, Invoice.period_end)
        .where(
            _any(Invoice.organization_id, sorted(organizations), BigInteger),
            or_(Invoice.status == "open", and_(Invoice.period_start <= latest, Invoice.period_end > earliest)),
        )
        .order_by(Invoice.id)
    ).all()
    placements: dict[int, _Placement] = {}
    closed = defaultdict(list)
    for row in rows:
        if row.status == "open":
            placements[row.organization_id] = _Placement(
                row.id, row.period_start, row.period_end, organizations[row.organization_id].cycle_anchor_day)
        else:
            closed[row.organization_id].append((row.period_start, row.period_end))
    for organization_id, organization in organizations.items():
        placement = placements.get(organization_id)
        if placement is None:
            invoice = ensure_open_invoice(db.session.get(Organization, organization_id), now)
            placement = placements[organization_id] = _Placement.of(invoice, organization.cycle_anchor_day)
        placement.closed = closed[organization_id]
    return placements


def _hold_open(placements: dict[int, _Placement], organization_ids: set[int]) -> None:
    """Usage for after the open invoice's period is left for the next invoice to
    price when it opens. Lock the open invoices it waits behind until this
    transaction commits, so a close cannot open the next invoice in between (and
    miss these events); one that already claimed them sends the batch round again."""
    ids = sorted(placements[organization_id].open_id for organization_id in organization_ids)
    still_open = set(db.session.scalars(
        select(Invoice.id).where(_any(Invoice.id, ids, BigInteger), Invoice.status == "open")
        .order_by(Invoice.id).with_for_update(key_share=True)
    ))
    if still_open != set(ids):
        raise InvoiceNoLongerOpen(sorted(set(ids) - still_open))


def _place(placement: _Placement, at: datetime) -> tuple[int | None, tuple | None]:
    """(id of the invoice to price onto, origin period for a late line), or (None, None)
    for usage after the open invoice's period, priced when the next invoice opens."""
    if placement.open_start <= at < placement.open_end:
        return placement.open_id, None
    if at >= placement.open_end:
        return None, None
    for start, end in placement.closed:
        if start <= at < end:
            return placement.open_id, (start, end)
    start, end = cycle_containing(at, placement.anchor_day)
    return placement.open_id, (start, min(end, placement.open_start))


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
    placement = _Placement.of(invoice, invoice.organization.cycle_anchor_day)
    products = {p.id: p for p in db.session.scalars(select(Product).where(
        Product.id.in_({row.product_id for row in pending})))}
    deltas: dict[tuple, Decimal] = defaultdict(Decimal)
    for row in pending:
        _, origin = _place(placement, row.occurred_at)
        deltas[(row.product_id, row.resource, origin)] += row.quantity
    add_quantities([ItemDelta(invoice.id, products[product_id], resource, quantity, origin)
                    for (product_id, resource, origin), quantity in deltas.items()])
    return len(pending)

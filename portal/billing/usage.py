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
when it opens (`placement.price_pending_usage`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from flask import current_app, has_app_context
from sqlalchemy import BigInteger, String, and_, any_, bindparam, insert, or_, select
from sqlalchemy.dialects import postgresql

from portal import money
from portal.billing import bulk
from portal.billing.invoices import ensure_open_invoice
from portal.billing.placement import Placement, place_usage
from portal.billing.pricing import InvoiceNoLongerOpen, ItemDelta, add_quantities, line_key
from portal.extensions import db
from portal.models import Invoice, Organization, Product, UsageEvent, UsageEventResend
from portal.models.types import utcnow
from portal.text import has_control_characters

MAX_BATCH_EVENTS = 5000
# Clock skew allowed between a sub-system and the portal: an event up to this far in
# the future, or this long before its organization was created, is accepted.
MAX_FUTURE_SKEW = timedelta(minutes=5)
# Defaults of USAGE_LOOKBACK_DAYS and USAGE_MAX_QUANTITY (config.py).
DEFAULT_LOOKBACK_DAYS = 35
DEFAULT_MAX_QUANTITY = Decimal("1000000000")
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


class EventConflict(Exception):
    """Event ids already used (or used twice in the batch) for different content: a
    resend must be identical to count as a duplicate. `conflicts` lists them by index
    with the fields that differ. Raised before the caller commits: roll back."""

    def __init__(self, conflicts: list[dict], sender: str | None = None):
        super().__init__(f"{len(conflicts)} event id(s) reused with different content")
        self.conflicts = conflicts
        # Set when the ids were accepted earlier from `sender`: the refusal is then
        # recorded against those events (`record_conflicts`, after the rollback).
        self.sender = sender


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    invoices_changed: set[int] = field(default_factory=set)


@dataclass
class _Org:
    id: int
    cycle_anchor_day: int
    created_at: datetime | None = None


class _Event:
    __slots__ = ("index", "event_id", "organization", "product", "quantity", "occurred_at", "resource")

    def __init__(self, event_id: str, organization: _Org, product: Product, quantity: Decimal,
                 occurred_at: datetime, resource: str, index: int = 0):
        self.index = index
        self.event_id = event_id
        self.organization = organization
        self.product = product
        self.quantity = quantity
        self.occurred_at = occurred_at
        self.resource = resource

    def content(self) -> tuple:
        """What a resend of this id must repeat to be a duplicate."""
        return (self.organization.id, self.product.id, self.quantity, self.occurred_at, self.resource)


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


def _limits() -> tuple[timedelta, Decimal]:
    """(lookback, largest quantity of one event) from the app's config, else the defaults."""
    config = current_app.config if has_app_context() else {}
    days = config.get("USAGE_LOOKBACK_DAYS", DEFAULT_LOOKBACK_DAYS)
    maximum = Decimal(config.get("USAGE_MAX_QUANTITY", DEFAULT_MAX_QUANTITY))
    return timedelta(days=days), min(maximum, money.MAX_QUANTITY)


def _looked_up(value: object) -> bool:
    """Whether `value` is text that may be looked up (no control characters: NUL is
    not even storable in PostgreSQL text)."""
    return isinstance(value, str) and not has_control_characters(value)


def _validate(events: object, now: datetime) -> list[_Event]:
    if not isinstance(events, list):
        raise BatchRejected([{"index": None, "errors": ['"events" must be a list']}])
    lookback, max_quantity = _limits()
    wanted_slugs, wanted_codes = set(), set()
    for e in events:
        if isinstance(e, dict):
            slug, code = e.get("organization"), e.get("product")
            if _looked_up(slug):
                wanted_slugs.add(slug)
            if _looked_up(code):
                wanted_codes.add(code)
    organizations = {
        row.slug: _Org(row.id, row.cycle_anchor_day, row.created_at)
        for row in db.session.execute(
            select(Organization.id, Organization.slug, Organization.cycle_anchor_day, Organization.created_at)
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
    earliest = now - lookback
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
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_EVENT_ID_LENGTH \
                or has_control_characters(event_id):
            errors.append(f"id must be a non-empty string of at most {MAX_EVENT_ID_LENGTH} characters, "
                          "without control characters")
        slug = event.get("organization")
        organization = organizations.get(slug) if _looked_up(slug) else None
        if organization is None:
            errors.append(f"unknown organization {_shown(slug)}")
        code = event.get("product")
        product = products.get(code) if _looked_up(code) else None
        if product is None:
            errors.append(f"unknown product {_shown(code)}")
        else:
            problem = product_problems[code]
            if problem is not None:
                errors.append(problem)
        try:
            quantity = money.quantity(event.get("quantity"), maximum=max_quantity)
        except money.MoneyError as error:
            errors.append(str(error))
            quantity = None
        occurred_at = parse_timestamp(event.get("occurred_at"))
        if occurred_at is None:
            errors.append("occurred_at must be an RFC 3339 timestamp with a time zone offset")
        elif occurred_at > latest:
            errors.append("occurred_at lies in the future")
        elif occurred_at < earliest:
            errors.append(f"occurred_at is older than the {lookback.days}-day lookback (USAGE_LOOKBACK_DAYS)")
        elif organization is not None and organization.created_at is not None \
                and occurred_at < organization.created_at - MAX_FUTURE_SKEW:
            errors.append(f"occurred_at is before organization {slug!r} existed "
                          f"(created {organization.created_at.isoformat()})")
        resource = event.get("resource", "")
        if resource is None:
            resource = ""
        if not isinstance(resource, str) or len(resource) > MAX_RESOURCE_LENGTH or has_control_characters(resource):
            errors.append(f"resource must be a string of at most {MAX_RESOURCE_LENGTH} characters, "
                          "without control characters")
        if errors:
            problems.append({"index": index, "id": event_id if isinstance(event_id, str) else None,
                             "errors": errors})
        elif not problems:  # once the batch is rejected, only the problems matter
            valid.append(_Event(event_id, organization, product, quantity, occurred_at, resource, index))
    if problems:
        raise BatchRejected(problems)
    return valid


def _shown(value: object) -> str:
    """A value from the request, for an error message: short, and never a deep repr."""
    if isinstance(value, (str, int, float, Decimal)) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"(a JSON {'object' if isinstance(value, dict) else 'array' if isinstance(value, list) else 'value'})"


def ingest_usage(sender: str, events: object, now: datetime | None = None) -> IngestResult:
    """Validate, store and price a batch of usage events from `sender`.

    Raises BatchRejected (nothing stored) if any event is invalid, and EventConflict
    if an id was used before, or twice in the batch, for different content (the
    caller rolls back: nothing stored). Leaves the commit to the caller; a rollback
    undoes the whole batch, ids included.
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
    conflicts = []
    for event in batch:
        first = unique.setdefault(event.event_id, event)
        if first is not event and first.content() != event.content():
            conflicts.append(_conflict(event, first.content(), f"event {first.index} of this batch"))
    if conflicts:
        raise EventConflict(conflicts)
    organizations = {event.organization.id: event.organization for event in unique.values()}
    times = [event.occurred_at for event in unique.values()]
    placements = _placements(organizations, min(times), max(times), now)

    # Where each event is priced, decided once: the item it adds to, as (invoice id,
    # product, resource, origin period), or None for usage priced when the next invoice opens.
    item_of: dict[str, tuple | None] = {}
    rows = []
    for event in unique.values():
        invoice_id, origin = place_usage(placements[event.organization.id], event.occurred_at)
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
    if len(inserted) < len(unique):
        _refuse_conflicting_resends(sender, [event for event_id, event in unique.items() if event_id not in inserted])
    unplaced = {unique[event_id].organization.id for event_id in inserted if item_of[event_id] is None}
    if unplaced:
        _hold_open(placements, unplaced)
    result.accepted = len(inserted)
    result.duplicates = len(batch) - result.accepted
    if result.duplicates:
        # Every copy but the one stored: an id accepted before, or repeated in the batch.
        _record_resends(sender, "duplicate", [(event.event_id, "") for event in batch
                                              if event.event_id not in inserted or unique[event.event_id] is not event],
                        now)

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


_CONTENT_FIELDS = ("organization", "product", "quantity", "occurred_at", "resource")


def _conflict(event: _Event, stored: tuple, where: str) -> dict:
    differing = [name for name, mine, theirs in zip(_CONTENT_FIELDS, event.content(), stored, strict=True)
                 if mine != theirs]
    return {"index": event.index, "id": event.event_id,
            "errors": [f"id {event.event_id!r} was used by {where} with a different "
                       f"{', '.join(differing)}; a resend must repeat the event unchanged"],
            "fields": differing}


def _refuse_conflicting_resends(sender: str, resent: list[_Event]) -> None:
    """The ids of `resent` were claimed before (this insert skipped them): a duplicate
    only if the stored event is the same, else EventConflict."""
    by_id = {event.event_id: event for event in resent}
    stored = {
        row.event_id: (row.organization_id, row.product_id, row.quantity, row.occurred_at, row.resource or "")
        for row in db.session.execute(
            select(UsageEvent.event_id, UsageEvent.organization_id, UsageEvent.product_id, UsageEvent.quantity,
                   UsageEvent.occurred_at, UsageEvent.resource)
            .where(UsageEvent.sender == sender, _any(UsageEvent.event_id, sorted(by_id), String))
        )
    }
    conflicts = [_conflict(event, stored[event_id], "an event received earlier")
                 for event_id, event in by_id.items() if event_id in stored and stored[event_id] != event.content()]
    if conflicts:
        conflicts.sort(key=lambda conflict: conflict["index"])
        raise EventConflict(conflicts, sender)


def _record_resends(sender: str, decision: str, resends: list[tuple[str, str]], now: datetime) -> None:
    """Record resends of accepted ids ((event id, fields that differed)) for support."""
    db.session.execute(insert(UsageEventResend), [
        {"sender": sender, "event_id": event_id, "decision": decision, "fields": fields[:200], "received_at": now}
        for event_id, fields in resends])


def record_conflicts(refused: EventConflict, now: datetime | None = None) -> int:
    """After the rollback of a batch refused for reusing accepted ids with different
    content: record each refusal against the accepted event, for support's drill-down.
    Returns how many were recorded; the caller commits."""
    if refused.sender is None:
        return 0
    resends = [(conflict["id"], ", ".join(conflict.get("fields", []))) for conflict in refused.conflicts]
    _record_resends(refused.sender, "conflict", resends, now or utcnow())
    return len(resends)


def _placements(organizations: dict[int, _Org], earliest: datetime, latest: datetime,
                now: datetime) -> dict[int, Placement]:
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
    placements: dict[int, Placement] = {}
    closed = defaultdict(list)
    for row in rows:
        if row.status == "open":
            placements[row.organization_id] = Placement(
                row.id, row.period_start, row.period_end, organizations[row.organization_id].cycle_anchor_day)
        else:
            closed[row.organization_id].append((row.period_start, row.period_end))
    for organization_id, organization in organizations.items():
        placement = placements.get(organization_id)
        if placement is None:
            invoice = ensure_open_invoice(db.session.get(Organization, organization_id), now)
            placement = placements[organization_id] = Placement.of(invoice, organization.cycle_anchor_day)
        placement.closed = closed[organization_id]
    return placements


def _hold_open(placements: dict[int, Placement], organization_ids: set[int]) -> None:
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

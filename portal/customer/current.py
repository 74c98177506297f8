"""What the open invoice's partial shows, read from the database in a fixed number
of queries whatever the number of lines or events (never from Stripe): its lines
grouped by product, the daily spend by product for the chart, the projection, and
whether Stripe has the latest figures."""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from portal import money
from portal.customer.stripe_status import StripeStatus, stripe_status
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Product, SyncRun, UsageEvent
from portal.models.types import utcnow
from portal.units import Readable, period_text, readable

# The order groups are listed in: usage first, then services, then credits.
_KIND_ORDER = {"metered": 0, "recurring": 1, "credit": 2}


@dataclass
class ResourceLine:
    item: InvoiceItem
    label: str
    quantity: Readable | None  # None for a credit


@dataclass
class LineGroup:
    product: Product
    lines: list[ResourceLine] = field(default_factory=list)
    subtotal_cents: int = 0
    quantity: Readable | None = None

    @property
    def kind(self) -> str:
        return self.product.kind

    @property
    def title(self) -> str:
        return "Credits" if self.kind == "credit" else self.product.name


@dataclass
class CurrentInvoice:
    invoice: Invoice
    period: str
    groups: list[LineGroup]
    chart: dict
    stripe: StripeStatus
    last_sync: SyncRun | None
    projection: object | None
    usage_cents: int
    credits_cents: int  # positive: how much the credits take off
    version: str

    @property
    def carried_to_next_cents(self) -> int:
        """What Stripe keeps as the customer's balance when credits exceed the charges."""
        return max(0, -self.invoice.total_cents)

    @property
    def chart_json(self) -> str:
        return json.dumps(self.chart, separators=(",", ":"))


def group_lines(invoice: Invoice) -> list[LineGroup]:
    """The invoice's items grouped by product, each group with its subtotal (a sum of
    the lines' integer cents) and, for usage, its quantity in a person's unit."""
    groups: dict[int, LineGroup] = {}
    quantities: dict[int, Decimal] = defaultdict(Decimal)
    for item in invoice.items:
        product = item.product
        group = groups.setdefault(product.id, LineGroup(product=product))
        if product.kind == "credit":
            line = ResourceLine(item=item, label=item.description, quantity=None)
        else:
            label = item.resource or ("all usage" if product.kind == "metered" else "—")
            if item.origin_period_start and item.origin_period_end:
                label += f" (late usage of {period_text(item.origin_period_start, item.origin_period_end)})"
            line = ResourceLine(item=item, label=label, quantity=readable(item.quantity, product.unit))
            quantities[product.id] += item.quantity
        group.lines.append(line)
    for group in groups.values():
        group.subtotal_cents = money.total(line.item.amount_cents for line in group.lines)
        if group.kind == "metered":
            group.quantity = readable(quantities[group.product.id], group.product.unit)
    return sorted(groups.values(), key=lambda group: (_KIND_ORDER.get(group.kind, 9), group.product.name))


def _day_column():
    if db.engine.dialect.name == "postgresql":
        return func.date(func.timezone("UTC", UsageEvent.occurred_at))
    return func.date(UsageEvent.occurred_at)


def daily_usage(invoice: Invoice) -> dict[tuple[str, int], Decimal]:
    """Quantity used per (UTC day, product) in the invoice's period, as priced onto it:
    one grouped query (PostgreSQL sums exactly; SQLite keeps quantities as text, so
    its rows are summed here as decimals)."""
    day = _day_column().label("day")
    period = (UsageEvent.organization_id == invoice.organization_id,
              UsageEvent.occurred_at >= invoice.period_start, UsageEvent.occurred_at < invoice.period_end,
              UsageEvent.invoice_id == invoice.id)
    totals: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    if db.engine.dialect.name == "postgresql":
        rows = db.session.execute(
            select(day, UsageEvent.product_id, func.sum(UsageEvent.quantity)).where(*period)
            .group_by(day, UsageEvent.product_id))
        for day_text, product_id, quantity in rows:
            totals[(str(day_text), product_id)] += Decimal(quantity)
    else:
        rows = db.session.execute(select(day, UsageEvent.product_id, UsageEvent.quantity).where(*period))
        for day_text, product_id, quantity in rows:
            totals[(str(day_text), product_id)] += Decimal(quantity)
    return totals


def _days(start: datetime, end: datetime) -> list[date]:
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def spend_chart(invoice: Invoice, now: datetime | None = None) -> dict:
    """Daily spend by metered product over the period, up to today: each day's
    quantity priced at the line's unit price through the money module. Amounts are
    integer cents with their display text beside them (the browser formats nothing)."""
    now = now or utcnow()
    prices: dict[int, tuple[Product, Decimal]] = {}
    for item in invoice.items:
        if item.product.kind == "metered" and item.origin_period_start is None:
            prices.setdefault(item.product_id, (item.product, item.unit_price))
    usage = daily_usage(invoice)
    days = [day for day in _days(invoice.period_start, invoice.period_end) if day <= now.date()] or \
        [invoice.period_start.date()]
    labels = [day.isoformat() for day in days]
    series = []
    day_totals = [0] * len(days)
    for product_id, (product, unit_price) in sorted(prices.items(), key=lambda entry: entry[1][0].name):
        cents = [money.line_amount(usage.get((label, product_id), Decimal(0)), unit_price) for label in labels]
        day_totals = [a + b for a, b in zip(day_totals, cents, strict=True)]
        series.append({"product": product.name, "cents": cents,
                       "text": [money.format_money(value, invoice.currency) for value in cents]})
    return {"days": labels, "series": series, "axis": f"{invoice.currency.upper()} per day",
            "totals": [money.format_money(value, invoice.currency) for value in day_totals]}


def current_invoice(invoice: Invoice, last_sync: SyncRun | None, now: datetime | None = None) -> CurrentInvoice:
    """Everything the open invoice's partial shows (items must be loaded with their
    products: `Invoice.items` joined, as the page's query does)."""
    groups = group_lines(invoice)
    credits = -money.total(group.subtotal_cents for group in groups if group.kind == "credit")
    usage = money.total(group.subtotal_cents for group in groups if group.kind != "credit")
    return CurrentInvoice(
        invoice=invoice,
        period=period_text(invoice.period_start, invoice.period_end),
        groups=groups,
        chart=spend_chart(invoice, now),
        stripe=stripe_status(invoice, last_sync),
        last_sync=last_sync,
        projection=_projection(invoice, now),
        usage_cents=usage,
        credits_cents=credits,
        version=invoice_version(invoice, last_sync),
    )


def invoice_version(invoice: Invoice, last_sync: SyncRun | None) -> str:
    """Changes whenever anything the partial shows from the database changes: the
    live refresh sends the partial again only then."""
    organization = invoice.organization
    parts = (invoice.id, invoice.status, invoice.change_seq, invoice.synced_seq, invoice.sync_blocked or "",
             last_sync.id if last_sync else 0, organization.stripe_balance_cents, organization.payment_method or "")
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:20]


def _projection(invoice: Invoice, now: datetime | None):
    from portal.billing.projection import project

    return project(invoice, now=now)


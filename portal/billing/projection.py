"""The projected end-of-period total of an open invoice, from the database alone.

projected total = the invoice's total now
                + metered usage's run rate over the last N days (N = min(7, days
                  elapsed in the period)) x the time left in the period.

The invoice's total already charges each attached service to the period's end
(see `portal.billing.services`: what the cycle costs if nothing changes), so the
services' known remaining cost is inside it, not added twice. The parts are
reported apart: `so_far_cents` (what has accrued up to now), `services_remaining_cents`
(the attached services' charge for the time after now, by the same formula that
bills them) and `usage_remaining_cents` (the run rate carried forward), with
`total_cents = so_far_cents + services_remaining_cents + usage_remaining_cents`.
Credits on the invoice are in its total, so they lower the projection.

An estimate for people, never billed or sent to Stripe; reading it writes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from portal import money
from portal.billing.services import service_charge_cents
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Product, ServiceAttachment, UsageEvent
from portal.models.types import utcnow

# The run rate looks back at most this far.
BASIS = timedelta(days=7)
_DAY_SECONDS = 86_400


@dataclass(frozen=True)
class Projection:
    total_cents: int
    so_far_cents: int
    usage_remaining_cents: int
    services_remaining_cents: int
    # The invoice's total as stored (services charged to the period's end).
    invoice_total_cents: int
    # Credits on the invoice (zero or negative), already inside the totals above.
    credits_cents: int
    # The span of usage the run rate is taken over, and the time left in the period.
    basis_days: Decimal
    basis_seconds: int
    seconds_left: int
    currency: str
    explanation: str

    @property
    def period_over(self) -> bool:
        return self.seconds_left == 0


def _span_in_words(seconds: int) -> str:
    if seconds >= _DAY_SECONDS:
        days = Decimal(seconds) / _DAY_SECONDS
        shown = f"{days.quantize(Decimal('0.1')).normalize():f}"
        return f"{shown} day" if shown == "1" else f"{shown} days"
    hours = seconds // 3600
    if hours >= 1:
        return "hour" if hours == 1 else f"{hours} hours"
    minutes = max(1, seconds // 60)
    return "minute" if minutes == 1 else f"{minutes} minutes"


def _priced_usage(invoice: Invoice, start: datetime, end: datetime) -> list[tuple[Decimal, Decimal]]:
    """(quantity, unit price) of the organization's metered usage in [start, end)."""
    where = (
        UsageEvent.organization_id == invoice.organization_id,
        UsageEvent.occurred_at >= start,
        UsageEvent.occurred_at < end,
        Product.kind == "metered",
    )
    if db.engine.dialect.name == "postgresql":
        # NUMERIC sums are exact: one row per product.
        rows = db.session.execute(
            select(func.sum(UsageEvent.quantity), Product.unit_price)
            .join(Product, Product.id == UsageEvent.product_id)
            .where(*where)
            .group_by(Product.id, Product.unit_price)
        )
        return [(Decimal(quantity), price) for quantity, price in rows]
    # SQLite keeps quantities as decimal text and would sum them as floats: add them here.
    totals: dict[Decimal, Decimal] = {}
    rows = db.session.execute(
        select(UsageEvent.quantity, Product.unit_price)
        .join(Product, Product.id == UsageEvent.product_id)
        .where(*where)
        .execution_options(yield_per=5000)
    )
    for quantity, price in rows:
        totals[price] = totals.get(price, Decimal(0)) + quantity
    return [(quantity, price) for price, quantity in totals.items()]


def _services_remaining(invoice: Invoice, now: datetime) -> int:
    """The attached services' charge for [now, period end), as the invoice bills it:
    each one's charge to its end less its charge to now (both rounded as billed)."""
    attachments = db.session.execute(
        select(ServiceAttachment, Product)
        .join(Product, Product.id == ServiceAttachment.product_id)
        .where(
            ServiceAttachment.organization_id == invoice.organization_id,
            ServiceAttachment.attached_at < invoice.period_end,
            ServiceAttachment.detached_at.is_(None),
        )
    )
    anchor_day = invoice.organization.cycle_anchor_day
    remaining = 0
    for attachment, product in attachments:
        whole = service_charge_cents(product, attachment.quantity, attachment.attached_at,
                                     invoice.period_end, invoice=invoice, anchor_day=anchor_day)
        accrued = service_charge_cents(product, attachment.quantity, attachment.attached_at,
                                       max(now, attachment.attached_at), invoice=invoice, anchor_day=anchor_day)
        remaining += whole - accrued
    return remaining


def _credits(invoice: Invoice) -> int:
    credits = db.session.scalar(
        select(func.coalesce(func.sum(InvoiceItem.amount_cents), 0))
        .join(Product, Product.id == InvoiceItem.product_id)
        .where(InvoiceItem.invoice_id == invoice.id, Product.kind == "credit")
    )
    return int(credits or 0)


def project(invoice: Invoice, now: datetime | None = None) -> Projection:
    """The invoice's projected total at its period's end (see the module's docstring).
    Three or four queries, whatever the number of events or lines."""
    now = min(max(now or utcnow(), invoice.period_start), invoice.period_end)
    elapsed = money.seconds_between(invoice.period_start, now)
    seconds_left = money.seconds_between(now, invoice.period_end)
    basis_seconds = min(elapsed, int(BASIS.total_seconds()))
    usage_remaining = 0
    if basis_seconds and seconds_left:
        priced = _priced_usage(invoice, now - timedelta(seconds=basis_seconds), now)
        usage_remaining = money.extrapolated_amount(priced, basis_seconds, seconds_left)
    services_remaining = _services_remaining(invoice, now) if seconds_left else 0
    credits = _credits(invoice)
    invoice_total = invoice.total_cents
    so_far = invoice_total - services_remaining
    total = money.total([so_far, services_remaining, usage_remaining])

    if not seconds_left:
        explanation = "The period is over: this is the invoice's total."
    elif not basis_seconds:
        explanation = ("The period has just begun, so there is no usage to go on yet: the total so far "
                       "plus the services you have attached, to the end of the period.")
    else:
        explanation = (f"Usage of the last {_span_in_words(basis_seconds)} continued to the end of the period, "
                       "plus the services you have attached.")
    if credits:
        explanation += f" Credits of {money.format_money(-credits, invoice.currency)} are taken off."
    return Projection(
        total_cents=total,
        so_far_cents=so_far,
        usage_remaining_cents=usage_remaining,
        services_remaining_cents=services_remaining,
        invoice_total_cents=invoice_total,
        credits_cents=credits,
        basis_days=(Decimal(basis_seconds) / _DAY_SECONDS).quantize(Decimal("0.01")),
        basis_seconds=basis_seconds,
        seconds_left=seconds_left,
        currency=invoice.currency,
        explanation=explanation,
    )

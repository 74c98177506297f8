"""Spend alerts: an owner's thresholds on the open invoice's total and on its
projected end-of-period total (`portal.billing.projection`).

`evaluate_alerts(invoice_id)` records each threshold the invoice has reached as a
crossing, unique per (alert, invoice), with an INSERT that does nothing when the
crossing exists: two workers evaluating at once record it once, and only the one
whose insert took queues the mail (in the same transaction, in the outbox), so a
crossing is mailed once per threshold and billing cycle. A total that dips below a
threshold (a credit) and rises again is the same crossing. Safe to run any number
of times; the caller commits and then enqueues the outbox's delivery.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from portal import money
from portal.extensions import db
from portal.models import ALERT_KINDS, AlertCrossing, Invoice, Organization, OutboxMail, SpendAlert
from portal.models.types import utcnow

# A typo guard for a form, not a policy.
MAX_THRESHOLD_CENTS = 100_000_000_00
MAX_ALERTS_PER_ORGANIZATION = 20
KIND_WORDS = {"total": "the total so far", "projection": "the projected total"}


class AlertError(ValueError):
    """An alert that cannot be set (an amount that is not money, too many alerts...)."""


@dataclass(frozen=True)
class Banner:
    """A crossing of the open invoice, as the billing page says it."""

    alert: SpendAlert
    crossing: AlertCrossing
    currency: str

    @property
    def text(self) -> str:
        threshold = money.format_money(self.alert.threshold_cents, self.currency)
        amount = money.format_money(self.crossing.amount_cents, self.currency)
        if self.alert.kind == "total":
            return f"This period's spend reached {amount}, past your alert at {threshold}."
        return f"This period is projected to cost {amount}, past your alert at {threshold}."


def threshold_cents(amount_in_dollars: object) -> int:
    """Whole cents from dollars as typed ("250" or "250.00"), positive, at most two decimals."""
    if not isinstance(amount_in_dollars, str) or not amount_in_dollars.strip():
        raise AlertError("Enter an amount in dollars, e.g. 250 or 250.00.")
    try:
        dollars = money.parse_decimal(amount_in_dollars.strip(), field="amount")
    except money.MoneyError:
        raise AlertError("The amount must be plain digits with an optional '.' and cents, e.g. 250.00.") from None
    if dollars <= 0:
        raise AlertError("The amount must be greater than zero.")
    if dollars != dollars.quantize(Decimal("0.01")):
        raise AlertError("The amount has more than two decimal places.")
    cents = money.round_cents(dollars.scaleb(2))
    if cents > MAX_THRESHOLD_CENTS:
        raise AlertError(f"The amount is larger than {money.format_money(MAX_THRESHOLD_CENTS)}.")
    return cents


def alerts_of(organization: Organization) -> list[SpendAlert]:
    return list(db.session.scalars(
        select(SpendAlert).where(SpendAlert.organization_id == organization.id)
        .order_by(SpendAlert.kind, SpendAlert.threshold_cents)
    ))


def add_alert(organization: Organization, kind: str, cents: int, created_by: str | None = None) -> SpendAlert:
    """A new threshold; the same (kind, amount) twice is refused. The caller commits."""
    if kind not in ALERT_KINDS:
        raise AlertError("Choose whether the alert watches the total so far or the projected total.")
    existing = alerts_of(organization)
    if any(alert.kind == kind and alert.threshold_cents == cents for alert in existing):
        raise AlertError(f"There is already an alert on {KIND_WORDS[kind]} at "
                         f"{money.format_money(cents, organization.currency)}.")
    if len(existing) >= MAX_ALERTS_PER_ORGANIZATION:
        raise AlertError(f"An organization has at most {MAX_ALERTS_PER_ORGANIZATION} alerts; remove one first.")
    alert = SpendAlert(organization_id=organization.id, kind=kind, threshold_cents=cents, created_by=created_by)
    db.session.add(alert)
    db.session.flush()
    return alert


def remove_alert(organization: Organization, alert_id: int) -> bool:
    """Remove the organization's alert (its crossings go with it). The caller commits."""
    result = db.session.execute(
        delete(SpendAlert).where(SpendAlert.id == alert_id, SpendAlert.organization_id == organization.id)
    )
    return result.rowcount == 1


def _insert(table):
    insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
    return insert(table)


def _mail(organization: Organization, invoice: Invoice, alert: SpendAlert, amount: int) -> tuple[str, str]:
    threshold = money.format_money(alert.threshold_cents, invoice.currency)
    figure = money.format_money(amount, invoice.currency)
    period = f"{invoice.period_start:%Y-%m-%d} to {invoice.period_end:%Y-%m-%d}"
    if alert.kind == "total":
        subject = f"{organization.name}: this period's spend passed {threshold}"
        what = f"The current invoice of {organization.name} ({period}) reached {figure}."
    else:
        subject = f"{organization.name}: this period is projected to pass {threshold}"
        what = (f"At its current pace, the invoice of {organization.name} for {period} is projected "
                f"to reach {figure} by the end of the period.")
    body = (f"{what}\n\nYou asked to be told when {KIND_WORDS[alert.kind]} passes {threshold}. "
            "This is the only mail for this alert this period.\n\n"
            "The billing page shows the invoice line by line; an owner can change the alerts there.\n")
    return subject, body


def evaluate_alerts(invoice_id: int, now: datetime | None = None) -> list[AlertCrossing]:
    """Record (and queue one mail for) each of the organization's thresholds the open
    invoice has newly reached. Returns the crossings this call recorded (empty when
    another evaluation recorded them first). The caller commits."""
    invoice = db.session.get(Invoice, invoice_id)
    if invoice is None or invoice.status != "open":
        return []
    alerts = list(db.session.scalars(select(SpendAlert).where(SpendAlert.organization_id == invoice.organization_id)))
    if not alerts:
        return []
    already = set(db.session.scalars(
        select(AlertCrossing.alert_id).where(AlertCrossing.invoice_id == invoice.id)
    ))
    pending = [alert for alert in alerts if alert.id not in already]
    if not pending:
        return []
    figures = {"total": invoice.total_cents}
    if any(alert.kind == "projection" for alert in pending):
        from portal.billing.projection import project

        figures["projection"] = project(invoice, now).total_cents
    recorded = []
    organization = invoice.organization
    for alert in pending:
        amount = figures[alert.kind]
        if amount < alert.threshold_cents:
            continue
        crossing_id = db.session.scalar(
            _insert(AlertCrossing.__table__)
            .values(alert_id=alert.id, invoice_id=invoice.id, amount_cents=amount, crossed_at=now or utcnow())
            .on_conflict_do_nothing(index_elements=["alert_id", "invoice_id"])
            .returning(AlertCrossing.__table__.c.id)
        )
        if crossing_id is None:
            continue  # another evaluation recorded it (and queued its mail) first
        subject, body = _mail(organization, invoice, alert, amount)
        db.session.add(OutboxMail(crossing_id=crossing_id, recipient=organization.billing_email,
                                  subject=subject, body=body))
        recorded.append(db.session.get(AlertCrossing, crossing_id))
    db.session.flush()
    return recorded


def alerts_and_crossings(organization: Organization) -> list[tuple[SpendAlert, AlertCrossing | None, str]]:
    """Each alert of the organization with its crossing of the open invoice (or None)
    and the currency to say it in: one query for the page's banner and its list."""
    open_invoice_id = (
        select(Invoice.id)
        .where(Invoice.organization_id == organization.id, Invoice.status == "open")
        .scalar_subquery()
    )
    rows = db.session.execute(
        select(SpendAlert, AlertCrossing)
        .outerjoin(AlertCrossing, (AlertCrossing.alert_id == SpendAlert.id)
                   & (AlertCrossing.invoice_id == open_invoice_id))
        .where(SpendAlert.organization_id == organization.id)
        .order_by(SpendAlert.kind, SpendAlert.threshold_cents)
    )
    return [(alert, crossing, organization.currency) for alert, crossing in rows]


def banners(rows: list[tuple[SpendAlert, AlertCrossing | None, str]]) -> list[Banner]:
    """The open invoice's crossings, newest first."""
    crossed = [Banner(alert, crossing, currency) for alert, crossing, currency in rows if crossing is not None]
    return sorted(crossed, key=lambda banner: (banner.crossing.crossed_at, banner.crossing.id), reverse=True)


DELIVERY_JOB_ID = "portal-deliver-outbox"


def enqueue_delivery() -> None:
    """Queue one run of the outbox's delivery (a burst of crossings is one job)."""
    from portal.queue import queue

    queue("default").enqueue("jobs.alerts.deliver_outbox", job_id=DELIVERY_JOB_ID, result_ttl=600)


def evaluate_and_queue(invoice_id: int) -> int:
    """Evaluate the invoice's alerts and commit; queue the mails' delivery if any
    crossing was recorded. Inside an app context. Returns how many were recorded."""
    crossings = evaluate_alerts(invoice_id)
    db.session.commit()
    if crossings:
        enqueue_delivery()
    return len(crossings)

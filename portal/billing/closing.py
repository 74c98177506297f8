"""The end of a billing cycle, and keeping the portal's invoice in step with Stripe's.

`close_cycle(invoice_id)`: claim the open invoice for closing (status `closing`) and,
in the same transaction, open the organization's next invoice, so usage that arrives
from then on lands on the new invoice (usage for the closing period as a labelled
late line); then the final sync, and the finalize at Stripe with automatic
collection. `apply_stripe_invoice(...)`: move the portal invoice to the state of the
Stripe invoice (finalized with its number and links, paid, uncollectible, void),
opening the next invoice when it leaves `open`.

Both are idempotent and may run in either order, twice, or concurrently (the close
job, the `invoice.finalized` webhook, Stripe finalizing on its own at
`automatically_finalizes_at`): states only move forward, the claim is one
conditional UPDATE, the finalize happens under the invoice's lock after re-checking
the state, and the partial unique index allows one open invoice per organization.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import select, update

from portal.billing.invoices import ensure_open_invoice
from portal.billing.service_charges import charge_services
from portal.billing.sync import sync_invoice
from portal.extensions import db
from portal.locks import DEFAULT_WAIT_SECONDS, LockLost, invoice_lock
from portal.models import Invoice, Organization
from portal.models.types import utcnow
from portal.stripe_gateway import (
    InvoiceNotEditable,
    StripeFailure,
    StripeGateway,
    StripeObjectMissing,
    gateway,
)

log = logging.getLogger(__name__)

# Forward-only order of invoice states; terminal states share the top rank.
RANK = {"open": 0, "closing": 1, "finalized": 2, "paid": 3, "uncollectible": 3, "void": 3}
STRIPE_TO_PORTAL = {"open": "finalized", "paid": "paid", "uncollectible": "uncollectible", "void": "void"}


class CloseError(Exception):
    """The close could not finish now; it is safe to run again."""


class CloseDeferred(CloseError):
    """A sync or close of the invoice holds its lock right now: run again in a moment."""


def may_move(current: str, new: str) -> bool:
    """States only move forward; a debt marked uncollectible can still be paid."""
    if current == new:
        return False
    if current == "uncollectible" and new == "paid":
        return True
    return RANK[new] > RANK[current]


def open_next_invoice(invoice: Invoice) -> Invoice:
    """The organization's open invoice after `invoice` (created if missing): the cycle
    that starts where `invoice` ends. Safe to call any number of times."""
    organization = db.session.get(Organization, invoice.organization_id)
    return ensure_open_invoice(organization, invoice.period_end)


def claim_for_closing(invoice_id: int, now: datetime | None = None, end_now: bool = False) -> bool:
    """Move an open invoice to `closing` and open the next one, in one transaction.
    Returns False if the invoice was not open (someone else closed it first).
    With `end_now` (support's "close cycle now"), the period ends now and the new
    invoice runs from now to the usual end of the cycle."""
    now = now or utcnow()
    invoice = db.session.get(Invoice, invoice_id, populate_existing=True)
    if invoice is None or invoice.status != "open":
        return False
    values = {"status": "closing"}
    original_end = invoice.period_end
    if end_now and invoice.period_start < now < invoice.period_end:
        values["period_end"] = now
    claimed = db.session.execute(
        update(Invoice).where(Invoice.id == invoice_id, Invoice.status == "open").values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not claimed:
        db.session.rollback()
        return False
    db.session.refresh(invoice)
    organization = db.session.get(Organization, invoice.organization_id)
    if "period_end" in values:
        # Cut short: services are charged to the new end, and the next invoice runs
        # for the rest of this cycle.
        charge_services(invoice)
        ensure_open_invoice(organization, period=(invoice.period_end, original_end))
    else:
        ensure_open_invoice(organization, invoice.period_end)
    db.session.commit()
    return True


def close_cycle(invoice_id: int, end_now: bool = False, stripe: StripeGateway | None = None,
                wait_seconds: float = DEFAULT_WAIT_SECONDS) -> str:
    """Close one invoice's cycle: claim, final sync, finalize at Stripe. Returns the
    outcome; raises CloseError when it must be retried later (e.g. Stripe is down),
    CloseDeferred when the invoice stayed locked for `wait_seconds` (jobs wait none)."""
    invoice = db.session.get(Invoice, invoice_id)
    if invoice is None:
        raise LookupError(f"no invoice {invoice_id}")
    if invoice.status == "open":
        if not end_now and invoice.period_end > utcnow():
            db.session.commit()
            return "not_due"
        claim_for_closing(invoice_id, end_now=end_now)
    invoice = db.session.get(Invoice, invoice_id, populate_existing=True)
    status = invoice.status
    db.session.commit()  # hold no transaction while waiting for the invoice's lock
    if status != "closing":
        return f"already_{status}"
    run = sync_invoice(invoice_id, trigger="cycle_close", stripe=stripe, wait_seconds=wait_seconds)
    if run.outcome in ("locked", "write_in_flight"):
        raise CloseDeferred(f"final sync of invoice {invoice_id}: {run.outcome}: {run.error or 'another job holds it'}")
    if run.outcome == "stripe_invoice_finalized":
        return refresh_from_stripe(invoice_id, stripe)
    if run.outcome == "not_open":  # finished by a concurrent close or a webhook meanwhile
        return f"already_{db.session.get(Invoice, invoice_id, populate_existing=True).status}"
    if run.outcome not in ("synced", "unchanged"):
        raise CloseError(f"final sync of invoice {invoice_id}: {run.outcome}: {run.error or ''}")
    return _finalize(invoice_id, stripe or gateway(), wait_seconds)


def _finalize(invoice_id: int, stripe: StripeGateway, wait_seconds: float) -> str:
    with invoice_lock(invoice_id, wait_seconds) as lock:
        if lock is None:
            raise CloseDeferred(f"invoice {invoice_id} is locked by another job")
        invoice = db.session.get(Invoice, invoice_id, populate_existing=True)
        db.session.commit()
        if invoice.status != "closing":
            return f"already_{invoice.status}"  # a webhook got here first
        stripe_id = invoice.stripe_invoice_id
        stripe.fence = lock.check
        try:
            stripe_invoice = stripe.retrieve_invoice(stripe_id)
            if stripe_invoice.status == "draft":
                stripe_invoice = stripe.finalize_invoice(stripe_id, invoice=invoice_id)
            _delete_stray_drafts(stripe, invoice, stripe_invoice.customer)
        except InvoiceNotEditable:
            stripe_invoice = stripe.retrieve_invoice(stripe_id)
        except (StripeFailure, LockLost) as failure:
            raise CloseError(f"finalize invoice {invoice_id}: {failure}") from failure
        finally:
            stripe.fence = None
            if stripe.write_in_flight:
                lock.abandon()
        return apply_stripe_invoice(invoice_id, stripe_invoice, stripe=stripe)


def _delete_stray_drafts(stripe: StripeGateway, invoice: Invoice, customer) -> None:
    """Delete other drafts made for this invoice: a sync that lost its lock while
    Stripe was creating a draft leaves one the portal never claimed, scheduled to
    finalize on its own. Only drafts naming this invoice in their metadata."""
    customer_id = customer if isinstance(customer, str) else customer.id
    strays = [draft.id for draft in stripe.draft_invoices_of(customer_id)
              if draft.id != invoice.stripe_invoice_id
              and _metadata(draft).get("portal_invoice_id") == str(invoice.id)]
    for stray in strays:
        try:
            stripe.delete_draft(stray, invoice=invoice.id)
        except StripeObjectMissing:
            pass  # deleted meanwhile: what was wanted
        log.warning("invoice %s: deleted stray Stripe draft %s", invoice.id, stray)


def refresh_from_stripe(invoice_id: int, stripe: StripeGateway | None = None, problem: str | None = None) -> str:
    """Re-read the Stripe invoice and apply its state (what a webhook handler does when
    order matters). `problem` is what the event said that the invoice does not show
    (`action_required`: the customer must confirm the payment)."""
    invoice = db.session.get(Invoice, invoice_id)
    if invoice is None or not invoice.stripe_invoice_id:
        return "no_stripe_invoice"
    stripe_id = invoice.stripe_invoice_id
    db.session.commit()
    stripe = stripe or gateway()
    try:
        stripe_invoice = stripe.retrieve_invoice(stripe_id)
    except StripeObjectMissing:
        return "stripe_invoice_missing"
    return apply_stripe_invoice(invoice_id, stripe_invoice, problem, stripe)


def apply_stripe_invoice(invoice_id: int, stripe_invoice, problem: str | None = None,
                         stripe: StripeGateway | None = None) -> str:
    """Move the portal invoice forward to the Stripe invoice's state; open the next
    invoice when it leaves `open`; record how its collection stands. Returns the
    portal status afterwards. `stripe` reads the finalized invoice's lines when the
    portal must carry over what did not reach them."""
    target = STRIPE_TO_PORTAL.get(stripe_invoice.status)
    invoice = db.session.scalar(
        select(Invoice).where(Invoice.id == invoice_id).with_for_update().execution_options(populate_existing=True)
    )
    _record_collection(invoice, stripe_invoice, problem)
    if target is None or not may_move(invoice.status, target):
        db.session.commit()
        return invoice.status
    was_draft = invoice.status in ("open", "closing")
    invoice.status = target
    invoice.sync_blocked = None
    invoice.number = stripe_invoice.number or invoice.number
    invoice.hosted_invoice_url = stripe_invoice.hosted_invoice_url or invoice.hosted_invoice_url
    invoice.invoice_pdf = stripe_invoice.invoice_pdf or invoice.invoice_pdf
    invoice.finalized_at = invoice.finalized_at or _stamp(stripe_invoice, "finalized_at") or utcnow()
    if target == "paid":
        invoice.paid_at = invoice.paid_at or _stamp(stripe_invoice, "paid_at") or utcnow()
    if was_draft:
        # Finalized behind the portal's back (dashboard, automatically_finalizes_at):
        # the cycle rolls over here, and what did not reach Stripe moves on.
        successor = _roll_over(invoice, stripe_invoice)
        _carry_over(invoice, stripe_invoice, successor, stripe or gateway())
    db.session.commit()
    return target


def _roll_over(invoice: Invoice, stripe_invoice) -> Invoice:
    """The next invoice after one Stripe finalized. Finalized before its period ended
    (in the dashboard, while the portal still had it open): its period ends there, its
    services are charged to that point, and the next invoice covers the rest of the
    cycle, so no part of the cycle goes unbilled."""
    finalized_at = _stamp(stripe_invoice, "finalized_at")
    if finalized_at is not None:
        finalized_at = min(finalized_at, utcnow())  # a Stripe clock ahead of ours never moves the cut ahead
    organization = db.session.get(Organization, invoice.organization_id)
    if (finalized_at is not None
            and invoice.period_start < finalized_at < invoice.period_end
            and db.session.scalar(select(Invoice.id).where(Invoice.organization_id == invoice.organization_id,
                                                           Invoice.status == "open")) is None):
        original_end = invoice.period_end
        invoice.period_end = finalized_at
        db.session.flush()
        charge_services(invoice)
        db.session.refresh(invoice)  # the charges moved its total in the database
        return ensure_open_invoice(organization, period=(finalized_at, original_end))
    return open_next_invoice(invoice)


def _record_collection(invoice: Invoice, stripe_invoice, problem: str | None) -> None:
    """What Stripe says of collecting the invoice: amounts, attempts, the next attempt,
    and whether the customer must act. A read older than what is stored (fewer
    attempts) changes nothing; paid, void and uncollectible end the attempts."""
    status = stripe_invoice.status
    if status == "draft":
        error = getattr(stripe_invoice, "last_finalization_error", None)
        if error:
            invoice.finalization_error = str(getattr(error, "message", None) or error)[:2000]
        return
    invoice.finalization_error = None
    attempts = int(getattr(stripe_invoice, "attempt_count", 0) or 0)
    if status == "open" and attempts < invoice.payment_attempts:
        return
    invoice.amount_due_cents = stripe_invoice.amount_due
    invoice.amount_paid_cents = stripe_invoice.amount_paid
    invoice.payment_attempts = max(attempts, invoice.payment_attempts)
    if status != "open":
        invoice.next_payment_attempt_at = None
        invoice.payment_problem = None
        if status == "paid" and not getattr(stripe_invoice, "paid_out_of_band", False):
            # Below Stripe's minimum charge: marked paid, and what it would have charged
            # (with any balance it took over) left on the customer's balance.
            invoice.carried_to_balance_cents = max(0, int(getattr(stripe_invoice, "ending_balance", 0) or 0))
        return
    next_attempt = getattr(stripe_invoice, "next_payment_attempt", None)
    invoice.next_payment_attempt_at = datetime.fromtimestamp(next_attempt, timezone.utc) if next_attempt else None
    if problem:
        invoice.payment_problem = problem
    elif attempts and invoice.payment_problem is None:
        invoice.payment_problem = "payment_failed"


CARRY_OVER_CODE = "portal.carry-over"


def _carry_over(invoice: Invoice, stripe_invoice, successor: Invoice, stripe: StripeGateway) -> None:
    """If Stripe finalized the invoice before the portal's last changes reached it,
    the portal-made lines on it differ from the portal's: move the difference to the
    next invoice, as a line naming the invoice it comes from, and take it off this
    one as a line naming where it went, so this invoice says what Stripe billed for
    the portal and nothing is lost or billed twice. Lines added at Stripe by hand (a
    fee or credit typed into the dashboard) are Stripe's own and never counted."""
    billed = sum(line.amount for line in stripe.invoice_lines(stripe_invoice.id)
                 if _metadata(line).get("portal_invoice") == str(invoice.id))
    difference = invoice.total_cents - billed
    if not difference:
        return
    from portal.billing.credits import own_product
    from portal.billing.pricing import set_item

    product = own_product(CARRY_OVER_CODE, "Carried over", "period")
    number = stripe_invoice.number or stripe_invoice.id
    period = f"{invoice.period_start:%Y-%m-%d} to {invoice.period_end:%Y-%m-%d}"
    nxt = f"{successor.period_start:%Y-%m-%d} to {successor.period_end:%Y-%m-%d}"
    set_item(invoice.id, product, f"{CARRY_OVER_CODE}||to:{successor.id}", resource="",
             description=f"Not on Stripe invoice {number} when Stripe finalized it: carried to the invoice "
                         f"for {nxt} (#{successor.id})",
             quantity=Decimal(1), amount_cents=-difference)
    set_item(successor.id, product, f"{CARRY_OVER_CODE}||from:{invoice.id}", resource="",
             description=f"Carried from invoice {number} (#{invoice.id}, {period}): charges that were not on it "
                         "when Stripe finalized it",
             quantity=Decimal(1), amount_cents=difference)
    db.session.refresh(invoice)


def _metadata(stripe_object) -> dict:
    metadata = getattr(stripe_object, "metadata", None)
    return metadata.to_dict() if metadata is not None else {}


def _stamp(stripe_invoice, field: str) -> datetime | None:
    transitions = getattr(stripe_invoice, "status_transitions", None)
    value = getattr(transitions, field, None) if transitions is not None else None
    return datetime.fromtimestamp(value, timezone.utc) if value else None


def due_invoice_ids(now: datetime | None = None) -> list[int]:
    """Open invoices whose period has ended, and closes that stopped half-way."""
    now = now or utcnow()
    return list(db.session.scalars(
        select(Invoice.id).where(
            ((Invoice.status == "open") & (Invoice.period_end <= now)) | (Invoice.status == "closing")
        ).order_by(Invoice.period_end)
    ))

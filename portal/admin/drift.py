"""Support's "Compare with Stripe" and "Repair" for one invoice, and the drift summary
on the front page. The comparison reads Stripe (on support's click, from the shared
request budget, with fewer tries than a job) and writes nothing there; "Repair"
queues a sync, which a worker runs."""
from __future__ import annotations

from flask import abort, flash, redirect, render_template, url_for
from flask_login import current_user
from redis.exceptions import RedisError

from portal.admin.recovery import RECOVERIES
from portal.admin.routes import bp, support_required
from portal.audit import record_support_action
from portal.billing.drift import (
    NotComparable,
    compare_invoice,
    drift_found,
    drift_found_count,
    interactive_gateway,
    last_sweep_at,
    latest_check,
    record_check,
)
from portal.billing.sync import SYNCABLE_STATUSES
from portal.billing.sync_queue import enqueue_sync
from portal.extensions import db
from portal.models import Invoice
from portal.stripe_gateway import StripeNotConfigured

DRIFT_SHOWN_ON_FRONT_PAGE = 10


@bp.app_template_global()
def drift_summary() -> dict:
    """What `admin/_drift_summary.html` shows: drift found and not repaired since."""
    return {"count": drift_found_count(), "found": drift_found(DRIFT_SHOWN_ON_FRONT_PAGE),
            "last_sweep": last_sweep_at()}


def _invoice_or_404(invoice_id: int) -> Invoice:
    return db.session.get(Invoice, invoice_id) or abort(404)


@bp.get("/invoices/<dbint:invoice_id>/drift")
@support_required
def drift(invoice_id: int):
    invoice = _invoice_or_404(invoice_id)
    return render_template("admin/drift.html", invoice=invoice, organization=invoice.organization,
                           check=latest_check(invoice.id), comparable=invoice.status in SYNCABLE_STATUSES,
                           recoveries=RECOVERIES)


@bp.post("/invoices/<dbint:invoice_id>/drift")
@support_required
def compare_with_stripe(invoice_id: int):
    invoice = _invoice_or_404(invoice_id)
    try:
        comparison = compare_invoice(invoice.id, interactive_gateway())
    except (NotComparable, StripeNotConfigured) as refused:
        db.session.rollback()
        flash(f"Not compared: {refused}.", "error")
    else:
        if comparison.outcome == "busy":
            flash(f"Not compared: {comparison.error}.", "error")
        else:
            record_check(comparison, "compare")
            db.session.commit()
    return redirect(url_for("admin.drift", invoice_id=invoice_id))


@bp.post("/invoices/<dbint:invoice_id>/drift/repair")
@support_required
def repair_drift(invoice_id: int):
    """Queue a sync: it adds what is missing at Stripe, removes what is extra and
    updates what differs, and leaves lines added by hand alone."""
    invoice = _invoice_or_404(invoice_id)
    if invoice.status not in SYNCABLE_STATUSES:
        flash(f"Not repaired: invoice #{invoice.id} is {invoice.status}.", "error")
        return redirect(url_for("admin.drift", invoice_id=invoice_id))
    if invoice.sync_blocked:
        flash(f"Not repaired: the sync of invoice #{invoice.id} is blocked ({invoice.sync_blocked}); "
              "clear the block on the recovery page.", "error")
        return redirect(url_for("admin.drift", invoice_id=invoice_id))
    check = latest_check(invoice.id)
    entry = record_support_action(current_user, "invoice.drift_repair", invoice=invoice,
                                  reason="Repair the drift that Compare with Stripe found",
                                  detail={"drift": {"missing": check.missing, "extra": check.extra,
                                                    "different": check.different} if check else None})
    db.session.commit()
    try:
        job_id = enqueue_sync(invoice.id, trigger="manual")
    except RedisError as error:
        # The audit is append-only: the failure is an entry of its own.
        record_support_action(current_user, "job.enqueue_failed", invoice=invoice,
                              detail={"audit_entry_id": entry.id, "for_action": entry.action, "error": str(error)})
        db.session.commit()
        flash(f"Repair recorded, but the sync could not be queued ({error}); the periodic sweep will pick it up.",
              "error")
    else:
        flash(f"Repair of invoice #{invoice.id} queued (sync job {job_id}). Compare again once it has run.", "success")
    return redirect(url_for("admin.drift", invoice_id=invoice_id))

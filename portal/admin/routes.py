from __future__ import annotations

from functools import wraps

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from portal.admin import actions, queries
from portal.billing.credits import CreditError
from portal.extensions import db
from portal.models import Invoice
from portal.money import format_money

bp = Blueprint("admin", __name__)


def support_required(view):
    @wraps(view)
    @login_required
    def wrapper(*args, **kwargs):
        if not current_user.is_support:
            abort(403)
        return view(*args, **kwargs)

    return wrapper


def _organization_or_404(slug: str):
    organization = queries.organization_by_slug(slug)
    if organization is None:
        abort(404)
    return organization


def _invoice_or_404(invoice_id: int) -> Invoice:
    invoice = db.session.get(Invoice, invoice_id)
    if invoice is None:
        abort(404)
    return invoice


def _report(result: actions.ActionResult, done: str) -> None:
    if result.enqueue_error:
        flash(f"{done}, but the job could not be queued ({result.enqueue_error}); "
              "the periodic sweep will pick it up.", "error")
    else:
        flash(f"{done} (job {result.job_id}).", "success")


def _back_to(invoice: Invoice):
    if request.args.get("next") == "discrepancies":
        return redirect(url_for("admin.discrepancies"))
    return redirect(url_for("admin.organization", slug=invoice.organization.slug))


@bp.get("/")
@support_required
def index():
    term = request.args.get("q", "")
    return render_template("admin/index.html", rows=queries.search_organizations(term), term=term,
                           unsynced=queries.unsynced_invoice_count(), limit=queries.ORGANIZATIONS_PER_PAGE)


@bp.get("/orgs/<slug:slug>")
@support_required
def organization(slug: str):
    overview = queries.organization_overview(_organization_or_404(slug))
    return render_template("admin/organization.html", overview=overview, organization=overview.organization)


@bp.get("/discrepancies")
@support_required
def discrepancies():
    return render_template("admin/discrepancies.html", discrepancies=queries.discrepancies(),
                           collection=queries.collection_problems(), portal_refusals=queries.portal_refusals(),
                           events=queries.failed_stripe_events(), pending_minutes=int(
                               queries.PENDING_TOO_LONG.total_seconds() // 60))


@bp.post("/invoices/<dbint:invoice_id>/sync")
@support_required
def sync_now(invoice_id: int):
    return _invoice_action(invoice_id, actions.sync_now, f"Sync of invoice #{invoice_id} requested")


@bp.post("/invoices/<dbint:invoice_id>/close")
@support_required
def close_cycle_now(invoice_id: int):
    return _invoice_action(invoice_id, actions.close_cycle_now, f"Close of invoice #{invoice_id}'s cycle requested")


def _invoice_action(invoice_id: int, action, done: str):
    invoice = _invoice_or_404(invoice_id)
    try:
        result = action(invoice, current_user)
    except actions.ActionRefused as refused:
        db.session.rollback()
        flash(str(refused), "error")
    else:
        _report(result, done)
    return _back_to(invoice)


@bp.post("/orgs/<slug:slug>/credits")
@support_required
def add_credit(slug: str):
    organization = _organization_or_404(slug)
    try:
        result = actions.give_credit(organization, request.form.get("amount", ""), request.form.get("reason", ""),
                                     current_user)
    except CreditError as refused:
        db.session.rollback()
        flash(f"No credit given: {refused}.", "error")
    else:
        amount = format_money(result.audit.details["amount_cents"], organization.currency)
        _report(result, f"Credit of {amount} added to invoice #{result.audit.object_id}")
    return redirect(url_for("admin.organization", slug=organization.slug))


# Pages kept in modules of their own, on this blueprint.
from portal.admin import drift, recovery  # noqa: E402,F401

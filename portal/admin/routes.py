from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from functools import wraps

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from portal import money
from portal.admin import actions, drilldown, queries, search
from portal.audit import SUPPORT_ACTIONS, ReasonError, audit_page, clean_reason
from portal.billing.credits import CreditError, credit_cents
from portal.extensions import db
from portal.models import Invoice, InvoiceItem
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


def stripe_dashboard_url(kind: str, stripe_id: str | None) -> str | None:
    """The object's page in Stripe's dashboard: test or live by the API key's prefix."""
    if not stripe_id:
        return None
    key = current_app.config.get("STRIPE_API_KEY") or ""
    live = key.startswith(("sk_live_", "rk_live_"))
    return f"https://dashboard.stripe.com/{'' if live else 'test/'}{kind}/{stripe_id}"


@bp.context_processor
def _admin_helpers():
    return {"stripe_dashboard_url": stripe_dashboard_url, "support_actions": SUPPORT_ACTIONS}


def _page_arg(name: str = "page") -> int:
    value = request.args.get(name, "1")
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 100_000:
        abort(400, description=f"{name} must be a page number from 1")
    return int(value)


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
    term, filter_name = request.args.get("q", ""), request.args.get("filter", "")
    try:
        found = search.search_organizations(term, filter_name, _page_arg())
    except search.SearchError as error:
        abort(400, description=str(error))
    return render_template("admin/index.html", found=found, term=term, filter_name=filter_name,
                           filters=search.FILTERS, counts=search.filter_counts(),
                           unsynced=queries.unsynced_invoice_count())


@bp.get("/orgs/<slug:slug>")
@support_required
def organization(slug: str):
    overview = queries.organization_overview(_organization_or_404(slug), _page_arg("sync_page"),
                                             _page_arg("events_page"))
    return render_template("admin/organization.html", overview=overview, organization=overview.organization)


@bp.get("/orgs/<slug:slug>/lines/<dbint:item_id>")
@support_required
def line(slug: str, item_id: int):
    organization = _organization_or_404(slug)
    item = drilldown.invoice_item(item_id)
    if item is None or item.invoice.organization_id != organization.id:
        abort(404)
    return render_template("admin/line.html", organization=organization,
                           drill=drilldown.line_drilldown(item, _page_arg()))


@bp.get("/discrepancies")
@support_required
def discrepancies():
    page = _page_arg()
    found, has_next = queries.discrepancies(page=page)
    return render_template("admin/discrepancies.html", discrepancies=found, page=page, has_next=has_next,
                           collection=queries.collection_problems(), portal_refusals=queries.portal_refusals(),
                           events=queries.failed_stripe_events(), pending_minutes=int(
                               queries.PENDING_TOO_LONG.total_seconds() // 60))


def _day(name: str) -> datetime | None:
    value = request.args.get(name, "").strip()
    if not value:
        return None
    try:
        return datetime.combine(date.fromisoformat(value), time(), timezone.utc)
    except ValueError:
        abort(400, description=f"{name} must be a date as YYYY-MM-DD")


@bp.get("/audit")
@support_required
def audit():
    since, until = _day("from"), _day("to")
    slug = request.args.get("org", "").strip()
    organization = None
    if slug:
        organization = queries.organization_by_slug(slug)
        if organization is None:
            abort(400, description=f"no organization {slug!r}")
    action = request.args.get("action", "")
    if action and action not in SUPPORT_ACTIONS:
        abort(400, description=f"unknown action {action!r}")
    entries = audit_page(actor=request.args.get("actor", "").strip(), action=action, organization=organization,
                         since=since, until=until + timedelta(days=1) if until else None, page=_page_arg())
    return render_template("admin/audit.html", entries=entries, filters=request.args)


# --- actions: each changing one asks first (a confirm page), then records why -------


@bp.post("/invoices/<dbint:invoice_id>/sync")
@support_required
def sync_now(invoice_id: int):
    invoice = _invoice_or_404(invoice_id)
    try:
        result = actions.sync_now(invoice, current_user, request.form.get("reason"))
    except (actions.ActionRefused, ReasonError) as refused:
        db.session.rollback()
        flash(str(refused), "error")
    else:
        _report(result, f"Sync of invoice #{invoice_id} requested")
    return _back_to(invoice)


@bp.get("/invoices/<dbint:invoice_id>/close")
@support_required
def confirm_close(invoice_id: int):
    invoice = _invoice_or_404(invoice_id)
    return render_template("admin/confirm_close.html", invoice=invoice, organization=invoice.organization)


@bp.post("/invoices/<dbint:invoice_id>/close")
@support_required
def close_cycle_now(invoice_id: int):
    invoice = _invoice_or_404(invoice_id)
    if request.form.get("confirmed") != "yes":
        return redirect(url_for("admin.confirm_close", invoice_id=invoice_id))
    try:
        result = actions.close_cycle_now(invoice, current_user, request.form.get("reason"))
    except ReasonError as refused:
        db.session.rollback()
        flash(f"Nothing done: {refused}.", "error")
        return render_template("admin/confirm_close.html", invoice=invoice, organization=invoice.organization,
                               reason=request.form.get("reason", "")), 400
    except actions.ActionRefused as refused:
        db.session.rollback()
        flash(str(refused), "error")
    else:
        _report(result, f"Close of invoice #{invoice_id}'s cycle requested")
    return _back_to(invoice)


def _credit_form_problem(amount: str, reason: str) -> str | None:
    try:
        credit_cents(amount)
        clean_reason(reason)
    except (CreditError, ReasonError) as error:
        return str(error)
    return None


@bp.get("/orgs/<slug:slug>/credits/new")
@support_required
def confirm_credit(slug: str):
    organization = _organization_or_404(slug)
    amount, reason = request.args.get("amount", ""), request.args.get("reason", "")
    problem = _credit_form_problem(amount, reason)
    if problem:
        flash(f"No credit given: {problem}.", "error")
        return redirect(url_for("admin.organization", slug=slug))
    cents = credit_cents(amount)
    invoice = queries.open_invoice_of(organization)
    total = invoice.total_cents if invoice else 0
    return render_template("admin/confirm_credit.html", organization=organization, invoice=invoice,
                           amount=amount, reason=reason, cents=cents, total_after=total - cents,
                           to_balance=max(cents - max(total, 0), 0))


@bp.post("/orgs/<slug:slug>/credits")
@support_required
def add_credit(slug: str):
    organization = _organization_or_404(slug)
    amount, reason = request.form.get("amount", ""), request.form.get("reason", "")
    if request.form.get("confirmed") != "yes":
        return redirect(url_for("admin.confirm_credit", slug=slug, amount=amount, reason=reason))
    try:
        result = actions.give_credit(organization, amount, reason, current_user)
    except CreditError as refused:
        db.session.rollback()
        flash(f"No credit given: {refused}.", "error")
    else:
        amount = format_money(result.audit.details["amount_cents"], organization.currency)
        _report(result, f"Credit of {amount} added to invoice #{result.audit.invoice_id}")
    return redirect(url_for("admin.organization", slug=organization.slug))


def _credit_or_404(item_id: int) -> InvoiceItem:
    item = drilldown.invoice_item(item_id)
    if item is None or item.product.kind != "credit":
        abort(404)
    return item


@bp.get("/credits/<dbint:item_id>/remove")
@support_required
def confirm_remove_credit(item_id: int):
    item = _credit_or_404(item_id)
    return render_template("admin/confirm_remove_credit.html", item=item, invoice=item.invoice,
                           organization=item.invoice.organization)


@bp.post("/credits/<dbint:item_id>/remove")
@support_required
def remove_credit(item_id: int):
    item = _credit_or_404(item_id)
    organization = item.invoice.organization
    if request.form.get("confirmed") != "yes":
        return redirect(url_for("admin.confirm_remove_credit", item_id=item_id))
    cents = -item.amount_cents
    try:
        result = actions.take_back_credit(item, request.form.get("reason"), current_user)
    except (CreditError, ReasonError) as refused:
        db.session.rollback()
        flash(f"Credit not removed: {refused}.", "error")
    else:
        _report(result, f"Credit of {money.format_money(cents, organization.currency)} removed "
                        f"from invoice #{result.audit.invoice_id}")
    return redirect(url_for("admin.organization", slug=organization.slug))


# Pages kept in modules of their own, on this blueprint.
from portal.admin import drift, recovery  # noqa: E402,F401

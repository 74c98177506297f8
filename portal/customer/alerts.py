"""Spend alerts on the customer's billing page: an owner sets thresholds on the open
invoice's total or its projection, and removes them; the page shows a banner for each
threshold the open invoice has crossed (see `portal.billing.alerts`)."""
from __future__ import annotations

import logging

from flask import abort, flash, redirect, request, url_for
from flask_login import current_user, login_required
from redis.exceptions import RedisError
from sqlalchemy import select

from portal import money
from portal.billing.alerts import (
    KIND_WORDS,
    AlertError,
    add_alert,
    alerts_and_crossings,
    banners,
    remove_alert,
    threshold_cents,
)
from portal.billing.invoices import open_invoice
from portal.customer.routes import _organization_or_404, _role_in, bp
from portal.extensions import db
from portal.models import Organization, SpendAlert

log = logging.getLogger(__name__)


def _alerts_of_page(organization: Organization):
    """The organization's alerts and crossings, read once per request."""
    cache = request.environ.setdefault("portal.spend_alerts", {})
    if organization.id not in cache:
        cache[organization.id] = alerts_and_crossings(organization)
    return cache[organization.id]


@bp.app_context_processor
def _alerts_context():
    # Functions, so only the page that shows alerts reads them (once, for both partials).
    return {"spend_alerts": lambda organization: [row[0] for row in _alerts_of_page(organization)],
            "alert_banners": lambda organization: banners(_alerts_of_page(organization))}


def _owned_organization(slug: str) -> Organization:
    organization = _organization_or_404(slug)
    if _role_in(organization) != "owner":
        abort(403, "Only an owner of the organization can change its alerts.")
    return organization


def _alerts_section(organization: Organization):
    return redirect(url_for("customer.organization_billing", slug=organization.slug, _anchor="alerts"), code=303)


@bp.post("/orgs/<slug:slug>/alerts")
@login_required
def add_spend_alert(slug: str):
    organization = _owned_organization(slug)
    kind = request.form.get("kind", "")
    try:
        cents = threshold_cents(request.form.get("amount"))
        add_alert(organization, kind, cents, created_by=current_user.email)
    except AlertError as error:
        db.session.rollback()
        flash(str(error), "error")
        return _alerts_section(organization)
    db.session.commit()
    flash(f"You will be told once each period when {KIND_WORDS[kind]} passes "
          f"{money.format_money(cents, organization.currency)}.", "success")
    # An invoice already past the threshold is said at once, not at the next sync.
    invoice = open_invoice(organization)
    if invoice is not None:
        from portal.billing.alerts import evaluate_and_queue

        try:
            evaluate_and_queue(invoice.id)
        except RedisError:  # recorded and committed; the periodic delivery sends it
            log.warning("could not queue the delivery of alert mails", exc_info=True)
    return _alerts_section(organization)


@bp.post("/orgs/<slug:slug>/alerts/<dbint:alert_id>/delete")
@login_required
def remove_spend_alert(slug: str, alert_id: int):
    organization = _organization_or_404(slug)
    if db.session.scalar(select(SpendAlert.id).where(SpendAlert.id == alert_id,
                                                     SpendAlert.organization_id == organization.id)) is None:
        abort(404)
    _owned_organization(slug)
    if not remove_alert(organization, alert_id):
        abort(404)
    db.session.commit()
    flash("The alert is removed.", "success")
    return _alerts_section(organization)

from __future__ import annotations

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from sqlalchemy import and_, select
from sqlalchemy.orm import selectinload

from portal.customer.overview import billing_overview, last_finished_sync
from portal.customer.payment_methods import PaymentPortalUnavailable, payment_portal_url
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Membership, Organization

bp = Blueprint("customer", __name__)


def _organizations_of_user() -> list[Organization]:
    return list(
        db.session.scalars(
            select(Organization)
            .join(Membership, Membership.organization_id == Organization.id)
            .where(Membership.user_id == current_user.id)
            .order_by(Organization.name)
        )
    )


def _organization_or_404(slug: str) -> Organization:
    """The organization by slug, if the signed-in user may see it (support sees all).
    The user's membership comes in the same query, so `_role_in` asks nothing more."""
    row = db.session.execute(
        select(Organization, Membership)
        .outerjoin(Membership, and_(Membership.organization_id == Organization.id,
                                    Membership.user_id == current_user.id))
        .where(Organization.slug == slug)
    ).first()
    if row is None or (row.Membership is None and not current_user.is_support):
        abort(404)
    g.customer_roles = {row.Organization.id: row.Membership.role if row.Membership else None}
    return row.Organization


def _role_in(organization: Organization) -> str | None:
    """The signed-in user's role in the organization ("owner", "member"), None for
    support staff and anyone else."""
    known = g.get("customer_roles", {})
    if organization.id in known:  # read with the organization by `_organization_or_404`
        return known[organization.id]
    membership = db.session.get(Membership, (current_user.id, organization.id))
    return membership.role if membership is not None else None


@bp.get("/")
def index():
    return redirect(url_for("customer.billing"))


@bp.get("/billing")
@login_required
def billing():
    organizations = _organizations_of_user()
    if not organizations and current_user.is_support:
        return redirect(url_for("admin.index"))  # staff read customers' pages from the admin view
    if len(organizations) == 1:
        return redirect(url_for("customer.organization_billing", slug=organizations[0].slug))
    return render_template("customer/choose_org.html", organizations=organizations)


@bp.get("/orgs/<slug:slug>/billing")
@login_required
def organization_billing(slug: str):
    from portal.customer.live import progress_on_page

    organization = _organization_or_404(slug)
    overview = billing_overview(organization)
    return render_template("customer/billing.html", overview=overview, organization=organization,
                           role=_role_in(organization),
                           sync_progress=progress_on_page(organization, overview.current, request.args.get("sync")))


@bp.post("/orgs/<slug:slug>/billing/payment-methods")
@login_required
def manage_payment_methods(slug: str):
    """Open a Stripe customer-portal session and send the customer there."""
    organization = _organization_or_404(slug)
    if _role_in(organization) != "owner":
        # Members read; only an owner manages how the organization pays. Support staff
        # see the page but do not act as the customer at Stripe.
        abort(403)
    return_url = url_for("customer.organization_billing", slug=organization.slug, _external=True)
    try:
        url = payment_portal_url(organization, return_url)
    except PaymentPortalUnavailable as unavailable:
        flash(str(unavailable), "error")
        return redirect(url_for("customer.organization_billing", slug=organization.slug))
    return redirect(url, code=303)


@bp.get("/orgs/<slug:slug>/invoices/<dbint:invoice_id>")
@login_required
def invoice_detail(slug: str, invoice_id: int):
    organization = _organization_or_404(slug)
    invoice = db.session.scalar(
        select(Invoice)
        .where(Invoice.id == invoice_id, Invoice.organization_id == organization.id)
        .options(selectinload(Invoice.items).joinedload(InvoiceItem.product))
    )
    if invoice is None:
        abort(404)
    last_sync = last_finished_sync(invoice.id) if invoice.status in ("open", "closing") else None
    return render_template("customer/invoice.html", organization=organization, invoice=invoice,
                           last_sync=last_sync)

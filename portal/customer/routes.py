from __future__ import annotations

from flask import Blueprint, abort, redirect, render_template, url_for
from flask_login import current_user, login_required
from sqlalchemy import select
from sqlalchemy.orm import selectinload

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
    """The organization by slug, if the signed-in user may see it (support sees all)."""
    query = select(Organization).where(Organization.slug == slug)
    if not current_user.is_support:
        query = query.join(Membership, Membership.organization_id == Organization.id).where(
            Membership.user_id == current_user.id
        )
    organization = db.session.scalar(query)
    if organization is None:
        abort(404)
    return organization


@bp.get("/")
def index():
    return redirect(url_for("customer.billing"))


@bp.get("/billing")
@login_required
def billing():
    organizations = _organizations_of_user()
    if len(organizations) == 1:
        return redirect(url_for("customer.organization_billing", slug=organizations[0].slug))
    return render_template("customer/choose_org.html", organizations=organizations)


@bp.get("/orgs/<slug>/billing")
@login_required
def organization_billing(slug: str):
    organization = _organization_or_404(slug)
    invoices = list(
        db.session.scalars(
            select(Invoice)
            .where(Invoice.organization_id == organization.id)
            .options(selectinload(Invoice.items).joinedload(InvoiceItem.product))
            .order_by(Invoice.period_start.desc(), Invoice.id.desc())
        )
    )
    current = next((invoice for invoice in invoices if invoice.status == "open"), None)
    past = [invoice for invoice in invoices if invoice is not current]
    return render_template(
        "customer/billing.html", organization=organization, current=current, past=past
    )


@bp.get("/orgs/<slug>/invoices/<int:invoice_id>")
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
    return render_template("customer/invoice.html", organization=organization, invoice=invoice)

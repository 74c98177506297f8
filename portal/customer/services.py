"""Services on the customer's billing page: an owner attaches one from the catalog or
detaches one, after a confirmation that says what it costs for the rest of the period.

Both steps go through `portal.billing.services`: the quote is the charge formula
that bills the attachment, and `attach_service` / `detach_service` lock the open
invoice (a close racing the change waits for it, or the change lands on the next
invoice), exactly as the API's do. Members and support staff are refused (403).
"""
from __future__ import annotations

import logging
from decimal import Decimal

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import login_required
from redis.exceptions import RedisError
from sqlalchemy import select

from portal import money
from portal.billing.invoices import open_invoice
from portal.billing.service_charges import charged_cents
from portal.billing.services import (
    ServiceError,
    attach_service,
    attachable_products,
    detach_service,
    quote_attachment,
    quote_detachment,
)
from portal.customer.routes import _organization_or_404, _role_in, bp
from portal.extensions import db
from portal.models import Organization, Product, ServiceAttachment
from portal.text import has_control_characters

log = logging.getLogger(__name__)
MAX_RESOURCE_LENGTH = 200
# A typo guard for a form: larger orders go through support or the API.
MAX_FORM_QUANTITY = Decimal(1000)


class ServiceFormError(ValueError):
    """What the customer typed cannot be attached; the message says why."""


@bp.app_context_processor
def _service_catalog():
    # A function, so the catalog is read only by the page that lists it.
    return {"service_catalog": attachable_products}


def _require_owner(organization: Organization) -> None:
    if _role_in(organization) != "owner":
        abort(403, "Only an owner of the organization can change its services.")


def _owned_organization(slug: str) -> Organization:
    organization = _organization_or_404(slug)
    _require_owner(organization)
    return organization


def _billing_page(organization: Organization, anchor: str = "services"):
    return redirect(url_for("customer.organization_billing", slug=organization.slug, _anchor=anchor), code=303)


def _service_request(values) -> tuple[Product, Decimal, str]:
    """(product, quantity, resource) from the form, or ServiceFormError."""
    code = values.get("product", "")
    product = None
    if isinstance(code, str) and code and not has_control_characters(code):
        product = db.session.scalar(
            select(Product).where(Product.code == code, Product.kind == "recurring", Product.active.is_(True))
        )
    if product is None:
        raise ServiceFormError("Choose a service from the catalog.")
    try:
        quantity = money.quantity(values.get("quantity", "1").strip() or "1", maximum=MAX_FORM_QUANTITY)
    except money.MoneyError:
        raise ServiceFormError(f"The quantity must be a number greater than zero and at most "
                               f"{MAX_FORM_QUANTITY:f}.") from None
    if quantity <= 0:
        raise ServiceFormError("The quantity must be greater than zero.")
    resource = " ".join(values.get("resource", "").split())
    if len(resource) > MAX_RESOURCE_LENGTH or has_control_characters(resource):
        raise ServiceFormError(f"The label must be at most {MAX_RESOURCE_LENGTH} characters of plain text.")
    return product, quantity, resource


def _queue_sync(organization: Organization) -> None:
    """Tell Stripe soon; the periodic sweep does it anyway if Redis is away."""
    from portal.billing.sync_queue import enqueue_sync

    invoice = open_invoice(organization)
    if invoice is None:
        return
    try:
        enqueue_sync(invoice.id, trigger="manual")
    except RedisError:  # the change is committed; only the early sync is lost
        log.warning("could not queue a sync of invoice %s after a service change", invoice.id, exc_info=True)


@bp.get("/orgs/<slug:slug>/services/attach")
@login_required
def confirm_attach(slug: str):
    organization = _owned_organization(slug)
    try:
        product, quantity, resource = _service_request(request.args)
        quote = quote_attachment(organization, product, quantity)
    except (ServiceFormError, ServiceError) as error:
        flash(str(error), "error")
        return _billing_page(organization)
    return render_template("customer/service_confirm.html", organization=organization, action="attach",
                           product=product, quantity=quantity, resource=resource, quote=quote)


@bp.post("/orgs/<slug:slug>/services")
@login_required
def attach(slug: str):
    organization = _owned_organization(slug)
    try:
        product, quantity, resource = _service_request(request.form)
        attachment = attach_service(organization, product, quantity, resource)
        invoice = open_invoice(organization)
        charged = charged_cents(attachment, invoice)
    except (ServiceFormError, ServiceError) as error:
        db.session.rollback()
        flash(str(error), "error")
        return _billing_page(organization)
    db.session.commit()
    _queue_sync(organization)
    flash(f"{product.name} is attached: {money.format_money(charged, invoice.currency)} "
          "is on the current invoice for the rest of the period.", "success")
    return _billing_page(organization, "current-invoice")


def _attachment_of(organization: Organization, service_id: int) -> ServiceAttachment:
    attachment = db.session.scalar(
        select(ServiceAttachment).where(ServiceAttachment.id == service_id,
                                        ServiceAttachment.organization_id == organization.id)
    )
    if attachment is None:
        abort(404)
    return attachment


@bp.get("/orgs/<slug:slug>/services/<dbint:service_id>/detach")
@login_required
def confirm_detach(slug: str, service_id: int):
    organization = _organization_or_404(slug)
    attachment = _attachment_of(organization, service_id)  # another's: 404 before anything else
    _require_owner(organization)
    try:
        quote = quote_detachment(attachment)
    except ServiceError as error:
        flash(str(error), "error")
        return _billing_page(organization)
    return render_template("customer/service_confirm.html", organization=organization, action="detach",
                           attachment=attachment, product=attachment.product, quantity=attachment.quantity,
                           resource=attachment.resource, quote=quote)


@bp.post("/orgs/<slug:slug>/services/<dbint:service_id>/detach")
@login_required
def detach(slug: str, service_id: int):
    organization = _organization_or_404(slug)
    attachment = _attachment_of(organization, service_id)  # another's: 404 before anything else
    _require_owner(organization)
    if not detach_service(attachment):
        flash(f"{attachment.product.name} was detached already.", "error")
        return _billing_page(organization)
    db.session.commit()
    _queue_sync(organization)
    flash(f"{attachment.product.name} is detached: the current invoice now charges it only until now.", "success")
    return _billing_page(organization, "current-invoice")


"""The sub-systems' JSON API (see the Contract in DESIGN.md)."""
from __future__ import annotations

import re
from decimal import Decimal

from flask import Blueprint, current_app, g, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import selectinload
from werkzeug.exceptions import HTTPException

from portal import bodies, money
from portal.api.auth import authenticate
from portal.api.errors import ApiError, error_response
from portal.api.serializers import invoice_json, service_json
from portal.billing.invoices import ensure_open_invoice
from portal.billing.services import ServiceError, attach_service, change_quantity, detach_service
from portal.billing.usage import MAX_BATCH_EVENTS, BatchRejected, EventConflict, ingest_usage, record_conflicts
from portal.database import retry_on_deadlock
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Organization, Product, ServiceAttachment, SyncRun
from portal.text import has_control_characters

bp = Blueprint("api", __name__)

# fullmatch only: `$` would let a trailing newline through.
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
CURRENCY = re.compile(r"[a-z]{3}")


@bp.before_request
def _require_token():
    authenticate()


@bp.errorhandler(ApiError)
def _api_error(error: ApiError):
    db.session.rollback()
    return error_response(error.status, error.code, error.message, error.details)


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    db.session.rollback()
    code = (error.name or "error").lower().replace(" ", "_")
    return error_response(error.code or 500, code, error.description or error.name)


@bp.app_errorhandler(404)
@bp.app_errorhandler(405)
def _api_routing_error(error: HTTPException):
    """A URL under the API that matches no route (an id beyond the database's range,
    a slug or job id that cannot exist) answers in the API's JSON shape; Flask sends
    routing errors to the app's handlers, never the blueprint's. Elsewhere: the
    portal's error page."""
    prefix = (current_app.blueprints["api"].url_prefix if "api" in current_app.blueprints else None) or "/api/"
    if request.blueprint is None and (request.path + "/").startswith(prefix.rstrip("/") + "/"):
        db.session.rollback()
        return _http_error(error)
    from portal.errors import error_page

    return error_page(error)


def _json_body() -> dict:
    """The request's JSON object; numbers are read as exact decimals, never floats, in
    the money module's one grammar (no exponent). A body over MAX_CONTENT_LENGTH,
    chunked or not, is a 413; nesting deeper than bodies.MAX_JSON_DEPTH a 400."""
    raw = bodies.read_body()
    try:
        body = bodies.loads(raw, parse_float=money.json_number)
    except ValueError as error:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return body


def _organization(slug: str) -> Organization:
    organization = db.session.scalar(select(Organization).where(Organization.slug == slug))
    if organization is None:
        raise ApiError(404, "not_found", f"no organization {slug!r}")
    return organization


def _invalid(field: str, message: str):
    return ApiError(422, "invalid_request", f"{field}: {message}", {"field": field})


@bp.get("/products")
def products():
    rows = db.session.scalars(select(Product).where(Product.active).order_by(Product.code))
    return jsonify({"products": [
        {"code": p.code, "name": p.name, "unit": p.unit, "unit_price": f"{p.unit_price.normalize():f}",
         "kind": p.kind}
        for p in rows
    ]})


@bp.post("/organizations")
def create_organization():
    body = _json_body()
    slug, name, email = body.get("slug"), body.get("name"), body.get("email")
    currency = body.get("currency", "usd")
    anchor = body.get("cycle_anchor_day", 1)
    if not isinstance(slug, str) or not SLUG.fullmatch(slug):
        raise _invalid("slug", "lower-case letters, digits and dashes, at most 63")
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or has_control_characters(name):
        raise _invalid("name", "a non-empty string of at most 200 characters, without control characters")
    if not isinstance(email, str) or "@" not in email or len(email) > 254 or has_control_characters(email):
        raise _invalid("email", "an email address")
    if not isinstance(currency, str) or not CURRENCY.fullmatch(currency):
        raise _invalid("currency", "a three-letter ISO code in lower case")
    if not isinstance(anchor, int) or isinstance(anchor, bool) or not 1 <= anchor <= 31:
        raise _invalid("cycle_anchor_day", "an integer from 1 to 31")
    if db.session.scalar(select(Organization.id).where(Organization.slug == slug)):
        raise ApiError(409, "conflict", f"organization {slug!r} exists already")
    organization = Organization(slug=slug, name=name.strip(), billing_email=email.strip(),
                                currency=currency, cycle_anchor_day=anchor)
    try:
        with db.session.begin_nested():
            db.session.add(organization)
    except IntegrityError:
        raise ApiError(409, "conflict", f"organization {slug!r} exists already") from None
    invoice = ensure_open_invoice(organization)
    db.session.commit()
    return jsonify({"slug": organization.slug, "name": organization.name, "email": organization.billing_email,
                    "currency": organization.currency, "cycle_anchor_day": organization.cycle_anchor_day,
                    "open_invoice": invoice.id}), 201


@bp.post("/usage")
def report_usage():
    body = _json_body()
    events = body.get("events")
    if isinstance(events, list) and len(events) > MAX_BATCH_EVENTS:
        raise ApiError(413, "batch_too_large", f"a batch holds at most {MAX_BATCH_EVENTS} events",
                       {"events": len(events)})

    def ingest():
        result = ingest_usage(g.api_sender, events)
        db.session.commit()
        return result

    try:
        result = retry_on_deadlock(ingest)
    except BatchRejected as rejected:
        raise ApiError(422, "invalid_events", f"{len(rejected.problems)} invalid event(s); nothing was stored",
                       rejected.problems) from None
    except EventConflict as conflict:
        db.session.rollback()
        try:
            if record_conflicts(conflict):  # support sees each refused resend on the accepted event
                db.session.commit()
        except SQLAlchemyError:  # the refusal stands; only support's record of it is lost
            db.session.rollback()
            current_app.logger.exception("could not record refused resends")
        raise ApiError(409, "conflicting_events",
                       f"{len(conflict.conflicts)} event id(s) reused with different content; nothing was stored",
                       conflict.conflicts) from None
    return jsonify({"accepted": result.accepted, "duplicates": result.duplicates})


@bp.get("/organizations/<slug:slug>/services")
def list_services(slug: str):
    organization = _organization(slug)
    attachments = db.session.scalars(
        select(ServiceAttachment)
        .where(ServiceAttachment.organization_id == organization.id, ServiceAttachment.detached_at.is_(None))
        .order_by(ServiceAttachment.id)
    )
    return jsonify({"services": [service_json(a) for a in attachments]})


@bp.post("/organizations/<slug:slug>/services")
def attach(slug: str):
    organization = _organization(slug)
    body = _json_body()
    code = body.get("product")
    product = db.session.scalar(select(Product).where(Product.code == code)) if isinstance(
        code, str) and not has_control_characters(code) else None
    if product is None:
        raise _invalid("product", f"unknown product {body.get('product')!r}")
    quantity = _service_quantity(body.get("quantity", 1))
    resource = body.get("resource", "") or ""
    if not isinstance(resource, str) or len(resource) > 200 or has_control_characters(resource):
        raise _invalid("resource", "a string of at most 200 characters, without control characters")
    try:
        attachment = attach_service(organization, product, quantity, resource)
    except ServiceError as error:
        raise _invalid("product", str(error)) from None
    db.session.commit()
    return jsonify(service_json(attachment)), 201


def _service_quantity(value) -> Decimal:
    try:
        quantity = money.quantity(value)
    except money.MoneyError as error:
        raise _invalid("quantity", str(error)) from None
    if quantity <= 0:
        raise _invalid("quantity", "must be greater than zero")
    return quantity


def _attachment(slug: str, service_id: int) -> ServiceAttachment:
    organization = _organization(slug)
    attachment = db.session.scalar(
        select(ServiceAttachment).where(ServiceAttachment.id == service_id,
                                        ServiceAttachment.organization_id == organization.id)
    )
    if attachment is None:
        raise ApiError(404, "not_found", f"no service {service_id} on {slug!r}")
    return attachment


@bp.patch("/organizations/<slug:slug>/services/<dbint:service_id>")
def update_service(slug: str, service_id: int):
    attachment = _attachment(slug, service_id)
    quantity = _service_quantity(_json_body().get("quantity"))
    try:
        replacement = change_quantity(attachment, quantity)
    except ServiceError as error:
        raise ApiError(409, "conflict", str(error)) from None
    db.session.commit()
    return jsonify({**service_json(replacement), "replaces": attachment.id})


@bp.delete("/organizations/<slug:slug>/services/<dbint:service_id>")
def detach(slug: str, service_id: int):
    attachment = _attachment(slug, service_id)
    detach_service(attachment)  # detaching twice is a no-op, answered the same
    db.session.commit()
    return jsonify(service_json(attachment))


def _last_runs(invoice_ids: list[int]) -> dict[int, SyncRun]:
    runs = {}
    for run in db.session.scalars(
        select(SyncRun).where(SyncRun.invoice_id.in_(invoice_ids)).order_by(SyncRun.started_at, SyncRun.id)
    ):
        runs[run.invoice_id] = run
    return runs


def _with_items():
    return selectinload(Invoice.items).joinedload(InvoiceItem.product)


@bp.get("/organizations/<slug:slug>/invoices/current")
def current_invoice(slug: str):
    organization = _organization(slug)
    invoice = db.session.scalar(
        select(Invoice).where(Invoice.organization_id == organization.id, Invoice.status == "open")
        .options(_with_items())
    )
    if invoice is None:
        raise ApiError(404, "not_found", f"{slug!r} has no open invoice")
    return jsonify(invoice_json(invoice, _last_runs([invoice.id]).get(invoice.id)))


@bp.get("/organizations/<slug:slug>/invoices")
def invoices(slug: str):
    organization = _organization(slug)
    rows = list(db.session.scalars(
        select(Invoice).where(Invoice.organization_id == organization.id)
        .options(_with_items()).order_by(Invoice.period_start.desc(), Invoice.id.desc())
    ))
    runs = _last_runs([invoice.id for invoice in rows])
    return jsonify({"invoices": [invoice_json(invoice, runs.get(invoice.id)) for invoice in rows]})

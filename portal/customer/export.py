"""CSV exports of an invoice: its period's usage events and its lines.

Streamed: rows are read with `yield_per` (a server-side cursor on PostgreSQL) and
written out in chunks as they come, so a month of events never sits in memory.
Text cells that a spreadsheet would run as a formula (starting with = + - @, a tab
or a carriage return) are written with a leading apostrophe.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator

from flask import Response, abort, stream_with_context
from flask_login import login_required
from sqlalchemy import select

from portal import money
from portal.customer.routes import _organization_or_404, bp
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Organization, Product, UsageEvent

ROWS_PER_CHUNK = 500
FETCH_SIZE = 2000
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """A text cell no spreadsheet runs as a formula (OWASP's CSV injection advice)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _amount(cents: int) -> str:
    """Integer cents as a plain decimal in the currency's units: 12345 -> "123.45"."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole}.{part:02d}"


def _decimal(value) -> str:
    return f"{value.normalize():f}" if value else "0"


def _csv_stream(header: list[str], rows: Iterable[list[str]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    yield buffer.getvalue()  # the first byte goes out before the query runs
    buffer.seek(0)
    buffer.truncate()
    for written, row in enumerate(rows, start=1):
        writer.writerow(row)
        if written % ROWS_PER_CHUNK == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _download(filename: str, header: list[str], rows: Iterable[list[str]]) -> Response:
    response = Response(stream_with_context(_csv_stream(header, rows)), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _invoice_of(organization: Organization, invoice_id: int) -> Invoice:
    invoice = db.session.scalar(
        select(Invoice).where(Invoice.id == invoice_id, Invoice.organization_id == organization.id)
    )
    if invoice is None:
        abort(404)
    return invoice


def _file_stem(organization: Organization, invoice: Invoice) -> str:
    return f"{organization.slug}-{invoice.period_start:%Y-%m-%d}-{invoice.number or invoice.id}"


USAGE_HEADER = ["id", "time", "product", "resource", "quantity", "unit", "unit_price", "price", "currency"]


def usage_rows(organization: Organization, invoice: Invoice) -> Iterator[list[str]]:
    """The organization's usage events of the invoice's period, oldest first: the
    sender's event id, when it happened, product, resource, quantity, the unit price
    and the event's exact price (quantity x unit price, in the currency's units; the
    invoice rounds once per line, not per event)."""
    currency = invoice.currency
    rows = db.session.execute(
        select(UsageEvent.event_id, UsageEvent.occurred_at, Product.code, Product.unit, UsageEvent.resource,
               UsageEvent.quantity, Product.unit_price)
        .join(Product, Product.id == UsageEvent.product_id)
        .where(UsageEvent.organization_id == organization.id,
               UsageEvent.occurred_at >= invoice.period_start,
               UsageEvent.occurred_at < invoice.period_end)
        .order_by(UsageEvent.occurred_at, UsageEvent.id)
        .execution_options(yield_per=FETCH_SIZE)
    )
    for event_id, occurred_at, code, unit, resource, quantity, unit_price in rows:
        yield [safe_cell(event_id), occurred_at.isoformat(), safe_cell(code), safe_cell(resource),
               _decimal(quantity), safe_cell(unit), money.unit_price_in_units(unit_price),
               money.exact_price_in_units(quantity, unit_price), currency]


LINES_HEADER = ["product", "resource", "description", "quantity", "unit", "unit_price", "amount", "currency"]


def line_rows(invoice: Invoice) -> Iterator[list[str]]:
    rows = db.session.execute(
        select(InvoiceItem.resource, InvoiceItem.description, InvoiceItem.quantity, InvoiceItem.unit_price,
               InvoiceItem.amount_cents, Product.code, Product.unit, Product.kind)
        .join(Product, Product.id == InvoiceItem.product_id)
        .where(InvoiceItem.invoice_id == invoice.id)
        .order_by(InvoiceItem.id)
        .execution_options(yield_per=FETCH_SIZE)
    )
    for resource, description, quantity, unit_price, amount_cents, code, unit, kind in rows:
        credit = kind == "credit"
        yield [safe_cell(code), safe_cell(resource), safe_cell(description), "" if credit else _decimal(quantity),
               "" if credit else safe_cell(unit), "" if credit else money.unit_price_in_units(unit_price),
               _amount(amount_cents), invoice.currency]


@bp.get("/orgs/<slug:slug>/invoices/<dbint:invoice_id>/usage.csv")
@login_required
def export_usage(slug: str, invoice_id: int):
    organization = _organization_or_404(slug)
    invoice = _invoice_of(organization, invoice_id)
    return _download(f"{_file_stem(organization, invoice)}-usage.csv", USAGE_HEADER,
                     usage_rows(organization, invoice))


@bp.get("/orgs/<slug:slug>/invoices/<dbint:invoice_id>/lines.csv")
@login_required
def export_lines(slug: str, invoice_id: int):
    organization = _organization_or_404(slug)
    invoice = _invoice_of(organization, invoice_id)
    return _download(f"{_file_stem(organization, invoice)}-lines.csv", LINES_HEADER, line_rows(invoice))

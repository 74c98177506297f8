"""Credits: support lowers what an organization owes with a negative invoice line.

A credit is its own item on the open invoice (quantity 1, a negative amount in
integer cents), billed under the portal's own `credit` product, which is created on
first use and never sold. Adding it moves the invoice's total and marks the invoice
unsynced in the caller's transaction, like any other change to the items, so the
next sync carries it to Stripe. The caller commits (and then enqueues a sync).
"""
from __future__ import annotations

from decimal import Decimal
from uuid import uuid4

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import contains_eager

from portal import money
from portal.billing.invoices import ensure_open_invoice
from portal.billing.pricing import mark_changed, set_item
from portal.extensions import db
from portal.models import Invoice, InvoiceItem, Organization, Product
from portal.text import has_control_characters

CREDIT_PRODUCT_CODE = "portal.credit"
# A typo guard, not a policy: larger credits are a matter for Stripe's dashboard.
MAX_CREDIT_CENTS = 100_000_000
MAX_REASON_LENGTH = 300


class CreditError(ValueError):
    """A credit that cannot be given (amount not a positive number of cents, no reason)."""


def credit_cents(amount_in_dollars: object) -> int:
    """Whole cents from an amount in dollars as typed ("12.50"): the money module's one
    decimal grammar (so "1,0,0", " 5", "5_000" or "١٠" are refused, never read as
    something else), positive, at most two decimal places (a credit is never rounded
    to something support did not type)."""
    if not isinstance(amount_in_dollars, str):
        raise CreditError("amount must be decimal text, e.g. 12.50")
    try:
        dollars = money.parse_decimal(amount_in_dollars, field="amount")
    except money.MoneyError as error:
        raise CreditError(str(error)) from None
    if dollars <= 0:
        raise CreditError("amount must be greater than zero")
    if dollars != dollars.quantize(Decimal("0.01")):
        raise CreditError("amount has more than two decimal places")
    cents = money.round_cents(dollars.scaleb(2))
    if cents > MAX_CREDIT_CENTS:
        raise CreditError(f"amount is larger than {money.format_money(MAX_CREDIT_CENTS)}")
    return cents


def own_product(code: str, name: str, unit: str) -> Product:
    """One of the portal's own `credit`-kind products (never sold), created on first use
    (safe when two requests race)."""
    insert = postgresql.insert if db.engine.dialect.name == "postgresql" else sqlite.insert
    product = db.session.scalar(select(Product).where(Product.code == code))
    if product is None:
        db.session.execute(
            insert(Product)
            .values(code=code, name=name, unit=unit, unit_price=Decimal(0), kind="credit", active=False)
            .on_conflict_do_nothing(index_elements=["code"])
        )
        product = db.session.scalar(select(Product).where(Product.code == code))
    if product.kind != "credit":
        raise CreditError(f"the product code {code!r} is taken by a {product.kind} product")
    return product


def credit_product() -> Product:
    """The product support's credits are billed under."""
    return own_product(CREDIT_PRODUCT_CODE, "Account credit", "credit")


def add_credit(organization: Organization, amount_in_dollars: object, reason: str) -> InvoiceItem:
    """Put a credit of `amount_in_dollars` with `reason` on the organization's open
    invoice (opened if it has none): a new negative line, the total lowered by it, the
    invoice marked unsynced. Each call is a new credit; the caller commits."""
    if has_control_characters(reason or "", allow_whitespace=True):
        raise CreditError("the reason holds control characters")
    reason = " ".join((reason or "").split())
    if not reason:
        raise CreditError("a reason is required")
    if len(reason) > MAX_REASON_LENGTH:
        raise CreditError(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    cents = credit_cents(amount_in_dollars)
    product = credit_product()
    invoice: Invoice = ensure_open_invoice(organization, lock=True)  # not claimed by a close until we commit
    key = f"{product.code}||credit:{uuid4().hex}"
    set_item(invoice.id, product, key, resource="", description=f"Credit: {reason}",
             quantity=Decimal(1), amount_cents=-cents)
    return db.session.scalar(
        select(InvoiceItem).where(InvoiceItem.invoice_id == invoice.id, InvoiceItem.line_key == key)
    )


def credit_items(organization: Organization, limit: int = 100) -> list[InvoiceItem]:
    """The organization's credits, newest first, with their invoices."""
    return list(db.session.scalars(
        select(InvoiceItem)
        .join(Invoice, Invoice.id == InvoiceItem.invoice_id)
        .join(Product, Product.id == InvoiceItem.product_id)
        .where(Invoice.organization_id == organization.id, Product.kind == "credit")
        .options(contains_eager(InvoiceItem.invoice), contains_eager(InvoiceItem.product))
        .order_by(InvoiceItem.id.desc())
        .limit(limit)
    ))


def remove_credit(item: InvoiceItem) -> int:
    """Take a credit off its invoice while that invoice is open: the line goes, the
    total rises by the credit, the invoice is marked unsynced (the next sync removes
    the line at Stripe). Returns the credit's amount in cents (positive). Raises
    CreditError, changing nothing, for a line that is not a credit or an invoice that
    is no longer open (its credit is at Stripe for good). The caller commits."""
    if item.product.kind != "credit":
        raise CreditError(f"line #{item.id} is not a credit")
    # Locked: a close cannot claim the invoice between this check and the commit.
    status = db.session.scalar(select(Invoice.status).where(Invoice.id == item.invoice_id).with_for_update())
    if status != "open":
        raise CreditError(f"invoice #{item.invoice_id} is {status}: a credit can only be removed "
                          "while its invoice is open")
    cents = -item.amount_cents
    invoice_id = item.invoice_id
    db.session.execute(delete(InvoiceItem).where(InvoiceItem.id == item.id))
    mark_changed(invoice_id, cents)
    db.session.expunge(item)
    return cents

"""Helpers for sync tests: read the Stripe side back and compare it with the portal."""
from __future__ import annotations

import stripe
from sqlalchemy import select

from portal.models import Invoice


def stripe_client(emulator) -> stripe.StripeClient:
    return stripe.StripeClient(emulator.api_key, base_addresses={"api": emulator.url}, max_network_retries=0)


def stripe_lines_of(emulator, stripe_invoice_id: str) -> list:
    client = stripe_client(emulator)
    lines, params = [], {"limit": 100}
    while True:
        page = client.v1.invoices.line_items.list(stripe_invoice_id, params=params)
        lines.extend(page.data)
        if not page.has_more:
            return lines
        params = {"limit": 100, "starting_after": page.data[-1].id}


def assert_stripe_matches_portal(db, emulator, invoice_id: int) -> None:
    """The Stripe invoice's total equals the portal invoice's total, to the cent, and
    it holds exactly one line per portal line."""
    db.session.expire_all()
    invoice = db.session.scalar(select(Invoice).where(Invoice.id == invoice_id))
    stripe_invoice = stripe_client(emulator).v1.invoices.retrieve(invoice.stripe_invoice_id)
    assert stripe_invoice.total == invoice.total_cents == sum(item.amount_cents for item in invoice.items)
    keys = [line.metadata["portal_line"] for line in stripe_lines_of(emulator, invoice.stripe_invoice_id)]
    assert len(keys) == len(set(keys)), f"duplicate lines at Stripe: {keys}"


def writes(emulator, since: int = 0) -> list[dict]:
    return [r for r in emulator.control.requests_log(since=since) if r["method"] in ("POST", "DELETE")]

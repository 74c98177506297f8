"""Past invoices on the billing page: number, period, total, status badge, Stripe's
hosted page and PDF, and a link to each invoice's own page."""
from __future__ import annotations

import re

from tests.test_customer_pages import _past_invoice as _paid_invoice
from tests.test_customer_pages import billed  # noqa: F401  (a fixture)


def _past_invoice(db, organization, months_ago: int, status: str = "paid", **fields):
    invoice = _paid_invoice(db, organization, months_ago, **fields)
    invoice.status = status
    db.session.commit()
    return invoice


def test_past_invoices_list_number_period_total_badge_and_stripe_links(client, auth, db, billed):  # noqa: F811
    organization, _, _ = billed
    paid = _past_invoice(db, organization, 1, number="INV-0001", total_cents=123456,
                         hosted_invoice_url="https://invoice.stripe.test/i/1", invoice_pdf="https://pay.stripe.test/1.pdf")
    due = _past_invoice(db, organization, 2, number="INV-0002", total_cents=500, status="finalized",
                        payment_attempts=1, hosted_invoice_url="https://invoice.stripe.test/i/2")
    void = _past_invoice(db, organization, 3, number="INV-0003", total_cents=0, status="void")
    unnumbered = _past_invoice(db, organization, 4, total_cents=7, status="paid")
    auth.login("ann@example.com")
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    section = page.split('id="past-invoices"')[1].split("</section>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section, re.S)[1:]
    assert len(rows) == 4
    first = rows[0]
    assert f'href="/orgs/initech/invoices/{paid.id}">INV-0001</a>' in first
    assert f"{paid.period_start:%Y-%m-%d} to {paid.period_end:%Y-%m-%d}" in first
    assert "$1,234.56" in first and 'class="badge status-paid">paid<' in first
    assert 'href="https://invoice.stripe.test/i/1"' in first and 'href="https://pay.stripe.test/1.pdf"' in first
    assert f'invoices/{due.id}">INV-0002' in rows[1] and 'status-past_due">past due<' in rows[1]
    assert f'invoices/{void.id}">INV-0003' in rows[2] and 'status-void">void<' in rows[2]
    assert f'invoices/{unnumbered.id}">#{unnumbered.id}</a>' in rows[3]  # reachable before Stripe numbers it

    detail = client.get(f"/orgs/initech/invoices/{due.id}")
    assert detail.status_code == 200 and "INV-0002" in detail.get_data(as_text=True)

"""Support staff in a real browser (Debian's Chromium, driven by Playwright) on the
portal served by gunicorn, billing against the emulator: compare a draft edited at
Stripe, repair it, compare again; and recover a stuck invoice to billed through the
console alone. Screenshots go to the test's tmp dir."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from rq import Queue, SimpleWorker
from sqlalchemy import select

from jobs.app import use_app
from portal.billing.closing import claim_for_closing
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.models import Invoice
from portal.queue import QUEUE_NAMES, redis_connection
from tests.browser.test_billing_page_browser import chromium_page
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client
from tests.test_drift import edit_at_stripe

PASSWORD = "support-pass-1"


@pytest.fixture
def acme(db, make, stripe_emulator):
    """Acme's invoice, its period ended yesterday, synced to its Stripe draft; a support user."""
    organization = make.organization(slug="acme", name="Acme",
                                     created_at=datetime.now(timezone.utc) - timedelta(days=90))
    egress = make.product("egress.gb", unit_price="200", name="Egress", unit="GB")
    invoice = make.open_invoice(organization, at=datetime.now(timezone.utc) - timedelta(days=32))
    for resource, gigabytes in (("", "12.5"), ("eu", "3"), ("us", "1")):
        add_quantity(invoice, egress, resource, Decimal(gigabytes))
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"
    make.user("staff@example.com", PASSWORD, support=True)
    db.session.commit()
    return db.session.get(Invoice, invoice.id)


def run_jobs(app, db) -> None:
    """The worker: run what the console queued (in the test's process, on the same Redis)."""
    db.session.commit()
    use_app(app)
    connection = redis_connection()
    SimpleWorker([Queue(name, connection=connection) for name in QUEUE_NAMES], connection=connection).work(burst=True)
    db.session.rollback()


def sign_in(page, url: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("Email").fill("staff@example.com")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def test_support_compares_a_draft_edited_at_stripe_repairs_it_and_compares_clean(
        db, app, live_server, stripe_emulator, acme, tmp_path):
    edit_at_stripe(stripe_emulator, acme)
    invoice_id, stripe_id = acme.id, acme.stripe_invoice_id
    db.session.commit()  # hold no transaction (on SQLite, the write lock) while gunicorn serves
    with chromium_page() as page:
        sign_in(page, live_server.url)
        page.goto(f"{live_server.url}/admin/")
        page.get_by_role("link", name="Acme").click()
        page.locator("#open-invoice").get_by_role("link", name="Compare with Stripe").click()
        page.wait_for_url(f"{live_server.url}/admin/invoices/{invoice_id}/drift")
        page.get_by_role("button", name="Compare with Stripe").click()
        page.wait_for_selector("#drift-outcome:has-text('3 line(s) differ')")
        lines = page.locator("table.drift-lines tbody tr")
        kinds = [lines.nth(i).locator("td").first.inner_text().strip() for i in range(lines.count())]
        assert sorted(kinds) == ["added at Stripe by hand kept", "different amount", "different quantity",
                                 "missing at Stripe"]
        page.screenshot(path=str(tmp_path / "drift-found.png"), full_page=True)

        page.get_by_role("button", name="Repair").click()
        page.wait_for_selector(".flash.success:has-text('Repair of invoice')")
        run_jobs(app, db)
        page.get_by_role("button", name="Compare with Stripe").click()
        page.wait_for_selector("#drift-outcome:has-text('No difference')")
        assert lines.count() == 1 and "added at Stripe by hand" in lines.first.inner_text()
        assert page.get_by_role("button", name="Repair").count() == 0
        page.screenshot(path=str(tmp_path / "drift-repaired.png"), full_page=True)
    # Stripe holds the portal's lines and the fee added by hand, which the repair kept.
    stripe_total = stripe_client(stripe_emulator).v1.invoices.retrieve(stripe_id).total
    assert stripe_total == db.session.get(Invoice, invoice_id).total_cents + 5000


def test_support_recovers_an_invoice_whose_draft_was_deleted_at_stripe_to_billed(
        db, app, live_server, stripe_emulator, acme, tmp_path):
    old_draft, invoice_id = acme.stripe_invoice_id, acme.id
    assert claim_for_closing(invoice_id)  # the close began, and its job was lost
    stripe_client(stripe_emulator).v1.invoices.delete(old_draft)
    db.session.commit()  # hold no transaction (on SQLite, the write lock) while gunicorn serves
    with chromium_page() as page:
        sign_in(page, live_server.url)
        page.goto(f"{live_server.url}/admin/orgs/acme")
        page.get_by_role("link", name="Recovery").click()
        stuck = page.locator(f"#stuck-{invoice_id}")
        assert "closing, not finalized yet" in stuck.inner_text()
        page.screenshot(path=str(tmp_path / "recovery-list.png"), full_page=True)
        stuck.get_by_role("link", name="Compare with Stripe").click()
        page.get_by_role("button", name="Compare with Stripe").click()
        page.wait_for_selector(f"#drift-problem:has-text('Stripe has no invoice {old_draft} (deleted)')")
        page.screenshot(path=str(tmp_path / "draft-missing.png"), full_page=True)

        page.locator("#drift-problem").get_by_role("link", name="Recreate the Stripe draft").click()
        page.wait_for_url(f"{live_server.url}/admin/recovery/invoices/{invoice_id}/recreate-draft")
        assert "Recreate the Stripe draft?" in page.locator("#confirm-recovery h1").inner_text()
        page.get_by_role("button", name="Recreate the Stripe draft").click()  # no reason: refused
        assert page.locator("#reason:invalid").count() == 1  # the browser asks for it first
        page.get_by_label("Reason (kept in the audit log)").fill("Ticket 4711: draft deleted in the dashboard")
        page.screenshot(path=str(tmp_path / "confirm-recovery.png"), full_page=True)
        page.get_by_role("button", name="Recreate the Stripe draft").click()
        page.wait_for_selector(".flash.success:has-text('Recreate the Stripe draft')")
        run_jobs(app, db)
        page.goto(f"{live_server.url}/admin/orgs/acme")
        row = page.locator("#invoices tbody tr").filter(has=page.get_by_role("link", name=str(invoice_id), exact=True))
        assert "finalized" in row.inner_text() or "paid" in row.inner_text()
        page.screenshot(path=str(tmp_path / "recovered-billed.png"), full_page=True)
    invoice = db.session.scalar(select(Invoice).where(Invoice.id == invoice_id))
    assert invoice.status in ("finalized", "paid") and invoice.stripe_invoice_id != old_draft and invoice.number
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)

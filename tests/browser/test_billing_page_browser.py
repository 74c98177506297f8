"""A real browser (Debian's Chromium, driven by Playwright) signs in on the portal
served by gunicorn and reads the current invoice's total on the billing page."""
from __future__ import annotations

from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import pytest

from portal.billing.pricing import add_quantity

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium_page():
    """A page in Debian's Chromium. A missing browser fails the test (never a skip):
    the suite does not download browsers, the machine must have Debian's package."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
                    "the browser test never downloads a browser", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context()
            context.set_default_timeout(15_000)
            yield context.new_page()
        finally:
            browser.close()


def test_member_signs_in_and_sees_the_current_invoice_total(db, make, live_server):
    organization = make.organization(name="Initech", slug="initech")
    cpu = make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, cpu, "web-1", Decimal("1728000"))  # $19.01
    add_quantity(invoice, cpu, "worker-1", Decimal("100000"))  # $1.10
    make.user("ann@example.com", "browser-pass-1", organization=organization)
    db.session.commit()  # end this test's transaction: gunicorn shares the database

    with chromium_page() as page:
        page.goto(f"{live_server.url}/login")
        page.get_by_label("Email").fill("ann@example.com")
        page.get_by_label("Password").fill("browser-pass-1")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing")

        assert page.get_by_role("heading", name="Initech").is_visible()
        current = page.locator("#current-invoice")
        assert current.locator("tfoot .total").inner_text().strip() == "$20.11"
        current.locator(".line-group summary", has_text="Shared CPU").click()  # its machines, folded until asked
        assert "web-1" in current.inner_text() and "worker-1" in current.inner_text()


def _process_stripe_events(app, emulator, db) -> None:
    """Let Stripe deliver its webhooks to the live portal, then run the queued jobs."""
    from rq import Queue, SimpleWorker

    from jobs.app import use_app
    from portal.queue import redis_connection

    emulator.control.wait_for_webhooks(timeout=15)
    use_app(app)
    db.session.commit()
    SimpleWorker([Queue("webhooks", connection=redis_connection())], connection=redis_connection()).work(burst=True)


def test_owner_adds_a_card_at_stripe_and_the_warning_goes(db, app, make, live_server, stripe_emulator, tmp_path):
    """The whole way a customer fixes "no payment method": the warning on the billing
    page, Stripe's customer portal (the emulator's page), a test card, back to the
    portal, which learns of the card from Stripe's webhook."""
    from portal.billing.sync import sync_invoice
    from tests.webhook_helpers import SECRET

    stripe_emulator.control.set_portal_default_configuration(True)
    stripe_emulator.control.configure_webhooks(url=live_server.url + "/webhooks/stripe", secret=SECRET,
                                               retry_base_seconds=0.05)
    organization = make.organization(name="Initech", slug="initech")
    cpu = make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, cpu, "web-1", Decimal("1728000"))
    make.user("owner@example.com", "browser-pass-1", organization=organization, role="owner")
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"  # the Stripe customer exists, without a card
    _process_stripe_events(app, stripe_emulator, db)

    with chromium_page() as page:
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.goto(f"{live_server.url}/login")
        page.get_by_label("Email").fill("owner@example.com")
        page.get_by_label("Password").fill("browser-pass-1")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing")
        assert page.locator("#no-payment-method").is_visible()
        page.screenshot(path=str(tmp_path / "billing-no-card.png"), full_page=True)

        page.get_by_role("button", name="Manage payment methods").click()
        page.wait_for_url(f"{stripe_emulator.url}/p/session/**")
        assert "No default payment method" in page.locator("#default-card").inner_text()
        page.get_by_role("button", name="Add Visa •••• 4242").click()
        page.wait_for_selector("#default-card:has-text('4242')")
        _process_stripe_events(app, stripe_emulator, db)
        page.locator("#return").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing")
        assert page.locator("#no-payment-method").count() == 0
        assert "visa •••• 4242" in page.locator("#payment-methods").inner_text()
        page.screenshot(path=str(tmp_path / "billing-with-card.png"), full_page=True)
    stripe_emulator.control.configure_webhooks(url="", secret="")

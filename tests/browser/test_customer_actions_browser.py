"""Debian's Chromium against a live portal (gunicorn), a real RQ worker, the Stripe
emulator and a local SMTP server: an owner attaches a service and sees the total
change, sets a spend alert and sees the banner and exactly one email, and downloads
the period's usage as CSV. Screenshots are saved in the test's tmp dir."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from portal.models import Invoice
from portal.models.types import utcnow
from tests.browser.test_billing_page_browser import chromium_page
from tests.services import free_port
from tests.test_spend_alerts import Inbox

ROOT = Path(__file__).resolve().parents[2]
API = {"Authorization": "Bearer test-token"}


@pytest.fixture
def smtp_inbox():
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    inbox.port = controller.port
    yield inbox
    controller.stop()


@pytest.fixture
def portal_worker(database_uri, redis_url, stripe_emulator, smtp_inbox, tmp_path):
    """`rq worker` as run in production, billing against the emulator, mailing through the local SMTP server."""
    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "live-test",
           "STRIPE_API_KEY": stripe_emulator.api_key, "STRIPE_API_BASE": stripe_emulator.url,
           "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_inbox.port), "SMTP_FROM": "billing@portal.test"}
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "rq"), "worker", "-w", "jobs.worker.PortalWorker", "sweeps", "sync",
         "webhooks", "default", "--url", redis_url], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    yield process
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:  # its loop serves on after a warm shutdown: end it
        process.kill()
        process.wait(timeout=5)
    log.close()


@pytest.fixture
def initech(db, make):
    organization = make.organization(name="Initech", slug="initech", billing_email="ap@initech.test",
                                     created_at=utcnow() - timedelta(days=60))
    make.product("machines.cpu", unit_price="0.0011", name="Shared CPU", unit="second")
    make.product("ipv4.dedicated", unit_price="200", kind="recurring", name="Dedicated IPv4", unit="address")
    make.open_invoice(organization)
    make.user("owner@example.com", "browser-pass-1", organization=organization, role="owner")
    db.session.commit()
    return organization


def sign_in(page, live_server) -> None:
    page.goto(f"{live_server.url}/login")
    page.get_by_label("Email").fill("owner@example.com")
    page.get_by_label("Password").fill("browser-pass-1")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{live_server.url}/orgs/initech/billing")


def shown_total(page) -> int:
    text = page.locator("#current-invoice tfoot .total").inner_text().strip()
    return int(text.replace("$", "").replace(",", "").replace(".", ""))


def post_usage(live_server, events) -> None:
    response = requests.post(f"{live_server.url}/api/v1/usage", json={"events": events}, headers=API, timeout=10)
    assert response.status_code == 200, response.text


def wait_for(condition, seconds: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {seconds} s"
                                 + (f"\n{log.read_text()[-3000:]}" if log and log.exists() else ""))
        time.sleep(0.2)


def test_owner_attaches_a_service_sets_an_alert_and_downloads_the_usage(
        db, initech, live_server, stripe_emulator, portal_worker, smtp_inbox, tmp_path):
    now = utcnow()
    post_usage(live_server, [{"id": f"cpu-{i}", "organization": "initech", "product": "machines.cpu",
                              "quantity": "360000", "occurred_at": (now - timedelta(minutes=30 + i)).isoformat(),
                              "resource": name} for i, name in enumerate(["web-1", "=cmd()"])])
    with chromium_page() as page:
        sign_in(page, live_server)
        before = shown_total(page)
        assert before == 792  # 720,000 s at $0.000011
        page.screenshot(path=str(tmp_path / "1-billing.png"), full_page=True)

        # Attach a service: the confirmation quotes the rest of the period; the total moves by it.
        page.get_by_label("Service").select_option("ipv4.dedicated")
        page.get_by_label("Quantity").fill("2")
        page.get_by_role("button", name="Attach…").click()
        quote_text = page.locator("#quote-amount").inner_text().strip()
        quote = int(quote_text.replace("$", "").replace(".", ""))
        assert 0 < quote <= 400
        page.screenshot(path=str(tmp_path / "2-attach-confirm.png"), full_page=True)
        page.get_by_role("button", name=f"Attach for {quote_text}").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing#current-invoice")
        after = shown_total(page)
        assert quote - 1 <= after - before <= quote
        assert "Dedicated IPv4" in page.locator("#current-invoice").inner_text()
        assert "Dedicated IPv4" in page.locator("#services").inner_text()
        page.screenshot(path=str(tmp_path / "3-attached.png"), full_page=True)

        # The worker carries it to Stripe (the emulator) at once.
        invoice_id = db.session.scalar(select(Invoice.id).where(Invoice.status == "open"))
        db.session.rollback()

        def stripe_total():
            db.session.rollback()
            invoice = db.session.get(Invoice, invoice_id, populate_existing=True)
            stripe_invoice_id, unsynced = invoice.stripe_invoice_id, invoice.has_unsynced_changes
            db.session.rollback()  # hold no transaction (on SQLite, no write lock) while the portal works
            if stripe_invoice_id is None or unsynced:
                return None
            import stripe

            client = stripe.StripeClient(stripe_emulator.api_key, base_addresses={"api": stripe_emulator.url})
            return client.v1.invoices.retrieve(stripe_invoice_id).total

        assert wait_for(stripe_total, 30, "the sync after attaching", tmp_path / "worker.log") == after

        # A spend alert above today's total; usage through the API crosses it; the sync evaluates it.
        page.get_by_label("Watch").select_option("total")
        page.get_by_label("Threshold in USD").fill(f"{(after + 1000) / 100:.2f}")
        page.get_by_role("button", name="Add alert").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing#alerts")
        assert page.locator(".alert-banner").count() == 0
        post_usage(live_server, [{"id": "cpu-big", "organization": "initech", "product": "machines.cpu",
                                  "quantity": "1000000", "occurred_at": utcnow().isoformat(), "resource": "web-1"}])
        sync = requests.post(f"{live_server.url}/api/v1/invoices/{invoice_id}/sync", headers=API, timeout=10)
        assert sync.status_code == 202
        wait_for(lambda: smtp_inbox.messages, 30, "the alert's email", tmp_path / "worker.log")
        page.reload()
        banner = page.locator(".alert-banner")
        assert banner.count() == 1 and "past your alert at" in banner.inner_text()
        page.screenshot(path=str(tmp_path / "4-alert-banner.png"), full_page=True)
        # Evaluated again (another sync): still the one crossing, the one email.
        requests.post(f"{live_server.url}/api/v1/invoices/{invoice_id}/sync", headers=API, timeout=10)
        time.sleep(3)
        assert len(smtp_inbox.messages) == 1
        recipients, message = smtp_inbox.messages[0]
        assert recipients == ["ap@initech.test"] and "spend passed" in message["Subject"]

        # The period's usage as CSV, as the browser downloads it.
        with page.expect_download() as download_info:
            page.get_by_role("link", name="Usage events of this period (CSV)").click()
        download = download_info.value
        path = tmp_path / download.suggested_filename
        download.save_as(path)
        rows = list(csv.reader(io.StringIO(path.read_text())))
        assert rows[0][:6] == ["id", "time", "product", "resource", "quantity", "unit"]
        assert sorted(row[0] for row in rows[1:]) == ["cpu-0", "cpu-1", "cpu-big"]
        assert {row[3] for row in rows[1:]} == {"web-1", "'=cmd()"}
        page.screenshot(path=str(tmp_path / "5-export.png"), full_page=True)


def test_error_page_and_the_owners_sections_at_phone_width(db, initech, live_server, tmp_path):
    """The 404 page inside the layout with its way back; the services, alerts and export
    sections and a confirmation fit a 390 px screen without scrolling sideways."""
    from decimal import Decimal

    from portal.billing.alerts import add_alert
    from portal.billing.services import attach_service
    from portal.models import Product
    from tests.test_customer_pages import _past_invoice

    ip = db.session.scalar(select(Product).where(Product.code == "ipv4.dedicated"))
    attach_service(initech, ip, Decimal(1), "edge-proxy-frankfurt-1.example.internal")
    add_alert(initech, "projection", 25_000)
    db.session.commit()
    _past_invoice(db, initech, 1, number="INV-2026-0042", total_cents=123_456,
                  hosted_invoice_url="https://invoice.stripe.test/i/42", invoice_pdf="https://pay.stripe.test/42.pdf")
    with chromium_page() as page:
        page.set_viewport_size({"width": 390, "height": 844})
        sign_in(page, live_server)
        widths = page.evaluate("""() => ['services', 'alerts', 'export', 'past-invoices'].map(
            id => [id, document.getElementById(id).scrollWidth, document.getElementById(id).clientWidth])""")
        for section, scroll_width, client_width in widths:
            assert scroll_width <= client_width, f"#{section} scrolls sideways: {scroll_width} > {client_width}"
        page.screenshot(path=str(tmp_path / "phone-billing.png"), full_page=True)
        page.get_by_role("button", name="Attach…").click()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "phone-confirm.png"), full_page=True)

        response = page.goto(f"{live_server.url}/orgs/initech/invoices/987654")
        assert response.status == 404
        assert page.get_by_role("heading", name="There is nothing at this address").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "phone-404.png"), full_page=True)
        page.get_by_role("link", name="Back to billing").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing")

        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url(f"{live_server.url}/login")
        assert page.get_by_text("You are signed out.").is_visible()
        page.screenshot(path=str(tmp_path / "phone-signed-out.png"), full_page=True)

"""Support, in Debian's Chromium, answers "why is my bill this?": finds the customer
by billing email, opens the organization, drills from a line down to its usage
events, gives a credit through the confirmation page, and sees it in the audit."""
from __future__ import annotations

from datetime import datetime, timezone

from tests.api_helpers import event, post_usage, stamp
from tests.browser.test_billing_page_browser import chromium_page


def test_support_finds_explains_credits_and_sees_the_audit(db, client, make, live_server, tmp_path):
    organization = make.organization(name="Initech", slug="initech", billing_email="accounts@initech.test")
    make.organization(name="Initrode", slug="initrode", billing_email="accounts@initrode.test")
    make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    make.open_invoice(organization)
    now = stamp(datetime.now(timezone.utc))
    assert post_usage(client, [event("boot-1", "initech", "machines.shared-cpu-1x", "1728000", now, "web-1"),
                               event("boot-2", "initech", "machines.shared-cpu-1x", "100000", now, "web-1")]
                      ).status_code == 200
    post_usage(client, [event("boot-1", "initech", "machines.shared-cpu-1x", "1728000", now, "web-1")])  # resent
    make.user("staff@example.com", "browser-pass-1", support=True)
    db.session.commit()  # gunicorn shares the database
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with chromium_page() as page:
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(f"{live_server.url}/login")
        page.get_by_label("Email").fill("staff@example.com")
        page.get_by_label("Password").fill("browser-pass-1")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{live_server.url}/admin/")

        page.get_by_label("Search by").fill("accounts@initech.test")
        page.get_by_role("button", name="Search").click()
        results = page.locator("table.orgs tbody")
        assert results.get_by_role("link", name="Initech").is_visible()
        assert results.get_by_role("link", name="Initrode").count() == 0
        page.screenshot(path=str(shots / "1-search.png"), full_page=True)

        results.get_by_role("link", name="Initech").click()
        page.wait_for_url(f"{live_server.url}/admin/orgs/initech")
        assert page.locator("#customer-view tfoot .total").inner_text().strip() == "$20.11"
        page.screenshot(path=str(shots / "2-organization.png"), full_page=True)

        page.locator("#lines").get_by_role("link", name="Explain").click()
        page.wait_for_url(f"{live_server.url}/admin/orgs/initech/lines/*")
        events = page.locator("table.usage-events tbody")
        assert events.locator("tr").count() == 2
        boot_1 = events.locator("tr", has_text="boot-1")
        assert "accepted" in boot_1.inner_text() and "duplicate" in boot_1.inner_text()
        page.screenshot(path=str(shots / "3-line-events.png"), full_page=True)

        page.get_by_role("link", name="← Initech").click()
        page.get_by_label("Amount in USD").fill("25")
        page.get_by_label("Reason (shown on the invoice)").fill("Outage on 3 March")
        page.get_by_role("button", name="Add credit…").click()
        page.wait_for_url(f"{live_server.url}/admin/orgs/initech/credits/new?*")
        consequences = page.locator("#consequences").inner_text()
        assert "-$25.00" in consequences and "Initech" in consequences and "not charged now" in consequences
        assert "$4.89" in page.locator("#to-balance").inner_text()  # $25.00 - $20.11 becomes Stripe balance
        page.screenshot(path=str(shots / "4-credit-confirm.png"), full_page=True)
        page.get_by_role("button", name="Add the credit").click()
        page.wait_for_url(f"{live_server.url}/admin/orgs/initech")
        assert "Credit of $25.00 added" in page.locator("body").inner_text()
        assert page.locator("#customer-view tfoot .total").inner_text().strip() == "-$4.89"

        # Closing now would charge nothing: the confirmation says so, and Cancel leaves it.
        page.get_by_role("link", name="Close cycle now…").click()
        page.wait_for_url(f"{live_server.url}/admin/invoices/*/close")
        close = page.locator("#consequences").inner_text()
        assert "-$4.89" in close and "Nothing is charged" in close and "credit balance" in close
        assert page.get_by_role("button", name="Close the cycle now").is_visible()
        page.screenshot(path=str(shots / "5-close-confirm.png"), full_page=True)
        page.get_by_role("link", name="Cancel").click()
        page.wait_for_url(f"{live_server.url}/admin/orgs/initech")

        own_audit = page.locator("#audit")
        assert "Outage on 3 March" in own_audit.inner_text() and "staff@example.com" in own_audit.inner_text()
        own_audit.get_by_role("link", name="all of them").click()
        page.wait_for_url(f"{live_server.url}/admin/audit?org=initech")
        entries = page.locator("#audit-entries").inner_text()
        assert "Credit added" in entries and "Outage on 3 March" in entries and "$25.00" in entries
        page.screenshot(path=str(shots / "6-audit.png"), full_page=True)
    print(f"screenshots in {shots}")

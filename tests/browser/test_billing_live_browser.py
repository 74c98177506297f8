"""The live billing page in Debian's Chromium, against the portal served by gunicorn,
a real worker process and the Stripe emulator: the chart and the projection, usage
posted through the API showing up without a reload, "Sync now" reaching done, and
the phone width. Screenshots are saved in the test's tmp dir."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from portal.billing.usage import ingest_usage
from portal.models.types import utcnow
from tests.browser.test_billing_page_browser import chromium_page

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker_process(database_uri, redis_url, stripe_emulator, tmp_path):
    """`rq worker` serving the sync queue, billing against the emulator."""
    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "live-test",
           "STRIPE_API_KEY": stripe_emulator.api_key, "STRIPE_API_BASE": stripe_emulator.url}
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen([str(Path(sys.executable).parent / "rq"), "worker", "-w", "jobs.worker.PortalWorker",
                                "sync", "default", "--url", redis_url], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    yield process
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _post_usage(base_url: str, events: list[dict]) -> dict:
    request = urllib.request.Request(base_url + "/api/v1/usage", data=json.dumps({"events": events}).encode(),
                                     headers={"Authorization": "Bearer test-token",
                                              "Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _usage_over_the_period(invoice, now) -> list[dict]:
    """A few days of machines and storage, so the chart has bars to show."""
    events, day = [], max(invoice.period_start, now - timedelta(days=6))
    n = 0
    while day < now:
        for code, resource, quantity in (("machines.shared-cpu-1x", "web-1", "86400"),
                                         ("machines.shared-cpu-1x", "worker-1", str(20000 + 5000 * n)),
                                         ("volumes.gb", "vol-db", "240")):
            n += 1
            events.append({"id": f"seed-{n}", "organization": "initech", "product": code, "quantity": quantity,
                           "resource": resource, "occurred_at": day.isoformat()})
        day += timedelta(days=1)
    return events


def test_a_customer_watches_the_invoice_move_and_syncs_it(db, make, live_server, stripe_emulator, worker_process,
                                                          tmp_path):
    now = utcnow()
    organization = make.organization(name="Initech", slug="initech", created_at=now - timedelta(days=60))
    make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    make.product("volumes.gb", unit_price="0.0208", name="Volume storage", unit="GB-hour")
    invoice = make.open_invoice(organization)
    ingest_usage("seed", _usage_over_the_period(invoice, now), now=now)
    make.user("ann@example.com", "browser-pass-1", organization=organization, role="owner")
    db.session.commit()  # gunicorn and the worker share the database

    with chromium_page() as page:
        errors: list[str] = []
        page.on("console", lambda message: errors.append(f"{message.text} at {message.location}")
                if message.type == "error" else None)
        page.set_viewport_size({"width": 1280, "height": 900})
        page.goto(f"{live_server.url}/login")
        page.get_by_label("Email").fill("ann@example.com")
        page.get_by_label("Password").fill("browser-pass-1")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{live_server.url}/orgs/initech/billing")

        # The chart is drawn, and hovering a day shows that day's figures.
        page.wait_for_function("() => window.Chart && Chart.getChart(document.getElementById('spend-chart'))")
        box = page.locator("#spend-chart").bounding_box()
        page.mouse.move(box["x"] + box["width"] - 40, box["y"] + box["height"] / 2)
        page.wait_for_function("() => Chart.getChart(document.getElementById('spend-chart')).tooltip.opacity > 0")
        tooltip = page.evaluate("""() => { const t = Chart.getChart(document.getElementById('spend-chart')).tooltip;
            return {title: t.title, body: t.body.map(b => b.lines.join(' ')), footer: t.footer}; }""")
        assert tooltip["footer"][0].startswith("Day total: $"), tooltip
        assert any(line.startswith("Shared CPU: $") for line in tooltip["body"]), tooltip
        page.locator(".spend-chart").screenshot(path=str(tmp_path / "billing-chart-hover.png"))
        assert page.locator("#projected-total").inner_text().startswith("$")
        page.locator("#projection summary").click()
        assert "continued to the end of the period" in page.locator("#projection-explanation").inner_text()
        page.locator(".line-group summary", has_text="Shared CPU").click()
        cpu = page.locator(".line-group", has_text="Shared CPU")
        assert cpu.locator("span[title$='seconds']").count() == 3  # the group and its two machines
        page.screenshot(path=str(tmp_path / "billing-desktop.png"), full_page=True)

        # Usage arrives through the API: the total changes without a reload.
        page.evaluate("() => { window.notReloaded = true; }")
        before = page.locator("#total-so-far").inner_text()
        _post_usage(live_server.url, [{"id": "live-1", "organization": "initech",
                                       "product": "machines.shared-cpu-1x", "quantity": "3600000",
                                       "resource": "web-2", "occurred_at": utcnow().isoformat()}])  # $39.60
        page.wait_for_function(f"() => document.getElementById('total-so-far').innerText !== {json.dumps(before)}",
                               timeout=15_000)
        assert page.evaluate("() => window.notReloaded") is True
        assert "Updating Stripe…" in page.locator("#stripe-state").inner_text()
        # What the customer had opened is still open, and shows the new machine.
        assert page.locator("#projection").get_attribute("open") is not None
        assert "web-2" in page.locator(".line-group[open]", has_text="Shared CPU").inner_text()

        # Sync now: queued, then done, and Stripe is up to date, all in place.
        page.get_by_role("button", name="Sync now").click()
        page.wait_for_selector("#sync-progress .sync-done", timeout=30_000)
        page.wait_for_function(
            "() => document.getElementById('stripe-state').innerText.startsWith('Stripe is up to date')",
            timeout=15_000)
        assert page.evaluate("() => window.notReloaded") is True
        page.screenshot(path=str(tmp_path / "billing-desktop-synced.png"), full_page=True)

        # A phone: nothing scrolls sideways.
        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        page.wait_for_function("() => Chart.getChart(document.getElementById('spend-chart'))")
        assert page.evaluate("() => document.scrollingElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "billing-phone.png"), full_page=True)
        # No CSP refusal and no script error (the favicon is another matter).
        assert not [error for error in errors if "/favicon.ico" not in error], errors
    print(f"screenshots in {tmp_path}")

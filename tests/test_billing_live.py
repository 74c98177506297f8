"""The live billing page: the open invoice's partial (chart, projection, readable
lines, credits, Stripe's state in plain words), its refresh, and "Sync now"."""
from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job

from jobs.app import use_app
from portal.billing.credits import add_credit
from portal.billing.usage import ingest_usage
from portal.customer.live import sync_state
from portal.customer.stripe_status import FAILING, PHRASES, UP_TO_DATE, UPDATING, stripe_status
from portal.models import Invoice, SyncRun
from portal.models.types import utcnow
from portal.queue import redis_connection

HTMX = {"HX-Request": "true"}


@pytest.fixture
def billed(db, make):
    """An organization with usage on two products (events, as the API stores them)."""
    organization = make.organization(name="Initech", slug="initech")
    make.product("machines.shared-cpu-1x", unit_price="0.0011", name="Shared CPU", unit="second")
    make.product("volumes.gb", unit_price="0.0208", name="Volume storage", unit="GB-hour")
    invoice = make.open_invoice(organization)
    now = utcnow()
    ingest_usage("test", [
        {"id": "e1", "organization": "initech", "product": "machines.shared-cpu-1x", "quantity": "1728000",
         "resource": "web-1", "occurred_at": now.isoformat()},
        {"id": "e2", "organization": "initech", "product": "machines.shared-cpu-1x", "quantity": "100000",
         "resource": "worker-1", "occurred_at": now.isoformat()},
        {"id": "e3", "organization": "initech", "product": "volumes.gb", "quantity": "7300",
         "resource": "vol-1", "occurred_at": now.isoformat()},
    ], now=now)
    db.session.commit()
    make.user("ann@example.com", organization=organization, role="owner")
    return organization, db.session.get(Invoice, invoice.id)


def _page(client, slug="initech") -> str:
    response = client.get(f"/orgs/{slug}/billing")
    assert response.status_code == 200
    return response.get_data(as_text=True)


# --- Stripe's state in plain words: one phrase per state ------------------------------

def _invoice(change_seq=0, synced_seq=0, sync_blocked=None) -> Invoice:
    return Invoice(change_seq=change_seq, synced_seq=synced_seq, sync_blocked=sync_blocked)


def test_no_changes_pending_reads_stripe_is_up_to_date():
    run = SyncRun(outcome="synced")
    assert stripe_status(_invoice(3, 3), run).phrase == "Stripe is up to date"
    assert stripe_status(_invoice(0, 0), None).state == UP_TO_DATE


def test_changes_pending_read_updating_stripe_whether_or_not_a_sync_ran():
    assert stripe_status(_invoice(4, 3), SyncRun(outcome="synced")).phrase == "Updating Stripe…"
    assert stripe_status(_invoice(1, 0), None).state == UPDATING
    assert stripe_status(_invoice(4, 3), SyncRun(outcome="write_in_flight")).state == UPDATING


@pytest.mark.parametrize("outcome", ["rejected", "stripe_unavailable", "unknown_outcome", "died", "too_many_lines"])
def test_changes_pending_after_a_failed_sync_read_could_not_be_updated(outcome):
    status = stripe_status(_invoice(4, 3), SyncRun(outcome=outcome))
    assert status.state == FAILING
    assert status.phrase == "Stripe could not be updated; we are retrying and support has been told"


def test_a_blocked_invoice_reads_could_not_be_updated_even_without_changes():
    assert stripe_status(_invoice(3, 3, sync_blocked="stripe_invoice_finalized"), None).state == FAILING


def test_no_outcome_code_or_job_id_reaches_the_customer(client, auth, db, billed):
    organization, invoice = billed
    db.session.add(SyncRun(invoice_id=invoice.id, trigger="manual", job_id="job-abc123", finished_at=utcnow(),
                           outcome="rejected", error="card_declined"))
    db.session.commit()
    auth.login("ann@example.com")
    page = _page(client)
    assert PHRASES[FAILING] in page
    for hidden in ("rejected", "(blocked)", "job-abc123", "card_declined"):
        assert hidden not in page


# --- the open invoice: chart, projection, lines --------------------------------------

def test_the_chart_holds_the_days_spend_by_product_from_the_database(client, auth, billed):
    auth.login("ann@example.com")
    page = _page(client)
    chart = json.loads(html.unescape(re.search(r'data-chart="([^"]+)"', page).group(1)))
    today = utcnow().date().isoformat()
    assert chart["days"][-1] == today
    by_product = {series["product"]: series for series in chart["series"]}
    assert set(by_product) == {"Shared CPU", "Volume storage"}
    cpu = by_product["Shared CPU"]
    assert cpu["cents"][-1] == 2011 and cpu["text"][-1] == "$20.11"  # 1,828,000 s x $0.000011
    assert by_product["Volume storage"]["cents"][-1] == 152  # 7,300 GB-h x $0.000208 = $1.5184
    assert chart["totals"][-1] == "$21.63"
    assert all(cents == 0 for cents in cpu["cents"][:-1])


def test_the_projection_and_how_it_was_made_are_shown(client, auth, billed):
    auth.login("ann@example.com")
    page = _page(client)
    assert 'id="projected-total"' in page
    assert "How the projection is made" in page
    assert "continued to the end of the period" in page or "there is no usage to go on yet" in page


def test_lines_are_grouped_by_product_with_subtotals_and_readable_quantities(client, auth, billed):
    auth.login("ann@example.com")
    page = _page(client)
    groups = page.split('id="line-groups"')[1].split("invoice-totals")[0]
    cpu = groups.split('<details class="line-group kind-metered"')[1]
    assert "Shared CPU" in cpu and "$20.11" in cpu  # the subtotal of web-1 and worker-1
    assert '<span title="1,728,000 seconds">480 hours</span>' in cpu
    assert '<span class="group-quantity" title="1,828,000 seconds">507.8 hours</span>' in cpu
    storage = groups.split('<details class="line-group kind-metered"')[2]
    assert '<span title="7,300 GB-hours">10 GB-months</span>' in storage and "$1.52" in storage


def test_the_period_ends_on_its_last_day(client, auth, billed):
    _, invoice = billed
    auth.login("ann@example.com")
    last = invoice.period_end - timedelta(days=1)
    assert f"– {last.day} {last:%b %Y}" in _page(client)


def test_credits_are_shown_as_credits(client, auth, db, billed):
    organization, _ = billed
    add_credit(organization, "5.00", "Outage on 3 Nov")
    db.session.commit()
    auth.login("ann@example.com")
    page = _page(client)
    credits = page.split('<details class="line-group kind-credit"')[1].split("</details>")[0]
    assert "Credits" in credits and "Credit: Outage on 3 Nov" in credits and "-$5.00" in credits
    assert "Usage and services" in page and 'id="credit-carried"' not in page


def test_credits_larger_than_the_charges_say_what_stripe_carries_forward(client, auth, db, billed):
    organization, _ = billed
    add_credit(organization, "50.00", "Goodwill")
    db.session.commit()
    auth.login("ann@example.com")
    page = _page(client)
    carried = page.split('id="credit-carried"')[1].split("</p>")[0]
    assert "You will not be charged" in carried
    assert "$28.37" in carried and "taken off your next invoice" in carried  # $50.00 - $21.63


# --- the live refresh -----------------------------------------------------------------

def test_the_partial_is_sent_again_only_when_something_changed(client, auth, db, billed):
    organization, invoice = billed
    auth.login("ann@example.com")
    page = _page(client)
    refresh = html.unescape(re.search(r'hx-get="([^"]+/billing/current[^"]*)"', page).group(1))
    assert client.get(refresh, headers=HTMX).status_code == 204
    ingest_usage("test", [{"id": "e4", "organization": "initech", "product": "machines.shared-cpu-1x",
                           "quantity": "100000", "resource": "web-1", "occurred_at": utcnow().isoformat()}])
    db.session.commit()
    response = client.get(refresh, headers=HTMX)
    assert response.status_code == 200
    partial = response.get_data(as_text=True)
    assert partial.lstrip().startswith("{#") is False and 'id="current-invoice"' in partial
    assert "<html" not in partial and "$22.73" in partial  # $21.63 + 100,000 s x $0.000011
    assert "Updating Stripe…" in partial


def test_the_partial_without_htmx_sends_the_page(client, auth, billed):
    auth.login("ann@example.com")
    response = client.get("/orgs/initech/billing/current")
    assert response.status_code == 302 and response.headers["Location"].endswith("/orgs/initech/billing")


def test_another_organizations_partial_is_not_found(client, auth, make, billed):
    make.organization(slug="other")
    auth.login("ann@example.com")
    assert client.get("/orgs/other/billing/current", headers=HTMX).status_code == 404


# --- Sync now -----------------------------------------------------------------------

@pytest.fixture
def worker(app, db):
    use_app(app)

    def run():
        db.session.rollback()  # the test client's requests share this session: end its transaction
        SimpleWorker([Queue("sync", connection=redis_connection())], connection=redis_connection()).work(burst=True)
    return run


def _progress_url(response_text: str) -> str:
    return html.unescape(re.search(r'hx-get="([^"]+/billing/sync/[^"]+)"', response_text).group(1))


def test_sync_now_shows_queued_then_done_in_place(client, auth, db, billed, stripe_emulator, worker):
    organization, invoice = billed
    auth.login("ann@example.com")
    response = client.post("/orgs/initech/billing/sync", headers=HTMX)
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert "sync-queued" in text and "<html" not in text
    url = _progress_url(text)
    worker()
    done = client.get(url, headers=HTMX)
    assert "sync-done" in done.get_data(as_text=True) and "hx-get" not in done.get_data(as_text=True)
    assert done.headers["HX-Trigger"] == "invoice-changed"
    db.session.expire_all()
    assert db.session.get(Invoice, invoice.id).has_unsynced_changes is False
    assert "Stripe is up to date" in _page(client)


def test_sync_now_that_cannot_reach_stripe_shows_failed(client, auth, billed, worker, app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_API_KEY", None)
    auth.login("ann@example.com")
    url = _progress_url(client.post("/orgs/initech/billing/sync", headers=HTMX).get_data(as_text=True))
    worker()
    text = client.get(url, headers=HTMX).get_data(as_text=True)
    assert "sync-failed" in text and "support has been told" in text
    assert "stripe_not_configured" not in text


def test_a_running_sync_reads_running(app):
    job = Job.create("jobs.sync.sync_invoice", args=(1, "manual"), connection=redis_connection())
    job.set_status("started")
    assert sync_state(job) == "running"


def test_sync_now_without_javascript_redirects_to_the_page_with_its_progress(client, auth, billed):
    auth.login("ann@example.com")
    response = client.post("/orgs/initech/billing/sync")
    assert response.status_code == 303 and "/orgs/initech/billing?sync=" in response.headers["Location"]
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "sync-queued" in page and "Sync with Stripe requested" in page


def test_sync_now_is_limited_per_organization(client, auth, app, make, billed, monkeypatch):
    monkeypatch.setitem(app.config, "SYNC_NOW_LIMIT", "2 per minute")
    organization, _ = billed
    auth.login("ann@example.com")
    assert [client.post("/orgs/initech/billing/sync", headers=HTMX).status_code for _ in range(3)] == [200, 200, 429]
    refused = client.post("/orgs/initech/billing/sync")
    assert refused.status_code == 303
    # The limit is the organization's, whoever asks.
    make.user("bob@example.com", organization=organization)
    auth.logout()
    auth.login("bob@example.com")
    response = client.post("/orgs/initech/billing/sync", headers=HTMX)
    assert response.status_code == 429 and "Try again in a minute" in response.get_data(as_text=True)


def test_sync_progress_of_another_invoice_is_not_found(client, auth, db, make, billed):
    other = make.organization(slug="other")
    make.open_invoice(other)
    make.user("olga@example.com", organization=other)
    auth.login("olga@example.com")
    url = _progress_url(client.post("/orgs/other/billing/sync", headers=HTMX).get_data(as_text=True))
    auth.logout()
    auth.login("ann@example.com")
    job_id = url.rsplit("/", 1)[1]
    assert client.get(f"/orgs/initech/billing/sync/{job_id}", headers=HTMX).status_code == 404


def test_sync_now_needs_a_csrf_token(client, auth, app, billed, monkeypatch):
    auth.login("ann@example.com")
    monkeypatch.setitem(app.config, "WTF_CSRF_ENABLED", True)
    assert client.post("/orgs/initech/billing/sync", headers=HTMX).status_code == 400
    page = _page(client)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert client.post("/orgs/initech/billing/sync", data={"csrf_token": token}, headers=HTMX).status_code == 200


def test_the_open_invoices_own_page_says_stripes_state_in_plain_words(client, auth, db, billed):
    _, invoice = billed
    db.session.add(SyncRun(invoice_id=invoice.id, trigger="manual", finished_at=utcnow(), outcome="rejected",
                           error="card_declined"))
    db.session.commit()
    auth.login("ann@example.com")
    page = client.get(f"/orgs/initech/invoices/{invoice.id}").get_data(as_text=True)
    assert PHRASES[FAILING] in page and "rejected" not in page and "card_declined" not in page

"""The support view: who may use it, what it shows, and what its actions do."""
from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from rq import Queue, SimpleWorker
from sqlalchemy import func, select, update

from jobs.app import use_app
from portal.billing.pricing import add_quantity
from portal.models import AuditEntry, Invoice, InvoiceItem, Product, StripeEvent, SyncRun
from portal.models.types import utcnow
from portal.queue import redis_connection
from tests.sync_helpers import assert_stripe_matches_portal


@pytest.fixture
def acme(db, make):
    """An organization with an open invoice worth $40.00, a member, and a support user."""
    organization = make.organization(name="Acme Cloud", slug="acme")
    egress = make.product("egress.gb", unit_price="200", name="Outbound data transfer", unit="GB")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, egress, "", Decimal(20))
    db.session.commit()
    make.user("ann@example.com", organization=organization)
    make.user("staff@example.com", support=True)
    return organization, invoice


def _queue(name: str) -> Queue:
    return Queue(name, connection=redis_connection())


def _audit(db) -> list[AuditEntry]:
    """The audit entries of support's actions (sign-ins left out)."""
    db.session.expire_all()
    return list(db.session.scalars(select(AuditEntry).where(AuditEntry.action != "support.sign_in")
                                   .order_by(AuditEntry.id)))


def _invoice(db, invoice_id: int) -> Invoice:
    db.session.expire_all()
    return db.session.get(Invoice, invoice_id)


# --- access --------------------------------------------------------------------------


def test_member_cannot_reach_any_admin_page_or_action(client, auth, db, acme):
    organization, invoice = acme
    auth.login("ann@example.com")
    for path in ("/admin/", f"/admin/orgs/{organization.slug}", "/admin/discrepancies"):
        assert client.get(path).status_code == 403, path
    for path in (f"/admin/invoices/{invoice.id}/sync", f"/admin/invoices/{invoice.id}/close"):
        assert client.post(path, data={"confirmed": "yes", "reason": "x"}).status_code == 403, path
    assert client.post(f"/admin/orgs/{organization.slug}/credits",
                       data={"amount": "10", "reason": "x", "confirmed": "yes"}).status_code == 403
    assert _audit(db) == []
    assert _queue("sync").count == 0 and _queue("default").count == 0
    assert _invoice(db, invoice.id).total_cents == 4000


def test_admin_requires_sign_in(client, acme):
    response = client.get("/admin/")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_support_reaches_every_admin_page(client, auth, acme):
    organization, _ = acme
    auth.login("staff@example.com")
    for path in ("/admin/", f"/admin/orgs/{organization.slug}", "/admin/discrepancies"):
        assert client.get(path).status_code == 200, path
    assert client.get("/admin/orgs/no-such-org").status_code == 404


def test_organization_list_is_searchable_by_slug_or_name(client, auth, make, acme):
    make.organization(name="Globex Corporation", slug="globex")
    make.organization(name="Initech", slug="initech-100%")
    auth.login("staff@example.com")
    by_name = client.get("/admin/?q=globex corp").get_data(as_text=True)
    assert "Globex Corporation" in by_name and "Acme Cloud" not in by_name
    by_slug = client.get("/admin/?q=ACME").get_data(as_text=True)
    assert "Acme Cloud" in by_slug and "Globex" not in by_slug
    # LIKE wildcards in the search are plain characters.
    percent = client.get("/admin/?q=%25").get_data(as_text=True)
    assert "Initech" in percent and "Acme Cloud" not in percent
    assert "No organization matches" in client.get("/admin/?q=zzz").get_data(as_text=True)


# --- the organization page -----------------------------------------------------------


def test_organization_page_shows_invoices_items_sync_runs_and_stripe_events(client, auth, db, acme):
    organization, invoice = acme
    organization.stripe_customer_id = "cus_acme"
    now = utcnow()
    db.session.add_all([
        SyncRun(invoice_id=invoice.id, trigger="manual", started_at=now - timedelta(seconds=3), finished_at=now,
                outcome="stripe_unavailable", created=2, updated=1, deleted=0, unchanged=5, stripe_reads=3,
                stripe_writes=4, error="StripeUnavailable: 503 from Stripe"),
        StripeEvent(stripe_event_id="evt_acme_1", type="invoice.paid", stripe_created=1,
                    payload={"data": {"object": {"object": "invoice", "customer": "cus_acme"}}},
                    attempts=2, last_error="LookupError: no invoice"),
        StripeEvent(stripe_event_id="evt_other", type="invoice.paid", stripe_created=1,
                    payload={"data": {"object": {"object": "invoice", "customer": "cus_other"}}}),
    ])
    db.session.commit()
    auth.login("staff@example.com")
    page = client.get(f"/admin/orgs/{organization.slug}").get_data(as_text=True)
    assert "Outbound data transfer" in page and "$40.00" in page
    runs = page.split('id="sync-runs"')[1].split("</section>")[0]
    assert "manual" in runs and "stripe unavailable" in runs and "503 from Stripe" in runs
    assert "7 <small>(3 read, 4 write)" in runs and "3.00 s" in runs
    events = page.split('id="stripe-events"')[1].split("</section>")[0]
    assert "evt_acme_1" in events and "LookupError: no invoice" in events and "evt_other" not in events


def test_admin_organization_page_queries_do_not_grow_with_items_or_runs(client, auth, db, make, count_queries):
    organization = make.organization(slug="busy", stripe_customer_id="cus_busy")
    product = make.product(unit_price="0.5")
    invoice = make.open_invoice(organization)
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")
    added = 0

    def add(n: int) -> int:
        nonlocal added
        for _ in range(n):
            added += 1
            add_quantity(invoice, product, f"machine-{added}", Decimal(10))
            db.session.add(SyncRun(invoice_id=invoice.id, trigger="usage", finished_at=utcnow(), outcome="synced"))
            db.session.add(StripeEvent(stripe_event_id=f"evt_{added}", type="invoice.updated", stripe_created=added,
                                       payload={"data": {"object": {"customer": "cus_busy"}}}))
            db.session.add(Invoice(organization_id=organization.id, status="paid", currency="usd",
                                   period_start=utcnow() - timedelta(days=60 + 30 * added),
                                   period_end=utcnow() - timedelta(days=30 + 30 * added)))
        db.session.commit()
        with count_queries as counted:
            response = client.get(f"/admin/orgs/{organization.slug}")
        assert response.status_code == 200
        return counted.count

    few, many = add(1), add(30)
    assert many == few, count_queries.statements
    # The page shows the customer's view (its chart one query, its projection three), sync
    # history, events, services, credits and audit; SQLite also counts its BEGIN.
    assert many <= 18, count_queries.statements


# --- actions -------------------------------------------------------------------------


def test_sync_now_queues_a_manual_sync_and_audits_it(client, auth, db, acme):
    organization, invoice = acme
    auth.login("staff@example.com")
    response = client.post(f"/admin/invoices/{invoice.id}/sync")
    assert response.status_code == 302
    assert response.headers["Location"].endswith(f"/admin/orgs/{organization.slug}")
    jobs = _queue("sync").jobs
    assert len(jobs) == 1
    assert jobs[0].func_name == "jobs.sync.sync_invoice" and jobs[0].args == (invoice.id, "manual")
    [entry] = _audit(db)
    assert (entry.actor, entry.action, entry.object_type, entry.object_id) == (
        "staff@example.com", "invoice.sync_now", "invoice", str(invoice.id))
    assert (entry.invoice_id, entry.organization_id) == (invoice.id, organization.id)
    assert jobs[0].id in client.get(f"/admin/orgs/{organization.slug}").get_data(as_text=True)  # flashed


def test_close_cycle_now_queues_the_close_job_without_calling_stripe(client, auth, db, acme, stripe_emulator):
    _, invoice = acme
    auth.login("staff@example.com")
    response = client.post(f"/admin/invoices/{invoice.id}/close",
                           data={"confirmed": "yes", "reason": "Customer leaves"}, follow_redirects=True)
    assert "Close of invoice" in response.get_data(as_text=True)
    [job] = _queue("default").jobs
    assert job.func_name == "jobs.cycles.close_cycle" and job.args == (invoice.id, True)
    [entry] = _audit(db)
    assert entry.action == "invoice.close_cycle_now" and entry.object_id == str(invoice.id)
    assert entry.actor == "staff@example.com"
    assert _invoice(db, invoice.id).status == "open"  # the worker closes it, not the request
    assert stripe_emulator.control.requests_log() == []


def test_actions_on_a_closed_invoice_are_refused(client, auth, db, acme):
    _, invoice = acme
    db.session.execute(update(Invoice).where(Invoice.id == invoice.id).values(status="paid"))
    db.session.commit()
    auth.login("staff@example.com")
    page = client.post(f"/admin/invoices/{invoice.id}/close", data={"confirmed": "yes", "reason": "x"},
                       follow_redirects=True).get_data(as_text=True)
    assert "is paid" in page
    assert _queue("default").count == 0 and _audit(db) == []


def test_credit_lowers_the_open_invoice_and_marks_it_unsynced(client, auth, db, acme):
    organization, invoice = acme
    before = _invoice(db, invoice.id)
    change_seq = before.change_seq
    db.session.execute(update(Invoice).where(Invoice.id == invoice.id).values(synced_seq=change_seq))
    db.session.commit()
    auth.login("staff@example.com")
    response = client.post(f"/admin/orgs/{organization.slug}/credits",
                           data={"amount": "12.50", "reason": "Outage on 3 March", "confirmed": "yes"},
                           follow_redirects=True)
    assert "Credit of $12.50 added" in response.get_data(as_text=True)
    after = _invoice(db, invoice.id)
    assert after.total_cents == 4000 - 1250
    assert after.total_cents == sum(item.amount_cents for item in after.items)
    assert after.has_unsynced_changes
    credit = db.session.scalar(select(InvoiceItem).join(Product).where(Product.kind == "credit"))
    assert credit.amount_cents == -1250 and credit.description == "Credit: Outage on 3 March"
    [entry] = _audit(db)
    assert entry.action == "invoice.credit" and entry.actor == "staff@example.com"
    assert entry.details["amount_cents"] == 1250 and entry.details["reason"] == "Outage on 3 March"
    assert [job.args for job in _queue("sync").jobs] == [(invoice.id, "manual")]
    page = client.get(f"/orgs/{organization.slug}/billing").get_data(as_text=True)
    assert "$27.50" in page and "-$12.50" in page


def test_each_credit_is_its_own_line_under_one_credit_product(client, auth, db, acme):
    organization, invoice = acme
    auth.login("staff@example.com")
    for amount in ("1", "2.25"):
        client.post(f"/admin/orgs/{organization.slug}/credits",
                    data={"amount": amount, "reason": "Goodwill", "confirmed": "yes"})
    assert db.session.scalar(select(func.count()).select_from(Product).where(Product.kind == "credit")) == 1
    assert _invoice(db, invoice.id).total_cents == 4000 - 325
    credit = db.session.scalar(select(Product).where(Product.kind == "credit"))
    assert not credit.active  # never offered in the catalog
    catalog = client.get("/api/v1/products", headers={"Authorization": "Bearer test-token"}).get_json()
    assert credit.code not in str(catalog)


@pytest.mark.parametrize("amount, reason", [("", "x"), ("abc", "x"), ("-5", "x"), ("0", "x"),
                                            ("1.005", "x"), ("NaN", "x"), ("10", "   ")])
def test_a_bad_credit_changes_nothing(client, auth, db, acme, amount, reason):
    organization, invoice = acme
    auth.login("staff@example.com")
    page = client.post(f"/admin/orgs/{organization.slug}/credits",
                       data={"amount": amount, "reason": reason, "confirmed": "yes"},
                       follow_redirects=True).get_data(as_text=True)
    assert "No credit given" in page
    assert _invoice(db, invoice.id).total_cents == 4000
    assert _audit(db) == [] and _queue("sync").count == 0


def test_a_credit_is_refused_when_its_product_code_is_taken_by_a_sold_product(client, auth, db, make, acme):
    organization, invoice = acme
    make.product("portal.credit", unit_price="1", kind="metered")
    auth.login("staff@example.com")
    page = client.post(f"/admin/orgs/{organization.slug}/credits",
                       data={"amount": "5", "reason": "x", "confirmed": "yes"},
                       follow_redirects=True).get_data(as_text=True)
    assert "taken by a metered product" in page
    assert _invoice(db, invoice.id).total_cents == 4000 and _audit(db) == []


def test_a_credit_reaches_stripe_with_the_next_sync(client, auth, db, app, acme, stripe_emulator):
    organization, invoice = acme
    auth.login("staff@example.com")
    client.post(f"/admin/orgs/{organization.slug}/credits", data={"amount": "5", "reason": "Sorry", "confirmed": "yes"})
    db.session.commit()
    use_app(app)
    SimpleWorker([_queue("sync")], connection=redis_connection()).work(burst=True)
    assert not _invoice(db, invoice.id).has_unsynced_changes
    assert_stripe_matches_portal(db, stripe_emulator, invoice.id)
    assert _invoice(db, invoice.id).total_cents == 3500


def test_an_action_without_a_csrf_token_is_refused_and_changes_nothing(client, auth, db, app, acme, monkeypatch):
    organization, invoice = acme
    auth.login("staff@example.com")  # signed in while CSRF is off, as the other tests
    monkeypatch.setitem(app.config, "WTF_CSRF_ENABLED", True)
    for path, data in ((f"/admin/invoices/{invoice.id}/sync", {}), (f"/admin/invoices/{invoice.id}/close", {}),
                       (f"/admin/orgs/{organization.slug}/credits", {"amount": "10", "reason": "x"})):
        assert client.post(path, data=data).status_code == 400, path
    assert _audit(db) == []
    assert _queue("sync").count == 0 and _queue("default").count == 0
    assert _invoice(db, invoice.id).total_cents == 4000

    # The page's own form carries the token, and with it the action goes through.
    page = client.get(f"/admin/orgs/{organization.slug}").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert client.post(f"/admin/invoices/{invoice.id}/sync", data={"csrf_token": token}).status_code == 302
    assert _queue("sync").count == 1 and len(_audit(db)) == 1


# --- discrepancies -------------------------------------------------------------------


def test_discrepancies_lists_blocked_failed_and_long_unsynced_invoices_only(client, auth, db, make):
    product = make.product(unit_price="100")
    now = utcnow()
    invoices = {}
    for slug in ("blocked", "failing", "stale", "fresh", "healthy", "closed"):
        invoice = make.open_invoice(make.organization(slug=slug, name=f"Org {slug}"))
        add_quantity(invoice, product, "", Decimal(1))
        invoices[slug] = invoice.id
    db.session.commit()
    in_step = {"synced_seq": Invoice.change_seq}
    db.session.execute(update(Invoice).where(Invoice.id == invoices["blocked"])
                       .values(sync_blocked="stripe_invoice_finalized", **in_step))
    for slug, outcome in (("failing", "stripe_unavailable"), ("healthy", "synced"), ("closed", "rejected")):
        db.session.add(SyncRun(invoice_id=invoices[slug], trigger="schedule", started_at=now - timedelta(minutes=1),
                               finished_at=now, outcome=outcome))
        # The invoice keeps its latest run's outcome, as the sync writes it with the run.
        db.session.execute(update(Invoice).where(Invoice.id == invoices[slug])
                           .values(last_sync_outcome=outcome, **in_step))
    # A run that found the invoice locked does not count as its last sync.
    db.session.add(SyncRun(invoice_id=invoices["healthy"], trigger="manual", started_at=now, finished_at=now,
                           outcome="locked"))
    db.session.execute(update(Invoice).where(Invoice.id == invoices["closed"]).values(status="void"))
    # "stale" changed 20 minutes ago and was never synced; "fresh" changed just now.
    db.session.execute(update(InvoiceItem).where(InvoiceItem.invoice_id == invoices["stale"])
                       .values(updated_at=now - timedelta(minutes=20)))
    db.session.execute(update(Invoice).where(Invoice.id == invoices["stale"])
                       .values(created_at=now - timedelta(minutes=30)))
    db.session.add(StripeEvent(stripe_event_id="evt_failed", type="invoice.paid", stripe_created=1, payload={},
                               attempts=3, last_error="LookupError: no invoice"))
    db.session.add(StripeEvent(stripe_event_id="evt_done", type="invoice.paid", stripe_created=1, payload={},
                               attempts=1, processed_at=now))
    db.session.commit()
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")
    page = client.get("/admin/discrepancies").get_data(as_text=True)
    listed = page.split('id="discrepancies"')[1].split("</section>")[0]
    for slug in ("blocked", "failing", "stale"):
        assert f"Org {slug}<" in listed, slug
    for slug in ("fresh", "healthy", "closed"):
        assert f"Org {slug}<" not in listed, slug
    assert "sync blocked: stripe_invoice_finalized" in listed
    assert "last sync: stripe_unavailable" in listed
    assert "changes waiting for Stripe for more than 10 minutes" in listed
    events = page.split('id="failed-events"')[1].split("</section>")[0]
    assert "evt_failed" in events and "LookupError: no invoice" in events and "evt_done" not in events


def test_unsynced_changes_count_from_the_last_good_sync(client, auth, db, make):
    """An invoice synced long ago with a change made just now is not a problem yet."""
    product = make.product(unit_price="100")
    invoice = make.open_invoice(make.organization(slug="steady", name="Org steady"))
    add_quantity(invoice, product, "old", Decimal(1))
    db.session.commit()
    long_ago = utcnow() - timedelta(hours=2)
    db.session.execute(update(InvoiceItem).values(updated_at=long_ago - timedelta(minutes=1)))
    db.session.add(SyncRun(invoice_id=invoice.id, trigger="schedule", started_at=long_ago, finished_at=long_ago,
                           outcome="synced"))
    db.session.execute(update(Invoice).values(synced_seq=Invoice.change_seq))
    db.session.commit()
    add_quantity(invoice, product, "new", Decimal(1))
    db.session.commit()
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")
    listed = client.get("/admin/discrepancies").get_data(as_text=True).split('id="discrepancies"')[1]
    assert "Org steady" not in listed

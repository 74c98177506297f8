"""Support's "Compare with Stripe" page, "Repair", and drift on the front page."""
from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker
from sqlalchemy import select

from jobs.app import use_app
from portal.models import AuditEntry, DriftCheck, Invoice
from portal.queue import redis_connection
from tests.test_drift import edit_at_stripe, synced  # noqa: F401 (a fixture)


@pytest.fixture
def support(client, auth, make, synced):  # noqa: F811
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")
    return client


def section(page: str, element_id: str) -> str:
    return page.split(f'id="{element_id}"')[1].split("</section>")[0]


def run_syncs(app, db) -> None:
    db.session.commit()
    use_app(app)
    SimpleWorker([Queue("sync", connection=redis_connection())], connection=redis_connection()).work(burst=True)
    db.session.rollback()


def test_compare_repair_compare_through_the_pages(db, app, support, stripe_emulator, synced):  # noqa: F811
    edit_at_stripe(stripe_emulator, synced)
    page = support.get(f"/admin/invoices/{synced.id}/drift").get_data(as_text=True)
    assert "Not compared yet" in page and "Compare with Stripe" in page
    assert support.post(f"/admin/invoices/{synced.id}/drift").status_code == 302
    page = support.get(f"/admin/invoices/{synced.id}/drift").get_data(as_text=True)
    drift = section(page, "drift")
    assert "3 line(s) differ" in drift and "by support" in drift
    assert drift.count("missing at Stripe</span>") == 1 and drift.count("different amount</span>") == 1
    assert drift.count("different quantity</span>") == 1 and drift.count("added at Stripe by hand</span>") == 1
    assert "$24.00" in drift and "$25.00" in drift and "$50.00" in drift
    front = section(support.get("/admin/").get_data(as_text=True), "drift-summary")
    assert f"#{synced.id}</a>" in front and "1 missing, 0 extra, 2 different" in front

    assert support.post(f"/admin/invoices/{synced.id}/drift/repair").status_code == 302
    [job] = Queue("sync", connection=redis_connection()).jobs
    assert job.args == (synced.id, "manual")
    [entry] = db.session.scalars(select(AuditEntry).where(AuditEntry.action != "support.sign_in")).all()
    assert (entry.action, entry.actor, entry.object_id) == ("invoice.drift_repair", "staff@example.com", str(synced.id))
    assert entry.details["drift"] == {"missing": 1, "extra": 0, "different": 2}
    run_syncs(app, db)
    # Repaired: the front page no longer counts it, before any new comparison.
    front = section(support.get("/admin/").get_data(as_text=True), "drift-summary")
    assert f"#{synced.id}</a>" not in front and "No drift found" in front

    support.post(f"/admin/invoices/{synced.id}/drift")
    drift = section(support.get(f"/admin/invoices/{synced.id}/drift").get_data(as_text=True), "drift")
    assert "No difference" in drift and "1 line(s) added at Stripe by hand" in drift
    assert drift.count("added at Stripe by hand</span>") == 1 and "missing at Stripe</span>" not in drift
    assert "drift/repair" not in drift


def test_compare_of_a_closed_invoice_says_why_and_records_nothing(db, support, stripe_emulator, synced):  # noqa: F811
    db.session.get(Invoice, synced.id).status = "paid"
    db.session.commit()
    page = support.post(f"/admin/invoices/{synced.id}/drift", follow_redirects=True).get_data(as_text=True)
    assert "Not compared: invoice #" in page and "is paid" in page
    assert db.session.scalars(select(DriftCheck)).all() == []
    page = support.post(f"/admin/invoices/{synced.id}/drift/repair", follow_redirects=True).get_data(as_text=True)
    assert "Not repaired" in page and Queue("sync", connection=redis_connection()).count == 0


def test_compare_while_a_sync_holds_the_invoice_says_busy(db, app, support, stripe_emulator, synced):  # noqa: F811
    from portal.locks import invoice_lock

    with invoice_lock(synced.id, 0) as lock:
        assert lock is not None
        page = support.post(f"/admin/invoices/{synced.id}/drift", follow_redirects=True).get_data(as_text=True)
    assert "a sync of this invoice is running" in page
    assert db.session.scalars(select(DriftCheck)).all() == []


def test_the_organization_page_links_to_compare_and_recovery(support, synced):  # noqa: F811
    page = support.get("/admin/orgs/acme").get_data(as_text=True)
    assert f"/admin/invoices/{synced.id}/drift" in page and "/admin/recovery?org=acme" in page

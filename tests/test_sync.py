"""The sync engine against the Stripe emulator over real HTTP."""
from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from sqlalchemy import delete, select

import portal.billing.sync
import portal.locks
from portal.billing.pricing import add_quantity, mark_changed
from portal.billing.sync import sync_invoice, unsynced_invoice_ids
from portal.models import Invoice, InvoiceItem, StripeWrite, SyncRun
from portal.stripe_gateway import StripeGateway
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client, stripe_lines_of


@pytest.fixture
def billed(db, make):
    """An organization whose open invoice has three priced items."""
    organization = make.organization(slug="acme")
    cpu = make.product("machines.cpu", unit_price="0.0011", name="CPU")
    egress = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, cpu, "vm-1", Decimal("1728000"))
    add_quantity(invoice, cpu, "vm-2", Decimal("10"))
    add_quantity(invoice, egress, "", Decimal("1.25"))
    db.session.commit()
    return invoice.id, {"cpu": cpu, "egress": egress}


def _log_mark(emulator) -> int:
    log = emulator.control.requests_log()
    return log[-1]["seq"] if log and "seq" in log[-1] else len(log)


def _writes_since(emulator, mark: int) -> list[dict]:
    log = emulator.control.requests_log()
    new = [r for r in log if r.get("seq", 0) > mark] if log and "seq" in log[0] else log[mark:]
    return [r for r in new if r["method"] in ("POST", "DELETE")]


def test_first_sync_creates_customer_draft_and_lines(db, stripe_emulator, billed):
    invoice_id, _ = billed
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced", run.error
    assert (run.created, run.updated, run.deleted) == (3, 0, 0)
    assert run.stripe_writes == 3  # customer, draft, one add_lines
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)
    invoice = db.session.get(Invoice, invoice_id)
    stripe_invoice = stripe_client(stripe_emulator).v1.invoices.retrieve(invoice.stripe_invoice_id)
    # Stripe's backstop for a close that never runs: auto-advancing, finalized two hours
    # after the period ends (never the hour after creation an untimed draft would get).
    assert stripe_invoice.status == "draft" and stripe_invoice.auto_advance is True
    assert stripe_invoice.automatically_finalizes_at == int(invoice.period_end.timestamp()) + 2 * 3600
    create = next(r for r in stripe_emulator.control.requests_log(path="/v1/invoices", method="POST"))
    assert create["params"]["auto_advance"] == "true"  # both in the one create call (form-encoded)
    assert create["params"]["automatically_finalizes_at"] == str(stripe_invoice.automatically_finalizes_at)
    assert stripe_invoice.metadata["portal_invoice_id"] == str(invoice_id)
    assert not invoice.has_unsynced_changes
    # Every item named the draft: nothing is left pending for the customer (FAILURES #7).
    pending = stripe_client(stripe_emulator).v1.invoice_items.list(
        params={"customer": invoice.organization.stripe_customer_id, "pending": True})
    assert pending.data == []


def test_second_sync_makes_no_write(db, stripe_emulator, billed):
    invoice_id, _ = billed
    sync_invoice(invoice_id)
    mark = _log_mark(stripe_emulator)
    run = sync_invoice(invoice_id)
    assert run.outcome == "unchanged"
    assert run.stripe_writes == 0 and run.stripe_reads == 2  # the invoice, one page of lines
    assert _writes_since(stripe_emulator, mark) == []


def test_full_diff_creates_updates_deletes_and_leaves_the_rest(db, stripe_emulator, billed):
    invoice_id, products = billed
    sync_invoice(invoice_id)
    invoice = db.session.get(Invoice, invoice_id)
    add_quantity(invoice, products["cpu"], "vm-1", Decimal("1000"))  # update
    gone = db.session.scalar(select(InvoiceItem).where(InvoiceItem.resource == "vm-2"))
    db.session.execute(delete(InvoiceItem).where(InvoiceItem.id == gone.id))  # delete
    mark_changed(invoice_id, -gone.amount_cents)
    add_quantity(invoice, products["cpu"], "vm-3", Decimal("5000000"))  # create
    db.session.commit()
    mark = _log_mark(stripe_emulator)
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced", run.error
    assert (run.created, run.updated, run.deleted, run.unchanged) == (1, 1, 1, 1)
    paths = sorted(r["path"].rsplit("/", 1)[-1] for r in _writes_since(stripe_emulator, mark))
    assert paths == ["add_lines", "remove_lines", "update_lines"]  # one write per kind of change
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_many_changed_lines_cost_a_few_bulk_writes(db, stripe_emulator, make):
    organization = make.organization(slug="big")
    product = make.product("egress.gb", unit_price="200")
    invoice = make.open_invoice(organization)
    for n in range(120):
        add_quantity(invoice, product, f"r{n}", Decimal(1))
    db.session.commit()
    run = sync_invoice(invoice.id)
    assert run.created == 120 and run.stripe_writes == 2 + 3  # customer, draft, 3 chunks of <= 50
    for n in range(120):
        add_quantity(invoice, product, f"r{n}", Decimal(1))
    db.session.commit()
    run = sync_invoice(invoice.id)
    assert run.updated == 120 and run.stripe_writes == 3
    assert run.stripe_reads == 1 + 2  # the invoice, two pages of lines
    assert_stripe_matches_portal(db, stripe_emulator, invoice.id)


def test_beyond_the_threshold_items_roll_up_per_product(db, stripe_emulator, make):
    organization = make.organization(slug="many")
    cpu, egress = make.product("machines.cpu", unit_price="0.0011"), make.product("egress.gb", unit_price="200")
    invoice = make.open_invoice(organization)
    for n in range(260):
        add_quantity(invoice, cpu, f"vm-{n}", Decimal("12345.5"))
    add_quantity(invoice, egress, "", Decimal("3"))
    db.session.commit()
    run = sync_invoice(invoice.id)
    assert run.outcome == "synced", run.error
    lines = stripe_lines_of(stripe_emulator, db.session.get(Invoice, invoice.id).stripe_invoice_id)
    assert len(lines) == 2
    assert_stripe_matches_portal(db, stripe_emulator, invoice.id)


def test_a_run_that_died_after_stripe_applied_its_write_leaves_no_duplicate(db, app, stripe_emulator, billed,
                                                                            monkeypatch):
    monkeypatch.setattr(portal.locks, "INVOICE_LOCK_LEASE_SECONDS", 1)
    monkeypatch.setattr(portal.billing.sync, "WRITE_SETTLE_SECONDS", 1)
    invoice_id, _ = billed
    # The add_lines is applied at Stripe, then the connection drops: to the run it
    # is as if it died before recording anything (no retries allowed here).
    stripe_emulator.control.set_faults(rules=[{"kind": "drop_after", "path": "*/add_lines", "count": 1}])
    gateway = StripeGateway(app.config["STRIPE_API_KEY"], app.config["STRIPE_API_BASE"], None, max_attempts=1)
    first = sync_invoice(invoice_id, stripe=gateway)
    assert first.outcome == "stripe_unavailable"
    assert db.session.get(Invoice, invoice_id).has_unsynced_changes
    # No answer came: the write may still land, so the lock is left to its lease.
    assert sync_invoice(invoice_id, wait_seconds=0).outcome == "locked"
    time.sleep(1.2)
    second = sync_invoice(invoice_id)
    assert second.outcome == "unchanged", second.error
    assert second.created == 0 and second.stripe_writes == 0  # adopted by metadata, not created again
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_dropped_response_is_retried_with_the_same_key_and_no_duplicate(db, stripe_emulator, billed):
    invoice_id, _ = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "drop_after", "path": "*/add_lines", "count": 1}])
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced", run.error
    adds = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/add_lines")]
    assert len(adds) == 2 and adds[0]["idempotency_key"] == adds[1]["idempotency_key"]
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_500_after_the_change_is_reconciled_without_duplicate(db, stripe_emulator, billed):
    invoice_id, _ = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "500_after", "path": "*/add_lines", "count": 1}])
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced", run.error
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)
    # The write whose answer was a 500 is recorded as unknown; the run read Stripe
    # again, found the lines, and wrote nothing more for them.
    adds = db.session.scalars(select(StripeWrite).where(StripeWrite.operation == "add_lines")
                              .order_by(StripeWrite.id)).all()
    assert [w.outcome for w in adds] == ["unknown"]
    logged = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/add_lines")]
    assert [r["idempotency_key"] for r in logged] == [adds[0].idempotency_key]


def test_500_before_the_change_is_retried_under_a_new_key(db, stripe_emulator, billed):
    invoice_id, _ = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "500_before", "path": "*/add_lines", "count": 1}])
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced", run.error
    adds = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/add_lines")]
    assert len(adds) == 2 and adds[0]["idempotency_key"] != adds[1]["idempotency_key"]
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_a_job_rerun_after_429s_writes_each_line_once(db, app, stripe_emulator, billed):
    invoice_id, _ = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "rate_limit", "path": "*/add_lines", "count": 2}])
    gateway = StripeGateway(app.config["STRIPE_API_KEY"], app.config["STRIPE_API_BASE"], None, max_attempts=1)
    assert sync_invoice(invoice_id, stripe=gateway).outcome == "stripe_unavailable"
    assert sync_invoice(invoice_id, stripe=StripeGateway(app.config["STRIPE_API_KEY"], app.config["STRIPE_API_BASE"],
                                                          None, max_attempts=1)).outcome == "stripe_unavailable"
    assert sync_invoice(invoice_id).outcome == "synced"
    # Stripe stores no 429, so each run's attempt has a key of its own and only the
    # last one was applied.
    adds = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/add_lines")]
    assert [r["status"] for r in adds] == [429, 429, 200] and len({r["idempotency_key"] for r in adds}) == 3
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_lock_timeouts_are_retried_with_the_same_key(db, stripe_emulator, billed):
    invoice_id, _ = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "lock_timeout", "path": "*/add_lines", "count": 2}])
    assert sync_invoice(invoice_id).outcome == "synced"
    adds = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/add_lines")]
    assert [r["status"] for r in adds] == [429, 429, 200]
    assert len({r["idempotency_key"] for r in adds}) == 1
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_a_changed_item_between_failed_attempt_and_retry_gets_a_new_key(db, app, stripe_emulator, billed):
    invoice_id, products = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "rate_limit", "path": "*/add_lines", "count": 1}])
    gateway = StripeGateway(app.config["STRIPE_API_KEY"], app.config["STRIPE_API_BASE"], None, max_attempts=1)
    assert sync_invoice(invoice_id, stripe=gateway).outcome == "stripe_unavailable"
    add_quantity(db.session.get(Invoice, invoice_id), products["egress"], "", Decimal("1"))
    db.session.commit()
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced", run.error
    adds = [r for r in stripe_emulator.control.requests_log() if r["path"].endswith("/add_lines")]
    assert adds[0]["idempotency_key"] != adds[1]["idempotency_key"] and adds[1]["status"] == 200
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_thirty_percent_429s_still_converge(db, stripe_emulator, make):
    organization = make.organization(slug="busy")
    product = make.product("egress.gb", unit_price="200")
    invoice = make.open_invoice(organization)
    for n in range(80):
        add_quantity(invoice, product, f"r{n}", Decimal(n + 1))
    db.session.commit()
    stripe_emulator.control.set_faults(seed=7, rules=[{"kind": "rate_limit", "probability": 0.3}])
    run = sync_invoice(invoice.id)
    assert run.outcome == "synced", run.error
    stripe_emulator.control.clear_faults()
    assert_stripe_matches_portal(db, stripe_emulator, invoice.id)


def test_two_workers_on_one_invoice_never_overlap_at_stripe(db, app, stripe_emulator, billed):
    invoice_id, _ = billed
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 80}])
    outcomes = []

    errors = []

    def worker():
        try:
            with app.app_context():
                outcomes.append(sync_invoice(invoice_id).outcome)
        except Exception as error:  # surfaced by the assertion below
            errors.append(repr(error))

    db.session.commit()  # this thread holds no transaction while the workers run
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(outcomes) == ["synced", "unchanged"]
    log = [r for r in stripe_emulator.control.requests_log() if "/v1/invoices" in r["path"]]
    spans = sorted((r["time"], r["time"] + r["duration_ms"] / 1000) for r in log)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.001, "two requests for one invoice were in flight at once"
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_invoice_finalized_behind_the_portals_back_stops_cleanly(db, stripe_emulator, billed):
    invoice_id, products = billed
    sync_invoice(invoice_id)
    invoice = db.session.get(Invoice, invoice_id)
    stripe_client(stripe_emulator).v1.invoices.finalize_invoice(invoice.stripe_invoice_id)
    add_quantity(invoice, products["egress"], "", Decimal("1"))
    db.session.commit()
    mark = _log_mark(stripe_emulator)
    run = sync_invoice(invoice_id)
    assert run.outcome == "stripe_invoice_finalized"
    assert _writes_since(stripe_emulator, mark) == []
    assert db.session.get(Invoice, invoice_id).sync_blocked == "stripe_invoice_finalized"
    assert invoice_id not in unsynced_invoice_ids()
    assert sync_invoice(invoice_id).outcome == "blocked"


def test_every_run_is_recorded(db, stripe_emulator, billed):
    invoice_id, _ = billed
    sync_invoice(invoice_id, trigger="schedule")
    sync_invoice(invoice_id, trigger="manual")
    runs = db.session.scalars(select(SyncRun).order_by(SyncRun.id)).all()
    assert [(r.trigger, r.outcome) for r in runs] == [("schedule", "synced"), ("manual", "unchanged")]
    # synced: two adoption lookups, then customer, draft and one add_lines; unchanged: the
    # draft and one page of its lines.
    assert [(r.stripe_reads, r.stripe_writes) for r in runs] == [(2, 3), (2, 0)]
    assert all(r.finished_at and r.duration_seconds is not None for r in runs)


def test_without_stripe_configured_the_run_says_so(db, app, monkeypatch, billed):
    invoice_id, _ = billed
    monkeypatch.setitem(app.config, "STRIPE_API_KEY", None)
    run = sync_invoice(invoice_id)
    assert (run.outcome, run.error) == ("stripe_not_configured", "STRIPE_API_KEY is not set")


def test_a_customer_left_by_a_crashed_run_is_adopted_not_created_again(db, stripe_emulator, billed):
    invoice_id, _ = billed
    organization = db.session.get(Invoice, invoice_id).organization
    left_behind = stripe_client(stripe_emulator).v1.customers.create(params={
        "name": organization.name, "email": organization.billing_email,
        "metadata": {"portal_organization_id": str(organization.id)}})
    run = sync_invoice(invoice_id)
    assert run.outcome == "synced"
    assert run.stripe_writes == 2  # the draft and its lines: no second customer
    db.session.refresh(organization)
    assert organization.stripe_customer_id == left_behind.id


def test_a_draft_left_by_a_crashed_run_is_adopted_not_created_again(db, stripe_emulator, billed):
    invoice_id, _ = billed
    assert sync_invoice(invoice_id).outcome == "synced"
    invoice = db.session.get(Invoice, invoice_id)
    left_behind = invoice.stripe_invoice_id
    invoice.stripe_invoice_id = None  # the crashed run never recorded it
    db.session.commit()
    run = sync_invoice(invoice_id)
    assert run.outcome == "unchanged" and run.stripe_writes == 0
    assert db.session.get(Invoice, invoice_id).stripe_invoice_id == left_behind
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)

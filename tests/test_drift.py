"""Drift: the Stripe draft compared with the portal's invoice, line by line, on demand
and by the periodic sweep. Against the emulator over real HTTP."""
from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select, update

from portal.billing.drift import (
    NotComparable,
    compare_invoice,
    drift_found,
    drift_found_count,
    record_check,
    sweep_drift,
)
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.models import DriftCheck, Invoice
from tests.sync_helpers import stripe_client, stripe_lines_of


@pytest.fixture
def synced(db, make, stripe_emulator):
    """An open invoice with three lines (egress $25.00, $6.00, $2.00), synced to its draft."""
    organization = make.organization(slug="acme", name="Acme")
    egress = make.product("egress.gb", unit_price="200", name="Egress", unit="GB")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, egress, "", Decimal("12.5"))
    add_quantity(invoice, egress, "eu", Decimal("3"))
    add_quantity(invoice, egress, "us", Decimal("1"))
    db.session.commit()
    assert sync_invoice(invoice.id).outcome == "synced"
    return db.session.get(Invoice, invoice.id)


def _line_of(emulator, invoice: Invoice, amount: int):
    [line] = [line for line in stripe_lines_of(emulator, invoice.stripe_invoice_id) if line.amount == amount]
    return line


def _item_id(line) -> str:
    return line.parent.invoice_item_details.invoice_item


def edit_at_stripe(emulator, invoice: Invoice) -> dict:
    """What support might do in Stripe's dashboard: change one line's amount, another's
    quantity (in its description), delete a third, and add a fee by hand."""
    client = stripe_client(emulator)
    amount_line, quantity_line, deleted_line = (_line_of(emulator, invoice, cents) for cents in (2500, 600, 200))
    client.v1.invoice_items.update(_item_id(amount_line), params={"amount": 2400})
    label = quantity_line.description.rpartition(": ")[0]
    client.v1.invoice_items.update(_item_id(quantity_line), params={"description": f"{label}: 4 GB"})
    client.v1.invoice_items.delete(_item_id(deleted_line))
    fee = client.v1.invoice_items.create(params={"customer": invoice.organization.stripe_customer_id,
                                                 "invoice": invoice.stripe_invoice_id, "amount": 5000,
                                                 "description": "Setup fee (typed in the dashboard)"})
    return {"amount": amount_line, "quantity": quantity_line, "deleted": deleted_line, "fee": fee}


def test_compare_shows_each_kind_of_difference_line_by_line(db, stripe_emulator, synced):
    edited = edit_at_stripe(stripe_emulator, synced)
    comparison = compare_invoice(synced.id)
    assert comparison.outcome == "drift" and not comparison.changes_waiting
    by_kind = {(d.kind, tuple(d.changes)): d for d in comparison.differences}
    assert set(by_kind) == {("different", ("amount",)), ("different", ("quantity",)), ("missing", ()),
                            ("by_hand", ())}
    amount = by_kind["different", ("amount",)]
    assert (amount.portal_amount, amount.stripe_amount) == (2500, 2400)
    assert amount.stripe_line_id == edited["amount"].id
    quantity = by_kind["different", ("quantity",)]
    assert quantity.portal_description.endswith(": 3 GB") and quantity.stripe_description.endswith(": 4 GB")
    assert quantity.portal_amount == quantity.stripe_amount == 600
    missing = by_kind["missing", ()]
    assert (missing.portal_amount, missing.stripe_line_id) == (200, None)
    assert missing.portal_description == edited["deleted"].description
    fee = by_kind["by_hand", ()]
    assert (fee.stripe_amount, fee.stripe_item_id) == (5000, edited["fee"].id)
    assert comparison.portal_total_cents == 3300
    assert comparison.stripe_total_cents == 2400 + 600 + 5000


def test_a_line_with_the_portals_metadata_that_the_portal_no_longer_has_is_extra(db, stripe_emulator, synced):
    client = stripe_client(stripe_emulator)
    client.v1.invoice_items.create(params={
        "customer": synced.organization.stripe_customer_id, "invoice": synced.stripe_invoice_id, "amount": 700,
        "description": "Egress: 9 GB", "metadata": {"portal_invoice": str(synced.id), "portal_line": "item-999999"}})
    first = _line_of(stripe_emulator, synced, 2500)
    client.v1.invoice_items.create(params={  # a second copy of a portal line
        "customer": synced.organization.stripe_customer_id, "invoice": synced.stripe_invoice_id, "amount": 2500,
        "description": first.description, "metadata": first.metadata.to_dict()})
    comparison = compare_invoice(synced.id)
    assert comparison.outcome == "drift"
    assert sorted((d.kind, d.changes[0], d.stripe_amount) for d in comparison.differences) == [
        ("extra", "duplicate", 2500), ("extra", "not in the portal", 700)]


def test_repair_leaves_nothing_but_the_lines_added_by_hand(db, stripe_emulator, synced):
    edit_at_stripe(stripe_emulator, synced)
    run = sync_invoice(synced.id)  # what "Repair" queues
    assert run.outcome == "synced", run.error
    comparison = compare_invoice(synced.id)
    assert comparison.outcome == "clean"
    assert [(d.kind, d.stripe_amount) for d in comparison.differences] == [("by_hand", 5000)]
    assert comparison.stripe_total_cents == 3300 + 5000


def test_an_unedited_draft_compares_clean_and_the_compare_writes_nothing(db, stripe_emulator, synced):
    before = len(stripe_emulator.control.requests_log())
    comparison = compare_invoice(synced.id)
    assert (comparison.outcome, comparison.differences) == ("clean", [])
    requests = stripe_emulator.control.requests_log(since=before)
    assert [r["method"] for r in requests] == ["GET", "GET"]  # the draft and one page of lines


def test_a_deleted_draft_a_deleted_customer_and_a_finalized_draft_are_named(db, stripe_emulator, synced):
    client = stripe_client(stripe_emulator)
    client.v1.invoices.finalize_invoice(synced.stripe_invoice_id, params={"auto_advance": False})
    assert compare_invoice(synced.id).outcome == "not_draft"

    db.session.execute(update(Invoice).where(Invoice.id == synced.id).values(stripe_invoice_id="in_gone"))
    db.session.commit()
    comparison = compare_invoice(synced.id)
    assert comparison.outcome == "draft_missing" and "in_gone" in comparison.error

    db.session.execute(update(Invoice).where(Invoice.id == synced.id).values(stripe_invoice_id=None))
    db.session.commit()
    assert sync_invoice(synced.id).outcome == "synced"  # a new draft
    client.v1.customers.delete(synced.organization.stripe_customer_id)
    assert compare_invoice(synced.id).outcome == "customer_missing"


def test_an_invoice_without_a_draft_is_not_comparable(db, make, stripe_emulator, synced):
    fresh = make.open_invoice(make.organization(slug="fresh"))
    with pytest.raises(NotComparable, match="no Stripe draft yet"):
        compare_invoice(fresh.id)
    db.session.execute(update(Invoice).where(Invoice.id == synced.id).values(status="paid"))
    db.session.commit()
    with pytest.raises(NotComparable, match="is paid"):
        compare_invoice(synced.id)


def test_a_drift_check_counts_until_a_sync_repairs_it(db, stripe_emulator, synced):
    edit_at_stripe(stripe_emulator, synced)
    record_check(compare_invoice(synced.id), "compare")
    db.session.commit()
    check = db.session.scalar(select(DriftCheck))
    assert (check.outcome, check.missing, check.extra, check.different, check.by_hand) == ("drift", 1, 0, 2, 1)
    assert len(check.details) == 4 and drift_found_count() == 1
    assert [c.invoice_id for c in drift_found()] == [synced.id]
    assert sync_invoice(synced.id).outcome == "synced"
    assert drift_found_count() == 0  # repaired since it was found
    record_check(compare_invoice(synced.id), "compare")
    db.session.commit()
    assert db.session.scalar(select(DriftCheck)).outcome == "clean"
    assert db.session.scalars(select(DriftCheck)).all().__len__() == 1  # one row per invoice, replaced


def test_the_sweep_visits_every_open_invoice_in_turn_a_batch_at_a_time(db, make, stripe_emulator, synced):
    egress = synced.items[0].product
    ids = [synced.id]
    for n in range(4):
        invoice = make.open_invoice(make.organization(slug=f"org-s{n}"))
        add_quantity(invoice, egress, "", Decimal(n + 1))
        db.session.commit()
        assert sync_invoice(invoice.id).outcome == "synced"
        ids.append(invoice.id)
    edit_at_stripe(stripe_emulator, synced)
    never_synced = make.open_invoice(make.organization(slug="never"))  # no draft: not swept
    assert never_synced.id not in ids

    before = len(stripe_emulator.control.requests_log())
    first = sweep_drift(batch=2)
    assert first == {"visited": 2, "skipped": 0, "drift": 1, "clean": 1}
    requests = stripe_emulator.control.requests_log(since=before)
    assert len(requests) == 4 and {r["method"] for r in requests} == {"GET"}  # bounded, and reads only
    checked = lambda: sorted(db.session.scalars(select(DriftCheck.invoice_id)))  # noqa: E731
    assert checked() == ids[:2]
    assert sweep_drift(batch=2)["visited"] == 2 and checked() == ids[:4]
    # The end of the line: the fifth, then round again from the first.
    add_quantity(db.session.get(Invoice, ids[1]), egress, "new", Decimal(1))  # changes waiting: passed over
    db.session.commit()
    third = sweep_drift(batch=3)
    assert third["visited"] == 3 and third["skipped"] == 1 and checked() == ids
    assert drift_found_count() == 1


def test_the_sweep_job_is_scheduled_on_the_sweeps_queue(app):
    from portal.schedule import periodic_job_definitions

    [job] = [job for job in periodic_job_definitions(app.config) if job.func == "jobs.drift.sweep_drift"]
    assert job.queue == "sweeps" and job.interval_seconds == app.config["DRIFT_SWEEP_INTERVAL_SECONDS"]


def test_the_sweep_job_runs_in_a_worker(db, app, stripe_emulator, synced):
    from rq import Queue, SimpleWorker

    from jobs.app import use_app
    from portal.queue import redis_connection

    use_app(app)
    queue = Queue("sweeps", connection=redis_connection())
    job = queue.enqueue("jobs.drift.sweep_drift")
    SimpleWorker([queue], connection=redis_connection()).work(burst=True)
    assert job.get_status() == "finished" and job.return_value()["clean"] == 1
    assert db.session.scalar(select(DriftCheck.source)) == "sweep"


def test_the_sweep_spends_its_reads_from_the_shared_request_budget(db, app, make, monkeypatch, stripe_emulator,
                                                                   synced):
    import time

    for n in range(2):
        invoice = make.open_invoice(make.organization(slug=f"org-b{n}"))
        add_quantity(invoice, synced.items[0].product, "", Decimal(1))
        db.session.commit()
        assert sync_invoice(invoice.id).outcome == "synced"
    monkeypatch.setitem(app.config, "STRIPE_MAX_REQUESTS_PER_SECOND", 10)
    started = time.monotonic()
    assert sweep_drift(batch=3) == {"visited": 3, "skipped": 0, "clean": 3}
    # Six reads spaced a tenth of a second (and a little) apart: five waits at least.
    assert time.monotonic() - started >= 0.5

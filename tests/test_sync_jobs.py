"""Sync triggers: the sweep, "sync now", job status, the schedule, the write budget."""
from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from rq import Queue, SimpleWorker
from rq_scheduler import Scheduler

from jobs.app import use_app
from jobs.sync import sweep_unsynced
from portal.billing.pricing import add_quantity
from portal.models import Invoice
from portal.queue import redis_connection
from portal.schedule import schedule_periodic_jobs
from portal.stripe_gateway import RequestBudget
from tests.api_helpers import HEADERS
from tests.sync_helpers import assert_stripe_matches_portal


@pytest.fixture
def worker(app):
    """Runs queued jobs in this process (burst), in this app."""
    use_app(app)

    def run(*queues: str):
        SimpleWorker([Queue(name, connection=redis_connection()) for name in queues or ("sync", "default")],
                     connection=redis_connection()).work(burst=True)
    return run


@pytest.fixture
def two_invoices(db, make):
    product = make.product("egress.gb", unit_price="200")
    invoices = []
    for slug in ("dirty", "clean"):
        invoice = make.open_invoice(make.organization(slug=slug))
        add_quantity(invoice, product, "", Decimal(2))
        invoices.append(invoice.id)
    db.session.commit()
    return invoices


def test_a_burst_of_sync_requests_is_one_job(client, two_invoices):
    invoice_id = two_invoices[0]
    job_ids = {client.post(f"/api/v1/invoices/{invoice_id}/sync", headers=HEADERS).get_json()["job_id"]
               for _ in range(10)}
    assert len(job_ids) == 1
    assert Queue("sync", connection=redis_connection()).count == 1


def test_sync_job_runs_and_reports_its_result(db, client, worker, stripe_emulator, two_invoices):
    invoice_id = two_invoices[0]
    response = client.post(f"/api/v1/invoices/{invoice_id}/sync", headers=HEADERS)
    assert response.status_code == 202
    job_id = response.get_json()["job_id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=HEADERS).get_json()["status"] == "queued"
    worker("sync")
    status = client.get(f"/api/v1/jobs/{job_id}", headers=HEADERS).get_json()
    assert status["status"] == "finished" and status["result"]["outcome"] == "synced"
    runs = client.get(f"/api/v1/invoices/{invoice_id}/sync-runs", headers=HEADERS).get_json()["sync_runs"]
    # Two reads (adoption lookups for the customer and the draft), three writes
    # (customer, draft, one add_lines).
    assert runs[0]["outcome"] == "synced" and runs[0]["job_id"] == job_id
    assert (runs[0]["stripe_reads"], runs[0]["stripe_writes"], runs[0]["stripe_calls"]) == (2, 3, 5)
    assert_stripe_matches_portal(db, stripe_emulator, invoice_id)
    # Once started, a new request queues a new job.
    assert client.post(f"/api/v1/invoices/{invoice_id}/sync", headers=HEADERS).get_json()["job_id"] != job_id


def test_unknown_job_and_invoice_are_404(client):
    assert client.get("/api/v1/jobs/nope", headers=HEADERS).status_code == 404
    assert client.post("/api/v1/invoices/999/sync", headers=HEADERS).status_code == 404


def test_sweep_enqueues_only_invoices_with_unsynced_changes(db, worker, stripe_emulator, two_invoices):
    dirty, clean = two_invoices
    assert sweep_unsynced() == {"enqueued": 2}
    worker("sync")
    assert sweep_unsynced() == {"enqueued": 0}
    add_quantity(db.session.get(Invoice, dirty), db.session.get(Invoice, dirty).items[0].product, "", Decimal(1))
    db.session.commit()
    assert sweep_unsynced() == {"enqueued": 1}
    assert Queue("sync", connection=redis_connection()).jobs[0].args[0] == dirty


def test_jobs_lost_with_redis_are_repaired_by_the_next_sweep(db, worker, stripe_emulator, two_invoices):
    sweep_unsynced()
    redis_connection().flushdb()  # Redis restarted without persistence: the queue is gone
    assert sweep_unsynced() == {"enqueued": 2}
    worker("sync")
    for invoice_id in two_invoices:
        assert_stripe_matches_portal(db, stripe_emulator, invoice_id)


def test_registering_the_schedule_twice_schedules_once(app):
    first = schedule_periodic_jobs(redis_connection(), app.config)
    second = schedule_periodic_jobs(redis_connection(), app.config)
    assert first["added"] and not second["added"] and second["kept"] == sorted(first["added"])
    jobs = Scheduler(connection=redis_connection()).get_jobs()
    assert sorted(job.id for job in jobs) == sorted(first["added"])


def test_schedule_replaces_a_changed_definition(app):
    schedule_periodic_jobs(redis_connection(), app.config)
    changed = {**app.config, "SYNC_INTERVAL_SECONDS": 17}
    report = schedule_periodic_jobs(redis_connection(), changed)
    assert report["removed"] and any("17s" in job_id for job_id in report["added"])
    assert len(list(Scheduler(connection=redis_connection()).get_jobs())) == len(report["added"]) + len(report["kept"])


def test_schedule_and_sync_commands(runner, db, stripe_emulator, two_invoices):
    result = runner.invoke(args=["schedule"])
    assert result.exit_code == 0 and "added: portal-sweep-unsynced" in result.output
    assert "added: portal-close-due-cycles" in result.output and "added: portal-sweep-stored-events" in result.output
    assert "kept: portal-sweep-unsynced" in runner.invoke(args=["schedule"]).output
    result = runner.invoke(args=["sync", "--invoice", str(two_invoices[0]), "--now"])
    assert (result.exit_code, result.output) == (
        0, f"invoice {two_invoices[0]}: synced (created 1, updated 0, deleted 0, unchanged 0; 5 Stripe calls)\n")
    result = runner.invoke(args=["sync", "--all-dirty"])
    assert result.exit_code == 0 and f"invoice {two_invoices[1]}: queued job" in result.output
    neither = runner.invoke(args=["sync"])
    assert neither.exit_code == 2
    assert neither.output.endswith("Error: give exactly one of --invoice ID or --all-dirty\n")
    missing = runner.invoke(args=["sync", "--invoice", "999"])
    assert (missing.exit_code, missing.output) == (1, "Error: no invoice 999\n")


def test_request_budget_is_shared_and_never_exceeded(app):
    budget_rate = 100
    stamps: list[float] = []
    lock = threading.Lock()

    def spend(count: int):
        budget = RequestBudget(app.extensions["redis"], budget_rate, key="test:budget")
        for _ in range(count):
            budget.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=spend, args=(30,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps.sort()
    elapsed = stamps[-1] - stamps[0]
    assert elapsed >= (len(stamps) - 1) / budget_rate * 0.95  # never faster than the budget
    for i, stamp in enumerate(stamps):  # and never more than the budget in any one-second window
        assert sum(1 for other in stamps[i:] if other - stamp < 1.0) <= budget_rate + 1

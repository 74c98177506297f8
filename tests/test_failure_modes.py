"""Failures billing systems like ours have had, reproduced."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import Job
from sqlalchemy import select, update

import portal.billing.sync
import portal.locks
from jobs.app import use_app
from jobs.webhooks import sweep_stored_events
from portal.billing.events import process_event, store_event
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.billing.sync_queue import enqueue_sync
from portal.models import Invoice, StripeEvent, StripeWrite, SyncRun
from portal.models.types import utcnow
from portal.queue import redis_connection
from tests.services import RedisServer
from tests.sync_helpers import assert_stripe_matches_portal, stripe_client, stripe_lines_of
from tests.webhook_helpers import SECRET, event_body, post_event, sign

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def many_lines(db, make):
    organization = make.organization(slug="acme")
    product = make.product("egress.gb", unit_price="200")
    invoice = make.open_invoice(organization)
    for n in range(150):
        add_quantity(invoice, product, f"r{n}", Decimal(n + 1))
    db.session.commit()
    return invoice.id


def _settled_requests(emulator, quiet_seconds: float = 0.5) -> list[dict]:
    """The emulator's request log once no request has arrived for `quiet_seconds`."""
    log = emulator.control.requests_log()
    while True:
        time.sleep(quiet_seconds)
        again = emulator.control.requests_log()
        if len(again) == len(log):
            return again
        log = again


@pytest.mark.parametrize("kill_after_writes", [1, 2, 3])
def test_a_sync_killed_at_any_point_is_repaired_by_the_next_run_without_duplicates(
        db, app, database_uri, redis_url, stripe_emulator, many_lines, kill_after_writes):
    # Every Stripe request takes 100 ms, so the kill lands somewhere among them.
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 100}])
    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "x",
           "STRIPE_API_KEY": stripe_emulator.api_key, "STRIPE_API_BASE": stripe_emulator.url}
    db.session.commit()
    process = subprocess.Popen([str(Path(sys.executable).parent / "flask"), "--app", "wsgi", "sync", "--invoice",
                                str(many_lines), "--now"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    # Killed once Stripe answered `kill_after_writes` writes (customer, draft, the first
    # of three add_lines): at that moment or during the next write.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(
            1 for r in stripe_emulator.control.requests_log() if r["method"] == "POST") < kill_after_writes:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # A request in flight at the kill still lands at Stripe: let it, as the 30 s lease
    # would before anyone else may sync this invoice.
    settled = _settled_requests(stripe_emulator)
    stripe_emulator.control.clear_faults()
    writes = [r for r in settled if r["method"] == "POST" and r["status"] == 200]
    # The kill landed mid-sync: the customer was created, not every line was added.
    assert writes and writes[0]["path"] == "/v1/customers"
    assert kill_after_writes <= len(writes) < 5, [r["path"] for r in writes]
    # The lock it held lapses with its lease; here we free it as an expired lease would,
    # and its write that got no answer is as old as that lease by then.
    redis_connection().delete(f"portal:lock:invoice:{many_lines}")
    db.session.execute(update(StripeWrite).values(started_at=utcnow() - timedelta(seconds=30)))
    db.session.commit()
    run = sync_invoice(many_lines, trigger="schedule")
    killed = db.session.scalar(select(SyncRun).where(SyncRun.id != run.id))
    assert (killed.outcome, killed.trigger) == ("died", "manual") and killed.finished_at is not None
    assert run.outcome == "synced", run.error  # not every line reached Stripe: it writes the rest
    assert_stripe_matches_portal(db, stripe_emulator, many_lines)
    invoice = db.session.get(Invoice, many_lines)
    assert len(stripe_lines_of(stripe_emulator, invoice.stripe_invoice_id)) == 150
    drafts = stripe_client(stripe_emulator).v1.invoices.list(params={"status": "draft"}).data
    assert len(drafts) == 1  # no second draft either


def test_a_timeout_inside_the_stripe_call_fails_the_job_and_commits_nothing_half_done(
        db, app, stripe_emulator, many_lines, monkeypatch):
    monkeypatch.setattr(portal.locks, "INVOICE_LOCK_LEASE_SECONDS", 4)  # longer than the held write
    monkeypatch.setattr(portal.billing.sync, "WRITE_SETTLE_SECONDS", 4)
    use_app(app)
    stripe_emulator.control.set_faults(rules=[{"kind": "latency", "latency_ms": 3000, "path": "*/add_lines"}])
    queue = Queue("sync", connection=redis_connection())
    job = queue.enqueue("jobs.sync.sync_invoice", many_lines, "manual", job_timeout=1)
    db.session.commit()
    SimpleWorker([queue], connection=redis_connection()).work(burst=True)
    assert Job.fetch(job.id, connection=redis_connection()).get_status() == "failed"
    db.session.rollback()
    run = db.session.scalar(select(SyncRun).order_by(SyncRun.id.desc()))
    assert run.outcome == "error" and "JobTimeoutException" in run.error
    assert db.session.get(Invoice, many_lines).has_unsynced_changes  # not reported as synced
    stripe_emulator.control.clear_faults()
    db.session.commit()
    # The add_lines it sent may still land: the lock is left to its lease, not released.
    assert sync_invoice(many_lines, wait_seconds=0).outcome == "locked"
    time.sleep(4.5)
    # Once it lapsed, the next run proceeds and writes what the timed-out one did not.
    assert sync_invoice(many_lines).outcome == "synced"
    assert_stripe_matches_portal(db, stripe_emulator, many_lines)


def test_invoice_upcoming_is_stored_and_acknowledged_but_starts_nothing(db, stripe_emulator, many_lines):
    # Stripe sends invoice.upcoming only before subscription renewals: the portal's
    # one-off drafts never get one, so the close never waits for it.
    assert sync_invoice(many_lines).outcome == "synced"
    customer = db.session.get(Invoice, many_lines).organization.stripe_customer_id
    upcoming = {"id": "evt_upcoming", "type": "invoice.upcoming", "created": int(time.time()),
                "data": {"object": {"object": "invoice", "customer": customer}}}
    row_id, _ = store_event(upcoming)
    db.session.commit()
    assert db.session.get(StripeEvent, row_id).processed_at is not None  # stored as done: no handler
    assert process_event(row_id) == "already processed"
    assert Queue("sync", connection=redis_connection()).count == 0


def test_finalized_then_created_ends_finalized(db, stripe_emulator, many_lines):
    sync_invoice(many_lines)
    invoice = db.session.get(Invoice, many_lines)
    client = stripe_client(stripe_emulator)
    client.v1.invoices.finalize_invoice(invoice.stripe_invoice_id)
    for event_type in ("invoice.finalized", "invoice.created"):
        import json

        stripe_event = client.v1.events.list(params={"type": event_type}).data[0].to_dict()
        row_id, _ = store_event(json.loads(json.dumps(stripe_event, default=str)))
        db.session.commit()
        process_event(row_id)
    db.session.rollback()
    assert db.session.get(Invoice, many_lines).status == "finalized"


def test_a_job_enqueued_for_a_rolled_back_change_finds_nothing_wrong(db, app, stripe_emulator, many_lines):
    # Enqueueing happens after commit; a job for an invoice whose change was rolled
    # back simply finds Stripe in step with the database.
    use_app(app)
    sync_invoice(many_lines)
    invoice = db.session.get(Invoice, many_lines)
    add_quantity(invoice, invoice.items[0].product, "r0", Decimal(5))
    db.session.rollback()
    enqueue_sync(many_lines)
    SimpleWorker([Queue("sync", connection=redis_connection())], connection=redis_connection()).work(burst=True)
    run = db.session.scalar(select(SyncRun).order_by(SyncRun.id.desc()))
    assert run.outcome == "unchanged"
    assert_stripe_matches_portal(db, stripe_emulator, many_lines)


def test_events_delivered_while_redis_is_stopped_are_processed_after_it_returns(app, client, db, monkeypatch,
                                                                               tmp_path):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])
    own_redis = RedisServer(tmp_path)
    monkeypatch.setitem(app.extensions, "redis", Redis.from_url(own_redis.url, socket_connect_timeout=0.5))
    own_redis.stop()
    body = event_body("evt_while_down", "customer.updated", {"object": "customer", "id": "cus_x"})
    response = post_event(client, body, sign(body))
    assert response.status_code == 200
    db.session.rollback()
    assert db.session.scalar(select(StripeEvent.stripe_event_id)) == "evt_while_down"
    restarted = RedisServer(tmp_path, port=own_redis.port)
    try:
        use_app(app)
        db.session.execute(StripeEvent.__table__.update().values(received_at=utcnow().replace(year=2000)))
        db.session.commit()
        assert sweep_stored_events() == {"enqueued": 1}
        SimpleWorker([Queue("webhooks", connection=app.extensions["redis"])],
                     connection=app.extensions["redis"]).work(burst=True)
        db.session.rollback()
        assert db.session.scalar(select(StripeEvent.processed_at)) is not None
    finally:
        restarted.stop()

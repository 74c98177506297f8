"""`GET /metrics`: each figure moves when the thing it counts happens, several
processes add up (multi-process mode), and only a scraper may read it."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue, SimpleWorker
from sqlalchemy import update

from jobs.app import use_app
from portal import create_app
from portal.billing.events import store_event
from portal.billing.pricing import add_quantity
from portal.billing.sync import sync_invoice
from portal.models import InvoiceItem, StripeEvent
from portal.models.types import utcnow
from portal.queue import redis_connection
from portal.stripe_gateway import StripeGateway
from tests.webhook_helpers import SECRET, event_body, post_event, sign

OUTSIDE = {"REMOTE_ADDR": "203.0.113.9"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def webhook_secret(app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])


def parse(text: str) -> dict:
    """{(sample name, ((label, value), ...)): value} of an exposition."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=")
    return parse(response.get_data(as_text=True))


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def billed(db, make):
    organization = make.organization(slug="acme")
    egress = make.product("egress.gb", unit_price="200", name="Egress")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, egress, "", Decimal("1.25"))
    db.session.commit()
    return invoice


# --- each figure moves -------------------------------------------------------------


def test_a_sync_counts_its_outcome_duration_and_stripe_requests(client, db, stripe_emulator, billed):
    before = scrape(client)
    run = sync_invoice(billed.id)
    assert run.outcome == "synced"
    after = scrape(client)
    assert value(after, "portal_sync_runs_total", outcome="synced") \
        == value(before, "portal_sync_runs_total", outcome="synced") + 1
    assert value(after, "portal_sync_duration_seconds_count", outcome="synced") \
        == value(before, "portal_sync_duration_seconds_count", outcome="synced") + 1
    assert value(after, "portal_sync_duration_seconds_sum", outcome="synced") \
        > value(before, "portal_sync_duration_seconds_sum", outcome="synced")
    for kind, counted in (("write", run.stripe_writes), ("read", run.stripe_reads)):
        assert counted > 0
        assert value(after, "portal_stripe_requests_total", kind=kind) \
            == value(before, "portal_stripe_requests_total", kind=kind) + counted


def test_a_429_from_stripe_is_counted(app, client, db, stripe_emulator, billed):
    stripe_emulator.control.set_faults(rules=[{"kind": "rate_limit", "path": "*/add_lines", "count": 1}])
    before = scrape(client)
    gateway = StripeGateway(app.config["STRIPE_API_KEY"], app.config["STRIPE_API_BASE"], None, max_attempts=1)
    assert sync_invoice(billed.id, stripe=gateway).outcome == "stripe_unavailable"
    after = scrape(client)
    assert value(after, "portal_stripe_rate_limited_total", kind="write") \
        == value(before, "portal_stripe_rate_limited_total", kind="write") + 1
    assert value(after, "portal_sync_runs_total", outcome="stripe_unavailable") \
        == value(before, "portal_sync_runs_total", outcome="stripe_unavailable") + 1


def test_changes_waiting_for_stripe_and_their_age(client, db, make, billed):
    assert value(scrape(client), "portal_invoices_unsynced") == 1
    db.session.execute(update(InvoiceItem).values(updated_at=utcnow() - timedelta(minutes=10)))
    db.session.commit()
    samples = scrape(client)
    assert value(samples, "portal_invoices_unsynced") == 1
    assert 600 <= value(samples, "portal_invoices_unsynced_oldest_age_seconds") < 700
    billed.synced_seq = billed.change_seq
    db.session.commit()
    samples = scrape(client)
    assert value(samples, "portal_invoices_unsynced") == 0
    assert value(samples, "portal_invoices_unsynced_oldest_age_seconds") == 0


def test_drift_found_until_a_sync_repairs_it(client, db, stripe_emulator, billed):
    from portal.billing.drift import compare_invoice, record_check
    from tests.sync_helpers import stripe_client, stripe_lines_of

    assert sync_invoice(billed.id).outcome == "synced"
    assert value(scrape(client), "portal_invoices_drift_found") == 0
    line = stripe_lines_of(stripe_emulator, billed.stripe_invoice_id)[0]
    stripe_client(stripe_emulator).v1.invoices.update_lines(
        billed.stripe_invoice_id, {"lines": [{"id": line.id, "amount": line.amount + 100}]})
    record_check(compare_invoice(billed.id), "sweep")
    db.session.commit()
    assert value(scrape(client), "portal_invoices_drift_found") == 1
    assert sync_invoice(billed.id).outcome == "synced"  # support's Repair: a sync writes the line back
    assert value(scrape(client), "portal_invoices_drift_found") == 0


def test_webhook_deliveries_and_failed_events_with_their_age(client, db):
    before = scrape(client)
    body = event_body("evt_1", "customer.updated", {"object": "customer", "id": "cus_x"})
    post_event(client, body, sign(body))
    post_event(client, body, sign(body))
    assert post_event(client, body, sign(body, "whsec_wrong")).status_code == 400
    after = scrape(client)
    for outcome in ("stored", "duplicate", "rejected"):
        assert value(after, "portal_stripe_webhook_deliveries_total", outcome=outcome) \
            == value(before, "portal_stripe_webhook_deliveries_total", outcome=outcome) + 1, outcome
    assert value(after, "portal_stripe_events_unprocessed") == 1
    assert value(after, "portal_stripe_events_failed") == 0
    # Its processing failed twice, and it came in 5 minutes ago.
    db.session.execute(update(StripeEvent).values(attempts=2, last_error="boom",
                                                  received_at=utcnow() - timedelta(minutes=5)))
    db.session.commit()
    samples = scrape(client)
    assert value(samples, "portal_stripe_events_failed") == 1
    assert 300 <= value(samples, "portal_stripe_events_failed_oldest_age_seconds") < 400
    db.session.execute(update(StripeEvent).values(processed_at=utcnow()))
    db.session.commit()
    samples = scrape(client)
    assert value(samples, "portal_stripe_events_failed") == 0
    assert value(samples, "portal_stripe_events_unprocessed") == 0


def test_queue_depths_and_failed_jobs(app, client, db):
    redis = redis_connection()
    queue = Queue("webhooks", connection=redis)
    row_id, _ = store_event({"id": "evt_gone", "type": "invoice.paid", "created": 1, "data": {"object": {}}})
    db.session.commit()
    queue.enqueue("jobs.webhooks.process_stripe_event", row_id + 1000)  # no such row: the job fails
    samples = scrape(client)
    assert value(samples, "portal_queue_jobs", queue="webhooks", state="queued") == 1
    assert value(samples, "portal_queue_jobs", queue="sync", state="queued") == 0
    assert value(samples, "portal_queue_oldest_job_age_seconds", queue="webhooks") >= 0
    use_app(app)
    SimpleWorker([queue], connection=redis).work(burst=True)
    samples = scrape(client)
    assert value(samples, "portal_queue_jobs", queue="webhooks", state="queued") == 0
    assert value(samples, "portal_queue_jobs", queue="webhooks", state="failed") == 1
    assert value(samples, "portal_metrics_source_up", source="redis") == 1
    assert value(samples, "portal_metrics_source_up", source="database") == 1


def test_a_source_that_does_not_answer_is_reported_not_a_500(app, client, monkeypatch):
    from redis import Redis

    from tests.services import free_port

    monkeypatch.setitem(app.extensions, "redis", Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2))
    samples = scrape(client)
    assert value(samples, "portal_metrics_source_up", source="redis") == 0
    assert value(samples, "portal_metrics_source_up", source="database") == 1


# --- who may read it ---------------------------------------------------------------


def test_loopback_reads_it_and_an_outside_address_is_refused(app, client):
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", environ_base=OUTSIDE).status_code == 403


def test_the_token_lets_any_address_in_and_a_wrong_one_nobody(app, client, monkeypatch):
    monkeypatch.setitem(app.config, "METRICS_TOKEN", "s3cret-metrics-token")
    refused = client.get("/metrics", environ_base=OUTSIDE)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    good = {"Authorization": "Bearer s3cret-metrics-token"}
    assert client.get("/metrics", environ_base=OUTSIDE, headers=good).status_code == 200
    for header in ("Bearer wrong", "Basic czNjcmV0", "Bearer", "s3cret-metrics-token"):
        assert client.get("/metrics", environ_base=OUTSIDE, headers={"Authorization": header}).status_code == 401
        # A wrong token is refused even from a network that needs none.
        assert client.get("/metrics", headers={"Authorization": header}).status_code == 401


def test_a_request_through_an_undeclared_proxy_does_not_count_as_loopback(client):
    assert client.get("/metrics", headers={"X-Forwarded-For": "198.51.100.7"}).status_code == 403
    assert client.get("/metrics", headers={"Forwarded": "for=198.51.100.7"}).status_code == 403


def test_configured_networks_and_none(app, client, monkeypatch):
    monkeypatch.setitem(app.extensions, "metrics_networks", [])
    assert client.get("/metrics").status_code == 403
    import ipaddress

    monkeypatch.setitem(app.extensions, "metrics_networks", [ipaddress.ip_network("203.0.113.0/24")])
    assert client.get("/metrics", environ_base=OUTSIDE).status_code == 200
    assert client.get("/metrics").status_code == 403


def test_a_bad_network_setting_stops_the_app_at_start():
    from config import TestConfig

    class Config(TestConfig):
        METRICS_ALLOW_NETWORKS = ["10.0.0.0/8", "not-a-network"]

    with pytest.raises(ValueError, match="METRICS_ALLOW_NETWORKS: 'not-a-network'"):
        create_app(Config)


def test_a_signed_in_customer_is_refused_even_with_the_token(app, client, auth, make, monkeypatch):
    monkeypatch.setitem(app.config, "METRICS_TOKEN", "s3cret-metrics-token")
    organization = make.organization()
    make.user("ann@example.com", organization=organization)
    auth.login("ann@example.com")
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"}).status_code == 403
    assert client.get("/metrics", environ_base=OUTSIDE).status_code == 403


# --- several processes ---------------------------------------------------------------


@pytest.fixture
def multiprocess_server(request, tmp_path, monkeypatch):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    monkeypatch.setenv("METRICS_TOKEN", "live-metrics-token")
    return request.getfixturevalue("live_server"), directory


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_processes_add_up_in_multiprocess_mode(multiprocess_server, db):
    """A sync counted in another process (as an RQ worker would) and deliveries
    counted by the gunicorn workers: any worker's scrape shows them all."""
    server, directory = multiprocess_server
    worker = subprocess.run(
        [sys.executable, "-c", "from portal.metrics import record_sync; record_sync('synced', 1.5)"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0, worker.stderr
    deliveries = 24
    for n in range(deliveries):
        request = urllib.request.Request(server.url + "/webhooks/stripe", data=b'{"id": "evt_%d"}' % n,
                                         headers={"Stripe-Signature": "t=1,v1=bad",
                                                  "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400
    assert len(list(directory.glob("counter_*.db"))) >= 2  # the other process's file and the web's
    for _ in range(6):
        status, text = _get(server.url + "/metrics", "live-metrics-token")
        assert status == 200
        samples = parse(text)
        assert value(samples, "portal_stripe_webhook_deliveries_total", outcome="rejected") == deliveries
        assert value(samples, "portal_sync_runs_total", outcome="synced") == 1
        assert value(samples, "portal_sync_duration_seconds_sum", outcome="synced") == 1.5
    assert _get(server.url + "/metrics", "wrong")[0] == 401

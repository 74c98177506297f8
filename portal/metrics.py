"""`GET /metrics`: the portal's health in the Prometheus text format.

Two kinds of figures:

- What happens, counted by the process it happens in (`record_*`, called from the
  sync, the Stripe gateway and the webhook route): sync runs by outcome and their
  duration, requests to Stripe and its 429s, webhook deliveries. With
  PROMETHEUS_MULTIPROC_DIR set (gunicorn, RQ workers: see `config.py`) every process
  counts into files there and a scrape adds them up; without it, in memory.
- What is, read from the database and Redis at each scrape (`PortalStateCollector`),
  so it is right whichever process answers: invoices with changes waiting for Stripe
  and the oldest change's age, stored Stripe events not processed / failed and the
  oldest failure's age, and the depth of every RQ queue and registry. A source that
  does not answer is reported by `portal_metrics_source_up` (0), not as a 500.

Who may read it: see `metrics_refusal`.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from flask_login import current_user
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

bp = Blueprint("metrics", __name__)

# The metrics this process counts (not the global registry: a scrape builds its own).
_counted = CollectorRegistry(auto_describe=True)
SYNC_RUNS = Counter("portal_sync_runs", "Sync runs finished, by outcome.", ["outcome"], registry=_counted)
SYNC_DURATION = Histogram(
    "portal_sync_duration_seconds", "How long sync runs took, by outcome.", ["outcome"], registry=_counted,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STRIPE_REQUESTS = Counter("portal_stripe_requests", "Requests sent to Stripe (each try), reads and writes.",
                          ["kind"], registry=_counted)
STRIPE_RATE_LIMITED = Counter("portal_stripe_rate_limited", "Requests Stripe answered with 429.", ["kind"],
                              registry=_counted)
WEBHOOK_DELIVERIES = Counter(
    "portal_stripe_webhook_deliveries",
    "Deliveries to POST /webhooks/stripe: stored (new), duplicate, rejected (bad signature or body).",
    ["outcome"], registry=_counted)


def record_sync(outcome: str, seconds: float) -> None:
    SYNC_RUNS.labels(outcome).inc()
    SYNC_DURATION.labels(outcome).observe(max(seconds, 0.0))


def record_stripe_request(write: bool) -> None:
    STRIPE_REQUESTS.labels("write" if write else "read").inc()


def record_stripe_rate_limited(write: bool) -> None:
    STRIPE_RATE_LIMITED.labels("write" if write else "read").inc()


def record_webhook(outcome: str) -> None:
    WEBHOOK_DELIVERIES.labels(outcome).inc()


# --- read at scrape time -----------------------------------------------------------


class PortalStateCollector:
    """Gauges read from the database and Redis when scraped (inside the request)."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("portal_metrics_source_up", "Whether the scrape could read the source.",
                               labels=["source"])
        for source, read in (("database", _database_gauges), ("redis", _queue_gauges)):
            try:
                gauges = list(read())
            except Exception as error:  # a source down: say so, serve the rest
                current_app.logger.warning("metrics: could not read %s: %s", source, error)
                if source == "database":
                    from portal.extensions import db

                    db.session.rollback()
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from gauges
        yield up


def _age(oldest, now) -> float:
    return max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0


def _database_gauges() -> Iterator[Metric]:
    from sqlalchemy import func, or_, select

    from portal.billing.sync import SYNCABLE_STATUSES
    from portal.extensions import db
    from portal.models import Invoice, InvoiceItem, StripeEvent, SyncRun
    from portal.models.types import utcnow

    now = utcnow()
    # When the oldest change still waiting was made: per invoice, its oldest item
    # changed since its last good sync started (else that start, else its creation),
    # as the support page's discrepancies count it.
    last_good_start = (
        select(func.max(SyncRun.started_at))
        .where(SyncRun.invoice_id == Invoice.id, SyncRun.outcome.in_(("synced", "unchanged")))
        .correlate(Invoice).scalar_subquery()
    )
    oldest_change = (
        select(func.min(InvoiceItem.updated_at))
        .where(InvoiceItem.invoice_id == Invoice.id,
               or_(last_good_start.is_(None), InvoiceItem.updated_at > last_good_start))
        .correlate(Invoice).scalar_subquery()
    )
    waiting, oldest = db.session.execute(
        select(func.count(), func.min(func.coalesce(oldest_change, last_good_start, Invoice.created_at)))
        .select_from(Invoice)
        .where(Invoice.change_seq > Invoice.synced_seq, Invoice.status.in_(SYNCABLE_STATUSES))
    ).one()
    yield GaugeMetricFamily("portal_invoices_unsynced", "Open or closing invoices with changes not yet at Stripe.",
                            value=waiting)
    yield GaugeMetricFamily("portal_invoices_unsynced_oldest_age_seconds",
                            "Age of the oldest change waiting for Stripe (0: none).", value=_age(oldest, now))

    unprocessed = StripeEvent.processed_at.is_(None)
    pending, failed, oldest_failed = db.session.execute(
        select(func.count(), func.count().filter(StripeEvent.attempts > 0),
               func.min(StripeEvent.received_at).filter(StripeEvent.attempts > 0))
        .where(unprocessed)
    ).one()
    yield GaugeMetricFamily("portal_stripe_events_unprocessed",
                            "Stored Stripe events not processed yet (failing ones included).", value=pending)
    yield GaugeMetricFamily("portal_stripe_events_failed",
                            "Stored Stripe events whose processing failed and is not done yet.", value=failed)
    yield GaugeMetricFamily("portal_stripe_events_failed_oldest_age_seconds",
                            "Age of the oldest stored Stripe event whose processing failed (0: none).",
                            value=_age(oldest_failed, now))
    from portal.billing.drift import drift_found_count

    yield GaugeMetricFamily("portal_invoices_drift_found",
                            "Open or closing invoices whose last comparison with Stripe found a difference "
                            "that no sync has repaired since.", value=drift_found_count())
    db.session.commit()  # end the read: a scrape holds nothing open


def _queue_gauges() -> Iterator[Metric]:
    from rq import Queue
    from rq.job import Job
    from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
    from rq_scheduler import Scheduler

    from portal.queue import QUEUE_NAMES, redis_connection

    redis = redis_connection()
    jobs = GaugeMetricFamily("portal_queue_jobs", "RQ jobs by queue and state.", labels=["queue", "state"])
    oldest = GaugeMetricFamily("portal_queue_oldest_job_age_seconds",
                               "How long the job at the head of each queue has waited (0: empty).", labels=["queue"])
    now = time.time()
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=redis)
        jobs.add_metric([name, "queued"], queue.count)
        for state, registry in (("started", StartedJobRegistry), ("failed", FailedJobRegistry),
                                ("scheduled", ScheduledJobRegistry), ("deferred", DeferredJobRegistry)):
            jobs.add_metric([name, state], registry(name, connection=redis).get_job_count(cleanup=False))
        head = queue.get_job_ids(0, 1)
        job = Job.fetch(head[0], connection=redis) if head else None
        enqueued = job.enqueued_at.timestamp() if job is not None and job.enqueued_at else None
        oldest.add_metric([name], max(now - enqueued, 0.0) if enqueued else 0.0)
    yield jobs
    yield oldest
    yield GaugeMetricFamily("portal_scheduler_jobs", "Jobs waiting in rq-scheduler (periodic and delayed).",
                            value=redis.zcard(Scheduler.scheduled_jobs_key))


# --- the endpoint ------------------------------------------------------------------


def init_metrics(app: Flask) -> None:
    """Check the metrics settings (a bad network is an error at start, not at scrape)."""
    networks = []
    for value in app.config.get("METRICS_ALLOW_NETWORKS") or []:
        if value.strip().lower() == "none":
            continue
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"METRICS_ALLOW_NETWORKS: {value!r} is not a network (e.g. 10.0.0.0/8)") from None
    app.extensions["metrics_networks"] = networks


def _from_allowed_network() -> bool:
    if not current_app.config.get("TRUSTED_PROXY_COUNT") and (
            "X-Forwarded-For" in request.headers or "Forwarded" in request.headers):
        return False  # through a proxy nobody declared: the address is the proxy's, not the client's
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    return any(address in network for network in current_app.extensions.get("metrics_networks", []))


def metrics_refusal() -> tuple[int, dict] | None:
    """Why this request may not read the metrics (status and headers), or None.

    A signed-in customer: 403, whatever else. A bearer token: it must be METRICS_TOKEN
    (401 otherwise). No token: allowed from METRICS_ALLOW_NETWORKS, else 401 when a
    token is configured (the way in) or 403 when none is."""
    if current_user.is_authenticated and not current_user.is_support:
        return 403, {}
    token = current_app.config.get("METRICS_TOKEN")
    challenge = {"WWW-Authenticate": 'Bearer realm="metrics"'}
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if token and scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return None
        return 401, challenge
    if _from_allowed_network():
        return None
    return (401, challenge) if token else (403, {})


class _Counted:
    """This process's own counters, for a scrape without multi-process files."""

    def collect(self) -> Iterator[Metric]:
        return _counted.collect()


@bp.get("/metrics")
def metrics():
    refusal = metrics_refusal()
    if refusal is not None:
        status, headers = refusal
        return Response("forbidden\n" if status == 403 else "unauthorized\n", status, headers,
                        mimetype="text/plain")
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(_Counted())
    registry.register(PortalStateCollector())
    return Response(generate_latest(registry), 200, {"Cache-Control": "no-store"}, content_type=CONTENT_TYPE_LATEST)

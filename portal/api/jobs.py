"""Sync triggers and job status in the JSON API."""
from __future__ import annotations

from flask import jsonify
from rq.exceptions import NoSuchJobError
from rq.job import Job
from sqlalchemy import select

from portal.api.errors import ApiError
from portal.api.routes import bp
from portal.api.serializers import iso
from portal.billing.sync_queue import enqueue_sync
from portal.extensions import db
from portal.models import Invoice, SyncRun
from portal.queue import redis_connection


def _invoice(invoice_id: int) -> Invoice:
    invoice = db.session.get(Invoice, invoice_id)
    if invoice is None:
        raise ApiError(404, "not_found", f"no invoice {invoice_id}")
    return invoice


@bp.post("/invoices/<dbint:invoice_id>/sync")
def sync_invoice(invoice_id: int):
    _invoice(invoice_id)
    db.session.rollback()
    return jsonify({"job_id": enqueue_sync(invoice_id, trigger="manual")}), 202


@bp.get("/jobs/<jobid:job_id>")
def job_status(job_id: str):
    try:
        job = Job.fetch(job_id, connection=redis_connection())
    except NoSuchJobError:
        raise ApiError(404, "not_found", f"no job {job_id}") from None
    body = {"id": job.id, "status": job.get_status(refresh=False)}
    if body["status"] == "finished":
        body["result"] = job.return_value()
    elif body["status"] == "failed":
        result = job.latest_result()
        body["error"] = (result.exc_string or "").strip().splitlines()[-1] if result and result.exc_string else "failed"
    return jsonify(body)


@bp.get("/invoices/<dbint:invoice_id>/sync-runs")
def sync_runs(invoice_id: int):
    _invoice(invoice_id)
    runs = db.session.scalars(
        select(SyncRun).where(SyncRun.invoice_id == invoice_id).order_by(SyncRun.started_at.desc(), SyncRun.id.desc())
        .limit(100)
    )
    return jsonify({"sync_runs": [
        {"id": run.id, "trigger": run.trigger, "outcome": run.outcome, "started_at": iso(run.started_at),
         "finished_at": iso(run.finished_at), "duration_seconds": run.duration_seconds, "created": run.created,
         "updated": run.updated, "deleted": run.deleted, "unchanged": run.unchanged,
         "stripe_reads": run.stripe_reads, "stripe_writes": run.stripe_writes, "stripe_calls": run.stripe_calls,
         "error": run.error, "job_id": run.job_id}
        for run in runs
    ]})

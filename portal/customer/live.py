"""The billing page's live parts: the open invoice's partial, refreshed in place, and
"Sync now" with its progress. Each is a small template returned alone to an htmx
request and included in the full page otherwise, so the page works without
JavaScript (a POST without htmx is answered with a redirect to the page)."""
from __future__ import annotations

import logging
import re

from flask import abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import login_required
from limits import parse
from rq.exceptions import NoSuchJobError
from rq.job import Job
from sqlalchemy import select

from portal.billing.sync_queue import SYNC_JOB, enqueue_sync
from portal.converters import JobIdConverter
from portal.customer.current import current_invoice, invoice_version
from portal.customer.overview import last_finished_sync, open_invoice_with_items
from portal.customer.routes import _organization_or_404, _role_in, bp
from portal.extensions import db
from portal.models import Invoice, Organization
from portal.queue import redis_connection
from portal.security import limiter

log = logging.getLogger(__name__)
# What a customer's "Sync now" may ask per organization (a limits rule).
DEFAULT_SYNC_NOW_LIMIT = "3 per minute"
# Progress words a customer reads, per state of the sync job.
SYNC_PROGRESS = {
    "queued": "Waiting for a free worker…",
    "running": "Sending the latest figures to Stripe…",
    "done": "Stripe has the latest figures.",
    "failed": "Stripe could not be updated; we are retrying and support has been told.",
}


def _htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


@bp.get("/orgs/<slug:slug>/billing/current")
@login_required
def current_invoice_partial(slug: str):
    """The open invoice's partial for the live refresh; 204 (nothing to swap) when
    nothing it shows has changed since the version the page holds (`seen`)."""
    organization = _organization_or_404(slug)
    if not _htmx():
        return redirect(url_for("customer.organization_billing", slug=organization.slug))
    invoice = open_invoice_with_items(organization)
    last_sync = last_finished_sync(invoice.id) if invoice else None
    if invoice is not None and request.args.get("seen") == invoice_version(invoice, last_sync):
        return "", 204
    view = current_invoice(invoice, last_sync) if invoice else None
    return render_template("customer/_current_invoice.html", organization=organization, view=view,
                           role=_role_in(organization), live=True)


def _sync_allowed(organization: Organization) -> bool:
    """Count one "Sync now" against the organization's limit; False past it. When the
    limiter's storage is unreachable the request is allowed (a sync is harmless)."""
    rule = parse(current_app.config.get("SYNC_NOW_LIMIT", DEFAULT_SYNC_NOW_LIMIT))
    try:
        return limiter.limiter.hit(rule, "sync-now", str(organization.id))
    except Exception:  # the storage is down: allow, as the limiter does for its own limits
        log.warning("sync-now limit not counted: the limiter's storage is unreachable", exc_info=True)
        return True


@bp.post("/orgs/<slug:slug>/billing/sync")
@login_required
def sync_now(slug: str):
    """Queue a sync of the open invoice (or join the one already waiting) and show its
    progress in place; without htmx, flash and go back to the page."""
    organization = _organization_or_404(slug)
    invoice = db.session.scalar(
        select(Invoice).where(Invoice.organization_id == organization.id, Invoice.status == "open"))
    if invoice is None:
        abort(404)
    if not _sync_allowed(organization):
        message = "Sync was asked for several times in the last minute; the figures are on their way. " \
                  "Try again in a minute."
        if _htmx():
            return render_template("customer/_sync_progress.html", slug=organization.slug, state="limited",
                                   message=message), 429
        flash(message, "error")
        return redirect(url_for("customer.organization_billing", slug=organization.slug), code=303)
    invoice_id, slug = invoice.id, organization.slug
    db.session.rollback()  # no transaction held while we talk to Redis
    job_id = enqueue_sync(invoice_id, trigger="manual")
    if _htmx():
        return _progress(slug, invoice_id, job_id)
    flash("Sync with Stripe requested: the figures will be there in a few seconds.", "success")
    return redirect(url_for("customer.organization_billing", slug=slug, sync=job_id), code=303)


def sync_state(job: Job) -> str:
    """queued, running, done or failed: an RQ sync job's progress as the page shows it.
    A job that finished but did not bring Stripe up to date is failed, except when it
    only found another sync at work (that sync carries the figures)."""
    status = job.get_status(refresh=False)
    if status in ("queued", "deferred", "scheduled"):
        return "queued"
    if status == "started":
        return "running"
    if status == "finished":
        outcome = (job.return_value() or {}).get("outcome")
        return "done" if outcome in ("synced", "unchanged", "locked") else "failed"
    return "failed"


def _sync_job_of(invoice_id: int, job_id: str) -> Job | None:
    """The sync job `job_id` if it syncs this invoice (anything else is not found)."""
    try:
        job = Job.fetch(job_id, connection=redis_connection())
    except NoSuchJobError:
        return None
    if job.func_name != SYNC_JOB or not job.args or job.args[0] != invoice_id:
        return None
    return job


def _progress(slug: str, invoice_id: int, job_id: str):
    job = _sync_job_of(invoice_id, job_id)
    if job is None:
        abort(404)
    state = sync_state(job)
    response = current_app.make_response(render_template(
        "customer/_sync_progress.html", slug=slug, state=state, message=SYNC_PROGRESS[state],
        job_id=job_id, poll=state in ("queued", "running")))
    if state in ("done", "failed"):
        response.headers["HX-Trigger"] = "invoice-changed"  # the open invoice refreshes now
    return response


@bp.get("/orgs/<slug:slug>/billing/sync/<jobid:job_id>")
@login_required
def sync_progress(slug: str, job_id: str):
    """The progress of a "Sync now" of this organization's open invoice."""
    organization = _organization_or_404(slug)
    invoice_id = db.session.scalar(
        select(Invoice.id).where(Invoice.organization_id == organization.id, Invoice.status == "open"))
    if invoice_id is None:
        abort(404)
    slug = organization.slug
    db.session.rollback()
    return _progress(slug, invoice_id, job_id)


def progress_on_page(organization: Organization, invoice: Invoice | None, job_id: str | None) -> dict | None:
    """The progress shown on the full page after a "Sync now" without JavaScript."""
    if not job_id or invoice is None or not re.fullmatch(JobIdConverter.regex, job_id):
        return None
    job = _sync_job_of(invoice.id, job_id)
    if job is None:
        return None
    state = sync_state(job)
    return {"state": state, "message": SYNC_PROGRESS[state], "job_id": job_id,
            "poll": state in ("queued", "running")}

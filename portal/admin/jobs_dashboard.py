"""RQ's own dashboard (`rq-dashboard`) at /admin/jobs, for support staff only: the
queues, every registry (failed jobs with their traceback, requeue, delete), workers.

How it is held to the portal's rules:

- Sign-in: every request to it passes the support check of the other admin pages
  (not signed in: to the sign-in page; signed in without support: 403), in the same
  session.
- CSRF: its buttons POST with jQuery and no token of their own; its script sends the
  `_csrf_token` cookie back as `X-CSRFToken` when the cookie exists. We set that
  cookie (Flask-WTF's token for this session, path /admin/jobs, SameSite=Strict) on
  its pages and leave CSRFProtect on for it: a POST without the session's token is
  refused like any other form. Its one state change reachable by GET (requeue all)
  answers 405 to a GET.
- CSP: its pages carry an inline script and build rows with Underscore templates
  (`new Function`). Our copy of its `base.html` loads the script from
  `/admin/jobs/_portal/dashboard.js` instead (rendered from its own templates), and
  the CSP of /admin/jobs adds only `'unsafe-eval'` to `script-src`; inline scripts
  and styles stay forbidden (`static/jobs-dashboard.css` replaces its inline styles).
- Redis: the portal's REDIS_URL.
- Actions: requeue (one job, or a queue's failed jobs) and compact, each written to
  the audit log; delete and empty are off (RQ_DASHBOARD_DISABLE_DELETE).
"""
from __future__ import annotations

import re

from flask import Blueprint, Flask, Response, abort, render_template, request, url_for
from flask_login import current_user
from flask_wtf.csrf import generate_csrf

from portal.converters import JobIdConverter
from portal.security import CONTENT_SECURITY_POLICY

URL_PREFIX = "/admin/jobs"
CSRF_COOKIE = "_csrf_token"  # the name rq-dashboard's script reads
DASHBOARD_POLICY = CONTENT_SECURITY_POLICY.replace("script-src 'self'", "script-src 'self' 'unsafe-eval'")
SCRIPT_VIEWS = ("queues", "jobs", "job", "workers")
REGISTRIES = ("queued", "failed", "deferred", "started", "finished", "scheduled", "canceled")
_JOB_ID = re.compile(rf"^{JobIdConverter.regex}$")  # the ids RQ accepts, as the portal's routes take them

scripts = Blueprint("jobs_dashboard", __name__)


def register_jobs_dashboard(app: Flask) -> None:
    """Mount rq-dashboard's blueprint under /admin/jobs with the checks above."""
    from rq_dashboard import blueprint as dashboard
    from rq_dashboard.web import setup_rq_connection

    app.config.setdefault("RQ_DASHBOARD_REDIS_URL", app.config["REDIS_URL"])
    app.config.setdefault("RQ_DASHBOARD_POLL_INTERVAL", 5000)
    setup_rq_connection(app)
    app.register_blueprint(dashboard, url_prefix=URL_PREFIX)
    app.register_blueprint(scripts, url_prefix=URL_PREFIX + "/_portal")
    # Its delete and empty buttons destroy what a sweep may need to see; requeue stays.
    app.config.setdefault("RQ_DASHBOARD_DISABLE_DELETE", True)
    app.before_request(_support_only)
    app.after_request(_audit_action)
    app.after_request(_dashboard_headers)


def _ours() -> bool:
    return request.blueprint in ("rq_dashboard", "jobs_dashboard")


def _support_only():
    """The admin pages' check, before rq-dashboard's own before_request runs."""
    if not _ours():
        return None
    from portal.extensions import login_manager

    if not current_user.is_authenticated:
        return login_manager.unauthorized()
    if not current_user.is_support:
        abort(403)
    if request.endpoint == "rq_dashboard.requeue_all" and request.method != "POST":
        abort(405)  # a state change; its button POSTs
    _check_parameters(request.view_args or {})
    return None


def _check_parameters(values: dict) -> None:
    """404 for what rq-dashboard would answer with a 500: another Redis instance, a job
    id RQ refuses or that does not exist, an unknown registry, a page that is no number
    (its routes take them as plain strings)."""
    from rq.job import Job

    from portal.queue import redis_connection

    if values.get("instance_number", 0) != 0:
        abort(404)
    if "registry_name" in values and values["registry_name"] not in REGISTRIES:
        abort(404)
    for name in ("per_page", "page"):
        if name in values and not (str(values[name]).isdigit() and 0 < int(values[name]) <= 10_000):
            abort(404)
    job_id = values.get("job_id")
    if job_id is not None and not (_JOB_ID.match(job_id) and Job.exists(job_id, connection=redis_connection())):
        abort(404)


def _audit_action(response: Response) -> Response:
    """Every action taken in the dashboard (requeue, requeue all, compact, and delete
    or empty where enabled) is an audit entry: who, what, which job or queue."""
    if request.blueprint != "rq_dashboard" or request.method != "POST" or response.status_code != 200:
        return response
    answer = response.get_json(silent=True) or {}
    if answer.get("status") != "OK":
        return response  # refused (DISABLED) or nothing done
    from portal.extensions import db
    from portal.models import AuditEntry

    values = request.view_args or {}
    action = request.endpoint.removeprefix("rq_dashboard.").removesuffix("_view")
    if "job_id" in values:
        object_type, object_id, details = "job", values["job_id"], {}
    else:
        object_type, object_id = "queue", values.get("queue_name", "")
        details = {"registry": values.get("registry_name"), "count": answer.get("count")}
    db.session.add(AuditEntry(actor_user_id=current_user.id, actor=current_user.email, action=f"jobs.{action}",
                              object_type=object_type, object_id=str(object_id), details=details))
    db.session.commit()
    return response


def _dashboard_headers(response: Response) -> Response:
    if not _ours() or not current_user.is_authenticated or not current_user.is_support:
        return response
    response.headers["Content-Security-Policy"] = DASHBOARD_POLICY
    response.headers["Cache-Control"] = "no-store"
    if request.blueprint == "rq_dashboard" and request.method == "GET" and response.mimetype == "text/html":
        from flask import current_app

        response.set_cookie(CSRF_COOKIE, generate_csrf(), path=URL_PREFIX, samesite="Strict", httponly=False,
                            secure=current_app.config.get("SESSION_COOKIE_SECURE", True))
    return response


@scripts.get("/dashboard.js")
def script():
    """The script rq-dashboard inlines in each page, rendered from its own templates
    for the page named by the query (every value checked: it lands in JavaScript)."""
    from rq import Queue
    from rq.job import Job

    from portal.queue import redis_connection

    args = request.args
    view = args.get("view", "")
    instance = args.get("instance", "0")
    if view not in SCRIPT_VIEWS or instance != "0":
        abort(404)
    context = {
        "poll_interval": _poll_interval(),
        "rq_url_prefix": url_for("rq_dashboard.queues_overview"),
        "current_instance": 0,
    }
    if view == "jobs":
        names = {queue.name for queue in Queue.all(connection=redis_connection())} | {"default"}
        queue_name = args.get("queue", "default")
        registry, order = args.get("registry", "queued"), args.get("order", "asc")
        per_page, page = args.get("per_page", "8"), args.get("page", "1")
        if (queue_name not in names or registry not in REGISTRIES or order not in ("asc", "dsc")
                or not per_page.isdigit() or not page.isdigit() or len(per_page + page) > 12):
            abort(404)
        context.update(queue=Queue(queue_name, connection=redis_connection()), registry_name=registry,
                       per_page=int(per_page), order=order, page=int(page))
    elif view == "job":
        job_id = args.get("job", "")
        if not _JOB_ID.match(job_id) or not Job.exists(job_id, connection=redis_connection()):
            abort(404)
        context["id"] = job_id
    body = render_template("rq_dashboard/inline_js.html", **context) + "\n" + render_template(
        f"rq_dashboard/scripts/{view}.js", **context)
    return Response(body, 200, {"Cache-Control": "no-store"}, mimetype="text/javascript")


def _poll_interval() -> int:
    from flask import current_app

    return int(current_app.config.get("RQ_DASHBOARD_POLL_INTERVAL", 5000))

"""rq-dashboard at /admin/jobs: support staff only, the portal's session and CSRF
rules, the portal's Redis, and a CSP that still refuses inline scripts."""
from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry
from sqlalchemy import func, select

from jobs.app import use_app
from portal.models import AuditEntry
from portal.queue import redis_connection

PAGES = ("/admin/jobs/", "/admin/jobs/0/view/jobs", "/admin/jobs/0/view/workers", "/admin/jobs/0/data/queues.json",
         "/admin/jobs/0/data/jobs/webhooks/failed/8/asc/1.json", "/admin/jobs/_portal/dashboard.js?view=queues")


@pytest.fixture
def people(make):
    organization = make.organization(slug="acme")
    make.user("ann@example.com", organization=organization, role="owner")
    make.user("staff@example.com", support=True)


@pytest.fixture
def failed_job(app, db) -> str:
    """A job that failed (it processes a stored Stripe event that does not exist)."""
    queue = Queue("webhooks", connection=redis_connection())
    job = queue.enqueue("jobs.webhooks.process_stripe_event", 424242, job_id="failed-on-purpose")
    use_app(app)
    SimpleWorker([queue], connection=redis_connection()).work(burst=True)
    assert FailedJobRegistry("webhooks", connection=redis_connection()).get_job_ids() == [job.id]
    return job.id


def _failed_ids() -> list[str]:
    return FailedJobRegistry("webhooks", connection=redis_connection()).get_job_ids()


def test_signed_out_goes_to_sign_in_and_a_customer_is_refused(client, auth, people, failed_job):
    for page in PAGES:
        response = client.get(page)
        assert response.status_code == 302 and "/login" in response.headers["Location"], page
    assert client.post(f"/admin/jobs/job/{failed_job}/requeue").status_code == 302
    auth.login("ann@example.com")
    for page in PAGES:
        assert client.get(page).status_code == 403, page
    for action in (f"/admin/jobs/job/{failed_job}/requeue", f"/admin/jobs/job/{failed_job}/delete",
                   "/admin/jobs/requeue/webhooks", "/admin/jobs/queue/webhooks/failed/empty"):
        assert client.post(action).status_code == 403, action
    assert _failed_ids() == [failed_job]


def test_support_sees_the_queues_and_the_failed_job_with_its_traceback(client, auth, people, failed_job):
    auth.login("staff@example.com")
    for page in PAGES:
        assert client.get(page).status_code == 200, page
    queues = {q["name"]: q for q in client.get("/admin/jobs/0/data/queues.json").get_json()["queues"]}
    assert queues["webhooks"]["failed_job_registry_count"] == 1
    job = client.get(f"/admin/jobs/0/data/job/{failed_job}.json").get_json()
    assert job["status"] == "failed" and "no stored Stripe event 424242" in job["exc_info"]


def test_its_pages_refuse_inline_scripts_and_carry_the_csrf_cookie(client, auth, people):
    auth.login("staff@example.com")
    page = client.get("/admin/jobs/0/view/jobs")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self' 'unsafe-eval'" in policy and "unsafe-inline" not in policy
    assert "style-src 'self';" in policy
    html = page.get_data(as_text=True)
    assert "<script>" not in html and '<script type="text/javascript">' not in html
    assert 'src="/admin/jobs/_portal/dashboard.js?view=jobs' in html
    cookie = client.get_cookie("_csrf_token", path="/admin/jobs")
    assert cookie is not None and cookie.same_site == "Strict"
    # The rest of the portal keeps its own policy.
    assert "unsafe-eval" not in client.get("/admin/").headers["Content-Security-Policy"]


def test_a_post_without_the_sessions_csrf_token_is_refused(app, db, client, auth, people, failed_job, monkeypatch):
    auth.login("staff@example.com")  # signed in while CSRF is off (the test config), then turn it on
    monkeypatch.setitem(app.config, "WTF_CSRF_ENABLED", True)
    client.get("/admin/jobs/0/view/jobs/webhooks/failed/8/asc/1")
    token = client.get_cookie("_csrf_token", path="/admin/jobs").value
    url = f"/admin/jobs/job/{failed_job}/requeue"
    assert client.post(url).status_code == 400
    assert client.post(url, headers={"X-CSRFToken": "forged"}).status_code == 400
    assert _failed_ids() == [failed_job]
    response = client.post(url, headers={"X-CSRFToken": token})
    assert response.status_code == 200 and response.get_json() == {"status": "OK"}
    assert _failed_ids() == []
    assert Queue("webhooks", connection=redis_connection()).job_ids == [failed_job]
    entry = db.session.scalar(select(AuditEntry).where(AuditEntry.action.startswith("jobs.")))
    assert (entry.actor, entry.action, entry.object_type, entry.object_id) == (
        "staff@example.com", "jobs.requeue_job", "job", failed_job)


def test_requeue_all_by_get_changes_nothing(client, auth, db, people, failed_job):
    auth.login("staff@example.com")
    assert client.get("/admin/jobs/requeue/webhooks").status_code == 405
    assert _failed_ids() == [failed_job]
    assert client.post("/admin/jobs/requeue/webhooks").get_json() == {"status": "OK", "count": 1}
    assert _failed_ids() == []
    entry = db.session.scalar(select(AuditEntry).where(AuditEntry.action.startswith("jobs.")))
    assert (entry.action, entry.object_id, entry.details["count"]) == ("jobs.requeue_all", "webhooks", 1)


def test_delete_and_empty_are_off_and_audit_nothing(client, auth, db, people, failed_job):
    auth.login("staff@example.com")
    assert client.post(f"/admin/jobs/job/{failed_job}/delete").get_json() == {"status": "DISABLED"}
    assert client.post("/admin/jobs/queue/webhooks/failed/empty").get_json() == {"status": "DISABLED"}
    assert _failed_ids() == [failed_job]
    dashboard_entries = select(func.count()).select_from(AuditEntry).where(AuditEntry.action.startswith("jobs."))
    assert db.session.scalar(dashboard_entries) == 0


def test_the_script_renders_only_for_real_queues_and_jobs(client, auth, people, failed_job):
    auth.login("staff@example.com")
    script = client.get(f"/admin/jobs/_portal/dashboard.js?view=job&job={failed_job}")
    assert script.status_code == 200 and script.mimetype == "text/javascript"
    assert f'var job_id = "{failed_job}"' in script.get_data(as_text=True)
    for query in ("view=job&job=nope", "view=job&job=x';alert(1)//", "view=jobs&queue=x'%3Balert(1)",
                  "view=jobs&queue=webhooks&registry=bogus", "view=jobs&queue=webhooks&page=-1",
                  "view=other", "view=queues&instance=1"):
        assert client.get(f"/admin/jobs/_portal/dashboard.js?{query}").status_code == 404, query


def test_it_reads_the_portals_redis(app):
    def where(connection) -> tuple:
        kwargs = connection.connection_pool.connection_kwargs
        return kwargs["host"], kwargs["port"], kwargs.get("db", 0)

    assert where(app.redis_conn) == where(redis_connection())


def test_what_would_be_a_500_in_rq_dashboard_is_a_404(client, auth, people, failed_job):
    auth.login("staff@example.com")
    for url in ("/admin/jobs/0/view/job/no-such-job", "/admin/jobs/0/data/job/no-such-job.json",
                "/admin/jobs/0/view/job/bad%20id!", "/admin/jobs/1/view/queues", "/admin/jobs/1/data/queues.json",
                "/admin/jobs/0/data/jobs/webhooks/bogus/8/asc/1.json",
                "/admin/jobs/0/data/jobs/webhooks/failed/x/asc/1.json",
                "/admin/jobs/0/data/jobs/webhooks/failed/8/asc/0.json"):
        assert client.get(url).status_code == 404, url
    for url in ("/admin/jobs/job/no-such-job/requeue", "/admin/jobs/job/x%3Ay/delete"):
        assert client.post(url).status_code == 404, url
    assert _failed_ids() == [failed_job]

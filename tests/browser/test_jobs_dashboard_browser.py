"""Support requeues a failed job in rq-dashboard (/admin/jobs) in Debian's Chromium,
under the portal's CSP and CSRF rules; a customer is refused the dashboard and
/metrics. Screenshots: the pytest tmp dir of the test (`jobs-*.png`)."""
from __future__ import annotations

from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry

from jobs.app import use_app
from portal.queue import redis_connection
from tests.browser.test_billing_page_browser import chromium_page


def _sign_in(page, url: str, email: str, password: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def test_support_requeues_a_failed_job_and_a_customer_is_refused(app, db, make, live_server, tmp_path):
    organization = make.organization(slug="acme")
    make.user("ann@example.com", "browser-pass-1", organization=organization)
    make.user("sam@example.com", "browser-pass-2", support=True)
    redis = redis_connection()
    queue = Queue("webhooks", connection=redis)
    job = queue.enqueue("jobs.webhooks.process_stripe_event", 424242, job_id="failed-on-purpose")
    use_app(app)
    SimpleWorker([queue], connection=redis).work(burst=True)
    db.session.commit()
    assert FailedJobRegistry("webhooks", connection=redis).get_job_ids() == [job.id]

    with chromium_page() as page:
        problems = []
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("console", lambda message: problems.append(message.text)
                if message.type == "error" and "inline style" not in message.text
                and "Failed to load resource" not in message.text else None)
        page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
                if response.status >= 400 else None)
        _sign_in(page, live_server.url, "sam@example.com", "browser-pass-2")
        page.goto(f"{live_server.url}/admin/jobs/")
        row = page.locator("table#queues tbody tr", has_text="webhooks")
        row.wait_for()
        page.screenshot(path=str(tmp_path / "jobs-queues.png"), full_page=True)
        assert row.locator("td").nth(6).inner_text().strip() == "1"  # the failed column

        page.goto(f"{live_server.url}/admin/jobs/0/view/jobs/webhooks/failed/8/asc/1")
        job_row = page.locator("table#jobs tbody tr", has_text=job.id)
        job_row.wait_for()
        assert "no stored Stripe event 424242" in job_row.inner_text()
        page.screenshot(path=str(tmp_path / "jobs-failed.png"), full_page=True)
        with page.expect_response(lambda r: r.url.endswith(f"/job/{job.id}/requeue")) as answer:
            job_row.locator("[data-role=requeue-job-btn]").click()
        assert answer.value.status == 200 and answer.value.json() == {"status": "OK"}
        job_row.wait_for(state="detached")
        page.screenshot(path=str(tmp_path / "jobs-requeued.png"), full_page=True)
        assert problems == []
        assert FailedJobRegistry("webhooks", connection=redis).get_job_ids() == []
        assert queue.job_ids == [job.id]

        customer = page.context.browser.new_context().new_page()
        _sign_in(customer, live_server.url, "ann@example.com", "browser-pass-1")
        for path in ("/admin/jobs/", "/admin/jobs/0/view/jobs", "/admin/jobs/0/data/queues.json", "/metrics"):
            assert customer.goto(live_server.url + path).status == 403, path
        customer.screenshot(path=str(tmp_path / "jobs-customer-refused.png"))

"""Spend alerts: thresholds on the total and on the projection, a banner, and one mail
per threshold and cycle (an outbox drained by a job, through a real SMTP server)."""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from portal.billing.alerts import add_alert, evaluate_alerts
from portal.billing.credits import add_credit
from portal.billing.pricing import add_quantity
from portal.models import AlertCrossing, OutboxMail, SpendAlert
from portal.models.types import utcnow
from tests.services import free_port


class Inbox:
    """What a real SMTP server (aiosmtpd) on a free local port received."""

    def __init__(self):
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        from email import message_from_bytes
        from email.policy import default

        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content, policy=default)))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server(app):
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    saved = {key: app.config.get(key) for key in ("SMTP_HOST", "SMTP_PORT", "SMTP_FROM")}
    app.config.update(SMTP_HOST="127.0.0.1", SMTP_PORT=controller.port, SMTP_FROM="billing@portal.test")
    yield inbox
    app.config.update(saved)
    controller.stop()


@pytest.fixture
def initech(db, make):
    organization = make.organization(slug="initech", name="Initech", billing_email="ap@initech.test")
    cpu = make.product("machines.cpu", unit_price="1", name="CPU", unit="second")  # a cent a second
    invoice = make.open_invoice(organization)
    make.user("owner@example.com", organization=organization, role="owner")
    make.user("member@example.com", organization=organization, role="member")
    return organization, invoice, cpu


def run_jobs(app, db, queue="default"):
    """Run what is queued, in this app, with a real RQ worker (burst)."""
    from rq import Queue, SimpleWorker

    from jobs.app import use_app
    from portal.queue import redis_connection

    use_app(app)
    db.session.commit()
    SimpleWorker([Queue(queue, connection=redis_connection())], connection=redis_connection()).work(burst=True)


def spend(db, invoice, cpu, cents: int):
    add_quantity(invoice, cpu, "web-1", Decimal(cents))
    db.session.commit()


def count(db, model) -> int:
    db.session.expire_all()
    return db.session.scalar(select(func.count()).select_from(model))


def test_owner_sets_an_alert_and_a_crossing_bannered_and_mailed_once(app, client, auth, db, initech, smtp_server):
    organization, invoice, cpu = initech
    auth.login("owner@example.com")
    response = client.post("/orgs/initech/alerts", data={"kind": "total", "amount": "100.00"})
    assert response.status_code == 303 and response.headers["Location"].endswith("#alerts")
    page = client.get("/orgs/initech/billing").get_data(as_text=True)
    assert "when the total so far passes $100.00" in page and "alert-banner" not in page

    invoice_id = invoice.id
    spend(db, invoice, cpu, 9_999)
    from jobs.sync import sync_invoice

    def sync():
        db.session.commit()  # the job runs in its own session: this one holds no transaction
        sync_invoice(invoice_id)

    run_jobs(app, db)
    sync()  # no Stripe here: the sync fails, the alerts are evaluated all the same
    assert count(db, AlertCrossing) == 0

    spend(db, invoice, cpu, 2)  # $100.01
    sync()
    sync()  # evaluated again: the same crossing
    run_jobs(app, db)
    run_jobs(app, db)
    assert count(db, AlertCrossing) == 1
    assert len(smtp_server.messages) == 1
    recipients, message = smtp_server.messages[0]
    assert recipients == ["ap@initech.test"]
    assert message["Subject"] == "Initech: this period's spend passed $100.00"
    assert message["From"] == "billing@portal.test"
    assert "reached $100.01" in message.get_content()
    assert db.session.scalar(select(OutboxMail.sent_at)) is not None

    page = client.get("/orgs/initech/billing").get_data(as_text=True)
    banner = page.split('class="notice warning alert-banner"')[1].split("</p>")[0]
    assert "spend reached $100.01, past your alert at $100.00." in banner


def test_dipping_below_and_rising_again_is_the_same_crossing(app, db, initech, smtp_server):
    organization, invoice, cpu = initech
    add_alert(organization, "total", 5_000)
    spend(db, invoice, cpu, 6_000)
    assert len(evaluate_alerts(invoice.id)) == 1
    db.session.commit()
    add_credit(organization, "20.00", "goodwill")  # back to $40
    db.session.commit()
    assert evaluate_alerts(invoice.id) == []
    spend(db, invoice, cpu, 3_000)  # $70 again
    assert evaluate_alerts(invoice.id) == []
    db.session.commit()
    assert count(db, OutboxMail) == 1


def test_a_projection_alert_fires_on_the_run_rate(app, db, make, smtp_server):
    from portal.billing.invoices import ensure_open_invoice
    from portal.billing.usage import ingest_usage

    organization = make.organization(slug="acme", name="Acme", created_at=utcnow() - timedelta(days=60))
    make.product("egress.gb", unit_price="100")
    now = utcnow()
    invoice = ensure_open_invoice(organization, period=(now - timedelta(days=10), now + timedelta(days=20)))
    # $100 in the last seven days: a pace of about $386 by the period's end.
    add_alert(organization, "projection", 20_000)
    add_alert(organization, "total", 20_000)
    db.session.commit()
    ingest_usage("test", [{"id": "e-1", "organization": "acme", "product": "egress.gb", "quantity": "100",
                           "occurred_at": (now - timedelta(days=2)).isoformat()}])
    db.session.commit()
    crossings = evaluate_alerts(invoice.id)
    db.session.commit()
    assert [crossing.alert.kind for crossing in crossings] == ["projection"]
    assert 38_000 <= crossings[0].amount_cents <= 39_000
    mail = db.session.scalar(select(OutboxMail))
    assert mail.subject == "Acme: this period is projected to pass $200.00"
    assert "projected to reach $38" in mail.body


def test_without_smtp_mails_stay_queued_and_go_when_it_is_configured(app, db, initech):
    organization, invoice, cpu = initech
    add_alert(organization, "total", 100)
    spend(db, invoice, cpu, 100)
    from portal.billing.alerts import evaluate_and_queue
    from portal.mail import deliver_outbox

    assert evaluate_and_queue(invoice.id) == 1
    report = deliver_outbox()
    assert (report.configured, report.sent, report.queued) == (False, 0, 1)
    assert db.session.scalar(select(OutboxMail.sent_at)) is None

    from aiosmtpd.controller import Controller

    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        app.config.update(SMTP_HOST="127.0.0.1", SMTP_PORT=controller.port, SMTP_FROM="billing@portal.test")
        assert deliver_outbox().sent == 1
        assert deliver_outbox().sent == 0
    finally:
        app.config.update(SMTP_HOST=None)
        controller.stop()
    assert len(inbox.messages) == 1


def test_an_smtp_server_that_refuses_leaves_the_mail_for_the_next_run(app, db, initech):
    organization, invoice, cpu = initech
    add_alert(organization, "total", 100)
    spend(db, invoice, cpu, 100)
    evaluate_alerts(invoice.id)
    db.session.commit()
    from portal.mail import deliver_outbox

    app.config.update(SMTP_HOST="127.0.0.1", SMTP_PORT=free_port())  # nobody listens there
    try:
        report = deliver_outbox()
    finally:
        app.config.update(SMTP_HOST=None)
    assert (report.sent, report.failed) == (0, 1)
    db.session.expire_all()
    mail = db.session.scalar(select(OutboxMail))
    assert mail.sent_at is None and mail.attempts == 1 and "Connection" in mail.last_error


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"),
                    reason="a race between PostgreSQL transactions: SQLite lets one writer at a time")
def test_two_workers_evaluating_at_once_record_and_mail_one_crossing(app, db, initech):
    """The race on the real database: threads released together by a barrier, each in
    its own session and transaction."""
    organization, invoice, cpu = initech
    for threshold in (1_000, 2_000, 3_000):
        add_alert(organization, "total", threshold)
    spend(db, invoice, cpu, 5_000)
    invoice_id = invoice.id  # read here: the threads must not touch this session's objects
    workers = 6
    barrier = threading.Barrier(workers)
    results, errors = [], []

    def evaluate():
        from portal.database import retry_on_deadlock
        from portal.extensions import db as database

        with app.app_context():
            try:
                barrier.wait(timeout=10)

                def once():
                    recorded = evaluate_alerts(invoice_id)
                    time.sleep(0.05)  # hold the transaction open while the others insert
                    database.session.commit()
                    return len(recorded)

                results.append(retry_on_deadlock(once))
            except Exception as error:  # reported below
                errors.append(error)
            finally:
                database.session.remove()

    threads = [threading.Thread(target=evaluate) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert sum(results) == 3
    assert count(db, AlertCrossing) == 3
    assert count(db, OutboxMail) == 3


def test_only_an_owner_sets_or_removes_alerts(client, auth, db, make, initech):
    organization, _, _ = initech
    alert = add_alert(organization, "total", 5_000)
    db.session.commit()
    make.user("staff@example.com", support=True)
    for who in ("member@example.com", "staff@example.com"):
        auth.login(who)
        assert client.post("/orgs/initech/alerts", data={"kind": "total", "amount": "10"}).status_code == 403
        assert client.post(f"/orgs/initech/alerts/{alert.id}/delete").status_code == 403
        auth.logout()
    assert count(db, SpendAlert) == 1
    auth.login("member@example.com")
    page = client.get("/orgs/initech/billing").get_data(as_text=True)
    assert "$50.00" in page.split('id="alerts"')[1] and "Add alert" not in page

    auth.logout()
    auth.login("owner@example.com")
    assert client.post(f"/orgs/initech/alerts/{alert.id}/delete").status_code == 303
    assert count(db, SpendAlert) == 0
    assert client.post(f"/orgs/initech/alerts/{alert.id}/delete").status_code == 404


@pytest.mark.parametrize("form, message", [
    ({"kind": "total", "amount": "abc"}, "The amount must be plain digits"),
    ({"kind": "total", "amount": "-5"}, "The amount must be plain digits"),
    ({"kind": "total", "amount": "0"}, "The amount must be greater than zero."),
    ({"kind": "total", "amount": "1.005"}, "more than two decimal places"),
    ({"kind": "total", "amount": "1e3"}, "The amount must be plain digits"),
    ({"kind": "total", "amount": ""}, "Enter an amount in dollars"),
    ({"kind": "total", "amount": "99999999999"}, "The amount is larger than"),
    ({"kind": "bogus", "amount": "10"}, "Choose whether the alert watches"),
])
def test_bad_alert_input_is_refused_plainly_and_changes_nothing(client, auth, db, initech, form, message):
    auth.login("owner@example.com")
    page = client.post("/orgs/initech/alerts", data=form, follow_redirects=True).get_data(as_text=True)
    assert message in page
    assert count(db, SpendAlert) == 0


def test_the_same_threshold_twice_is_refused(client, auth, db, initech):
    auth.login("owner@example.com")
    client.post("/orgs/initech/alerts", data={"kind": "total", "amount": "10"})
    page = client.post("/orgs/initech/alerts", data={"kind": "total", "amount": "10.00"},
                       follow_redirects=True).get_data(as_text=True)
    assert "There is already an alert on the total so far at $10.00." in page
    assert count(db, SpendAlert) == 1


def test_the_next_cycle_may_cross_the_same_threshold_again(app, db, make, initech):
    from portal.billing.invoices import ensure_open_invoice

    organization, invoice, cpu = initech
    add_alert(organization, "total", 1_000)
    spend(db, invoice, cpu, 1_000)
    assert len(evaluate_alerts(invoice.id)) == 1
    invoice.status = "finalized"  # the cycle closed; the next one opens
    db.session.commit()
    following = ensure_open_invoice(organization, invoice.period_end + timedelta(hours=1))
    db.session.commit()
    assert evaluate_alerts(invoice.id) == []  # a closed invoice is not watched
    spend(db, following, cpu, 1_500)
    assert len(evaluate_alerts(following.id)) == 1
    db.session.commit()
    assert count(db, OutboxMail) == 2


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"),
                    reason="a race between PostgreSQL transactions: SQLite lets one writer at a time")
def test_two_drainers_at_once_send_each_mail_once(app, db, initech, smtp_server):
    from portal.mail import deliver_outbox

    for n in range(8):
        db.session.add(OutboxMail(recipient=f"r{n}@initech.test", subject=f"mail {n}", body="hello"))
    db.session.commit()
    barrier = threading.Barrier(3)
    sent, errors = [], []

    def drain():
        from portal.extensions import db as database

        with app.app_context():
            try:
                barrier.wait(timeout=10)
                sent.append(deliver_outbox().sent)
            except Exception as error:  # reported below
                errors.append(error)
            finally:
                database.session.remove()

    threads = [threading.Thread(target=drain) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and sum(sent) == 8
    assert sorted(message["Subject"] for _, message in smtp_server.messages) == [f"mail {n}" for n in range(8)]


def test_the_outbox_is_listed_and_sent_from_the_command_line(app, db, runner, initech, smtp_server):
    organization, invoice, cpu = initech
    add_alert(organization, "total", 100)
    spend(db, invoice, cpu, 100)
    evaluate_alerts(invoice.id)
    db.session.commit()
    listed = runner.invoke(args=["outbox", "list"])
    assert listed.exit_code == 0
    assert "waiting (0 attempts)" in listed.output and "ap@initech.test" in listed.output
    sent = runner.invoke(args=["outbox", "send"])
    assert sent.exit_code == 0 and "sent 1, failed 0" in sent.output
    assert runner.invoke(args=["outbox", "list"]).output == ""
    assert "sent " in runner.invoke(args=["outbox", "list", "--all"]).output
    assert len(smtp_server.messages) == 1


def test_sending_without_smtp_says_the_mails_stay_queued(app, db, runner, initech):
    db.session.add(OutboxMail(recipient="ap@initech.test", subject="s", body="b"))
    db.session.commit()
    result = runner.invoke(args=["outbox", "send"])
    assert result.exit_code == 1 and "SMTP_HOST is not set: 1 mail(s) stay queued" in result.output

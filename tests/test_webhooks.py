"""`POST /webhooks/stripe`: verified, stored once, acknowledged, processed later."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import requests
from redis import Redis
from rq import Queue
from sqlalchemy import func, select, update

from jobs.webhooks import sweep_stored_events
from portal.models import StripeEvent
from portal.models.types import utcnow
from portal.queue import redis_connection
from tests.services import free_port
from tests.webhook_helpers import SECRET, event_body, post_event, sign


@pytest.fixture(autouse=True)
def webhook_secret(app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])


def stored(db) -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(StripeEvent))


def test_signed_event_is_stored_acknowledged_and_queued(client, db):
    body = event_body("evt_1")
    response = post_event(client, body, sign(body))
    assert response.status_code == 200 and response.get_json() == {"received": True, "duplicate": False}
    assert stored(db) == 1
    assert Queue("webhooks", connection=redis_connection()).count == 1


def test_a_duplicate_delivery_is_acknowledged_and_stored_once(client, db):
    body = event_body("evt_1")
    post_event(client, body, sign(body))
    response = post_event(client, body, sign(body))
    assert response.status_code == 200 and response.get_json()["duplicate"] is True
    assert stored(db) == 1


def test_any_secret_of_a_roll_is_accepted(app, client, db, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", ["whsec_old", SECRET])
    body = event_body("evt_roll")
    assert post_event(client, body, sign(body, "whsec_old")).status_code == 200
    body = event_body("evt_roll_2")
    assert post_event(client, body, sign(body, SECRET)).status_code == 200
    assert stored(db) == 2


@pytest.mark.parametrize(
    "make_request",
    [
        lambda body: (body, None),  # no signature
        lambda body: (body, sign(body, "whsec_forged")),  # forged
        lambda body: (body, sign(body, timestamp=int(time.time()) - 600)),  # replayed too late
        lambda body: (body + b" ", sign(body)),  # body changed after signing
        lambda body: (b"not json", sign(b"not json")),  # malformed
        lambda body: (b'{"id": "evt_x"}', sign(b'{"id": "evt_x"}')),  # not an event
    ],
    ids=["unsigned", "forged", "stale", "tampered", "not-json", "not-an-event"],
)
def test_bad_deliveries_are_400_and_store_nothing(client, db, make_request):
    body, signature = make_request(event_body("evt_bad"))
    response = post_event(client, body, signature)
    assert response.status_code == 400
    assert stored(db) == 0
    assert Queue("webhooks", connection=redis_connection()).count == 0


def test_a_delivery_over_the_size_limit_is_413_and_stores_nothing(client, db):
    body = b"{" + b" " * 600_000 + b"}"
    response = post_event(client, body, sign(body))
    assert response.status_code == 413
    assert stored(db) == 0
    assert Queue("webhooks", connection=redis_connection()).count == 0


def test_one_event_posted_from_two_threads_at_once_is_stored_once(live_server, db):
    body = event_body("evt_race")
    results = []

    def deliver():
        results.append(requests.post(live_server.url + "/webhooks/stripe", data=body, timeout=10,
                                     headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"}))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200, 200]
    assert sorted(r.json()["duplicate"] for r in results) == [False, True]
    assert stored(db) == 1


def test_events_delivered_while_redis_is_down_are_processed_after_it_returns(app, client, db, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(app.extensions, "redis", Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2))
        body = event_body("evt_redis_down", "customer.updated", {"object": "customer", "id": "cus_x"})
        assert post_event(client, body, sign(body)).status_code == 200
    assert stored(db) == 1
    assert Queue("webhooks", connection=redis_connection()).count == 0
    db.session.execute(update(StripeEvent).values(received_at=utcnow() - timedelta(minutes=5)))
    db.session.commit()
    from jobs.app import use_app

    use_app(app)
    assert sweep_stored_events() == {"enqueued": 1}
    from rq import SimpleWorker

    SimpleWorker([Queue("webhooks", connection=redis_connection())], connection=redis_connection()).work(burst=True)
    db.session.rollback()
    event = db.session.scalar(select(StripeEvent))
    assert event.processed_at is not None and event.attempts == 1
    db.session.rollback()
    assert sweep_stored_events() == {"enqueued": 0}


def test_unknown_event_types_are_stored_and_acknowledged_without_a_job(client, db, app):
    from portal.billing.events import process_event
    from portal.queue import queue

    for n, event_type in enumerate(("charge.dispute.created", "invoiceitem.updated")):
        body = event_body(f"evt_unknown_{n}", event_type, {"object": "x", "id": f"x_{n}"})
        assert post_event(client, body, sign(body)).status_code == 200
    rows = db.session.scalars(select(StripeEvent)).all()
    assert len(rows) == 2 and all(row.processed_at is not None for row in rows)  # stored as done
    assert queue("webhooks").count == 0  # no job spent on them
    assert process_event(rows[0].id) == "already processed"


def test_webhook_route_needs_no_login_or_csrf_but_the_rest_do(app, client, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(app.config, "WTF_CSRF_ENABLED", True)
        body = event_body("evt_csrf")
        assert post_event(client, body, sign(body)).status_code == 200
        for response in (client.post("/logout"), client.post("/login", data={"email": "a@b.c", "password": "x"})):
            assert response.status_code == 400 and b"The CSRF token is missing." in response.data
    # With CSRF checks off (as if given the token), logging out still needs a login.
    response = client.post("/logout")
    assert (response.status_code, response.headers["Location"]) == (302, "/login?next=%2Flogout")

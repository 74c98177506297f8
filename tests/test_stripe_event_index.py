"""Stripe events are found by organization and invoice through indexed columns,
filled when the event is stored (or processed), and backfilled by the migration."""
from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text, update

from portal.admin.queries import stripe_events_of_invoice, stripe_events_of_organization
from portal.billing.events import process_event, store_event
from portal.models import StripeEvent
from portal.models.types import utcnow
from tests.test_migrations import flask
from tests.webhook_helpers import SECRET, event_body, post_event, sign

ROOT = Path(__file__).resolve().parent.parent
MIGRATION = ROOT / "migrations" / "versions" / "0008_stripe_event_subjects.py"


@pytest.fixture(autouse=True)
def webhook_secret(app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])


@pytest.fixture
def billed(db, make):
    """An organization with a Stripe customer and an open invoice with a Stripe draft,
    and another organization with neither."""
    organization = make.organization(slug="acme", stripe_customer_id="cus_acme")
    invoice = make.open_invoice(organization)
    invoice.stripe_invoice_id = "in_acme"
    db.session.commit()
    other = make.organization(slug="other")
    return organization, invoice, other


def _event(event_id: str, event_type: str, obj: dict) -> dict:
    return {"id": event_id, "object": "event", "type": event_type, "created": 1,
            "data": {"object": obj}}


def test_a_delivered_invoice_event_names_its_organization_and_invoice(client, db, billed):
    organization, invoice, other = billed
    body = event_body("evt_paid", "invoice.paid", {"object": "invoice", "id": "in_acme", "customer": "cus_acme"})
    assert post_event(client, body, sign(body)).status_code == 200
    body = event_body("evt_elsewhere", "invoice.paid", {"object": "invoice", "id": "in_unknown", "customer": "cus_x"})
    assert post_event(client, body, sign(body)).status_code == 200
    stored = db.session.scalar(select(StripeEvent).where(StripeEvent.stripe_event_id == "evt_paid"))
    assert (stored.organization_id, stored.invoice_id) == (organization.id, invoice.id)
    assert [e.stripe_event_id for e in stripe_events_of_organization(organization).rows] == ["evt_paid"]
    assert [e.stripe_event_id for e in stripe_events_of_invoice(invoice.id)] == ["evt_paid"]
    assert stripe_events_of_organization(other).rows == []


def test_customer_line_and_metadata_events_find_their_subjects(db, billed):
    organization, invoice, other = billed
    cases = {
        "evt_customer": _event("evt_customer", "customer.updated", {"object": "customer", "id": "cus_acme"}),
        "evt_method": _event("evt_method", "payment_method.attached",
                             {"object": "payment_method", "id": "pm_1", "customer": "cus_acme"}),
        "evt_item": _event("evt_item", "invoiceitem.created",
                           {"object": "invoiceitem", "id": "ii_1", "invoice": "in_acme", "customer": "cus_acme"}),
        # A draft a crashed sync created, before the portal recorded its id: by metadata.
        "evt_adopt": _event("evt_adopt", "invoice.created",
                            {"object": "invoice", "id": "in_new", "customer": "cus_new",
                             "metadata": {"portal_invoice_id": str(invoice.id)}}),
        "evt_meta_org": _event("evt_meta_org", "customer.created",
                               {"object": "customer", "id": "cus_new",
                                "metadata": {"portal_organization_id": str(other.id)}}),
        # Ids in metadata count only when they exist.
        "evt_bogus": _event("evt_bogus", "customer.created",
                            {"object": "customer", "id": "cus_bogus",
                             "metadata": {"portal_organization_id": "999999"}}),
    }
    for event in cases.values():
        store_event(event)
    db.session.commit()
    found = {e.stripe_event_id: (e.organization_id, e.invoice_id) for e in db.session.scalars(select(StripeEvent))}
    assert found == {
        "evt_customer": (organization.id, None),
        "evt_method": (organization.id, None),
        "evt_item": (organization.id, invoice.id),
        "evt_adopt": (organization.id, invoice.id),
        "evt_meta_org": (other.id, None),
        "evt_bogus": (None, None),
    }


def test_an_event_stored_before_its_customer_was_known_is_named_when_processed(db, make):
    organization = make.organization(slug="late")
    make.open_invoice(organization)
    row_id, _ = store_event(_event("evt_deleted", "customer.deleted", {"object": "customer", "id": "cus_late"}))
    db.session.commit()
    assert db.session.get(StripeEvent, row_id).organization_id is None
    organization.stripe_customer_id = "cus_late"
    db.session.commit()
    assert process_event(row_id).startswith("syncs queued")
    db.session.expire_all()
    assert db.session.get(StripeEvent, row_id).organization_id == organization.id


def test_an_event_added_through_the_orm_is_named_too(db, billed):
    organization, invoice, _ = billed
    db.session.add(StripeEvent(stripe_event_id="evt_orm", type="invoice.paid", stripe_created=1,
                               payload=_event("evt_orm", "invoice.paid", {"object": "invoice", "id": "in_acme"})))
    db.session.commit()
    assert [e.stripe_event_id for e in stripe_events_of_invoice(invoice.id)] == ["evt_orm"]


def _load_migration():
    spec = importlib.util.spec_from_file_location("migration_0008", MIGRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_migration_backfill_fills_existing_rows_in_batches(db, billed, monkeypatch):
    """On the engine the tests run on (SQLite or PostgreSQL): rows whose columns are
    empty, as before the migration, are filled from their payload."""
    organization, invoice, _ = billed
    migration = _load_migration()
    monkeypatch.setattr(migration, "BATCH", 7)  # several batches
    rows = []
    for n in range(30):
        obj = ({"object": "invoice", "id": "in_acme"} if n % 3 == 0 else
               {"object": "customer", "id": "cus_acme"} if n % 3 == 1 else {"object": "customer", "id": "cus_x"})
        rows.append({"stripe_event_id": f"evt_{n}", "type": "t", "stripe_created": n, "received_at": utcnow(),
                     "attempts": 0, "payload": _event(f"evt_{n}", "t", obj)})
    db.session.execute(insert(StripeEvent), rows)  # Core executemany: no ORM hook
    db.session.execute(update(StripeEvent).values(organization_id=None, invoice_id=None))
    db.session.commit()
    assert migration.backfill(db.session.connection()) == 20
    db.session.commit()
    assert len(stripe_events_of_organization(organization).rows) == 20
    assert len(stripe_events_of_invoice(invoice.id, limit=100)) == 10


def test_a_populated_sqlite_database_gets_the_columns_filled_by_the_upgrade(tmp_path):
    database = tmp_path / "portal.db"
    flask(database, "upgrade", "0006")
    with sqlite3.connect(database) as connection:
        t = "'2026-11-01 00:00:00'"
        connection.executescript(f"""
            INSERT INTO organizations (id, slug, name, billing_email, currency, cycle_anchor_day, created_at,
                stripe_customer_id) VALUES (1, 'a', 'A', 'a@example.com', 'usd', 1, {t}, 'cus_a');
            INSERT INTO invoices (id, organization_id, period_start, period_end, status, currency, total_cents,
                change_seq, synced_seq, created_at, stripe_invoice_id)
                VALUES (4, 1, {t}, '2026-12-01 00:00:00', 'open', 'usd', 5, 1, 0, {t}, 'in_a');
            INSERT INTO stripe_events (id, stripe_event_id, type, stripe_created, payload, received_at, attempts)
                VALUES (1, 'evt_1', 'invoice.paid', 1,
                        '{{"data": {{"object": {{"object": "invoice", "id": "in_a"}}}}}}', {t}, 0),
                       (2, 'evt_2', 'customer.updated', 1,
                        '{{"data": {{"object": {{"object": "customer", "id": "cus_a"}}}}}}', {t}, 0),
                       (3, 'evt_3', 'customer.updated', 1, '{{"data": {{}}}}', {t}, 0);
        """)
    flask(database, "upgrade")
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT id, organization_id, invoice_id FROM stripe_events ORDER BY id").fetchall() \
            == [(1, 1, 4), (2, 1, None), (3, None, None)]
    assert "No new upgrade operations detected" in flask(database, "check")
    flask(database, "downgrade", "0006")
    with sqlite3.connect(database) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(stripe_events)")]
        assert "organization_id" not in columns and connection.execute(
            "SELECT count(*) FROM stripe_events").fetchone() == (3,)


def test_the_organization_lookup_uses_the_index(db, billed):
    """EXPLAIN, with enough rows that a scan would cost more: the planner picks the index
    (PostgreSQL's EXPLAIN; SQLite's EXPLAIN QUERY PLAN on the SQLite run)."""
    organization, _, _ = billed
    rows = [{"stripe_event_id": f"evt_{n}", "type": "invoice.updated", "stripe_created": n, "received_at": utcnow(),
             "attempts": 0, "payload": {"data": {"object": {"customer": f"cus_{n % 500}"}}},
             "organization_id": n % 500 + 1000} for n in range(20_000)]
    db.session.execute(insert(StripeEvent), rows)
    db.session.commit()
    query = (select(StripeEvent).where(StripeEvent.organization_id == organization.id)
             .order_by(StripeEvent.received_at.desc(), StripeEvent.id.desc()).limit(25))
    compiled = query.compile(db.engine, compile_kwargs={"literal_binds": True})
    if db.engine.dialect.name == "postgresql":
        db.session.execute(text("ANALYZE stripe_events"))
        plan = "\n".join(db.session.scalars(text(f"EXPLAIN {compiled}")))
    else:
        plan = "\n".join(row[-1] for row in db.session.execute(text(f"EXPLAIN QUERY PLAN {compiled}")))
    assert "ix_stripe_events_organization_received" in plan, plan
    assert "Seq Scan" not in plan and "SCAN stripe_events" not in plan, plan

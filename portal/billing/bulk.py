"""Set-based writes for the ingestion hot path, one statement per step per batch.

On PostgreSQL a whole batch travels as one JSON parameter that the server unpacks
with jsonb_to_recordset (one round trip, no per-value quoting in Python); on SQLite
(the embedded default) the same steps go through SQLAlchemy's executemany. Rows are
always locked in (invoice_id, line_key) or id order, so concurrent batches queue
behind each other instead of deadlocking; line keys compare by code point (COLLATE
"C" on PostgreSQL), the order Python sorts them in before inserting.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, text, tuple_, update
from sqlalchemy.dialects import sqlite

from portal.extensions import db
from portal.models import Invoice, InvoiceItem, UsageEvent


def _json_value(value):
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def json_rows(rows: Iterable[dict]) -> str:
    """Rows as a JSON array; decimals travel as exact text."""
    return json.dumps(list(rows), default=_json_value, separators=(",", ":"))


def _postgresql() -> bool:
    return db.engine.dialect.name == "postgresql"


_PG_INSERT_EVENTS = text(
    "INSERT INTO usage_events (sender, event_id, organization_id, product_id, quantity, occurred_at, resource,"
    " received_at, invoice_id) "
    "SELECT sender, event_id, organization_id, product_id, quantity, occurred_at, resource, received_at,"
    " invoice_id FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(sender text, event_id text,"
    " organization_id bigint, product_id bigint, quantity numeric, occurred_at timestamptz, resource text,"
    " received_at timestamptz, invoice_id bigint, ord bigint) ORDER BY ord "
    "ON CONFLICT (sender, event_id) DO NOTHING RETURNING event_id"
)


def insert_new_usage_events(rows: list[dict]) -> set[str]:
    """Insert usage events, skipping (sender, event_id) pairs already claimed; return
    the event ids this call inserted. Rows go in (sender, event_id) order: batches
    that share ids then wait for each other in one order instead of deadlocking."""
    rows = sorted(rows, key=lambda row: (row["sender"], row["event_id"]))
    if _postgresql():
        payload = json_rows({**row, "ord": n} for n, row in enumerate(rows))
        return set(db.session.scalars(_PG_INSERT_EVENTS, {"rows": payload}))
    statement = (
        sqlite.insert(UsageEvent)
        .on_conflict_do_nothing(index_elements=["sender", "event_id"])
        .returning(UsageEvent.event_id)
    )
    return set(db.session.scalars(statement, rows, execution_options={"render_nulls": True}))


_PG_INSERT_ITEMS = text(
    "INSERT INTO invoice_items (invoice_id, product_id, line_key, resource, description, quantity, unit_price,"
    " amount_cents, origin_period_start, origin_period_end, version, updated_at) "
    "SELECT invoice_id, product_id, line_key, resource, description, quantity, unit_price, amount_cents,"
    " origin_period_start, origin_period_end, version, updated_at "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(invoice_id bigint, product_id bigint,"
    " line_key text, resource text, description text, quantity numeric, unit_price numeric, amount_cents bigint,"
    " origin_period_start timestamptz, origin_period_end timestamptz, version int, updated_at timestamptz,"
    " ord bigint) ORDER BY ord "
    "ON CONFLICT (invoice_id, line_key) DO NOTHING"
)

_PG_LOCK_ITEMS = text(
    "SELECT i.id, i.invoice_id, i.line_key, i.quantity, i.unit_price, i.amount_cents, i.version "
    "FROM invoice_items i JOIN jsonb_to_recordset(CAST(:keys AS jsonb)) AS k(invoice_id bigint, line_key text)"
    " ON i.invoice_id = k.invoice_id AND i.line_key = k.line_key "
    "ORDER BY i.invoice_id, i.line_key COLLATE \"C\" FOR UPDATE OF i"
)

_PG_UPDATE_ITEMS = text(
    "UPDATE invoice_items SET quantity = c.quantity, amount_cents = c.amount_cents, version = c.version,"
    " updated_at = c.updated_at "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS c(id bigint, quantity numeric, amount_cents bigint,"
    " version int, updated_at timestamptz) WHERE invoice_items.id = c.id"
)


def insert_missing_items(rows: list[dict]) -> None:
    """Insert invoice items whose (invoice_id, line_key) does not exist yet, in the
    order given (callers sort them)."""
    if _postgresql():
        db.session.execute(_PG_INSERT_ITEMS, {"rows": json_rows({**row, "ord": n} for n, row in enumerate(rows))})
    else:
        db.session.execute(
            sqlite.insert(InvoiceItem).on_conflict_do_nothing(index_elements=["invoice_id", "line_key"]), rows
        )


def lock_items(keys: list[tuple[int, str]]):
    """Lock and read the items with these (invoice_id, line_key), in key order."""
    if _postgresql():
        payload = json_rows({"invoice_id": invoice_id, "line_key": key} for invoice_id, key in keys)
        return db.session.execute(_PG_LOCK_ITEMS, {"keys": payload}).all()
    return db.session.execute(
        select(InvoiceItem.id, InvoiceItem.invoice_id, InvoiceItem.line_key, InvoiceItem.quantity,
               InvoiceItem.unit_price, InvoiceItem.amount_cents, InvoiceItem.version)
        .where(tuple_(InvoiceItem.invoice_id, InvoiceItem.line_key).in_(keys))
        .order_by(InvoiceItem.invoice_id, InvoiceItem.line_key)
    ).all()


def update_items(changes: list[dict]) -> None:
    """Write new quantity, amount_cents, version and updated_at of items by id."""
    if _postgresql():
        db.session.execute(_PG_UPDATE_ITEMS, {"rows": json_rows(changes)})
    else:
        db.session.execute(update(InvoiceItem), changes, execution_options={"synchronize_session": False})


# NO KEY UPDATE: concurrent batches hold KEY SHARE locks on these rows (the foreign
# keys of the events and items they insert); FOR UPDATE would deadlock with them.
_PG_LOCK_INVOICES = text("SELECT id FROM invoices WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id FOR NO KEY UPDATE")
_PG_MOVE_INVOICES = text(
    "UPDATE invoices SET total_cents = invoices.total_cents + d.delta, change_seq = invoices.change_seq + 1 "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS d(id bigint, delta bigint) WHERE invoices.id = d.id"
)


def move_invoices(amount_deltas: dict[int, int]) -> None:
    """Add each amount delta to its invoice's total and mark the invoice changed
    (change_seq + 1), atomically in the database."""
    ids = sorted(amount_deltas)
    if _postgresql():
        db.session.execute(_PG_LOCK_INVOICES, {"ids": ids})
        db.session.execute(_PG_MOVE_INVOICES,
                           {"rows": json_rows({"id": i, "delta": amount_deltas[i]} for i in ids)})
        return
    for invoice_id in ids:
        db.session.execute(
            update(Invoice).where(Invoice.id == invoice_id)
            .values(total_cents=Invoice.total_cents + amount_deltas[invoice_id],
                    change_seq=Invoice.change_seq + 1)
            .execution_options(synchronize_session=False)
        )




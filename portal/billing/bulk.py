"""Set-based writes for the ingestion hot path, one statement per step per batch.

On PostgreSQL a whole batch travels as one JSON parameter that the server unpacks
with jsonb_to_recordset (one round trip, no per-value quoting in Python); on SQLite
(the embedded default) the same steps go through SQLAlchemy's executemany. Rows are
always locked in (invoice_id, line_key) or id order, so concurrent batches queue
behind each other instead of deadlocking; line keys compare by code point (COLLATE
"C" on PostgreSQL), the order Python sorts them in before inserting.

A PostgreSQL batch costs at most four writes: insert the events (which also reports, without
locking, which of the batch's items exist already), insert only the items that did
not (usually none), lock the items in key order, then one statement that writes the items and locks
(in id order) and moves the invoices.
"""
from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select, text, tuple_, update
from sqlalchemy.dialects import sqlite

from portal.extensions import db
from portal.models import Invoice, InvoiceItem, UsageEvent


def _postgresql() -> bool:
    return db.engine.dialect.name == "postgresql"


# sender and received_at are one value per batch: they travel once, not per row.
_PG_INSERT_EVENTS = text(
    "INSERT INTO usage_events (sender, event_id, organization_id, product_id, quantity, occurred_at, resource,"
    " received_at, invoice_id) "
    "SELECT CAST(:sender AS text), event_id, organization_id, product_id, quantity, occurred_at, resource,"
    " CAST(:received_at AS timestamptz), invoice_id"
    " FROM ROWS FROM (jsonb_to_recordset(CAST(:rows AS jsonb)) AS (event_id text, organization_id bigint,"
    " product_id bigint, quantity numeric, occurred_at timestamptz, resource text, invoice_id bigint))"
    " WITH ORDINALITY AS r(event_id, organization_id, product_id, quantity, occurred_at, resource, invoice_id, ord)"
    " ORDER BY ord "
    "ON CONFLICT (sender, event_id) DO NOTHING RETURNING event_id"
)
# The same insert, and in the same round trip (no locks taken) which of the invoice
# items the batch could price exist already, as of the statement's snapshot.
_PG_INSERT_EVENTS_FIND_ITEMS = text(
    f"WITH inserted AS ({_PG_INSERT_EVENTS.text}) "
    "SELECT event_id, CAST(NULL AS bigint) AS item FROM inserted "
    "UNION ALL "
    "SELECT NULL, k.ord FROM ROWS FROM (jsonb_to_recordset(CAST(:keys AS jsonb)) AS (i bigint, k text))"
    " WITH ORDINALITY AS k(invoice_id, line_key, ord) "
    "WHERE EXISTS (SELECT FROM invoice_items i WHERE i.invoice_id = k.invoice_id AND i.line_key = k.line_key)"
)


def insert_new_usage_events(
    sender: str, received_at: datetime, rows: list[dict], item_keys: list[tuple[int, str]] = ()
) -> tuple[set[str], set[tuple[int, str]]]:
    """Insert usage events from `sender` (rows without sender and received_at),
    skipping (sender, event_id) pairs already claimed. Rows go in event_id order:
    batches that share ids then wait for each other in one order instead of
    deadlocking.

    Returns the event ids this call inserted, and those of `item_keys` ((invoice_id,
    line_key) of invoice items) that exist already (committed, so they cannot vanish:
    items are never deleted on their own); on SQLite, where the check would save
    nothing, none are reported."""
    rows = sorted(rows, key=_by_event_id)
    if _postgresql():
        params = {
            "sender": sender,
            "received_at": received_at,
            "rows": json.dumps(
                [{**row, "quantity": str(row["quantity"]), "occurred_at": row["occurred_at"].isoformat()}
                 for row in rows],
                separators=(",", ":"),
            ),
        }
        if not item_keys:
            return set(db.session.execute(_PG_INSERT_EVENTS, params).scalars().all()), set()
        params["keys"] = _json_keys(item_keys)
        inserted, existing = set(), set()
        for event_id, item in db.session.execute(_PG_INSERT_EVENTS_FIND_ITEMS, params).all():
            if item is None:
                inserted.add(event_id)
            else:
                existing.add(item_keys[item - 1])
        return inserted, existing
    statement = (
        sqlite.insert(UsageEvent)
        .on_conflict_do_nothing(index_elements=["sender", "event_id"])
        .returning(UsageEvent.event_id)
    )
    rows = [{**row, "sender": sender, "received_at": received_at} for row in rows]
    return set(db.session.scalars(statement, rows, execution_options={"render_nulls": True})), set()


def _by_event_id(row: dict) -> str:
    return row["event_id"]


def _json_keys(keys: list[tuple[int, str]]) -> str:
    """(invoice_id, line_key) pairs as a JSON array of {"i": invoice_id, "k": line_key}."""
    return json.dumps([{"i": invoice_id, "k": key} for invoice_id, key in keys], separators=(",", ":"))


_PG_INSERT_ITEMS = text(
    "INSERT INTO invoice_items (invoice_id, product_id, line_key, resource, description, quantity, unit_price,"
    " amount_cents, origin_period_start, origin_period_end, version, updated_at) "
    "SELECT invoice_id, product_id, line_key, resource, description, 0, unit_price, 0, origin_period_start,"
    " origin_period_end, 1, CAST(:now AS timestamptz) "
    "FROM ROWS FROM (jsonb_to_recordset(CAST(:rows AS jsonb)) AS (invoice_id bigint, product_id bigint,"
    " line_key text, resource text, description text, unit_price numeric, origin_period_start timestamptz,"
    " origin_period_end timestamptz)) WITH ORDINALITY AS r(invoice_id, product_id, line_key, resource, description,"
    " unit_price, origin_period_start, origin_period_end, ord) ORDER BY ord "
    "ON CONFLICT (invoice_id, line_key) DO NOTHING"
)

_PG_LOCK_ITEMS = text(
    "SELECT i.id, i.invoice_id, i.line_key, i.quantity, i.unit_price, i.amount_cents, i.version "
    "FROM invoice_items i JOIN jsonb_to_recordset(CAST(:keys AS jsonb)) AS k(i bigint, k text)"
    " ON i.invoice_id = k.i AND i.line_key = k.k "
    "ORDER BY i.invoice_id, i.line_key COLLATE \"C\" FOR UPDATE OF i"
)

def insert_missing_items(rows: list[dict], now: datetime) -> None:
    """Insert the invoice items among `rows` whose (invoice_id, line_key) does not
    exist yet (quantity 0, amount 0, version 1), in the order given (callers sort them)."""
    if _postgresql():
        payload = json.dumps(
            [{**row, "unit_price": str(row["unit_price"]),
              "origin_period_start": row["origin_period_start"] and row["origin_period_start"].isoformat(),
              "origin_period_end": row["origin_period_end"] and row["origin_period_end"].isoformat()}
             for row in rows],
            separators=(",", ":"),
        )
        db.session.execute(_PG_INSERT_ITEMS, {"rows": payload, "now": now})
        return
    db.session.execute(
        sqlite.insert(InvoiceItem).on_conflict_do_nothing(index_elements=["invoice_id", "line_key"]),
        [{**row, "quantity": Decimal(0), "amount_cents": 0, "version": 1, "updated_at": now} for row in rows],
    )


def lock_items(keys: list[tuple[int, str]]):
    """Lock and read the items with these (invoice_id, line_key), in key order: rows
    of (id, invoice_id, line_key, quantity, unit_price, amount_cents, version)."""
    if _postgresql():
        return db.session.execute(_PG_LOCK_ITEMS, {"keys": _json_keys(keys)}).all()
    return db.session.execute(
        select(InvoiceItem.id, InvoiceItem.invoice_id, InvoiceItem.line_key, InvoiceItem.quantity,
               InvoiceItem.unit_price, InvoiceItem.amount_cents, InvoiceItem.version)
        .where(tuple_(InvoiceItem.invoice_id, InvoiceItem.line_key).in_(keys))
        .order_by(InvoiceItem.invoice_id, InvoiceItem.line_key)
    ).all()


# The items (already locked by this transaction) get their new quantity and amount;
# then the invoices are locked in id order (FOR NO KEY UPDATE: concurrent batches hold
# KEY SHARE locks on these rows, the foreign keys of the events and items they insert;
# FOR UPDATE would deadlock with them), and each one's total moves by its delta and
# its change counter by one. One statement: the locking subquery is materialized and
# hands rows to the update in id order, so no invoice row is touched before it is
# locked in that order.
_PG_UPDATE_ITEMS_AND_INVOICES = text(
    "WITH changed AS ("
    " UPDATE invoice_items SET quantity = c.quantity, amount_cents = c.amount_cents, version = c.version,"
    " updated_at = CAST(:now AS timestamptz)"
    " FROM jsonb_to_recordset(CAST(:items AS jsonb)) AS c(id bigint, quantity numeric, amount_cents bigint,"
    " version int) WHERE invoice_items.id = c.id RETURNING 1"
    "), locked AS MATERIALIZED ("
    " SELECT id FROM invoices WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id FOR NO KEY UPDATE"
    ") "
    "UPDATE invoices SET total_cents = invoices.total_cents + d.delta, change_seq = invoices.change_seq + 1 "
    "FROM locked JOIN unnest(CAST(:ids AS bigint[]), CAST(:deltas AS bigint[])) AS d(id, delta)"
    " ON d.id = locked.id WHERE invoices.id = locked.id RETURNING invoices.id, invoices.status"
)


def update_items_and_invoices(changes: list[dict], amount_deltas: dict[int, int]) -> dict[int, str]:
    """Write the new quantity, amount_cents, version and updated_at of items (by id;
    the caller holds their locks), add each amount delta to its invoice's total and
    mark the invoice changed (change_seq + 1), atomically in the database. Returns
    each invoice's status as of its lock (a close may have claimed it meanwhile)."""
    ids = sorted(amount_deltas)
    if _postgresql():
        now = changes[0]["updated_at"] if changes else None
        items = json.dumps(
            [{"id": c["id"], "quantity": str(c["quantity"]), "amount_cents": c["amount_cents"],
              "version": c["version"]} for c in changes],
            separators=(",", ":"),
        )
        return dict(db.session.execute(_PG_UPDATE_ITEMS_AND_INVOICES, {
            "items": items, "now": now, "ids": ids, "deltas": [amount_deltas[i] for i in ids]}).all())
    update_items(changes)
    move_invoices(amount_deltas)
    return dict(db.session.execute(select(Invoice.id, Invoice.status).where(Invoice.id.in_(ids))).all())


def update_items(changes: list[dict]) -> None:
    """Write new quantity, amount_cents, version and updated_at of items by id (SQLite;
    PostgreSQL does it inside `update_items_and_invoices`' one statement)."""
    db.session.execute(update(InvoiceItem), changes, execution_options={"synchronize_session": False})


def move_invoices(amount_deltas: dict[int, int]) -> None:
    """Add each amount delta to its invoice's total and mark the invoice changed
    (change_seq + 1), atomically in the database (SQLite; PostgreSQL does it inside
    `update_items_and_invoices`' one statement)."""
    for invoice_id in sorted(amount_deltas):
        db.session.execute(
            update(Invoice).where(Invoice.id == invoice_id)
            .values(total_cents=Invoice.total_cents + amount_deltas[invoice_id],
                    change_seq=Invoice.change_seq + 1)
            .execution_options(synchronize_session=False)
        )

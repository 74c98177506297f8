"""A large PostgreSQL dataset for the page benchmarks, built by the real migrations and
a bulk load in SQL (INSERT ... SELECT over generate_series: no row crosses the wire).

    ensure(database_url, organizations=10_000, events=5_000_000) -> dict

Idempotent: the sizes and the billing period it was built for are kept (as the
database's comment); a database already holding them is used as it is (seconds),
anything else is rebuilt from an empty schema (minutes at the full size).

What it holds, all for the current billing period (cycles anchored on the 1st):
- `organizations` organizations `org-00001`..., each with an owner
  `owner-<n>@bench.example` and one open invoice; one support user
  `support@bench.example`. Every password is `PASSWORD`.
- `big-org` (organization 1), the large one: 5% of all usage events.
- Usage events spread over the part of the period that has passed, over four
  metered products and five resources per organization, each priced onto its
  organization's open invoice; the invoice lines are their sums, priced as the
  portal prices them (quantity x unit price, rounded once, halves away from zero).
- Every 10th organization has a dedicated IPv4 service attached since the period
  began (its line charged to the period's end), every 50th a $5.00 credit, and
  each has two paid invoices of earlier periods and one finished sync run.

Returns the sizes, whether it was built now, the time it took, the login details,
and sample slugs (`typical`: a spread of ordinary organizations; `large`) with
their open invoices' ids (`open_invoice_ids`, by slug).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import psycopg

from bench.common import rebuild_database

PASSWORD = "bench-password-1"
LARGE_SLUG = "big-org"
LARGE_SHARE = 20  # the large organization holds 1/LARGE_SHARE of the events
METERED = (  # code, name, unit, unit price in decimal cents
    ("machines.shared-cpu-1x", "Shared CPU 1x machine", "second", "0.0011"),
    ("machines.performance-2x", "Performance 2x machine", "second", "0.0172"),
    ("volumes.gb", "Volume storage", "GB-hour", "0.0208"),
    ("egress.gb", "Outbound data transfer", "GB", "2"),
)
RECURRING = (("ipv4.dedicated", "Dedicated IPv4 address", "address per month", "200"),)


def _period(now: datetime) -> tuple[datetime, datetime]:
    from portal.billing.cycles import cycle_containing

    return cycle_containing(now, 1)


def _marker(organizations: int, events: int, period_start: datetime) -> str:
    return json.dumps({"bench_dataset": {"organizations": organizations, "events": events,
                                         "period_start": period_start.isoformat()}})


def _built(connection, organizations: int, events: int, period_start: datetime) -> bool:
    """Whether the database holds this dataset: its sizes and period are kept as the
    database's comment (nothing in the schema, so it stays the migrations' and `flask
    db check` passes). The comment is cleared before a rebuild and set after it."""
    row = connection.execute("SELECT shobj_description(oid, 'pg_database'), to_regclass('organizations')"
                             " FROM pg_database WHERE datname = current_database()").fetchone()
    return row is not None and row[1] is not None and row[0] == _marker(organizations, events, period_start)


def _set_marker(connection, marker: str | None) -> None:
    name = connection.execute("SELECT current_database()").fetchone()[0]
    value = "NULL" if marker is None else "'" + marker.replace("'", "''") + "'"
    connection.execute(f'COMMENT ON DATABASE "{name}" IS {value}')


def _sample(connection, organizations: int) -> dict:
    step = max(1, organizations // 10)
    rows = connection.execute(
        "SELECT o.slug, i.id FROM organizations o JOIN invoices i ON i.organization_id = o.id AND i.status = 'open'"
        " WHERE o.id = 1 OR (o.id > 2 AND (o.id - 3) %% %s = 0) ORDER BY o.id LIMIT 11", (step,)).fetchall()
    return {"typical": [slug for slug, _ in rows if slug != LARGE_SLUG], "large": LARGE_SLUG,
            "open_invoice_ids": dict(rows)}


def _password_hash() -> str:
    from portal.passwords import hash_password

    return hash_password(PASSWORD)


def ensure(database_url: str, organizations: int = 10_000, events: int = 5_000_000) -> dict:
    """The dataset of this size in `database_url` (a libpq URL), built unless it is there."""
    if organizations < 2 or events < organizations:
        raise ValueError("need at least 2 organizations and one event per organization")
    started = time.monotonic()
    now = datetime.now(timezone.utc).replace(microsecond=0)
    period_start, period_end = _period(now)
    built = False
    try:
        with psycopg.connect(database_url) as connection:
            ready = _built(connection, organizations, events, period_start)
    except psycopg.OperationalError:
        ready = False  # no such database yet
    if not ready:
        rebuild_database(database_url)
        with psycopg.connect(database_url, autocommit=True) as connection:
            _set_marker(connection, None)
        with psycopg.connect(database_url) as connection:
            _load(connection, organizations, events, now, period_start, period_end)
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")
            _set_marker(connection, _marker(organizations, events, period_start))
        built = True
    with psycopg.connect(database_url) as connection:
        sample = _sample(connection, organizations)
    return {"organizations": organizations, "events": events, "built": built,
            "seconds": round(time.monotonic() - started, 1), "period_start": period_start.isoformat(),
            "password": PASSWORD, "support_email": "support@bench.example",
            "owner_email": "owner-{id}@bench.example", "slugs": sample}


def _load(connection, organizations: int, events: int, now: datetime, period_start: datetime,
          period_end: datetime) -> None:
    run = connection.execute
    # A bulk load into an empty schema: the foreign keys hold by construction, and
    # checking them row by row would double the load's time.
    run("SET session_replication_role = replica")
    for code, name, unit, price in METERED:
        run("INSERT INTO products (code, name, unit, unit_price, kind, active) VALUES (%s, %s, %s, %s, 'metered',"
            " true)", (code, name, unit, price))
    for code, name, unit, price in RECURRING:
        run("INSERT INTO products (code, name, unit, unit_price, kind, active) VALUES (%s, %s, %s, %s, 'recurring',"
            " true)", (code, name, unit, price))
    run("INSERT INTO products (code, name, unit, unit_price, kind, active)"
        " VALUES ('portal.credit', 'Account credit', 'credit', 0, 'credit', false)")
    created = period_start.replace(year=period_start.year - 1)
    run("""INSERT INTO organizations (id, slug, name, billing_email, currency, cycle_anchor_day, created_at,
                                      stripe_balance_cents, payment_method)
           SELECT g, CASE WHEN g = 1 THEN %s ELSE 'org-' || lpad(g::text, 5, '0') END,
                  CASE WHEN g = 1 THEN 'Big Org' ELSE 'Organization ' || g END,
                  'billing-' || g || '@bench.example', 'usd', 1, %s, 0, 'visa •••• 4242'
           FROM generate_series(1, %s) g""", (LARGE_SLUG, created, organizations))
    password_hash = _password_hash()
    run("""INSERT INTO users (id, email, name, password_hash, is_support, created_at, session_version)
           SELECT g, 'owner-' || g || '@bench.example', 'Owner ' || g, %s, false, %s, 0
           FROM generate_series(1, %s) g""", (password_hash, created, organizations))
    run("""INSERT INTO users (id, email, name, password_hash, is_support, created_at, session_version)
           VALUES (%s, 'support@bench.example', 'Support', %s, true, %s, 0)""",
        (organizations + 1, password_hash, created))
    run("INSERT INTO memberships (user_id, organization_id, role) SELECT g, g, 'owner' FROM generate_series(1, %s) g",
        (organizations,))
    # Open invoices have the organization's id; two paid ones per organization follow.
    run("""INSERT INTO invoices (id, organization_id, period_start, period_end, status, currency, total_cents,
                                 change_seq, synced_seq, created_at, carried_to_balance_cents, payment_attempts)
           SELECT g, g, %s, %s, 'open', 'usd', 0, 1, 1, %s, 0, 0 FROM generate_series(1, %s) g""",
        (period_start, period_end, period_start, organizations))
    run("""INSERT INTO invoices (id, organization_id, period_start, period_end, status, currency, total_cents,
                                 change_seq, synced_seq, created_at, number, carried_to_balance_cents,
                                 payment_attempts, paid_at)
           SELECT %s + g, 1 + (g - 1) / 2, %s - (1 + (g - 1) %% 2) * interval '30 days',
                  %s - ((g - 1) %% 2) * interval '30 days', 'paid', 'usd', 1000 + g %% 5000, 1, 1, %s,
                  'BENCH-' || g, 0, 1, %s
           FROM generate_series(1, %s) g""",
        (organizations, period_start, period_start, created, period_start, 2 * organizations))
    # Usage: the large organization's share first, the rest spread over the others.
    seconds = max(60, int((now - period_start).total_seconds()) - 60)
    large = events // LARGE_SHARE
    run("""INSERT INTO usage_events (sender, event_id, organization_id, product_id, quantity, occurred_at, resource,
                                     received_at, invoice_id)
           SELECT 'bench', 'e' || g, o, 1 + (g %% 4), round((random() * 6000)::numeric, 3),
                  %s + (random() * %s) * interval '1 second', 'res-' || (g %% 5), %s, o
           FROM (SELECT g, CASE WHEN g <= %s THEN 1 ELSE 2 + (g %% (%s - 1)) END AS o
                 FROM generate_series(1, %s) g) AS spread""",
        (period_start, seconds, now, large, organizations, events))
    run("""INSERT INTO invoice_items (invoice_id, product_id, line_key, resource, description, quantity, unit_price,
                                      amount_cents, version, updated_at)
           SELECT e.invoice_id, p.id, p.code || '|' || e.resource || '|', e.resource,
                  p.name || ' (' || e.resource || ')', sum(e.quantity), p.unit_price,
                  round(sum(e.quantity) * p.unit_price), 1, %s
           FROM usage_events e JOIN products p ON p.id = e.product_id
           GROUP BY e.invoice_id, p.id, p.code, p.name, p.unit_price, e.resource""", (now,))
    run("""INSERT INTO service_attachments (id, organization_id, product_id, quantity, resource, attached_at)
           SELECT g / 10, g, (SELECT id FROM products WHERE code = 'ipv4.dedicated'), 1 + g %% 3, 'edge-ips', %s
           FROM generate_series(10, %s, 10) g""", (period_start, organizations))
    run("""INSERT INTO invoice_items (invoice_id, product_id, line_key, resource, description, quantity, unit_price,
                                      amount_cents, version, updated_at)
           SELECT s.organization_id, p.id, p.code || '|' || s.resource || '|svc:' || s.id, s.resource,
                  p.name || ' (' || s.resource || '), from ' || to_char(s.attached_at, 'YYYY-MM-DD HH24:MI')
                    || ' to end of cycle UTC', s.quantity, p.unit_price, round(s.quantity * p.unit_price), 1, %s
           FROM service_attachments s JOIN products p ON p.id = s.product_id""", (now,))
    run("""INSERT INTO invoice_items (invoice_id, product_id, line_key, resource, description, quantity, unit_price,
                                      amount_cents, version, updated_at)
           SELECT g, (SELECT id FROM products WHERE code = 'portal.credit'), 'portal.credit||credit:' || g, '',
                  'Credit: service interruption', 1, 0, -500, 1, %s
           FROM generate_series(50, %s, 50) g""", (now, organizations))
    run("""UPDATE invoices i SET total_cents = t.total
           FROM (SELECT invoice_id, sum(amount_cents) AS total FROM invoice_items GROUP BY invoice_id) t
           WHERE i.id = t.invoice_id""")
    run("""INSERT INTO sync_runs (invoice_id, trigger, started_at, finished_at, outcome, created, updated, deleted,
                                  unchanged, stripe_reads, stripe_writes)
           SELECT g, 'schedule', %s, %s, 'synced', 1, 0, 0, 0, 2, 1 FROM generate_series(1, %s) g""",
        (now, now, organizations))
    for table in ("organizations", "users", "invoices", "service_attachments"):
        run(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
    run("SET session_replication_role = DEFAULT")
    connection.commit()

"""Sync cost and speed against the Stripe emulator, with real RQ workers.

    .venv/bin/python bench/sync.py [--organizations 1000] [--items 20] [--big 10000] [--workers 4]

Needs PostgreSQL (BENCH_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/portal_bench_sync;
created if missing, schema rebuilt) and Redis (BENCH_REDIS_URL, default redis://127.0.0.1:6379/12;
flushed). Starts the emulator and `--workers` RQ workers (jobs.worker.PortalWorker), then:

1. first full sync of N organizations x M items (customers exist already);
2. 1% of items changed, one sweep: writes, reads, time, and what one write per changed
   line would have cost;
3. the same with --big organizations in the database (the extra ones are synced: their
   invoices have no unsynced changes, so the sweep must not touch them);
4. the request budget: STRIPE_MAX_REQUESTS_PER_SECOND=25 (Stripe's test-mode limit, reads
   and writes together) with the same workers, a change to --budget-invoices invoices; the
   achieved request rate against the emulator's request log.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import stripe
from redis import Redis
from rq import Queue

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rebuild_database  # noqa: E402
from stripe_emulator.process import start_emulator  # noqa: E402


def sql(url: str, statement: str, params=None, fetch: bool = False):
    with psycopg.connect(url) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if fetch else None


def prepare_database(url: str) -> None:
    rebuild_database(url)
    sql(url, "INSERT INTO products (code, name, unit, unit_price, kind, active) VALUES "
             "('machines.cpu', 'CPU', 'second', 0.0011, 'metered', true)")


def add_organizations(url: str, first: int, count: int, items: int, synced: bool,
                      customers: list[str] | None) -> None:
    """Organizations with an open invoice of `items` priced items each, in bulk SQL."""
    now = datetime.now(timezone.utc)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    numbers = "generate_series(CAST(%s AS int), CAST(%s AS int)) AS n"
    with psycopg.connect(url) as connection:
        connection.execute(
            "INSERT INTO organizations (slug, name, billing_email, currency, cycle_anchor_day, stripe_customer_id,"
            " created_at) SELECT 'org-' || n, 'Org ' || n, 'org' || n || '@bench.example', 'usd', 1,"
            f" (CAST(%s AS text[]))[n - CAST(%s AS int) + 1], now() FROM {numbers}",
            (customers or [], first, first, first + count - 1))
        seq = 1
        connection.execute(
            "INSERT INTO invoices (organization_id, period_start, period_end, status, currency, total_cents,"
            " change_seq, synced_seq, created_at) SELECT id, %s, %s, 'open', 'usd', 0, %s, %s,"
            f" now() FROM organizations WHERE slug IN (SELECT 'org-' || n FROM {numbers})",
            (start, end, seq, seq if synced else 0, first, first + count - 1))
        connection.execute(
            "INSERT INTO invoice_items (invoice_id, product_id, line_key, resource, description, quantity, unit_price,"
            " amount_cents, version, updated_at) SELECT i.id, 1, 'machines.cpu|vm-' || r || '|', 'vm-' || r,"
            " 'CPU (vm-' || r || ')', 100000 * r, 0.0011, round(110 * r), 2, now()"
            " FROM invoices i JOIN organizations o ON o.id = i.organization_id,"
            " generate_series(1, CAST(%s AS int)) AS r"
            f" WHERE o.slug IN (SELECT 'org-' || n FROM {numbers})",
            (items, first, first + count - 1))
        connection.execute(
            "UPDATE invoices SET total_cents = s.total FROM (SELECT invoice_id, sum(amount_cents) AS total"
            " FROM invoice_items GROUP BY invoice_id) s WHERE s.invoice_id = invoices.id")


def create_customers(emulator, count: int) -> list[str]:
    client = stripe.StripeClient(emulator.api_key, base_addresses={"api": emulator.url}, max_network_retries=2)

    def one(n: int) -> str:
        return client.v1.customers.create(params={"name": f"Org {n}", "email": f"org{n}@bench.example"}).id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(1, count + 1)))


def change_items(url: str, count: int, organizations: int, seed: int) -> int:
    """Add one unit to `count` random items of the first `organizations` organizations'
    invoices through the portal's own pricing; returns the number of invoices changed."""
    os.environ.update(DATABASE_URL=url, SECRET_KEY="bench")
    from decimal import Decimal

    from sqlalchemy import select

    from portal import create_app
    from portal.billing.pricing import ItemDelta, add_quantities
    from portal.extensions import db
    from portal.models import Invoice, InvoiceItem, Organization, Product

    app = create_app()
    with app.app_context():
        ids = db.session.scalars(
            select(InvoiceItem.id).join(Invoice).join(Organization)
            .where(Organization.id <= organizations).order_by(InvoiceItem.id)).all()
        chosen = random.Random(seed).sample(ids, count)
        product = db.session.scalar(select(Product))
        items = db.session.scalars(select(InvoiceItem).where(InvoiceItem.id.in_(chosen))).all()
        add_quantities([ItemDelta(i.invoice_id, product, i.resource, Decimal(1_000_000)) for i in items])
        db.session.commit()
        return len({item.invoice_id for item in items})


class Workers:
    def __init__(self, count: int, env: dict):
        self.processes = [
            subprocess.Popen([str(ROOT / ".venv/bin/rq"), "worker", "--worker-class",
                              os.environ.get("BENCH_WORKER_CLASS", "jobs.worker.PortalWorker"),
                              "sync", "default", "--url", env["REDIS_URL"], "--quiet"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(count)
        ]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait()


def sweep_and_wait(url: str, redis: Redis, env: dict) -> float:
    """Run the periodic sweep (the real job, in a worker) and wait until every sync it
    queued has recorded its SyncRun; returns the wall time."""
    mark = last_run_id(url)
    started = time.perf_counter()
    sweep = Queue("default", connection=redis).enqueue("jobs.sync.sweep_unsynced")
    while sweep.get_status(refresh=True) != "finished":
        if sweep.get_status() == "failed":
            raise SystemExit("the sweep job failed")
        time.sleep(0.01)
    expected = sweep.return_value()["enqueued"]
    while sql(url, "SELECT count(*) FROM sync_runs WHERE id > %s AND finished_at IS NOT NULL", (mark,),
              fetch=True)[0][0] < expected:
        time.sleep(0.02)
    return time.perf_counter() - started


def runs_since(url: str, run_id: int):
    return sql(url, "SELECT invoice_id, outcome, stripe_reads, stripe_writes, created, updated, deleted"
                    " FROM sync_runs WHERE id > %s", (run_id,), fetch=True)


def last_run_id(url: str) -> int:
    return sql(url, "SELECT coalesce(max(id), 0) FROM sync_runs", fetch=True)[0][0]


def check_totals(url: str, emulator) -> int:
    """Compare every synced invoice's total with Stripe's; returns the mismatches."""
    client = stripe.StripeClient(emulator.api_key, base_addresses={"api": emulator.url})
    rows = sql(url, "SELECT stripe_invoice_id, total_cents FROM invoices WHERE stripe_invoice_id IS NOT NULL",
               fetch=True)

    def mismatch(row) -> bool:
        return client.v1.invoices.retrieve(row[0]).total != row[1]

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(mismatch, rows))


def report_sweep(label: str, url: str, mark: int, seconds: float, changed_items: int, changed_invoices: int):
    runs = runs_since(url, mark)
    writes = sum(r[3] for r in runs)
    reads = sum(r[2] for r in runs)
    bad = [r for r in runs if r[1] not in ("synced", "unchanged")]
    print(f"{label}: {len(runs)} invoices synced in {seconds:.2f} s; Stripe writes {writes} "
          f"(max {max((r[3] for r in runs), default=0)} per invoice, {writes / max(changed_invoices, 1):.2f} per "
          f"changed invoice), reads {reads} (max {max((r[2] for r in runs), default=0)} per invoice); one write per "
          f"changed line would have been {changed_items} writes" + (f"; NOT OK: {bad[:3]}" if bad else ""))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organizations", type=int, default=1000)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget-invoices", type=int, default=300)
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/portal_bench_sync")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    prepare_database(url)
    emulator = start_emulator()
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "SECRET_KEY": "bench",
           "STRIPE_API_KEY": emulator.api_key, "STRIPE_API_BASE": emulator.url,
           "STRIPE_MAX_REQUESTS_PER_SECOND": "100000", "SYNC_INTERVAL_SECONDS": "3600"}
    workers = Workers(args.workers, env)
    try:
        n, m = args.organizations, args.items
        print(f"setup: {n} organizations x {m} items; {args.workers} workers; PostgreSQL; emulator at {emulator.url}")
        customers = create_customers(emulator, n)
        add_organizations(url, 1, n, m, synced=False, customers=customers)
        time.sleep(1.0)  # workers up

        mark = last_run_id(url)
        seconds = sweep_and_wait(url, redis, env)
        runs = report_sweep("first full sync", url, mark, seconds, n * m, n)
        print(f"  first sync: max writes per invoice {max(r[3] for r in runs)} (target <= 2), max reads per invoice"
              f" {max(r[2] for r in runs)} (target <= 1 + ceil({m}/100) = {1 + math.ceil(m / 100)})")

        changed_items = max(1, n * m // 100)
        changed = change_items(url, changed_items, n, seed=1)
        mark = last_run_id(url)
        small_seconds = sweep_and_wait(url, redis, env)
        report_sweep(f"sweep, {n} organizations, {changed_items} items changed", url, mark, small_seconds,
                     changed_items, changed)

        mark = last_run_id(url)
        idle_seconds = sweep_and_wait(url, redis, env)
        idle = runs_since(url, mark)
        print(f"sweep with nothing changed: {len(idle)} syncs, {sum(r[3] for r in idle)} writes, {idle_seconds:.2f} s")

        add_organizations(url, n + 1, args.big - n, m, synced=True, customers=None)
        changed = change_items(url, changed_items, n, seed=2)
        mark = last_run_id(url)
        big_seconds = sweep_and_wait(url, redis, env)
        report_sweep(f"sweep, {args.big} organizations, {changed_items} items changed", url, mark, big_seconds,
                     changed_items, changed)
        growth = big_seconds / small_seconds - 1
        print(f"  sweep time growth from {n} to {args.big} organizations: {growth:+.0%} (target <= +50%)")
        print(f"  invoices whose Stripe total differs from the portal's: {check_totals(url, emulator)}")
    finally:
        workers.stop()

    budget = 25
    env["STRIPE_MAX_REQUESTS_PER_SECOND"] = str(budget)
    workers = Workers(args.workers, env)
    try:
        time.sleep(1.0)
        change_items_per_invoice(url, args.budget_invoices)
        log_start = len(emulator.control.requests_log())
        seconds = sweep_and_wait(url, redis, env)
        stamps = sorted(r["time"] for r in emulator.control.requests_log()[log_start:])
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        window_max = max(sum(1 for t in stamps[i:] if t - s < 1.0) for i, s in enumerate(stamps))
        print(f"request budget {budget}/s with {args.workers} workers: {len(stamps)} requests in {seconds:.1f} s, "
              f"achieved {rate:.1f} requests/s ({rate / budget:.0%} of budget, target >= 90%); most requests in "
              f"any one-second window: {window_max} (must be <= {budget})")
    finally:
        workers.stop()
        emulator.stop()


def change_items_per_invoice(url: str, invoices: int) -> None:
    """One changed item on each of the first `invoices` invoices with a Stripe draft."""
    rows = sql(url, "SELECT i.id FROM invoices i WHERE i.stripe_invoice_id IS NOT NULL ORDER BY i.id LIMIT %s",
               (invoices,), fetch=True)
    ids = [row[0] for row in rows]
    os.environ.update(DATABASE_URL=url, SECRET_KEY="bench")
    from decimal import Decimal

    from sqlalchemy import select

    from portal import create_app
    from portal.billing.pricing import ItemDelta, add_quantities
    from portal.extensions import db
    from portal.models import InvoiceItem, Product

    app = create_app()
    with app.app_context():
        product = db.session.scalar(select(Product))
        first_items = db.session.scalars(
            select(InvoiceItem).where(InvoiceItem.invoice_id.in_(ids), InvoiceItem.resource == "vm-1")).all()
        add_quantities([ItemDelta(i.invoice_id, product, i.resource, Decimal(1_000_000)) for i in first_items])
        db.session.commit()


if __name__ == "__main__":
    main()

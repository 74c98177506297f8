"""Usage ingestion throughput: events/s through the HTTP API vs a raw PostgreSQL COPY.

    .venv/bin/python bench/ingest.py [--events 200000] [--clients 4] [--web-workers 3]

Needs PostgreSQL (BENCH_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/portal_bench;
the database is created if missing and its schema rebuilt) and Redis (BENCH_REDIS_URL, default
redis://127.0.0.1:6379/14; the web server's health check wants it). Starts gunicorn on the
bench database, loads the events in batches of 1,000 through POST /api/v1/usage (dedupe and
pricing included), then times a raw COPY of the same rows into usage_events, and prints both
rates and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rebuild_database, start_web  # noqa: E402

TOKEN = "bench:bench-token"
PRODUCTS = [("machines.shared-cpu-1x", "0.0011"), ("machines.performance-2x", "0.0172"),
            ("volumes.gb", "0.0208"), ("egress.gb", "2")]


def prepare_database(url: str, organizations: int) -> None:
    rebuild_database(url)
    with psycopg.connect(url) as connection:
        for code, price in PRODUCTS:
            connection.execute(
                "INSERT INTO products (code, name, unit, unit_price, kind, active) VALUES (%s, %s, 'unit', %s,"
                " 'metered', true)", (code, code, price))
        now = datetime.now(timezone.utc)
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + timedelta(days=32)).replace(day=1)
        for n in range(organizations):
            org_id = connection.execute(
                "INSERT INTO organizations (slug, name, billing_email, currency, cycle_anchor_day, created_at)"
                " VALUES (%s, %s, %s, 'usd', 1, now()) RETURNING id", (f"org-{n}", f"Org {n}", f"o{n}@x.example"),
            ).fetchone()[0]
            connection.execute(
                "INSERT INTO invoices (organization_id, period_start, period_end, status, currency, total_cents,"
                " change_seq, synced_seq, created_at) VALUES (%s, %s, %s, 'open', 'usd', 0, 0, 0, now())",
                (org_id, start, end))


def make_batches(count: int, organizations: int, resources: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = int((now - start).total_seconds()) - 60
    events = []
    for i in range(count):
        events.append({
            "id": f"bench-{i}",
            "organization": f"org-{rng.randrange(organizations)}",
            "product": PRODUCTS[rng.randrange(len(PRODUCTS))][0],
            "quantity": str(rng.randint(1, 600_000) / 100),
            "occurred_at": (start + timedelta(seconds=rng.randrange(max(span, 1)))).isoformat(),
            "resource": f"res-{rng.randrange(resources)}",
        })
    return [json.dumps({"events": events[i:i + 1000]}).encode() for i in range(0, count, 1000)]


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each of these processes (Linux /proc; empty elsewhere)."""
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        seconds[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings; a process that started in between counts whole."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def _processes(name: str, parent: int | None = None) -> list[int]:
    """Pids of processes called `name` (and, with `parent`, that process and its children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if parent is not None:
            if int(entry.name) == parent or int(rest[1]) == parent:
                pids.append(int(entry.name))
        elif comm == name or comm.startswith(name + ":"):
            pids.append(int(entry.name))
    return pids


def load_through_api(base: str, batches: list[bytes], clients: int) -> float:
    pending = list(reversed(batches))
    lock = threading.Lock()
    errors = []

    def client():
        session = requests.Session()
        headers = {"Authorization": "Bearer " + TOKEN.split(":", 1)[1], "Content-Type": "application/json"}
        while True:
            with lock:
                if not pending:
                    return
                body = pending.pop()
            response = session.post(base + "/api/v1/usage", data=body, headers=headers, timeout=120)
            if response.status_code != 200:
                errors.append(response.text[:300])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} batches failed, e.g. {errors[0]}")
    return elapsed


def copy_raw(url: str) -> tuple[int, float]:
    """COPY the rows the API stored back into usage_events: the database's own limit."""
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT sender, event_id, organization_id, product_id, quantity, occurred_at, resource, received_at,"
            " invoice_id FROM usage_events").fetchall()
        connection.execute("TRUNCATE usage_events")
        connection.commit()
        started = time.perf_counter()
        with connection.cursor() as cursor, cursor.copy(
            "COPY usage_events (sender, event_id, organization_id, product_id, quantity, occurred_at, resource,"
            " received_at, invoice_id) FROM STDIN"
        ) as copy:
            for row in rows:
                copy.write_row(row)
        connection.commit()
        return len(rows), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--organizations", type=int, default=200)
    parser.add_argument("--resources", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--web-workers", type=int, default=2)
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/portal_bench")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

    prepare_database(url, args.organizations)
    batches = make_batches(args.events, args.organizations, args.resources, seed=1)
    process, base = start_web({"DATABASE_URL": url, "REDIS_URL": redis_url, "PORTAL_API_TOKENS": TOKEN},
                              args.web_workers)
    try:
        web_before = _cpu_seconds(_processes("gunicorn", parent=process.pid))
        db_before, client_before = _cpu_seconds(_processes("postgres")), time.process_time()
        api_seconds = load_through_api(base, batches, args.clients)
        client_cpu = time.process_time() - client_before
        web_cpu = _cpu_used(web_before, _cpu_seconds(_processes("gunicorn", parent=process.pid)))
        db_cpu = _cpu_used(db_before, _cpu_seconds(_processes("postgres")))
    finally:
        process.terminate()
        process.wait()
    with psycopg.connect(url) as connection:
        stored = connection.execute("SELECT count(*) FROM usage_events").fetchone()[0]
        items = connection.execute("SELECT count(*) FROM invoice_items").fetchone()[0]
        totals_ok = connection.execute(
            "SELECT bool_and(i.total_cents = coalesce(s.sum, 0)) FROM invoices i LEFT JOIN"
            " (SELECT invoice_id, sum(amount_cents) AS sum FROM invoice_items GROUP BY invoice_id) s"
            " ON s.invoice_id = i.id").fetchone()[0]
    if stored != args.events or not totals_ok:
        raise SystemExit(f"stored {stored} of {args.events} events; totals consistent: {totals_ok}")
    copied, copy_seconds = copy_raw(url)
    api_rate, copy_rate = args.events / api_seconds, copied / copy_seconds
    print(f"events: {args.events} in batches of 1,000 from {args.clients} clients; {args.organizations} "
          f"organizations, {items} invoice items; gunicorn workers: {args.web_workers}")
    print(f"API (validate + dedupe + store + price): {api_rate:,.0f} events/s ({api_seconds:.2f} s)")
    print(f"raw COPY into usage_events:              {copy_rate:,.0f} events/s ({copy_seconds:.2f} s)")
    per_batch = 1000 * 1000 / args.events
    print(f"CPU per 1,000 events during the API load: web {web_cpu * per_batch:.0f} ms, PostgreSQL (every"
          f" backend on the machine) {db_cpu * per_batch:.0f} ms, load generator {client_cpu * per_batch:.0f} ms;"
          f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"ratio API / COPY: {api_rate / copy_rate:.2f} (target >= 0.33); target 20,000 events/s: "
          f"{'met' if api_rate >= 20_000 else 'NOT met'}")


if __name__ == "__main__":
    main()

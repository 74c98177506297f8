"""The support console under a large dataset: p50/p95 of an organization's support
page (ordinary ones in rotation, and the large one apart) and of the search, beside
`/healthz` in the same run; and the Stripe-event lookup alone in SQL, by the indexed
column against the old scan of every payload.

    .venv/bin/python bench/support.py            # 100 orgs / 20k events, then 1,000 / 200k
    .venv/bin/python bench/support.py --full     # 1,000 then 10,000 orgs, 5M usage events each
    .venv/bin/python bench/support.py --sizes 1000:200000 --requests 300 --stripe-events-per-org 20

BENCH_FULL=1 is the same as --full. Needs PostgreSQL (BENCH_DATABASE_URL, default
postgresql://postgres@127.0.0.1:5432/portal_bench_pages: its schema is rebuilt when the dataset
there is not the one asked for, see bench/bigdata.py) and Redis (BENCH_REDIS_URL,
default redis://127.0.0.1:6379/4). On top of that dataset every organization gets a
Stripe customer, its open invoice a Stripe draft, and STRIPE_EVENTS_PER_ORG stored
Stripe events (the large organization 5% of them all), named by organization and
invoice as the webhook route stores them. gunicorn serves the portal (2 workers);
one client signed in as support staff asks for each URL in turn, so the figures are
latencies, not throughput.

Target: the pages' p95 within 4x /healthz's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bigdata import ensure  # noqa: E402
from bench.common import percentiles, sign_in, start_web  # noqa: E402

QUICK = ((100, 20_000), (1_000, 200_000))
FULL = ((1_000, 5_000_000), (10_000, 5_000_000))
STRIPE_EVENTS_PER_ORG = 20
LARGE_SHARE = 20  # the large organization's share of the Stripe events: 1/LARGE_SHARE


def _timed(session: requests.Session, url: str) -> float:
    started = time.perf_counter()
    response = session.get(url, allow_redirects=False)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"GET {url} answered {response.status_code}")
    return elapsed


def ensure_stripe_events(database_url: str, organizations: int, per_org: int) -> dict:
    """Stripe customers, drafts and stored events on the dataset, unless already there."""
    started = time.monotonic()
    with psycopg.connect(database_url) as connection:
        run = connection.execute
        if run("SELECT to_regclass('bench_support_events') IS NOT NULL").fetchone()[0]:
            row = run("SELECT organizations, per_org FROM bench_support_events").fetchone()
            if row == (organizations, per_org):
                return {"built": False, "seconds": round(time.monotonic() - started, 1)}
            run("DROP TABLE bench_support_events")
        run("TRUNCATE stripe_events")
        run("UPDATE organizations SET stripe_customer_id = 'cus_bench_' || id")
        run("UPDATE invoices SET stripe_invoice_id = 'in_bench_' || id WHERE status = 'open'")
        total = organizations * per_org
        large = total // LARGE_SHARE
        # Shaped as Stripe sends them (an invoice.updated event with its invoice inside),
        # and named by organization and invoice as store_event names them.
        run("""INSERT INTO stripe_events (stripe_event_id, type, stripe_created, payload, received_at, processed_at,
                                          attempts, organization_id, invoice_id)
               SELECT 'evt_bench_' || g, 'invoice.updated', 1700000000 + g,
                      json_build_object('id', 'evt_bench_' || g, 'object', 'event', 'type', 'invoice.updated',
                                        'created', 1700000000 + g,
                                        'data', json_build_object('object', json_build_object(
                                            'id', 'in_bench_' || o, 'object', 'invoice',
                                            'customer', 'cus_bench_' || o, 'status', 'draft',
                                            'total', g %% 100000, 'currency', 'usd',
                                            'description', 'Usage of organization ' || o,
                                            'metadata', json_build_object('portal_invoice_id', o::text,
                                                                          'portal_organization_id', o::text)))),
                      now() - (g %% 100000) * interval '1 second', now(), 1, o, o
               FROM (SELECT g, CASE WHEN g <= %s THEN 1 ELSE 2 + (g %% (%s - 1)) END AS o
                     FROM generate_series(1, %s) g) AS spread""", (large, organizations, total))
        run("CREATE TABLE bench_support_events (organizations integer, per_org integer)")
        run("INSERT INTO bench_support_events VALUES (%s, %s)", (organizations, per_org))
        connection.commit()
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE stripe_events")
        connection.execute("VACUUM ANALYZE organizations")
        connection.execute("VACUUM ANALYZE invoices")
    return {"built": True, "seconds": round(time.monotonic() - started, 1)}


def lookup_in_sql(database_url: str, samples: int = 20) -> dict:
    """The large organization's newest 25 events: by the indexed column, and as the
    page found them before (the customer id inside every stored payload)."""
    queries = {
        "events_by_index": "SELECT id FROM stripe_events WHERE organization_id = 1"
                           " ORDER BY received_at DESC, id DESC LIMIT 25",
        "events_by_payload_scan": "SELECT id FROM stripe_events WHERE (payload -> 'data' -> 'object' ->> 'customer')"
                                  " = 'cus_bench_1' ORDER BY received_at DESC, id DESC LIMIT 25",
    }
    figures = {}
    with psycopg.connect(database_url) as connection:
        for name, sql in queries.items():
            times = []
            for _ in range(samples):
                started = time.perf_counter()
                connection.execute(sql).fetchall()
                times.append(time.perf_counter() - started)
            figures[name] = percentiles(times)
    return figures


def measure(base: str, dataset: dict, requests_per_url: int) -> dict:
    session = sign_in(base, dataset["support_email"], dataset["password"])
    typical, large = dataset["slugs"]["typical"], dataset["slugs"]["large"]
    terms = [slug[-3:] for slug in typical] + ["Organization 1", "big", "no-such-organization"]
    kinds = {
        "healthz": lambda n: base + "/healthz",
        "search": lambda n: f"{base}/admin/?q={terms[n % len(terms)]}",
        "organization_page": lambda n: f"{base}/admin/orgs/{typical[n % len(typical)]}",
        "organization_page_large_org": lambda n: f"{base}/admin/orgs/{large}",
    }
    for n in range(20):  # warm the workers, their pools and PostgreSQL's cache
        for kind in kinds.values():
            _timed(session, kind(n))
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    for n in range(requests_per_url):
        for name, kind in kinds.items():
            samples[name].append(_timed(session, kind(n)))
    return {name: percentiles(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", default=os.environ.get("BENCH_FULL") == "1",
                        help="1,000 and 10,000 organizations with 5M usage events")
    parser.add_argument("--sizes", help="organizations:events pairs, comma-separated (overrides --full)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per URL and size")
    parser.add_argument("--stripe-events-per-org", type=int, default=STRIPE_EVENTS_PER_ORG)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sizes = FULL if args.full else QUICK
    if args.sizes:
        sizes = tuple(tuple(int(part) for part in pair.split(":")) for pair in args.sizes.split(","))
    database = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/portal_bench_pages")
    redis = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/4")
    results = []
    for organizations, events in sizes:
        dataset = ensure(database, organizations, events)
        stripe = ensure_stripe_events(database, organizations, args.stripe_events_per_org)
        print(f"\n{organizations:,} organizations, {events:,} usage events, "
              f"{organizations * args.stripe_events_per_org:,} Stripe events: dataset "
              f"{'built' if dataset['built'] else 'reused'} in {dataset['seconds']} s, Stripe events "
              f"{'built' if stripe['built'] else 'reused'} in {stripe['seconds']} s")
        process, base = start_web({"DATABASE_URL": database, "REDIS_URL": redis,
                                   "SESSION_COOKIE_SECURE": "0"}, workers=2)  # plain http here
        try:
            figures = measure(base, dataset, args.requests)
        finally:
            process.terminate()
            process.wait(timeout=15)
        figures.update(lookup_in_sql(database))
        for name, figure in figures.items():
            print(f"  {name:28} p50 {figure['p50_ms']:9.2f} ms   p95 {figure['p95_ms']:9.2f} ms   (n={figure['n']})")
        ratios = {name: round(figures[name]["p95_ms"] / figures["healthz"]["p95_ms"], 2)
                  for name in ("search", "organization_page", "organization_page_large_org")}
        for name, ratio in ratios.items():
            print(f"  {name} p95 / healthz p95 = {ratio:.2f} (target <= 4)")
        results.append({"organizations": organizations, "events": events,
                        "stripe_events": organizations * args.stripe_events_per_org, "figures": figures,
                        "p95_vs_healthz": ratios})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

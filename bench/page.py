"""The customer billing page under a large dataset: p50/p95 of the page, of its live
refresh (the open invoice's partial, rendered in full) and the time to first byte of
the usage CSV export (when the portal has that route), beside `/healthz` in the same
run, at two sizes of the same density.

    .venv/bin/python bench/page.py            # 100 orgs / 20k events, then 1,000 / 200k
    .venv/bin/python bench/page.py --full     # 1,000 orgs / 500k events, then 10,000 / 5M
    .venv/bin/python bench/page.py --sizes 1000:200000,10000:2000000 --requests 300

BENCH_FULL=1 is the same as --full. Needs PostgreSQL (BENCH_DATABASE_URL, default
postgresql://postgres@127.0.0.1:5432/portal_bench_pages; its schema is rebuilt when the dataset
there is not the one asked for, see bench/bigdata.py) and Redis (BENCH_REDIS_URL,
default redis://127.0.0.1:6379/1). gunicorn serves the portal (2 workers); one
client signed in as support staff asks for each URL in turn (ordinary organizations
in rotation, and the large one apart), so the figures are latencies, not throughput.

Targets: the page's p95 within 4x /healthz's, and within 20% between the two sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bigdata import ensure  # noqa: E402
from bench.common import percentiles, sign_in, start_web  # noqa: E402

QUICK = ((100, 20_000), (1_000, 200_000))
FULL = ((1_000, 500_000), (10_000, 5_000_000))


def _timed(session: requests.Session, url: str, headers: dict | None = None, first_byte: bool = False) -> float:
    started = time.perf_counter()
    response = session.get(url, headers=headers, stream=True, allow_redirects=False)
    if first_byte:
        next(response.iter_content(chunk_size=1), b"")
    else:
        response.content  # noqa: B018  (read the whole body)
    elapsed = time.perf_counter() - started
    status = response.status_code
    response.close()
    if status != 200:
        raise SystemExit(f"GET {url} answered {status}")
    return elapsed


def export_path() -> str | None:
    """The usage-CSV export's URL pattern (`{slug}`, and `{invoice_id}` when the route
    names the invoice), if the portal has the route."""
    os.environ.setdefault("SECRET_KEY", "bench")
    from portal import create_app

    app = create_app()
    for rule in app.url_map.iter_rules():
        if (rule.endpoint.startswith("customer.") and "GET" in rule.methods and "usage" in rule.rule
                and rule.rule.endswith(".csv") and set(rule.arguments) <= {"slug", "invoice_id"}):
            return re.sub(r"<(?:[a-z]+:)?(slug|invoice_id)>", r"{\1}", rule.rule)
    return None


def measure(base: str, dataset: dict, requests_per_url: int, export: str | None) -> dict:
    session = sign_in(base, dataset["support_email"], dataset["password"])
    typical, large = dataset["slugs"]["typical"], dataset["slugs"]["large"]
    htmx = {"HX-Request": "true"}
    kinds = {
        "healthz": lambda n: (base + "/healthz", None, False),
        "page": lambda n: (f"{base}/orgs/{typical[n % len(typical)]}/billing", None, False),
        "refresh": lambda n: (f"{base}/orgs/{typical[n % len(typical)]}/billing/current", htmx, False),
        "page_large_org": lambda n: (f"{base}/orgs/{large}/billing", None, False),
        "refresh_large_org": lambda n: (f"{base}/orgs/{large}/billing/current", htmx, False),
    }
    invoices = dataset["slugs"]["open_invoice_ids"]

    def export_url(slug: str) -> str:
        return base + export.format(slug=slug, invoice_id=invoices[slug])

    if export:
        kinds["export_ttfb"] = lambda n: (export_url(typical[n % len(typical)]), None, True)
        kinds["export_ttfb_large_org"] = lambda n: (export_url(large), None, True)
    for n in range(20):  # warm the workers, their pools and PostgreSQL's cache
        for kind in kinds.values():
            _timed(session, *kind(n))
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    for n in range(requests_per_url):
        for name, kind in kinds.items():
            samples[name].append(_timed(session, *kind(n)))
    return {name: percentiles(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", default=os.environ.get("BENCH_FULL") == "1",
                        help="1,000 and 10,000 organizations with 500k and 5M events")
    parser.add_argument("--sizes", help="organizations:events pairs, comma-separated (overrides --full)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per URL and size")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sizes = FULL if args.full else QUICK
    if args.sizes:
        sizes = tuple(tuple(int(part) for part in pair.split(":")) for pair in args.sizes.split(","))
    database = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/portal_bench_pages")
    redis = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    export = export_path()
    print("usage CSV export:", export or "no such route in this portal (not measured)")
    results = []
    for organizations, events in sizes:
        dataset = ensure(database, organizations, events)
        print(f"\n{organizations:,} organizations, {events:,} events: dataset "
              f"{'built' if dataset['built'] else 'reused'} in {dataset['seconds']} s")
        process, base = start_web({"DATABASE_URL": database, "REDIS_URL": redis,
                                   "SESSION_COOKIE_SECURE": "0"}, workers=2)  # plain http here
        try:
            figures = measure(base, dataset, args.requests, export)
        finally:
            process.terminate()
            process.wait(timeout=15)
        for name, figure in figures.items():
            print(f"  {name:24} p50 {figure['p50_ms']:8.2f} ms   p95 {figure['p95_ms']:8.2f} ms   (n={figure['n']})")
        ratio = figures["page"]["p95_ms"] / figures["healthz"]["p95_ms"]
        print(f"  page p95 / healthz p95 = {ratio:.2f} (target <= 4)")
        results.append({"organizations": organizations, "events": events, "figures": figures,
                        "page_vs_healthz_p95": round(ratio, 2)})
    if len(results) >= 2:
        small, big = results[0]["figures"], results[-1]["figures"]
        for name in ("page", "refresh"):
            growth = big[name]["p95_ms"] / small[name]["p95_ms"] - 1
            # The machine's load moves every figure of a run together: /healthz in the
            # same run is the yardstick that takes it out.
            relative = (big[name]["p95_ms"] / big["healthz"]["p95_ms"]) / (
                small[name]["p95_ms"] / small["healthz"]["p95_ms"]) - 1
            print(f"{name} p95 from {results[0]['organizations']:,} to {results[-1]['organizations']:,} "
                  f"organizations: {growth:+.0%}; relative to /healthz: {relative:+.0%} (target within ±20%)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

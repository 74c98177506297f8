"""Webhook acknowledgement latency beside /healthz latency, on one server in one run.

    .venv/bin/python bench/webhooks.py [--rate 50] [--seconds 10]

Needs PostgreSQL (BENCH_DATABASE_URL, default postgresql://postgres@127.0.0.1:5432/portal_bench_webhooks;
created if missing, schema rebuilt) and Redis (BENCH_REDIS_URL, default redis://127.0.0.1:6379/11;
flushed). Starts gunicorn as the run command does (2 workers x 4 threads) and no RQ worker
(events are stored and queued, not processed). A load generator on loopback sends, at a
steady rate each, signed `invoice.paid` deliveries (each a new event id) and GET /healthz,
open loop (a request's send time is fixed by the schedule, not by the previous answer), and
prints p50/p95/p99 of both and the p95 ratio (target: webhook p95 within 3x of /healthz p95).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import rebuild_database, start_web  # noqa: E402

SECRET = "whsec_bench"


def signed_delivery(n: int) -> tuple[bytes, str]:
    body = json.dumps({"id": f"evt_bench_{n}_{time.time_ns()}", "object": "event", "type": "invoice.paid",
                       "created": int(time.time()), "livemode": False, "api_version": "2026-10-28.endive",
                       "data": {"object": {"object": "invoice", "id": f"in_bench_{n}", "status": "paid",
                                           "metadata": {}}}}).encode()
    timestamp = int(time.time())
    signature = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return body, f"t={timestamp},v1={signature}"


def load(port: int, kind: str, rate: float, seconds: float, results: list[float], errors: list[str]) -> None:
    """Send `rate` requests per second for `seconds`, on schedule, over one keep-alive
    connection per in-flight request slot."""
    interval = 1.0 / rate
    start = time.perf_counter() + 0.5
    count = int(rate * seconds)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for n in range(count):
        due = start + n * interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if kind == "webhook":
            body, signature = signed_delivery(n)
            headers = {"Content-Type": "application/json", "Stripe-Signature": signature}
            method, path = "POST", "/webhooks/stripe"
        else:
            body, headers, method, path = None, {}, "GET", "/healthz"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"{kind} {response.status}")
        except (OSError, http.client.HTTPException) as error:
            errors.append(f"{kind} {error!r}")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        # From the scheduled send time: waiting behind a slow answer counts too.
        results.append(time.perf_counter() - due)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second of each kind")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=2, help="load generator threads per kind")
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/portal_bench_webhooks")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
    Redis.from_url(redis_url).flushdb()
    rebuild_database(url)
    # As the run command serves it: 2 workers x 4 threads.
    server, base = start_web({"DATABASE_URL": url, "REDIS_URL": redis_url, "STRIPE_WEBHOOK_SECRET": SECRET},
                             workers=2, threads=4)
    port = int(base.rsplit(":", 1)[1])
    try:
        webhook, health, errors = [], [], []
        per_thread = args.rate / args.connections
        threads = [threading.Thread(target=load, args=(port, kind, per_thread, args.seconds, out, errors))
                   for kind, out in (("webhook", webhook), ("healthz", health)) for _ in range(args.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.terminate()
        server.wait()
    with psycopg.connect(url) as connection:
        stored = connection.execute("SELECT count(*) FROM stripe_events").fetchone()[0]
    queued = Redis.from_url(redis_url).llen("rq:queue:webhooks")
    print(f"{args.rate:.0f}/s webhooks + {args.rate:.0f}/s /healthz for {args.seconds:.0f} s; gunicorn 2x4; "
          f"no worker running; {stored} events stored, {queued} queued; errors: {len(errors)}"
          + (f" e.g. {errors[0]}" if errors else ""))
    for label, values in (("webhook ack", webhook), ("/healthz   ", health)):
        print(f"{label}: p50 {percentile(values, 50):.1f} ms  p95 {percentile(values, 95):.1f} ms  "
              f"p99 {percentile(values, 99):.1f} ms  ({len(values)} requests)")
    ratio = percentile(webhook, 95) / percentile(health, 95)
    print(f"p95 ratio webhook / healthz: {ratio:.2f} (target <= 3.00): {'met' if ratio <= 3 else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())

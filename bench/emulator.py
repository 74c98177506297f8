"""Benchmark the Stripe emulator: invoice-item creation throughput and CPU cost.

Starts an emulator subprocess (or uses ``--url``), then for each client count (default
1 and 4) runs that many client *processes*, each with the real ``stripe`` library,
creating invoice items on draft invoices (a fresh draft every 240 items, as the 250
cap requires) for ``--duration`` seconds. Reports items/second, client-side latency
percentiles and the emulator process's CPU time per request (from
``GET /_emulator/stats``, i.e. ``os.times()`` inside the emulator).

    .venv/bin/python bench/emulator.py                 # ~2 s per phase
    .venv/bin/python bench/emulator.py --long          # 15 s per phase
    .venv/bin/python bench/emulator.py --clients 1 2 8 --duration 5 --webhooks
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import stripe  # noqa: E402

from stripe_emulator.control import EmulatorControl  # noqa: E402
from stripe_emulator.process import start_emulator  # noqa: E402

ITEMS_PER_INVOICE = 240


def _client_proc(url: str, api_key: str, duration: float, start_at: float, out: mp.Queue) -> None:
    client = stripe.StripeClient(api_key, base_addresses={"api": url}, max_network_retries=0)
    cus = client.v1.customers.create({"name": f"bench-{os.getpid()}"})
    inv = client.v1.invoices.create({"customer": cus.id})
    while time.time() < start_at:
        time.sleep(0.001)
    latencies = []
    n_on_invoice = 0
    extra = 0
    end = start_at + duration
    while time.time() < end:
        if n_on_invoice >= ITEMS_PER_INVOICE:
            inv = client.v1.invoices.create({"customer": cus.id})
            n_on_invoice = 0
            extra += 1
        t = time.perf_counter()
        client.v1.invoice_items.create(
            {
                "customer": cus.id,
                "invoice": inv.id,
                "unit_amount_decimal": "12.5",
                "quantity": 3,
                "description": "bench usage",
                "metadata": {"portal_item": str(len(latencies))},
            }
        )
        latencies.append(time.perf_counter() - t)
        n_on_invoice += 1
    out.put({"items": len(latencies), "extra_requests": extra, "latencies": latencies})


def run_phase(url: str, api_key: str, clients: int, duration: float) -> dict:
    """Run ``clients`` processes for ``duration`` seconds; return the figures."""
    ctl = EmulatorControl(url)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start_at = time.time() + 1.5 + 0.1 * clients  # let the processes import stripe first
    procs = [ctx.Process(target=_client_proc, args=(url, api_key, duration, start_at, q)) for _ in range(clients)]
    for p in procs:
        p.start()
    while time.time() < start_at - 0.05:
        time.sleep(0.01)
    before = ctl.stats()
    results = [q.get(timeout=duration + 60) for _ in procs]
    after = ctl.stats()
    for p in procs:
        p.join()
    items = sum(r["items"] for r in results)
    reqs = after["requests"] - before["requests"]
    lat = sorted(x for r in results for x in r["latencies"])
    cpu = after["cpu_total"] - before["cpu_total"]
    return {
        "clients": clients,
        "duration_s": duration,
        "items": items,
        "items_per_s": items / duration,
        "requests": reqs,
        "cpu_s": cpu,
        "cpu_ms_per_request": 1000 * cpu / reqs if reqs else None,
        "cpu_utilisation": cpu / duration,
        "latency_ms_p50": 1000 * statistics.median(lat) if lat else None,
        "latency_ms_p95": 1000 * lat[int(len(lat) * 0.95)] if lat else None,
    }


class _Sink(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per phase (default 2)")
    ap.add_argument("--long", action="store_true", help="15 s per phase")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--url", help="bench a running emulator instead of starting one")
    ap.add_argument("--api-key", default="sk_test_emulator")
    ap.add_argument("--webhooks", action="store_true", help="also deliver every event to a local sink")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args(argv)
    duration = 15.0 if args.long else args.duration

    sink = None
    emu = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        kw = {}
        if args.webhooks:
            sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
            sink.daemon_threads = True
            threading.Thread(target=sink.serve_forever, daemon=True).start()
            kw = {"webhook_url": f"http://127.0.0.1:{sink.server_address[1]}/", "webhook_secret": "whsec_bench"}
        emu = start_emulator(api_key=args.api_key, stderr=subprocess.DEVNULL, **kw)
        url = emu.url
    try:
        EmulatorControl(url).reset()
        phases = [run_phase(url, args.api_key, n, duration) for n in args.clients]
    finally:
        if emu is not None:
            emu.stop()
        if sink is not None:
            sink.shutdown()
    if args.json:
        print(json.dumps(phases, indent=2))
        return 0
    print(f"Stripe emulator benchmark: invoice-item creation, {duration:g}s per phase, webhooks={args.webhooks}")
    print(f"{'clients':>7} {'items/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'emu CPU ms/req':>15} {'emu CPU util':>13}")
    for p in phases:
        print(
            f"{p['clients']:>7} {p['items_per_s']:>9.0f} {p['latency_ms_p50']:>7.2f} {p['latency_ms_p95']:>7.2f} "
            f"{p['cpu_ms_per_request']:>15.3f} {p['cpu_utilisation']:>12.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

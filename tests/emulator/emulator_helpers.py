"""Helpers shared by the emulator tests (importable as ``emulator_helpers``)."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import stripe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Stripe's example objects (fixtures3.json of github.com/stripe/openapi, MIT: see fixtures/).
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "stripe-fixtures3.json")
WEBHOOK_SECRET = "whsec_test_emulator_secret"


def make_client(emulator, retries: int = 0, api_key: str | None = None) -> stripe.StripeClient:
    """Another client (e.g. with retries or another key)."""
    return stripe.StripeClient(
        api_key or emulator.api_key, base_addresses={"api": emulator.url}, max_network_retries=retries
    )


class Receiver:
    """A tiny webhook endpoint recording what it receives; can fail on demand."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.fail_next = 0
        self.fail_status = 500
        self.delay = 0.0
        self.lock = threading.Lock()
        recv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if recv.delay:
                    import time

                    time.sleep(recv.delay)
                with recv.lock:
                    fail = recv.fail_next > 0
                    if fail:
                        recv.fail_next -= 1
                    recv.received.append(
                        {"body": body, "signature": self.headers.get("Stripe-Signature"), "failed": fail}
                    )
                self.send_response(recv.fail_status if fail else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/stripe"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ok_events(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.received if not r["failed"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def raw_request(emulator, method: str, path: str, body: str | None = None, headers: dict | None = None):
    """One HTTP request straight to the emulator (no stripe library): returns
    ``(status, headers, parsed JSON body or text)``."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(emulator.url + path, data=body.encode() if body else None, method=method)
    req.add_header("Authorization", f"Bearer {emulator.api_key}")
    if body:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req) as r:
            status, hdrs, data = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, data = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(data)
    except ValueError:
        return status, hdrs, data.decode()


def event_types(client, **params) -> list[str]:
    """Types of the events so far, oldest first."""
    events = client.v1.events.list({"limit": 100, **params}).auto_paging_iter()
    return [e.type for e in reversed(list(events))]


def draft_with(client, customer, amount: int = 1000, **invoice_params):
    """A draft invoice of ``customer`` with one item of ``amount``."""
    inv = client.v1.invoices.create({"customer": customer.id, **invoice_params})
    client.v1.invoice_items.create({"customer": customer.id, "invoice": inv.id, "amount": amount})
    return client.v1.invoices.retrieve(inv.id)


DAY = 86400

"""Helpers for the model-based test (`tests/test_model.py`): reading Stripe back through
the emulator (with retries, since the model's own faults may still be armed), fetching
Stripe's events as a webhook endpoint would receive them, running portal calls in
threads (each in its own app context) and in a process that can be killed outright."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import stripe

ROOT = Path(__file__).resolve().parent.parent

# The event types a webhook endpoint of the portal subscribes to (Stripe lets an
# endpoint choose; invoiceitem.* would only be stored and ignored).
WEBHOOK_PREFIXES = ("invoice.", "customer.", "payment_method.")


def _retryable(error: stripe.StripeError) -> bool:
    status = getattr(error, "http_status", None)
    return isinstance(error, stripe.APIConnectionError) or status in (409, 429) or (status or 0) >= 500


class StripeReader:
    """The Stripe account as the test sees it: reads that ride out injected faults."""

    def __init__(self, emulator):
        self.emulator = emulator
        self.client = stripe.StripeClient(emulator.api_key, base_addresses={"api": emulator.url},
                                          max_network_retries=0)

    def call(self, fn, attempts: int = 30):
        for attempt in range(attempts):
            try:
                return fn()
            except stripe.StripeError as error:
                if not _retryable(error) or attempt == attempts - 1:
                    raise
                time.sleep(0.02)
        raise AssertionError("unreachable")

    def invoice(self, invoice_id: str):
        return self.call(lambda: self.client.v1.invoices.retrieve(invoice_id))

    def customer(self, customer_id: str):
        return self.call(lambda: self.client.v1.customers.retrieve(customer_id))

    def lines(self, invoice_id: str) -> list:
        lines, params = [], {"limit": 100}
        while True:
            page = self.call(lambda params=params: self.client.v1.invoices.line_items.list(invoice_id, params=params))
            lines.extend(page.data)
            if not page.has_more or not page.data:
                return lines
            params = {"limit": 100, "starting_after": page.data[-1].id}

    def invoices(self) -> list:
        """Every invoice in the account (deleted drafts are not listed)."""
        found, params = [], {"limit": 100}
        while True:
            page = self.call(lambda params=params: self.client.v1.invoices.list(params=params))
            found.extend(page.data)
            if not page.has_more or not page.data:
                return found
            params = {"limit": 100, "starting_after": page.data[-1].id}

    def new_events(self, newest_known: str | None) -> list[dict]:
        """Events created after `newest_known` (all of them when None), oldest first,
        as plain JSON like a webhook body."""
        events: list = []
        if newest_known is None:
            params = {"limit": 100}
            while True:
                page = self.call(lambda params=params: self.client.v1.events.list(params=params))
                events.extend(page.data)
                if not page.has_more or not page.data:
                    break
                params = {"limit": 100, "starting_after": page.data[-1].id}
            events.reverse()
        else:
            cursor = newest_known
            while True:
                page = self.call(lambda cursor=cursor: self.client.v1.events.list(
                    params={"limit": 100, "ending_before": cursor}))
                events[:0] = page.data  # each page is newer than the previous one
                if not page.has_more or not page.data:
                    break
                cursor = page.data[0].id
            events.reverse()
        return [json.loads(json.dumps(event.to_dict(), default=str)) for event in events]


def portal_lines(lines: list, invoice_id: int) -> list:
    """The lines the portal made for this portal invoice (its metadata says so)."""
    ours = []
    for line in lines:
        metadata = line.metadata.to_dict() if getattr(line, "metadata", None) is not None else {}
        if metadata.get("portal_line") and metadata.get("portal_invoice") == str(invoice_id):
            ours.append(line)
    return ours


def line_key(line) -> str:
    return line.metadata.to_dict()["portal_line"]


class Worker:
    """One portal call running in a thread with its own app context (so its own
    database session), as a second web process or worker would."""

    started: list[Worker] = []  # every worker, so a new example can make sure none is left

    def __init__(self, app, fn, name: str):
        self.app, self.fn, self.name = app, fn, name
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self):
        try:
            with self.app.app_context():
                self.result = self.fn()
        except BaseException as error:  # handed to the test, which decides
            self.error = error

    def start(self) -> Worker:
        Worker.started.append(self)
        self.thread.start()
        return self

    @classmethod
    def join_stragglers(cls, timeout: float = 180) -> None:
        """Wait for workers an earlier example left running (it failed mid-step)."""
        for worker in cls.started:
            worker.join(timeout)
        cls.started.clear()

    def join(self, timeout: float = 180) -> Worker:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"{self.name} did not finish within {timeout} s (hung?)")
        return self


def run_together(app, calls: dict, stagger: float = 0.0) -> dict[str, Worker]:
    """Start each call in its own thread (the second `stagger` seconds after the
    first), wait for all; returns the workers by name."""
    workers = {}
    for index, (name, fn) in enumerate(calls.items()):
        if index and stagger:
            time.sleep(stagger)
        workers[name] = Worker(app, fn, name).start()
    for worker in workers.values():
        worker.join()
    return workers


def release_invoice_locks(redis, invoice_id: int) -> int:
    """Delete the invoice's Redis lock(s): what the lease running out does for a holder
    that died or stalled (the test cannot wait out a real lease)."""
    keys = [key for key in redis.scan_iter(match=f"*lock*invoice*:{invoice_id}")]
    return redis.delete(*keys) if keys else 0


def start_cli(args: list[str], database_uri: str, redis_url: str, emulator) -> subprocess.Popen:
    """`flask --app wsgi ARGS` against the test database, Redis and emulator."""
    env = {**os.environ, "DATABASE_URL": database_uri, "REDIS_URL": redis_url, "SECRET_KEY": "model-test",
           "STRIPE_API_KEY": emulator.api_key, "STRIPE_API_BASE": emulator.url,
           "STRIPE_MAX_REQUESTS_PER_SECOND": "1000", "STRIPE_TEST_PAYMENT_METHOD": ""}
    return subprocess.Popen([str(Path(sys.executable).parent / "flask"), "--app", "wsgi", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

"""Concurrency, object shapes against Stripe's fixtures, and the command line."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import stripe
from emulator_helpers import FIXTURES, ROOT, make_client


def test_many_threads_on_one_invoice_keep_totals_consistent(client, customer, draft, emulator):
    errors = []

    def worker(n):
        c = make_client(emulator)
        try:
            for i in range(20):
                c.v1.invoice_items.create(
                    {
                        "customer": customer.id,
                        "invoice": draft.id,
                        "amount": n * 100 + i,
                        "metadata": {"w": str(n), "i": str(i)},
                    }
                )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    inv = client.v1.invoices.retrieve(draft.id)
    expected = sum(n * 100 + i for n in range(8) for i in range(20))
    lines = list(client.v1.invoices.line_items.list(draft.id, {"limit": 100}).auto_paging_iter())
    assert len(lines) == 160 and len({line.id for line in lines}) == 160
    assert inv.total == expected == sum(line.amount for line in lines) and inv.amount_due == expected
    created = [e for e in client.v1.events.list({"type": "invoiceitem.created", "limit": 100}).auto_paging_iter()]
    assert len(created) == 160


def test_concurrent_customers_and_lists(client, emulator):
    ids = []
    lock = threading.Lock()

    def worker():
        c = make_client(emulator)
        for _ in range(15):
            cid = c.v1.customers.create({}).id
            with lock:
                ids.append(cid)
            c.v1.customers.list({"limit": 5})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    listed = [c.id for c in client.v1.customers.list({"limit": 100}).auto_paging_iter()]
    assert sorted(listed) == sorted(ids) and len(set(ids)) == 60


def _fixture(name):
    with open(FIXTURES) as f:
        return json.load(f)["resources"][name]


def _missing(ours: dict, fixture_name: str) -> set:
    return set(_fixture(fixture_name)) - set(ours)


def test_objects_carry_every_fixture_field(client, customer, draft, ctl):
    ctl.set_portal_default_configuration(True)
    item = client.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 100})
    inv = client.v1.invoices.retrieve(draft.id).to_dict()
    cus = client.v1.customers.retrieve(customer.id).to_dict()
    line = client.v1.invoices.line_items.list(draft.id).data[0].to_dict()
    session = client.v1.billing_portal.sessions.create({"customer": customer.id, "return_url": "https://x.test"})
    event = client.v1.events.list({"limit": 1}).data[0].to_dict()
    checks = {
        "customer": cus,
        "invoice": inv,
        "invoiceitem": item.to_dict(),
        "line_item": line,
        "event": event,
        "billing_portal.session": session.to_dict(),
        "deleted_invoiceitem": client.v1.invoice_items.delete(item.id).to_dict(),
        "deleted_invoice": client.v1.invoices.delete(draft.id).to_dict(),
        "deleted_customer": client.v1.customers.delete(customer.id).to_dict(),
    }
    for name, ours in checks.items():
        assert _missing(ours, name) == set(), name
    # nested shapes the portal reads
    assert set(_fixture("line_item")["parent"]) <= set(line["parent"])
    assert set(_fixture("invoice")["status_transitions"]) <= set(inv["status_transitions"])
    assert set(_fixture("invoice")["lines"]) <= set(inv["lines"])
    assert set(_fixture("event")["request"]) <= set(event["request"])
    assert set(_fixture("line_item")["pricing"]) <= set(line["pricing"])
    lst = client.v1.customers.list().to_dict()
    assert {"object", "data", "has_more", "url"} <= set(lst) and lst["object"] == "list"


def test_cli_env_key_ready_line_and_clean_sigterm():
    env = dict(os.environ, STRIPE_EMULATOR_API_KEY="sk_test_from_env", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stripe_emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("stripe-emulator ready url=http://127.0.0.1:")
        url = line.split("url=")[1].split()[0]
        c = stripe.StripeClient("sk_test_from_env", base_addresses={"api": url}, max_network_retries=0)
        assert c.v1.customers.create({"name": "env"}).name == "env"
        bad = stripe.StripeClient("sk_test_emulator", base_addresses={"api": url}, max_network_retries=0)
        try:
            bad.v1.customers.list()
            raise AssertionError("default key must be refused when another is configured")
        except stripe.AuthenticationError:
            pass
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0 and time.monotonic() - t < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def test_stats_report_cpu(ctl, client):
    client.v1.customers.create({})
    st = ctl.stats()
    assert st["requests"] >= 1 and st["cpu_total"] > 0 and st["objects"]["customers"] == 1

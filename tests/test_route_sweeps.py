"""Sweeps over every route in `app.url_map` (so a new route is swept without editing
this file, and a route with a parameter the sweep cannot fill fails it):

- a customer route given another organization's objects answers 404;
- an /admin route answers 403 (or 404) to a customer, and sends an anonymous user to
  sign in;
- a state-changing HTML route (POST/PUT/PATCH/DELETE) refuses a request without a
  CSRF token; only the bearer-token API and Stripe's webhook are exempt.
"""
from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from portal.billing.alerts import add_alert
from portal.billing.credits import add_credit
from portal.billing.pricing import add_quantity
from portal.billing.services import attach_service
from portal.billing.sync_queue import enqueue_sync
from tests.security_stats import record_stats

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
CSRF_EXEMPT_BLUEPRINTS = {"api", "webhooks"}  # bearer tokens; Stripe's signature


def rules(app, blueprint: str | None = None):
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        if blueprint is None or rule.endpoint.split(".")[0] == blueprint:
            yield rule


def methods(rule) -> list[str]:
    return sorted(rule.methods - {"HEAD", "OPTIONS"})


def url_for_rule(rule, values: dict) -> str:
    missing = set(rule.arguments) - set(values)
    assert not missing, f"the sweep does not know how to fill {missing} in {rule.rule}: add it"
    return rule.build({name: values[name] for name in rule.arguments}, append_unknown=False)[1]


def call(client, method: str, url: str):
    return client.open(url, method=method, data={} if method in STATE_CHANGING else None)


@pytest.fixture
def two_orgs(db, make):
    """Ann is a member of Acme only; Globex is another organization; Sam is support."""
    acme = make.organization(slug="acme")
    globex = make.organization(slug="globex")
    egress = make.product("egress.gb", unit_price="200")
    ip = make.product("ipv4", unit_price="200", kind="recurring")
    mine, theirs = make.open_invoice(acme), make.open_invoice(globex)
    add_quantity(theirs, egress, "", Decimal(5))
    services = [attach_service(org, ip, Decimal(1), "") for org in (acme, globex)]
    alerts = [add_alert(org, "total", 100) for org in (acme, globex)]
    own_credit, other_credit = add_credit(acme, "1", "Goodwill"), add_credit(globex, "1", "Goodwill")
    db.session.commit()
    make.user("ann@example.com", organization=acme)
    make.user("sam@example.com", support=True)
    values = {"own": {"slug": acme.slug, "invoice_id": mine.id, "service_id": services[0].id,
                      "alert_id": alerts[0].id, "item_id": own_credit.id},
              "other": {"slug": globex.slug, "invoice_id": theirs.id, "service_id": services[1].id,
                        "alert_id": alerts[1].id, "item_id": other_credit.id}}
    # The jobs dashboard's parameters (rq-dashboard at /admin/jobs): a queue, a job.
    jobs = {"instance_number": 0, "queue_name": "default", "registry_name": "failed", "per_page": 8,
            "order": "asc", "page": 1, "job_id": "no-such-job", "filename": "css/main.css"}
    for side in values.values():
        side.update(jobs)
    # Support's recovery routes name a recovery, a stored Stripe event and a failed job.
    values["own"].update(name="retry-close", event_id=1, queue_name="default", job_id=f"portal-close-{mine.id}")
    db.session.rollback()
    for owner in values.values():  # a "Sync now" of each organization's invoice
        owner["job_id"] = enqueue_sync(owner["invoice_id"])
    return values


class Counts:
    def __init__(self, name: str):
        self.name = name
        self.routes: set[tuple[str, str]] = set()
        self.requests = 0
        self.server_errors = 0

    def sent(self, rule, method: str, response) -> None:
        self.routes.add((method, rule.rule))
        self.requests += 1
        self.server_errors += response.status_code >= 500

    def record(self) -> None:
        print(f"\nsweep {self.name}: {len(self.routes)} routes, {self.requests} requests, "
              f"{self.server_errors} 5xx")
        record_stats(f"sweep_{self.name}", {"routes": len(self.routes), "requests": self.requests,
                                            "server_errors": self.server_errors,
                                            "route_list": sorted(f"{m} {r}" for m, r in self.routes)})


def test_customer_routes_answer_404_for_another_organizations_objects(app, client, auth, two_orgs):
    counts = Counts("customer_other_org")
    auth.login("ann@example.com")
    failures = []
    for rule in rules(app, "customer"):
        names = [name for name in rule.arguments if name in two_orgs["own"]]
        assert set(rule.arguments) <= set(names), f"unknown parameter in {rule.rule}"
        if not names:
            continue  # no object in the URL (/, /billing): nothing of another organization to reach
        # Every mix of own and other objects with at least one other's.
        for owners in itertools.product(("own", "other"), repeat=len(names)):
            if "other" not in owners:
                continue
            values = {name: two_orgs[owner][name] for name, owner in zip(names, owners, strict=True)}
            url = url_for_rule(rule, values)
            for method in methods(rule):
                response = call(client, method, url)
                counts.sent(rule, method, response)
                if response.status_code != 404:
                    failures.append(f"{method} {url} -> {response.status_code}")
    counts.record()
    assert counts.routes, "no customer route with an object in its URL"
    assert not failures, failures


def _admin_sweep(app, client, two_orgs, counts: Counts, expect) -> list[str]:
    failures = []
    admin_rules = [rule for rule in rules(app) if rule.rule.startswith("/admin")]  # the jobs dashboard too
    assert admin_rules
    for rule in admin_rules:
        assert rule.rule.startswith("/admin"), rule.rule
        url = url_for_rule(rule, two_orgs["own"])  # real objects: the refusal is not a missing object
        for method in methods(rule):
            response = call(client, method, url)
            counts.sent(rule, method, response)
            location = response.headers.get("Location", "").removeprefix("http://localhost")
            if response.status_code == 308 and location.startswith("/admin/"):
                response = call(client, method, location)  # a rule's canonical URL (rq-dashboard's /0/)
            problem = expect(response)
            if problem:
                failures.append(f"{method} {url} -> {response.status_code} {problem}")
    return failures


def test_admin_routes_are_refused_to_a_customer(app, client, auth, two_orgs):
    counts = Counts("admin_as_customer")
    auth.login("ann@example.com")
    failures = _admin_sweep(app, client, two_orgs, counts,
                            lambda r: None if r.status_code in (403, 404) else "expected 403 or 404")
    counts.record()
    assert not failures, failures


def test_admin_routes_send_an_anonymous_user_to_sign_in(app, client, two_orgs):
    counts = Counts("admin_anonymous")

    def to_sign_in(response):
        if response.status_code not in (302, 303) or not response.headers.get("Location", "").startswith(
                "/login"):
            return f"expected a redirect to /login, got Location {response.headers.get('Location')!r}"
        return None

    failures = _admin_sweep(app, client, two_orgs, counts, to_sign_in)
    counts.record()
    assert not failures, failures


@pytest.mark.parametrize("who", ["anonymous", "ann@example.com", "sam@example.com"])
def test_state_changing_html_routes_refuse_a_request_without_csrf_token(app, client, auth, monkeypatch,
                                                                         two_orgs, who):
    if who != "anonymous":
        auth.login(who)  # signed in while CSRF is off (the test config), then turn it on
    monkeypatch.setitem(app.config, "WTF_CSRF_ENABLED", True)
    counts = Counts(f"csrf_{who.split('@')[0]}")
    failures, exempt = [], []
    for rule in rules(app):
        changing = sorted(set(methods(rule)) & STATE_CHANGING)
        if not changing:
            continue
        if rule.endpoint.split(".")[0] in CSRF_EXEMPT_BLUEPRINTS:
            exempt.append(rule.rule)
            continue
        url = url_for_rule(rule, two_orgs["own"])
        for method in changing:
            response = call(client, method, url)
            counts.sent(rule, method, response)
            if response.status_code != 400 or b"CSRF" not in response.data:
                failures.append(f"{method} {url} -> {response.status_code}")
    counts.record()
    assert "/webhooks/stripe" in exempt and any(rule.startswith("/api/v1/") for rule in exempt)
    assert len(counts.routes) >= 5  # login, logout, payment methods, and support's three actions
    assert not failures, failures

"""Fuzz every operation of the JSON API with Schemathesis, against the portal served by
gunicorn on the test database (PostgreSQL when TEST_DATABASE_URL is set).

For each operation, valid (positive) and invalid (negative) requests are generated
from portal/api/openapi.py; some are steered onto the seeded organizations, products,
invoices, services and jobs so they get past the 404s, and some go without a token or
with a wrong one. Every answer must be no 5xx and conform to the document (status
code, content type, headers, body schema); a rejected request (4xx/5xx) and any GET
must leave usage_events, invoice_items, service_attachments and organizations as they
were. Failures are collected across all operations and reported together.

`FUZZ_EXAMPLES` examples per operation and mode (default 10; e.g. FUZZ_EXAMPLES=200
for a long run). `SECURITY_STATS` names a JSON file to add the counts to (used by
`python -m tests.security_report`).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import text

from portal.api.openapi import document
from portal.billing.pricing import add_quantity
from portal.billing.services import attach_service
from tests.api_helpers import TOKEN
from tests.security_stats import record_stats

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or 10)
WATCHED = ("usage_events", "invoice_items", "service_attachments", "organizations")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Fuzz:
    def __init__(self, db, base_url: str, known: dict):
        self.db = db
        self.base_url = base_url
        self.known = known
        self.session = requests.Session()
        self.requests = 0
        self.statuses: Counter = Counter()
        self.per_operation: Counter = Counter()
        self.failures: dict[tuple, str] = {}  # (operation, kind, detail) -> first example
        self.stored_from_rejected = 0
        self.server_errors = 0

    def counts(self) -> dict[str, int]:
        query = "SELECT " + ", ".join(f"(SELECT count(*) FROM {table})" for table in WATCHED)
        with self.db.engine.connect() as connection:  # a fresh read; holds no lock afterwards
            return dict(zip(WATCHED, connection.execute(text(query)).one(), strict=True))

    # --- steering: give generated requests a chance to reach real objects -------------

    def steer(self, case, data) -> dict:
        known = self.known
        params = case.path_parameters or {}
        for name, pool in (("slug", known["slugs"]), ("invoice_id", known["invoice_ids"]),
                           ("service_id", known["service_ids"]), ("job_id", known["job_ids"])):
            if name in params and pool and data.draw(st.booleans(), label=f"known {name}"):
                params[name] = data.draw(st.sampled_from(pool), label=name)
        body = case.body
        if isinstance(body, dict) and data.draw(st.booleans(), label="steer body"):
            if isinstance(body.get("events"), list):
                for event in body["events"]:
                    if isinstance(event, dict):
                        self._steer_event(event, data)
            if "product" in body and case.operation.method.upper() == "POST":
                body["product"] = data.draw(st.sampled_from(known["products"]), label="product")
        headers = {key: value for key, value in (case.headers or {}).items() if key.lower() != "authorization"}
        case.headers = headers
        auth = data.draw(st.sampled_from(["token"] * 8 + ["none", "wrong"]), label="auth")
        return {"token": AUTH, "none": {}, "wrong": {"Authorization": "Bearer not-the-token"}}[auth]

    def _steer_event(self, event: dict, data) -> None:
        event["organization"] = data.draw(st.sampled_from(self.known["slugs"]), label="organization")
        event["product"] = data.draw(st.sampled_from(self.known["products"]), label="event product")
        if data.draw(st.booleans(), label="recent occurred_at"):
            ago = data.draw(st.integers(0, 40 * 86400), label="seconds ago")
            at = datetime.now(timezone.utc) - timedelta(seconds=ago)
            event["occurred_at"] = at.isoformat().replace("+00:00", "Z")

    # --- one request ----------------------------------------------------------------

    def send(self, case, headers: dict) -> None:
        label = f"{case.operation.method.upper()} {case.operation.path}"
        before = self.counts()
        response = case.call(base_url=self.base_url, session=self.session, headers=headers, timeout=30)
        after = self.counts()
        self.requests += 1
        self.per_operation[label] += 1
        self.statuses[response.status_code] += 1
        example = self._example(case, headers, response)
        if response.status_code >= 500:
            self.server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                self.failures.setdefault((label, failure.title, response.status_code), example)
        if (response.status_code >= 400 or case.operation.method.upper() == "GET") and after != before:
            self.stored_from_rejected += response.status_code >= 400
            changed = {table: (before[table], after[table]) for table in WATCHED if before[table] != after[table]}
            self.failures.setdefault((label, f"stored rows {changed}", response.status_code), example)
        if response.status_code == 202 and isinstance(response.json(), dict):
            job_id = response.json().get("job_id")
            if isinstance(job_id, str) and job_id not in self.known["job_ids"]:
                self.known["job_ids"].append(job_id)
        if response.status_code == 201 and "services" in case.operation.path:
            self.known["service_ids"].append(response.json()["id"])

    @staticmethod
    def _example(case, headers: dict, response) -> str:
        body = None if type(case.body).__name__ == "NotSet" else case.body
        sent = json.dumps(body, default=repr)[:600] if body is not None else "(no body)"
        auth = headers.get("Authorization", "(no Authorization)")
        content_type = {key.lower(): value for key, value in response.headers.items()}.get("content-type")
        if isinstance(content_type, list):
            content_type = ", ".join(content_type)
        url = urlsplit(response.request.url)
        target = url.path + (f"?{url.query}" if url.query else "")
        return (f"{case.operation.method.upper()} {target}\n    auth: {auth}\n    body: {sent}\n"
                f"    -> {response.status_code} {content_type}: {response.text[:400]!r}")

    def run_operation(self, operation, mode: GenerationMode) -> None:
        strategy = operation.as_strategy(generation_mode=mode)

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data):
            case = data.draw(strategy, label="case")
            headers = self.steer(case, data)
            self.send(case, headers)

        try:
            fuzz()
        except Unsatisfiable:
            # No invalid input exists for an operation without parameters or body.
            assert mode is GenerationMode.NEGATIVE and not operation.path_parameters and not operation.body, (
                operation.label)


@pytest.fixture
def seeded(db, make):
    """Two organizations with open invoices, usage, services; products of each kind."""
    acme = make.organization(slug="acme")
    globex = make.organization(slug="globex")
    egress = make.product("egress.gb", unit_price="200")
    make.product("machines.cpu", unit_price="0.0011")
    ipv4 = make.product("ipv4", unit_price="200", kind="recurring")
    make.product("credit", unit_price="1", kind="credit")
    invoices = [make.open_invoice(acme), make.open_invoice(globex)]
    add_quantity(invoices[0], egress, "", Decimal(3))
    services = [attach_service(acme, ipv4, Decimal(2), "ip-1"), attach_service(globex, ipv4, Decimal(1), "")]
    db.session.commit()
    known = {"slugs": ["acme", "globex"], "products": ["egress.gb", "machines.cpu", "ipv4", "credit"],
             "invoice_ids": [invoice.id for invoice in invoices], "service_ids": [s.id for s in services],
             "job_ids": []}
    db.session.rollback()  # reading the ids began a transaction: end it (SQLite: it would hold the lock)
    return known


def test_fuzz_every_operation_against_the_live_portal(db, seeded, live_server):
    schema = schemathesis.openapi.from_dict(document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(1 for item in document()["paths"].values() for key in item if key != "parameters")
    fuzz = Fuzz(db, live_server.url + "/api/v1", seeded)
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz.run_operation(operation, mode)

    covered = sorted(fuzz.per_operation)
    print(f"\nfuzz: {fuzz.requests} requests over {len(covered)} of {len(operations)} operations "
          f"({EXAMPLES} examples per operation and mode); statuses {dict(sorted(fuzz.statuses.items()))}; "
          f"5xx {fuzz.server_errors}; stored by rejected requests {fuzz.stored_from_rejected}; "
          f"failures {len(fuzz.failures)}")
    record_stats("fuzz", {"operations": len(operations), "operations_covered": len(covered),
                          "requests": fuzz.requests, "server_errors": fuzz.server_errors,
                          "stored_from_rejected": fuzz.stored_from_rejected, "failures": len(fuzz.failures),
                          "examples_per_operation_and_mode": EXAMPLES,
                          "statuses": {str(k): v for k, v in sorted(fuzz.statuses.items())},
                          "failure_list": [f"{op} | {kind} | {status}\n    {example}"
                                           for (op, kind, status), example in sorted(fuzz.failures.items())]})
    assert len(covered) == len(operations)
    report = "\n".join(f"- {op}: {kind} (status {status})\n    {example}"
                       for (op, kind, status), example in sorted(fuzz.failures.items()))
    assert not fuzz.failures, f"{len(fuzz.failures)} distinct failure(s):\n{report}"

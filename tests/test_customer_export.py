"""CSV exports: a period's usage events and an invoice's lines, streamed, with cells
no spreadsheet runs as a formula."""
from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from sqlalchemy import event

from portal.billing.credits import add_credit
from portal.billing.usage import ingest_usage
from portal.customer.export import ROWS_PER_CHUNK
from portal.models.types import utcnow


@pytest.fixture
def initech(db, make):
    organization = make.organization(slug="initech", name="Initech", created_at=utcnow() - timedelta(days=60))
    make.product("machines.cpu", unit_price="0.0011", name="CPU", unit="second")
    make.product("egress.gb", unit_price="2", name="Egress", unit="GB")
    invoice = make.open_invoice(organization)
    make.user("member@example.com", organization=organization, role="member")
    return organization, invoice


def events(count: int, start, resource=lambda i: f"web-{i % 3}", product="machines.cpu", org="initech"):
    return [{"id": f"{org}-{i}", "organization": org, "product": product, "quantity": f"{i + 1}.5",
             "occurred_at": (start + timedelta(seconds=i)).isoformat(), "resource": resource(i)}
            for i in range(count)]


def read_csv(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_usage_export_is_streamed_in_chunks_and_holds_every_event_of_the_period(client, auth, db, initech):
    organization, invoice = initech
    start = max(invoice.period_start, utcnow() - timedelta(days=1))
    count = ROWS_PER_CHUNK * 2 + 7
    ingest_usage("meter", events(count, start))
    db.session.commit()
    auth.login("member@example.com")

    streamed = []

    def watch(_conn, _cursor, statement, _params, context, _many):
        if "FROM usage_events" in statement:
            streamed.append(context.execution_options.get("yield_per"))

    event.listen(db.engine, "before_cursor_execute", watch)
    try:
        response = client.get(f"/orgs/initech/invoices/{invoice.id}/usage.csv", buffered=False)
        assert response.status_code == 200 and response.is_streamed
        assert response.mimetype == "text/csv"
        assert response.headers["Content-Disposition"].startswith('attachment; filename="initech-')
        chunks = [chunk for chunk in response.response if chunk]
    finally:
        event.remove(db.engine, "before_cursor_execute", watch)
    assert len(chunks) == 4  # the header at once, then rows as they arrive, not built whole
    assert streamed and all(streamed)  # read with yield_per (a server-side cursor on PostgreSQL)
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert rows[0] == ["id", "time", "product", "resource", "quantity", "unit", "unit_price", "price", "currency"]
    assert len(rows) == count + 1
    assert rows[1] == ["initech-0", start.isoformat(), "machines.cpu", "web-0", "1.5", "second", "0.000011",
                       "0.0000165", "usd"]
    assert rows[-1][0] == f"initech-{count - 1}"


def test_usage_export_leaves_out_other_periods_and_other_organizations(client, auth, db, make, initech):
    organization, invoice = initech
    make.organization(slug="other", created_at=utcnow() - timedelta(days=60))
    now = utcnow()
    ingest_usage("meter", events(2, now - timedelta(minutes=5)) + events(3, now - timedelta(minutes=5), org="other"))
    if invoice.period_start - timedelta(days=2) > now - timedelta(days=35):
        ingest_usage("meter", [{"id": "earlier", "organization": "initech", "product": "egress.gb", "quantity": "1",
                                "occurred_at": (invoice.period_start - timedelta(days=2)).isoformat()}])
    db.session.commit()
    auth.login("member@example.com")
    rows = read_csv(client.get(f"/orgs/initech/invoices/{invoice.id}/usage.csv"))
    assert [row[0] for row in rows[1:]] == ["initech-0", "initech-1"]


def test_cells_that_would_be_formulas_are_written_as_text(client, auth, db, initech):
    organization, invoice = initech
    names = ["=HYPERLINK(\"http://evil\")", "+1+2", "-3", "@SUM(A1)", "plain"]  # (the API refuses a tab)
    ingest_usage("meter", events(len(names), utcnow() - timedelta(minutes=10), resource=lambda i: names[i]))
    add_credit(organization, "5.00", "=cmd|' /C calc'!A0 sorry")
    db.session.commit()
    auth.login("member@example.com")
    usage = read_csv(client.get(f"/orgs/initech/invoices/{invoice.id}/usage.csv"))
    assert [row[3] for row in usage[1:]] == ["'=HYPERLINK(\"http://evil\")", "'+1+2", "'-3", "'@SUM(A1)", "plain"]
    lines = read_csv(client.get(f"/orgs/initech/invoices/{invoice.id}/lines.csv"))
    assert lines[0] == ["product", "resource", "description", "quantity", "unit", "unit_price", "amount", "currency"]
    credit = next(row for row in lines[1:] if row[0] == "portal.credit")
    assert credit[2] == "Credit: =cmd|' /C calc'!A0 sorry"  # starts with "C": left as it is
    assert credit[6] == "-5.00"  # a number, not text: no apostrophe
    by_resource = {row[1]: row for row in lines[1:] if row[0] == "machines.cpu"}
    assert set(by_resource) == {"'=HYPERLINK(\"http://evil\")", "'+1+2", "'-3", "'@SUM(A1)", "plain"}


def test_line_export_matches_the_invoice(client, auth, db, initech):
    organization, invoice = initech
    ingest_usage("meter", events(4, utcnow() - timedelta(minutes=10), product="egress.gb"))
    db.session.commit()
    db.session.refresh(invoice)
    auth.login("member@example.com")
    lines = read_csv(client.get(f"/orgs/initech/invoices/{invoice.id}/lines.csv"))
    amounts = [int(row[6].replace(".", "")) for row in lines[1:]]
    # 1.5 GB + 4.5 GB on web-0, 2.5 GB on web-1, 3.5 GB on web-2, at 2 cents a GB.
    assert sum(amounts) == invoice.total_cents == 12 + 5 + 7
    assert {row[1] for row in lines[1:]} == {"web-0", "web-1", "web-2"}


def test_exports_are_for_the_organizations_people_only(client, auth, db, make, initech):
    organization, invoice = initech
    other = make.organization(slug="other")
    make.user("eve@example.com", organization=other, role="owner")
    auth.login("eve@example.com")
    assert client.get(f"/orgs/initech/invoices/{invoice.id}/usage.csv").status_code == 404
    assert client.get(f"/orgs/initech/invoices/{invoice.id}/lines.csv").status_code == 404
    other_invoice = make.open_invoice(other)
    auth.logout()
    auth.login("member@example.com")
    assert client.get(f"/orgs/initech/invoices/{other_invoice.id}/lines.csv").status_code == 404
    auth.logout()
    assert client.get(f"/orgs/initech/invoices/{invoice.id}/lines.csv").status_code == 302  # to sign in

"""Bad input is a clear 4xx that stores nothing: ids beyond the database's range,
deep JSON, decimals outside the one grammar, old or absurd usage, reused event ids,
oversized (chunked) bodies, control characters in names, webhook oddities, and the
SQLite file's mode."""
from __future__ import annotations

import io
import json
import os
import stat
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import requests
from sqlalchemy import create_engine, func, select

from portal import money
from portal.converters import DatabaseIdConverter, JobIdConverter, SlugConverter
from portal.models import AuditEntry, Invoice, InvoiceItem, Organization, ServiceAttachment, StripeEvent, UsageEvent
from tests.api_helpers import HEADERS, event, post_usage, stamp
from tests.webhook_helpers import SECRET, event_body, post_event, sign

TOO_BIG = "99999999999999999999999"
TWO_TO_63 = str(2**63)


def count(db, model) -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(model))


def support_actions(db) -> int:
    """Audit entries other than support's sign-ins."""
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(AuditEntry)
                             .where(AuditEntry.action != "support.sign_in"))


@pytest.fixture
def acme(make):
    organization = make.organization(slug="acme", created_at=datetime.now(timezone.utc) - timedelta(days=400))
    make.product("egress.gb", unit_price="200")
    make.product("ipv4", unit_price="200", kind="recurring")
    invoice = make.open_invoice(organization)
    return organization, invoice


@pytest.fixture
def support(make, auth):
    make.user("staff@example.com", support=True)
    auth.login("staff@example.com")


# --- 1. ids beyond the database's integer range ---------------------------------------


def test_every_route_with_an_integer_id_uses_the_database_range_converter(app):
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("rq_dashboard."):
            continue  # rq-dashboard's own rules: its ids are checked before its views (tests/test_jobs_dashboard.py)
        for name, converter in rule._converters.items():
            if name == "job_id":
                assert isinstance(converter, JobIdConverter), rule.rule
            elif name.endswith("_id") or name == "id":
                assert isinstance(converter, DatabaseIdConverter), (rule.rule, name)
                checked += 1
            if name == "slug":
                assert isinstance(converter, SlugConverter), rule.rule
    assert checked >= 7


@pytest.mark.parametrize("bad_id", [TOO_BIG, TWO_TO_63, "0", "007", "\u0663", "-1"])
def test_api_ids_beyond_the_database_range_are_404(client, db, acme, bad_id):
    for method, url in (("post", f"/api/v1/invoices/{bad_id}/sync"), ("get", f"/api/v1/invoices/{bad_id}/sync-runs"),
                        ("patch", f"/api/v1/organizations/acme/services/{bad_id}"),
                        ("delete", f"/api/v1/organizations/acme/services/{bad_id}")):
        response = getattr(client, method)(url, json={"quantity": "2"}, headers=HEADERS)
        assert response.status_code == 404, (method, url, response.status_code)
        assert response.get_json()["error"]["code"] == "not_found"  # in the API's shape, not an HTML page
    assert count(db, ServiceAttachment) == 0


def test_routing_errors_under_the_api_answer_json_and_pages_stay_html(client, acme):
    response = client.get("/api/v1/usage", headers=HEADERS)
    assert response.status_code == 405 and response.get_json()["error"]["code"] == "method_not_allowed"
    response = client.get(f"/orgs/acme/invoices/{TOO_BIG}")
    assert response.status_code == 404 and response.mimetype == "text/html"


def test_the_largest_database_id_is_a_plain_404(client, acme):
    largest = str(2**63 - 1)
    assert client.get(f"/api/v1/invoices/{largest}/sync-runs", headers=HEADERS).status_code == 404
    assert client.delete(f"/api/v1/organizations/acme/services/{largest}", headers=HEADERS).status_code == 404


@pytest.mark.parametrize("bad_id", [TOO_BIG, TWO_TO_63])
def test_page_and_admin_ids_beyond_the_database_range_are_404(client, db, acme, support, bad_id):
    assert client.get(f"/orgs/acme/invoices/{bad_id}").status_code == 404
    assert client.post(f"/admin/invoices/{bad_id}/sync").status_code == 404
    assert client.post(f"/admin/invoices/{bad_id}/close").status_code == 404
    assert support_actions(db) == 0


@pytest.mark.parametrize("job_id", ["a.b", "..", "a%0A", "a%00b", "%E2%80%8B", "a:b", "x" * 129])
def test_job_ids_rq_would_refuse_are_404(client, acme, job_id):
    response = client.get(f"/api/v1/jobs/{job_id}", headers=HEADERS)
    assert response.status_code == 404


def test_slugs_in_urls_are_checked_before_any_lookup(client, acme, support):
    for url in ("/api/v1/organizations/acme%00/invoices", "/api/v1/organizations/acme%0A/services",
                "/api/v1/organizations/ACME/invoices/current"):
        assert client.get(url, headers=HEADERS).status_code == 404, url
    assert client.get("/orgs/acme%00/billing").status_code == 404
    assert client.get("/admin/orgs/acme%00").status_code == 404


# --- 2. deeply nested JSON ------------------------------------------------------------


def _deep(levels: int) -> bytes:
    return b'{"events": ' + b"[" * levels + b"]" * levels + b"}"


@pytest.mark.parametrize("levels", [100, 5000, 100_000])
def test_deeply_nested_json_is_400_on_every_json_endpoint(client, db, acme, levels):
    service = client.post("/api/v1/organizations/acme/services", json={"product": "ipv4"}, headers=HEADERS)
    assert service.status_code == 201
    body = _deep(levels)
    for method, url in (("post", "/api/v1/usage"), ("post", "/api/v1/organizations"),
                        ("post", "/api/v1/organizations/acme/services"),
                        ("patch", f"/api/v1/organizations/acme/services/{service.get_json()['id']}")):
        response = getattr(client, method)(url, data=body, headers={**HEADERS, "Content-Type": "application/json"})
        assert response.status_code == 400, (url, response.status_code)
        assert response.get_json()["error"]["code"] == "invalid_json"
    assert count(db, UsageEvent) == 0 and count(db, ServiceAttachment) == 1


def test_deeply_nested_json_in_a_single_field_is_400(client, db, acme):
    deep = "[" * 3000 + "]" * 3000
    body = ('{"events": [{"id": "e1", "organization": ' + deep + ', "product": "egress.gb", "quantity": "1",'
            ' "occurred_at": "' + stamp(datetime.now(timezone.utc)) + '"}]}').encode()
    response = client.post("/api/v1/usage", data=body, headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert count(db, UsageEvent) == 0


def test_a_deeply_nested_webhook_is_400(client, db, app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])
    body = (b'{"id": "evt_deep", "object": "event", "type": "invoice.paid", "created": %d, "data": '
            % int(time.time()) + b"[" * 5000 + b"]" * 5000 + b"}")
    assert post_event(client, body, sign(body)).status_code == 400
    assert count(db, StripeEvent) == 0


# --- 3. one decimal grammar -----------------------------------------------------------

BAD_DECIMAL_TEXT = ["5_000", "\u0661\u0660", "\uff15", "-0", "-0.0", " 5", "5 ", "5\n", "1,000", "1,0,0", "+5",
                    "1e3", "1E3", ".5", "5.", "0x10", "NaN", "-Infinity", "", "1 000", "5\u00a0", "1" * 65]


@pytest.mark.parametrize("text", BAD_DECIMAL_TEXT)
def test_usage_quantities_outside_the_grammar_are_422(client, db, acme, text):
    response = post_usage(client, [event("e1", "acme", "egress.gb", text)])
    assert response.status_code == 422, text
    assert "quantity" in " ".join(response.get_json()["error"]["details"][0]["errors"])
    assert count(db, UsageEvent) == 0


@pytest.mark.parametrize("text", ["5_000", "\u0661\u0660", "-0", " 5", "1e3"])
def test_service_quantities_outside_the_grammar_are_422(client, db, acme, text):
    response = client.post("/api/v1/organizations/acme/services", json={"product": "ipv4", "quantity": text},
                           headers=HEADERS)
    assert response.status_code == 422, text
    assert count(db, ServiceAttachment) == 0


@pytest.mark.parametrize(("literal", "status"), [(b"1e3", 400), (b"1E-2", 400), (b"-0.0", 422)])
def test_json_numbers_outside_the_grammar_are_refused(client, db, acme, literal, status):
    body = (b'{"events": [{"id": "e1", "organization": "acme", "product": "egress.gb", "quantity": ' + literal
            + b', "occurred_at": "' + stamp(datetime.now(timezone.utc)).encode() + b'"}]}')
    response = client.post("/api/v1/usage", data=body, headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == status
    assert count(db, UsageEvent) == 0


def test_plain_decimals_are_still_accepted(client, acme):
    now = stamp(datetime.now(timezone.utc))
    body = ('{"events": [' + ", ".join(
        f'{{"id": "{event_id}", "organization": "acme", "product": "egress.gb", "quantity": {quantity},'
        f' "occurred_at": "{now}"}}'
        for event_id, quantity in (("a", '"0"'), ("b", '"10.50"'), ("c", "2"), ("d", "0.25"), ("e", "-0")))
        + "]}")
    response = client.post("/api/v1/usage", data=body, headers={**HEADERS, "Content-Type": "application/json"})
    assert response.get_json() == {"accepted": 5, "duplicates": 0}  # a JSON -0 is the integer 0


@pytest.mark.parametrize("text", BAD_DECIMAL_TEXT)
def test_the_money_module_refuses_text_outside_the_grammar(text):
    with pytest.raises(money.MoneyError):
        money.quantity(text)
    with pytest.raises(money.MoneyError):
        money.parse_decimal(text, negative=not text.startswith("-0"))


def test_the_grammar_takes_a_minus_only_where_negatives_make_sense():
    assert money.parse_decimal("-12.5", negative=True) == Decimal("-12.5")
    assert money.parse_decimal("0012.50") == Decimal("12.50")
    with pytest.raises(money.MoneyError, match="negative"):
        money.parse_decimal("-1")
    with pytest.raises(money.MoneyError, match="negative zero"):
        money.parse_decimal("-0.00", negative=True)
    with pytest.raises(money.MoneyError):
        money.quantity(Decimal("-0"))


@pytest.mark.parametrize("amount", ["1,0,0", "1,000", "5_000", " 5", "5 ", "\u0661", "-0", "+5", "1e2"])
def test_credit_amounts_outside_the_grammar_are_refused(client, db, acme, support, amount):
    page = client.post("/admin/orgs/acme/credits", data={"amount": amount, "reason": "Goodwill"},
                       follow_redirects=True).get_data(as_text=True)
    assert "No credit given" in page, amount
    assert count(db, InvoiceItem) == 0 and support_actions(db) == 0


@pytest.mark.parametrize("price", ["1_0", "\u0661", " 1", "1,5", "1e2", "-0", "0.00000000001"])
def test_catalog_prices_outside_the_grammar_are_refused(runner, db, price):
    result = runner.invoke(args=["catalog", "set", "gpu.a100", "--name", "GPU", "--unit", "second",
                                 "--price", price, "--kind", "metered"])
    assert result.exit_code == 2, (price, result.output)
    assert "--price" in result.output


# --- 4. old, pre-organization and absurd usage ----------------------------------------


def test_usage_older_than_the_lookback_is_422_naming_it(client, db, acme):
    old = stamp(datetime.now(timezone.utc) - timedelta(days=36))
    response = post_usage(client, [event("ok", "acme", "egress.gb", "1"),
                                   event("old", "acme", "egress.gb", "1", occurred_at=old)])
    assert response.status_code == 422
    [problem] = response.get_json()["error"]["details"]
    assert problem["index"] == 1 and problem["id"] == "old"
    assert "35-day lookback" in problem["errors"][0]
    assert count(db, UsageEvent) == 0


def test_the_lookback_and_the_quantity_ceiling_are_configurable(app, client, db, acme, monkeypatch):
    monkeypatch.setitem(app.config, "USAGE_LOOKBACK_DAYS", 1)
    monkeypatch.setitem(app.config, "USAGE_MAX_QUANTITY", Decimal("10"))
    two_days = stamp(datetime.now(timezone.utc) - timedelta(days=2))
    response = post_usage(client, [event("a", "acme", "egress.gb", "1", occurred_at=two_days),
                                   event("b", "acme", "egress.gb", "11"), event("c", "acme", "egress.gb", "10")])
    assert response.status_code == 422
    details = response.get_json()["error"]["details"]
    assert [p["index"] for p in details] == [0, 1]
    assert "1-day lookback" in details[0]["errors"][0] and "larger than 10" in details[1]["errors"][0]
    assert count(db, UsageEvent) == 0


def test_the_default_quantity_ceiling_is_a_billion(client, db, acme):
    response = post_usage(client, [event("big", "acme", "egress.gb", "1000000000.000000001")])
    assert response.status_code == 422
    assert "larger than 1000000000" in response.get_json()["error"]["details"][0]["errors"][0]
    assert post_usage(client, [event("ok", "acme", "egress.gb", "1000000000")]).status_code == 200


def test_usage_from_before_the_organization_existed_is_422(client, db, make, acme):
    make.organization(slug="newco")
    before = stamp(datetime.now(timezone.utc) - timedelta(days=1))
    response = post_usage(client, [event("e1", "newco", "egress.gb", "1", occurred_at=before)])
    assert response.status_code == 422
    assert "before organization 'newco' existed" in response.get_json()["error"]["details"][0]["errors"][0]
    assert count(db, UsageEvent) == 0
    # A few minutes of clock skew are allowed, like the future check's.
    just_before = stamp(datetime.now(timezone.utc) - timedelta(minutes=1))
    assert post_usage(client, [event("e2", "newco", "egress.gb", "1", occurred_at=just_before)]).status_code == 200


# --- 5. an event id reused for different content --------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"quantity": "2"}, "quantity"), ({"organization": "other"}, "organization"), ({"product": "cpu"}, "product"),
    ({"resource": "vm-2"}, "resource"), ({"occurred_at": "-1h"}, "occurred_at"),
])
def test_an_event_id_resent_with_different_content_is_409(client, db, make, acme, change, field):
    make.organization(slug="other", created_at=datetime.now(timezone.utc) - timedelta(days=400))
    make.product("cpu", unit_price="1")
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    original = event("e1", "acme", "egress.gb", "1", occurred_at=stamp(at), resource="vm-1")
    assert post_usage(client, [original]).get_json() == {"accepted": 1, "duplicates": 0}
    if change.get("occurred_at") == "-1h":
        change = {"occurred_at": stamp(at - timedelta(hours=1))}
    changed = {**original, **change}
    response = post_usage(client, [event("new", "acme", "egress.gb", "5"), changed])
    assert response.status_code == 409
    error = response.get_json()["error"]
    assert error["code"] == "conflicting_events"
    assert [(c["index"], c["id"], c["fields"]) for c in error["details"]] == [(1, "e1", [field])]
    assert count(db, UsageEvent) == 1  # not even the new event of that batch
    db.session.rollback()
    assert db.session.scalar(select(Invoice.total_cents).where(Invoice.organization_id == acme[0].id)) == 200


def test_an_identical_resend_is_still_a_duplicate(client, db, acme):
    original = event("e1", "acme", "egress.gb", "1.50", resource="vm-1")
    assert post_usage(client, [original]).get_json() == {"accepted": 1, "duplicates": 0}
    same_value = {**original, "quantity": "1.5"}  # the same number, written differently
    assert post_usage(client, [original, same_value]).get_json() == {"accepted": 0, "duplicates": 2}
    assert count(db, UsageEvent) == 1


def test_one_id_twice_in_a_batch_with_different_content_is_409(client, db, acme):
    at = stamp(datetime.now(timezone.utc))
    response = post_usage(client, [event("e1", "acme", "egress.gb", "1", occurred_at=at),
                                   event("e1", "acme", "egress.gb", "3", occurred_at=at)])
    assert response.status_code == 409
    assert response.get_json()["error"]["details"][0]["index"] == 1
    assert count(db, UsageEvent) == 0


# --- 6. oversized bodies, chunked or not ----------------------------------------------


def _usage_body_padded_to(size: int) -> bytes:
    body = json.dumps({"events": [event("padded", "acme", "egress.gb", "1")]}).encode()
    return body + b" " * (size - len(body))


def test_a_chunked_usage_body_over_the_limit_is_413_and_stores_nothing(app, client, db, acme, monkeypatch):
    monkeypatch.setitem(app.config, "MAX_CONTENT_LENGTH", 4096)
    body = _usage_body_padded_to(4097)
    response = client.post("/api/v1/usage", input_stream=io.BytesIO(body),
                           headers={**HEADERS, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413
    assert count(db, UsageEvent) == 0
    # The same body within the limit, chunked, is read whole.
    response = client.post("/api/v1/usage", input_stream=io.BytesIO(body[:4096]),
                           headers={**HEADERS, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})
    assert response.get_json() == {"accepted": 1, "duplicates": 0}


def test_a_usage_body_over_the_limit_with_content_length_is_413(app, client, db, acme, monkeypatch):
    monkeypatch.setitem(app.config, "MAX_CONTENT_LENGTH", 4096)
    response = client.post("/api/v1/usage", data=_usage_body_padded_to(4097),
                           headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert count(db, UsageEvent) == 0


def test_a_chunked_webhook_over_the_limit_is_413(client, db, app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])
    body = event_body("evt_big")
    body += b" " * (512 * 1024 + 1 - len(body))
    response = client.post("/webhooks/stripe", input_stream=io.BytesIO(body),
                           headers={"Stripe-Signature": sign(body), "Content-Type": "application/json",
                                    "Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413
    assert count(db, StripeEvent) == 0


def test_a_chunked_body_over_8_mib_through_gunicorn_is_413(live_server, db, acme):
    body = _usage_body_padded_to(8 * 1024 * 1024 + 1)

    def chunks():
        for start in range(0, len(body), 1024 * 1024):
            yield body[start:start + 1024 * 1024]

    response = requests.post(live_server.url + "/api/v1/usage", data=chunks(), timeout=60,
                             headers={**HEADERS, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert count(db, UsageEvent) == 0


# --- 7. slugs and names ---------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"slug": "initech\n"}, {"slug": "initech\x00"}, {"name": "Initech\n"}, {"name": "Init\x00ech"},
    {"name": "Initech\x1b[31m"}, {"email": "ap@initech.example\n"}, {"email": "ap\x00@initech.example"},
    {"currency": "usd\n"},
])
def test_slugs_and_names_with_newlines_or_control_characters_are_422(client, db, change):
    body = {"slug": "initech", "name": "Initech", "email": "ap@initech.example", **change}
    response = client.post("/api/v1/organizations", json=body, headers=HEADERS)
    assert response.status_code == 422, change
    assert count(db, Organization) == 0


@pytest.mark.parametrize("change", [{"id": "e\x00"}, {"id": "e1\n"}, {"resource": "vm\x00"},
                                    {"organization": "acme\x00"}, {"product": "egress.gb\x00"}])
def test_usage_text_with_control_characters_is_422(client, db, acme, change):
    response = post_usage(client, [{**event("e1", "acme", "egress.gb", "1"), **change}])
    assert response.status_code == 422, change
    assert count(db, UsageEvent) == 0


def test_service_text_with_control_characters_is_422(client, db, acme):
    for body in ({"product": "ipv4\x00"}, {"product": "ipv4", "resource": "ip\x00"}):
        response = client.post("/api/v1/organizations/acme/services", json=body, headers=HEADERS)
        assert response.status_code == 422, body
    assert count(db, ServiceAttachment) == 0


def test_a_credit_reason_with_control_characters_is_refused(client, db, acme, support):
    page = client.post("/admin/orgs/acme/credits", data={"amount": "5", "reason": "Sorry\x00"},
                       follow_redirects=True).get_data(as_text=True)
    assert "No credit given" in page
    assert count(db, InvoiceItem) == 0


# --- 8. webhooks ----------------------------------------------------------------------


@pytest.fixture
def webhook_secret(app, monkeypatch):
    monkeypatch.setitem(app.config, "STRIPE_WEBHOOK_SECRETS", [SECRET])


def _event_json(**fields) -> bytes:
    payload = {"id": "evt_odd", "object": "event", "type": "invoice.paid", "created": int(time.time()),
               "data": {"object": {"object": "invoice", "id": "in_unknown"}}}
    payload.update(fields)
    return json.dumps(payload, allow_nan=True).encode()


@pytest.mark.parametrize("body", [
    _event_json(data={"object": {"object": "invoice", "id": "in_x", "amount_due": float("nan")}}),
    _event_json(data={"object": {"object": "invoice", "id": "in_x", "amount_due": float("inf")}}),
    _event_json(data={"object": {"object": "invoice", "id": "in_x", "amount_due": float("-inf")}}),
], ids=["NaN", "Infinity", "-Infinity"])
def test_webhooks_with_non_json_constants_are_400(client, db, webhook_secret, body):
    assert post_event(client, body, sign(body)).status_code == 400
    assert count(db, StripeEvent) == 0


@pytest.mark.parametrize("created", [10**30, 2**63, -1, 0, True, int(time.time()) + 10 * 86400])
def test_webhooks_with_created_out_of_range_are_400(client, db, webhook_secret, created):
    body = _event_json(created=created)
    assert post_event(client, body, sign(body)).status_code == 400, created
    assert count(db, StripeEvent) == 0


def test_a_webhook_signed_in_the_future_beyond_the_tolerance_is_400(client, db, webhook_secret):
    body = event_body("evt_future")
    response = post_event(client, body, sign(body, timestamp=int(time.time()) + 3600))
    assert response.status_code == 400
    assert count(db, StripeEvent) == 0
    # Within the tolerance (clock skew) it is accepted.
    assert post_event(client, body, sign(body, timestamp=int(time.time()) + 60)).status_code == 200


def test_a_webhook_with_a_non_numeric_signature_timestamp_is_400(client, db, webhook_secret):
    body = event_body("evt_odd_t")
    signature = sign(body).replace("t=", "t=12abc", 1)
    assert post_event(client, body, signature).status_code == 400
    assert count(db, StripeEvent) == 0


# --- 9. the SQLite database file ------------------------------------------------------


def test_the_sqlite_database_file_is_created_owner_only(tmp_path):
    from portal.database import configure_engine

    path = tmp_path / "portal.db"
    previous = os.umask(0o022)
    try:
        engine = create_engine(f"sqlite:///{path}")
        configure_engine(engine)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        engine.dispose()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for extra in tmp_path.glob("portal.db-*"):  # WAL and shared-memory files follow the database's mode
        assert stat.S_IMODE(extra.stat().st_mode) & 0o077 == 0, extra


def test_the_run_command_makes_the_instance_folder_owner_only(repo_root):
    assert "instance.mkdir(mode=0o700" in (repo_root / "run.py").read_text()

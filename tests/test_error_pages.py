"""Error pages inside the portal's layout with a way back; the favicon; the sign-out
message; no customer "Billing" link for support staff."""
from __future__ import annotations

import pytest
from flask import abort


@pytest.fixture
def initech(db, make):
    organization = make.organization(slug="initech", name="Initech")
    make.open_invoice(organization)
    make.user("member@example.com", organization=organization, role="member")
    make.user("staff@example.com", support=True)
    return organization


def in_layout(page: str) -> bool:
    return 'class="brand"' in page and "favicon.svg" in page and "portal.css" in page


def test_a_missing_page_is_the_portals_404_with_a_way_back(client, auth, initech):
    response = client.get("/no/such/page")
    page = response.get_data(as_text=True)
    assert response.status_code == 404 and in_layout(page)
    assert "There is nothing at this address" in page and 'href="/login">Sign in</a>' in page
    auth.login("member@example.com")
    page = client.get("/orgs/initech/invoices/999999").get_data(as_text=True)
    assert "There is nothing at this address" in page and 'href="/billing">Back to billing</a>' in page


def test_a_refusal_is_the_portals_403_with_the_reason(client, auth, initech):
    auth.login("member@example.com")
    response = client.post("/orgs/initech/services", data={"product": "x"})
    page = response.get_data(as_text=True)
    assert response.status_code == 403 and in_layout(page)
    assert "You cannot do that here" in page
    assert "Only an owner of the organization can change its services." in page


def test_the_api_keeps_answering_json(client):
    response = client.get("/api/v1/no-such-thing", headers={"Authorization": "Bearer test-token"})
    assert response.status_code == 404 and response.is_json


def test_a_server_error_is_the_portals_500(database_uri, redis_url):
    from config import TestConfig
    from portal import create_app

    class Config(TestConfig):
        SQLALCHEMY_DATABASE_URI = database_uri
        REDIS_URL = redis_url
        PROPAGATE_EXCEPTIONS = False  # as in production: the handler answers

    app = create_app(Config)

    @app.get("/broken")
    def broken():
        raise RuntimeError("a bug")

    @app.get("/refused")
    def refused():
        abort(403)

    client = app.test_client()
    response = client.get("/broken")
    page = response.get_data(as_text=True)
    assert response.status_code == 500 and in_layout(page)
    assert "Something went wrong on our side" in page and "a bug" not in page
    assert 'href="/login">Sign in</a>' in page
    assert client.get("/refused").status_code == 403


def test_favicon_is_served_and_linked(client):
    response = client.get("/static/favicon.svg")
    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    assert b"<svg" in response.get_data()
    assert 'rel="icon" type="image/svg+xml" href="/static/favicon.svg"' in client.get("/login").get_data(as_text=True)


def test_signing_out_says_so(client, auth, initech):
    auth.login("member@example.com")
    page = client.post("/logout", follow_redirects=True).get_data(as_text=True)
    assert "You are signed out." in page
    assert client.get("/orgs/initech/billing").status_code == 302  # and it is true


def test_support_staff_get_no_customer_billing_link(client, auth, initech):
    auth.login("staff@example.com")
    page = client.get("/admin/").get_data(as_text=True)
    assert 'href="/billing"' not in page and 'href="/admin/"' in page
    assert client.get("/billing").headers["Location"].endswith("/admin/")
    auth.logout()
    auth.login("member@example.com")
    assert 'href="/billing">Billing</a>' in client.get("/orgs/initech/billing").get_data(as_text=True)

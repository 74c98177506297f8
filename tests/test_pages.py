"""Signing in, and who sees which billing page."""
from __future__ import annotations

from decimal import Decimal

from portal.billing.pricing import add_quantity


def test_login_page_renders(client):
    response = client.get("/login")
    assert response.status_code == 200
    assert b"Sign in" in response.data


def test_wrong_password_is_refused(client, auth, make):
    make.user("ann@example.com")
    response = auth.login("ann@example.com", "not-the-password")
    assert response.status_code == 401
    assert b"Wrong email or password" in response.data


def test_member_of_one_organization_lands_on_its_billing_page(client, auth, make, db):
    organization = make.organization(name="Initech")
    product = make.product(unit_price="0.0011", name="Shared CPU")
    invoice = make.open_invoice(organization)
    add_quantity(invoice, product, "web-1", Decimal("1728000"))
    db.session.commit()
    make.user("ann@example.com", organization=organization)
    response = auth.login("ann@example.com")
    assert response.status_code == 302
    response = client.get("/billing", follow_redirects=True)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "Initech" in page and "web-1" in page and "$19.01" in page


def test_member_of_several_organizations_picks_one(client, auth, make):
    first, second = make.organization(name="First"), make.organization(name="Second")
    user = make.user("ann@example.com", organization=first)
    from portal.models import Membership

    make.db.session.add(Membership(user_id=user.id, organization_id=second.id))
    make.db.session.commit()
    auth.login("ann@example.com")
    page = client.get("/billing").get_data(as_text=True)
    assert "First" in page and "Second" in page


def test_customer_cannot_see_another_organizations_billing(client, auth, make):
    mine, theirs = make.organization(), make.organization()
    make.user("ann@example.com", organization=mine)
    auth.login("ann@example.com")
    assert client.get(f"/orgs/{theirs.slug}/billing").status_code == 404
    assert client.get(f"/orgs/{mine.slug}/billing").status_code == 200


def test_billing_requires_sign_in(client):
    response = client.get("/billing")
    assert response.status_code == 302
    assert "/login" in response.headers["Location"]


def test_admin_is_for_support_staff_only(client, auth, make):
    organization = make.organization(name="Umbrella")
    make.user("ann@example.com", organization=organization)
    make.user("staff@example.com", support=True)
    auth.login("ann@example.com")
    assert client.get("/admin/").status_code == 403
    auth.logout()
    auth.login("staff@example.com")
    response = client.get("/admin/")
    assert response.status_code == 200
    assert "Umbrella" in response.get_data(as_text=True)


def test_login_does_not_redirect_off_site(client, auth, make):
    make.user("ann@example.com", organization=make.organization())
    response = client.post("/login?next=//evil.example/", data={"email": "ann@example.com",
                                                                "password": "password123"})
    assert response.status_code == 302
    assert "evil.example" not in response.headers["Location"]

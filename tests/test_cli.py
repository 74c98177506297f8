"""The operator's commands."""
from __future__ import annotations

from sqlalchemy import func, select

from portal.models import Invoice, InvoiceItem, Membership, Organization, Product, User


def test_seed_demo_creates_data_once(runner, db):
    result = runner.invoke(args=["seed-demo"])
    assert result.exit_code == 0, result.output
    counts = {model: db.session.scalar(select(func.count()).select_from(model))
              for model in (Product, Organization, User, Invoice, InvoiceItem)}
    assert all(counts.values()), counts
    again = runner.invoke(args=["seed-demo"])
    assert again.exit_code == 0 and "nothing changed" in again.output
    assert counts == {model: db.session.scalar(select(func.count()).select_from(model)) for model in counts}


def test_seeded_invoice_totals_are_the_sum_of_their_items(runner, db):
    runner.invoke(args=["seed-demo"])
    for invoice in db.session.scalars(select(Invoice)):
        assert invoice.total_cents == sum(item.amount_cents for item in invoice.items) > 0


def test_demo_login_works(runner, client):
    runner.invoke(args=["seed-demo"])
    response = client.post("/login", data={"email": "alice@example.com", "password": "demo-password"})
    assert response.status_code == 302


def test_create_user_for_an_organization_with_password_on_stdin(runner, db, make):
    organization = make.organization(slug="acme")
    result = runner.invoke(args=["create-user", "Dee@Example.com", "--org", "acme", "--role", "owner",
                                 "--password-stdin"], input="long-enough-pw\n")
    assert result.exit_code == 0, result.output
    user = db.session.scalar(select(User).where(User.email == "dee@example.com"))
    assert user.check_password("long-enough-pw") and not user.is_support
    membership = db.session.scalar(select(Membership).where(Membership.user_id == user.id))
    assert membership.organization_id == organization.id and membership.role == "owner"


def test_create_support_user(runner, db):
    result = runner.invoke(args=["create-user", "staff@example.com", "--support", "--password-stdin"],
                           input="long-enough-pw\n")
    assert result.exit_code == 0, result.output
    assert db.session.scalar(select(User).where(User.email == "staff@example.com")).is_support


def test_create_user_refuses_bad_input_and_changes_nothing(runner, db, make):
    make.organization(slug="acme")
    cases = [
        ["create-user", "a@example.com", "--password-stdin"],  # neither --support nor --org
        ["create-user", "a@example.com", "--support", "--org", "acme", "--password-stdin"],
        ["create-user", "a@example.com", "--org", "nope", "--password-stdin"],
        ["create-user", "not-an-email", "--support", "--password-stdin"],
    ]
    for args in cases:
        assert runner.invoke(args=args, input="long-enough-pw\n").exit_code != 0, args
    short = runner.invoke(args=["create-user", "a@example.com", "--support", "--password-stdin"], input="short\n")
    assert short.exit_code != 0
    assert db.session.scalar(select(func.count()).select_from(User)) == 0


def test_catalog_is_editable_without_code(runner, db):
    created = runner.invoke(args=["catalog", "set", "gpu.a100", "--name", "A100 GPU", "--unit", "second",
                                  "--price", "0.0805", "--kind", "metered"])
    assert created.exit_code == 0, created.output
    assert runner.invoke(args=["catalog", "set", "gpu.a100", "--price", "0.07"]).exit_code == 0
    product = db.session.scalar(select(Product).where(Product.code == "gpu.a100"))
    db.session.refresh(product)
    assert str(product.unit_price.normalize()) == "0.07"
    assert "gpu.a100" in runner.invoke(args=["catalog", "list"]).output
    for bad in (["catalog", "set", "gpu.a100", "--price", "-1"], ["catalog", "set", "gpu.a100", "--price", "NaN"],
                ["catalog", "set", "new.thing", "--price", "1"], ["catalog", "set", "gpu.a100", "--kind", "recurring"]):
        assert runner.invoke(args=bad).exit_code != 0, bad
    db.session.refresh(product)
    assert str(product.unit_price.normalize()) == "0.07" and product.kind == "metered"


def test_seeded_usage_goes_through_ingestion_and_services_are_charged(runner, db):
    from portal.models import ServiceAttachment, UsageEvent

    runner.invoke(args=["seed-demo"])
    assert db.session.scalar(select(func.count()).select_from(UsageEvent)) == 7
    assert db.session.scalar(select(func.count()).select_from(ServiceAttachment)) == 2


def test_the_portals_own_credit_product_is_not_edited_from_the_catalog_commands(runner, db):
    from decimal import Decimal

    db.session.add(Product(code="portal.credit", name="Credit", unit="credit", unit_price=Decimal(0), kind="credit",
                           active=False))
    db.session.commit()
    assert runner.invoke(args=["catalog", "set", "portal.credit", "--active"]).exit_code != 0
    db.session.rollback()
    assert db.session.scalar(select(Product.active).where(Product.code == "portal.credit")) is False

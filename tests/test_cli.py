"""The operator's commands."""
from __future__ import annotations

from sqlalchemy import func, select

from portal.models import Invoice, InvoiceItem, Membership, Organization, Product, User

SEEDED = {Product: 6, Organization: 2, User: 3, Invoice: 2, InvoiceItem: 9}  # 7 usage items, 2 services


def _counts(db) -> dict:
    return {model: db.session.scalar(select(func.count()).select_from(model)) for model in SEEDED}


def _seed(runner) -> None:
    result = runner.invoke(args=["seed-demo"])
    assert (result.exit_code, result.output) == (0, "Demo data created.\n"), result.output


def test_seed_demo_creates_data_once(runner, db):
    _seed(runner)
    assert _counts(db) == SEEDED
    again = runner.invoke(args=["seed-demo"])
    assert (again.exit_code, again.output) == (0, "Demo data already present; nothing changed.\n")
    assert _counts(db) == SEEDED


def test_seeded_invoice_totals_are_the_sum_of_their_items(runner, db):
    _seed(runner)
    invoices = db.session.scalars(select(Invoice).order_by(Invoice.id)).all()
    assert [invoice.organization.slug for invoice in invoices] == ["acme", "globex"]
    for invoice in invoices:
        assert invoice.total_cents == sum(item.amount_cents for item in invoice.items) > 0


def test_demo_login_works(runner, client):
    _seed(runner)
    response = client.post("/login", data={"email": "alice@example.com", "password": "demo-password"})
    assert (response.status_code, response.headers["Location"]) == (302, "/billing")


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
    cases = [  # click: 2 for a usage error, 1 for a refusal
        (["create-user", "a@example.com", "--password-stdin"], 2,  # neither --support nor --org
         "Error: give exactly one of --support or --org SLUG\n"),
        (["create-user", "a@example.com", "--support", "--org", "acme", "--password-stdin"], 2,
         "Error: give exactly one of --support or --org SLUG\n"),
        (["create-user", "a@example.com", "--org", "nope", "--password-stdin"], 1,
         "Error: no organization with slug 'nope'\n"),
        (["create-user", "not-an-email", "--support", "--password-stdin"], 2,
         "Error: Invalid value for EMAIL: not an email address\n"),
    ]
    for args, code, message in cases:
        result = runner.invoke(args=args, input="long-enough-pw\n")
        assert result.exit_code == code and result.output.endswith(message), (args, result.output)
    short = runner.invoke(args=["create-user", "a@example.com", "--support", "--password-stdin"], input="short\n")
    assert (short.exit_code, short.output) == (1, "Error: the password must have at least 8 characters\n")
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
    not_a_price = "Error: Invalid value for --price: must be a finite, non-negative number of cents\n"
    for bad, code, message in (
            (["catalog", "set", "gpu.a100", "--price", "-1"], 2, not_a_price),
            (["catalog", "set", "gpu.a100", "--price", "NaN"], 2, not_a_price),
            (["catalog", "set", "new.thing", "--price", "1"], 2, "Error: a new product needs --name, --unit, --kind\n"),
            (["catalog", "set", "gpu.a100", "--kind", "recurring"], 1,
             "Error: a product's kind cannot change; create a new product instead\n")):
        result = runner.invoke(args=bad)
        assert result.exit_code == code and result.output.endswith(message), (bad, result.output)
    db.session.refresh(product)
    assert str(product.unit_price.normalize()) == "0.07" and product.kind == "metered"


def test_seeded_usage_goes_through_ingestion_and_services_are_charged(runner, db):
    from portal.models import ServiceAttachment, UsageEvent

    _seed(runner)
    assert db.session.scalar(select(func.count()).select_from(UsageEvent)) == 7
    assert db.session.scalar(select(func.count()).select_from(ServiceAttachment)) == 2


def test_the_portals_own_credit_product_is_not_edited_from_the_catalog_commands(runner, db):
    from decimal import Decimal

    db.session.add(Product(code="portal.credit", name="Credit", unit="credit", unit_price=Decimal(0), kind="credit",
                           active=False))
    db.session.commit()
    result = runner.invoke(args=["catalog", "set", "portal.credit", "--active"])
    assert (result.exit_code, result.output) == (
        1, "Error: portal.credit is the portal's own credit product; it is not edited here\n")
    db.session.rollback()
    assert db.session.scalar(select(Product.active).where(Product.code == "portal.credit")) is False

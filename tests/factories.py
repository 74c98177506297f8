"""Small factories: each test builds the little data it needs."""
from __future__ import annotations

import itertools
from datetime import datetime
from decimal import Decimal

from portal.billing.invoices import ensure_open_invoice
from portal.models import Membership, Organization, Product, User

_sequence = itertools.count(1)


class Factories:
    def __init__(self, db):
        self.db = db

    def organization(self, **fields) -> Organization:
        n = next(_sequence)
        values = {"slug": f"org-{n}", "name": f"Org {n}", "billing_email": f"billing{n}@example.com",
                  "currency": "usd", "cycle_anchor_day": 1}
        values.update(fields)
        organization = Organization(**values)
        self.db.session.add(organization)
        self.db.session.commit()
        return organization

    def product(self, code: str | None = None, unit_price: str = "1", kind: str = "metered", **fields) -> Product:
        n = next(_sequence)
        product = Product(code=code or f"product.{n}", name=fields.pop("name", f"Product {n}"),
                          unit=fields.pop("unit", "unit"), unit_price=Decimal(unit_price), kind=kind, **fields)
        self.db.session.add(product)
        self.db.session.commit()
        return product

    def user(self, email: str | None = None, password: str = "password123", *, support: bool = False,
             organization: Organization | None = None, role: str = "member") -> User:
        user = User(email=email or f"user{next(_sequence)}@example.com", is_support=support)
        user.set_password(password)
        self.db.session.add(user)
        if organization is not None:
            self.db.session.add(Membership(user=user, organization=organization, role=role))
        self.db.session.commit()
        return user

    def open_invoice(self, organization: Organization, at: datetime | None = None):
        invoice = ensure_open_invoice(organization, at)
        self.db.session.commit()
        return invoice

    def quantity(self, value: str) -> Decimal:
        return Decimal(value)

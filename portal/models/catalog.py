"""The catalog: what the platform sells and at what price. Data, not code."""
from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Boolean, CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from portal.extensions import db
from portal.models.types import PRICE, BigIntPK

# `credit` is the portal's own product for support's credits (negative lines); it is
# never sold (inactive), so the catalog, usage and services never offer it.
PRODUCT_KINDS = ("metered", "recurring", "credit")


class Product(db.Model):
    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint(f"kind IN ({', '.join(repr(kind) for kind in PRODUCT_KINDS)})", name="kind_known"),
        CheckConstraint("unit_price >= 0", name="unit_price_non_negative"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    code: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    unit: Mapped[str] = mapped_column(String(50))
    # Decimal cents per unit (metered) or per unit per billing cycle (recurring).
    unit_price: Mapped[Decimal] = mapped_column(PRICE)
    kind: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    def __repr__(self) -> str:
        return f"<Product {self.code}>"

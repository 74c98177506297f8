"""Organizations, users and who belongs where."""
from __future__ import annotations

from datetime import datetime

from flask_login import UserMixin
from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from portal import passwords
from portal.extensions import db
from portal.models.types import BigIntPK, UTCDateTime, utcnow


def _trigram_index(name: str, column: str) -> Index:
    """An index that serves `column ILIKE '%term%'` on PostgreSQL (pg_trgm)."""
    return Index(name, column, postgresql_using="gin", postgresql_ops={column: "gin_trgm_ops"})


class Organization(db.Model):
    __tablename__ = "organizations"
    __table_args__ = (
        CheckConstraint("cycle_anchor_day BETWEEN 1 AND 31", name="cycle_anchor_day_range"),
        CheckConstraint("currency = lower(currency) AND length(currency) = 3", name="currency_iso"),
        # Support's search: "contains" on slug, name and billing email through trigram
        # indexes on PostgreSQL (plain indexes on SQLite), and the list in name order.
        Index("ix_organizations_name_id", "name", "id"),
        *(_trigram_index(f"ix_organizations_{column}_trgm", column) for column in ("slug", "name", "billing_email")),
        # Support's "credit balance" filter: Stripe owes the customer.
        Index("ix_organizations_credit_balance", "id",
              postgresql_where=text("stripe_balance_cents < 0"), sqlite_where=text("stripe_balance_cents < 0")),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    billing_email: Mapped[str] = mapped_column(String(254))
    currency: Mapped[str] = mapped_column(String(3), default="usd")
    # Day of the month a billing cycle starts; 29-31 fall back to a short month's last day.
    cycle_anchor_day: Mapped[int] = mapped_column(Integer, default=1)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    # The Stripe customer's default payment method ("visa •••• 4242"), None when it
    # has none, and its balance (positive: owed, collected with the next invoice),
    # as the latest customer event re-read from Stripe said (`created` of that event).
    payment_method: Mapped[str | None] = mapped_column(String(120))
    stripe_balance_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    stripe_customer_seen_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    memberships: Mapped[list[Membership]] = relationship(back_populates="organization")

    def __repr__(self) -> str:
        return f"<Organization {self.slug}>"


class User(UserMixin, db.Model):
    __tablename__ = "users"
    __table_args__ = (_trigram_index("ix_users_email_trgm", "email"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(String(255))
    is_support: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Part of the id kept in the session cookie: signing out and a new password move
    # it on, so every cookie issued before no longer signs anyone in.
    session_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    memberships: Mapped[list[Membership]] = relationship(back_populates="user")

    def get_id(self) -> str:
        return f"{self.id}:{self.session_version or 0}"

    def end_sessions(self) -> None:
        """Make every session cookie issued to this user so far useless (the caller commits)."""
        self.session_version = (self.session_version or 0) + 1

    def set_password(self, password: str) -> None:
        """A new password (argon2id); it ends the user's sessions when it replaces one."""
        if self.password_hash is not None:
            self.end_sessions()
        self.password_hash = passwords.hash_password(password)

    def check_password(self, password: str) -> bool:
        return passwords.verify_password(self.password_hash, password)

    def password_needs_rehash(self) -> bool:
        return passwords.needs_rehash(self.password_hash)

    def rehash_password(self, password: str) -> None:
        """The same password, hashed again at today's cost (sessions carry on)."""
        self.password_hash = passwords.hash_password(password)

    def __repr__(self) -> str:
        return f"<User {self.email}>"


class Membership(db.Model):
    __tablename__ = "memberships"
    __table_args__ = (CheckConstraint("role IN ('owner', 'member')", name="role_known"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    organization_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16), default="member")

    user: Mapped[User] = relationship(back_populates="memberships")
    organization: Mapped[Organization] = relationship(back_populates="memberships")

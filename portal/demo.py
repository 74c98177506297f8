"""Demo data for the embedded default: a catalog, organizations, users and usage."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from sqlalchemy import select

from portal.billing.invoices import ensure_open_invoice
from portal.billing.services import attach_service
from portal.billing.usage import ingest_usage
from portal.extensions import db
from portal.models import Membership, Organization, Product, User
from portal.models.types import utcnow

DEMO_PASSWORD = "demo-password"
DEMO_LOGINS = (
    ("alice@example.com", "owner of Acme Cloud"),
    ("bob@example.com", "member of Acme Cloud and Globex"),
    ("support@example.com", "support staff"),
)

CATALOG = (
    # code, name, unit, unit price in decimal cents, kind
    ("machines.shared-cpu-1x", "Shared CPU 1x machine", "second", "0.0011", "metered"),
    ("machines.performance-2x", "Performance 2x machine", "second", "0.0172", "metered"),
    ("volumes.gb", "Volume storage", "GB-hour", "0.0208", "metered"),
    ("egress.gb", "Outbound data transfer", "GB", "2", "metered"),
    ("ipv4.dedicated", "Dedicated IPv4 address", "address per month", "200", "recurring"),
    ("support.standard", "Standard support", "plan per month", "2900", "recurring"),
)


def seed() -> bool:
    """Create the demo data unless it is there already. Returns whether it created it."""
    if db.session.scalar(select(User).where(User.email == DEMO_LOGINS[0][0])):
        return False
    products = {}
    for code, name, unit, price, kind in CATALOG:
        product = db.session.scalar(select(Product).where(Product.code == code))
        if product is None:
            product = Product(code=code, name=name, unit=unit, unit_price=Decimal(price), kind=kind)
            db.session.add(product)
        products[code] = product
    # Customers for a while: their usage goes back to the start of the current cycle,
    # and usage from before an organization existed is refused.
    since = utcnow() - timedelta(days=90)
    acme = Organization(slug="acme", name="Acme Cloud", billing_email="billing@acme.example", cycle_anchor_day=1,
                        created_at=since)
    globex = Organization(slug="globex", name="Globex", billing_email="ap@globex.example", cycle_anchor_day=15,
                          created_at=since)
    users = {}
    for email, _ in DEMO_LOGINS:
        user = User(email=email, name=email.split("@")[0].title(), is_support=email.startswith("support"))
        user.set_password(DEMO_PASSWORD)
        users[email] = user
    db.session.add_all([acme, globex, *users.values()])
    db.session.add_all(
        [
            Membership(user=users["alice@example.com"], organization=acme, role="owner"),
            Membership(user=users["bob@example.com"], organization=acme, role="member"),
            Membership(user=users["bob@example.com"], organization=globex, role="owner"),
        ]
    )
    db.session.flush()
    now = utcnow()
    usage = {
        acme: [
            ("machines.shared-cpu-1x", "app-web-1", "1728000"),
            ("machines.shared-cpu-1x", "app-web-2", "1296000.5"),
            ("machines.performance-2x", "db-primary", "864000"),
            ("volumes.gb", "vol-db-data", "7200"),
            ("egress.gb", "", "312.75"),
        ],
        globex: [
            ("machines.shared-cpu-1x", "worker-1", "432000"),
            ("egress.gb", "", "18.2"),
        ],
    }
    events = []
    for organization, lines in usage.items():
        invoice = ensure_open_invoice(organization, now)
        # Spread over the part of the cycle that has passed, as sub-systems report it.
        span = max(60, int((now - invoice.period_start).total_seconds()) - 60)
        for n, (code, resource, quantity) in enumerate(lines):
            at = now - timedelta(seconds=span * (n + 1) // (len(lines) + 1))
            events.append({"id": f"demo-{organization.slug}-{n}", "organization": organization.slug,
                           "product": code, "quantity": quantity, "resource": resource,
                           "occurred_at": at.isoformat()})
    ingest_usage("demo", events, now=now)
    attach_service(acme, products["ipv4.dedicated"], Decimal(2), "edge-ips", now=now - timedelta(hours=6))
    attach_service(acme, products["support.standard"], Decimal(1), "", now=now - timedelta(days=1))
    return True

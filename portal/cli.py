"""Operations as Flask CLI commands: `flask --app wsgi <command>`."""
from __future__ import annotations

import sys

import click
from flask import Flask
from sqlalchemy import select

from portal.extensions import db
from portal.models import Membership, Organization, User


def _needs_redis(command):
    """Commands that lock invoices or queue jobs: Redis down is a one-line error."""
    import functools

    from redis.exceptions import RedisError

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RedisError as error:
            raise click.ClickException(f"Redis (REDIS_URL) does not answer: {error}; start it and run again") \
                from error
    return run


def register_commands(app: Flask) -> None:
    app.cli.add_command(seed_demo)
    app.cli.add_command(create_user)
    app.cli.add_command(sync)
    app.cli.add_command(schedule)
    app.cli.add_command(close_cycle)
    app.cli.add_command(catalog)
    app.cli.add_command(stripe_portal_configuration)
    app.cli.add_command(stripe_check)
    app.cli.add_command(demo_setup)
    from portal.mail import outbox_cli

    app.cli.add_command(outbox_cli)


@click.group("catalog")
def catalog() -> None:
    """The catalog of products: data, editable without code.

    A price change applies to items created from then on; an item already on an
    open invoice keeps the unit price it started the cycle with."""


@catalog.command("list")
def catalog_list() -> None:
    """Every product: code, kind, unit price (decimal cents), unit, name."""
    from portal.models import Product

    for product in db.session.scalars(select(Product).order_by(Product.code)):
        state = "" if product.active else "  (no longer sold)"
        click.echo(f"{product.code:32} {product.kind:9} {product.unit_price.normalize():>14f} cents per "
                   f"{product.unit}  {product.name}{state}")


@catalog.command("set")
@click.argument("code")
@click.option("--name")
@click.option("--unit")
@click.option("--price", help="Unit price in decimal cents, e.g. 0.0011.")
@click.option("--kind", type=click.Choice(["metered", "recurring"]))
@click.option("--active/--inactive", default=None, help="Whether it is still sold.")
def catalog_set(code: str, name: str | None, unit: str | None, price: str | None, kind: str | None,
                active: bool | None) -> None:
    """Create or change a product."""
    from decimal import Decimal

    from portal import money
    from portal.models import AuditEntry, Product

    product = db.session.scalar(select(Product).where(Product.code == code))
    if price is not None:
        try:  # the money module's one decimal grammar: plain digits, not negative
            price_value = money.parse_decimal(price, field="the price")
        except money.MoneyError:
            raise click.BadParameter("must be a finite, non-negative number of cents", param_hint="--price") \
                from None
        if price_value != price_value.quantize(Decimal("1e-10")) or price_value >= Decimal("1e14"):
            raise click.BadParameter("at most 10 decimal places and 14 digits before the point",
                                     param_hint="--price")
    if product is None:
        missing = [flag for flag, value in (("--name", name), ("--unit", unit), ("--price", price),
                                            ("--kind", kind)) if value is None]
        if missing:
            raise click.UsageError(f"a new product needs {', '.join(missing)}")
        product = Product(code=code, name=name, unit=unit, unit_price=price_value, kind=kind,
                          active=True if active is None else active)
        db.session.add(product)
        action = "catalog.create"
    else:
        if product.kind not in ("metered", "recurring"):
            raise click.ClickException(f"{code} is the portal's own {product.kind} product; it is not edited here")
        if kind is not None and kind != product.kind:
            raise click.ClickException("a product's kind cannot change; create a new product instead")
        for field, value in (("name", name), ("unit", unit), ("active", active)):
            if value is not None:
                setattr(product, field, value)
        if price is not None:
            product.unit_price = price_value
        action = "catalog.update"
    db.session.flush()
    db.session.add(AuditEntry(actor="cli", action=action, object_type="product", object_id=str(product.id),
                              details={"code": code, "name": product.name, "unit": product.unit,
                                       "unit_price": str(product.unit_price), "active": product.active}))
    db.session.commit()
    click.echo(f"{action.split('.')[1]}d {code}")


@click.command("stripe-portal-configuration")
@click.option("--return-url", required=True, help="Where Stripe's portal links back to, e.g. https://billing.example/billing.")
def stripe_portal_configuration(return_url: str) -> None:
    """Create a Stripe customer-portal configuration (update payment methods, see
    invoices) and print its id, for STRIPE_PORTAL_CONFIGURATION. Stripe refuses
    portal sessions until the account has a default one (saved in the Dashboard)
    or the session names one."""
    from portal.stripe_gateway import StripeFailure, gateway

    params = {
        "business_profile": {"headline": "Manage how you pay your invoices"},
        "default_return_url": return_url,
        "features": {"payment_method_update": {"enabled": True}, "invoice_history": {"enabled": True},
                     "customer_update": {"enabled": True, "allowed_updates": ["email", "address"]}},
        "metadata": {"created_by": "portal"},
    }
    try:
        configuration = gateway().create_portal_configuration(params)
    except StripeFailure as failure:
        raise click.ClickException(f"Stripe refused: {failure}") from failure
    click.echo(configuration.id)


@click.command("stripe-check")
@click.option("--forwarded", is_flag=True,
              help="Events reach the portal through `stripe listen`: no webhook endpoint is needed.")
@click.option("--url", "portal_url", help="The portal's public address; its endpoint must be URL/webhooks/stripe.")
def stripe_check(forwarded: bool, portal_url: str | None) -> None:
    """Check STRIPE_API_KEY and STRIPE_WEBHOOK_SECRET against Stripe (reads only):
    test or live mode, API versions, the webhook endpoint and its events, and account
    features the portal does not model. Exits 1 on any FAIL."""
    from flask import current_app

    from portal.stripe_check import check

    report = check(current_app.config, forwarded=forwarded, portal_url=portal_url)
    for line in report.lines():
        click.echo(line)
    if report.failed:
        sys.exit(1)


@click.command("close-cycle")
@click.option("--org", "org_slug", help="Close this organization's open invoice now, whatever its period.")
@click.option("--due", is_flag=True, help="Close every invoice whose period has ended.")
@_needs_redis
def close_cycle(org_slug: str | None, due: bool) -> None:
    """End-of-cycle close: final sync, finalize at Stripe, open the next invoice."""
    from portal.billing.closing import CloseError, due_invoice_ids
    from portal.billing.closing import close_cycle as close
    from portal.billing.invoices import open_invoice

    if bool(org_slug) == due:
        raise click.UsageError("give exactly one of --org SLUG or --due")
    if org_slug:
        organization = db.session.scalar(select(Organization).where(Organization.slug == org_slug))
        if organization is None:
            raise click.ClickException(f"no organization {org_slug!r}")
        invoice = open_invoice(organization)
        if invoice is None:
            raise click.ClickException(f"{org_slug!r} has no open invoice")
        targets = [(invoice.id, True)]
    else:
        targets = [(invoice_id, False) for invoice_id in due_invoice_ids()]
    db.session.rollback()
    failed = 0
    for invoice_id, end_now in targets:
        try:
            click.echo(f"invoice {invoice_id}: {close(invoice_id, end_now=end_now)}")
        except CloseError as error:
            failed += 1
            click.echo(f"invoice {invoice_id}: not closed yet: {error}", err=True)
    if not targets:
        click.echo("Nothing to close.")
    if failed:
        raise click.ClickException(f"{failed} invoice(s) could not be closed now; run again later")


@click.command("sync")
@click.option("--invoice", "invoice_id", type=int, help="Sync this invoice.")
@click.option("--all-dirty", is_flag=True, help="Sync every invoice with changes not yet at Stripe.")
@click.option("--now", is_flag=True, help="Run in the foreground instead of queueing jobs.")
@_needs_redis
def sync(invoice_id: int | None, all_dirty: bool, now: bool) -> None:
    """Enqueue syncs of invoices with Stripe (or run them now with --now)."""
    from portal.billing.sync import sync_invoice, unsynced_invoice_ids
    from portal.billing.sync_queue import enqueue_sync
    from portal.models import Invoice

    if bool(invoice_id) == all_dirty:
        raise click.UsageError("give exactly one of --invoice ID or --all-dirty")
    if invoice_id and db.session.get(Invoice, invoice_id) is None:
        raise click.ClickException(f"no invoice {invoice_id}")
    ids = [invoice_id] if invoice_id else unsynced_invoice_ids()
    db.session.rollback()
    for one in ids:
        if now:
            run = sync_invoice(one, trigger="manual")
            click.echo(f"invoice {one}: {run.outcome} (created {run.created}, updated {run.updated}, "
                       f"deleted {run.deleted}, unchanged {run.unchanged}; {run.stripe_calls} Stripe calls)"
                       + (f": {run.error}" if run.error else ""))
        else:
            click.echo(f"invoice {one}: queued job {enqueue_sync(one, trigger='manual')}")
    if not ids:
        click.echo("Nothing to sync.")


@click.command("schedule")
def schedule() -> None:
    """Register the periodic jobs with rq-scheduler (idempotent: fixed job ids)."""
    from flask import current_app

    from portal.queue import redis_connection
    from portal.schedule import schedule_periodic_jobs

    report = schedule_periodic_jobs(redis_connection(), current_app.config)
    for state in ("added", "kept", "removed"):
        for job_id in report[state]:
            click.echo(f"{state}: {job_id}")


@click.command("seed-demo")
def seed_demo() -> None:
    """A catalog, organizations, users and usage to look at (safe to run twice)."""
    from portal.demo import seed

    created = seed()
    db.session.commit()
    click.echo("Demo data created." if created else "Demo data already present; nothing changed.")


@click.command("demo-setup")
@click.pass_context
def demo_setup(context: click.Context) -> None:
    """What the run command does at each start, in one process (one app start instead
    of three): apply migrations, seed the demo data (safe to run twice) and register
    the periodic jobs."""
    from flask_migrate import upgrade

    upgrade()
    context.invoke(seed_demo)
    context.invoke(schedule)


@click.command("create-user")
@click.argument("email")
@click.option("--support", is_flag=True, help="A support staff account (sees every organization).")
@click.option("--org", "org_slug", help="Make the user a member of this organization.")
@click.option("--role", type=click.Choice(["owner", "member"]), default="member", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def create_user(email: str, support: bool, org_slug: str | None, role: str, password_stdin: bool) -> None:
    """Create a user: support staff (--support) or a member of an organization (--org)."""
    if support == bool(org_slug):
        raise click.UsageError("give exactly one of --support or --org SLUG")
    email = email.strip().lower()
    if "@" not in email:
        raise click.BadParameter("not an email address", param_hint="EMAIL")
    if db.session.scalar(select(User).where(User.email == email)):
        raise click.ClickException(f"a user with email {email} exists already")
    organization = None
    if org_slug:
        organization = db.session.scalar(select(Organization).where(Organization.slug == org_slug))
        if organization is None:
            raise click.ClickException(f"no organization with slug {org_slug!r}")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise click.ClickException("the password must have at least 8 characters")
    user = User(email=email, is_support=support)
    user.set_password(password)
    db.session.add(user)
    if organization is not None:
        db.session.add(Membership(user=user, organization=organization, role=role))
    db.session.commit()
    click.echo(f"Created {'support user' if support else role} {email}.")

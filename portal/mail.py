"""Sending the outbox's mails through SMTP, when SMTP is configured.

`deliver_outbox()` sends the unsent mails oldest first, each in its own transaction:
the row is locked (FOR UPDATE SKIP LOCKED on PostgreSQL, so two drainers never send
one mail twice), sent, and marked sent. Without `SMTP_HOST` nothing is sent and the
mails stay queued, visible in the outbox. A failed send is counted and kept for the
next run. Delivery is at least once: a crash between the server's acceptance and the
commit sends that one mail again on the next run.
"""
from __future__ import annotations

import smtplib
from dataclasses import dataclass
from email.message import EmailMessage

import click
from flask import current_app
from sqlalchemy import select

from portal.extensions import db
from portal.models import OutboxMail
from portal.models.types import utcnow

SMTP_TIMEOUT_SECONDS = 10


@dataclass
class DeliveryReport:
    sent: int = 0
    failed: int = 0
    queued: int = 0  # left unsent: SMTP is not configured
    configured: bool = True

    def as_dict(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "queued": self.queued, "configured": self.configured}


def smtp_configured() -> bool:
    return bool(current_app.config.get("SMTP_HOST"))


def _message(mail: OutboxMail) -> EmailMessage:
    message = EmailMessage()
    message["From"] = current_app.config["SMTP_FROM"]
    message["To"] = mail.recipient
    message["Subject"] = mail.subject
    message["Message-ID"] = f"<outbox-{mail.id}@{current_app.config['SMTP_FROM'].rpartition('@')[2] or 'portal'}>"
    message.set_content(mail.body)
    return message


def _connect() -> smtplib.SMTP:
    config = current_app.config
    smtp = smtplib.SMTP(config["SMTP_HOST"], config["SMTP_PORT"], timeout=SMTP_TIMEOUT_SECONDS)
    if config.get("SMTP_STARTTLS"):
        smtp.starttls()
    if config.get("SMTP_USERNAME"):
        smtp.login(config["SMTP_USERNAME"], config.get("SMTP_PASSWORD") or "")
    return smtp


def _next_unsent() -> OutboxMail | None:
    query = select(OutboxMail).where(OutboxMail.sent_at.is_(None)).order_by(OutboxMail.id).limit(1)
    if db.engine.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return db.session.scalar(query)


def deliver_outbox(limit: int = 200) -> DeliveryReport:
    """Send up to `limit` unsent mails (see the module's docstring). Safe to run twice."""
    report = DeliveryReport()
    if not smtp_configured():
        report.configured = False
        report.queued = db.session.query(OutboxMail).filter(OutboxMail.sent_at.is_(None)).count()
        return report
    smtp = None
    try:
        while report.sent + report.failed < limit:
            mail = _next_unsent()
            if mail is None:
                db.session.rollback()
                break
            mail.attempts += 1
            try:
                smtp = smtp or _connect()
                smtp.send_message(_message(mail))
            except (OSError, smtplib.SMTPException) as error:
                mail.last_error = f"{type(error).__name__}: {error}"[:2000]
                db.session.commit()
                report.failed += 1
                break  # the server is in trouble: the next run tries again
            mail.sent_at = utcnow()
            mail.last_error = None
            db.session.commit()
            report.sent += 1
    finally:
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
    return report


@click.group("outbox")
def outbox_cli() -> None:
    """The mails the portal has to send (spend alerts), and their state."""


@outbox_cli.command("list")
@click.option("--all", "show_all", is_flag=True, help="Sent mails too, not only those waiting.")
def outbox_list(show_all: bool) -> None:
    """Mails waiting to be sent (with --all, every mail), oldest first."""
    query = select(OutboxMail).order_by(OutboxMail.id)
    if not show_all:
        query = query.where(OutboxMail.sent_at.is_(None))
    for mail in db.session.scalars(query):
        state = f"sent {mail.sent_at:%Y-%m-%d %H:%M}" if mail.sent_at else f"waiting ({mail.attempts} attempts)"
        click.echo(f"{mail.id:>6}  {mail.created_at:%Y-%m-%d %H:%M}  {state:24} {mail.recipient}  {mail.subject}")
        if mail.last_error and not mail.sent_at:
            click.echo(f"        last error: {mail.last_error}")


@outbox_cli.command("send")
def outbox_send() -> None:
    """Send the waiting mails now, through SMTP_HOST (the job does it every minute)."""
    report = deliver_outbox()
    if not report.configured:
        raise click.ClickException(f"SMTP_HOST is not set: {report.queued} mail(s) stay queued")
    click.echo(f"sent {report.sent}, failed {report.failed}")
    if report.failed:
        raise SystemExit(1)

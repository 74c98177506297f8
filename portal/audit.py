"""The support audit: every support action, who, what, when and why, append-only.

`record_support_action` is the one way support's actions are recorded (the admin
actions, the recovery actions, sign-in). It adds the entry to the session and leaves
the commit to its caller, so the entry and the change it describes commit together
or not at all. Nothing changes or removes an entry afterwards: the database refuses
it (see portal/models/audit.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from portal.extensions import db
from portal.models import AuditEntry, Invoice, Organization, User
from portal.text import has_control_characters

MAX_REASON_LENGTH = 500

# The actions support can take, as recorded (the audit page filters by them).
SUPPORT_ACTIONS = {
    "support.sign_in": "Signed in",
    "invoice.sync_now": "Sync now",
    "invoice.close_cycle_now": "Close cycle now",
    "invoice.credit": "Credit added",
    "invoice.credit_removed": "Credit removed",
    "job.enqueue_failed": "Job not queued",
    "recovery": "Recovery (any)",
    "stripe_event.reprocess": "Stripe event reprocessed",
    "job.requeue": "Job requeued",
}


class ReasonError(ValueError):
    """A reason that cannot be recorded (too long, control characters, or missing when required)."""


def clean_reason(reason: object, required: bool = True) -> str | None:
    """The reason as recorded: whitespace collapsed; None when empty and not required."""
    if reason is not None and not isinstance(reason, str):
        raise ReasonError("the reason must be text")
    if has_control_characters(reason or "", allow_whitespace=True):
        raise ReasonError("the reason holds control characters")
    text = " ".join((reason or "").split())
    if not text:
        if required:
            raise ReasonError("a reason is required")
        return None
    if len(text) > MAX_REASON_LENGTH:
        raise ReasonError(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    return text


def record_support_action(
    actor: User | str,
    action: str,
    organization: Organization | None = None,
    invoice: Invoice | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Record that `actor` (a user, or a name such as "cli") did `action` (dotted, e.g.
    "invoice.credit", "recovery.recreate_draft") to `invoice` and/or `organization`,
    for `reason`, with `detail` (JSON-serialisable facts: amounts in cents, ids, job ids).
    The organization defaults to the invoice's. The caller commits."""
    if organization is None and invoice is not None:
        organization = invoice.organization
    if invoice is not None:
        object_type, object_id = "invoice", invoice.id
    elif organization is not None:
        object_type, object_id = "organization", organization.id
    else:
        object_type, object_id = "portal", ""
    entry = AuditEntry(
        actor_user_id=actor.id if isinstance(actor, User) else None,
        actor=actor.email if isinstance(actor, User) else str(actor),
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        organization_id=organization.id if organization is not None else None,
        invoice_id=invoice.id if invoice is not None else None,
        reason=clean_reason(reason, required=False),
        # The slug at the time, which the audit page shows and links.
        details={**({"organization": organization.slug} if organization is not None else {}), **(detail or {})},
    )
    db.session.add(entry)
    return entry


AUDIT_PER_PAGE = 50


@dataclass
class AuditPage:
    entries: list[AuditEntry]
    page: int
    has_next: bool


def audit_page(actor: str = "", action: str = "", organization: Organization | None = None,
               since: datetime | None = None, until: datetime | None = None, page: int = 1,
               per_page: int = AUDIT_PER_PAGE) -> AuditPage:
    """One page of the audit, newest first, filtered by actor (email or name, exactly),
    action (exact; "recovery" takes every recovery action), organization
    and time [since, until)."""
    query = select(AuditEntry)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if action == "recovery":
        query = query.where(AuditEntry.action.startswith("recovery.", autoescape=True))
    elif action:
        query = query.where(AuditEntry.action == action)
    if organization is not None:
        query = query.where(AuditEntry.organization_id == organization.id)
    if since is not None:
        query = query.where(AuditEntry.created_at >= since)
    if until is not None:
        query = query.where(AuditEntry.created_at < until)
    page = max(page, 1)
    rows = list(db.session.scalars(
        query.order_by(AuditEntry.created_at.desc(), AuditEntry.id.desc())
        .offset((page - 1) * per_page).limit(per_page + 1)))
    return AuditPage(rows[:per_page], page, len(rows) > per_page)

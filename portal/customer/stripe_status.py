"""Whether Stripe has the latest figures of an invoice, in the words a customer reads.

Three states, and only these reach the customer (never an outcome code or a job id):
up to date, updating, and could not be updated (the sweep keeps retrying; the
support console lists every invoice in that state).
"""
from __future__ import annotations

from dataclasses import dataclass

from portal.models import Invoice, SyncRun

UP_TO_DATE = "up_to_date"
UPDATING = "updating"
FAILING = "failing"

PHRASES = {
    UP_TO_DATE: "Stripe is up to date",
    UPDATING: "Updating Stripe…",
    FAILING: "Stripe could not be updated; we are retrying and support has been told",
}
# Outcomes after which Stripe matched the portal.
_SUCCEEDED = ("synced", "unchanged")
# Outcomes that only mean "another try follows shortly": another run held the
# invoice, or a write is still settling.
_WAITING = ("locked", "lock_lost", "write_in_flight")


@dataclass(frozen=True)
class StripeStatus:
    state: str

    @property
    def phrase(self) -> str:
        return PHRASES[self.state]


def stripe_status(invoice: Invoice, last_sync: SyncRun | None) -> StripeStatus:
    """How the invoice stands at Stripe, from its sync state: blocked, or changes
    pending after a run that failed, is FAILING; changes pending otherwise is
    UPDATING; no changes pending is UP_TO_DATE."""
    if invoice.sync_blocked:
        return StripeStatus(FAILING)
    if not invoice.has_unsynced_changes:
        return StripeStatus(UP_TO_DATE)
    if last_sync is not None and last_sync.outcome not in _SUCCEEDED + _WAITING:
        return StripeStatus(FAILING)
    return StripeStatus(UPDATING)


def register(app) -> None:
    """`stripe_status(invoice, last_sync)` in every template (the `sync_status` macro)."""
    app.add_template_global(stripe_status, "stripe_status")

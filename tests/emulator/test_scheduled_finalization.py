"""Scheduled finalization: automatically_finalizes_at exists only with auto_advance."""

from emulator_helpers import DAY, draft_with, event_types


# Stripe docs: "Schedule invoice finalization" (https://docs.stripe.com/invoicing/scheduled-finalization):
# "To configure an automatic finalization time for an invoice, you must have automatic invoice
# advancement enabled"; a draft without auto_advance is never finalized by Stripe.
def test_time_without_auto_advance_is_accepted_ignored_and_never_finalizes(client, customer, ctl):
    now = ctl.now()
    implicit = draft_with(client, customer, automatically_finalizes_at=now + 7200)
    explicit = draft_with(client, customer, auto_advance=False, automatically_finalizes_at=now + 7200)
    for inv in (implicit, explicit):
        assert inv.auto_advance is False and inv.automatically_finalizes_at is None
    ctl.advance_clock(40 * DAY)
    for inv in (implicit, explicit):
        after = client.v1.invoices.retrieve(inv.id)
        assert after.status == "draft" and after.automatically_finalizes_at is None
    assert "invoice.finalized" not in event_types(client)


# Stripe docs: "Automatic invoice advancement"
# (https://docs.stripe.com/invoicing/integration/automatic-advancement-collection): invoices created with
# the API don't advance unless auto_advance is set; the library's InvoiceCreateParams says "Defaults to false".
def test_api_invoices_default_to_no_auto_advance(client, customer):
    inv = client.v1.invoices.create({"customer": customer.id})
    assert inv.auto_advance is False and inv.automatically_finalizes_at is None


# Stripe docs: "Schedule invoice finalization" (https://docs.stripe.com/invoicing/scheduled-finalization):
# the invoice is finalized at automatically_finalizes_at (up to 5 years ahead).
def test_auto_advance_with_a_time_finalizes_when_the_clock_reaches_it(client, customer, ctl):
    at = ctl.now() + 3 * DAY
    inv = draft_with(client, customer, auto_advance=True, automatically_finalizes_at=at)
    assert inv.automatically_finalizes_at == at
    ctl.advance_clock(3 * DAY - 120)
    assert client.v1.invoices.retrieve(inv.id).status == "draft"  # not an hour after creation
    ctl.advance_clock(240)
    done = client.v1.invoices.retrieve(inv.id)
    assert done.status == "open" and done.number and done.status_transitions.finalized_at == at
    assert done.automatically_finalizes_at is None


# Stripe docs: "Automatic invoice advancement"
# (https://docs.stripe.com/invoicing/integration/automatic-advancement-collection): with automatic
# collection Stripe finalizes drafts "after one hour".
def test_auto_advance_without_a_time_finalizes_an_hour_after_creation(client, customer, ctl):
    inv = draft_with(client, customer, auto_advance=True)
    assert inv.automatically_finalizes_at == inv.created + 3600
    ctl.advance_clock(3500)
    assert client.v1.invoices.retrieve(inv.id).status == "draft"
    ctl.advance_clock(200)
    assert client.v1.invoices.retrieve(inv.id).status_transitions.finalized_at == inv.created + 3600


# Stripe docs: "Schedule invoice finalization" (https://docs.stripe.com/invoicing/scheduled-finalization):
# "Turning off automatic advancement disables the invoice from being automatically charged or sent";
# enabling it without a time has Stripe compute the time.
def test_toggling_auto_advance_clears_and_restores_the_schedule(client, customer, ctl):
    at = ctl.now() + 2 * DAY
    inv = draft_with(client, customer, auto_advance=True, automatically_finalizes_at=at)
    off = client.v1.invoices.update(inv.id, {"auto_advance": False})
    assert off.automatically_finalizes_at is None
    ignored = client.v1.invoices.update(inv.id, {"automatically_finalizes_at": at + 60})
    assert ignored.auto_advance is False and ignored.automatically_finalizes_at is None
    back = client.v1.invoices.update(inv.id, {"auto_advance": True})
    assert back.automatically_finalizes_at == inv.created + 3600  # the explicit time was forgotten
    client.v1.invoices.update(inv.id, {"auto_advance": False})
    timed = client.v1.invoices.update(inv.id, {"auto_advance": True, "automatically_finalizes_at": at})
    assert timed.automatically_finalizes_at == at
    moved = client.v1.invoices.update(inv.id, {"automatically_finalizes_at": at + 3600})
    assert moved.automatically_finalizes_at == at + 3600
    ctl.advance_clock(2 * DAY + 60)
    assert client.v1.invoices.retrieve(inv.id).status == "draft"  # not at the old time
    ctl.advance_clock(3600)
    assert client.v1.invoices.retrieve(inv.id).status == "open"


# Stripe docs: "Schedule invoice finalization" (https://docs.stripe.com/invoicing/scheduled-finalization):
# off and never finalized by the clock, however far it goes.
def test_switching_auto_advance_off_stops_a_scheduled_finalization(client, customer, ctl):
    inv = draft_with(client, customer, auto_advance=True)
    client.v1.invoices.update(inv.id, {"auto_advance": False})
    ctl.advance_clock(10 * DAY)
    assert client.v1.invoices.retrieve(inv.id).status == "draft"


# Stripe docs: the invoice.finalization_failed event ("Occurs whenever a draft invoice cannot be finalized.
# See the invoice's last finalization error", https://docs.stripe.com/api/events/types) and the
# Invoice object's last_finalization_error (https://docs.stripe.com/api/invoices/object).
def test_failed_scheduled_finalization_emits_finalization_failed(client, customer, ctl):
    inv = draft_with(client, customer, auto_advance=True)
    client.v1.customers.delete(customer.id)
    ctl.advance_clock(3700)
    after = client.v1.invoices.retrieve(inv.id)
    assert after.status == "draft" and after.automatically_finalizes_at is None
    err = after.last_finalization_error
    assert err.type == "invalid_request_error" and err.code == "resource_missing"
    assert err.message == f"No such customer: '{customer.id}'"
    (failed,) = client.v1.events.list({"type": "invoice.finalization_failed"}).data
    assert failed.data.object.id == inv.id and failed.data.object.last_finalization_error.code == "resource_missing"
    ctl.advance_clock(30 * DAY)  # not rescheduled
    assert len(client.v1.events.list({"type": "invoice.finalization_failed"}).data) == 1
    assert client.v1.invoices.retrieve(inv.id).status == "draft"


# Stripe docs: "Schedule invoice finalization" (https://docs.stripe.com/invoicing/scheduled-finalization):
# a time in the past or beyond 5 years is refused.
def test_finalization_time_must_be_within_five_years(client, customer, ctl):
    import pytest
    import stripe

    for at in (ctl.now() - 10, ctl.now() + 6 * 366 * DAY):
        with pytest.raises(stripe.InvalidRequestError) as ei:
            client.v1.invoices.create({"customer": customer.id, "auto_advance": True, "automatically_finalizes_at": at})
        assert ei.value.param == "automatically_finalizes_at"

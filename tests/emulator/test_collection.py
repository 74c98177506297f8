"""Collection after finalization: payment attempts, retries, /pay, minimum charge, balance."""

import pytest
import stripe
from emulator_helpers import DAY, draft_with, event_types


def _finalized(client, customer, amount=1000, **params):
    """A draft finalized now with auto_advance (automatic collection)."""
    inv = draft_with(client, customer, amount, **params)
    return client.v1.invoices.finalize_invoice(inv.id, {"auto_advance": True})


# Stripe docs: "Automatic invoice advancement"
# (https://docs.stripe.com/invoicing/integration/automatic-advancement-collection) and the Invoice object's
# next_payment_attempt / attempted ("An invoice is not attempted until 1 hour after", the library's docstring):
# the attempt happens about an hour after finalization, with the customer's default payment method.
def test_payment_is_attempted_an_hour_after_finalization(client, paying_customer, ctl):
    inv = _finalized(client, paying_customer, 1500)
    fin = inv.status_transitions.finalized_at
    assert inv.status == "open" and inv.next_payment_attempt == fin + 3600 and inv.attempted is False
    ctl.advance_clock(3500)
    assert client.v1.invoices.retrieve(inv.id).status == "open"
    out = ctl.advance_clock(200)
    assert out["payment_attempts"] == 1
    paid = client.v1.invoices.retrieve(inv.id)
    assert paid.status == "paid" and paid.amount_paid == 1500 and paid.amount_remaining == 0
    assert paid.status_transitions.paid_at == fin + 3600 and paid.attempt_count == 1 and paid.attempted is True
    assert paid.next_payment_attempt is None and paid.auto_advance is False
    types = event_types(client, type="invoice.*")
    assert types[-3:] == ["invoice.updated", "invoice.paid", "invoice.payment_succeeded"]


# Stripe docs: "Schedule invoice finalization" + "Automatic invoice advancement": a scheduled finalization
# is followed by the payment attempt, each at its own time even across one big clock jump.
def test_scheduled_finalization_then_payment_in_one_clock_jump(client, paying_customer, ctl):
    inv = draft_with(client, paying_customer, 800, auto_advance=True)
    ctl.advance_clock(3 * DAY)
    paid = client.v1.invoices.retrieve(inv.id)
    assert paid.status == "paid"
    assert paid.status_transitions.finalized_at == inv.created + 3600
    assert paid.status_transitions.paid_at == inv.created + 7200


# Stripe docs: "Automatic invoice advancement": with auto_advance false you transition the invoice yourself.
def test_finalizing_without_auto_advance_never_attempts_payment(client, paying_customer, ctl):
    inv = draft_with(client, paying_customer, 900)
    fin = client.v1.invoices.finalize_invoice(inv.id)
    assert fin.status == "open" and fin.next_payment_attempt is None
    ctl.advance_clock(30 * DAY)
    after = client.v1.invoices.retrieve(inv.id)
    assert after.status == "open" and after.attempt_count == 0 and after.attempted is False


# Stripe docs: "Automate payment retries" (https://docs.stripe.com/billing/revenue-recovery/smart-retries):
# failed payments are retried on a schedule (custom schedule: days after the previous attempt), and after the
# last one the invoice is left past due; the Invoice object's attempt_count counts the attempts.
def test_no_payment_method_fails_and_is_retried_on_the_schedule(client, customer, ctl):
    inv = _finalized(client, customer, 2000)
    t1 = inv.next_payment_attempt
    ctl.advance_clock(3601)
    one = client.v1.invoices.retrieve(inv.id)
    assert one.status == "open" and one.attempt_count == 1 and one.attempted is True
    assert one.next_payment_attempt == t1 + 3 * DAY
    assert client.v1.customers.retrieve(customer.id).delinquent is True
    ctl.advance_clock(3 * DAY)
    assert client.v1.invoices.retrieve(inv.id).next_payment_attempt == t1 + 8 * DAY
    ctl.advance_clock(5 * DAY)
    assert client.v1.invoices.retrieve(inv.id).next_payment_attempt == t1 + 15 * DAY
    ctl.advance_clock(7 * DAY)
    last = client.v1.invoices.retrieve(inv.id)
    assert last.attempt_count == 4 and last.next_payment_attempt is None and last.status == "open"
    ctl.advance_clock(30 * DAY)
    assert client.v1.invoices.retrieve(inv.id).attempt_count == 4
    failed = client.v1.events.list({"type": "invoice.payment_failed"}).data
    assert [e.data.object.attempt_count for e in reversed(failed)] == [1, 2, 3, 4]


# Stripe docs: "Automate payment retries" (https://docs.stripe.com/billing/revenue-recovery/smart-retries):
# retries use the customer's invoice_settings.default_payment_method as it is at retry time.
def test_a_retry_pays_with_a_card_attached_since(client, customer, ctl):
    inv = _finalized(client, customer, 1200)
    ctl.advance_clock(3601)
    assert client.v1.invoices.retrieve(inv.id).attempt_count == 1
    client.v1.customers.update(customer.id, {"invoice_settings": {"default_payment_method": "pm_card_visa"}})
    ctl.advance_clock(3 * DAY)
    paid = client.v1.invoices.retrieve(inv.id)
    assert paid.status == "paid" and paid.attempt_count == 2 and paid.amount_paid == 1200
    assert client.v1.customers.retrieve(customer.id).delinquent is False


# Stripe docs: "Testing" (https://docs.stripe.com/testing#declined-payments): pm_card_chargeCustomerFail
# attaches, then every charge is declined (card_declined).
def test_an_attached_declining_card_fails_every_attempt(client, ctl):
    cus = client.v1.customers.create({"invoice_settings": {"default_payment_method": "pm_card_chargeCustomerFail"}})
    inv = _finalized(client, cus, 700)
    ctl.advance_clock(20 * DAY)
    after = client.v1.invoices.retrieve(inv.id)
    assert after.status == "open" and after.attempt_count == 4 and after.next_payment_attempt is None


# Stripe docs: "Automate payment retries" (custom schedule); the emulator's schedule is configurable.
def test_retry_schedule_is_configurable(client, customer, ctl):
    ctl.set_payment_retry_days([1])
    inv = _finalized(client, customer, 700)
    ctl.advance_clock(3601)
    assert client.v1.invoices.retrieve(inv.id).next_payment_attempt == inv.next_payment_attempt + DAY
    ctl.advance_clock(DAY)
    last = client.v1.invoices.retrieve(inv.id)
    assert last.attempt_count == 2 and last.next_payment_attempt is None
    assert ctl.config()["payment_retry_days"] == [1]


# Stripe docs: "Completing a next action for PaymentIntents created with one-off invoices"
# (https://support.stripe.com/questions/completing-a-next-action-for-paymentintents-created-with-one-off-invoices):
# invoice.payment_action_required when 3D Secure is needed; "Testing"
# (https://docs.stripe.com/testing#regulatory-cards): pm_card_authenticationRequired always authenticates.
def test_a_card_needing_authentication_asks_for_action_and_is_not_retried(client, ctl):
    cus = client.v1.customers.create({"invoice_settings": {"default_payment_method": "pm_card_authenticationRequired"}})
    inv = _finalized(client, cus, 5000)
    ctl.advance_clock(3601)
    after = client.v1.invoices.retrieve(inv.id)
    assert after.status == "open" and after.attempted is True and after.next_payment_attempt is None
    (action,) = client.v1.events.list({"type": "invoice.payment_action_required"}).data
    assert action.data.object.id == inv.id
    ctl.advance_clock(20 * DAY)
    assert client.v1.invoices.retrieve(inv.id).attempt_count == after.attempt_count
    with pytest.raises(stripe.CardError) as ei:
        client.v1.invoices.pay(inv.id)
    assert ei.value.http_status == 402 and ei.value.code == "invoice_payment_intent_requires_action"


# Stripe docs: the emulator's payment delay (Stripe's is about an hour) is configurable, 0 = at once.
def test_payment_delay_is_configurable_and_reset_restores_it(client, paying_customer, ctl):
    ctl.set_payment_delay(60)
    inv = _finalized(client, paying_customer, 1000)
    assert inv.next_payment_attempt == inv.status_transitions.finalized_at + 60
    ctl.advance_clock(61)
    assert client.v1.invoices.retrieve(inv.id).status == "paid"
    ctl.set_payment_delay(0)
    now_paid = _finalized(client, paying_customer, 1000)
    assert now_paid.status == "paid"
    ctl.reset()
    assert ctl.config()["payment_delay_seconds"] == 3600 and ctl.config()["payment_retry_days"] == [3, 5, 7]


# The emulated clock also moves with real time: a due attempt runs without any request
# (seen here through the webhook it sends).
def test_a_due_attempt_runs_as_real_time_passes(client, paying_customer, ctl, receiver):
    import time

    ctl.set_payment_delay(1)
    inv = _finalized(client, paying_customer, 1000)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(e["type"] == "invoice.paid" for e in receiver.ok_events()):
            break
        time.sleep(0.1)
    paid = [e for e in receiver.ok_events() if e["type"] == "invoice.paid"]
    assert [e["data"]["object"]["id"] for e in paid] == [inv.id]


def test_config_refuses_unknown_keys_and_bad_values(ctl):
    import urllib.error

    for bad in ({"payment_delay": 5}, {"payment_delay_seconds": -1}, {"payment_retry_days": [0]}):
        with pytest.raises(urllib.error.HTTPError) as ei:
            ctl.configure(**bad)
        assert ei.value.code == 400
    assert ctl.config()["payment_delay_seconds"] == 3600


def test_start_emulator_payment_delay_keyword():
    from emulator_helpers import make_client

    from stripe_emulator.process import start_emulator

    with start_emulator(payment_delay=5) as emu:
        c = make_client(emu)
        cus = c.v1.customers.create({"invoice_settings": {"default_payment_method": "pm_card_visa"}})
        inv = draft_with(c, cus, 1000)
        fin = c.v1.invoices.finalize_invoice(inv.id, {"auto_advance": True})
        assert fin.next_payment_attempt == fin.status_transitions.finalized_at + 5
        emu.control.set_payment_delay(100)
        emu.control.reset()
        assert emu.control.config()["payment_delay_seconds"] == 5  # the start-time setting


# Stripe docs: "Pay an invoice" (https://docs.stripe.com/api/invoices/pay) and "Status transitions and
# finalization" (https://docs.stripe.com/invoicing/integration/workflow-transitions): /pay charges at once;
# a decline is a 402 card_error and invoice.payment_failed, the invoice stays open.
def test_pay_charges_at_once(client, paying_customer, customer, ctl):
    inv = draft_with(client, paying_customer, 1500)
    paid = client.v1.invoices.pay(inv.id)  # a draft is finalized first
    assert paid.status == "paid" and paid.amount_paid == 1500 and paid.attempt_count == 1
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.invoices.pay(inv.id)

    failing = client.v1.customers.create({"invoice_settings": {"default_payment_method": "pm_card_chargeCustomerFail"}})
    bad = draft_with(client, failing, 900)
    with pytest.raises(stripe.CardError) as ei:
        client.v1.invoices.pay(bad.id)
    assert ei.value.http_status == 402 and ei.value.code == "card_declined"
    assert ei.value.error.type == "card_error" and ei.value.error.decline_code == "generic_decline"
    after = client.v1.invoices.retrieve(bad.id)
    assert after.status == "open" and after.attempt_count == 1 and after.attempted is True
    with pytest.raises(stripe.CardError) as ei:  # an unattachable test card can be charged directly
        client.v1.invoices.pay(bad.id, {"payment_method": "pm_card_chargeDeclinedInsufficientFunds"})
    assert ei.value.error.decline_code == "insufficient_funds"
    assert client.v1.invoices.retrieve(bad.id).attempt_count == 1  # manual attempts after the first don't count
    assert client.v1.invoices.pay(bad.id, {"payment_method": "pm_card_visa"}).status == "paid"
    assert "invoice.payment_failed" in event_types(client)


# Stripe's error when there is nothing to charge (its message, as Stripe words it; see README "Fidelity").
def test_pay_without_any_payment_method_is_refused(client, customer):
    inv = draft_with(client, customer, 1500)
    with pytest.raises(stripe.InvalidRequestError) as ei:
        client.v1.invoices.pay(inv.id)
    assert ei.value.http_status == 400
    assert ei.value.user_message.startswith("This customer has no attached payment source or default payment method.")
    assert client.v1.invoices.retrieve(inv.id).status == "open"


# Stripe docs: "Pay an invoice" (https://docs.stripe.com/api/invoices/pay): paid_out_of_band "will result in
# no charge being made".
def test_paid_out_of_band(client, customer):
    inv = client.v1.invoices.finalize_invoice(draft_with(client, customer, 1500).id)
    paid = client.v1.invoices.pay(inv.id, {"paid_out_of_band": True})
    assert paid.status == "paid" and paid.attempt_count == 0 and paid.attempted is False
    types = event_types(client, type="invoice.*")
    assert "invoice.paid" in types and "invoice.payment_succeeded" not in types


# The emulator's control call forces a customer's charges to fail, whatever its card.
def test_fail_payments_for_forces_declines(client, paying_customer, ctl):
    ctl.fail_payments_for(paying_customer.id)
    inv = draft_with(client, paying_customer, 1500)
    with pytest.raises(stripe.CardError):
        client.v1.invoices.pay(inv.id)
    ctl.fail_payments_for(paying_customer.id, fail=False)
    assert client.v1.invoices.pay(inv.id).status == "paid"


# Stripe docs: "Customer invoice balance" (https://docs.stripe.com/billing/customer/balance): "When the amount
# due on an invoice is less than the minimum chargeable amount the invoice is marked as paid and the amount
# owed moved to the invoice balance as a debit"; "The invoice balance automatically applies toward the next
# invoice finalized". The Invoice object's description says the same (stripe library docstring).
def test_an_amount_below_the_minimum_charge_moves_to_the_balance(client, paying_customer, ctl):
    small = _finalized(client, paying_customer, 30)
    assert small.status == "paid" and small.amount_paid == 0 and small.amount_remaining == 0
    assert small.amount_due == 0 and small.total == 30 and small.ending_balance == 30
    assert small.attempted is False
    assert client.v1.customers.retrieve(paying_customer.id).balance == 30
    upd = client.v1.events.list({"type": "customer.updated", "limit": 1}).data[0]
    assert upd.data.object.balance == 30 and upd.data.previous_attributes.balance == 0
    assert "invoice.paid" in event_types(client)
    nxt = draft_with(client, paying_customer, 1000)
    assert nxt.starting_balance == 30 and nxt.amount_due == 1030 and nxt.ending_balance is None
    fin = client.v1.invoices.finalize_invoice(nxt.id, {"auto_advance": True})
    assert fin.starting_balance == 30 and fin.amount_due == 1030 and fin.ending_balance == 0
    assert client.v1.customers.retrieve(paying_customer.id).balance == 0
    ctl.advance_clock(3601)
    assert client.v1.invoices.retrieve(nxt.id).amount_paid == 1030


# Stripe docs: "Supported currencies", minimum charge amounts
# (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts): GBP 0.30, JPY 50 (zero-decimal).
@pytest.mark.parametrize(
    ("currency", "below", "at"), [("usd", 49, 50), ("gbp", 29, 30), ("eur", 49, 50), ("jpy", 49, 50)]
)
def test_minimum_charge_per_currency(client, currency, below, at):
    cus = client.v1.customers.create({"invoice_settings": {"default_payment_method": "pm_card_visa"}})
    low = client.v1.invoices.finalize_invoice(draft_with(client, cus, below, currency=currency).id)
    assert low.status == "paid" and low.amount_due == 0
    assert client.v1.customers.retrieve(cus.id).balance == below
    client.v1.customers.update(cus.id, {"balance": 0})
    ok = client.v1.invoices.finalize_invoice(draft_with(client, cus, at, currency=currency).id)
    assert ok.status == "open" and ok.amount_due == at


# Stripe docs: the Invoice object (https://docs.stripe.com/api/invoices/object): starting_balance "If the
# invoice has not been finalized yet, this will be the current customer balance"; ending_balance null until
# finalized; amount_due takes a positive starting balance into account.
def test_a_draft_shows_the_current_customer_balance(client, customer):
    inv = draft_with(client, customer, 1000)
    assert inv.starting_balance == 0 and inv.amount_due == 1000 and inv.ending_balance is None
    client.v1.customers.update(customer.id, {"balance": 250})
    assert client.v1.invoices.retrieve(inv.id).amount_due == 1250
    client.v1.customers.update(customer.id, {"balance": -1500})
    credit = client.v1.invoices.retrieve(inv.id)
    assert credit.starting_balance == -1500 and credit.amount_due == 0 and credit.total == 1000
    fin = client.v1.invoices.finalize_invoice(inv.id)
    assert fin.status == "paid" and fin.ending_balance == -500
    assert client.v1.customers.retrieve(customer.id).balance == -500
